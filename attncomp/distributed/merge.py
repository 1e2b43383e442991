"""Log-sum-exp merge of partial attention results.

A block call over a subset of the keys gives ``(out_b, lse_b)``: the softmax-weighted value average
over those keys and the log-sum-exp of their scores. Over the union of disjoint key sets

    lse = log(exp(lse_a) + exp(lse_b)),   out = exp(lse_a − lse)·out_a + exp(lse_b − lse)·out_b

computed around ``m = max(lse_a, lse_b)`` so nothing overflows. A part with ``lse = −inf`` (no
visible key) has weight 0 — its ``out`` is ignored even if it holds NaN — and a row with no visible
key in any part keeps ``lse = −inf`` and ``out = 0``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulator dtype for inputs of ``dtype``: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def empty_partial(out_shape: tuple[int, ...], dtype: torch.dtype, device) -> tuple[Tensor, Tensor]:
    """An accumulator that has seen no key: out zeros ``out_shape`` (``(B, H, L, Dv)``) in ``dtype``,
    lse ``-inf`` ``(B, H, L)`` in ``dtype``."""
    out = torch.zeros(out_shape, dtype=dtype, device=device)
    lse = torch.full(out_shape[:-1], float("-inf"), dtype=dtype, device=device)
    return out, lse


def merge_partial(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Merge two partial results over disjoint key sets.

    out_a, out_b: ``(B, H, L, Dv)``; lse_a, lse_b: ``(B, H, L)``. Computed in the dtype of ``out_a`` /
    ``lse_a`` (the accumulator: float32, or float64); ``out_b`` / ``lse_b`` are cast to it. Returns the
    merged ``(out, lse)`` in that dtype.
    """
    dt = lse_a.dtype
    lse_b, out_b = lse_b.to(dt), out_b.to(out_a.dtype)
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isneginf(m), torch.zeros((), dtype=dt, device=m.device), m)
    wa, wb = torch.exp(lse_a - m), torch.exp(lse_b - m)
    total = wa + wb
    lse = m + torch.log(total)  # total 0 → -inf
    inv = torch.where(total > 0, 1.0 / total, torch.zeros((), dtype=dt, device=m.device))
    wa, wb = (wa * inv)[..., None], (wb * inv)[..., None]
    zero = torch.zeros((), dtype=out_a.dtype, device=out_a.device)
    out = torch.where(wa > 0, wa * out_a, zero) + torch.where(wb > 0, wb * out_b, zero)
    return out, lse


def merge_into(out_acc: Tensor, lse_acc: Tensor, rows: tuple[int, int], out_b: Tensor, lse_b: Tensor) -> None:
    """Merge ``(out_b, lse_b)`` for query rows ``rows = (a, b)`` into the accumulators in place.

    out_acc ``(B, H, L, Dv)``, lse_acc ``(B, H, L)`` (float32 / float64); out_b ``(B, H, b − a, Dv)``,
    lse_b ``(B, H, b − a)``.
    """
    a, b = rows
    out, lse = merge_partial(out_acc[:, :, a:b], lse_acc[:, :, a:b], out_b, lse_b)
    out_acc[:, :, a:b] = out
    lse_acc[:, :, a:b] = lse
