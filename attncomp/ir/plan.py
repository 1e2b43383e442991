"""How a spec runs: :class:`Plan` (strategy, tiling, reduction order, reasons)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from attncomp.ir.spec import AttentionSpec

# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tiling:
    BLOCK_M: int = 64
    BLOCK_N: int = 64
    num_warps: int = 4
    num_stages: int = 2
    split_kv: int = 1


@dataclass(frozen=True)
class Plan:
    """How a spec runs: strategy, tiling, reduction order, and why."""

    spec: AttentionSpec
    strategy: str = "dense"
    tiling: Tiling = field(default_factory=Tiling)
    reduction: str = "online_softmax"
    reasons: tuple[str, ...] = ()

    def with_(self, **changes) -> Plan:
        return replace(self, **changes)
