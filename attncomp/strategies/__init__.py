"""Strategies: one folder each (``dense/``, ``local/``, ``sparse/``, ``linear/``, ``tensor/``) holding its
request class, its ``plan`` (does it take a site?), its op (custom op + autograd), Triton launcher, CPU
executor and naive reference, and its own site rule where it brings an attention form of its own.

``REGISTRY`` is the one list the ``select_strategy`` pass asks, in order; the first strategy whose
``plan`` returns a Plan takes the site, and ``dense`` (last) takes whatever is left. Adding a
strategy is one folder here, one under ``templates/``, one test file and one line in ``REGISTRY``.

This module also parses what a user passes as ``strategy=`` (a name, a request object, or a dict
from module-path patterns to either).
"""

from __future__ import annotations

import fnmatch
from dataclasses import replace

from attncomp.frontend.rules import ROOT_LABEL
from attncomp.strategies import dense, linear, local, sparse, tensor
from attncomp.strategies.base import Auto, Registered, Strategy
from attncomp.strategies.dense import Dense
from attncomp.strategies.linear import Linear
from attncomp.strategies.local import Local
from attncomp.strategies.sparse import Sparse
from attncomp.strategies.tensor import Tensor

__all__ = ["REGISTRY", "Registered", "Strategy", "Auto", "Dense", "Local", "Sparse", "Linear", "Tensor", "parse",
           "with_tolerance", "for_site", "register"]

REGISTRY: list[Registered] = [
    linear.STRATEGY,  # sites written as linear attention; strategy="linear" on softmax sites
    tensor.STRATEGY,  # sites written as tensor attention
    local.STRATEGY,  # proved windows and neighborhoods
    sparse.STRATEGY,  # other proved masks, key padding; Sparse(topk=...) routing
    dense.STRATEGY,  # everything else (last: always takes the site)
]


def register(strategy: Registered, before: str = "dense") -> None:
    """Add ``strategy`` to the registry ahead of ``before`` (by default: ahead of the dense fallback)."""
    if any(s.name == strategy.name for s in REGISTRY):
        raise ValueError(f"a strategy named {strategy.name!r} is registered already")
    at = next(i for i, s in enumerate(REGISTRY) if s.name == before)
    REGISTRY.insert(at, strategy)
    BY_NAME[strategy.name] = strategy.request


BY_NAME = {"auto": Auto, **{s.name: s.request for s in REGISTRY}}


def _options() -> str:
    return ", ".join(repr(n) for n in BY_NAME)


def parse(strategy) -> Strategy | dict:
    """Normalise a user's ``strategy`` argument; raises ``ValueError`` naming the options."""
    if isinstance(strategy, Strategy):
        return strategy
    if isinstance(strategy, str):
        if strategy not in BY_NAME:
            raise ValueError(f"unknown strategy {strategy!r}; expected one of {_options()}, a strategy "
                             "object such as attncomp.Sparse(topk=4), or a dict from module-name "
                             "patterns to strategies")
        return BY_NAME[strategy]()
    if isinstance(strategy, dict):
        if not strategy:
            raise ValueError("strategy dict is empty; map module-name patterns to strategies")
        out = {}
        for pattern, s in strategy.items():
            if not isinstance(pattern, str):
                raise ValueError(f"strategy dict keys must be module-name patterns (str), got {pattern!r}")
            if isinstance(s, dict):
                raise ValueError("strategy dict values must be strategies, not nested dicts")
            out[pattern] = parse(s)
        return out
    raise ValueError(f"strategy must be one of {_options()}, a strategy object or a dict of module-name "
                     f"patterns to strategies; got {type(strategy).__name__} {strategy!r}")


def with_tolerance(parsed: Strategy | dict, tolerance: float | None) -> Strategy | dict:
    """``parsed`` with ``tolerance`` set on its approximate strategies (unchanged when None)."""
    if tolerance is None:
        return parsed
    if not isinstance(tolerance, (int, float)) or not tolerance > 0:
        raise ValueError(f"tolerance must be a positive number, got {tolerance!r}")
    if isinstance(parsed, dict):
        return {p: with_tolerance(s, tolerance) for p, s in parsed.items()}
    return replace(parsed, tolerance=float(tolerance)) if parsed.approximate else parsed


def for_site(parsed: Strategy | dict, path: str) -> Strategy | None:
    """The strategy that applies to the site at module ``path`` (``None``: leave it eager). ``path`` is
    the module's name in ``model.named_modules()``; the model's own ``forward`` is ``""``, which the
    pattern ``"<model>"`` (:data:`ROOT_LABEL`, what ``explain`` shows for it) also matches."""
    if isinstance(parsed, Strategy):
        return parsed
    for pattern, s in parsed.items():
        if fnmatch.fnmatchcase(path, pattern) or (path == "" and pattern == ROOT_LABEL):
            return s
    return None
