"""Linear attention: φ(Q)(φ(K)ᵀV), chunked (quadratic inside a chunk, a carried state across chunks,
optional decay). Sites the model writes as linear attention run on it exactly; ``strategy="linear"``
puts it in place of softmax attention as an opt-in approximation.
"""

from __future__ import annotations

from dataclasses import dataclass

from attncomp.frontend.rules import register_rule
from attncomp.ir import AttentionSpec, Causal, Full, Plan, runtime_part, static_part
from attncomp.ir import ops_table as T
from attncomp.strategies.base import Registered, Strategy, tolerance_note
from attncomp.strategies.linear import site


@dataclass(frozen=True)
class Linear(Strategy):
    """Linear attention φ(q)(φ(k)ᵀv) in place of softmax attention: it changes the function, so it
    is opt-in (never chosen by ``auto``). The first call measures each site's relative error against
    dense attention (``explain`` reports it); a site whose error exceeds ``tolerance`` runs dense
    from then on. Sites with biases or masks other than causal stay dense."""

    name = "linear"
    exact = False
    feature_map: str = "elu1"
    chunk: int = 64
    tolerance: float | None = None


def plan(spec: AttentionSpec, requested: Strategy) -> Plan | str | None:
    if spec.kernel == "linear":  # written as linear attention in the model: exact
        why = (f"linear (exact): recognised naive linear attention ({spec.form}), run on "
               "attncomp.ops.linear_attention")
        if requested.name not in ("auto", "linear"):
            why += f"; {requested.name} requested, which applies to softmax sites"
        return Plan(spec=spec, strategy="linear", reasons=(why,))
    if spec.kernel != "softmax" or requested.name != "linear":
        return None
    static, runtime = static_part(spec.mask), runtime_part(spec.mask)
    if runtime or not isinstance(static, (Full, Causal)) or (isinstance(static, Causal) and static.offset):
        return f"linear requested, but the mask {spec.mask} has no linear-attention form"
    if spec.score.bias or spec.score.softcap:
        return "linear requested, but the scores carry additive terms or a soft-cap"
    return Plan(spec=spec.with_(contract="approx"), strategy="linear",
                reasons=(f"linear (approximate, opt-in): φ={requested.feature_map}, "
                         f"{'causal' if isinstance(static, Causal) else 'non-causal'}, {tolerance_note(requested)}",))


STRATEGY = Registered("linear", Linear, plan)
register_rule("linear_attention", T.DIV, site.match)
