"""Block tables: which (query block, key block) tiles of the score matrix a mask leaves.

Every tile is *empty* (never visited), *full* (visited without evaluating the mask) or *partial*
(visited, mask evaluated per element). A :class:`BlockTable` lists, per query block, its partial
and its full key blocks; its transpose lists, per key block, the query blocks that see it (the
backward pass walks those). Tables come from a static predicate (an IR mask's ``expr()``), from a
run-time keep mask, or from both; static ones are cached per shape, run-time ones per tensor
identity and version.

Shapes: a table has leading dims ``(Bt, Ht)``, each 1 (shared) or the batch / head count; all index
tensors are int32 on the device of the inputs::

    kv_num  (Bt, Ht, nQB)        number of partial key blocks of each query block
    kv_idx  (Bt, Ht, nQB, nKB)   their indices, ascending, then padding (0)
    full_num, full_idx           the same for full key blocks
    q_num, q_idx, qfull_num, qfull_idx   the transpose, (Bt, Ht, nKB) / (Bt, Ht, nKB, nQB)

Tiles that reach past ``Lq`` / ``Lk`` (the last block when the length is not a multiple of the
block) are never *full*: the partial path also does the bounds check.
"""

from __future__ import annotations

import ast
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import sympy
import torch
from torch import Tensor

EMPTY, PARTIAL, FULL = 0, 1, 2
_CHUNK = 1 << 22  # elements of the (q, kv) grid evaluated at once when building a static table


def eval_expr(expr: str, q: Tensor, kv: Tensor) -> Tensor:
    """Evaluate a mask predicate (see ``attncomp.ir``) on broadcastable int64 index tensors."""
    # torch.where imports lazily on its first scalar call, so the namespace keeps the builtins
    return torch.as_tensor(eval(expr, {"where": torch.where}, {"q": q, "kv": kv}))  # noqa: S307


def dense_keep(expr: str | None, Lq: int, Lk: int, device=None) -> Tensor:
    """The ``(Lq, Lk)`` bool matrix of a predicate (all True when ``expr`` is None). For references."""
    q = torch.arange(Lq, device=device)[:, None]
    kv = torch.arange(Lk, device=device)[None, :]
    if expr is None:
        return torch.ones(Lq, Lk, dtype=torch.bool, device=device)
    return eval_expr(expr, q, kv).expand(Lq, Lk)


@dataclass(frozen=True, eq=False)
class BlockTable:
    block_m: int
    block_n: int
    Lq: int
    Lk: int
    kv_num: Tensor
    kv_idx: Tensor
    full_num: Tensor
    full_idx: Tensor
    q_num: Tensor
    q_idx: Tensor
    qfull_num: Tensor
    qfull_idx: Tensor
    states: Tensor  # (Bt, Ht, nQB, nKB) uint8: EMPTY / PARTIAL / FULL

    @property
    def tensors(self) -> tuple[Tensor, ...]:
        """The eight index tensors, in the order the custom ops take them."""
        return (self.kv_num, self.kv_idx, self.full_num, self.full_idx,
                self.q_num, self.q_idx, self.qfull_num, self.qfull_idx)

    def skipped_fraction(self) -> float:
        """Fraction of tiles never visited."""
        return float((self.states == EMPTY).float().mean())

    def visited_fraction(self) -> float:
        return 1.0 - self.skipped_fraction()


def _lists(states: Tensor, kind: int) -> tuple[Tensor, Tensor]:
    """Per row of ``states`` (..., n): count and ascending indices of the entries equal to ``kind``."""
    hit = states == kind
    n = hit.shape[-1]
    # stable sort puts the hits first, in ascending index order
    order = torch.sort((~hit).to(torch.int8), dim=-1, stable=True).indices
    num = hit.sum(-1)
    idx = torch.where(torch.arange(n, device=states.device) < num[..., None], order, 0)
    return num.to(torch.int32).contiguous(), idx.to(torch.int32).contiguous()


def table_from_states(states: Tensor, block_m: int, block_n: int, Lq: int, Lk: int) -> BlockTable:
    """Build a table from tile states ``(Bt, Ht, nQB, nKB)`` (EMPTY / PARTIAL / FULL)."""
    states = states.to(torch.uint8)
    kv_num, kv_idx = _lists(states, PARTIAL)
    full_num, full_idx = _lists(states, FULL)
    st = states.transpose(-1, -2)
    q_num, q_idx = _lists(st, PARTIAL)
    qfull_num, qfull_idx = _lists(st, FULL)
    return BlockTable(block_m, block_n, Lq, Lk, kv_num, kv_idx, full_num, full_idx,
                      q_num, q_idx, qfull_num, qfull_idx, states)


def tail_partial(states: Tensor, block_m: int, block_n: int, Lq: int, Lk: int) -> Tensor:
    """Tiles past the end of a length are checked element-wise: FULL → PARTIAL there."""
    if Lk % block_n:
        last = states[..., -1]
        states[..., -1] = torch.where(last == FULL, PARTIAL, last).to(states.dtype)
    if Lq % block_m:
        last = states[..., -1, :]
        states[..., -1, :] = torch.where(last == FULL, PARTIAL, last).to(states.dtype)
    return states


class _SympyEq(ast.NodeTransformer):
    """``a == b`` / ``a != b`` → ``Eq(a, b)`` / ``Ne(a, b)``: on sympy objects Python's ``==`` is
    structural equality (a plain bool), not a relation."""

    def visit_Compare(self, node):
        self.generic_visit(node)
        if len(node.ops) == 1 and isinstance(node.ops[0], (ast.Eq, ast.NotEq)):
            fn = "Eq" if isinstance(node.ops[0], ast.Eq) else "Ne"
            return ast.copy_location(ast.Call(ast.Name(fn, ast.Load()), [node.left, node.comparators[0]], []), node)
        return node


def difference_form(expr: str):
    """If the predicate depends on ``kv - q`` alone (causal, sliding windows and their conjunctions),
    a function of that difference, proved with sympy (``kv = q + d`` substituted, every comparison
    normalised to ``(lhs - rhs) rel 0`` and expanded, and ``q`` gone); else ``None``."""
    q, kv, d = sympy.symbols("q kv d", integer=True)
    try:
        pred = eval(compile(_SympyEq().visit(ast.parse(expr, mode="eval")), "<mask>", "eval"),  # noqa: S307
                    {"Eq": sympy.Eq, "Ne": sympy.Ne}, {"q": q, "kv": kv})
        if not isinstance(pred, sympy.Basic):
            return None
        pred = pred.subs(kv, q + d).replace(lambda a: isinstance(a, sympy.core.relational.Relational),
                                            lambda a: a.func(sympy.expand(a.lhs - a.rhs), 0))
    except Exception:  # noqa: BLE001 — anything sympy cannot read is simply not in difference form
        return None
    if pred.free_symbols - {d}:
        return None
    return sympy.lambdify(d, pred, modules="numpy")


def _difference_states(fn, Lq: int, Lk: int, block_m: int, block_n: int, device) -> Tensor:
    """Exact tile states of a predicate f(kv - q): a tile's differences form the contiguous range
    ``[k0 - q1, k1 - q0]`` (each value attained), so prefix sums of f over all differences answer
    "any visible" / "all visible" per tile in O(1)."""
    import numpy as np

    dvals = np.arange(-(Lq - 1), Lk)
    vis = torch.as_tensor(np.broadcast_to(np.asarray(fn(dvals), dtype=bool), dvals.shape).copy())
    csum = torch.cat([torch.zeros(1, dtype=torch.int64), vis.long().cumsum(0)])
    q0 = torch.arange(0, Lq, block_m)
    k0 = torch.arange(0, Lk, block_n)
    q1, k1 = (q0 + block_m).clamp(max=Lq) - 1, (k0 + block_n).clamp(max=Lk) - 1
    lo = (k0[None, :] - q1[:, None]) + (Lq - 1)
    hi = (k1[None, :] - q0[:, None]) + (Lq - 1)
    count = csum[hi + 1] - csum[lo]
    states = torch.where(count == hi - lo + 1, FULL, torch.where(count > 0, PARTIAL, EMPTY)).to(torch.uint8)
    return states[None, None].to(device)


def static_states(expr: str | None, Lq: int, Lk: int, block_m: int, block_n: int, device) -> Tensor:
    """Tile states ``(1, 1, nQB, nKB)`` of a static predicate: analytic for predicates of ``kv - q``
    (:func:`difference_form`), else by exact evaluation on the whole index grid.

    Padding rows/columns (index ≥ length) do not count: a tile is FULL when every in-range element
    is visible, EMPTY when none is (and the tail rule of :func:`tail_partial` then applies)."""
    nqb, nkb = -(-Lq // block_m), -(-Lk // block_n)
    if expr is None:
        states = torch.full((1, 1, nqb, nkb), FULL, dtype=torch.uint8, device=device)
        return tail_partial(states, block_m, block_n, Lq, Lk)
    fn = difference_form(expr)
    if fn is not None:
        return tail_partial(_difference_states(fn, Lq, Lk, block_m, block_n, device), block_m, block_n, Lq, Lk)
    kv = torch.arange(nkb * block_n, device=device)
    kv_ok = (kv < Lk).view(1, 1, nkb, block_n)
    rows = max(1, _CHUNK // (block_m * nkb * block_n))
    out = []
    for start in range(0, nqb, rows):
        stop = min(nqb, start + rows)
        q = torch.arange(start * block_m, stop * block_m, device=device)
        q_ok = (q < Lq).view(-1, block_m, 1, 1)
        keep = eval_expr(expr, q[:, None], kv[None, :]).expand(q.numel(), kv.numel())
        keep = keep.reshape(stop - start, block_m, nkb, block_n)
        valid = q_ok & kv_ok
        anyv = (keep & valid).any(3).any(1)
        allv = (keep | ~valid).all(3).all(1)
        out.append(torch.where(allv, FULL, torch.where(anyv, PARTIAL, EMPTY)).to(torch.uint8))
    states = torch.cat(out, 0)[None, None]
    return tail_partial(states, block_m, block_n, Lq, Lk)


def tensor_states(keep: Tensor, Lq: int, Lk: int, block_m: int, block_n: int) -> Tensor:
    """Tile states ``(Bt, Ht, nQB, nKB)`` of a bool keep-mask broadcastable to ``(B, H, Lq, Lk)``."""
    while keep.dim() < 4:
        keep = keep.unsqueeze(0)
    Bt, Ht = keep.shape[0], keep.shape[1]
    nqb, nkb = -(-Lq // block_m), -(-Lk // block_n)
    k = keep.expand(Bt, Ht, Lq, Lk)
    pad = (0, nkb * block_n - Lk, 0, nqb * block_m - Lq)
    anyk = torch.nn.functional.pad(k, pad, value=False).view(Bt, Ht, nqb, block_m, nkb, block_n)
    allk = torch.nn.functional.pad(k, pad, value=True).view(Bt, Ht, nqb, block_m, nkb, block_n)
    anyv = anyk.any(5).any(3)
    allv = allk.all(5).all(3)
    states = torch.where(allv, FULL, torch.where(anyv, PARTIAL, EMPTY)).to(torch.uint8)
    return tail_partial(states, block_m, block_n, Lq, Lk)


def combine(a: Tensor, b: Tensor) -> Tensor:
    """States of the conjunction of two masks: the minimum (EMPTY < PARTIAL < FULL)."""
    return torch.minimum(a, b)


class LRU(OrderedDict):
    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def get_or(self, key, make):
        if key in self:
            self.move_to_end(key)
            return self[key]
        val = self[key] = make()
        if len(self) > self.size:
            self.popitem(last=False)
        return val


_STATIC = LRU(64)
_RUNTIME = LRU(16)
STATS = {"static_built": 0, "runtime_built": 0}


def block_table(expr: str | None, keep: Tensor | None, Lq: int, Lk: int, block_m: int, block_n: int,
                device) -> BlockTable:
    """The table for ``expr`` (static predicate) AND ``keep`` (bool mask broadcastable to
    ``(B, H, Lq, Lk)``, or None). Cached: static tables per (expr, shape, blocks, device); tables
    involving ``keep`` per (tensor identity, version)."""
    device = torch.device(device)

    def make_static():
        STATS["static_built"] += 1
        return static_states(expr, Lq, Lk, block_m, block_n, device)

    st = _STATIC.get_or((expr, Lq, Lk, block_m, block_n, str(device)), make_static)
    if keep is None:
        return _STATIC.get_or(("table", expr, Lq, Lk, block_m, block_n, str(device)),
                              lambda: table_from_states(st, block_m, block_n, Lq, Lk))

    def make_runtime():
        STATS["runtime_built"] += 1
        return table_from_states(combine(st, tensor_states(keep, Lq, Lk, block_m, block_n)),
                                 block_m, block_n, Lq, Lk)

    # the entry holds a weak reference: a new tensor that reuses a dead one's id is a miss
    key = (id(keep), keep._version, tuple(keep.shape), tuple(keep.stride()), expr, Lq, Lk, block_m, block_n)
    ref, table = _RUNTIME.get_or(key, lambda: (weakref.ref(keep), make_runtime()))
    if ref() is not keep:
        _RUNTIME[key] = (weakref.ref(keep), table := make_runtime())
    return table


@torch.library.custom_op("attncomp::block_table", mutates_args=())
def block_table_op(like: Tensor, keep: Tensor | None, expr: str, Lq: int, Lk: int, block_m: int,
                   block_n: int) -> list[Tensor]:
    """:func:`block_table` as an op (opaque to ``torch.compile``): the eight index tensors of
    ``BlockTable.tensors`` on ``like``'s device (copies of the cached table)."""
    table = block_table(expr or None, keep, Lq, Lk, block_m, block_n, like.device)
    return [t.clone() for t in table.tensors]


@block_table_op.register_fake
def _(like, keep, expr, Lq, Lk, block_m, block_n):
    nqb, nkb = -(-Lq // block_m), -(-Lk // block_n)
    Bt = 1 if keep is None or keep.dim() < 4 else keep.shape[0]
    Ht = 1 if keep is None or keep.dim() < 3 else keep.shape[-3]
    shapes = [(Bt, Ht, nqb), (Bt, Ht, nqb, nkb)] * 2 + [(Bt, Ht, nkb), (Bt, Ht, nkb, nqb)] * 2
    return [like.new_empty(s, dtype=torch.int32) for s in shapes]
