"""Specialising a graph with symbolic sizes to its example sizes, by Dynamo guards.

A mask proof that needs a concrete size (:attr:`attncomp.masks.analysis.MaskFact.general` is False)
holds wherever the sizes it read keep their example values. Instead of checking the proof on every
call, the graph is made valid for those values only: each size gets a guard ``size == example``
(``guard_int``), so Dynamo runs the graph only at that shape and recompiles for any other.

The rewrite reads sizes under ``ShapeEnv.suppress_guards`` (:func:`attncomp.backend._no_size_guards`),
so it only *requests* guards here; the backend installs them once the rewrite is done, outside the
suppression, before handing the graph to the inner compiler.
"""

from __future__ import annotations

import torch


def _unbacked(s: torch.SymInt) -> bool:
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    return bool(free_unbacked_symbols(s.node.expr))


class SizeGuards:
    """Sizes (``torch.SymInt``) a rewrite specialises its graph to; ``install()`` guards each to its
    example value. Requests are all-or-nothing per use (:meth:`why_not` first)."""

    def __init__(self):
        self.sizes: dict[str, torch.SymInt] = {}
        self.installed = False

    @staticmethod
    def why_not(sizes) -> str | None:
        """Why ``sizes`` cannot be specialised to their example values by a guard, or None."""
        for s in sizes:
            if not isinstance(s, torch.SymInt):
                continue
            node = s.node
            if getattr(node, "shape_env", None) is None or not node.has_hint():
                return f"the size {s} has no example value to specialise to"
            if _unbacked(s):
                return f"the size {s} is data-dependent (unbacked): it cannot be specialised by a guard"
        return None

    def add(self, sizes) -> None:
        """Request a guard on each symbolic size of ``sizes`` (``why_not(sizes)`` must be None)."""
        for s in sizes:
            if isinstance(s, torch.SymInt) and not s.node.expr.is_number:
                self.sizes.setdefault(str(s.node.expr), s)

    def install(self) -> None:
        """Guard every requested size to its example value (call outside ``suppress_guards``). Raises
        ``RuntimeError`` when a size stays symbolic afterwards: the rewritten graph would be wrong at
        other sizes, so it must not run."""
        from torch.fx.experimental.symbolic_shapes import guard_int

        for s in self.sizes.values():
            guard_int(s)
            if not s.node.expr.is_number:
                raise RuntimeError(f"attncomp: the guard specialising size {s} to {s.node.hint} was not installed "
                                   "(guards suppressed?); the rewritten graph holds at that size only")
        self.installed = True
