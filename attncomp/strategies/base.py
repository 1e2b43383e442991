"""The pieces every strategy is made of, and the request objects users pass to :func:`attncomp.optimize`.

A **request** (:class:`Strategy` and its subclasses, e.g. ``attncomp.Sparse(topk=4)``) says what the
user asks for at a site. A **registered strategy** (:class:`Registered`) is one folder under
``attncomp/strategies/``: its request class and a ``plan`` function that the ``select_strategy`` pass
asks, in registry order, whether it takes a site's :class:`~attncomp.ir.AttentionSpec`. ``plan``
returns a :class:`~attncomp.ir.Plan` (taken), a reason (asked for, but it does not apply: the next
strategy decides and ``explain`` shows the reason) or ``None`` (not its business).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from attncomp.ir import And, AttentionSpec, Or, Plan


@dataclass(frozen=True)
class Strategy:
    name = "auto"
    exact = True

    @property
    def approximate(self) -> bool:
        """Does this request change the function (opt-in, error measured, ``tolerance`` applies)?"""
        return not self.exact


@dataclass(frozen=True)
class Auto(Strategy):
    """Exact strategies only, chosen per site from what its mask and score program allow."""

    name = "auto"


@dataclass(frozen=True)
class Registered:
    """One strategy in the registry (``attncomp.strategies.REGISTRY``)."""

    name: str
    request: type[Strategy]
    plan: Callable[[AttentionSpec, Strategy], Plan | str | None]
    # how a softmax site planned for this strategy runs, when it brings its own op:
    # run(site, q, k, v, bias, scale, causal_offset, keep) -> out, with q (B, Hq, Lq, D), k / v
    # (B, Hkv, Lk, D / Dv), bias additive (broadcastable to the scores) or None, keep the proved masks'
    # run-time part or None, out (B, Hq, Lq, Dv). None: the built-in dense / block-sparse paths.
    run: Callable | None = None


def leaves(mask) -> tuple:
    """The leaf masks of an ``And`` / ``Or`` tree."""
    return tuple(x for p in mask.parts for x in leaves(p)) if isinstance(mask, (And, Or)) else (mask,)


def tolerance_note(requested) -> str:
    return "no tolerance" if requested.tolerance is None else f"tolerance {requested.tolerance:g}"
