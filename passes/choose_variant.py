"""Pass: choose what a softmax site runs (``Plan.variant``, see :data:`attncomp.ir.plan.VARIANTS`).

Decided once per captured graph from the spec; the site module reads ``plan.variant`` when it is
built and never re-decides per call. ``kept`` leaves the site's own nodes in the graph: an SDPA call
with no mask, or with a mask tensor of q's rank that no proof gave structure to (a learned bias, a mask
handed in as an input), already is one fused kernel call, so replacing it could only add overhead.
"""

from __future__ import annotations

from attncomp.ir import Causal, Full, Plan, runtime_part, static_part
from attncomp.strategies import Strategy
from attncomp.strategies.decode.plan import decode_window

KEPT_REASON = ("kept: the site is one SDPA call, already torch's fused kernel, with no mask or a 4-D mask tensor "
               "without a proven structure: nothing to skip; attncomp would only add overhead")


def choose_variant(plan: Plan, requested: Strategy) -> Plan:
    spec = plan.spec
    if spec.kernel != "softmax":
        return plan.with_(variant="strategy")
    if plan.strategy not in ("dense", "sparse", "local") or spec.contract != "exact":
        return plan.with_(variant="strategy")
    if requested.name in ("auto", "dense") and not spec.score.bias and decode_window(spec) is not None:
        return plan.with_(strategy="dense", variant="decode", reasons=(
            f"{requested.name}: decode, {spec.dims.Lq} queries against {spec.dims.Lk} keys: the split-KV kernel",))
    if spec.fused_eager and requested.name == "auto":
        return plan.with_(variant="kept", reasons=(KEPT_REASON,))
    if plan.strategy != "dense":
        return plan.with_(variant="block-sparse")
    static, dynamic = static_part(spec.mask), runtime_part(spec.mask)
    if spec.score.bias:
        return plan.with_(variant="dense")
    if isinstance(static, Causal) and not dynamic:
        return plan.with_(variant="dense-causal")
    if isinstance(static, (Full, Causal)) and dynamic and all(t.role == "key_padding" for t in dynamic):
        return plan.with_(variant="dense-padding", reasons=plan.reasons + (
            "key padding as a per-key shift (no Lq x Lk mask)",))
    return plan.with_(variant="dense")
