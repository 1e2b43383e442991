"""Block-sparse attention: any other proved mask (block-diagonal, grid, prefix, key padding, …) runs on
the block-sparse kernel driven by the mask's block table; with ``Sparse(topk=…)``, content routing
(an opt-in approximation: :mod:`attncomp.strategies.sparse.routing`).
"""

from __future__ import annotations

from dataclasses import dataclass

from attncomp.ir import AttentionSpec, Causal, Full, Plan, runtime_part, static_part
from attncomp.strategies.base import Registered, Strategy, tolerance_note
from attncomp.strategies.sparse.tables import describe, too_dense


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


def _routed(spec: AttentionSpec, requested: Sparse) -> Plan | str:
    """Content routing where the site has no bias and no mask, or a causal one (then key regions after
    the query region are never chosen and the causal mask applies inside the kept tiles)."""
    static, runtime = static_part(spec.mask), runtime_part(spec.mask)
    causal = isinstance(static, Causal) and not static.offset
    if runtime or not (isinstance(static, Full) or causal):
        return (f"routed sparse requested, but routing is combined with no mask but causal, not with the site's "
                f"{spec.mask} mask")
    if spec.score.bias or spec.score.softcap:
        return "routed sparse requested, but the scores carry additive terms or a soft-cap"
    return Plan(spec=spec.with_(contract="approx"), strategy="sparse",
                reasons=(f"sparse routed (approximate, opt-in): each {requested.routing_region}-token query region "
                         f"attends its top-{requested.topk} key regions by mean q·k affinity"
                         f"{' (none after it; causal inside the kept tiles)' if causal else ''}, "
                         f"{tolerance_note(requested)}",))


def plan(spec: AttentionSpec, requested: Strategy) -> Plan | str | None:
    if spec.kernel != "softmax":
        return None
    if requested.name == "sparse" and requested.approximate:
        return _routed(spec, requested)
    if requested.name not in ("auto", "local", "sparse"):
        return None
    static, runtime = static_part(spec.mask), runtime_part(spec.mask)
    if any(t.role == "general" for t in runtime):
        return None
    if isinstance(static, (Full, Causal)):
        if requested.name in ("local", "sparse") and not runtime:
            return f"{requested.name} requested, but a {static} mask has nothing to skip"
        if requested.name == "auto":  # the dense (causal) kernel takes key padding as a per-key shift
            return None
    if requested.name == "auto" and (why := too_dense(spec)):
        return why
    why = f"{requested.name}: sparse block-sparse kernel, {describe(spec)}"
    return Plan(spec=spec, strategy="sparse", reasons=(why,))


STRATEGY = Registered("sparse", Sparse, plan)
