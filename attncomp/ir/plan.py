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


# What a softmax site runs, decided once by ``passes.choose_variant`` and read by the site module
# (``attncomp.strategies.softmax_site``) when it is built:
VARIANTS = {
    "kept": "nothing to gain: the site's own nodes stay in the graph (e.g. an SDPA call without a mask)",
    "dense": "the dense kernel on the folded score program (scale, additive bias, a run-time mask as a shift)",
    "dense-causal": "the dense causal kernel: a proved causal mask and nothing else",
    "dense-padding": "the dense (causal) kernel with a key-padding mask as a per-key shift (no L x L mask)",
    "block-sparse": "the block-sparse kernel: only the tiles the proved mask leaves are visited",
    "strategy": "a registered strategy's own op (linear, routing, approximations, ring attention)",
}


@dataclass(frozen=True)
class Plan:
    """How a spec runs: strategy, variant (:data:`VARIANTS`), tiling, reduction order, and why."""

    spec: AttentionSpec
    strategy: str = "dense"
    variant: str = "dense"
    tiling: Tiling = field(default_factory=Tiling)
    reduction: str = "online_softmax"
    reasons: tuple[str, ...] = ()

    def with_(self, **changes) -> Plan:
        return replace(self, **changes)
