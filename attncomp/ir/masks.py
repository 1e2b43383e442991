"""Mask kinds: each leaf static (a predicate ``expr()`` run by torch and Triton) or a run-time tensor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# ---------------------------------------------------------------------------------------------
# Masks. Each leaf is either static (known at compile time) or runtime (a tensor at call time).
#
# A static leaf has a predicate ``expr()``: a Python expression over the int tensors ``q`` (query
# index) and ``kv`` (key index), using only ``+ - * // % < <= > >= == != & | ~``, integer literals
# and ``where(c, a, b)``. The same string runs in torch (``attncomp.blocks.eval_expr``) and in the
# Triton templates (``where`` → ``tl.where``), so the reference, the CPU executor and the kernels
# evaluate one predicate. ``//`` and ``%`` are only applied to non-negative operands (torch floors,
# Triton truncates; they agree there).
# ---------------------------------------------------------------------------------------------


def _min(a: str, b: str) -> str:
    return f"where({a} < {b}, {a}, {b})"


def _max(a: str, b: str) -> str:
    return f"where({a} > {b}, {a}, {b})"


@dataclass(frozen=True)
class Full:
    """No mask: every query sees every key."""

    def expr(self) -> str | None:
        return None

    def __str__(self) -> str:
        return "full"


@dataclass(frozen=True)
class Causal:
    """Key ``j`` is visible from query ``i`` iff ``j <= i + offset`` (offset 0: top-left aligned)."""

    offset: int = 0

    def expr(self) -> str:
        return f"(kv <= q + {self.offset})" if self.offset >= 0 else f"(kv + {-self.offset} <= q)"

    def __str__(self) -> str:
        return "causal" if self.offset == 0 else f"causal({self.offset:+d})"


@dataclass(frozen=True)
class Window:
    """``i - left <= j <= i + right`` (``None``: unbounded on that side). ``Window(w - 1, 0)`` is a
    causal sliding window of ``w`` keys (Mistral's ``sliding_window=w``)."""

    left: int | None
    right: int | None

    def expr(self) -> str | None:
        parts = []
        if self.left is not None:
            parts.append(f"(kv + {self.left} >= q)")
        if self.right is not None:
            parts.append(f"(kv <= q + {self.right})")
        return " & ".join(parts) or None

    def __str__(self) -> str:
        return f"window({self.left},{self.right})"


@dataclass(frozen=True)
class BlockDiagonal:
    """Queries and keys in the same run of ``size`` consecutive tokens (documents of equal length)."""

    size: int

    def expr(self) -> str:
        return f"(q // {self.size} == kv // {self.size})"

    def __str__(self) -> str:
        return f"block_diagonal({self.size})"


@dataclass(frozen=True)
class Grid:
    """Dilated / grid attention: query ``i`` sees key ``j`` iff ``i ≡ j (mod stride)``."""

    stride: int

    def expr(self) -> str:
        return f"(q % {self.stride} == kv % {self.stride})"

    def __str__(self) -> str:
        return f"grid({self.stride})"


@dataclass(frozen=True)
class Prefix:
    """The first ``n`` keys are visible to every query (prefix-LM; usually ``Or`` with causal)."""

    n: int

    def expr(self) -> str:
        return f"(kv < {self.n})"

    def __str__(self) -> str:
        return f"prefix({self.n})"


def _row_major(v: str, ax: int, shape: tuple[int, ...]) -> str:
    """Coordinate ``ax`` of flat index ``v`` over a row-major grid of ``shape``."""
    inner = 1
    for n in shape[ax + 1:]:
        inner *= n
    c = f"({v} // {inner})" if inner > 1 else v
    return f"({c} % {shape[ax]})" if ax > 0 else c


def _grid_coord(v: str, ax: int, shape: tuple[int, ...], tile: tuple[int, ...] | None) -> str:
    """Coordinate ``ax`` of token ``v``: row-major order, or tile-major order when ``tile`` is set
    (tiles of ``tile`` extents in row-major order, tokens row-major inside each tile)."""
    if tile is None:
        return _row_major(v, ax, shape)
    size = 1
    for t in tile:
        size *= t
    tiles = tuple(n // t for n, t in zip(shape, tile))
    outer = _row_major(f"({v} // {size})", ax, tiles)
    inner = _row_major(f"({v} % {size})", ax, tile)
    return f"({outer} * {tile[ax]} + {inner})"


@dataclass(frozen=True)
class Neighborhood:
    """NATTEN neighborhood attention over a row-major grid of ``shape`` (1-3 axes), per axis:
    ``kernel`` size, ``dilation``, ``stride`` and ``causal`` flag.

    Per axis, with coordinates ``x`` (query) and ``y`` (key), extent ``X``: both must be in the same
    dilation group (``x % d == y % d``); inside the group (``x' = x // d``, group length ``Xg``), a
    non-causal query's window is the ``kernel`` consecutive positions around the centre of its stride
    group (``(x' // s) * s + s // 2``, capped at ``Xg - 1``), shifted inwards at the borders — never
    truncated; a causal query sees ``y' <= x'`` with ``leader - y' < kernel``, the leader being the last
    query of its stride group. ``stride == kernel`` is blocked (Swin-style window) attention.

    ``q_tile`` / ``kv_tile``: when set, query / key tokens are numbered tile-major (tiles of these
    extents, which divide ``shape``) instead of row-major, so 1-D blocks of the sequence are 2-D/3-D
    tiles of the grid (``attncomp.ops.neighborhood_attention`` permutes its inputs that way).
    """

    shape: tuple[int, ...]
    kernel: tuple[int, ...]
    dilation: tuple[int, ...]
    stride: tuple[int, ...]
    causal: tuple[bool, ...]
    q_tile: tuple[int, ...] | None = None
    kv_tile: tuple[int, ...] | None = None

    def _axis_expr(self, ax: int) -> str:
        X, K, d, s = self.shape[ax], self.kernel[ax], self.dilation[ax], self.stride[ax]
        x, y = _grid_coord("q", ax, self.shape, self.q_tile), _grid_coord("kv", ax, self.shape, self.kv_tile)
        xg, yg = (f"({x} // {d})", f"({y} // {d})") if d > 1 else (x, y)
        group_len = f"(({X} - {x} % {d} + {d - 1}) // {d})" if d > 1 else str(X)
        same_group = f" & ({x} % {d} == {y} % {d})" if d > 1 else ""
        if self.causal[ax]:
            leader = _min(f"({xg} // {s} * {s} + {s - 1})", f"({group_len} - 1)") if s > 1 else xg
            return f"({yg} <= {xg}) & ({leader} - {yg} < {K}){same_group}"
        left, right = K // 2, K // 2 + K % 2 - 1
        leader = _min(f"({xg} // {s} * {s} + {s // 2})", f"({group_len} - 1)") if s > 1 else xg
        centre = _min(_max(leader, str(left)), f"({group_len} - {1 + right})")
        return f"({yg} + {left} >= {centre}) & ({yg} <= {centre} + {right}){same_group}"

    def expr(self) -> str:
        return " & ".join(f"({self._axis_expr(ax)})" for ax in range(len(self.shape)))

    def __str__(self) -> str:
        def f(t):
            return "x".join(str(int(x)) for x in t)

        extra = "".join([f",d={f(self.dilation)}" if any(d > 1 for d in self.dilation) else "",
                         f",s={f(self.stride)}" if any(s > 1 for s in self.stride) else "",
                         f",causal={''.join('1' if c else '0' for c in self.causal)}" if any(self.causal) else ""])
        return f"neighborhood({f(self.shape)},k={f(self.kernel)}{extra})"


@dataclass(frozen=True)
class Predicate:
    """Any other static predicate recovered from the graph, as an ``expr`` string (see above)."""

    source: str
    label: str = "predicate"

    def expr(self) -> str:
        return self.source

    def __str__(self) -> str:
        return self.label


@dataclass(frozen=True)
class TensorMask:
    """A mask that arrives as a tensor at run time (bool keep-mask or additive float).

    ``role`` says what it was recognised as: ``"key_padding"`` (constant along queries and heads,
    i.e. per-batch valid keys) or ``"general"``."""

    kind: Literal["bool", "additive"]
    shape: tuple[int, ...] | None = None
    role: Literal["general", "key_padding"] = "general"

    def expr(self) -> str | None:
        return None

    def __str__(self) -> str:
        shape = "x".join(str(s) for s in self.shape) if self.shape else "?"
        return "key_padding" if self.role == "key_padding" else f"tensor[{self.kind} {shape}]"


@dataclass(frozen=True)
class And:
    parts: tuple

    def expr(self) -> str | None:
        es = [e for e in (p.expr() for p in self.parts) if e is not None]
        return " & ".join(f"({e})" for e in es) or None

    def __str__(self) -> str:
        return " & ".join(str(p) for p in self.parts)


@dataclass(frozen=True)
class Or:
    """Union of static masks (e.g. ``Or((Prefix(n), Causal()))`` for a prefix-LM)."""

    parts: tuple

    def expr(self) -> str:
        es = [p.expr() for p in self.parts]
        if any(e is None for e in es):
            raise ValueError(f"Or of a mask without a static predicate: {self}")
        return " | ".join(f"({e})" for e in es)

    def __str__(self) -> str:
        return "(" + " | ".join(str(p) for p in self.parts) + ")"


Mask = Full | Causal | Window | Neighborhood | BlockDiagonal | Grid | Prefix | Predicate | TensorMask | And | Or
STATIC = (Causal, Window, Neighborhood, BlockDiagonal, Grid, Prefix, Predicate, Or)


def mask_and(*masks: Mask) -> Mask:
    """Conjunction of masks, dropping ``Full`` and flattening nested ``And``."""
    parts: list = []
    for m in masks:
        if isinstance(m, Full):
            continue
        parts.extend(m.parts if isinstance(m, And) else (m,))
    if not parts:
        return Full()
    return parts[0] if len(parts) == 1 else And(tuple(parts))


def static_part(mask: Mask) -> Mask:
    """The conjunction of ``mask``'s static leaves (``Full`` if none)."""
    parts = mask.parts if isinstance(mask, And) else (mask,)
    return mask_and(*[p for p in parts if isinstance(p, STATIC)])


def runtime_part(mask: Mask) -> tuple[TensorMask, ...]:
    """``mask``'s run-time tensor leaves."""
    parts = mask.parts if isinstance(mask, And) else (mask,)
    return tuple(p for p in parts if isinstance(p, TensorMask))
