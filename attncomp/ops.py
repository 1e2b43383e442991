"""Attention ops you can call directly: masked (block-sparse) attention and the local family.

All ops are differentiable and exact: they compute the same numbers as dense attention with the
equivalent boolean mask, visiting only the tiles the mask leaves (``attncomp::sparse_fwd``; on CUDA
generated Triton kernels, on CPU the block-gathering torch executor).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from . import blocks, ir, routing
from . import sparse as _sparse  # noqa: F401  (registers the custom ops)
from .linear import linear_attention  # re-exported: the linear strategy's op
from .runtime import use_triton
from .tensor import tensor_attention  # re-exported: the tensor strategy's op

__all__ = ["attention", "neighborhood_attention", "block_attention", "grid_attention", "halo_attention",
           "default_blocks", "choose_blocks", "routed_attention", "linear_attention",
           "tensor_attention"]


def default_blocks(D: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int]:
    """Tile sizes (BLOCK_M, BLOCK_N) used to build block tables when none are given."""
    if device.type == "cuda":
        return (128, 64) if D <= 64 else (64, 64)
    if use_triton(torch.empty(0, dtype=dtype, device=device)):  # Triton's interpreter: few, small tiles
        return 32, 16
    return 64, 64


def choose_blocks(q: Tensor, k: Tensor, v: Tensor, expr: str | None, keep: Tensor | None, bias: Tensor | None,
                  scale: float, softcap: float) -> tuple[int, int]:
    """Tile sizes of the block table for this call: from the autotune cache, tuned now (each candidate
    of ``attncomp.templates.sparse_configs`` timed on these inputs, wall clock on CPU, ``do_bench`` on
    CUDA), or :func:`default_blocks` (``ATTNCOMP_AUTOTUNE=0``, or while ``torch.compile`` traces)."""
    from . import autotune

    D, Dv = q.shape[-1], v.shape[-1]
    default = default_blocks(max(D, Dv), q.dtype, q.device)
    if autotune.mode() == "0" or torch.compiler.is_compiling():
        autotune.STATS["heuristic"] += 1
        return default
    from .templates import sparse_configs

    B, Hq, Lq, _ = q.shape
    Lk, triton = k.shape[2], use_triton(q)
    interpret = triton and q.device.type != "cuda"

    def bench(cfg):
        bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
        table = blocks.block_table_op(q, keep, expr or "", Lq, Lk, bm, bn)
        with torch.no_grad():
            torch.ops.attncomp.sparse_fwd(q, k, v, bias, keep, *table, scale, softcap, expr or "", bm, bn)

    signature = {"strategy": "sparse", "mask": hashlib.sha1((expr or "").encode()).hexdigest()[:16],
                 "keep": keep is not None, "bias": bias is not None, "softcap": softcap > 0,
                 "dtype": str(q.dtype).removeprefix("torch."), "D": D, "Dv": Dv, "gqa": Hq // k.shape[1],
                 "executor": "triton" if triton else "torch"}
    cfg = autotune.choose("sparse_fwd", signature, autotune.bucket(Lq=Lq, Lk=Lk, BH=B * Hq),
                          lambda: sparse_configs.candidates(q.device.type, triton, interpret, Lq, Lk, max(D, Dv),
                                                            signature["dtype"]), bench,
                          {"BLOCK_M": default[0], "BLOCK_N": default[1]}, device=q.device,
                          version=autotune.source_hash("sparse_fwd.py.j2", "sparse_configs.py",
                                                       str(Path(__file__).with_name("sparse.py"))))
    return int(cfg["BLOCK_M"]), int(cfg["BLOCK_N"])


def _check_mask(mask) -> str | None:
    if mask is None or isinstance(mask, ir.Full):
        return None
    if isinstance(mask, ir.TensorMask) or (isinstance(mask, ir.And) and ir.runtime_part(mask)):
        raise TypeError("attention(mask=...) takes static masks (ir.Causal, ir.Window, ...); pass run-time "
                        "tensors as keep= (bool) or bias= (additive)")
    if not hasattr(mask, "expr"):
        raise TypeError(f"mask must be an attncomp.ir mask (Causal, Window, Neighborhood, ...), got "
                        f"{type(mask).__name__}")
    return mask.expr()


def attention(q: Tensor, k: Tensor, v: Tensor, mask=None, *, keep: Tensor | None = None,
              bias: Tensor | None = None, scale: float | None = None, softcap: float = 0.0,
              blocks_mn: tuple[int, int] | None = None) -> Tensor:
    """Masked attention that computes only the tiles the mask leaves.

    Args:
        q: ``(B, Hq, Lq, D)``; k: ``(B, Hkv, Lk, D)``; v: ``(B, Hkv, Lk, Dv)``; one float dtype,
            ``Hq % Hkv == 0`` (GQA / MQA without repeating k, v).
        mask: a static IR mask over (query index, key index): ``ir.Causal(offset)``,
            ``ir.Window(left, right)``, ``ir.BlockDiagonal(n)``, ``ir.Grid(s)``, ``ir.Prefix(n)``,
            ``ir.Neighborhood(...)``, ``ir.Predicate(expr)``, or ``And`` / ``Or`` of them.
        keep: optional bool tensor broadcastable to ``(B, Hq, Lq, Lk)``; True = visible (e.g. key
            padding ``(B, 1, 1, Lk)``). ANDed with ``mask``.
        bias: optional additive float tensor broadcastable to ``(B, Hq, Lq, Lk)``.
        scale: score scale (default ``1/sqrt(D)``); softcap: ``softcap·tanh(s/softcap)`` when > 0.
        blocks_mn: tile sizes of the block table (default: :func:`default_blocks`).

    Returns:
        ``(B, Hq, Lq, Dv)`` in q's dtype. A query that sees no key gets zeros (so does every query
        when ``Lk = 0``); ``B``, ``Hq`` or ``Lq`` = 0 give an empty output. Raises ``TypeError`` /
        ``ValueError`` naming the argument for bad inputs (:mod:`attncomp.validate`).
    """
    from . import validate

    B, Hq, _, Lq, Lk, D, _ = validate.check_qkv(q, k, v)
    validate.check_keep(keep, (B, Hq, Lq, Lk), q)
    validate.check_additive(bias, (B, Hq, Lq, Lk), q)
    expr = _check_mask(mask)
    scale = validate.check_scale(scale)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    softcap = validate.check_softcap(softcap)
    if validate.is_empty(q, k, v):  # defined results without a block table (validate.empty_result)
        out, _ = torch.ops.attncomp.dense_fwd(q, k, v, None, scale, None, softcap)
        return out
    bm, bn = blocks_mn or choose_blocks(q, k, v, expr, keep, bias, scale, float(softcap))
    table = blocks.block_table_op(q, keep, expr or "", Lq, Lk, bm, bn)
    out, _ = torch.ops.attncomp.sparse_fwd(q, k, v, bias, keep, *table, scale, float(softcap), expr or "", bm, bn)
    return out


def routed_attention(q: Tensor, k: Tensor, v: Tensor, region: int = 64, topk: int = 4,
                     scale: float | None = None, causal: bool = False) -> Tensor:
    """BiFormer-style content-routed attention (:mod:`attncomp.routing`): each region of ``region``
    queries attends, exactly, to the ``topk`` key regions of highest mean-q · mean-k affinity. With
    ``causal`` only key regions not after the query region are chosen, and the causal mask
    ``kv ≤ q`` applies inside the kept tiles (every query sees at least one key).

    Args:
        q: ``(B, Hq, Lq, D)``; k: ``(B, Hkv, Lk, D)``; v: ``(B, Hkv, Lk, Dv)``; one float dtype,
            ``Hq % Hkv == 0``. Differentiable in q, k, v (the selection itself is not).
        region: tokens per region, the tile size of the block table (the Triton kernels need a
            power of two >= 16); topk: key regions per query region (clipped to their number).
        scale: default ``1/sqrt(D)``.

    Returns:
        ``(B, Hq, Lq, Dv)`` in q's dtype (zeros when ``Lk = 0``, empty when ``Lq = 0``).
    """
    from . import validate

    validate.check_qkv(q, k, v)
    scale = validate.check_scale(scale)
    if validate.is_empty(q, k, v):
        routing.check_params(region, topk)
        out, _ = torch.ops.attncomp.dense_fwd(q, k, v, None, 1.0, None, 0.0)
        return out
    if use_triton(q) and (region < 16 or region & (region - 1)):
        raise ValueError(f"the Triton kernels need region to be a power of two >= 16, got {region}")
    table = routing.routed_block_table(q, k, region, topk, causal)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    expr = routing.CAUSAL if causal else ""
    out, _ = torch.ops.attncomp.sparse_fwd(q, k, v, None, None, *table.tensors, float(scale), 0.0, expr, region,
                                           region)
    return out


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
    from . import validate

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
