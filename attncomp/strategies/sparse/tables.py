"""What a block table of a site's static mask skips, for the plan's reasons."""

from __future__ import annotations

from attncomp.ir import AttentionSpec, Full, runtime_part, static_part
from attncomp.masks import blocks

TILE = 64  # tile edge used to report the fraction of tiles a static mask skips
# On CPU the block-sparse executor gathers and masks tiles per call: measured against the dense kernel on
# the materialised mask (causal windows, B=2, H=4, D=64, L 128…1024), it breaks even at ~56% of 64×64
# tiles skipped and wins from ~65% (benchmarks/README.md, "Local vs dense on CPU"). Triton skips tiles at
# no per-call cost, so CUDA takes any skip.
MIN_SKIPPED = {"cpu": 0.6}


def skipped_fraction(spec: AttentionSpec) -> float | None:
    """Fraction of 64×64 tiles the static part of the mask never visits (None: shape unknown)."""
    static, d = static_part(spec.mask), spec.dims
    if d.Lq is None or d.Lk is None or isinstance(static, Full):
        return None
    table = blocks.block_table(static.expr(), None, d.Lq, d.Lk, TILE, TILE, "cpu")
    return table.skipped_fraction()


def too_dense(spec: AttentionSpec) -> str | None:
    """Why skipping tiles does not pay for ``spec`` on its device (the mask leaves too many), or None."""
    floor = MIN_SKIPPED.get(spec.device, 0.0)
    frac = skipped_fraction(spec) if floor else None
    if frac is None or frac >= floor:
        return None
    return (f"the {static_part(spec.mask)} mask skips {frac:.0%} of {TILE}x{TILE} tiles at {spec.dims.Lq}x"
            f"{spec.dims.Lk}, under the {floor:.0%} from which the block-sparse kernel beats the dense one on "
            f"{spec.device}")


def describe(spec: AttentionSpec) -> str:
    """``"window(255,0), 92% of 64x64 tiles skipped"`` and the like."""
    frac = skipped_fraction(spec)
    skip = f", {frac:.0%} of {TILE}x{TILE} tiles skipped" if frac is not None else ""
    if runtime_part(spec.mask):
        skip += " (before key padding)" if skip else ", tiles chosen from the key padding at run time"
    return f"{spec.mask}{skip}"
