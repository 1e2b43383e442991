"""How a spec runs: :class:`Plan` (strategy, tiling, reduction order, reasons)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from attncomp.ir.spec import AttentionSpec

# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------


# What a softmax site runs, decided once by ``passes.choose_variant`` and read by the site module
# (``attncomp.strategies.softmax_site``) when it is built:
VARIANTS = {
    "kept": "nothing to gain: the site's own nodes stay in the graph (e.g. an SDPA call without a mask)",
    "dense": "the dense kernel on the folded score program (scale, additive bias, a run-time mask as a shift)",
    "dense-causal": "the dense causal kernel: a proved causal mask and nothing else",
    "dense-padding": "the dense (causal) kernel with a key-padding mask as a per-key shift (no L x L mask)",
    "block-sparse": "the block-sparse kernel: only the tiles the proved mask leaves are visited",
    "decode": "the split-KV decode kernel: a few queries against a long key range (FlashDecoding-style)",
    "strategy": "a registered strategy's own op (linear, routing, approximations, ring attention)",
}


# How the softmax reduction runs over the keys (``passes.choose_reduction_order``): only orders some kernel
# implements. Tile sizes are not planned here: they depend on the call's shape and device, and the
# launchers read them from the autotune cache or the heuristics beside each template's configs, once
# per shape (the site module keeps them).
REDUCTIONS = {
    "online_softmax": "one pass over the key blocks with a running max and sum (dense, block-sparse)",
    "split_kv": "the key range cut into `splits` parts reduced in parallel, merged by their LSE (decode)",
}


@dataclass(frozen=True)
class Plan:
    """How a spec runs: strategy, variant (:data:`VARIANTS`), reduction order (:data:`REDUCTIONS`)
    with its split count, and why. Every field is read by the site module or a launcher."""

    spec: AttentionSpec
    strategy: str = "dense"
    variant: str = "dense"
    reduction: str = "online_softmax"
    splits: int = 0  # split_kv: key splits (0: the launcher decides per call from its real sizes)
    reasons: tuple[str, ...] = ()

    def with_(self, **changes) -> Plan:
        return replace(self, **changes)
