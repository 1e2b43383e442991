"""The score program: the typed steps that turn raw ``q·kᵀ`` into the softmax input, in order, and the
one fold that reduces them to what the kernels take.

A rule records a site's program as steps whose operands are graph nodes or constants
(:class:`Scale`, :class:`AddBias`, :class:`MaskFill`, :class:`ProvedMask`, :class:`View`,
:class:`Cast`). :func:`fold` reduces a program to ``s = where(keep, scale·q·kᵀ + bias, fill)``; it
runs at compile time on :class:`Meta` stand-ins (shapes, and values where the graph fixes them), which
proves that the fused path can express the program or says why not (:func:`check`), and at run time on
the site's tensors. The eager meaning of a program is the site's own graph nodes
(:mod:`attncomp.runtime.site`), never a second interpreter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch

__all__ = ["BIG", "Scale", "AddBias", "MaskFill", "ProvedMask", "View", "Cast", "Step", "Meta", "Unfoldable",
           "fold", "check", "operands", "map_operands"]

BIG = 1e30  # a fill at or below -BIG masks a score exactly like -inf: s + fill rounds to fill for finite s


class Unfoldable(Exception):
    """The program has no ``where(keep, scale·qk + bias, fill)`` form (the reason is the message)."""


@dataclass(frozen=True)
class Scale:
    """``s = s · factor`` (``s / factor`` when ``divide``); factor constant along keys."""

    factor: object
    divide: bool = False


@dataclass(frozen=True)
class AddBias:
    """``s = s + coef · term`` (``sub``: coef −1; ``baddbmm``'s ``beta``); ``term`` None: an optional
    mask absent at run time."""

    term: object
    coef: float = 1.0


@dataclass(frozen=True)
class MaskFill:
    """``masked_fill(cond, value)`` (``hide_where=True``: cond marks hidden scores) or
    ``where(cond, s, value)`` (``hide_where=False``: cond marks visible ones)."""

    cond: object
    value: object
    hide_where: bool = True


@dataclass(frozen=True)
class ProvedMask:
    """A mask step whose value is proved (``attncomp.frontend.analyze.MaskUse`` number ``index``): the
    kernel applies it from the proof; the fold skips it."""

    index: int


@dataclass(frozen=True)
class View:
    """``s = s.reshape(shape)`` (window-partitioned attention views the scores around its masks)."""

    shape: tuple


@dataclass(frozen=True)
class Cast:
    """``s = s.to(dtype)`` (the kernels keep float32 scores)."""

    dtype: object


Step = Scale | AddBias | MaskFill | ProvedMask | View | Cast


def operands(step: Step) -> tuple:
    """The operands of ``step`` (graph nodes, constants, or what they were mapped to)."""
    if isinstance(step, View):
        return tuple(step.shape)
    return tuple(getattr(step, f.name) for f in fields(step) if f.name not in ("divide", "hide_where", "index"))


def map_operands(step: Step, fn) -> Step:
    """``step`` with every operand ``x`` replaced by ``fn(x)``."""
    if isinstance(step, View):
        return View(tuple(fn(a) for a in step.shape))
    if isinstance(step, (ProvedMask,)):
        return step
    return replace(step, **{f.name: fn(getattr(step, f.name)) for f in fields(step)
                            if f.name not in ("divide", "hide_where", "index", "coef")})


@dataclass(frozen=True)
class Meta:
    """A compile-time stand-in for a run-time operand: its shape (``None`` for a Python number) and,
    when the graph fixes it, its value. Supports the arithmetic :func:`fold` does on bias and keep."""

    shape: tuple | None = None
    value: float | None = None

    def numel(self) -> int:
        return 1 if self.shape is None else math.prod(int(d) if isinstance(d, int) else 2 for d in self.shape)

    def dim(self) -> int:
        return 0 if self.shape is None else len(self.shape)

    def _join(self, other) -> Meta:
        a = self.shape or ()
        b = getattr(other, "shape", None) or ()
        try:
            return Meta(tuple(torch.broadcast_shapes(tuple(int(x) if isinstance(x, int) else 2 for x in a),
                                                     tuple(int(x) if isinstance(x, int) else 2 for x in b))))
        except (RuntimeError, TypeError):
            return Meta(a if len(a) >= len(b) else b)

    __mul__ = __rmul__ = __add__ = __radd__ = __and__ = __rand__ = __truediv__ = __rtruediv__ = _join

    def __neg__(self) -> Meta:
        return Meta(self.shape)

    __invert__ = __neg__

    def expand(self, shape) -> Meta:
        return Meta(tuple(shape))

    def reshape(self, shape) -> Meta:
        return Meta(tuple(shape))


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _scalar(x):
    """A one-element operand as a Python float (``None`` when only its run-time value knows); other
    operands unchanged."""
    if _is_number(x):
        return float(x)
    if isinstance(x, Meta) and x.numel() == 1:
        return x.value
    if isinstance(x, torch.Tensor) and x.numel() == 1 and not x.requires_grad:
        return x.item()
    return x


def fold(program, shape: tuple, device=None) -> tuple:
    """Reduce ``program`` (steps whose operands are resolved values: tensors, numbers, or :class:`Meta`
    at compile time) to ``(scale, bias, keep, fill)`` with ``s = where(keep, scale·qk + bias, fill)``.

    ``scale`` is a float or a tensor constant along keys (``(..., Lq, 1)``-broadcastable); ``bias`` None
    or broadcastable to ``shape``; ``keep`` None or bool; ``fill`` a float (None without masks).
    Raises :class:`Unfoldable` with the reason."""
    scale, bias, keep, fill, cur, unknown_fill = 1.0, None, None, None, tuple(shape), False
    proved = False  # a ProvedMask came before: the kernel applies it to the scores as they are then
    negative = False  # a non-positive constant scale: it flips what an infinite term does
    for step in program:
        if isinstance(step, Scale):
            x = _scalar(step.factor)
            if x is None:  # a one-element tensor whose value only the run time knows
                x = Meta(None)
            if step.divide:
                x = x if isinstance(x, Meta) and x.shape is None else 1.0 / x
            tensor = not _is_number(x) and not (isinstance(x, Meta) and x.shape is None)
            if tensor and (keep is not None or proved or cur != tuple(shape)):
                raise Unfoldable("the scores are scaled by a tensor after a mask or a view")
            if (keep is not None or proved) and _is_number(x) and not x > 0:
                raise Unfoldable("the masked scores are scaled by a non-positive constant")
            if (keep is not None or proved) and not _is_number(x):
                raise Unfoldable("the masked scores are scaled by a run-time value (its sign decides what the "
                                 "mask does)")
            if _is_number(x) and not x > 0:
                negative = True
            scale = scale * x
            bias = None if bias is None else bias * x
            fill = None if fill is None or not _is_number(x) else fill * x
        elif isinstance(step, AddBias):
            x = step.term
            if x is None:  # an optional mask that is absent at run time
                continue
            if keep is not None and not unknown_fill and fill > -math.inf:
                # a finite fill replaces the scores; a term added to it (finfo.min + finfo.min = -inf) is
                # not a shift of the folded form
                raise Unfoldable(f"a term is added after a mask filled with the finite value {fill:g}")
            if _is_number(x):
                x = torch.tensor(float(x), device=device) if device is not None else Meta(None, float(x))
            if negative and not _is_number(x) and not (isinstance(x, Meta) and x.shape is None):
                raise Unfoldable("a tensor term is added after a non-positive scale (an infinite mask would flip)")
            x = x * step.coef if step.coef != 1.0 else x
            bias = x if bias is None else bias + x
        elif isinstance(step, MaskFill):
            value = _scalar(step.value)
            if value is not None and not _is_number(value):
                raise Unfoldable("a mask is filled with a tensor of values")
            if value is None:  # known at run time only: the run-time fold checks it
                unknown_fill = True
                value = -math.inf
            if value > -BIG:
                raise Unfoldable(f"masked_fill with the finite value {value:g} replaces scores; only -inf or "
                                 "finfo.min fills are fused")
            if fill is not None and value != fill and not (value <= -BIG and fill <= -BIG):
                raise Unfoldable("two masks with different fill values")
            if negative:
                raise Unfoldable("a mask after a non-positive scale")
            fill = value if fill is None else max(fill, value)
            k = ~step.cond if step.hide_where else step.cond
            keep = k if keep is None else keep & k
        elif isinstance(step, View):
            concrete = all(isinstance(d, int) for d in (*cur, *step.shape))
            new = (tuple(torch.empty(cur, device="meta").reshape(step.shape).shape) if concrete
                   else tuple(step.shape))
            bias = None if bias is None else bias.expand(cur).reshape(new)
            keep = None if keep is None else keep.expand(cur).reshape(new)
            cur = new
        elif isinstance(step, ProvedMask):
            proved = True
        elif isinstance(step, Cast):
            continue
        else:
            raise Unfoldable(f"score step {step!r}")
    if cur != tuple(shape) and all(isinstance(d, int) for d in cur):
        raise Unfoldable(f"the scores end in shape {cur}, not {tuple(shape)}")
    return scale, bias, keep, fill


def check(program, shape: tuple) -> str | None:
    """Why the fused path cannot run ``program`` (operands already :class:`Meta` or constants), or None."""
    try:
        fold(program, shape)
    except Unfoldable as e:
        return str(e)
    return None
