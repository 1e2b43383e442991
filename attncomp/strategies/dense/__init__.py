"""Dense attention: every key tile is visited; the causal kernel masks the diagonal tiles only.

The fallback of every site: it takes what no other strategy takes (no mask, a causal mask, a mask
known only as a run-time tensor, or an exact request another strategy refused).
"""

from __future__ import annotations

from dataclasses import dataclass

from attncomp.ir import AttentionSpec, Causal, Plan, runtime_part, static_part
from attncomp.strategies.base import Registered, Strategy


@dataclass(frozen=True)
class Dense(Strategy):
    name = "dense"


def plan(spec: AttentionSpec, requested: Strategy, refused: tuple[str, ...] = ()) -> Plan:
    """Always a plan: dense is the last strategy asked. ``refused`` holds the reasons of strategies
    the user asked for that did not apply."""
    if refused:
        why = "; ".join(dict.fromkeys(refused))  # local and sparse may give one reason
        return Plan(spec=spec, strategy="dense", reasons=(f"{why}; dense kernel (exact)",))
    if requested.name == "dense":
        return Plan(spec=spec, strategy="dense", reasons=("dense: requested",))
    static = static_part(spec.mask)
    tensor_only = any(t.role == "general" for t in runtime_part(spec.mask))
    why = "dense kernel; the mask is a run-time tensor" if tensor_only else "dense kernel"
    if isinstance(static, Causal):
        why += ", causal (diagonal tiles alone are masked)"
    return Plan(spec=spec, strategy="dense", reasons=(f"{requested.name}: {why}",))


STRATEGY = Registered("dense", Dense, plan)
