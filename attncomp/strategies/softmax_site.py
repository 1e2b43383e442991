"""The module that replaces a softmax attention site (a matched chain or an SDPA call).

``AttentionKernel(q, k, v, *terms, *extra)`` replays the site's score program on the run-time
tensors — scale, additive terms, masks, views — to get ``(scale, bias, keep, fill)``, then runs the
plan's kernel through the ``attncomp::dense_fwd`` / ``sparse_fwd`` ops. The site's own nodes stay
available as its eager form (:class:`attncomp.sitemodule.SiteModule`): training dropout, calls the
fused path cannot express and a failed first-call verification run them, so a site is never
silently different.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from attncomp.ir import Causal, Mask, Plan, mask_and, static_part
from attncomp.ir.program import BIG, AddBias, Cast, ProvedMask, Scale, Unfoldable, fold, map_operands
from attncomp.masks import blocks
from attncomp.masks.analysis import KeyPadding
from attncomp.runtime.approx import Approximation
from attncomp.runtime.device import use_triton
from attncomp.runtime.site import EagerThisCall as _EagerThisCall
from attncomp.runtime.site import SiteModule, Unsupported, kernel_failed
from attncomp.strategies import REGISTRY
from attncomp.strategies.decode import op as decode_op
from attncomp.strategies.decode.plan import decode_window
from attncomp.strategies.dense import op as runtime
from attncomp.strategies.linear.op import linear_attention
from attncomp.strategies.sparse import op as sparse_op
from attncomp.strategies.sparse.masked import choose_blocks
from attncomp.strategies.sparse.routing import routed_attention

__all__ = ["AttentionKernel", "KernelMask", "Unsupported", "kernel_failed", "replay"]


@dataclass(frozen=True)
class KernelMask:
    """A proven mask of the site (see ``attncomp.frontend.analyze.MaskUse``): ``static`` AND
    ``keep_fn(terms[keep_term])``; hidden positions get ``fill`` in eager, applied by the graph's
    score step ``op``. The proof holds for every shape the graph admits (proved for every length, or
    the graph is specialised by a guard): nothing is checked per call."""

    static: Mask
    keep_term: int | None
    keep_fn: object
    fill: float
    op: str = "masked_fill"  # the step that applies it in the graph: masked_fill / masked_fill_not / add


_PADDING: list = []  # recent key-padding tensors derived from one run-time mask (weak refs), shared by its sites


@dataclass(frozen=True)
class Padding:
    """What a key-padding mask means for one call, derived once per mask tensor for every site that
    reads it (the layers of a model): ``hide`` ``(B|1, 1, Lk, 1)`` bool, True at a padded key (its k row is
    zeroed); ``shift`` ``(B|1, 1, 1, Lk)`` additive, -inf at a padded key; ``empty`` ``(B|1, 1, Lq, 1)``
    bool, True at a query row that sees no key under the static part and the padding."""

    hide: Tensor
    shift: Tensor
    empty: Tensor


def padding(src: Tensor, fn, static: Mask, Lq: int, Lk: int, dtype) -> Padding:
    """The :class:`Padding` of key-padding source ``src`` (``fn(src)``: bool ``(B|1, 1, 1, Lk)``) under
    a ``static`` part that is ``Full`` or ``Causal``; cached by tensor identity and version (an in-place
    write bumps the version; inference tensors, which keep none, are not cached)."""
    key = (fn, static, Lq, Lk, dtype, _version(src))
    for ref, k, val in _PADDING:
        if k == key and ref() is src and key[-1] is not None:
            return val
    keep = fn(src)
    if isinstance(static, Causal):  # query i sees keys j <= i + offset: empty iff none of those is kept
        seen = keep[:, :, 0].cummax(-1).values  # (B, 1, Lk): some key <= j is kept
        last = torch.arange(Lq, device=keep.device) + static.offset
        vis = seen[..., last.clamp(0, Lk - 1)] & (last >= 0)
        empty = ~vis[..., None]
    else:
        empty = ~keep.any(-1, keepdim=True)
    zero = torch.zeros((), dtype=dtype, device=keep.device)
    val = Padding(~keep.transpose(-1, -2), zero.masked_fill(~keep, -math.inf), empty)
    if key[-1] is not None:
        _PADDING.insert(0, (weakref.ref(src), key, val))
        del _PADDING[8:]
    return val


def _version(t: Tensor | None) -> int | None:
    """In-place writes bump a tensor's version; inference tensors keep none (a graph's mask is not
    written after it is computed)."""
    return None if t is None or t.is_inference() else t._version


def as_step_operand(m: KernelMask, visible: Tensor, dtype) -> Tensor:
    """The proof ``visible`` (True = visible) as the graph's mask tensor for the step ``m.op``: the
    hidden positions (``masked_fill``), the visible ones (``masked_fill_not``), or an additive mask of
    ``dtype`` with ``m.fill`` where hidden (``add``)."""
    if m.op == "masked_fill":
        return ~visible
    if m.op == "add":
        return torch.zeros((), dtype=dtype, device=visible.device).masked_fill(~visible, m.fill)
    return visible


def _ref(x, terms):
    return terms[x[1]] if isinstance(x, tuple) and len(x) == 2 and x[0] == "term" else x


def _reads_terms(steps) -> bool:
    """Whether the score program needs the call's tensors (else it folds once, at build time): only
    constant scales, proved masks and casts fold without them."""
    return not all(isinstance(s, (ProvedMask, Cast)) or (isinstance(s, Scale) and isinstance(s.factor, (int, float)))
                   for s in steps)


def _scale_then_terms(steps) -> tuple | None:
    """``(scale, (j, ...))`` when the program is constant scales followed by additive run-time terms
    ``terms[j]`` (coefficient 1) and casts — ``s·scale + Σ terms`` — else None."""
    scale, idx = 1.0, []
    for st in steps:
        if isinstance(st, Scale) and isinstance(st.factor, (int, float)) and not idx:
            scale = scale / st.factor if st.divide else scale * st.factor
        elif (isinstance(st, AddBias) and st.coef == 1.0 and isinstance(st.term, tuple) and len(st.term) == 2
              and st.term[0] == "term"):
            idx.append(st.term[1])
        elif not isinstance(st, Cast):
            return None
    return (float(scale), tuple(idx)) if idx and scale > 0 else None


def _check_rows(k: Tensor, v: Tensor) -> None:
    """k and v have the same rows (the roles proof may leave this to the call: symbolic sizes of two
    cache tensors, :func:`attncomp.frontend.roles.equal_at_run_time`); when they do not, this call runs
    the site's eager form and gives what the original model gives."""
    if k.shape[-2] != v.shape[-2]:
        raise _EagerThisCall(f"k has {k.shape[-2]} rows and v {v.shape[-2]}: the call ran eagerly")


def _apply_views(x: Tensor, views) -> Tensor:
    for name, args in views:
        x = getattr(x, name)(*args)
    return x


def replay(steps, terms, shape: tuple, device) -> tuple:
    """The score program folded on this call's tensors (:func:`attncomp.ir.program.fold`):
    ``(scale, bias, keep, fill)`` with ``s = where(keep, scale·qk + bias, fill)``; raises
    :class:`Unsupported` when the call's values have no such form."""
    try:
        return fold([map_operands(s, lambda x: _ref(x, terms)) for s in steps], shape, device)
    except Unfoldable as e:
        raise Unsupported(str(e)) from None


def _fold(bias, keep, fill, dtype):
    """One additive tensor equal to the masked scores' shift, or ``Unsupported``.

    Exact when ``fill <= -1e30``: ``s + fill`` rounds to ``fill`` for any finite float32 score, so
    masked positions end exactly at ``fill`` (and fully masked rows are uniform, as in eager).
    """
    if keep is None:
        return bias
    if fill > -BIG:
        raise Unsupported(f"mask filled with finite value {fill:g} (replace semantics)")
    fill_t = torch.tensor(fill, dtype=dtype, device=keep.device)
    if fill == -math.inf:
        shift = torch.where(keep, torch.zeros((), dtype=dtype, device=keep.device), fill_t)
        return shift if bias is None else bias.to(dtype) + shift
    return torch.where(keep, torch.zeros((), dtype=dtype, device=keep.device) if bias is None
                       else bias.to(dtype), fill_t)


def _to4d(x: Tensor) -> Tensor:
    while x.dim() < 4:
        x = x.unsqueeze(0)
    return x


def strategy_run(name: str):
    """The ``run`` hook of the registered strategy ``name`` (None: one of the built-in paths below)."""
    return next((s.run for s in REGISTRY if s.name == name), None)


class AttentionKernel(Approximation, SiteModule):
    """Runs one attention site. Inputs: q, k, v as the graph has them (the site's view ops bring
    them to q ``(..., Lq, D)``, k ``(..., Lk, D)``, v ``(..., Lk, Dv)``), the score program's terms,
    then what the site's eager form reads besides; output as the site's (``out_views``)."""

    def __init__(self, plan: Plan, steps, views, dropout: tuple, sdpa: dict, kv_groups: int,
                 path: str, softmax_dtype=None, out_views=(), masks: tuple[KernelMask, ...] = (), approx=None):
        super().__init__(path)
        self.plan, self.steps, self.views = plan, steps, views
        self.dropout_p, self.dropout_mode = dropout
        self.sdpa, self.kv_groups = sdpa, kv_groups
        self.softmax_dtype, self.out_views = softmax_dtype, out_views
        self.masks = masks
        # an opt-in approximation (attncomp.Linear, or Sparse with topk), its error measured on the first call
        self.approx, self.approx_error, self.approx_rejected = approx, None, False
        self.static = mask_and(*(m.static for m in masks))
        # context parallelism (set by the rewrite): ring(q, k, v, mask, scale) -> out over the process group
        self.ring = None
        self.run_hook = strategy_run(plan.strategy)  # a registered strategy's own op (looked up once)
        self.expr = self.static.expr() if masks else None
        self.block_sizes: dict = {}  # block-sparse tile sizes per call shape (choose_blocks, once each)
        self.static_shifts: dict = {}  # the dense variant's static mask as a shift, per shape (_static_shift)
        self.decode_window = decode_window(plan.spec) if plan.variant == "decode" else None
        # a program with no run-time operand folds once, here: (scale, bias, keep, fill) of every call
        self.folded = None if _reads_terms(steps) else replay(steps, (), (), None)
        # constant scales, then additive run-time terms (a model's own mask tensor): scale and term indices
        self.bias_terms = None if masks else _scale_then_terms(steps)
        # the plain variants skip the general path: nothing to replay, view, approximate or ring
        plain = ((self.folded is not None and isinstance(self.folded[0], float) and self.folded[1:3] == (None, None))
                 or self.bias_terms is not None)
        self.direct = (plain and not any(views) and not out_views
                       and plan.variant in ("dense", "dense-causal", "dense-padding")
                       and self.run_hook is None and approx is None)
        # the proved masks' run-time part is key padding ((B, 1, 1, Lk) keep): hidden keys are hidden from
        # every query, so their k rows can be zeroed and the mask folded into a per-key shift exactly
        # a softmax chain whose masks replace the hidden scores (masked_fill): a hidden Inf score must not leak
        self.replaces_scores = not sdpa and any(m.op != "add" for m in masks)
        self.column_keep = bool(masks) and all(m.keep_term is None or isinstance(m.keep_fn, KeyPadding)
                                               for m in masks)

    def extra_repr(self) -> str:
        return f"path={self.path!r}, strategy={self.plan.strategy}, mask={self.plan.spec.mask}"

    def _dropout(self) -> float:
        if self.dropout_mode == "module":
            return self.dropout_p if self.training else 0.0
        return self.dropout_p

    def use_fused(self, inputs: tuple) -> bool:
        return self._dropout() == 0.0  # training dropout: the site's own nodes (same random stream)

    def fused(self, q: Tensor, k: Tensor, v: Tensor, *terms) -> Tensor:
        if self.direct and self.ring is None and q.dim() == 4 and k.dim() == 4 and v.dim() == 4:
            return self._direct(q, k, v, terms)
        q, k, v = (_apply_views(t, vw) for t, vw in zip((q, k, v), self.views))
        return _apply_views(self._fused(q, k, v, terms), self.out_views)

    def _direct(self, q: Tensor, k: Tensor, v: Tensor, terms) -> Tensor:
        """The steady state of the plain variants (``self.direct``): a folded constant scale, no views,
        4-D q, k, v — straight to the variant's kernel."""
        if not (self.kv_groups > 1 or self.sdpa.get("enable_gqa")) and k.shape[:2] != q.shape[:2]:
            raise Unsupported("q and k batch dims differ")
        _check_rows(k, v)
        scale, bias = (self.folded[0], None) if self.bias_terms is None else self.bias_terms
        if self.sdpa:
            s = self.sdpa.get("scale")
            scale = scale * (1.0 / math.sqrt(q.shape[-1]) if s is None else s)
        if self.masks:
            return self._masked(q, k, v, None, float(scale), terms)
        causal = 0 if self.sdpa.get("is_causal") else None
        if bias is not None:
            bias = sum(terms[j] for j in bias) if len(bias) > 1 else terms[bias[0]]
            if bias.dim() > 4 or bias.dtype == torch.bool:
                return self._fused(q, k, v, terms)
            bias = _to4d(bias.to(q.dtype))
        out = runtime.run(q, k, v, bias, float(scale), causal, 0.0, exact_lse=False)[0]
        if bias is not None and self.plan.spec.empty_rows == "nan":  # a row the terms hide whole: NaN as eager
            out = out.masked_fill(torch.isneginf(bias).all(-1, keepdim=True), math.nan)
        return out

    def eager_bytes(self, inputs: tuple) -> int:
        q, k = (_apply_views(t, vw) for t, vw in zip(inputs[:2], self.views))
        return 3 * math.prod(q.shape[:-1]) * k.shape[-2] * max(q.element_size(), 4)

    def verify_tolerance(self, dtype) -> float:
        tol = super().verify_tolerance(dtype)
        if self.approx is not None and not self.approx_rejected:  # the approximation's own tolerance
            return max(tol, math.inf if self.approx.tolerance is None else self.approx.tolerance)
        return tol

    def rebuild_mask(self, j: int, dtype, args: tuple) -> Tensor:
        """Proved mask ``j`` as the graph computed it for its step (the proof says they are equal)."""
        q, k = (_apply_views(t, vw) for t, vw in zip(args[:2], self.views))
        m = self.masks[j]
        terms = args[3:]
        return as_step_operand(m, self._visible(q.shape[-2], k.shape[-2], terms, q.device, (m,)), dtype)

    # ------------------------------------------------------------------ fused path
    def _fused(self, q: Tensor, k: Tensor, v: Tensor, terms) -> Tensor:
        grouped = self.kv_groups > 1 or self.sdpa.get("enable_gqa")  # k, v keep Hkv heads
        if not grouped and k.shape[:-2] != q.shape[:-2]:
            raise Unsupported("q and k batch dims differ")
        if q.dim() > 4:
            raise Unsupported("more than two batch dims")
        _check_rows(k, v)
        shape = (*q.shape[:-1], k.shape[-2])
        scale, bias, keep, fill = self.folded or replay(self.steps, terms, shape, q.device)
        if isinstance(scale, Tensor):
            q, scale = q * scale.to(q.dtype), 1.0
        if self.sdpa:  # SDPA's scale argument; None means 1/sqrt(D)
            s = self.sdpa.get("scale")
            scale = scale * (1.0 / math.sqrt(q.shape[-1]) if s is None else s)
        lead = q.shape[:-2]
        q4, k4, v4 = _to4d(q), _to4d(k), _to4d(v)
        if keep is not None:
            k4 = self._unmasked_keys(q4, k4, keep)
        add = _fold(bias, keep, fill, q.dtype)
        if add is not None:
            add = add.to(q.dtype)
        while add is not None and add.dim() > max(len(shape), 4):
            if add.shape[0] != 1:
                raise Unsupported(f"bias of shape {tuple(add.shape)} has more batch dims than the scores")
            add = add[0]
        add4 = None if add is None else _to4d(add)
        causal = 0 if self.sdpa.get("is_causal") else None
        if self.ring is not None:  # context parallelism: q, k, v are this rank's shard of the sequence
            mask = Causal(0) if causal == 0 else self.static
            return self.ring(q4, k4, v4, mask, float(scale)).reshape(*lead, q.shape[-2], v.shape[-1])
        if self.run_hook is not None:  # a registered strategy that runs its own op
            keep = self._keep(terms) if self.masks else None
            out = self.run_hook(self, q4, k4, v4, add4, float(scale), causal, keep)
            return out.reshape(*lead, q.shape[-2], v.shape[-1])
        if self.approx_active():
            return self._approximate(q4, k4, v4, float(scale)).reshape(*lead, q.shape[-2], v.shape[-1])
        if self.plan.variant == "decode":
            out = self._decode(q4, k4, v4, float(scale))
        elif self.masks:
            out = self._masked(q4, k4, v4, add4, float(scale), terms)
        else:
            out, _ = runtime.run(q4, k4, v4, add4, float(scale), causal, 0.0, exact_lse=False)  # lse unused
            if self.plan.spec.empty_rows == "nan" and add4 is not None:
                out = out.masked_fill(torch.isneginf(add4).all(-1, keepdim=True), math.nan)
            if keep is not None and fill is not None and fill > -math.inf and torch.is_grad_enabled():
                # a finite masked_fill replaces the scores: a row it hides whole is the mean of v in eager,
                # with no gradient to q or k (the folded shift would pass one through the softmax)
                groups = q4.shape[1] // v4.shape[1]
                mean = v4.mean(-2, keepdim=True).repeat_interleave(groups, 1)
                out = torch.where(~keep.any(-1, keepdim=True), mean.to(out.dtype), out)
        if self.approx_pending():
            out = self._measure(out, self._approximate(q4, k4, v4, float(scale)))
        return out.reshape(*lead, q.shape[-2], v.shape[-1])

    def _decode(self, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        """The decode variant: the split-KV kernel with ``plan.splits`` splits (inference); a call that
        needs gradients runs the dense kernel with the same bottom-right causal mask."""
        (window_left,) = self.decode_window
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            offset = k.shape[2] - q.shape[2]
            bias = None
            if window_left is not None:
                i, j = torch.arange(q.shape[2], device=q.device)[:, None], torch.arange(k.shape[2], device=q.device)
                bias = torch.zeros((), dtype=q.dtype, device=q.device).masked_fill(j < i + offset - window_left,
                                                                                  -math.inf)
            return runtime.run(q, k, v, bias, scale, offset, 0.0)[0]
        return decode_op.decode_fwd(q, k, v, None, scale, window_left, 0.0, self.plan.splits)[0]

    def _unmasked_keys(self, q: Tensor, k: Tensor, keep: Tensor) -> Tensor:
        """k ``(B, Hkv, Lk, D)`` for a call whose run-time mask ``keep`` is folded into an additive shift.

        An Inf / NaN score at a hidden key would survive the shift (``inf - inf = NaN``) where the site's
        own ``masked_fill`` replaces it. A key-padding mask ``(B|1, 1, 1, Lk)`` hides a key from every
        query: its k row is zeroed (its score is then finite, the shift hides it exactly; v is untouched,
        so a NaN there still reaches the output as in eager). SDPA sites add their mask themselves
        (the same IEEE arithmetic as the fold). Any other run-time mask shape of a softmax chain is
        checked for non-finite q / k (a host read, the one per-call check left: such a model passes
        an L x L mask tensor of its own)."""
        if self.sdpa:
            return k
        col = _to4d(keep) if keep.dim() <= 4 else None
        if col is not None and col.shape[1:3] == (1, 1) and col.shape[0] in (1, k.shape[0]):
            return torch.where(col.transpose(-1, -2), k, torch.zeros((), dtype=k.dtype, device=k.device))
        if not torch.compiler.is_compiling() and runtime.nonfinite(q, k):
            raise _EagerThisCall("calls whose q or k held Inf / NaN ran eagerly (a run-time tensor mask "
                                 "folded into an additive shift would turn a hidden Inf score into NaN)")
        return k

    def _approximate(self, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        """The opt-in approximation of this site on 4-D q ``(B, Hq, Lq, D)``, k/v ``(B, Hkv, Lk, D/Dv)``:
        linear attention (plan "linear") or content routing (``Sparse(topk=…)``)."""
        if self.plan.strategy == "linear":
            return self._linear(q, k, v)
        return routed_attention(q, k, v, region=self.approx.routing_region, topk=self.approx.topk, scale=scale,
                                causal=self._causal())

    def _causal(self) -> bool:
        return bool(self.sdpa.get("is_causal")) or isinstance(static_part(self.plan.spec.mask), Causal)

    def _linear(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Linear attention φ(q)(φ(k)ᵀv) / φ(q)·Σφ(k) for this site (the softmax scale is not used)."""
        groups = q.shape[1] // k.shape[1]
        k, v = runtime.repeat_kv(k, groups), runtime.repeat_kv(v, groups)
        return linear_attention(q, k, v, feature_map=self.approx.feature_map, causal=self._causal(),
                                chunk=self.approx.chunk)

    def _keep(self, terms) -> Tensor | None:
        """The proven masks' run-time part: a bool tensor broadcastable to the scores, or None."""
        keep = None
        for m in self.masks:
            if m.keep_term is not None:
                kt = m.keep_fn(terms[m.keep_term])
                keep = kt if keep is None else keep & kt
        return keep

    def _masked(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float, terms) -> Tensor:
        """Attention under the proven masks, as the plan's variant says: the dense causal kernel when
        that is all there is; with key padding (and no other mask, or causal), the dense kernel with the
        padding as a per-key shift;
        the block-sparse kernel (visiting only the tiles the mask leaves); or — variant ``dense`` — the
        dense kernel on the materialised mask."""
        Lq, Lk = q.shape[2], k.shape[2]
        variant, k_site = self.plan.variant, k
        offset = self.static.offset if isinstance(self.static, Causal) else None
        if variant == "dense-causal":
            if offset >= 0 and bias is None:  # every query sees key 0: no row is empty, lse is not needed
                return runtime.run(q, k, v, None, scale, offset, 0.0, exact_lse=False)[0]
            out, lse = runtime.run(q, k, v, bias, scale, offset, 0.0)
            return self._empty_rows(out, torch.isneginf(lse)[..., None], q, k_site, v, bias, scale)
        if variant == "dense-padding":
            (m,) = [m for m in self.masks if m.keep_term is not None]
            pad = padding(terms[m.keep_term], m.keep_fn, self.static, Lq, Lk, q.dtype)
            k = k.masked_fill(pad.hide, 0.0)  # see _unmasked_keys
            shift = pad.shift if bias is None else bias + pad.shift
            out, _ = runtime.run(q, k, v, shift, scale, offset, 0.0, exact_lse=False)
            return self._empty_rows(out, pad.empty, q, k_site, v, bias, scale)
        keep = self._keep(terms)
        if keep is not None and self.column_keep:  # see _unmasked_keys
            k = k.masked_fill(~keep.transpose(-1, -2), 0.0)
        if variant != "block-sparse" and self.replaces_scores:
            # eager replaces the hidden scores: an Inf score there must not meet an additive -inf. On CPU the
            # scores are materialised; the Triton block-sparse kernel applies the mask as a keep (exact)
            if not use_triton(q):
                return self._dense_replacing(q, k_site, v, bias, scale, keep, Lq, Lk)
            variant = "block-sparse"
        if variant != "block-sparse":
            shift, empty, _ = self._static_shift(Lq, Lk, q.dtype, q.device)
            if keep is not None:
                shift = shift.masked_fill(~keep, -math.inf)
            if bias is not None:
                shift = bias + shift
            out, lse = runtime.run(q, k, v, shift, scale, None, 0.0, exact_lse=False)
            if use_triton(q):  # the kernel's lse is exact at no cost: rows with no visible key, data included
                empty = torch.isneginf(lse)[..., None]
            elif keep is not None or bias is not None:  # the rows hidden whole, from the shift: no lse, no scan
                empty = torch.isneginf(shift).all(-1, keepdim=True)
            return self._empty_rows(out, empty, q, k_site, v, bias, scale)
        bm, bn = self._blocks(q, k, v, keep, bias, scale)
        out, lse = sparse_op.run(q, k, v, bias, keep, self.expr or "", bm, bn, scale)
        return self._empty_rows(out, torch.isneginf(lse)[..., None], q, k_site, v, bias, scale)

    def _dense_replacing(self, q: Tensor, k: Tensor, v: Tensor, bias, scale: float, keep, Lq: int, Lk: int) -> Tensor:
        """The dense variant of a softmax chain whose masks *replace* the hidden scores (``masked_fill``), on
        CPU: the scores materialised as eager does, so an Inf / NaN score at a hidden key never reaches the
        softmax (an additive -inf shift would turn it into NaN). The planner takes this variant where the
        mask leaves too little to skip, so the scores are the size eager builds too."""
        visible = self._static_shift(Lq, Lk, q.dtype, q.device)[2]
        if keep is not None:
            visible = visible & keep
        groups = q.shape[1] // k.shape[1]
        s = runtime.math_scores(q, k, bias, scale, None, 0.0).masked_fill(~visible, -math.inf)
        empty = torch.isneginf(s).all(-1, keepdim=True)
        p = torch.softmax(s, -1).masked_fill(empty, 0.0)  # NaN from the data stays NaN, as in eager
        out = (p @ runtime.repeat_kv(v, groups).to(p.dtype)).to(q.dtype)
        return self._empty_rows(out, empty, q, k, v, bias, scale)

    def _static_shift(self, Lq: int, Lk: int, dtype, device) -> tuple[Tensor, Tensor, Tensor]:
        """The proven masks' static part as an additive ``(Lq, Lk)`` shift (0 / -inf), its rows that see no
        key ``(Lq, 1)`` and the bool ``(Lq, Lk)`` mask, built once per shape, dtype and device and kept by the
        site (the dense variant materialises its mask)."""
        key = (Lq, Lk, dtype, device)
        if key not in self.static_shifts:
            if len(self.static_shifts) >= 8:  # a dynamic graph called at many lengths: keep the newest few
                self.static_shifts.pop(next(iter(self.static_shifts)))
            visible = blocks.dense_keep(self.expr, Lq, Lk, device)
            shift = torch.zeros((), dtype=dtype, device=device).masked_fill(~visible, -math.inf)
            self.static_shifts[key] = shift, ~visible.any(-1, keepdim=True), visible
        return self.static_shifts[key]

    def _empty_rows(self, out: Tensor, empty: Tensor, q: Tensor, k: Tensor, v: Tensor, bias, scale: float) -> Tensor:
        """``out`` ``(B, Hq, Lq, Dv)`` with the rows ``empty`` marks (they see no key) as the site's eager
        form gives them: the mean of v (a finite fill makes all their scores equal), NaN (softmax of
        -inf) or zeros (SDPA, as the kernels give them)."""
        if any(m.fill > -math.inf for m in self.masks):
            groups = q.shape[1] // v.shape[1]
            mean = v.mean(-2, keepdim=True).repeat_interleave(groups, 1)
            if (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
                    and any(m.op == "add" for m in self.masks) and bool(empty.any())):
                # an added fill keeps the scores in the graph: eager's gradient reaches q and k through
                # the uniform softmax of those rows. softmax(s - s.detach()) is that softmax (value: the
                # mean of v; gradient: eager's). Training only, and only when such a row exists (a host
                # read in training; inference never takes this branch).
                s = (q @ runtime.repeat_kv(k, groups).transpose(-1, -2)) * scale
                if bias is not None:
                    s = s + bias
                mean = torch.softmax(s - s.detach(), -1) @ runtime.repeat_kv(v, groups)
            out = torch.where(empty, mean.to(out.dtype), out)
        elif self.plan.spec.empty_rows == "nan":
            out = out.masked_fill(empty, math.nan)
        return out

    def _blocks(self, q: Tensor, k: Tensor, v: Tensor, keep, bias, scale: float) -> tuple[int, int]:
        """The block-sparse tile sizes for this call's shape (autotuned or heuristic, see
        :func:`choose_blocks`), looked up once per shape and kept by the site."""
        key = (q.shape, k.shape, v.shape[-1], q.dtype, q.device, keep is None, bias is None)
        if key not in self.block_sizes:
            self.block_sizes[key] = choose_blocks(q, k, v, self.expr, keep, bias, scale, 0.0)
        return self.block_sizes[key]

    def _visible(self, Lq: int, Lk: int, terms, device, masks=None) -> Tensor:
        """The proven masks as a bool tensor broadcastable to the scores (True = visible)."""
        visible = None
        for m in self.masks if masks is None else masks:
            part = blocks.dense_keep(m.static.expr(), Lq, Lk, device)
            if m.keep_term is not None:
                part = part & m.keep_fn(terms[m.keep_term])
            visible = part if visible is None else visible & part
        return visible
