"""Pass: pick the strategy for a spec, given what the user asked for.

Only exact strategies are chosen automatically. Each rule returns a strategy name or ``None``
with the reason it does not apply; the reasons end up in ``explain``.
"""

from __future__ import annotations

from attncomp.ir import AttentionSpec, Plan
from attncomp.strategies import Strategy

AVAILABLE = ("dense",)  # strategies with kernels today; more land with their passes and templates


def select_strategy(spec: AttentionSpec, requested: Strategy) -> Plan:
    reasons = []
    if requested.name in ("auto", "dense"):
        return Plan(spec=spec, strategy="dense", reasons=(f"{requested.name}: dense kernel",))
    if requested.name not in AVAILABLE:
        reasons.append(f"strategy {requested.name!r} has no kernel yet; using dense (exact)")
    return Plan(spec=spec, strategy="dense", reasons=tuple(reasons))
