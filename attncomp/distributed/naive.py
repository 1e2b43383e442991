"""Reference for ring attention: all-gather the shards, dense masked attention in float64.

Not a fast path — tests compare :func:`attncomp.distributed.ring_attention` with it. The mask is
evaluated from its IR predicate (``mask.expr()`` over global query / key positions), independently of
the interval arithmetic the ring schedule uses.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .layout import shard, unshard


def mask_matrix(mask, L: int, device=None) -> Tensor | None:
    """``(L, L)`` bool, True where global key ``kv`` is visible from query ``q``; None for no mask."""
    expr = None if mask is None else mask.expr()
    if expr is None:
        return None
    q = torch.arange(L, device=device)[:, None]
    kv = torch.arange(L, device=device)[None, :]
    out = eval(expr, {"__builtins__": {}}, {"q": q, "kv": kv, "where": torch.where})  # noqa: S307 (IR predicate)
    return out.expand(L, L)


def reference_attention(q: Tensor, k: Tensor, v: Tensor, mask=None, scale: float | None = None) -> Tensor:
    """Dense attention in float64 over full sequences.

    q ``(B, Hq, L, D)``, k ``(B, Hkv, L, D)``, v ``(B, Hkv, L, Dv)``, Hq a multiple of Hkv; mask an IR mask
    over positions (or None). Returns ``(B, Hq, L, Dv)`` float64; a query that sees no key gives zeros.
    Differentiable.
    """
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    keep = mask_matrix(mask, q.shape[2], q.device)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
        empty = ~keep.any(-1)[:, None]  # (L, 1): rows with no visible key
        s = s.masked_fill(empty, 0.0)
    p = torch.softmax(s, -1)
    if keep is not None:
        p = p.masked_fill(empty, 0.0)
    return p @ v


def naive_ring_attention(q: Tensor, k: Tensor, v: Tensor, *, mask=None, scale: float | None = None, group=None,
                         layout: str = "contiguous") -> Tensor:
    """What :func:`~attncomp.distributed.ring_attention` computes, the slow way: all-gather q, k, v
    (``unshard``), :func:`reference_attention` in float64, keep this rank's shard. Shapes as for
    ``ring_attention``; returns float64 ``(B, Hq, L/W, Dv)``; differentiable (same gradients)."""
    full = [unshard(t, 2, layout, group) for t in (q, k, v)]
    return shard(reference_attention(*full, mask=mask, scale=scale), 2, layout, group)
