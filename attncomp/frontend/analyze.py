"""Matched site → :class:`~attncomp.ir.AttentionSpec` (shapes, dtype, scale, score terms, mask).

Also proves, from the graph alone, that the fused path can express the site's score program;
when it cannot, the reason is returned and the site stays on its eager path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from attncomp.frontend.guards import SizeGuards
from attncomp.frontend.roles import view_shape
from attncomp.frontend.rules import Site
from attncomp.ir import AttentionSpec, Causal, Dims, Mask, Score, TensorMask, mask_and
from attncomp.ir import ops_table as T
from attncomp.ir.program import AddBias, MaskFill, Meta, ProvedMask, Scale, View, check, map_operands, operands
from attncomp.masks.analysis import analyze_mask as _analyze


def _shape_after(node, views) -> tuple | None:
    s = T.shape(node)
    if s is None:
        return None
    try:
        x = torch.empty([int(d) for d in s], device="meta")
        for name, args in views:
            x = getattr(x, name)(*args)
        return tuple(x.shape)
    except Exception:
        return None


def _const_value(x):
    if isinstance(x, (int, float)):
        return float(x)
    return None


def _meta_of(x):
    """A graph operand as the fold's compile-time stand-in (constants stay as they are)."""
    if not isinstance(x, torch.fx.Node):
        return x
    m = T.meta(x)
    if m is None or not hasattr(m, "shape"):  # a Python number computed in the graph
        return Meta(None)
    return Meta(tuple(m.shape))


def check_program(site: Site, scores: tuple) -> str | None:
    """Why the fused path cannot run this score program on scores of shape ``scores``, or ``None``
    if it can: the one fold (:func:`attncomp.ir.program.fold`) run on compile-time stand-ins."""
    return check([map_operands(step, _meta_of) for step in site.steps], scores)


def analyze(site: Site) -> AttentionSpec:
    """Build the spec of ``site`` from the node metadata recorded at capture."""
    qs, ks, vs = (_shape_after(o.node, o.views) for o in (site.q, site.k, site.v))
    qm = T.meta(site.q.node)
    dims = Dims()
    if qs and ks and vs:
        B = qs[0] if len(qs) == 4 else 1
        Hq = qs[-3] if len(qs) >= 3 else 1
        Hkv = ks[-3] if len(ks) >= 3 else 1
        dims = Dims(B, Hq, Hkv, qs[-2], ks[-2], qs[-1], vs[-1])
    dtype = str(qm.dtype).replace("torch.", "") if qm is not None else "?"
    masks, bias = [], []
    if site.sdpa.get("is_causal"):
        masks.append(Causal(0))
    for step in site.steps:
        if isinstance(step, MaskFill):
            masks.append(TensorMask("bool", T.shape(step.cond)))
        elif isinstance(step, AddBias) and isinstance(step.term, torch.fx.Node):
            m = T.meta(step.term)
            kind = "bool" if m is not None and m.dtype == torch.bool else "additive"
            masks.append(TensorMask(kind, T.shape(step.term)))
            bias.append("tensor")
    scale = site.sdpa.get("scale") if site.sdpa else 1.0
    for step in site.steps:
        if isinstance(step, Scale):
            c = _const_value(step.factor)
            if c is None:
                scale = "tensor"
            elif isinstance(scale, float):
                scale = scale / c if step.divide else scale * c
    if site.sdpa and scale is None and dims.Dk:
        scale = 1.0 / math.sqrt(dims.Dk)
    return AttentionSpec(
        dims=dims, dtype=dtype, score=Score(scale=scale, bias=tuple(bias)), mask=mask_and(*masks),
        dropout_p=site.dropout[0], empty_rows="zero" if site.sdpa else "nan",
        device=T.device_type(site.q.node),
        fused_eager=_fused_eager(site))


def _fused_eager(site: Site) -> bool:
    """The site is an SDPA call that torch already runs as well as attncomp would: no mask, or a mask tensor
    no proof replaced, of q's rank. A mask of lower rank (``(H, L, L)``, ``(L, L)``) sends torch's CPU SDPA
    down a path measured 1.8-6x slower than its fused kernel with the mask broadcast (MaxViT's, LeViT-style
    biases): there attncomp has something to gain."""
    if not site.sdpa or site.sdpa.get("mask_from_proof") or any(isinstance(s, ProvedMask) for s in site.steps):
        return False
    mask = site.sdpa.get("attn_mask")
    if not isinstance(mask, torch.fx.Node):
        return True
    ms, qs = T.shape(mask), T.shape(site.q.node)
    return ms is not None and qs is not None and len(ms) >= len(qs)


# ---------------------------------------------------------------------------------------------
# Masks built in the graph (attncomp.mask_analysis proves what they compute)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskUse:
    """A mask step of a site's score program whose value is proved: ``static`` (an IR mask) AND,
    when ``keep_src`` is set, ``keep_fn(value of keep_src)`` (a bool tensor broadcastable to the
    scores). ``fill`` is the score eager gives hidden positions (``-inf`` or ``finfo.min``)."""

    static: Mask
    keep_src: torch.fx.Node | None
    keep_fn: Callable | None
    fill: float
    proof: str
    # the graph's mask node and the step that reads it: masked_fill / masked_fill_not / add (the site's
    # eager form gets it rebuilt from the proof)
    src: torch.fx.Node | None = None
    src_op: str = "masked_fill"
    # symbolic sizes the proof is specialised to (guarded to their example values), and why it is not
    # proved for every length; () when it holds at every shape the graph admits
    specialised: tuple = ()
    not_general: str = ""


SHORT_QUERIES = 16  # query blocks this short (decode steps) keep a size-dependent mask as a tensor


def recognise_masks(site: Site, spec: AttentionSpec, memo: dict | None = None,
                    guards: SizeGuards | None = None) -> tuple[list, list[MaskUse]] | str:
    """Replace the proven mask steps of ``site.steps`` by ``ProvedMask(i)`` (``i`` indexes the returned
    uses); returns (new steps, uses). ``memo`` (one dict per graph rewrite) reuses the proof of a mask
    node shared by several sites — transformers builds one mask and every layer reads it.

    Every ``masked_fill`` / ``where`` / bool SDPA mask must be proved, else nothing is (the reason is
    returned and the masks stay on the folded-bias path); an ``add`` is a proven mask when its term
    is an additive mask built in the graph, and otherwise stays as a bias term.

    With symbolic sizes (after Dynamo's automatic-dynamic recompile) a mask is proved for every length
    when its predicate holds no size; otherwise it is proved at the example shape, and the graph is
    specialised to the sizes that proof read (and the site's Lq, Lk): they are requested from
    ``guards`` (installed by the backend after the rewrite). Without ``guards`` (a graph that is not
    Dynamo's) such a mask is not proved and the reason is returned."""
    memo = {} if memo is None else memo

    def analyze_mask(node, Lq: int, Lk: int, negate: bool = False):
        key = (node, Lq, Lk, negate)
        if key not in memo:
            memo[key] = _analyze(node, Lq, Lk, negate=negate, hint=symbolic)
        return memo[key]

    Lq, Lk = spec.dims.Lq, spec.dims.Lk
    if Lq is None or Lk is None:
        return "the scores' shape is unknown"
    shapes = [T.shape(o.node) for o in (site.q, site.k)]
    if any(s is None for s in shapes):
        return "the scores' shape is unknown"
    symbolic = any(not all(type(d) is int for d in s) for s in shapes)
    # the grid a proof at the example shape is checked on: q's and k's rows (after the site's views)
    rows = [view_shape(s, o.views) for s, o in zip(shapes, (site.q, site.k))]
    grid = tuple(r[-2] for r in rows if r is not None and len(r) > 1 and type(r[-2]) is not int)
    if any(r is None or len(r) < 2 for r in rows):
        grid = tuple(d for s in shapes for d in s if type(d) is not int)  # every size of q and k

    def use(fact, fill, node, op):
        if fact.general:
            return MaskUse(fact.static, fact.keep_src, fact.keep_fn, fill, fact.proof, node, op)
        sizes = fact.sizes + grid
        q_rows = rows[0][-2] if rows[0] is not None and len(rows[0]) > 1 else None
        if type(q_rows) is int and q_rows <= SHORT_QUERIES and grid:
            # a decode step: its mask is (..., Lq, Lk) with Lq tiny, cheap to keep as a tensor, while a guard on
            # the key length would recompile the graph at every step of a generation
            return (f"a mask proved at the example shape {Lq}x{Lk} only ({fact.not_general}); with {q_rows} "
                    "queries per call (a decode step) it stays a run-time tensor rather than specialising the "
                    "graph to every key length")
        why = "the graph is not Dynamo's: it cannot be specialised" if guards is None else guards.why_not(sizes)
        if why:
            return f"a mask proved at the example shape {Lq}x{Lk} only, and {why}"
        proof = f"{fact.proof}; specialised to {Lq}x{Lk} (guard)"
        return MaskUse(fact.static, fact.keep_src, fact.keep_fn, fill, proof, node, op, sizes, fact.not_general)
    if any(isinstance(s, View) for s in site.steps):
        return "the scores are viewed between the product and the softmax"
    kept, uses, refused = [], [], []
    for step in site.steps:
        if isinstance(step, MaskFill):
            fill = _const_value(step.value)
            if fill is None:
                return "a mask is filled with a tensor"
            op = "masked_fill" if step.hide_where else "masked_fill_not"
            fact = analyze_mask(step.cond, Lq, Lk, negate=step.hide_where)
            u = fact if isinstance(fact, str) else use(fact, fill, step.cond, op)
            if isinstance(u, str):
                return u
            kept.append(ProvedMask(len(uses)))
            uses.append(u)
        elif isinstance(step, AddBias) and step.coef == 1.0 and isinstance(step.term, torch.fx.Node):
            fact = analyze_mask(step.term, Lq, Lk)
            u = fact if isinstance(fact, str) or fact.fill is None else use(fact, fact.fill, step.term, "add")
            if isinstance(u, str) or u is fact:
                refused.append(u if isinstance(u, str) else "a bool tensor added to the scores")
                kept.append(step)
            else:
                kept.append(ProvedMask(len(uses)))
                uses.append(u)
        else:
            kept.append(step)
    if not uses:
        return refused[0] if refused else "no mask step in the score program"
    fills = {u.fill for u in uses}
    finite = [u for u in uses if u.fill > -math.inf]
    if len(uses) > 1 and (len(fills) > 1 or len(finite) > 1):
        # a row that every mask hides gets the eager sums of the fills (-inf + finfo.min, finfo.min +
        # finfo.min = -inf, ...), which the proved path's rule for such rows does not reproduce
        return (f"{len(uses)} masks with fills {', '.join(sorted(f'{f:g}' for f in fills))} combine; the masked "
                "scores' sums are kept exact on the tensor path")
    others = [s for s in kept if isinstance(s, (AddBias, MaskFill)) and isinstance(operands(s)[0], torch.fx.Node)]
    replacing = [s for s in others if isinstance(s, MaskFill) and not (_const_value(s.value) or 0.0) == -math.inf]
    if finite and others or replacing:
        # a run-time term may hold -inf or finfo.min too: rows the proved finite-fill mask hides would then
        # get the eager sums, not the proved path's rule for such rows
        return "a finite-fill mask is combined with a run-time term that may mask too; both kept as tensors"
    why = check([map_operands(step, _meta_of) for step in kept], (Lq, Lk))
    if why:
        return f"{why} (once the masks are proved)"
    if guards is not None:
        for u in uses:
            guards.add(u.specialised)
    return kept, uses


def mask_of(uses: list[MaskUse]) -> Mask:
    """The IR mask of proven mask steps (static kinds, plus ``key_padding`` for run-time parts)."""
    parts = [u.static for u in uses]
    parts += [TensorMask("bool", None, "key_padding") for u in uses if u.keep_src is not None]
    return mask_and(*parts)
