"""Pass: choose how the softmax reduction runs over key blocks."""

from __future__ import annotations

from attncomp.ir import Plan


def choose_reduction_order(plan: Plan) -> Plan:
    dims = plan.spec.dims
    if dims.Lq is not None and dims.Lk is not None and dims.Lq <= 16 and dims.Lk >= 4096:
        return plan.with_(reduction="split_kv+lse_merge")
    return plan.with_(reduction="online_softmax")
