"""Dynamo's per-code-object state, managed per optimized model.

Dynamo keeps its compiled graphs, its recompile counter and its automatic-dynamic decisions on the
*code object* it traces. Every ``attncomp.optimize`` of one model class traces the same
``forward`` code, so without care one optimized model's shapes make the next one's dimensions
dynamic (a second window-partitioned vision model at another image size then spends minutes in
symbolic reshape arithmetic), and after ``recompile_limit`` (8) optimized models of one class
Dynamo silently runs the rest eagerly. Here:

* :func:`compile_options` — every attncomp ``torch.compile`` gets ``dynamic=False`` (Dynamo's
  automatic dynamic off: attncomp decides) and, where torch has it, ``isolate_recompiles=True``
  (its own recompile counter); on a torch without it, :func:`shared_room` raises the limit
  around the model's calls by the graphs other optimized models left on shared code.
* :class:`ShapeTracker` — a dimension of an input becomes dynamic
  (``torch._dynamo.maybe_mark_dynamic``) only once *this* model has been called with it at two
  sizes; the marks are put on the caller's tensors for the call and taken off afterwards.
* :func:`limit_hits` — Dynamo's count of recompile-limit hits, to warn when one still happens.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Iterator

import torch

SHOWN = 4  # inputs named in the explain note
MAX_DEPTH = 6  # nesting searched for input tensors: (args, kwargs) → a cache object → its layers → tensors


def _compile_params() -> set[str]:
    return set(inspect.signature(torch.compile).parameters)


ISOLATES = "isolate_recompiles" in _compile_params()


def compile_options() -> dict:
    """Keyword arguments for attncomp's ``torch.compile`` calls: static unless marked (attncomp
    marks what varied, :class:`ShapeTracker`), own recompile counter where torch supports it."""
    return {"dynamic": False, **({"isolate_recompiles": True} if ISOLATES else {})}


def limit_name() -> str:
    """The recompile limit's config name in this torch (renamed from ``cache_size_limit``)."""
    cfg = torch._dynamo.config
    return "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"


@contextlib.contextmanager
def recompile_room(n: int) -> Iterator[None]:
    """Dynamo's recompile limit at least ``n`` inside the block (unchanged when it already is)."""
    cfg = torch._dynamo.config
    name = limit_name()
    if getattr(cfg, name) >= n:
        yield
        return
    with cfg.patch(**{name: n}):
        yield


def shared_room(others: int) -> contextlib.AbstractContextManager:
    """Room on code shared with other optimized models: nothing to do where each compile has its
    own recompile counter (``isolate_recompiles``); else the limit plus the ``others`` graphs that
    other attncomp compiles may have left on the same code."""
    if ISOLATES or others <= 0:
        return contextlib.nullcontext()
    return recompile_room(getattr(torch._dynamo.config, limit_name()) + others)


def limit_hits() -> int:
    """How many times Dynamo gave up on a frame for a recompile limit in this process (each frame
    once: it then runs eagerly without counting again)."""
    from torch._dynamo.utils import counters

    return sum(n for k, n in counters["unimplemented"].items() if _is_limit(k.lower()))


def _is_limit(reason: str) -> bool:
    """A graph-break reason of a recompile-limit hit, as torch releases word it ("Dynamo recompile limit
    exceeded", "... cache limit exceeded", "cache_size_limit reached")."""
    return "limit" in reason and ("recompile" in reason or "cache" in reason)


def _tensors(x, key: tuple, depth: int = 0) -> Iterator[tuple[tuple, torch.Tensor]]:
    """(position, tensor) for each tensor in ``x``: nested tuples, lists, dicts and the attributes
    of plain objects (a KV cache object: transformers' ``DynamicCache`` holds its tensors in a list
    of layer objects), not inside modules."""
    if isinstance(x, torch.Tensor):
        yield key, x
    elif depth >= MAX_DEPTH or x is None or isinstance(x, (int, float, str, bool, torch.nn.Module)):
        return
    elif isinstance(x, (tuple, list)):
        for i, a in enumerate(x):
            yield from _tensors(a, key + (i,), depth + 1)
    elif isinstance(x, dict):
        for k, a in x.items():
            yield from _tensors(a, key + (k,), depth + 1)
    elif hasattr(x, "__dict__") and not isinstance(x, type):
        for k, a in vars(x).items():
            yield from _tensors(a, key + (k,), depth + 1)


class ShapeTracker:
    """Which input dimensions one optimized model has seen at more than one size.

    ``first[position]`` is the shape a tensor input had on its first call; ``dynamic[position]``
    the dimensions that differed since (same rank). Ranks that change are left to Dynamo's guards
    (a static recompile).
    """

    def __init__(self) -> None:
        self.first: dict[tuple, tuple[int, ...]] = {}
        self.dynamic: dict[tuple, frozenset[int]] = {}

    def observe(self, args: tuple, kwargs: dict) -> list[tuple[torch.Tensor, frozenset[int]]]:
        """Note the input shapes of one call; returns ``(tensor, dims)`` for each input with
        dimensions that have varied (now or before) — the ones to mark dynamic for this call."""
        marks = []
        for key, t in _tensors((args, kwargs), ()):
            shape = tuple(t.shape)
            seen = self.first.setdefault(key, shape)
            dims = self.dynamic.get(key, frozenset())
            if seen != shape and len(seen) == len(shape):
                new = dims | {i for i, (a, b) in enumerate(zip(seen, shape)) if a != b}
                if new != dims:
                    self.dynamic[key] = dims = frozenset(new)
            if dims and len(shape) == len(seen):
                marks.append((t, dims))
        return marks

    def describe(self) -> str | None:
        """One line for ``explain``: the dimensions made dynamic, or None."""
        if not self.dynamic:
            return None
        parts = [f"{_label(k)} dims {sorted(d)}" for k, d in self.dynamic.items()]
        more = f", … ({len(parts)} inputs)" if len(parts) > SHOWN else ""
        return "dynamic input dimensions (varied between calls): " + ", ".join(parts[:SHOWN]) + more


def _label(key: tuple) -> str:
    """``(0, 1)`` → ``args[1]``; ``(1, 'attention_mask')`` → ``attention_mask``."""
    head, rest = key[0], key[1:]
    if head == 0:
        return f"args[{rest[0]}]" + "".join(f"[{r!r}]" for r in rest[1:])
    return str(rest[0]) + "".join(f"[{r!r}]" for r in rest[1:])


_MARKS = ("_dynamo_weak_dynamic_indices", "_has_dynamo_dim_marking")  # what maybe_mark_dynamic sets
_UNSET = object()


def _saved(t: torch.Tensor, attr: str):
    """A copy of ``t.attr`` (sets are updated in place by the marking), or ``_UNSET``."""
    old = getattr(t, attr, _UNSET)
    return old if old is _UNSET else copy.copy(old)


@contextlib.contextmanager
def marked(marks: list[tuple[torch.Tensor, frozenset[int]]]) -> Iterator[None]:
    """The inputs' varied dimensions marked dynamic (``maybe_mark_dynamic``: Dynamo may still
    specialise one the model's code needs static) for one call; the caller's tensors get their own
    marks back afterwards, so attncomp's decision does not leak into the user's other compiles."""
    if not marks:
        yield
        return
    saved = [(t, [_saved(t, a) for a in _MARKS]) for t, _ in marks]
    for t, dims in marks:
        torch._dynamo.maybe_mark_dynamic(t, sorted(dims))
    try:
        yield
    finally:
        for t, olds in saved:
            for a, old in zip(_MARKS, olds):
                if old is _UNSET:
                    with contextlib.suppress(AttributeError):
                        delattr(t, a)
                else:
                    setattr(t, a, old)
