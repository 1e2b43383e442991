"""Opt-in approximations at a site: the error measured on the first call, and the tolerance.

A site module that may run an approximation (``strategy="linear"``, ``Sparse(topk=…)`` routing on
softmax sites, ``Tensor(rank=…)`` on tensor-attention sites) mixes in :class:`Approximation`: on
its first call it computes both the exact result and the approximation, records
``‖approx − exact‖ / ‖exact‖`` (float64), keeps the exact result from then on when that exceeds
the strategy's ``tolerance``, and ``explain`` shows :meth:`Approximation.approx_note`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def relative_error(approx: Tensor, exact: Tensor) -> float:
    """``‖approx − exact‖ / ‖exact‖`` in float64 (0-norm references count as 1e-30)."""
    a, e = approx.detach().double(), exact.detach().double()
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


class Approximation:
    """State and reporting of an opt-in approximation (a mixin for site modules).

    ``approx`` is the user's strategy object (with ``tolerance``) or None for exact sites;
    ``approx_baseline`` names what the error is measured against in ``explain``."""

    approx = None
    approx_error: float | None = None
    approx_rejected: bool = False
    approx_baseline = "dense"

    def approx_active(self) -> bool:
        """Run the approximation now (measured, and within tolerance)?"""
        return self.approx is not None and self.approx_error is not None and not self.approx_rejected

    def approx_pending(self) -> bool:
        """First call of an approximate site: measure now?"""
        return self.approx is not None and self.approx_error is None and not torch.compiler.is_compiling()

    def _measure(self, exact: Tensor, approx: Tensor) -> Tensor:
        """Record ``‖approx − exact‖ / ‖exact‖``; return the exact result if above the tolerance."""
        err = relative_error(approx, exact)
        self.approx_error = err
        tol = self.approx.tolerance
        self.approx_rejected = tol is not None and not err <= tol
        return exact if self.approx_rejected else approx

    def approx_note(self) -> str | None:
        """What ``explain`` says about an approximate site (None for exact ones)."""
        if self.approx is None:
            return None
        if self.approx_error is None:
            return "error not measured yet (call the model once)"
        base = self.approx_baseline
        note = f"measured relative error {self.approx_error:.3g} vs {base} on the first call"
        if self.approx_rejected:
            note += f" > tolerance {self.approx.tolerance:g}: runs {base}"
        return note


def routed_causal_attention(q: Tensor, k: Tensor, v: Tensor, region: int, topk: int, scale: float) -> Tensor:
    """Content routing under a causal mask (``kv ≤ q``): each query region keeps the ``topk`` key
    regions of highest mean-q·mean-k affinity among those not after it (ties to the lower index), and
    the causal mask applies inside the kept tiles. Every query sees at least one key (any kept region
    not after its own holds a key ≤ it). Runs the block-sparse op on that table (exact given the
    selection; the selection is not differentiated).

    q ``(B, Hq, Lq, D)``, k/v ``(B, Hkv, Lk, D/Dv)``; returns ``(B, Hq, Lq, Dv)`` in q's dtype."""
    from . import blocks, routing, sparse  # noqa: F401  (sparse registers attncomp::sparse_fwd)
    from .ir import Causal
    from .runtime import use_triton

    if use_triton(q) and (region < 16 or region & (region - 1)):
        raise ValueError(f"the Triton kernels need region to be a power of two >= 16, got {region}")
    Lq, Lk = q.shape[2], k.shape[2]
    with torch.no_grad():
        aff = routing.affinity(q.detach(), k.detach(), region)  # (B, Hq, nQR, nKR)
        nq, nk = aff.shape[-2:]
        later = torch.arange(nk, device=q.device)[None, :] > torch.arange(nq, device=q.device)[:, None]
        aff = aff.masked_fill(later, -math.inf)
        top = torch.sort(aff, dim=-1, descending=True, stable=True).indices[..., :min(topk, nk)]
        keep = torch.zeros(aff.shape, dtype=torch.bool, device=q.device).scatter_(-1, top, True) & ~later
    expr = Causal(0).expr()
    routed = blocks._tail_partial(torch.where(keep, blocks.FULL, blocks.EMPTY).to(torch.uint8), region, region, Lq, Lk)
    states = blocks.combine(routed, blocks.static_states(expr, Lq, Lk, region, region, q.device))
    table = blocks.table_from_states(states, region, region, Lq, Lk)
    out, _ = torch.ops.attncomp.sparse_fwd(q, k, v, None, None, *table.tensors, float(scale), 0.0, expr, region,
                                           region)
    return out
