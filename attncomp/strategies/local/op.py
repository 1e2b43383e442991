"""The local family of attention ops in NATTEN's layout ``(B, *spatial, H, D)``: neighborhood
attention on 1-3-D grids, Swin/MaxViT blocks, MaxViT grids and HaloNet halos — each a static mask on
the block-sparse op (:func:`attncomp.strategies.sparse.masked.attention`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from torch import Tensor

from attncomp import ir
from attncomp.runtime import validate
from attncomp.runtime.device import use_triton
from attncomp.strategies.sparse.masked import attention

__all__ = ["neighborhood_mask", "neighborhood_attention", "block_attention", "grid_attention", "halo_attention"]


# ------------------------------------------------------------------------------------------------
# The local family (NATTEN semantics)
# ------------------------------------------------------------------------------------------------


def _per_axis(x, n: int, name: str) -> tuple:
    t = tuple(x) if isinstance(x, Sequence) else (x,) * n
    if len(t) != n:
        raise ValueError(f"{name} has {len(t)} entries for {n} spatial axes")
    return t


def neighborhood_mask(spatial: Sequence[int], kernel_size, dilation=1, stride=1, is_causal=False) -> ir.Neighborhood:
    """The :class:`~attncomp.ir.Neighborhood` mask for a grid of ``spatial`` extents, validated."""
    n = len(spatial)
    if not 1 <= n <= 3:
        raise ValueError(f"neighborhood attention takes 1-3 spatial axes, got {n}")
    ks, ds, ss = (_per_axis(x, n, name) for x, name in ((kernel_size, "kernel_size"), (dilation, "dilation"),
                                                        (stride, "stride")))
    cs = tuple(bool(c) for c in _per_axis(is_causal, n, "is_causal"))
    for ax, (X, K, d, s) in enumerate(zip(spatial, ks, ds, ss)):
        if K < 1 or d < 1 or s < 1:
            raise ValueError(f"axis {ax}: kernel_size, dilation and stride must be >= 1 (got {K}, {d}, {s})")
        if K * d > X:
            raise ValueError(f"axis {ax}: kernel_size * dilation = {K * d} exceeds the input extent {X}")
        if s > K:
            raise ValueError(f"axis {ax}: stride {s} exceeds kernel_size {K}")
    return ir.Neighborhood(tuple(int(x) for x in spatial), ks, ds, ss, cs)


def neighborhood_attention(q: Tensor, k: Tensor, v: Tensor, kernel_size, dilation=1, stride=1, is_causal=False,
                           scale: float | None = None) -> Tensor:
    """Neighborhood attention over a 1-3-D grid (NATTEN semantics: windows shifted at the borders,
    never truncated; see :class:`attncomp.ir.Neighborhood`).

    Args:
        q, k, v: ``(B, *spatial, H, D)`` (NATTEN's layout; ``spatial`` has 1-3 axes, the same for all
            three; k and v may have fewer heads than q when ``H % Hkv == 0``).
        kernel_size, dilation, stride: an int or one per axis; ``is_causal``: a bool or one per axis.
        scale: default ``1/sqrt(D)``.

    Returns:
        ``(B, *spatial, H, Dv)``.
    """
    spatial = _check_grid_qkv(q, k, v)
    mask = neighborhood_mask(spatial, kernel_size, dilation, stride, is_causal)
    q_tile, kv_tile, blocks_mn = _layout(spatial, use_triton(q))
    if q_tile is not None:
        mask = dataclasses.replace(mask, q_tile=q_tile, kv_tile=kv_tile)

    def heads_first(x: Tensor, tile) -> Tensor:
        return _to_tiles(x, tile).transpose(1, 2).contiguous()

    out = attention(heads_first(q, q_tile), heads_first(k, kv_tile), heads_first(v, kv_tile), mask, scale=scale,
                    blocks_mn=blocks_mn)
    return _from_tiles(out.transpose(1, 2), spatial, q_tile)


def _check_grid_qkv(q: Tensor, k: Tensor, v: Tensor) -> tuple[int, ...]:
    """q, k, v in NATTEN's layout ``(B, *spatial, H, D)``: the same batch and spatial extents, k's head dim
    equal to q's, ``H % Hkv == 0``; returns ``spatial``. Messages name the argument and the layout."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        validate.check_tensor(x, name)
        if not 4 <= x.dim() <= 6:
            raise ValueError(f"{name} must be (B, *spatial, H, D) with 1-3 spatial axes, got shape {tuple(x.shape)}")
    spatial = tuple(q.shape[1:-2])
    if tuple(k.shape[:-2]) != tuple(q.shape[:-2]) or tuple(v.shape[:-2]) != tuple(q.shape[:-2]):
        raise ValueError(f"q, k and v must have the same batch and spatial extents (B, *spatial, H, D): q is "
                         f"{tuple(q.shape)}, k is {tuple(k.shape)}, v is {tuple(v.shape)}")
    # the remaining checks (dtype, device, head dims, heads) on the (B, H, L, D) view, with this layout's names
    heads_first = [x.flatten(1, -3).transpose(1, 2) for x in (q, k, v)]
    try:
        validate.check_qkv(*heads_first)
    except ValueError as e:
        raise ValueError(f"{e} [(B, H, L, D) view of q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         "given as (B, *spatial, H, D)]") from None
    return spatial


def _layout(spatial: tuple[int, ...], triton: bool):
    """Token order and tile sizes: ``(q_tile, kv_tile, (BLOCK_M, BLOCK_N))``; tiles None = row-major.

    * CPU, 2-D grids up to 128 wide: row-major, query blocks of 2 rows and key blocks of one row.
      Each query block then reads one band of rows at a fixed stride, which the CPU executor takes
      as a strided view (no gather).
    * otherwise 2-D / 3-D: tile-major order, so a query block is a compact tile whose neighbours fall
      in few key tiles (8×8 query tiles with 4×4 key tiles in 2-D; 4×4×4 with 2×2×2 in 3-D).
    * 1-D: row-major, default blocks.
    """
    if len(spatial) == 1:
        return None, None, None
    if len(spatial) == 2 and not triton and 16 <= spatial[1] <= 128:
        return None, None, (min(2, spatial[0]) * spatial[1], spatial[1])
    want = 8 if len(spatial) == 2 else 4
    q_tile = tuple(next(t for t in (want, want // 2, 2, 1) if n % t == 0) for n in spatial)
    kv_tile = tuple(max(1, t // 2) for t in q_tile)
    bm, bn = math.prod(q_tile), math.prod(kv_tile)
    if bm < 16 or (triton and bn < 16):  # tl.dot takes tiles of 16 or more
        return None, None, None
    return q_tile, kv_tile, (bm, bn)


def _to_tiles(x: Tensor, tile) -> Tensor:
    """``(B, *spatial, H, D)`` → ``(B, L, H, D)`` in row-major (``tile`` None) or tile-major order."""
    B, spatial, tail = x.shape[0], x.shape[1:-2], x.shape[-2:]
    if tile is None:
        return x.reshape(B, -1, *tail)
    n = len(spatial)
    split = [d for s, t in zip(spatial, tile) for d in (s // t, t)]
    order = [0] + [1 + 2 * i for i in range(n)] + [2 + 2 * i for i in range(n)] + [2 * n + 1, 2 * n + 2]
    return x.reshape(B, *split, *tail).permute(order).reshape(B, -1, *tail)


def _from_tiles(x: Tensor, spatial, tile) -> Tensor:
    """Inverse of :func:`_to_tiles`: ``(B, L, H, D)`` → ``(B, *spatial, H, D)``."""
    B, tail = x.shape[0], x.shape[-2:]
    if tile is None:
        return x.reshape(B, *spatial, *tail)
    n = len(spatial)
    x = x.reshape(B, *(s // t for s, t in zip(spatial, tile)), *tile, *tail)
    order = [0] + [d for i in range(n) for d in (1 + i, 1 + n + i)] + [2 * n + 1, 2 * n + 2]
    return x.permute(order).reshape(B, *spatial, *tail)


def block_attention(q: Tensor, k: Tensor, v: Tensor, window, scale: float | None = None) -> Tensor:
    """Swin / MaxViT block attention: non-overlapping ``window`` tiles attend within themselves.
    Layout as :func:`neighborhood_attention`; each extent must be a multiple of its window."""
    spatial = _check_grid_qkv(q, k, v)
    w = _per_axis(window, len(spatial), "window")
    if any(X % x for X, x in zip(spatial, w)):
        raise ValueError(f"spatial extents {spatial} must be multiples of the window {w}")
    return neighborhood_attention(q, k, v, kernel_size=w, stride=w, scale=scale)


def grid_attention(q: Tensor, k: Tensor, v: Tensor, grid, scale: float | None = None) -> Tensor:
    """MaxViT grid attention: a ``grid`` of tokens spaced ``extent // grid`` apart attend to each other
    (dilated neighborhood with kernel = stride = grid). Extents must be multiples of ``grid``."""
    spatial = _check_grid_qkv(q, k, v)
    g = _per_axis(grid, len(spatial), "grid")
    if any(X % x for X, x in zip(spatial, g)):
        raise ValueError(f"spatial extents {spatial} must be multiples of the grid {g}")
    return neighborhood_attention(q, k, v, kernel_size=g, dilation=tuple(X // x for X, x in zip(spatial, g)),
                                  stride=g, scale=scale)


def halo_attention(q: Tensor, k: Tensor, v: Tensor, block, halo, scale: float | None = None) -> Tensor:
    """Blocked attention with a halo (HaloNet-style): each ``block`` of queries attends to its block
    grown by ``halo`` on every side (neighborhood with kernel = block + 2·halo, stride = block; at the
    borders the window is shifted inwards, not zero-padded)."""
    spatial = _check_grid_qkv(q, k, v)
    b, h = _per_axis(block, len(spatial), "block"), _per_axis(halo, len(spatial), "halo")
    return neighborhood_attention(q, k, v, kernel_size=tuple(x + 2 * y for x, y in zip(b, h)), stride=b, scale=scale)
