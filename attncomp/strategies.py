"""Strategy objects a user passes to :func:`attncomp.optimize`, and how a request is parsed.

``"auto"`` picks among exact strategies only. A dict maps module-path patterns (``fnmatch``
syntax, first match wins) to strategies, e.g. ``{"h.*.attn": "dense", "*": "auto"}``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Strategy:
    name = "auto"
    exact = True


@dataclass(frozen=True)
class Auto(Strategy):
    name = "auto"


@dataclass(frozen=True)
class Dense(Strategy):
    name = "dense"


@dataclass(frozen=True)
class Local(Strategy):
    """Local attention (sliding window, neighborhood). Exact: used only where the mask is local."""

    name = "local"


@dataclass(frozen=True)
class Sparse(Strategy):
    """Block-sparse attention; with ``topk`` set, content-routed (approximate, opt-in)."""

    name = "sparse"
    topk: int | None = None
    region: int | None = None


@dataclass(frozen=True)
class Linear(Strategy):
    """Linear attention φ(q)(φ(k)ᵀv) in place of softmax attention: it changes the function, so it
    is opt-in (never chosen by ``auto``). The first call measures each site's relative error against
    dense attention (``explain`` reports it); a site whose error exceeds ``tolerance`` runs dense
    from then on. Sites with biases or masks other than causal stay dense."""

    name = "linear"
    exact = False
    feature_map: str = "elu1"
    chunk: int = 64
    tolerance: float | None = None


@dataclass(frozen=True)
class Tensor(Strategy):
    """Higher-order (tensor) attention; ``rank`` set means the low-rank approximation."""

    name = "tensor"
    rank: int | None = None


BY_NAME = {cls.name: cls for cls in (Auto, Dense, Local, Sparse, Linear, Tensor)}
OPTIONS = ", ".join(repr(n) for n in BY_NAME)


def parse(strategy) -> Strategy | dict:
    """Normalise a user's ``strategy`` argument; raises ``ValueError`` naming the options."""
    if isinstance(strategy, Strategy):
        return strategy
    if isinstance(strategy, str):
        if strategy not in BY_NAME:
            raise ValueError(f"unknown strategy {strategy!r}; expected one of {OPTIONS}, a strategy "
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
    raise ValueError(f"strategy must be one of {OPTIONS}, a strategy object or a dict of module-name "
                     f"patterns to strategies; got {type(strategy).__name__} {strategy!r}")


def with_tolerance(parsed: Strategy | dict, tolerance: float | None) -> Strategy | dict:
    """``parsed`` with ``tolerance`` set on its approximate strategies (unchanged when None)."""
    if tolerance is None:
        return parsed
    if not isinstance(tolerance, (int, float)) or not tolerance > 0:
        raise ValueError(f"tolerance must be a positive number, got {tolerance!r}")
    if isinstance(parsed, dict):
        return {p: with_tolerance(s, tolerance) for p, s in parsed.items()}
    return replace(parsed, tolerance=float(tolerance)) if isinstance(parsed, Linear) else parsed


def for_site(parsed: Strategy | dict, path: str) -> Strategy | None:
    """The strategy that applies to the site at module ``path`` (``None``: leave it eager)."""
    if isinstance(parsed, Strategy):
        return parsed
    for pattern, s in parsed.items():
        if fnmatch.fnmatchcase(path, pattern):
            return s
    return None
