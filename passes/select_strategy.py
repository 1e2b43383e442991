"""Pass: pick the strategy of a spec, given what the user asked for.

The registered strategies (``attncomp.strategies.REGISTRY``) are asked in order whether they take the
spec; the first plan wins. A strategy the user asked for that does not apply says why, and the next
one decides; ``dense`` (last) takes what is left, carrying those reasons. Only exact strategies are
chosen automatically; opt-in approximations come back with ``spec.contract == "approx"``.
"""

from __future__ import annotations

from attncomp.ir import AttentionSpec, Plan
from attncomp.strategies import REGISTRY, Strategy, dense


def select_strategy(spec: AttentionSpec, requested: Strategy) -> Plan:
    refused: list[str] = []
    for strategy in REGISTRY:
        if strategy.name == "dense":
            break
        res = strategy.plan(spec, requested)
        if isinstance(res, Plan):
            return res
        if isinstance(res, str):
            refused.append(res)
    return dense.plan(spec, requested, tuple(refused))
