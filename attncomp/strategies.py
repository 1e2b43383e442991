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

    @property
    def approximate(self) -> bool:
        """Does this request change the function (opt-in, error measured, ``tolerance`` applies)?"""
        return not self.exact


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
    """Block-sparse attention; with ``topk`` set, content-routed (BiFormer region top-k,
    :func:`attncomp.ops.routed_attention`): each ``region`` queries attend only to the ``topk`` key
    regions of highest mean-q·mean-k affinity. Routing changes the function, so it is opt-in; the
    first call measures each site's relative error against dense attention and a site above
    ``tolerance`` runs dense. ``region`` defaults to 64 tokens."""

    name = "sparse"
    topk: int | None = None
    region: int | None = None
    tolerance: float | None = None

    def __post_init__(self):
        for field_name in ("topk", "region"):
            val = getattr(self, field_name)
            if val is not None and (isinstance(val, bool) or not isinstance(val, int) or val < 1):
                raise ValueError(f"Sparse({field_name}=...) must be a positive int or None, got {val!r}")
        if self.region is not None and self.topk is None:
            raise ValueError("Sparse(region=...) needs topk: region sets the routing granularity")

    @property
    def approximate(self) -> bool:
        return self.topk is not None

    @property
    def routing_region(self) -> int:
        """Tokens per routing region (``region``, 64 when unset)."""
        return self.region or 64


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
    """Higher-order (tensor) attention. Sites written as tensor attention (a softmax over key pairs)
    run exactly (:func:`attncomp.tensor.tensor_attention`); with ``rank`` or ``degree`` set, the opt-in
    low-rank approximation (:func:`attncomp.tensor_lowrank.lowrank_tensor_attention`: ``degree`` of the
    polynomial in place of exp, ``method`` ``"poly"`` (exact features) or ``"random"`` (``rank`` sampled
    features; the default when ``rank`` is given), ``seed`` for the sampling) instead, its error against
    the exact kernel measured on the first call; a site above ``tolerance`` stays exact."""

    name = "tensor"
    rank: int | None = None
    degree: int | None = None
    method: str | None = None
    seed: int | None = 0
    tolerance: float | None = None

    def __post_init__(self):
        for field_name, low in (("rank", 1), ("degree", 0)):
            val = getattr(self, field_name)
            if val is not None and (isinstance(val, bool) or not isinstance(val, int) or val < low):
                raise ValueError(f"Tensor({field_name}=...) must be an int >= {low} or None, got {val!r}")
        if self.method not in (None, "poly", "random"):
            raise ValueError(f"Tensor(method=...) must be 'poly' or 'random', got {self.method!r}")

    @property
    def approximate(self) -> bool:
        return self.rank is not None or self.degree is not None

    @property
    def resolved_method(self) -> str:
        """``method``, else ``"random"`` when ``rank`` is set (a budget of sampled features), else ``"poly"``."""
        return self.method or ("random" if self.rank is not None else "poly")


BY_NAME = {cls.name: cls for cls in (Auto, Dense, Local, Sparse, Linear, Tensor)}
OPTIONS = ", ".join(repr(n) for n in BY_NAME)
# How explain names a site in the model's own forward (its module path is "", the model's name in
# named_modules()); a strategy dict may key it either way.
ROOT_LABEL = "<model>"


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
