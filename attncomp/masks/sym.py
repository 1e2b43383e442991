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


class SizeDependent(Refuse):
    """Reading sizes as symbols: what the graph computes depends on a size's value in a way the reading
    does not carry as a symbol (or cannot decide for every size); the message says where."""


def _relaxed(e: sp.Basic, lower: dict) -> sp.Basic:
    """``e`` with each size symbol ``s`` written ``lower[s] + t_s`` (``t_s`` a non-negative integer), so
    sympy's sign rules see the sizes' lower bounds; a symbol with no known lower bound stays as it is."""
    sub = {s: lower[s] + sp.Symbol(f"t_{s}", integer=True, nonnegative=True)
           for s in e.free_symbols if lower.get(s) is not None}
    return sp.expand(e.xreplace(sub))


class Size:
    """A symbolic size (reading a graph with symbolic shapes for every size): its example value ``hint``
    and ``expr`` over the graph's size symbols, whose lower bounds (the graph's own shape guards, e.g.
    ``s0 >= 2``) are in ``lower``.

    Sizes combine with ints and sizes by ``+ - * // %`` into sizes; anywhere a size enters a sympy
    expression it enters as ``expr`` (``_sympy_``), so a predicate that depends on a size shows its
    symbol. A comparison is answered only when it holds the same way for every size; otherwise it
    raises :class:`SizeDependent`. There is deliberately no ``__int__`` / ``__index__``: a use that is
    not modelled fails instead of silently reading the example value."""

    __slots__ = ("hint", "expr", "lower")

    def __init__(self, hint: int, expr: sp.Basic, lower: dict):
        self.hint, self.expr, self.lower = hint, expr, lower

    def _sympy_(self) -> sp.Basic:
        return self.expr

    def __repr__(self) -> str:
        return f"{self.expr}(={self.hint})"

    def __hash__(self) -> int:
        return hash((self.hint, self.expr))

    # -- arithmetic --------------------------------------------------------------------------------
    def _op(self, o, fn, sym, swap: bool = False):
        if isinstance(o, bool) or not isinstance(o, (int, Size, sp.Basic)):
            return NotImplemented
        if isinstance(o, sp.Basic):  # into a sympy expression: the size enters as its symbol
            return sym(o, self.expr) if swap else sym(self.expr, o)
        a, b = (o, self) if swap else (self, o)
        ha, hb = (x.hint if isinstance(x, Size) else x for x in (a, b))
        ea, eb = (x.expr if isinstance(x, Size) else sp.Integer(x) for x in (a, b))
        return size_of(fn(ha, hb), sym(ea, eb), self.lower)

    def __add__(self, o):
        return self._op(o, lambda a, b: a + b, lambda a, b: a + b)

    def __radd__(self, o):
        return self._op(o, lambda a, b: a + b, lambda a, b: a + b, True)

    def __sub__(self, o):
        return self._op(o, lambda a, b: a - b, lambda a, b: a - b)

    def __rsub__(self, o):
        return self._op(o, lambda a, b: a - b, lambda a, b: a - b, True)

    def __mul__(self, o):
        return self._op(o, lambda a, b: a * b, lambda a, b: a * b)

    def __rmul__(self, o):
        return self._op(o, lambda a, b: a * b, lambda a, b: a * b, True)

    def __floordiv__(self, o):
        return self._op(o, lambda a, b: a // b, lambda a, b: sp.floor(a / b))

    def __rfloordiv__(self, o):
        return self._op(o, lambda a, b: a // b, lambda a, b: sp.floor(a / b), True)

    def __mod__(self, o):
        return self._op(o, lambda a, b: a % b, sp.Mod)

    def __rmod__(self, o):
        return self._op(o, lambda a, b: a % b, sp.Mod, True)

    def __neg__(self):
        return size_of(-self.hint, -self.expr, self.lower)

    def __truediv__(self, o):
        raise SizeDependent(f"the size {self} is divided into a float")

    __rtruediv__ = __truediv__

    # -- comparisons: answered only when they hold the same way for every size ----------------------
    def _cmp(self, o, yes: str, no: str, what: str):
        """``self - o`` is ``yes`` (a sympy sign property) for every size → True, ``no`` → False."""
        if isinstance(o, bool) or not isinstance(o, (int, Size)):
            return NotImplemented
        d = _relaxed(self.expr - sp.sympify(o), self.lower)
        if getattr(d, yes):
            return True
        if getattr(d, no):
            return False
        raise SizeDependent(f"whether {self} {what} {o} depends on the sizes")

    def __eq__(self, o):
        return self._cmp(o, "is_zero", "is_nonzero", "==")

    def __ne__(self, o):
        return self._cmp(o, "is_nonzero", "is_zero", "!=")

    def __lt__(self, o):
        return self._cmp(o, "is_negative", "is_nonnegative", "<")

    def __le__(self, o):
        return self._cmp(o, "is_nonpositive", "is_positive", "<=")

    def __gt__(self, o):
        return self._cmp(o, "is_positive", "is_nonpositive", ">")

    def __ge__(self, o):
        return self._cmp(o, "is_nonnegative", "is_negative", ">=")

    def __bool__(self) -> bool:
        return self != 0


def size_of(hint: int, expr: sp.Basic, lower: dict) -> int | Size:
    """A size: a plain int when ``expr`` is a number (static), else a :class:`Size`."""
    return int(expr) if expr.is_Integer else Size(hint, expr, lower)


def hint_of(x):
    """The example value of a size (an int as it is)."""
    return x.hint if isinstance(x, Size) else x


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
    """A Python scalar (or a :class:`Size`, as its symbol) as a sympy constant."""
    if isinstance(x, Size):
        return x.expr
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
    dtype = torch.bool if isinstance(x, bool) else torch.int64 if isinstance(x, (int, Size)) else torch.float64
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
    ``a1 < 12``): reshapes compose into these. Exact: each step uses proven bounds only (static
    extents; a :class:`Size` extent bounds nothing)."""
    if not e.atoms(sp.floor, sp.Mod):
        return e
    # a symbolic extent (a Size) gives no bound: what it would drop holds at the example size only
    hi = {AXES[k]: shape[len(shape) - k] - 1 for k in range(1, len(shape) + 1) if type(shape[len(shape) - k]) is int}

    def walk(x):
        if not x.args or not isinstance(x, sp.Basic):
            return x
        y = x.func(*[walk(a) for a in x.args])
        if y.func is not x.func:  # sympy re-associated (floor(a + 12*b / 12) → b + floor(a/12)): again
            return walk(y)
        z = _simplify_one(y, hi)
        return z if z == y else walk(z)

    return walk(e)

