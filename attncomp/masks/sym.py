"""Symbolic mask values: sympy expressions over axis symbols, and the exact simplifications on them.

A tensor of shape ``(..., n2, n1)`` is a sympy expression over ``AXES[k]`` (its index along axis
``-k``): integers (index arithmetic), Booleans (masks) or ``Piecewise`` of float constants (additive
masks). Used by :mod:`attncomp.mask_graph` (reading a graph) and :mod:`attncomp.mask_ops` (one
reader per op).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import sympy as sp
import torch

AXES = tuple(sp.Symbol(f"a{k}", integer=True, nonnegative=True) for k in range(10))  # AXES[k]: axis -k



class Refuse(Exception):
    """The mask subgraph holds something that cannot be read exactly; the message says what."""


@dataclass(frozen=True)
class AV:
    """Abstract value of a tensor node: ``expr`` over ``AXES``, its ``shape`` and ``dtype``."""

    expr: sp.Basic
    shape: tuple[int, ...]
    dtype: torch.dtype


def is_boolean(e) -> bool:
    """Boolean-valued sympy expression (a sympy Symbol is a Boolean subclass too: not counted)."""
    boolalg = sp.logic.boolalg
    return isinstance(e, (boolalg.BooleanFunction, boolalg.BooleanAtom, sp.core.relational.Relational))


def to_bool(e) -> sp.Basic:
    """``e != 0`` as a Boolean (Piecewise branches folded into conditions)."""
    if is_boolean(e):
        return e
    if isinstance(e, sp.Piecewise):
        out, prev = sp.false, sp.true
        for v, c in e.args:
            out, prev = sp.Or(out, sp.And(prev, c, to_bool(v))), sp.And(prev, sp.Not(c))
        return out
    if e.is_number:
        if e is sp.nan:
            raise Refuse("a NaN reaches a mask condition")
        return sp.true if e != 0 else sp.false
    return sp.Ne(e, 0)


def to_num(b) -> sp.Basic:
    """A Boolean as 0 / 1."""
    if not is_boolean(b):
        return b
    return sp.Integer(1) if b is sp.true else sp.Integer(0) if b is sp.false else sp.Piecewise((1, b), (0, True))


def round_int(e, dtype: torch.dtype) -> sp.Basic:
    """Round every constant of a float value to ``dtype``; a non-constant value is refused."""
    if isinstance(e, sp.Piecewise):
        return sp.Piecewise(*[(round_int(v, dtype), c) for v, c in e.args])
    if not e.is_number:
        raise Refuse(f"a floating-point value depends on indices or run-time tensors ({e}); only constants "
                     "selected by index conditions are modelled")
    if e is sp.nan:
        raise Refuse("the mask holds NaN (e.g. 0 * inf)")
    r = torch.tensor(float(e), dtype=torch.float64).to(dtype).item()
    return sp.Integer(0) if r == 0 else sp.oo if r == math.inf else -sp.oo if r == -math.inf else sp.Float(r)


def num(x) -> sp.Basic:
    if isinstance(x, bool):
        return sp.true if x else sp.false
    if isinstance(x, int):
        return sp.Integer(x)
    if isinstance(x, float):
        if math.isnan(x):
            raise Refuse("a NaN constant in the mask")
        return sp.oo if x == math.inf else -sp.oo if x == -math.inf else sp.Float(x)
    raise Refuse(f"unsupported constant {x!r}")


def lift(x) -> AV:
    """A Python scalar as a 0-d value (weak dtype)."""
    if isinstance(x, AV):
        return x
    dtype = torch.bool if isinstance(x, bool) else torch.int64 if isinstance(x, int) else torch.float64
    return AV(num(x), (), dtype)


def is_bool(x: AV) -> bool:
    return x.dtype == torch.bool



def _fit_band(keep: torch.Tensor) -> sp.Basic | None:
    """A bool ``(n2, n1)`` table as ``lo <= a1 - a2 <= hi`` (tril / triu / band), if it is one."""
    n2, n1 = keep.shape
    if not keep.any():
        return sp.false
    diff = torch.arange(n1)[None, :] - torch.arange(n2)[:, None]
    lo, hi = int(diff[keep].min()), int(diff[keep].max())
    if not torch.equal(keep, (diff >= lo) & (diff <= hi)):
        return None
    d = AXES[1] - AXES[2]
    return sp.And(d >= lo if lo > -n2 + 1 else sp.true, d <= hi if hi < n1 - 1 else sp.true)


def fit_constant(val: torch.Tensor, name: str) -> sp.Basic:
    """A constant tensor baked into the graph (fx folds ``torch.ones(L, L).triu(1)``) as an expression.

    Recognised exactly (checked element by element): scalars, integer progressions (``arange``), and
    bool / two-valued float tables over the last two axes that are a diagonal band (tril / triu)."""
    val = val.detach().cpu()
    shape = tuple(val.shape)
    if val.numel() == 1:
        v = val.item()
        return num(bool(v)) if val.dtype == torch.bool else num(v)
    core = [d for d in range(len(shape)) if shape[d] != 1]
    if len(core) == 1 and not val.dtype.is_floating_point and val.dtype != torch.bool:
        x = val.reshape(-1).long()
        step = int(x[1] - x[0])
        if torch.equal(x, x[0] + step * torch.arange(x.numel())):
            return sp.Integer(int(x[0])) + step * AXES[len(shape) - core[0]]
    elif core and core[0] >= len(shape) - 2:
        table = val.reshape(shape[-2] if len(shape) > 1 else 1, shape[-1])
        if val.dtype == torch.bool:
            band = _fit_band(table)
            if band is not None:
                return band
        elif val.dtype.is_floating_point:
            values = torch.unique(table)
            fill = [float(v) for v in values if v != 0]
            band = _fit_band(table == 0) if len(fill) <= 1 else None
            if band is not None:
                return sp.Piecewise((0, band), (num(fill[0]) if fill else 0, True))
    raise Refuse(f"constant tensor `{name}` {shape} is not a scalar, an arange or a band (tril/triu) table")


# ---------------------------------------------------------------------------------------------
# readers, by meaning
# ---------------------------------------------------------------------------------------------


def zero_unit_axes(expr: sp.Basic, shape: tuple[int, ...]) -> sp.Basic:
    """Index 0 along every size-1 axis."""
    n = len(shape)
    return expr.xreplace({AXES[k]: sp.Integer(0) for k in range(1, n + 1) if shape[n - k] == 1})


def _range(e, hi: dict) -> tuple | None:
    """Integer bounds (lo, hi) of an index expression, axes ranging over ``[0, hi[axis]]``."""
    if e.is_Integer:
        return int(e), int(e)
    if e in hi:
        return 0, hi[e]
    if isinstance(e, sp.Add):
        parts = [_range(a, hi) for a in e.args]
        return None if None in parts else (sum(p[0] for p in parts), sum(p[1] for p in parts))
    if isinstance(e, sp.Mul) and len(e.args) == 2 and e.args[0].is_Integer:
        r, c = _range(e.args[1], hi), int(e.args[0])
        return None if r is None else (min(c * r[0], c * r[1]), max(c * r[0], c * r[1]))
    if isinstance(e, sp.Mod) and e.args[1].is_Integer and e.args[1] > 0:
        return 0, int(e.args[1]) - 1
    return None


def _simplify_one(e, hi: dict):
    if isinstance(e, sp.Mod) and e.args[1].is_Integer and e.args[1] > 0:
        x, m = e.args
        x = sp.Add(*[t for t in sp.Add.make_args(x) if not (t.as_coeff_Mul()[0].is_Integer
                                                            and t.as_coeff_Mul()[0] % m == 0)])
        r = _range(x, hi)
        return x if r is not None and 0 <= r[0] and r[1] < m else sp.Mod(x, m)
    if isinstance(e, sp.floor):
        n, d = sp.fraction(sp.together(e.args[0]))
        if d.is_Integer and d > 1:
            terms = sp.Add.make_args(sp.expand(n))
            high = [t for t in terms if t.as_coeff_Mul()[0].is_Integer and t.as_coeff_Mul()[0] % d == 0]
            low = sp.Add(*[t for t in terms if t not in high])
            r = _range(low, hi)
            if r is not None and 0 <= r[0] and r[1] < d:
                return sp.expand(sp.Add(*high) / d)
    return e


def simplify_index(e: sp.Basic, shape: tuple[int, ...]) -> sp.Basic:
    """Drop ``// d`` and ``% m`` that the axis bounds make trivial (``(12*a2 + a1) // 12 == a2`` when
    ``a1 < 12``): reshapes compose into these. Exact: each step uses proven bounds only."""
    if not e.atoms(sp.floor, sp.Mod):
        return e
    hi = {AXES[k]: shape[len(shape) - k] - 1 for k in range(1, len(shape) + 1)}

    def walk(x):
        if not x.args or not isinstance(x, sp.Basic):
            return x
        y = x.func(*[walk(a) for a in x.args])
        if y.func is not x.func:  # sympy re-associated (floor(a + 12*b / 12) → b + floor(a/12)): again
            return walk(y)
        z = _simplify_one(y, hi)
        return z if z == y else walk(z)

    return walk(e)

