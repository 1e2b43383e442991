"""What a block table of a site's static mask skips, for the plan's reasons."""

from __future__ import annotations

from attncomp.ir import AttentionSpec, Full, runtime_part, static_part
from attncomp.masks import blocks

TILE = 64  # tile edge used to report the fraction of tiles a static mask skips


def skipped_fraction(spec: AttentionSpec) -> float | None:
    """Fraction of 64×64 tiles the static part of the mask never visits (None: shape unknown)."""
    static, d = static_part(spec.mask), spec.dims
    if d.Lq is None or d.Lk is None or isinstance(static, Full):
        return None
    table = blocks.block_table(static.expr(), None, d.Lq, d.Lk, TILE, TILE, "cpu")
    return table.skipped_fraction()


def describe(spec: AttentionSpec) -> str:
    """``"window(255,0), 92% of 64x64 tiles skipped"`` and the like."""
    frac = skipped_fraction(spec)
    skip = f", {frac:.0%} of {TILE}x{TILE} tiles skipped" if frac is not None else ""
    if runtime_part(spec.mask):
        skip += " (before key padding)" if skip else ", tiles chosen from the key padding at run time"
    return f"{spec.mask}{skip}"
