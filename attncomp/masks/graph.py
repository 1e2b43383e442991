"""Mask subgraph → sympy: read the nodes that build a mask into one symbolic value.

A tensor of shape ``(..., n2, n1)`` is read as a sympy expression over *axis symbols*
``AXES[k]`` (the index along axis ``-k``), so broadcasting is free: two operands aligned from the
right share their symbols. An axis of size 1 never appears in an expression (its index is 0).

* integer tensors (``arange``, index arithmetic) → integer expressions (``floor``, ``Mod``, ``Abs``);
* bool tensors (comparisons, ``& | ~``, ``triu``/``tril`` of ones, ``.bool()``) → sympy Booleans;
* float tensors (additive masks: ``where(m, 0, finfo.min)``, ``full(-inf).triu(1)``) → ``Piecewise``
  of constants selected by Boolean conditions; every constant is rounded to the node's dtype after
  each op, so float32 overflow (``min + min == -inf``) is modelled exactly;
* run-time tensors (graph inputs: a key-padding ``attention_mask``) → an undefined function
  ``R_<node>(index per dim)``, so a gather ``attention_mask[batch_idx, kv_idx]`` reads as
  ``R(a4, a1)``. :mod:`attncomp.mask_analysis` decides whether such a term is a key-padding mask.

Anything else (a matmul, a reduction, a SymInt bound, a float computed from indices) raises
:class:`Refuse` with the reason. ``OPS`` (:mod:`attncomp.mask_ops`) maps each op (by meaning, across fx / Dynamo / aten
spellings) to its reader.
"""

from __future__ import annotations

import sympy as sp
import torch
from torch import fx

from attncomp.ir import ops_table as T
from attncomp.masks.ops import ALIASES, LIKE, OPS, op_name, shape_query
from attncomp.masks.sym import (
    AV,
    AXES,
    Refuse,
    fit_constant,
    round_int,
    simplify_index,
    size_of,
    to_bool,
    to_num,
    zero_unit_axes,
)

MAX_NODES = 400
__all__ = ["AXES", "AV", "GraphReader", "Refuse", "to_bool"]


def size_hint(s) -> int:
    """The example value of a (possibly symbolic) size, without adding a guard on it."""
    if type(s) is int:
        return s
    hint = getattr(getattr(s, "node", None), "hint", None)
    if hint is None:
        raise Refuse(f"the size {s} has no example value")
    return int(hint)


def _lower_bound(sym, shape_env) -> int | None:
    """The lower bound the graph's shape guards put on size symbol ``sym`` (None if unknown)."""
    r = getattr(shape_env, "var_to_range", {}).get(sym)
    lo = getattr(r, "lower", None)
    try:
        return int(lo) if lo is not None and sp.sympify(lo).is_Integer else None
    except (TypeError, ValueError, sp.SympifyError):
        return None


SIZES = ("static", "hint", "symbolic")


class GraphReader:
    """Reads mask nodes into :class:`AV` values (memoised); ``runtime`` maps R-function names to nodes.

    ``sizes`` says how a graph with symbolic sizes (Dynamo's automatic-dynamic recompile) is read:

    * ``"static"``: it is refused (fx and static Dynamo graphs have int sizes only);
    * ``"hint"``: each size is its example value, so what is read holds at the example shape only;
      ``used`` collects every symbolic size read (a proof built on the reading holds wherever they
      keep their example values: specialise on them);
    * ``"symbolic"``: each size is a :class:`~attncomp.masks.sym.Size` carrying its symbol, so a
      value that depends on a size shows the size's symbol; where a size would matter in a way the
      reading cannot carry, :class:`~attncomp.masks.sym.SizeDependent` is raised. What is read holds
      for every size the graph admits.
    """

    def __init__(self, gm: fx.GraphModule | None = None, sizes: str = "static"):
        if sizes not in SIZES:
            raise ValueError(f"sizes must be one of {SIZES}; got {sizes!r}")
        self.gm = gm
        self.sizes = sizes
        self.memo: dict = {}
        self.runtime: dict[str, fx.Node] = {}
        self.used: dict[str, torch.SymInt] = {}  # "hint": the symbolic sizes read, by expression
        self.lower: dict = {}  # "symbolic": size symbol → lower bound (the graph's guards)

    def size(self, s):
        """A size as this reader reads it: an int (static, or the example value) or a ``Size``."""
        if type(s) is int:
            return s
        if not isinstance(s, torch.SymInt):
            raise Refuse(f"unsupported size {s!r}")
        if self.sizes == "static":
            raise Refuse(f"the size {s} is symbolic; only static shapes are analysed")
        hint = size_hint(s)
        expr = s.node.expr
        if self.sizes == "hint":
            if not expr.is_number:
                self.used.setdefault(str(expr), s)
            return hint
        for sym in expr.free_symbols:
            self.lower.setdefault(sym, _lower_bound(sym, getattr(s.node, "shape_env", None)))
        return size_of(hint, expr, self.lower)

    # -- values ---------------------------------------------------------------------------------

    def read(self, node):
        """The abstract value of ``node`` (an :class:`AV`, or a Python value for int/shape nodes)."""
        if node in self.memo:
            return self.memo[node]
        if len(self.memo) > MAX_NODES:
            raise Refuse(f"the mask subgraph has more than {MAX_NODES} nodes")
        val = self._read(node)
        self.memo[node] = val
        return val

    def arg(self, x):
        if isinstance(x, fx.Node):
            return self.read(x)
        if isinstance(x, (list, tuple)):
            return type(x)(self.arg(a) for a in x)
        if isinstance(x, slice):
            return slice(self.arg(x.start), self.arg(x.stop), self.arg(x.step))
        return x

    def out(self, node: fx.Node) -> tuple[tuple[int, ...], torch.dtype]:
        m = T.meta(node)
        shape, dtype = getattr(m, "shape", None), getattr(m, "dtype", None)
        if shape is None or dtype is None:
            raise Refuse(f"`{node.name}` has no shape metadata")
        if not all(type(s) is int for s in shape):
            if self.sizes == "static":
                raise Refuse(f"`{node.name}` has a symbolic shape {tuple(shape)}; only static shapes are analysed")
            shape = [self.size(s) for s in shape]
        return tuple(shape), dtype

    def result(self, node: fx.Node, expr) -> AV:
        """``expr`` as the value of ``node``: coerced to its dtype, size-1 axes set to 0."""
        shape, dtype = self.out(node)
        if dtype == torch.bool:
            expr = to_bool(expr)
        elif dtype.is_floating_point:
            expr = round_int(sp.piecewise_fold(to_num(expr)), dtype)
        else:
            expr = sp.piecewise_fold(to_num(expr))
        n = len(shape)
        expr = simplify_index(zero_unit_axes(expr, shape), shape)
        stray = expr.free_symbols & set(AXES[n + 1:] + AXES[:1])
        if stray:
            raise Refuse(f"internal: `{node.name}` depends on axes {stray} it does not have")
        return AV(expr, shape, dtype)

    def _read(self, node: fx.Node):
        if node.op == "placeholder":
            return self._runtime(node)
        if node.op == "get_attr":
            return self._get_attr(node)
        name = op_name(node)
        if name in ("getattr", "size", "sym_size", "dim") and isinstance(node.args[0], fx.Node):
            return shape_query(self, node, name)
        handler = OPS.get(ALIASES.get(name, name))
        if handler is None:
            what = name or f"{node.op} {getattr(node.target, '__name__', node.target)}"
            raise Refuse(f"`{node.name}` ({what}) is not an index or mask op")
        # `x.new_ones(...)`, `ones_like(x)`: x gives only dtype / device / shape, its values are not read
        skip = 1 if name in LIKE else 0
        args = [None] * skip + [self.arg(a) for a in node.args[skip:]]
        kwargs = {k: self.arg(v) for k, v in node.kwargs.items()}
        return handler(self, node, args, kwargs)

    def _runtime(self, node: fx.Node):
        m = T.meta(node)
        if m is None:
            raise Refuse(f"`{node.name}` has no metadata")
        if not isinstance(m, torch.Tensor) and not hasattr(m, "dtype"):
            if isinstance(m, (int, bool, float)) and not isinstance(m, torch.SymInt):
                return m
            if self.sizes != "static" and isinstance(m, torch.SymInt):
                return self.size(m)
            raise Refuse(f"`{node.name}` is a run-time integer, not a compile-time constant")
        shape, dtype = self.out(node)
        if dtype.is_floating_point:
            raise Refuse(f"`{node.name}` is a floating-point run-time tensor (an input mask or bias); "
                         "its values are unknown at compile time")
        fn = sp.Function(f"R_{node.name}")
        self.runtime[fn.__name__] = node
        n = len(shape)
        return self.result(node, fn(*[AXES[n - d] for d in range(n)]))

    def _get_attr(self, node: fx.Node):
        gm = self.gm or node.graph.owning_module
        val = getattr(gm, node.target, None) if gm is not None else None
        for part in node.target.split(".") if val is None and gm is not None else ():
            gm = getattr(gm, part, None)
            val = gm
        owned = {n for n, _ in gm.named_parameters()} | {n for n, _ in gm.named_buffers()} if gm is not None else set()
        # fx and Dynamo name the tensors they fold into the graph `_tensor_constant<i>`
        if isinstance(val, torch.Tensor) and (node.target not in owned or node.target.startswith("_tensor_constant")):
            return AV(zero_unit_axes(fit_constant(val, node.name), tuple(val.shape)), tuple(val.shape), val.dtype)
        return self._runtime(node)

