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
        """Guard every requested size to its example value (call outside ``suppress_guards``): plain
        size symbols first, so the sizes derived from them are fixed too. Raises ``RuntimeError`` when
        guards are suppressed here or a plain size symbol stays symbolic afterwards: the rewritten graph
        holds at the example sizes only, so it must not run at others."""
        from torch.fx.experimental.symbolic_shapes import ShapeEnv, guard_int

        if not self.sizes:
            return
        suppressed = getattr(ShapeEnv, "_suppress_guards_tls", None)
        if suppressed is not None and suppressed():
            raise RuntimeError("attncomp: guards are suppressed where the backend installs its size guards")
        sizes = sorted(self.sizes.values(), key=lambda s: not s.node.expr.is_Symbol)
        plain = [s for s in sizes if s.node.expr.is_Symbol]
        for s in sizes:
            guard_int(s)
        stuck = [s for s in plain if not s.node.expr.is_number]
        if stuck:
            raise RuntimeError(f"attncomp: the guards specialising sizes {stuck} to their example values were not "
                               "installed; the rewritten graph holds at those values only")
        self.installed = True
