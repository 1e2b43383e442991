"""Opt-in approximations at a site: the error measured on the first call, and the tolerance.

A site module that may run an approximation (``strategy="linear"``, ``Sparse(topk=…)`` routing on
softmax sites, ``Tensor(rank=…)`` on tensor-attention sites) mixes in :class:`Approximation`: on
its first call it computes both the exact result and the approximation, records
``‖approx − exact‖ / ‖exact‖`` (float64), keeps the exact result from then on when that exceeds
the strategy's ``tolerance``, and ``explain`` shows :meth:`Approximation.approx_note`.
"""

from __future__ import annotations

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
