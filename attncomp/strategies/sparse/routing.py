"""Content routing (BiFormer's region-to-region top-k): which key regions each query region attends.

Queries and keys are grouped into *regions* of ``region`` consecutive tokens (the last region is
shorter when the length is not a multiple). A region's descriptor is the mean of its tokens'
q (resp. k) vectors; the affinity of query region ``i`` and key region ``j`` is the dot product of
their descriptors, per (batch, head). Each query region keeps the ``topk`` key regions of highest
affinity; ties are broken by the lower key-region index (a stable sort, since ``torch.topk``'s
order among equal values is unspecified). ``topk`` larger than the number of key regions keeps them
all.

The selection becomes a :class:`~attncomp.blocks.BlockTable` with ``block_m = block_n = region``:
kept tiles are FULL, the others EMPTY, and tiles that reach past ``Lq`` / ``Lk`` are PARTIAL (the
tail rule of :mod:`attncomp.blocks`: the partial path does the bounds check). Attention over that
table is exact given the selection; the selection itself is not differentiated (it is computed
under ``no_grad`` from detached inputs).

Shapes: q ``(B, Hq, Lq, D)``, k ``(B, Hkv, Lk, D)`` with ``Hq % Hkv == 0`` (GQA: key descriptors
are computed per kv head and shared by the group's query heads). The table's leading dims are
``(B, Hq)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from attncomp.ir import Causal
from attncomp.masks import blocks
from attncomp.runtime import validate
from attncomp.runtime.device import use_triton
from attncomp.strategies.sparse import op as _sparse_op  # noqa: F401  (registers attncomp::sparse_fwd)

CAUSAL = Causal(0).expr()  # the predicate of the causal mask kv <= q


def check_params(region, topk) -> None:
    """``region`` and ``topk`` must be ints >= 1."""
    for name, val in (("region", region), ("topk", topk)):
        if isinstance(val, bool) or not isinstance(val, int):
            raise TypeError(f"{name} must be an int, got {type(val).__name__} {val!r}")
        if val < 1:
            raise ValueError(f"{name} must be >= 1, got {val}")


def _check(q: Tensor, k: Tensor, region, topk) -> None:
    check_params(region, topk)
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be 4-D (B, H, L, D); got {tuple(q.shape)}, {tuple(k.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"incompatible shapes q{tuple(q.shape)} k{tuple(k.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError(f"empty sequence: Lq={q.shape[2]}, Lk={k.shape[2]}")


def region_means(x: Tensor, region: int) -> Tensor:
    """Mean of ``x`` ``(B, H, L, D)`` over regions of ``region`` consecutive tokens →
    ``(B, H, ceil(L / region), D)``, in float32 (float64 for float64 input); the last region averages
    only its ``L - (n - 1)·region`` tokens."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    B, H, L, D = x.shape
    n = -(-L // region)
    x = x.to(acc)
    if n * region != L:  # zero rows do not change the sums
        x = torch.nn.functional.pad(x, (0, 0, 0, n * region - L))
    sums = x.reshape(B, H, n, region, D).sum(3)
    counts = (L - torch.arange(n, device=x.device) * region).clamp(max=region).to(acc)
    return sums / counts[:, None]


def affinity(q: Tensor, k: Tensor, region: int) -> Tensor:
    """Region affinities ``(B, Hq, nQR, nKR)`` (float32 / float64): ``mean_q(i) · mean_k(j)``; with
    GQA the kv head's descriptors serve each of its ``Hq / Hkv`` query heads."""
    qr = region_means(q, region)
    kr = region_means(k, region)
    G = q.shape[1] // k.shape[1]
    if G > 1:
        kr = kr.repeat_interleave(G, dim=1)
    return qr @ kr.transpose(-1, -2)


def selection(q: Tensor, k: Tensor, region: int, topk: int, causal: bool = False) -> Tensor:
    """Bool ``(B, Hq, nQR, nKR)``: True where query region ``i`` keeps key region ``j`` (its ``topk``
    highest affinities, ties to the lower index; ``topk`` clipped to ``nKR``). With ``causal`` only key
    regions not after the query region (``j ≤ i``) compete and can be kept. Not differentiated."""
    _check(q, k, region, topk)
    with torch.no_grad():
        a = affinity(q.detach(), k.detach(), region)
        nq, nk = a.shape[-2:]
        later = None
        if causal:
            later = torch.arange(nk, device=a.device)[None, :] > torch.arange(nq, device=a.device)[:, None]
            a = a.masked_fill(later, -math.inf)
        # stable descending sort: among equal affinities the lower key-region index comes first
        top = torch.sort(a, dim=-1, descending=True, stable=True).indices[..., :min(topk, nk)]
        keep = torch.zeros(a.shape, dtype=torch.bool, device=a.device).scatter_(-1, top, True)
        return keep if later is None else keep & ~later


def routed_block_table(q: Tensor, k: Tensor, region: int, topk: int, causal: bool = False) -> blocks.BlockTable:
    """The routed :class:`~attncomp.blocks.BlockTable` (``block_m = block_n = region``, leading dims
    ``(B, Hq)``): kept tiles FULL (PARTIAL when they reach past ``Lq`` / ``Lk``), the rest EMPTY. With
    ``causal`` the selection is causal (:func:`selection`) and the tiles are combined with those of the
    causal mask ``kv ≤ q`` (diagonal tiles PARTIAL): every query sees a key, since a kept region not
    after its own holds a key ≤ it.

    Args:
        q: ``(B, Hq, Lq, D)``; k: ``(B, Hkv, Lk, D)``, ``Hq % Hkv == 0``; any float dtype.
        region: tokens per region (>= 1); topk: key regions kept per query region (>= 1).
    """
    sel = selection(q, k, region, topk, causal)
    states = torch.where(sel, blocks.FULL, blocks.EMPTY).to(torch.uint8)
    Lq, Lk = q.shape[2], k.shape[2]
    states = blocks.tail_partial(states, region, region, Lq, Lk)
    if causal:
        states = blocks.combine(states, blocks.static_states(CAUSAL, Lq, Lk, region, region, q.device))
    return blocks.table_from_states(states, region, region, Lq, Lk)


def expand_selection(sel: Tensor, region: int, Lq: int, Lk: int) -> Tensor:
    """Token-level bool mask ``(B, H, Lq, Lk)`` of a region selection ``(B, H, nQR, nKR)`` (for
    references: dense attention under this mask equals routed attention)."""
    return sel.repeat_interleave(region, -2)[..., :Lq, :].repeat_interleave(region, -1)[..., :Lk]


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
    validate.check_qkv(q, k, v)
    scale = validate.check_scale(scale)
    if validate.is_empty(q, k, v):
        check_params(region, topk)
        out, _ = torch.ops.attncomp.dense_fwd(q, k, v, None, 1.0, None, 0.0)
        return out
    if use_triton(q) and (region < 16 or region & (region - 1)):
        raise ValueError(f"the Triton kernels need region to be a power of two >= 16, got {region}")
    table = routed_block_table(q, k, region, topk, causal)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    expr = CAUSAL if causal else ""
    out, _ = torch.ops.attncomp.sparse_fwd(q, k, v, None, None, *table.tensors, float(scale), 0.0, expr, region,
                                           region)
    return out
