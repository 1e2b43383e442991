"""Float64 reference of decode attention: dense scores, an explicit boolean mask, softmax.

Written for clarity, not speed; the tests compare every fast path (the Triton kernels, the CPU
executor, contiguous and paged) with it.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["decode_reference", "unpage"]


def decode_reference(q: Tensor, k: Tensor, v: Tensor, kv_lens: Tensor | None, scale: float,
                     window_left: int | None = None, softcap: float = 0.0) -> tuple[Tensor, Tensor]:
    """q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv), kv_lens (B,) ints in [0, Lk] or None.

    Query i of sequence b is at position ``kv_lens[b] - Lq + i`` and sees key j iff ``j < kv_lens[b]``,
    ``j <= pos`` and (window) ``j >= pos - window_left``. Returns out (B, Hq, Lq, Dv) and lse
    (B, Hq, Lq), float64; rows that see no key: out 0, lse -inf."""
    q, k, v = q.double(), k.double(), v.double()
    B, Hq, Lq, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    s = scale * q @ k.transpose(-1, -2)  # (B, Hq, Lq, Lk)
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    lens = torch.full((B,), Lk) if kv_lens is None else kv_lens.cpu().long()
    visible = torch.zeros(B, 1, Lq, Lk, dtype=torch.bool)
    for b in range(B):
        n = int(lens[b])
        for i in range(Lq):
            pos = n - Lq + i
            lo = 0 if window_left is None else max(pos - window_left, 0)
            hi = min(pos + 1, n)
            if hi > lo:
                visible[b, 0, i, lo:hi] = True
    s = s.masked_fill(~visible.to(s.device), float("-inf"))
    dead = ~visible.to(s.device).any(-1)  # (B, 1, Lq)
    lse = torch.logsumexp(s.masked_fill(dead[..., None], 0.0), -1)
    p = torch.exp(s - lse[..., None])
    out = p @ v
    return out.masked_fill(dead[..., None], 0.0), lse.masked_fill(dead, float("-inf"))


def unpage(cache: Tensor, page_table: Tensor, kv_lens: Tensor, length: int) -> Tensor:
    """Paged cache (num_pages, page_size, Hkv, D), page_table (B, max_pages) and kv_lens (B,) ->
    contiguous (B, Hkv, length, D): key j < kv_lens[b] of sequence b is
    ``cache[page_table[b, j // page_size], j % page_size]``; later keys are zeros (slots past a
    sequence's length are never read, so they may hold anything, -1 included)."""
    page_size = cache.shape[1]
    B = page_table.shape[0]
    out = cache.new_zeros(B, cache.shape[2], length, cache.shape[3])
    for b in range(B):
        for j in range(min(int(kv_lens[b]), length)):
            page = int(page_table[b, j // page_size])
            out[b, :, j] = cache[page, j % page_size]
    return out
