"""The pass pipeline: spec → plan, read top to bottom. Each pass is a small pure function."""

from __future__ import annotations

from attncomp.ir import AttentionSpec, Plan
from attncomp.strategies import Strategy

from .choose_reduction_order import choose_reduction_order
from .choose_variant import choose_variant
from .select_strategy import select_strategy

__all__ = ["plan_site", "select_strategy", "choose_variant", "choose_reduction_order"]


def plan_site(spec: AttentionSpec, requested: Strategy) -> Plan:
    plan = select_strategy(spec, requested)
    plan = choose_variant(plan, requested)
    plan = choose_reduction_order(plan)
    return plan
