"""Tensor (2-simplicial) attention: a softmax over key pairs, exact and tiled (the score cube is never
built); with ``Tensor(rank=…/degree=…)`` the opt-in low-rank (polynomial) approximation.
"""

from __future__ import annotations

from dataclasses import dataclass

from attncomp.frontend.rules import register_rule
from attncomp.ir import AttentionSpec, Plan
from attncomp.ir import ops_table as T
from attncomp.strategies.base import Registered, Strategy, tolerance_note
from attncomp.strategies.tensor import site


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


def plan(spec: AttentionSpec, requested: Strategy) -> Plan | str | None:
    if spec.kernel == "softmax":
        if requested.name == "tensor":
            return "tensor requested, but the site is softmax attention over single keys"
        return None
    if spec.kernel != "tensor":
        return None
    if requested.name == "tensor" and requested.approximate:
        knobs = ", ".join(f"{n}={getattr(requested, n)}" for n in ("degree", "rank")
                          if getattr(requested, n) is not None)
        return Plan(spec=spec.with_(contract="approx"), strategy="tensor",
                    reasons=(f"tensor low-rank (approximate, opt-in): method={requested.resolved_method}, "
                             f"{knobs}, {tolerance_note(requested)}",))
    why = f"tensor (exact): recognised tensor attention ({spec.form}), run on attncomp.ops.tensor_attention"
    if requested.name not in ("auto", "tensor"):
        why += f"; {requested.name} requested, which applies to softmax sites"
    return Plan(spec=spec, strategy="tensor", reasons=(why,))


STRATEGY = Registered("tensor", Tensor, plan)
register_rule("tensor_attention", T.SOFTMAX, site.match, before="softmax_chain")
