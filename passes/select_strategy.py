"""Pass: pick the strategy for a spec, given what the user asked for.

Only exact strategies are chosen automatically. The reasons end up in ``explain``.

* ``dense``: no mask, a causal mask (the dense kernel visits diagonal tiles only), or a mask that
  is only known as a tensor (folded into an additive bias).
* ``local``: a proven sliding window or neighborhood (plus whatever else is ANDed with it) — the
  block-sparse kernel visits only the tiles near the diagonal.
* ``sparse``: any other proven mask (block-diagonal, grid, prefix, key padding…) — the same
  block-sparse kernel, driven by the block table of the mask.

Opt-in approximations (the plan's spec gets ``contract="approx"``; the kernel measures the error on
the first call): ``Linear`` and ``Sparse(topk=…)`` (content routing) on softmax sites without biases.
"""

from __future__ import annotations

from attncomp import blocks
from attncomp.ir import And, AttentionSpec, Causal, Full, Neighborhood, Or, Plan, Window, runtime_part, static_part
from attncomp.strategies import Strategy

AVAILABLE = ("dense", "local", "sparse", "linear")  # strategies with kernels today
TILE = 64  # tile edge used to report the fraction of tiles a static mask skips


def _leaves(mask) -> tuple:
    return tuple(x for p in mask.parts for x in _leaves(p)) if isinstance(mask, (And, Or)) else (mask,)


def skipped_fraction(spec: AttentionSpec) -> float | None:
    """Fraction of 64×64 tiles the static part of the mask never visits (None: shape unknown)."""
    static, d = static_part(spec.mask), spec.dims
    if d.Lq is None or d.Lk is None or isinstance(static, Full):
        return None
    table = blocks.block_table(static.expr(), None, d.Lq, d.Lk, TILE, TILE, "cpu")
    return table.skipped_fraction()


def select_strategy(spec: AttentionSpec, requested: Strategy) -> Plan:
    if spec.kernel == "linear":
        return _recognised_linear(spec, requested)
    if spec.kernel == "tensor":
        return _recognised_tensor(spec, requested)
    static, runtime = static_part(spec.mask), runtime_part(spec.mask)
    tensor_only = [t for t in runtime if t.role == "general"]
    if requested.name == "tensor":
        return Plan(spec=spec, strategy="dense",
                    reasons=("tensor requested, but the site is softmax attention over single keys; dense kernel "
                             "(exact)",))
    if requested.name not in ("auto", *AVAILABLE):
        return Plan(spec=spec, strategy="dense",
                    reasons=(f"strategy {requested.name!r} has no kernel yet; using dense (exact)",))
    if requested.name == "dense":
        return Plan(spec=spec, strategy="dense", reasons=("dense: requested",))
    if requested.name == "linear":
        return _linear(spec, requested, static, runtime)
    if requested.name == "sparse" and requested.approximate:
        return _routed(spec, requested, static, runtime)
    if tensor_only or (isinstance(static, (Full, Causal)) and not runtime):
        why = ("dense kernel" if not tensor_only else "dense kernel; the mask is a run-time tensor")
        if isinstance(static, Causal):
            why += ", causal (diagonal tiles alone are masked)"
        if requested.name in ("local", "sparse") and not tensor_only:
            why = f"{requested.name} requested, but a {static} mask has nothing to skip; " + why
        return Plan(spec=spec, strategy="dense", reasons=(f"{requested.name}: {why}",))
    kind = "local" if any(isinstance(x, (Window, Neighborhood)) for x in _leaves(static)) else "sparse"
    frac = skipped_fraction(spec)
    skip = f", {frac:.0%} of {TILE}x{TILE} tiles skipped" if frac is not None else ""
    if runtime:
        skip += " (before key padding)" if skip else ", tiles chosen from the key padding at run time"
    return Plan(spec=spec, strategy=kind, reasons=(f"{requested.name}: {kind} block-sparse kernel, {spec.mask}{skip}",))


def _linear(spec: AttentionSpec, requested, static, runtime) -> Plan:
    """Opt-in approximation: linear attention where the site has no bias and no mask but causal."""
    why = None
    if runtime or not isinstance(static, (Full, Causal)) or (isinstance(static, Causal) and static.offset):
        why = f"the mask {spec.mask} has no linear-attention form"
    elif spec.score.bias or spec.score.softcap:
        why = "the scores carry additive terms or a soft-cap"
    if why:
        return Plan(spec=spec, strategy="dense", reasons=(f"linear requested, but {why}; dense kernel (exact)",))
    tol = "no tolerance" if requested.tolerance is None else f"tolerance {requested.tolerance:g}"
    return Plan(spec=spec.with_(contract="approx"), strategy="linear",
                reasons=(f"linear (approximate, opt-in): φ={requested.feature_map}, "
                         f"{'causal' if isinstance(static, Causal) else 'non-causal'}, {tol}",))


def _routed(spec: AttentionSpec, requested, static, runtime) -> Plan:
    """Opt-in approximation: content routing (region top-k) where the site has no bias and no mask,
    or a causal one (then key regions after the query region are never chosen and the causal mask
    applies inside the kept tiles). Other masks and biases are not combined with the selection: such
    sites stay dense."""
    why = None
    causal = isinstance(static, Causal) and not static.offset
    if runtime or not (isinstance(static, Full) or causal):
        why = f"routing is combined with no mask but causal, not with the site's {spec.mask} mask"
    elif spec.score.bias or spec.score.softcap:
        why = "the scores carry additive terms or a soft-cap"
    if why:
        return Plan(spec=spec, strategy="dense",
                    reasons=(f"routed sparse requested, but {why}; dense kernel (exact)",))
    tol = "no tolerance" if requested.tolerance is None else f"tolerance {requested.tolerance:g}"
    region = requested.routing_region
    return Plan(spec=spec.with_(contract="approx"), strategy="sparse",
                reasons=(f"sparse routed (approximate, opt-in): each {region}-token query region attends its "
                         f"top-{requested.topk} key regions by mean q·k affinity"
                         f"{' (none after it; causal inside the kept tiles)' if causal else ''}, {tol}",))


def _not_for(requested, kind: str) -> str:
    """The note for a request that does not apply to a recognised ``kind`` site."""
    return "" if requested.name in ("auto", kind) else f"; {requested.name} requested, which applies to softmax sites"


def _recognised_linear(spec: AttentionSpec, requested) -> Plan:
    """A site the model writes as linear attention: run it, exactly, on the linear-attention op."""
    why = f"linear (exact): recognised naive linear attention ({spec.form}), run on attncomp.linear.linear_attention"
    return Plan(spec=spec, strategy="linear", reasons=(why + _not_for(requested, "linear"),))


def _recognised_tensor(spec: AttentionSpec, requested) -> Plan:
    """A site the model writes as tensor attention: the exact tensor-attention op, or with
    ``Tensor(rank=…)`` / ``Tensor(degree=…)`` the opt-in low-rank approximation."""
    if requested.name == "tensor" and requested.approximate:
        tol = "no tolerance" if requested.tolerance is None else f"tolerance {requested.tolerance:g}"
        knobs = ", ".join(f"{n}={getattr(requested, n)}" for n in ("degree", "rank")
                          if getattr(requested, n) is not None)
        return Plan(spec=spec.with_(contract="approx"), strategy="tensor",
                    reasons=(f"tensor low-rank (approximate, opt-in): method={requested.resolved_method}, "
                             f"{knobs}, {tol}",))
    why = f"tensor (exact): recognised tensor attention ({spec.form}), run on attncomp.tensor.tensor_attention"
    return Plan(spec=spec, strategy="tensor", reasons=(why + _not_for(requested, "tensor"),))
