"""Pass: choose how the softmax reduction runs over the keys (``Plan.reduction``, ``Plan.splits``).

Only orders some kernel implements (:data:`attncomp.ir.plan.REDUCTIONS`): ``split_kv`` for the decode
variant (the split count from :func:`attncomp.strategies.decode.plan.decode_splits`; 0 lets the
launcher decide per call when the sizes it needs are symbolic), ``online_softmax`` for the rest.
"""

from __future__ import annotations

from attncomp.ir import Plan
from attncomp.strategies.decode.plan import decode_splits


def choose_reduction_order(plan: Plan) -> Plan:
    if plan.variant != "decode":
        return plan.with_(reduction="online_softmax", splits=0)
    d = plan.spec.dims
    sizes = (d.Lq, d.Lk, d.Hq, d.Hkv, d.B)
    splits = decode_splits(*sizes, None) if all(isinstance(x, int) for x in sizes) else 0
    return plan.with_(reduction="split_kv", splits=splits)
