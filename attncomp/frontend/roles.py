"""Operand roles of a matched softmax site, proved from the shapes and permutations in the graph.

A rule derives q, k and v from what each op means (``A @ B`` contracts A's last axis with B's
second-to-last; an einsum's subscripts name every axis; a transpose swaps two). This module checks
that reading against every shape the graph recorded, so no site is rewritten on a reading the graph
contradicts:

* q ``(..., Lq, D)`` and k ``(..., Lk, D)`` (after the site's views) share the contracted axis D and
  their batch axes (k's head axis may divide q's: GQA); the score product has shape ``(..., Lq, Lk)``;
* the score program keeps that shape (every term broadcasts *into* it), and the softmax normalises its
  last axis: the key axis, since it indexes k's rows;
* v ``(..., Lk, Dv)`` has k's rows and batch axes, and the site's output is ``(..., Lq, Dv)`` after the
  output views (the probabilities are contracted over the normalised axis, with v's rows).

Sizes may be symbolic (dynamic shapes): two sizes are equal only when that holds for every shape
(``statically_known_true``), never by the example's values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from attncomp.ir import ops_table as T
from attncomp.ir.program import View, operands


@dataclass(frozen=True)
class Roles:
    """What each operand of a site is, as proved (shapes as the graph holds them)."""

    query: str
    key: str
    value: str
    q: tuple
    k: tuple
    v: tuple
    out: tuple

    @property
    def scores(self) -> tuple:
        """The score product's shape ``(..., Lq, Lk)``."""
        return (*self.q[:-2], self.q[-2], self.k[-2])

    def __str__(self) -> str:
        lq, lk, d, dv = self.q[-2], self.k[-2], self.q[-1], self.v[-1]
        return (f"query `{self.query}` {_fmt(self.q)}, key `{self.key}` {_fmt(self.k)}, value `{self.value}` "
                f"{_fmt(self.v)}; scores {lq}x{lk} contract D={d}, softmax over the {lk} keys, "
                f"probabilities contract the keys with v (Dv={dv}); output {_fmt(self.out)}")


def _fmt(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def same(a, b) -> bool:
    """``a == b`` for every shape the graph admits (ints, or SymInts provably equal)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        from torch.fx.experimental.symbolic_shapes import statically_known_true

        return bool(statically_known_true(a == b))
    except Exception:
        return False


def equal_at_run_time(a, b) -> bool:
    """``a == b`` is not provable from the graph's shape facts but not refuted either: two symbolic
    sizes Dynamo traced from separate inputs (a KV cache's keys and values) that no guard ties. An
    operand contract that requires them equal (SDPA's k and v rows, the rows ``P @ v`` contracts) holds
    on every call the original model is meant for; the site checks it per call (an int comparison) and
    runs its eager form when it does not, so such a call does whatever the original op does (torch's
    CPU SDPA does not check it)."""
    if isinstance(a, int) and isinstance(b, int):
        return False
    try:
        from torch.fx.experimental.symbolic_shapes import statically_known_true

        return not bool(statically_known_true(a != b))
    except Exception:
        return False


def _same_shape(a, b) -> bool:
    return a is not None and b is not None and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))


def view_shape(shape, views) -> tuple | None:
    """``shape`` after the operand view ops (``transpose`` / ``permute``) a rule records."""
    s = list(shape)
    for name, args in views:
        if name == "transpose":
            i, j = (a % len(s) for a in args)
            s[i], s[j] = s[j], s[i]
        elif name == "permute":
            if sorted(a % len(s) for a in args) != list(range(len(s))):
                return None
            s = [s[a % len(s)] for a in args]
        else:
            return None
    return tuple(s)


def _broadcasts_into(term, scores: tuple) -> bool:
    """``term`` (a node, or a constant) broadcast with the scores leaves their shape unchanged."""
    if not isinstance(term, fx.Node):
        return True
    m = T.meta(term)
    if m is None or not hasattr(m, "shape"):  # a Python number (the graph records shapes of its tensors)
        return True
    s = tuple(m.shape)
    if len(s) > len(scores):
        return all(same(d, 1) for d in s[:len(s) - len(scores)]) and _broadcasts_into_tail(s[-len(scores):], scores)
    return _broadcasts_into_tail(s, scores)


def _broadcasts_into_tail(s, scores) -> bool:
    return all(same(a, 1) or same(a, b) for a, b in zip(reversed(s), reversed(scores)))


def _viewed(cur: tuple, shape) -> tuple | None:
    """``cur`` reshaped to ``shape`` (a ``-1`` resolved), or None when a size is not a compile-time int.
    A reshape keeps the elements' row-major order, so a term added to the viewed scores is a term on
    the same elements of the scores (the fold expands it to the view and reshapes it back)."""
    if not all(isinstance(d, int) for d in (*cur, *shape)):
        return None
    try:
        return tuple(torch.empty(cur, device="meta").reshape(tuple(shape)).shape)
    except RuntimeError:
        return None


def _batch_ok(q: tuple, k: tuple, groups: int) -> bool:
    """k's batch axes are q's, except that k's head axis (third from last) may divide q's."""
    if len(q) != len(k):
        return False
    if not _same_shape(q[:-3], k[:-3]):
        return False
    if len(q) < 3:
        return True
    return same(q[-3], k[-3]) or (groups > 1 and same(q[-3], k[-3] * groups))


def prove(site, gm: fx.GraphModule) -> Roles | str:
    """The roles of ``site`` (a :class:`attncomp.match.Site`), or why they cannot be proved."""
    raw = [T.shape(o.node) for o in (site.q, site.k, site.v)]
    if any(s is None for s in raw):
        return "the shapes of q, k or v are unknown (no shape metadata in the graph)"
    q, k, v = (view_shape(s, o.views) for s, o in zip(raw, (site.q, site.k, site.v)))
    if q is None or k is None or v is None or min(len(q), len(k), len(v)) < 2:
        return "q, k or v is not at least 2-D after its views"
    names = [o.node.name for o in (site.q, site.k, site.v)]
    gqa = site.kv_groups if site.kv_groups > 1 else (q[-3] // k[-3] if site.sdpa.get("enable_gqa") and len(q) > 2
                                                     and isinstance(q[-3], int) and isinstance(k[-3], int)
                                                     and k[-3] else 1)
    if not same(q[-1], k[-1]):
        return f"the score product does not contract q's feature axis with k's ({q[-1]} vs {k[-1]})"
    if not _batch_ok(q, k, gqa):
        return (f"q {_fmt(q)} and k {_fmt(k)} differ in their batch axes (a product broadcast over batch or heads "
                "is not fused)")
    if not (same(k[-2], v[-2]) or equal_at_run_time(k[-2], v[-2])) or not _batch_ok(k, v, 1):
        return f"v {_fmt(v)} does not have k's rows and batch axes {_fmt(k)}: the probabilities are not applied to v"
    scores = (*q[:-2], q[-2], k[-2])
    if site.rule == "softmax_chain":
        prod = next((n for n in site.region if T.is_op(n, T.MATMUL | T.EINSUM | T.BADDBMM, gm)), None)
        if prod is None or not _same_shape(T.shape(prod), scores):
            got = None if prod is None else T.shape(prod)
            return f"the score product's shape {got} is not q·kᵀ's {_fmt(scores)}"
        sm_in = site.anchor.args[0]
        if not _same_shape(T.shape(sm_in), scores):
            return (f"the score program changes the scores' shape from {_fmt(scores)} to {T.shape(sm_in)} "
                    "before the softmax")
    cur = scores  # the scores' shape as the program views them (window attention: (B/nW, nW, H, N, N))
    for step in site.steps:
        if isinstance(step, View):
            # a view to sizes only the run time knows: its terms are held to the scores' own shape
            cur = _viewed(cur, step.shape) or scores
            continue
        terms = [a for a in operands(step) if isinstance(a, fx.Node)]
        if not all(_broadcasts_into(t, cur) for t in terms):
            bad = next(t for t in terms if not _broadcasts_into(t, cur))
            return (f"the score term `{bad.name}` {T.shape(bad)} does not broadcast into the scores {_fmt(cur)} "
                    "(it would enlarge them)")
    if not _same_shape(cur, scores):
        return f"the score program leaves the scores viewed as {_fmt(cur)}, not {_fmt(scores)}"
    mask = site.sdpa.get("attn_mask")
    if isinstance(mask, fx.Node) and not _broadcasts_into(mask, scores):
        return f"the SDPA mask `{mask.name}` {T.shape(mask)} does not broadcast into the scores {_fmt(scores)}"
    out = view_shape((*q[:-1], v[-1]), site.v.out_views)
    got = T.shape(site.output)
    if out is None or not _same_shape(got, out):
        return f"the site's output {got} is not the attention output {out} (q's rows, v's features)"
    return Roles(*names, q, k, v, out)

