"""One reader per op that may build a mask, named by meaning; ``OPS`` and ``ALIASES`` are the table.

Each reader takes the :class:`~attncomp.mask_graph.GraphReader`, the node, its arguments (tensors
already read as :class:`~attncomp.mask_sym.AV`, sizes as ints) and returns the node's value, or
raises :class:`~attncomp.mask_sym.Refuse` with the reason it cannot be read exactly.
"""

from __future__ import annotations

import math
import operator
from typing import TYPE_CHECKING

import sympy as sp
import torch
from torch import fx

from attncomp.masks.sym import (
    AV,
    AXES,
    Refuse,
    Size,
    SizeDependent,
    hint_of,
    is_bool,
    is_boolean,
    lift,
    num,
    to_bool,
    to_num,
)

if TYPE_CHECKING:
    from attncomp.masks.graph import GraphReader


def op_name(node: fx.Node) -> str | None:
    """The op a node computes, by name, across fx / Dynamo (torch, operator, Tensor methods) and aten."""
    if node.op == "call_method":
        name = node.target
        if name.startswith("__") and name.endswith("__"):
            name = name[2:-2]
            name = name + "_" if name in ("and", "or") else name
        return name
    if node.op != "call_function":
        return None
    t = node.target
    packet = getattr(t, "overloadpacket", None)
    if packet is not None:
        return packet.__name__
    name = getattr(t, "__name__", None)
    if name and any(getattr(mod, name, None) is t for mod in (torch, operator, torch.nn.functional)):
        return name
    if t is getattr:
        return "getattr"
    return None



def _int(x, what: str) -> int | Size:
    """A compile-time integer, or a symbolic size (its symbol enters whatever it is used in)."""
    if isinstance(x, bool) or not isinstance(x, (int, Size)):
        raise Refuse(f"{what} is not a compile-time integer ({x!r})")
    return x


def _arange(r: GraphReader, node, args, kw):
    ints = [a for a in args]
    if len(ints) == 1:
        start, step = 0, 1
    else:
        start, step = ints[0], ints[2] if len(ints) > 2 else kw.get("step", 1)
    start, step = _int(kw.get("start", start), "arange start"), _int(step, "arange step")
    # the end only sets the extent (read from the node's shape), never a value: it is not read
    return r.result(node, sp.sympify(start) + step * AXES[1])


def _fill_value(name: str, args, kw):
    if name in ("ones", "ones_like", "new_ones"):
        return 1
    if name in ("zeros", "zeros_like", "new_zeros"):
        return 0
    if name == "full":
        return args[1] if len(args) > 1 else kw["fill_value"]
    if name in ("full_like", "new_full"):
        return args[2] if len(args) > 2 else kw["fill_value"]
    return args[0]  # scalar_tensor


def _const(r: GraphReader, node, args, kw):
    v = _fill_value(op_name(node), args, kw)
    if isinstance(v, AV):
        raise Refuse(f"`{node.name}` fills with a tensor value")
    return r.result(node, num(v) if not isinstance(v, bool) else (sp.true if v else sp.false))


def _unary(fn, py):
    def read(r: GraphReader, node, args, kw):
        if not isinstance(args[0], AV):
            return py(args[0])  # a Python int (a size)
        x = lift(args[0])
        if is_bool(x):
            raise Refuse(f"`{node.name}`: arithmetic on a bool tensor")
        return r.result(node, fn(x.expr))

    return read


def _invert(r: GraphReader, node, args, kw):
    x = lift(args[0])
    if not is_bool(x):
        raise Refuse(f"`{node.name}`: bitwise not of an integer tensor")
    return r.result(node, sp.Not(x.expr))


def _arith(fn, int_only: bool = False):
    def read(r: GraphReader, node, args, kw):
        a, b = args[0], args[1] if len(args) > 1 else kw.get("other")
        if not isinstance(a, AV) and not isinstance(b, AV):
            return fn(a, b)  # Python ints (sizes)
        alpha = kw.get("alpha", 1)
        if alpha != 1:
            b = lift(b)
            b = AV(b.expr * alpha, b.shape, b.dtype)
        a, b = lift(a), lift(b)
        if int_only and (a.dtype.is_floating_point or b.dtype.is_floating_point):
            raise Refuse(f"`{node.name}`: floor-division / modulo of floating-point values")
        return r.result(node, sp.piecewise_fold(fn(to_num(a.expr), to_num(b.expr))))

    return read


def _div(r: GraphReader, node, args, kw):
    mode = kw.get("rounding_mode")
    if mode == "floor":
        return _arith(lambda x, y: sp.floor(x / y), True)(r, node, args, kw)
    if mode is not None:
        raise Refuse(f"`{node.name}`: division with rounding_mode={mode!r}")
    if not isinstance(args[0], AV) and not isinstance(args[1], AV):
        return args[0] / args[1]
    return _arith(operator.truediv)(r, node, args, kw)


def _floordiv(x, y):
    return x // y if not isinstance(x, sp.Basic) and not isinstance(y, sp.Basic) else sp.floor(x / y)


def _sym_sum(r: GraphReader, node, args, kw):
    """``torch.sym_sum([...])``: Dynamo's sum of sizes (ints and sizes only)."""
    vals = list(args[0])
    if any(isinstance(v, AV) for v in vals):
        raise Refuse(f"`{node.name}`: sym_sum of tensors")
    return sum(vals[1:], vals[0]) if vals else 0


def _mod(x, y):
    return x % y if not isinstance(x, sp.Basic) and not isinstance(y, sp.Basic) else sp.Mod(x, y)


CMP = {"lt": sp.Lt, "le": sp.Le, "gt": sp.Gt, "ge": sp.Ge, "eq": sp.Eq, "ne": sp.Ne}


def _compare(r: GraphReader, node, args, kw):
    name = op_name(node)
    rel = CMP[ALIASES.get(name, name)]
    a, b = lift(args[0]), lift(args[1] if len(args) > 1 else kw["other"])
    if is_bool(a) and is_bool(b) and rel in (sp.Eq, sp.Ne):
        e = sp.Equivalent(a.expr, b.expr) if rel is sp.Eq else sp.Xor(a.expr, b.expr)
        return r.result(node, e)
    return r.result(node, to_bool(sp.piecewise_fold(rel(to_num(a.expr), to_num(b.expr)))))


def _logic(fn):
    def read(r: GraphReader, node, args, kw):
        a, b = lift(args[0]), lift(args[1] if len(args) > 1 else kw["other"])
        logical = op_name(node).startswith("logical")
        if not logical and not (is_bool(a) and is_bool(b)):
            raise Refuse(f"`{node.name}`: bitwise op on integer tensors")
        return r.result(node, fn(to_bool(a.expr), to_bool(b.expr)))

    return read


def _logical_not(r: GraphReader, node, args, kw):
    return r.result(node, sp.Not(to_bool(lift(args[0]).expr)))


def _select(cond, a: AV, b: AV):
    if is_boolean(a.expr) and is_boolean(b.expr):
        return sp.Or(sp.And(cond, a.expr), sp.And(sp.Not(cond), b.expr))
    return sp.Piecewise((to_num(a.expr), cond), (to_num(b.expr), True))


def _where(r: GraphReader, node, args, kw):
    if len(args) < 3:
        raise Refuse(f"`{node.name}`: one-argument where (nonzero) is data-dependent")
    c, a, b = (lift(x) for x in args[:3])
    return r.result(node, _select(to_bool(c.expr), a, b))


def _masked_fill(r: GraphReader, node, args, kw):
    x, m = lift(args[0]), lift(args[1])
    v = lift(args[2] if len(args) > 2 else kw["value"])
    return r.result(node, _select(to_bool(m.expr), v, x))


def _tri(r: GraphReader, node, args, kw):
    x = lift(args[0])
    d = _int(args[1] if len(args) > 1 else kw.get("diagonal", 0), "triu/tril diagonal")
    cond = AXES[1] - AXES[2] >= d if op_name(node) == "triu" else AXES[1] - AXES[2] <= d
    if is_bool(x):
        return r.result(node, sp.And(x.expr, cond))
    return r.result(node, sp.Piecewise((x.expr, cond), (0, True)))


def _minmax(fn):
    def read(r: GraphReader, node, args, kw):
        a, b = lift(args[0]), lift(args[1])
        return r.result(node, fn(to_num(a.expr), to_num(b.expr)))

    return read


def _clamp(r: GraphReader, node, args, kw):
    x = lift(args[0])
    lo = args[1] if len(args) > 1 else kw.get("min")
    hi = args[2] if len(args) > 2 else kw.get("max")
    e = to_num(x.expr)
    if lo is not None:
        e = sp.Max(e, lift(lo).expr)
    if hi is not None:
        e = sp.Min(e, lift(hi).expr)
    return r.result(node, e)


def _identity(r: GraphReader, node, args, kw):
    """Casts, device moves, copies: the value is kept; ``result`` converts to the new dtype."""
    x = args[0]
    if not isinstance(x, AV):
        raise Refuse(f"`{node.name}` on a non-tensor")
    shape, dtype = r.out(node)
    if x.dtype.is_floating_point and not dtype.is_floating_point and dtype != torch.bool:
        raise Refuse(f"`{node.name}`: float → integer cast")
    return r.result(node, x.expr)


def reshape_map(src: tuple[int, ...], dst: tuple[int, ...]) -> dict:
    """Axis symbols of a ``src``-shaped tensor in terms of those of its row-major reshape to ``dst``.
    With symbolic extents (``Size``), the grouping of axes must hold for every size (a comparison
    that does not raises ``SizeDependent``) and the strides enter as the sizes' symbols."""
    if math.prod(map(hint_of, src)) != math.prod(map(hint_of, dst)):  # the graph's guards keep it at every size
        raise Refuse(f"reshape {src} → {dst} changes the element count")
    ns, nd = len(src), len(dst)
    si = [d for d in range(ns) if src[d] != 1]
    di = [d for d in range(nd) if dst[d] != 1]
    out: dict = {}
    i = j = 0
    while i < len(si):
        gi, gj = [si[i]], [di[j]]
        ps, pd = src[si[i]], dst[di[j]]
        i, j = i + 1, j + 1
        while ps != pd:
            if ps < pd:
                gi.append(si[i]); ps *= src[si[i]]; i += 1  # noqa: E702
            else:
                gj.append(di[j]); pd *= dst[di[j]]; j += 1  # noqa: E702
        if len(gi) == 1 and len(gj) == 1:
            out[AXES[ns - gi[0]]] = AXES[nd - gj[0]]
            continue
        flat, stride = sp.Integer(0), 1
        for d in reversed(gj):
            flat, stride = flat + AXES[nd - d] * stride, stride * dst[d]
        stride = 1
        for d in reversed(gi):
            out[AXES[ns - d]] = sp.Mod(sp.floor(flat / stride), src[d])
            stride *= src[d]
    return out


def _reshape(r: GraphReader, node, args, kw):
    x = args[0]
    shape, _ = r.out(node)
    return r.result(node, x.expr.xreplace(reshape_map(x.shape, shape)))


def _expand(r: GraphReader, node, args, kw):
    return r.result(node, args[0].expr)


def _permute(r: GraphReader, node, args, kw):
    x = args[0]
    n = len(x.shape)
    if op_name(node) == "permute":
        perm = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:] or kw["dims"]
    else:
        d0, d1 = (args[1], args[2]) if len(args) > 2 else (0, 1)
        perm = list(range(n))
        perm[d0 % n], perm[d1 % n] = perm[d1 % n], perm[d0 % n]
    perm = [p % n for p in perm]
    return r.result(node, x.expr.xreplace({AXES[n - perm[p]]: AXES[n - p] for p in range(n)}))


def _norm_slice(s: slice, size) -> tuple:
    """(start, step) of slice ``s`` over an axis of ``size``; the stop only sets the extent (read from
    the node's shape). With a symbolic size or bound, only what holds for every size: a non-negative
    start and a positive step (a negative start counts from the end: the size would enter)."""
    for v in (s.start, s.stop, s.step):
        if v is not None:
            _int(v, "slice bound")
    if not any(isinstance(v, Size) for v in (size, s.start, s.stop, s.step)):
        start, _, step = s.indices(size)
        return start, step
    step = 1 if s.step is None else s.step
    if isinstance(step, Size) or step <= 0:
        raise SizeDependent(f"a slice with step {step} of a symbolic extent")
    start = 0 if s.start is None else s.start
    if start < 0:
        raise SizeDependent(f"a slice from {start} counts from the end of a symbolic extent")
    return start, step


def _index(k, size) -> sp.Basic:
    """Integer index ``k`` into an axis of ``size`` (negative: from the end) as an expression."""
    if not isinstance(k, Size) and not isinstance(size, Size):
        return sp.Integer(k % size)
    return sp.sympify(k if k >= 0 else size + k)


def _getitem(r: GraphReader, node, args, kw):
    x, key = args
    if not isinstance(x, AV):
        return x[key]  # shapes and tuples
    key = key if isinstance(key, tuple) else (key,)
    shape, _ = r.out(node)
    if any(isinstance(k, AV) for k in key):
        return _advanced(r, node, x, key, shape)
    if Ellipsis in key:
        i = key.index(Ellipsis)
        used = sum(1 for k in key if k is not None and k is not Ellipsis)
        key = key[:i] + (slice(None),) * (len(x.shape) - used) + key[i + 1:]
    key = key + (slice(None),) * (len(x.shape) - sum(1 for k in key if k is not None))
    nout, d, p, sub = len(shape), 0, 0, {}
    for k in key:
        if k is None:
            p += 1
        elif isinstance(k, (int, Size)) and not isinstance(k, bool):
            sub[AXES[len(x.shape) - d]] = _index(k, x.shape[d])
            d += 1
        elif isinstance(k, slice):
            start, step = _norm_slice(k, x.shape[d])
            sub[AXES[len(x.shape) - d]] = start + step * AXES[nout - p]
            d, p = d + 1, p + 1
        else:
            raise Refuse(f"`{node.name}`: unsupported index {k!r}")
    return r.result(node, x.expr.xreplace(sub))


def _advanced(r: GraphReader, node, x: AV, key: tuple, shape) -> AV:
    """Integer-tensor indexing (a gather): every index a tensor, or one run of tensors among full slices."""
    pos = [i for i, k in enumerate(key) if isinstance(k, AV)]
    if any(isinstance(k, AV) and k.dtype in (torch.bool, torch.uint8) for k in key):
        raise Refuse(f"`{node.name}`: boolean-mask indexing is data-dependent")
    if pos != list(range(pos[0], pos[-1] + 1)) or any(
            k != slice(None) for i, k in enumerate(key) if i not in pos):
        raise Refuse(f"`{node.name}`: indexing that mixes tensors with non-trivial slices or None")
    n, nout = len(x.shape), len(shape)
    nb = max(len(key[i].shape) for i in pos)  # rank of the broadcast indices
    after = n - 1 - pos[-1]  # dims of x after the run of tensor indices
    shift = {AXES[k]: AXES[k + after] for k in range(1, nb + 1)}
    sub = {}
    for i in pos:
        sub[AXES[n - i]] = key[i].expr.xreplace(shift)
    for d in range(pos[0]):
        sub[AXES[n - d]] = AXES[nout - d]
    for t in range(after):
        sub[AXES[1 + t]] = AXES[1 + t]
    return r.result(node, x.expr.xreplace(sub))


def shape_query(r: GraphReader, node: fx.Node, name: str):
    """``x.shape``, ``x.size(d)``, ``x.dim()``: from the metadata (the value of ``x`` is not read)."""
    shape, _ = r.out(node.args[0])
    if name == "getattr":
        if node.args[1] != "shape":
            raise Refuse(f"`{node.name}`: attribute {node.args[1]!r}")
        return shape
    if name == "dim":
        return len(shape)
    dim = r.arg(node.args[1]) if len(node.args) > 1 else node.kwargs.get("dim")
    return shape if dim is None else shape[dim]


LIKE = ("new_ones", "new_zeros", "new_full", "ones_like", "zeros_like", "full_like")
ALIASES = {
    "floor_divide": "floordiv", "remainder": "mod", "true_divide": "div", "truediv": "div",
    "less": "lt", "less_equal": "le", "greater": "gt", "greater_equal": "ge", "not_equal": "ne",
    "bitwise_and": "and_", "bitwise_or": "or_", "bitwise_xor": "xor", "bitwise_not": "invert",
    "logical_and": "and_", "logical_or": "or_", "logical_xor": "xor", "absolute": "abs",
    "negative": "neg", "clip": "clamp", "unsafe_view": "view", "_unsafe_view": "view",
    "reshape": "view", "unsqueeze": "view", "squeeze": "view", "flatten": "view", "unflatten": "view",
    "view_as": "view", "reshape_as": "view",
    "expand_as": "expand", "broadcast_to": "expand", "transpose": "permute",
    "zeros": "ones", "full": "ones", "ones_like": "ones", "zeros_like": "ones", "full_like": "ones",
    "new_ones": "ones", "new_zeros": "ones", "new_full": "ones", "scalar_tensor": "ones",
    "tril": "triu", "sym_size": "size",
    **{n: "cast" for n in ("to", "type", "type_as", "bool", "int", "long", "float", "half", "double",
                           "bfloat16", "short", "byte", "char", "cpu", "cuda", "contiguous", "clone", "detach",
                           "_to_copy", "alias", "lift_fresh_copy", "lift_fresh", "_assert_tensor_metadata")},
}

OPS = {
    "arange": _arange,
    "ones": _const,
    "add": _arith(operator.add),
    "sub": _arith(operator.sub),
    "mul": _arith(operator.mul),
    "floordiv": _arith(_floordiv, int_only=True),
    "mod": _arith(_mod, int_only=True),
    "div": _div,
    "neg": _unary(operator.neg, operator.neg),
    "abs": _unary(sp.Abs, abs),
    "minimum": _minmax(sp.Min),
    "maximum": _minmax(sp.Max),
    "clamp": _clamp,
    **{c: _compare for c in CMP},
    "and_": _logic(sp.And),
    "or_": _logic(sp.Or),
    "xor": _logic(sp.Xor),
    "invert": _invert,
    "logical_not": _logical_not,
    "where": _where,
    "masked_fill": _masked_fill,
    "triu": _tri,
    "view": _reshape,
    "expand": _expand,
    "permute": _permute,
    "cast": _identity,
    "getitem": _getitem,
    "sym_sum": _sym_sum,
}
