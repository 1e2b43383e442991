"""Graph fuzzer for the attention matcher: draw small attention programs, written in the many ways real
models write them (and in near-misses that are not standard attention), and check that the optimized
model is exact or leaves the site alone.

A drawn program is a :class:`Prog` (a frozen record of choices); :func:`build` turns it into an
``nn.Module`` plus inputs, and :func:`check` runs eager against ``attncomp.optimize`` and asserts the
property below. Families:

* ``chain``: projections (or given q, k, v in either layout and any strides; v's head dim may differ;
  GQA by ``expand``+``reshape``, ``repeat_interleave`` or plain broadcasting; learned queries or a
  learned key/value memory broadcast over the batch; shared q = k or k = v; RoPE; two stacked layers)
  → optional L2-normalise → scale on q / k / scores (mul or div; constant, scalar parameter, per-head
  parameter, buffer, per-query or per-key tensor, near-miss: varying along keys; before or after the
  masks) → q·kᵀ by ``matmul`` / ``@`` / ``bmm`` / ``baddbmm`` / ``einsum`` (several spellings, operands
  swapped), kᵀ written as a given (B, H, D, L) tensor, ``transpose(-2, -1)``, ``transpose(2, 3)``,
  ``permute``, ``.mT`` → score terms (causal from ``tril`` / ``triu`` / ``arange`` / a sliced buffer,
  sliding window, key padding from a bool (B, Lk) input (right, left, empty, random), transformers'
  ``(1 - mask) * finfo.min``, random bool mask, relative-position parameter, Swin-style viewed shift
  mask, a constant; applied by ``masked_fill`` / ``where`` / additive ``finfo.min`` or ``-inf``;
  near-misses: finite fill, ``1 - s``) → softmax (four spellings, ``dim=-1`` or its positive index,
  optional ``dtype``; near-misses: another axis, ``s - s.amax()``) → casts / dropout (p=0, eval) →
  P·v (near-misses: masked probabilities, operands swapped, reshaped probabilities, another user) →
  output raw, merged back to (B, L, C), or projected.
* ``sdpa``: ``F.scaled_dot_product_attention`` on transposed (non-contiguous) or given inputs, with
  ``is_causal``, ``scale=``, bool / float masks (causal, key padding, relative position, random), GQA.
* ``xca``: channel (transposed) attention as XCiT writes it: q, k, v as (B, H, D, N), L2-normalised
  over tokens, per-head temperature, D×D scores, output permuted back.
* ``ctx``: ``softmax(kᵀ·v)`` (D×D) applied as ``q @ ctx`` (contracts over the query's head dim: not
  standard attention), as ``ctx @ qᵀ`` (standard attention with roles (kᵀ, vᵀ, qᵀ)), or the
  factorised form ``softmax(q) @ (softmax(k, -2)ᵀ v)``.
Every program is captured with Dynamo (``capture="dynamo"``, the default) or, one in five, ``"fx"``.

Property (every example): the optimized output equals eager (float32, ‖out − ref‖ / ‖ref‖ ≤ 1e-5, NaN at
the same positions), or every site is reported ``left`` with a non-empty reason. A ``replaced`` site
whose output differs fails, and so does any exception. For a third of the examples, when a site was
replaced and eager's output is finite, the gradients of the float inputs and of every parameter are
compared the same way, relative to max(‖eager's‖, 1) (see ``GRAD_FLOOR``), and a gradient just over
the tolerance is judged against eager in float64 (see ``ROUNDING``).

Profiles: the default run draws ``DEFAULT_EXAMPLES`` programs (derandomized: runs repeat) and reports a
failing program unshrunk; ``pytest -m slow`` runs ``test_fuzz_matcher_slow`` with
``$ATTNCOMP_FUZZ_EXAMPLES`` (default 400) programs and shrinks a failure to a minimal program;
``ATTNCOMP_FUZZ_RANDOM=1`` draws fresh random programs instead of the derandomized ones.
``python tests/test_fuzz_matcher.py [N]`` surveys N programs without stopping at the first failure and
prints every failing program as a :class:`Prog` literal; ``check(*build(prog), capture=prog.capture,
grad=...)`` reproduces it.

Below the fuzzer, ``test_form`` and the ``test_channel_*`` tests are the named forms written out plainly
(forward and backward), including the ones the fuzzer found failing.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import sys
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from torch import nn

import attncomp

TOL = 1e-5
# Gradients are compared relative to max(‖eager's‖, GRAD_FLOOR): a gradient that vanishes in exact
# arithmetic (a key projection's bias: softmax ignores a shift along keys; q when each query sees one
# key) is round-off in both, and its relative error means nothing. Other gradients are O(1) or more.
GRAD_FLOOR = 1.0
ROUNDING = 10.0  # see check(): how much further from float64 than eager's float32 a gradient may be
DEFAULT_EXAMPLES = 60
SLOW_EXAMPLES = int(os.environ.get("ATTNCOMP_FUZZ_EXAMPLES", "400"))
RANDOM = os.environ.get("ATTNCOMP_FUZZ_RANDOM", "") == "1"
NEG_INF = float("-inf")
FMIN = torch.finfo(torch.float32).min

settings.register_profile(
    "attncomp-fuzz", deadline=None, derandomize=not RANDOM, print_blob=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
PROFILE = settings.get_profile("attncomp-fuzz")
# The default run reports a failing program as drawn (shrinking one costs minutes of compiles); the
# slow run shrinks it to a minimal one.
QUICK = settings(PROFILE, phases=[Phase.explicit, Phase.reuse, Phase.generate])


# ------------------------------------------------------------------------------------------------
# The program: a record of choices
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prog:
    """One drawn attention program (see the module docstring). Defaults: plain causal-free attention."""

    family: str = "chain"          # chain | sdpa | xca | ctx
    B: int = 1
    H: int = 1
    Lq: int = 8
    Lk: int = 8                    # != Lq: cross attention (q from x, k and v from y)
    D: int = 8
    Dv: int = 0                    # v's head dim (0: D)
    capture: str = "dynamo"        # dynamo | fx
    seed: int = 0
    # where q, k, v come from
    source: str = "linear"         # linear: Linear layers on x (and y) | given: q, k, v are inputs
    fused_qkv: bool = False        # one Linear(C, 3C) (self-attention only)
    layout: str = "bhld"           # layout q, k, v are produced in: bhld | blhd
    to_bhld: str = "transpose"     # how blhd becomes bhld: transpose | permute
    strided: str = "none"          # given inputs: none | bl_storage (B,L,H,D) seen as (B,H,L,D) |
    #                                lastdim (last axis non-contiguous) | sliced (every other element)
    normalize: str = "none"        # none | qk | q (F.normalize over the head dim)
    unbind: bool = True            # q, k, v = qkv.unbind(...) (else qkv[..., 0], ...)
    share: str = "none"            # none | v_is_k | k_is_q (shared-QK attention)
    repeat: str = "expand"         # chain with gqa: k, v of one head repeated by expand+reshape | interleave |
    #                                broadcast (not repeated: matmul broadcasts the head axis)
    latent: str = "none"           # none | q_param: learned queries (H, Lq, D) broadcast over the batch |
    #                                q_expand: the same, expanded to (B, H, Lq, D) | kv_param: k, v (1, H, Lk, D)
    rope: bool = False             # rotary embedding on q and k before the product
    layers: int = 1                # 2: two attention layers, the second reading the first's output
    # q·kᵀ
    qk: str = "matmul"             # see QK_4D / QK_3D
    k_form: str = "transpose"      # see K_FORMS; "pre": k produced as (B, H, D, Lk)
    flat: bool = False             # scores 3-D (B·H, Lq, Lk)
    contig: tuple = ()             # .contiguous() on: q k v s p o
    # scale
    scale_at: str = "s"            # none | q | k | s
    scale_op: str = "mul"          # mul | div
    scale_kind: str = "const"      # const | param | head | buffer | query | dvec | keys (near-miss at s)
    scale_value: float = 0.25
    scale_late: bool = False       # scores scaled after the terms (masks) instead of before
    # score terms, in order: tuples (kind, build, apply)
    terms: tuple = ()
    # softmax
    softmax: str = "method"        # F | torch | method | module
    sm_dim: str = "-1"             # -1 | pos | -2 | 1
    sm_dtype: bool = False
    after: tuple = ()              # ops between softmax and P·v: see AFTER (p_mask: a near-miss)
    leak: str = "none"             # none | scores | probs: another user (near-miss)
    stable: bool = False           # s - s.amax(-1, keepdim=True) before softmax (near-miss)
    # P·v
    pv: str = "matmul"             # see PV_4D / PV_3D
    out: str = "merge"             # raw | merge | proj
    # sdpa
    sdpa_mask: str = "none"        # none | causal_bool | arange_bool | padding_bool | add_inf | add_min | relpos
    #                                | random_bool
    is_causal: bool = False
    pad: str = "right"             # key-padding input: right | left | empty (a sequence of length 0) | random
    sdpa_scale: float | None = None
    gqa: bool = False              # k, v with one head (H = 2): SDPA enable_gqa, or repeated in a chain
    # ctx
    ctx_apply: str = "ctx_qT"      # q_ctx | ctx_qT | factorized

    def __repr__(self) -> str:
        changed = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                   if getattr(self, f.name) != f.default or f.name in ("family", "B", "H", "Lq", "Lk", "D")]
        return f"Prog({', '.join(changed)})"

    def _repr_pretty_(self, printer, cycle) -> None:  # hypothesis prints the short form too
        printer.text(repr(self))


TERMS = ("causal", "causal", "window", "padding", "padding_hf", "random", "relpos", "shift", "const_add", "rsub")
AFTER = ("float", "to", "type_as", "dropout_f", "dropout_m", "dropout_flag", "dropout_eval_p", "contig", "p_mask")
QK_4D = ("matmul", "at", "einsum_std", "einsum_swap", "einsum_blhd", "einsum_blhd_swap", "einsum_kT", "einsum_ij")
QK_3D = ("bmm", "at3", "einsum3", "baddbmm")
PV_4D = ("matmul", "at", "einsum_std", "einsum_blhd", "einsum_ij", "einsum_swap", "bmm_view")
PV_3D = ("bmm", "at3", "einsum3")
K_FORMS = ("transpose", "transpose_pos", "transpose_rev", "permute", "mT", "pre", "direct")
MASK_BUILDS = ("tril", "tril_float", "triu", "arange", "arange_gt", "buffer")
MASK_APPLY = ("fill_not", "fill", "where", "where_t", "add_min", "add_inf", "fill_min", "fill_tensor", "fill_finite")


# ------------------------------------------------------------------------------------------------
# The builder: Prog → (module, inputs)
# ------------------------------------------------------------------------------------------------


def _rand(g: torch.Generator, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


def _given(g: torch.Generator, shape: tuple, strided: str) -> torch.Tensor:
    """A random tensor of ``shape`` stored as ``strided`` says (a view, not a copy)."""
    if strided == "bl_storage" and len(shape) == 4:  # (B, X, Y, Z) seen from (B, Y, X, Z) storage
        return _rand(g, shape[0], shape[2], shape[1], shape[3]).transpose(1, 2)
    if strided == "lastdim":  # last axis has stride != 1
        return _rand(g, *shape[:-2], shape[-1], shape[-2]).transpose(-2, -1)
    if strided == "sliced":
        return _rand(g, *shape[:-1], 2 * shape[-1])[..., ::2]
    return _rand(g, *shape)


class Program(nn.Module):
    """The attention program of a :class:`Prog`; ``forward`` follows its choices step by step."""

    def __init__(self, p: Prog):
        super().__init__()
        self.p = p
        B, H, Lq, Lk, D = p.B, p.H, p.Lq, p.Lk, p.D
        C, Dv = H * D, p.Dv or p.D
        if p.family in ("xca", "ctx"):
            self.qkv = nn.Linear(C, 3 * C)
        elif p.family == "sdpa" or p.source == "linear":
            hkv = 1 if p.gqa else H
            if p.fused_qkv and not p.gqa:
                self.qkv = nn.Linear(C, 3 * C)
            else:
                self.wq, self.wk, self.wv = nn.Linear(C, C), nn.Linear(C, hkv * D), nn.Linear(C, hkv * Dv)
        if p.out == "proj":
            self.proj = nn.Linear(H * Dv, C)
        # scales
        if p.scale_kind == "param":
            self.scale_t = nn.Parameter(torch.tensor(p.scale_value))
        elif p.scale_kind == "buffer":
            self.register_buffer("scale_t", torch.tensor(p.scale_value))
        elif p.scale_kind == "head":
            self.scale_t = nn.Parameter(torch.rand(H, 1, 1) + 0.5)
        elif p.scale_kind == "query":  # per query (on q or the scores), per key on k
            self.scale_t = nn.Parameter(torch.rand(Lk if p.scale_at == "k" else Lq, 1) + 0.5)
        elif p.scale_kind == "dvec":
            self.scale_t = nn.Parameter(torch.rand(D) + 0.5)
        elif p.scale_kind == "keys":
            self.scale_t = nn.Parameter(torch.rand(Lk) + 0.5)
        if p.latent in ("q_param", "q_expand"):
            self.latent = nn.Parameter(torch.randn(H, Lq, D))
        elif p.latent == "kv_param":
            self.mem_k, self.mem_v = nn.Parameter(torch.randn(1, H, Lk, D)), nn.Parameter(torch.randn(1, H, Lk, Dv))
        if p.rope:
            ang = torch.arange(max(Lq, Lk))[:, None] * 10000.0 ** (-torch.arange(D // 2) / (D // 2))[None]
            self.register_buffer("cos", torch.cat([ang.cos(), ang.cos()], -1))
            self.register_buffer("sin", torch.cat([ang.sin(), ang.sin()], -1))
        kinds = {t[0] for t in p.terms}
        if "relpos" in kinds or p.sdpa_mask == "relpos":
            self.rel = nn.Parameter(torch.randn(H, Lq, Lk) * 0.5)
        if "shift" in kinds:  # Swin's 0 / -100 shift mask, one per "window" (batch element here)
            self.register_buffer("shift", (torch.rand(B, Lq, Lk) > 0.7).float() * -100.0)
        if any(t[1:2] == ("buffer",) for t in p.terms):  # GPT-2's causal buffer, sliced
            self.register_buffer("causal_buf", torch.ones(24, 24, dtype=torch.bool).tril()[None, None])
        self.softmax = nn.Softmax(dim=self._sm_dim(3 if p.flat and p.family == "chain" else 4))
        self.drop = nn.Dropout(0.0)

    # -- helpers ---------------------------------------------------------------------------------
    def _sm_dim(self, nd: int) -> int:
        return {"-1": -1, "pos": nd - 1, "-2": -2, "1": 1}[self.p.sm_dim]

    def _repeat(self, x, layout: str, d: int):
        """One head → H heads: ``x[:, :, None].expand(...).reshape(...)`` or ``repeat_interleave``."""
        p = self.p
        B, H, Lk = p.B, p.H, p.Lk
        if p.repeat == "interleave":
            return x.repeat_interleave(H, dim=1 if layout == "bhld" else 2)
        if layout == "bhld":
            return x[:, :, None].expand(B, 1, H, Lk, d).reshape(B, H, Lk, d)
        return x[:, :, :, None].expand(B, Lk, 1, H, d).reshape(B, Lk, H, d)

    def _rope(self, x, layout: str, length: int):
        """Rotary embedding (``x·cos + rotate_half(x)·sin``) along the sequence axis."""
        half = self.p.D // 2
        cos, sin = self.cos[:length], self.sin[:length]
        if layout == "blhd":
            cos, sin = cos[:, None], sin[:, None]
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    def _bhld(self, x):
        return x.transpose(1, 2) if self.p.to_bhld == "transpose" else x.permute(0, 2, 1, 3)

    def _scale_tensor(self, where: str, layout: str):
        """The scale to multiply (or divide) the operand ``where`` by, shaped for its layout."""
        p = self.p
        if p.scale_kind == "const":
            return p.scale_value if p.scale_op == "mul" else 1.0 / p.scale_value
        t = self.scale_t
        if p.scale_kind == "head":
            if layout == "blhd":
                t = t.view(p.H, 1)
            elif layout == "flat":
                t = t.repeat(p.B, 1, 1)
        elif p.scale_kind == "query":
            if layout == "blhd":
                t = t[:, :, None]
        return t

    def _scale(self, x, where: str, layout: str):
        if self.p.scale_at != where:
            return x
        t = self._scale_tensor(where, layout)
        return x * t if self.p.scale_op == "mul" else x / t

    def _mask(self, build: str):
        """A bool mask (Lq, Lk) (or broadcastable): (tensor, True if it marks visible positions)."""
        Lq, Lk = self.p.Lq, self.p.Lk
        i, j = torch.arange(Lq)[:, None], torch.arange(Lk)[None, :]
        if build == "tril":
            return torch.ones(Lq, Lk, dtype=torch.bool).tril(), True
        if build == "tril_float":
            return torch.ones(Lq, Lk).tril() == 1, True
        if build == "triu":
            return torch.triu(torch.ones(Lq, Lk, dtype=torch.bool), diagonal=1), False
        if build == "arange":
            return i >= j, True
        if build == "arange_gt":
            return j > i, False
        if build == "buffer":
            return self.causal_buf[:, :, :Lq, :Lk], True
        if build.startswith("window"):
            return (i - j).abs() <= int(build[6:]), True
        raise ValueError(build)

    def _padding(self, m, build: str):
        B, Lk = self.p.B, self.p.Lk
        if build == "view":
            return m.view(B, 1, 1, Lk)
        if build == "unsqueeze":
            return m.unsqueeze(1).unsqueeze(2)
        return m[:, None, None, :]

    def _apply_mask(self, s, mask, visible: bool, how: str, four_d: bool = False):
        """Apply a bool mask to the scores ``s`` as ``how`` says (``four_d``: the mask is 4-D)."""
        def keep():
            return mask if visible else ~mask

        def hidden():
            return ~mask if visible else mask

        if self.p.flat and four_d:
            mask = mask.expand(self.p.B, self.p.H, -1, -1).reshape(-1, mask.shape[2], mask.shape[3])
        if how == "fill_not":
            return s.masked_fill(~keep(), float("-inf"))
        if how == "fill":
            return s.masked_fill(hidden(), NEG_INF)
        if how == "where":
            return torch.where(keep(), s, NEG_INF)
        if how == "where_t":
            return torch.where(hidden(), torch.tensor(NEG_INF), s)
        if how == "add_min":
            return s + torch.where(keep(), 0.0, torch.finfo(torch.float32).min)
        if how == "add_inf":
            return s + torch.zeros_like(mask, dtype=torch.float32).masked_fill(hidden(), NEG_INF)
        if how == "fill_min":
            return s.masked_fill(hidden(), FMIN)
        if how == "fill_tensor":  # the fill value is a tensor
            return s.masked_fill(hidden(), torch.tensor(NEG_INF))
        if how == "fill_finite":  # near-miss: a finite fill replaces scores
            return s.masked_fill(hidden(), -1e4)
        raise ValueError(how)

    def _flat4(self, t):
        """A (b|1, h|1, lq, lk) term as the flattened scores' (B·H, lq, lk)."""
        return t.expand(self.p.B, self.p.H, t.shape[-2], t.shape[-1]).reshape(-1, t.shape[-2], t.shape[-1])

    def _terms(self, s, extra):
        p = self.p
        for term in p.terms:
            kind = term[0]
            if kind in ("causal", "window"):
                mask, visible = self._mask(term[1])
                s = self._apply_mask(s, mask, visible, term[2], term[1] == "buffer")
            elif kind == "padding":
                s = self._apply_mask(s, self._padding(extra["pad"], term[1]), True, term[2], True)
            elif kind == "padding_hf":  # transformers' (1 - mask) * finfo.min on a long (B, Lk) mask
                add = (1.0 - extra["pad"].long()[:, None, None, :].to(torch.float32)) * FMIN
                s = s + (self._flat4(add) if p.flat else add)
            elif kind == "random":
                s = self._apply_mask(s, extra["rand"], True, term[2], True)
            elif kind == "const_add":  # a Python scalar added to every score (softmax ignores it)
                s = s + 0.75
            elif kind == "rsub":  # near-miss: the scores subtracted from a constant (negated)
                s = 1.0 - s
            elif kind == "relpos":
                s = s + (self.rel.repeat(p.B, 1, 1) if p.flat else self.rel)
            elif kind == "shift":
                if p.flat:
                    s = (s.view(p.B, p.H, p.Lq, p.Lk) + self.shift[:, None]).view(-1, p.Lq, p.Lk)
                else:
                    s = (s.view(1, p.B, p.H, p.Lq, p.Lk) + self.shift[None, :, None]).view(-1, p.H, p.Lq, p.Lk)
            else:
                raise ValueError(kind)
        return s

    def _softmax(self, s):
        p = self.p
        dim = self._sm_dim(3 if p.flat and p.family == "chain" else 4)  # a constant (fx: s.dim() is a Proxy)
        kw = {"dtype": torch.float32} if p.sm_dtype else {}
        if p.softmax == "F":
            return F.softmax(s, dim=dim, **kw)
        if p.softmax == "torch":
            return torch.softmax(s, dim, **kw)
        if p.softmax == "module":
            return self.softmax(s)
        return s.softmax(dim, **kw)

    def _after(self, a, q):
        for op in self.p.after:
            if op == "float":
                a = a.float()
            elif op == "to":
                a = a.to(q.dtype)
            elif op == "type_as":
                a = a.type_as(q)
            elif op == "dropout_f":
                a = F.dropout(a, 0.0, training=False)
            elif op == "dropout_m":
                a = self.drop(a)
            elif op == "dropout_flag":
                a = F.dropout(a, p=0.0, training=self.training)
            elif op == "dropout_eval_p":
                a = F.dropout(a, 0.1, training=False)
            elif op == "contig":
                a = a.contiguous()
            elif op == "p_mask":  # near-miss: probabilities masked after the softmax
                a = a.masked_fill(~torch.ones(self.p.Lq, self.p.Lk, dtype=torch.bool).tril(), 0.0)
        return a

    def _merge(self, o, layout: str):
        p = self.p
        B, H, Lq, D = p.B, p.H, p.Lq, p.Dv or p.D
        if p.out == "raw":
            return o
        if layout == "flat":
            o = o.view(B, H, Lq, D).transpose(1, 2)
        elif layout == "bhld":
            o = o.transpose(1, 2)
        elif layout == "bhdl":
            o = o.permute(0, 3, 1, 2)
        if "o" in p.contig:
            o = o.contiguous()
        o = o.reshape(B, Lq, H * D)
        return self.proj(o) if p.out == "proj" else o

    # -- q, k, v ---------------------------------------------------------------------------------
    def _project(self, x, y):
        """q (B, H, Lq, D) or (B, Lq, H, D) by ``layout``; k as (B, H, D, Lk) when ``k_form == "pre"``."""
        p = self.p
        B, H, D = p.B, p.H, p.D
        hkv = 1 if p.gqa else H
        if hasattr(self, "qkv"):
            q, k, v = self.qkv(x).view(B, p.Lq, 3, H, D).unbind(2) if p.unbind else \
                [self.qkv(x).view(B, p.Lq, 3, H, D)[:, :, i] for i in range(3)]
        else:
            q = self.wq(x).view(B, p.Lq, H, D)
            k, v = self.wk(y).view(B, p.Lk, hkv, D), self.wv(y).view(B, p.Lk, hkv, p.Dv or D)
        if p.k_form == "pre":
            k = k.permute(0, 2, 3, 1)
            if p.layout == "bhld":
                return self._bhld(q), k, self._bhld(v)
            return q, k, v
        if p.layout == "bhld":
            return self._bhld(q), self._bhld(k), self._bhld(v)
        return q, k, v

    def forward(self, i0, i1=None, i2=None, i3=None, i4=None):  # named: fx cannot trace *args
        inputs = [x for x in (i0, i1, i2, i3, i4) if x is not None]
        fam = self.p.family
        if fam == "xca":
            return self._xca(inputs[0])
        if fam == "ctx":
            return self._ctx(inputs[0])
        if fam == "sdpa":
            return self._sdpa(inputs)
        return self._chain(inputs)

    def _split_inputs(self, inputs):
        p = self.p
        extra = {}
        rest = list(inputs)
        if p.source == "linear":
            x = rest.pop(0)
            y = rest.pop(0) if p.Lq != p.Lk else x
            q, k, v = self._project(x, y)
        else:
            q, k, v = rest[:3]
            rest = rest[3:]
        kinds = [t[0] for t in p.terms]
        if "padding" in kinds or "padding_hf" in kinds or p.sdpa_mask == "padding_bool":
            extra["pad"] = rest.pop(0)
        if "random" in kinds or p.sdpa_mask == "random_bool":
            extra["rand"] = rest.pop(0)
        return q, k, v, extra

    # -- family: chain ---------------------------------------------------------------------------
    def _chain(self, inputs):
        p = self.p
        B, H, Lq, Lk, D = p.B, p.H, p.Lq, p.Lk, p.D
        Dv = p.Dv or D
        q, k, v, extra = self._split_inputs(inputs)
        layout = p.layout
        k_layout = "bhdl" if p.k_form == "pre" else layout
        if p.gqa and p.repeat != "broadcast":  # k, v have one head: repeat them as Llama's repeat_kv does
            k, v = self._repeat(k, layout, D), self._repeat(v, layout, Dv)
        if p.latent == "q_param":
            q = self.latent
        elif p.latent == "q_expand":
            q = self.latent.expand(B, H, Lq, D)
        elif p.latent == "kv_param":
            k, v = self.mem_k, self.mem_v
        if p.rope:
            q, k = self._rope(q, layout, Lq), self._rope(k, layout, Lk)
        if p.share == "v_is_k":
            v = k
        elif p.share == "k_is_q":
            k = q
        if p.normalize in ("qk", "q"):
            q = F.normalize(q, dim=-1)
        if p.normalize == "qk":
            k = F.normalize(k, dim=-2 if k_layout == "bhdl" else -1)
        q = self._scale(q, "q", layout)
        if p.scale_at == "k":
            if k_layout == "bhdl":  # scale the (B, H, Lk, D) view, keep (B, H, D, Lk)
                k = self._scale(k.transpose(-2, -1), "k", "bhld").transpose(-2, -1)
            else:
                k = self._scale(k, "k", layout)

        # the forms the products need, made on demand from what we have
        def q4():
            return q if layout == "bhld" else self._bhld(q)

        def q_blhd():
            return q if layout == "blhd" else q.transpose(1, 2)

        def k4():
            if k_layout == "bhdl":
                return k.transpose(-2, -1)
            return k if layout == "bhld" else self._bhld(k)

        def k_blhd():
            return k.permute(0, 3, 1, 2) if k_layout == "bhdl" else (k if layout == "blhd" else k.transpose(1, 2))

        def kT():
            f = p.k_form
            if f == "pre":
                return k
            if f == "direct" and layout == "blhd":
                return k.permute(0, 2, 3, 1)
            kk = k4()
            return {"transpose": lambda: kk.transpose(-2, -1), "transpose_pos": lambda: kk.transpose(2, 3),
                    "transpose_rev": lambda: kk.transpose(-1, -2), "permute": lambda: kk.permute(0, 1, 3, 2),
                    "mT": lambda: kk.mT, "direct": lambda: kk.transpose(-2, -1)}[f]()

        def c(x, name):
            return x.contiguous() if name in p.contig else x

        if p.flat:
            q3 = c(q4().reshape(B * H, Lq, D), "q")
            if p.k_form == "pre":
                kT3 = kT().reshape(B * H, D, Lk)
            else:
                k3 = k4().reshape(B * H, Lk, D)
                kT3 = {"transpose_pos": lambda: k3.transpose(1, 2), "mT": lambda: k3.mT,
                       "permute": lambda: k3.permute(0, 2, 1)}.get(p.k_form, lambda: k3.transpose(-2, -1))()
            kT3 = c(kT3, "k")
            if p.qk == "bmm":
                s = torch.bmm(q3, kT3)
            elif p.qk == "at3":
                s = q3 @ kT3
            elif p.qk == "einsum3":
                s = torch.einsum("bqd,bdk->bqk", q3, kT3)
            else:  # baddbmm, as BLOOM writes it (beta=0: the input is ignored)
                s = torch.baddbmm(torch.zeros(B * H, Lq, Lk), q3, kT3, beta=0.0, alpha=0.5)
            s_layout = "flat"
        else:
            qk = p.qk
            if qk in ("matmul", "at"):
                a, b = c(q4(), "q"), c(kT(), "k")
                s = torch.matmul(a, b) if qk == "matmul" else a @ b
            elif qk == "einsum_std":
                s = torch.einsum("bhqd,bhkd->bhqk", c(q4(), "q"), c(k4(), "k"))
            elif qk == "einsum_swap":
                s = torch.einsum("bhkd,bhqd->bhqk", c(k4(), "k"), c(q4(), "q"))
            elif qk == "einsum_blhd":
                s = torch.einsum("bqhd,bkhd->bhqk", c(q_blhd(), "q"), c(k_blhd(), "k"))
            elif qk == "einsum_blhd_swap":
                s = torch.einsum("bkhd,bqhd->bhqk", c(k_blhd(), "k"), c(q_blhd(), "q"))
            elif qk == "einsum_kT":
                s = torch.einsum("bhqd,bhdk->bhqk", c(q4(), "q"), c(kT(), "k"))
            elif qk == "einsum_ij":
                s = torch.einsum("bhid,bhjd->bhij", c(q4(), "q"), c(k4(), "k"))
            else:
                raise ValueError(qk)
            s_layout = "bhld"
        raw = s
        s = c(s, "s")
        if not p.scale_late:
            s = self._scale(s, "s", s_layout)
        s = self._terms(s, extra)
        if p.scale_late:
            s = self._scale(s, "s", s_layout)
        if p.stable:
            s = s - s.amax(-1, keepdim=True)
        a = self._softmax(s)
        a = self._after(c(a, "p"), q)

        # P·v
        def v4():
            return v if layout == "bhld" else self._bhld(v)

        def v_blhd():
            return v if layout == "blhd" else v.transpose(1, 2)

        if p.flat:
            v3 = c(v4().reshape(B * H, Lk, Dv), "v")
            if p.pv == "bmm":
                o = torch.bmm(a, v3)
            elif p.pv == "at3":
                o = a @ v3
            else:
                o = torch.einsum("bqk,bkd->bqd", a, v3)
            o_layout = "flat"
        else:
            pv, o_layout = p.pv, "bhld"
            if pv == "matmul":
                o = torch.matmul(a, c(v4(), "v"))
            elif pv == "at":
                o = a @ c(v4(), "v")
            elif pv == "einsum_std":
                o = torch.einsum("bhqk,bhkd->bhqd", a, c(v4(), "v"))
            elif pv == "einsum_blhd":
                o, o_layout = torch.einsum("bhqk,bkhd->bqhd", a, c(v_blhd(), "v")), "blhd"
            elif pv == "einsum_ij":
                o = torch.einsum("bhij,bhjd->bhid", a, c(v4(), "v"))
            elif pv == "einsum_swap":
                o = torch.einsum("bhkd,bhqk->bhqd", c(v4(), "v"), a)
            elif pv == "bmm_view":  # near-miss: the probabilities are reshaped before the product
                o = torch.bmm(a.reshape(B * H, Lq, Lk), c(v4(), "v").reshape(B * H, Lk, Dv)).view(B, H, Lq, Dv)
            else:
                raise ValueError(pv)
        out = self._merge(o, o_layout)
        if p.leak == "scores":
            out = out + raw.mean()
        elif p.leak == "probs":
            out = out + a.sum(-1).mean()
        return out

    # -- family: sdpa ----------------------------------------------------------------------------
    def _sdpa(self, inputs):
        p = self.p
        q, k, v, extra = self._split_inputs(inputs)  # bhld
        if p.normalize in ("qk", "q"):
            q = F.normalize(q, dim=-1)
        if p.normalize == "qk":
            k = F.normalize(k, dim=-1)
        q = q.contiguous() if "q" in p.contig else q
        k = k.contiguous() if "k" in p.contig else k
        v = v.contiguous() if "v" in p.contig else v
        i, j = torch.arange(p.Lq)[:, None], torch.arange(p.Lk)[None, :]
        mask = {
            "none": lambda: None,
            "causal_bool": lambda: torch.ones(p.Lq, p.Lk, dtype=torch.bool).tril(),
            "arange_bool": lambda: j <= i,
            "padding_bool": lambda: extra["pad"][:, None, None, :],
            "add_inf": lambda: torch.zeros(p.Lq, p.Lk).masked_fill(j > i, NEG_INF),
            "add_min": lambda: torch.where(j <= i, 0.0, FMIN),
            "relpos": lambda: self.rel[None],
            "random_bool": lambda: extra["rand"],
        }[p.sdpa_mask]()
        kw = {"enable_gqa": True} if p.gqa else {}
        if p.sdpa_scale is not None:
            kw["scale"] = p.sdpa_scale
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=p.is_causal, **kw)
        return self._merge(o, "bhld")

    # -- family: xca (channel attention, XCiT) ---------------------------------------------------
    def _xca(self, x):
        p = self.p
        B, H, N, D = p.B, p.H, p.Lq, p.D
        qkv = self.qkv(x).reshape(B, N, 3, H, D).permute(2, 0, 3, 4, 1)  # (3, B, H, D, N)
        q, k, v = qkv.unbind(0) if p.unbind else (qkv[0], qkv[1], qkv[2])
        if p.normalize in ("qk", "q"):
            q = F.normalize(q, dim=-1)
        if p.normalize == "qk":
            k = F.normalize(k, dim=-1)
        q = q.contiguous() if "q" in p.contig else q
        v = v.contiguous() if "v" in p.contig else v
        kT = {"transpose": lambda: k.transpose(-2, -1), "transpose_pos": lambda: k.transpose(2, 3),
              "permute": lambda: k.permute(0, 1, 3, 2), "mT": lambda: k.mT}.get(p.k_form, lambda: k.transpose(-2, -1))()
        kT = kT.contiguous() if "k" in p.contig else kT
        if p.qk == "einsum_std":
            s = torch.einsum("bhdn,bhen->bhde", q, k)
        else:
            s = q @ kT
        s = self._scale(s, "s", "bhld")
        a = self._after(self._softmax(s), q)
        o = torch.einsum("bhde,bhen->bhdn", a, v) if p.pv == "einsum_std" else a @ v  # (B, H, D, N)
        if p.out == "raw":
            return o
        o = o.permute(0, 3, 1, 2).reshape(B, N, H * D)
        return self.proj(o) if p.out == "proj" else o

    # -- family: ctx (softmax over kᵀ·v, applied to q) ------------------------------------------
    def _ctx(self, x):
        p = self.p
        B, H, N, D = p.B, p.H, p.Lq, p.D
        qkv = self.qkv(x).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, H, N, D) each
        if p.ctx_apply == "factorized":  # Efficient Attention: softmax(q) (softmax_N(k)ᵀ v)
            ctx = k.softmax(dim=-2).transpose(-2, -1) @ v
            o = q.softmax(dim=-1) @ ctx
            layout = "bhld"
        else:
            s = self._scale(k.transpose(-2, -1) @ v, "s", "bhld")  # (B, H, D, D)
            ctx = self._softmax(s)
            if p.ctx_apply == "q_ctx":  # contracts over q's head dim: not standard attention
                o, layout = q @ ctx, "bhld"
            else:  # standard attention with roles (kᵀ, vᵀ, qᵀ): (B, H, D, N)
                o, layout = ctx @ q.transpose(-2, -1), "bhdl"
        if p.out == "raw":
            return o
        o = o.transpose(1, 2) if layout == "bhld" else o.permute(0, 3, 1, 2)
        o = o.reshape(B, N, H * D)
        return self.proj(o) if p.out == "proj" else o


class Stack(nn.Module):
    """Two attention layers (``layers=2``): the second reads the first's output; extra inputs go to both."""

    def __init__(self, p: Prog):
        super().__init__()
        self.first = Program(p)
        torch.manual_seed(p.seed + 1)
        self.second = Program(p)

    def forward(self, i0, i1=None, i2=None):
        return self.second(self.first(i0, i1, i2), i1, i2)


def build(p: Prog) -> tuple[nn.Module, tuple]:
    """The module of ``p`` (eval mode, seeded parameters) and its inputs (seeded)."""
    torch.manual_seed(p.seed)
    module = (Program(p) if p.layers == 1 else Stack(p)).eval()
    g = torch.Generator().manual_seed(p.seed + 1)
    B, H, Lq, Lk, D = p.B, p.H, p.Lq, p.Lk, p.D
    C = H * D
    hkv = 1 if p.gqa else H
    if p.family in ("xca", "ctx"):
        return module, (_given(g, (B, Lq, C), p.strided if p.strided != "bl_storage" else "none"),)
    if p.source == "linear":
        inputs = [_rand(g, B, Lq, C)] + ([_rand(g, B, Lk, C)] if Lq != Lk else [])
    else:
        def shape(length, heads=H, bhdl=False):
            if bhdl:
                return (B, heads, D, length)
            return (B, heads, length, D) if p.layout == "bhld" or p.family == "sdpa" else (B, length, heads, D)
        inputs = [_given(g, shape(Lq), p.strided),
                  _given(g, shape(Lk, hkv, p.k_form == "pre" and p.family == "chain"), p.strided),
                  _given(g, shape(Lk, hkv)[:-1] + (p.Dv or D,), p.strided)]
    kinds = [t[0] for t in p.terms]
    if "padding" in kinds or "padding_hf" in kinds or p.sdpa_mask == "padding_bool":
        lengths = torch.randint(0, Lk + 1, (B,), generator=g)
        lengths[0] = Lk  # the first sequence unpadded
        if p.pad == "empty":
            lengths[-1] = 0  # a sequence with no key (rows that see nothing)
        keep = torch.arange(Lk)[None, :] < lengths[:, None]
        if p.pad == "left":
            keep = keep.flip(-1)
        elif p.pad == "random":
            keep = torch.rand(B, Lk, generator=g) < 0.6
        inputs.append(keep)
    if "random" in kinds or p.sdpa_mask == "random_bool":
        keep = torch.rand(B, 1, Lq, Lk, generator=g) < 0.6
        keep[..., 0] = True  # every row sees a key (fully hidden rows come from padding)
        inputs.append(keep)
    return module, tuple(inputs)


# ------------------------------------------------------------------------------------------------
# The checker
# ------------------------------------------------------------------------------------------------


def rel_err(out: torch.Tensor, ref: torch.Tensor, floor: float = 1e-30) -> float:
    """‖out − ref‖ / max(‖ref‖, floor) in float64, NaN treated as 0 (NaN positions are compared
    separately)."""
    out, ref = out.detach().double().nan_to_num(0.0), ref.detach().double().nan_to_num(0.0)
    return ((out - ref).norm() / ref.norm().clamp_min(floor)).item()


def _differs(out, ref, floor: float = 1e-30) -> str | None:
    """Why ``out`` is not ``ref`` (shape, NaN positions, relative error), or None."""
    if out.shape != ref.shape:
        return f"shape {tuple(out.shape)} != {tuple(ref.shape)}"
    if not torch.equal(out.isnan(), ref.isnan()):
        return f"NaN at different positions ({int(out.isnan().sum())} vs eager {int(ref.isnan().sum())})"
    err = rel_err(out, ref, floor)
    return None if err <= TOL else f"relative error {err:.3g} > {TOL:g} (norm of eager's: {ref.norm():.3g})"


def _leaf(x: torch.Tensor, grad: bool) -> torch.Tensor:
    """A leaf copy of ``x`` with the same sizes and strides (non-contiguous inputs stay so)."""
    if not x.is_floating_point():
        return x
    y = torch.empty_strided(x.size(), x.stride(), dtype=x.dtype).copy_(x)
    return y.requires_grad_(grad)


def check(module: nn.Module, inputs: tuple, capture: str = "dynamo", grad: bool = False, strategy: str = "auto") -> str:
    """Run ``module`` eagerly and through ``attncomp.optimize``; assert the fuzzer's property.

    ``inputs``: the module's positional inputs (float tensors of any strides; bool masks). With
    ``grad``, the gradients of the float inputs and of the parameters are compared too (when a site
    was replaced and eager's output is finite). Returns the sites' statuses (for statistics)."""
    torch._dynamo.reset()  # every example compiles afresh (one forward code object, many programs)
    module.eval()
    ref_in = [_leaf(x, grad) for x in inputs]
    fast_in = [_leaf(x, grad) for x in inputs]
    with torch.set_grad_enabled(grad):
        ref = module(*ref_in)
        fast = attncomp.optimize(module, strategy, capture=capture, verify=False)  # the matcher and kernels themselves
        out = fast(*fast_in)
    rep = attncomp.explain(fast)
    table = str(rep)
    if capture == "dynamo":
        assert rep.graphs >= 1, f"Dynamo compiled no graph:\n{table}"
    for r in rep.rows:
        if r.status not in ("replaced", "kept", "left") or (r.status != "replaced" and not str(r.reason).strip()):
            raise AssertionError(f"a site with status {r.status!r} and reason {r.reason!r}:\n{table}")
    status = "+".join(sorted(r.status for r in rep.rows)) or "none"
    why = _differs(out, ref)
    if why is not None:
        if not rep.rows or rep.replaced:
            raise AssertionError(f"optimized output differs from eager: {why}\n{table}")
        return status
    if grad and rep.replaced and torch.isfinite(ref).all():
        params = [t for t in module.parameters() if t.requires_grad]
        ref_leaves = [x for x in ref_in if x.requires_grad] + params
        fast_leaves = [x for x in fast_in if x.requires_grad] + params
        g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7))
        want = torch.autograd.grad(ref, ref_leaves, g, allow_unused=True)
        got = torch.autograd.grad(out, fast_leaves, g, allow_unused=True)
        names = [f"input {i}" for i, x in enumerate(ref_in) if x.requires_grad]
        names += [n for n, t in module.named_parameters() if t.requires_grad]
        exact = None
        for i, (name, a, b, leaf) in enumerate(zip(names, got, want, ref_leaves)):
            a = torch.zeros_like(leaf) if a is None else a
            b = torch.zeros_like(leaf) if b is None else b
            why = _differs(a, b, GRAD_FLOOR)
            if why is None:
                continue
            # A parameter's gradient sums many products, and float32 cancellation in it can exceed TOL
            # with no bug: then the optimized gradient must be as close to eager's float64 gradient
            # as eager's float32 one is, within a factor ROUNDING.
            exact = _grads64(module, inputs, g) if exact is None else exact
            if exact and a.shape == b.shape and torch.equal(a.isnan(), b.isnan()):
                e_fast, e_eager = rel_err(a, exact[i], GRAD_FLOOR), rel_err(b, exact[i], GRAD_FLOOR)
                if e_fast <= max(TOL, ROUNDING * e_eager):
                    continue
                why += f"; against float64: {e_fast:.3g}, eager float32's own: {e_eager:.3g}"
            raise AssertionError(f"gradient of {name} differs from eager: {why}\n{table}")
    return status


def _grads64(module: nn.Module, inputs: tuple, g: torch.Tensor) -> list | None:
    """Eager's gradients (float inputs, then parameters) computed in float64, or None if the module
    cannot run in float64."""
    try:
        m64 = copy.deepcopy(module).double()
        xs = [x.detach().double().requires_grad_() if x.is_floating_point() else x for x in inputs]
        leaves = [x for x in xs if isinstance(x, torch.Tensor) and x.requires_grad]
        leaves += [t for t in m64.parameters() if t.requires_grad]
        got = torch.autograd.grad(m64(*xs), leaves, g.double(), allow_unused=True)
        return [torch.zeros_like(t) if d is None else d for d, t in zip(got, leaves)]
    except Exception:  # noqa: BLE001 - a program written for float32 only: no float64 judgement
        return None


# ------------------------------------------------------------------------------------------------
# The strategy: draw a Prog
# ------------------------------------------------------------------------------------------------


def _subset(draw, items: tuple, max_size: int = 2) -> tuple:
    return tuple(draw(st.lists(st.sampled_from(items), max_size=max_size, unique=True)))


@st.composite
def programs(draw) -> Prog:
    family = draw(st.sampled_from(["chain"] * 5 + ["sdpa", "sdpa", "xca", "xca", "ctx"]))
    B, H = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    Lq = draw(st.integers(1, 24))
    cross = family in ("chain", "sdpa") and draw(st.booleans())
    Lk = draw(st.integers(1, 24)) if cross else Lq
    D = draw(st.sampled_from([1, 2, 3, 4, 8, 8, 16, 16]))
    capture = draw(st.sampled_from(["dynamo"] * 4 + ["fx"]))
    kw = dict(family=family, B=B, H=H, Lq=Lq, Lk=Lk, D=D, capture=capture, seed=draw(st.integers(0, 2**16)))
    kw["softmax"] = draw(st.sampled_from(["F", "torch", "method", "module"]))
    kw["sm_dim"] = draw(st.sampled_from(["-1"] * 5 + ["pos"] * 3 + ["-2", "1"]))
    kw["sm_dtype"] = draw(st.booleans())
    kw["after"] = _subset(draw, AFTER[:-1] * 3 + AFTER[-1:])  # the near-miss (p_mask) rarely
    kw["out"] = draw(st.sampled_from(["raw", "merge", "merge", "proj"]))
    kw["normalize"] = draw(st.sampled_from(["none", "none", "qk", "q"])) if D > 1 else "none"  # D = 1: ±1
    if family in ("chain", "sdpa"):
        kw["Dv"] = draw(st.sampled_from([0, 0, 0, 4, 5]))

    def scale(at_choices):
        at = draw(st.sampled_from(at_choices))
        kw["scale_at"] = at
        if at == "none":
            return
        kw["scale_op"] = draw(st.sampled_from(["mul", "div"]))
        kinds = ["const", "const", "param", "head", "buffer", "query"]
        if at in ("q", "k"):
            kinds += ["dvec"]  # on k, "query" is a per-key (Lk, 1) scale before the product
        else:
            kinds += ["keys"]  # near-miss: varies along keys
        kw["scale_kind"] = draw(st.sampled_from(kinds))
        kw["scale_value"] = draw(st.sampled_from([D ** -0.5, 0.25, 1.0, 2.0, -0.5]))

    if family == "chain":
        kw["source"] = draw(st.sampled_from(["linear", "given"]))
        kw["layout"] = draw(st.sampled_from(["bhld", "blhd"]))
        kw["to_bhld"] = draw(st.sampled_from(["transpose", "permute"]))
        if kw["source"] == "given":
            kw["strided"] = draw(st.sampled_from(["none", "bl_storage", "lastdim", "sliced"]))
        else:
            kw["fused_qkv"] = not cross and draw(st.booleans())
            kw["unbind"] = capture == "dynamo" and draw(st.booleans())
        kw["flat"] = draw(st.sampled_from([False, False, True]))
        kw["qk"] = draw(st.sampled_from(QK_3D if kw["flat"] else QK_4D))
        kw["pv"] = draw(st.sampled_from(PV_3D if kw["flat"] else PV_4D))
        kw["k_form"] = draw(st.sampled_from(K_FORMS))
        kw["contig"] = _subset(draw, ("q", "k", "v", "s", "p", "o"))
        scale(["none", "q", "k", "s", "s", "s"])
        kw["scale_late"] = draw(st.sampled_from([False, False, True]))
        terms = []
        for _ in range(draw(st.integers(0, 2))):
            kind = draw(st.sampled_from(TERMS))
            apply = draw(st.sampled_from(MASK_APPLY))
            if kind == "causal":
                terms.append((kind, draw(st.sampled_from(MASK_BUILDS)), apply))
            elif kind == "window":
                terms.append((kind, f"window{draw(st.integers(0, 6))}", apply))
            elif kind == "padding":
                terms.append((kind, draw(st.sampled_from(["none4", "view", "unsqueeze"])), apply))
            elif kind == "random":
                terms.append((kind, "input", apply))
            else:
                terms.append((kind,))
        kw["terms"] = tuple(terms)
        kw["leak"] = draw(st.sampled_from(["none"] * 8 + ["scores", "probs"]))
        kw["stable"] = draw(st.sampled_from([False] * 8 + [True]))
        if H == 2 and kw["k_form"] != "pre" and draw(st.sampled_from([False, False, True])):
            kw["gqa"], kw["fused_qkv"] = True, False
            kw["repeat"] = draw(st.sampled_from(["expand", "interleave"]))
        kw["share"] = draw(st.sampled_from(["none"] * 6 + ["v_is_k", "k_is_q"]))
        if kw["share"] == "v_is_k":
            kw["Dv"] = 0
            kw["k_form"] = "transpose" if kw["k_form"] == "pre" else kw["k_form"]
        if kw["share"] == "k_is_q" and (cross or kw.get("gqa") or kw["k_form"] == "pre"):
            kw["share"] = "none"
        if kw["source"] == "linear" and not cross and draw(st.sampled_from([False] * 5 + [True])):
            kw["layers"], kw["out"] = 2, "proj"
        plain = (kw["layout"] == "bhld" and not kw["flat"] and kw["qk"] in ("matmul", "at")
                 and kw["pv"] in ("matmul", "at") and kw["share"] == "none")
        if kw.get("gqa") and plain and draw(st.booleans()):
            kw["repeat"] = "broadcast"
        if kw["layout"] == "bhld" and kw["share"] == "none":
            kw["latent"] = draw(st.sampled_from(["none"] * 6 + ["q_expand"] + (
                ["q_param", "kv_param"] if plain and not kw.get("gqa") and kw["k_form"] in (
                    "transpose", "transpose_rev", "mT") else [])))
        kw["rope"] = D % 2 == 0 and kw["k_form"] != "pre" and draw(st.sampled_from([False] * 4 + [True]))
    elif family == "sdpa":
        kw["source"] = draw(st.sampled_from(["linear", "given"]))
        if kw["source"] == "given":
            kw["strided"] = draw(st.sampled_from(["none", "bl_storage", "lastdim", "sliced"]))
        else:
            kw["fused_qkv"] = not cross and draw(st.booleans())
            kw["unbind"] = capture == "dynamo" and draw(st.booleans())
        kw["to_bhld"] = draw(st.sampled_from(["transpose", "permute"]))
        kw["contig"] = _subset(draw, ("q", "k", "v", "o"))
        kw["sdpa_mask"] = draw(st.sampled_from(["none", "none", "causal_bool", "arange_bool", "padding_bool",
                                                "add_inf", "add_min", "relpos", "random_bool"]))
        kw["is_causal"] = kw["sdpa_mask"] == "none" and draw(st.booleans())
        kw["sdpa_scale"] = draw(st.sampled_from([None, None, 0.3, 1.0]))
        kw["gqa"] = H == 2 and kw["source"] == "linear" and draw(st.booleans())
        if kw["gqa"]:
            kw["fused_qkv"] = False
    elif family == "xca":
        kw["unbind"] = capture == "dynamo" and draw(st.booleans())
        kw["normalize"] = draw(st.sampled_from(["qk", "qk", "q", "none"])) if Lq > 1 else "none"
        kw["after"] = tuple(a for a in kw["after"] if a != "p_mask")
        kw["k_form"] = draw(st.sampled_from(["transpose", "transpose_pos", "permute", "mT"]))
        kw["qk"] = draw(st.sampled_from(["matmul", "einsum_std"]))
        kw["pv"] = draw(st.sampled_from(["matmul", "einsum_std"]))
        kw["contig"] = _subset(draw, ("q", "k", "v"))
        scale(["s", "s", "none"])
        if kw.get("scale_kind") in ("query", "keys"):
            kw["scale_kind"] = "head"
    else:
        kw["ctx_apply"] = draw(st.sampled_from(["q_ctx", "ctx_qT", "factorized"]))
        scale(["s", "none"])
        if kw.get("scale_kind") in ("query", "keys"):
            kw["scale_kind"] = "const"
    if capture == "fx":
        kw["unbind"] = False
    if kw.get("fused_qkv"):
        kw["Dv"] = 0
    if any(t[0].startswith("padding") for t in kw.get("terms", ())) or kw.get("sdpa_mask") == "padding_bool":
        kw["pad"] = draw(st.sampled_from(["right", "left", "empty", "random"]))
    return Prog(**kw)


def _run(p: Prog, grad: bool) -> None:
    # SDPA programs ask for the dense kernel: under "auto" a call without a mask is kept as it is
    status = check(*build(p), capture=p.capture, grad=grad, strategy="dense" if p.family == "sdpa" else "auto")
    event(f"{p.family}: {status}")


@settings(QUICK, max_examples=DEFAULT_EXAMPLES)
@given(p=programs(), grad=st.sampled_from([False, False, True]))
def test_fuzz_matcher(p, grad):
    _run(p, grad)


@pytest.mark.slow
@settings(PROFILE, max_examples=SLOW_EXAMPLES)
@given(p=programs(), grad=st.sampled_from([False, False, True]))
def test_fuzz_matcher_slow(p, grad):
    _run(p, grad)


# ------------------------------------------------------------------------------------------------
# Named regression tests: each form written out plainly, forward and backward
# ------------------------------------------------------------------------------------------------

B, H, N, D = 2, 2, 12, 8
C = H * D


class Fn(nn.Module):
    """``fn(self, *inputs)`` with a qkv projection, an output projection and a per-head temperature."""

    def __init__(self, fn, heads: int = H, dim: int = C):
        super().__init__()
        torch.manual_seed(0)
        self.fn, self.heads = fn, heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.temperature = nn.Parameter(torch.rand(heads, 1, 1) + 0.5)
        self.rel = nn.Parameter(torch.randn(heads, N, N) * 0.5)
        self.softmax = nn.Softmax(dim=-1)
        self.register_buffer("causal", torch.ones(24, 24, dtype=torch.bool).tril()[None, None])  # GPT-2's

    def forward(self, *inputs):
        return self.fn(self, *inputs)


def xca(m, x):
    """XCiT's cross-covariance attention: (B, H, D, N) operands, D×D scores."""
    B_, N_, C_ = x.shape
    qkv = m.qkv(x).reshape(B_, N_, 3, m.heads, C_ // m.heads).permute(2, 0, 3, 4, 1)
    q, k, v = qkv.unbind(0)
    q = F.normalize(q, dim=-1)
    k = F.normalize(k, dim=-1)
    attn = (q @ k.transpose(-2, -1)) * m.temperature
    attn = attn.softmax(dim=-1)
    return m.proj((attn @ v).permute(0, 3, 1, 2).reshape(B_, N_, C_))


def xca_no_normalize(m, x):
    B_, N_, C_ = x.shape
    q, k, v = m.qkv(x).reshape(B_, N_, 3, m.heads, C_ // m.heads).permute(2, 0, 3, 4, 1).unbind(0)
    attn = (q @ k.transpose(-2, -1) * 0.1).softmax(dim=-1)
    return (attn @ v).permute(0, 3, 1, 2).reshape(B_, N_, C_)


def xca_contiguous(m, x):
    """XCA with contiguous (B, H, D, N) operands: isolates the layout from the channel form."""
    B_, N_, C_ = x.shape
    q, k, v = m.qkv(x).reshape(B_, N_, 3, m.heads, C_ // m.heads).permute(2, 0, 3, 4, 1).contiguous().unbind(0)
    q, k = F.normalize(q, dim=-1).contiguous(), F.normalize(k, dim=-1).contiguous()
    attn = ((q @ k.transpose(-2, -1)) * m.temperature).softmax(dim=-1)
    return (attn @ v).permute(0, 3, 1, 2).reshape(B_, N_, C_)


def _bhnd(m, x):
    B_, N_, C_ = x.shape
    return m.qkv(x).reshape(B_, N_, 3, m.heads, C_ // m.heads).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, D)


def _merge(o):
    return o.transpose(1, 2).reshape(o.shape[0], o.shape[2], -1)


def channel_context_applied_to_qT(m, x):
    """ctx = softmax(kᵀ v) (D×D); out = ctx @ qᵀ: standard attention with roles (kᵀ, vᵀ, qᵀ)."""
    q, k, v = _bhnd(m, x)
    ctx = (k.transpose(-2, -1) @ v * 0.2).softmax(dim=-1)
    o = ctx @ q.transpose(-2, -1)  # (B, H, D, N)
    return o.permute(0, 3, 1, 2).reshape(x.shape)


def channel_context_applied_as_q_ctx(m, x):
    """out = q @ softmax(kᵀ v): contracts the softmax's query axis with q's head dim (not attention)."""
    q, k, v = _bhnd(m, x)
    ctx = (k.transpose(-2, -1) @ v * 0.2).softmax(dim=-1)
    return _merge(q @ ctx)


def factorized_attention(m, x):
    """Efficient Attention: softmax over q's features and over k's tokens (not attention)."""
    q, k, v = _bhnd(m, x)
    return _merge(q.softmax(-1) @ (k.softmax(-2).transpose(-2, -1) @ v))


def k_given_pretransposed(m, x):
    """k produced directly as (B, H, D, N)."""
    B_, N_, C_ = x.shape
    q, k, v = m.qkv(x).reshape(B_, N_, 3, m.heads, C_ // m.heads).unbind(2)
    q, k, v = q.transpose(1, 2), k.permute(0, 2, 3, 1), v.transpose(1, 2)
    return _merge(((q @ k) * 0.3).softmax(-1) @ v)


def einsum(spec_qk, spec_pv, q_blhd=False, k_first=False, v_blhd=False):
    def fn(m, x):
        B_, N_, C_ = x.shape
        q, k, v = m.qkv(x).reshape(B_, N_, 3, m.heads, C_ // m.heads).unbind(2)  # (B, N, H, D)
        q4, k4, v4 = (t if b else t.transpose(1, 2) for t, b in ((q, q_blhd), (k, q_blhd), (v, v_blhd)))
        s = torch.einsum(spec_qk, k4, q4) if k_first else torch.einsum(spec_qk, q4, k4)
        o = torch.einsum(spec_pv, (s * 0.3).softmax(-1), v4)
        return o.reshape(B_, N_, C_) if spec_pv.endswith("qhd") else _merge(o)
    return fn


def chain(kt, scale_at="s", dim=-1, softmax="method"):
    """Standard attention with kᵀ written as ``kt(k)``, the scale on q / k / scores, a softmax spelling."""
    def fn(m, x):
        q, k, v = _bhnd(m, x)
        if scale_at == "q":
            q = q * D ** -0.5
        if scale_at == "k":
            k = k / math.sqrt(D)
        s = q @ kt(k)
        if scale_at == "s":
            s = s * m.temperature
        if softmax == "F":
            p = F.softmax(s, dim=dim)
        elif softmax == "torch-f32":
            p = torch.softmax(s, dim, dtype=torch.float32).to(q.dtype)
        elif softmax == "module":
            p = m.softmax(s)
        else:
            p = s.softmax(dim)
        return _merge(F.dropout(p, 0.0, training=False) @ v)
    return fn


def masked(how):
    def fn(m, x, pad):
        q, k, v = _bhnd(m, x)
        s = q @ k.transpose(-2, -1) * D ** -0.5
        i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
        causal = torch.ones(N, N, dtype=torch.bool).tril()
        if how == "masked_fill_triu":
            s = s.masked_fill(torch.triu(torch.ones(N, N, dtype=torch.bool), 1), float("-inf"))
        elif how == "masked_fill_not_tril":
            s = s.masked_fill(~causal, float("-inf"))
        elif how == "where_arange":
            s = torch.where(j <= i, s, float("-inf"))
        elif how == "additive_finfo_min":
            s = s + torch.where(causal, 0.0, torch.finfo(s.dtype).min)
        elif how == "window":
            s = s.masked_fill((i - j).abs() > 3, float("-inf"))
        elif how == "key_padding":
            s = s.masked_fill(~pad[:, None, None, :], float("-inf"))
        elif how == "relpos_bias":
            s = s + m.rel
        elif how == "relpos_and_causal":
            s = (s + m.rel).masked_fill(~causal, float("-inf"))
        return _merge(s.softmax(-1) @ v)
    return fn


def two_masks(how):
    """Two mask terms, one after the other, as older transformers models write causal + key padding
    (``pad``: (B, N) bool, True = keep; the regression inputs pad the second sequence on the left)."""
    def fn(m, x, pad):
        q, k, v = _bhnd(m, x)
        fmin = torch.finfo(torch.float32).min
        causal = torch.ones(N, N, dtype=torch.bool).tril()
        hf_padding = (1.0 - pad[:, None, None, :].float()) * fmin  # (B, 1, 1, N)
        if how == "window_inf_hf_padding_more_queries_than_keys":  # N queries, 4 keys: far rows see none
            k, v, hf_padding = k[:, :, :4], v[:, :, :4], hf_padding[..., :4]
            i, j = torch.arange(N)[:, None], torch.arange(4)[None, :]
            window = torch.zeros(N, 4).masked_fill((i - j).abs() > 2, float("-inf"))
        s = q @ k.transpose(-2, -1) * D ** -0.5
        if how == "causal_inf_hf_padding":
            s = s.masked_fill(~causal, float("-inf")) + hf_padding
        elif how == "causal_min_hf_padding":  # GPT-2's legacy eager attention
            s = torch.where(causal, s, fmin) + hf_padding
        elif how == "window_inf_hf_padding_more_queries_than_keys":
            s = s + hf_padding + window
        elif how == "negative_scale_after_additive_mask":
            s = (s + torch.where(causal, 0.0, fmin)) * -0.5
        return _merge(s.softmax(-1) @ v)
    return fn


def causal_buffer_first_query(m, x):
    """GPT-2's causal buffer sliced to one query, ``bias[:, :, :1, :N]``: only key 0 is visible."""
    q, k, v = _bhnd(m, x)
    s = (q[:, :, :1] @ k.transpose(-2, -1)).masked_fill(~m.causal[:, :, :1, :N], float("-inf"))
    return _merge(s.softmax(-1) @ v)


def additive_min_mask_row_hidden_value_dim_differs(m, x, keep):
    """An additive ``finfo.min`` mask given as a tensor hides every key of one query; v's head dim (5)
    differs from q's and k's (8)."""
    q, k, v = _bhnd(m, x)
    s = q @ k.transpose(-2, -1) + torch.where(keep, 0.0, torch.finfo(torch.float32).min)
    return _merge(s.softmax(-1) @ v[..., :5])


def hf_padding_empty_sequence(m, x, pad):
    """transformers' additive key padding; the regression inputs give one sequence no key at all."""
    q, k, v = _bhnd(m, x)
    s = q @ k.transpose(-2, -1) * D ** -0.5 + (1.0 - pad[:, None, None, :].float()) * torch.finfo(torch.float32).min
    return _merge(s.softmax(-1) @ v)


def scaled(how):
    def fn(m, x):
        q, k, v = _bhnd(m, x)
        s = q @ k.transpose(-2, -1)
        if how == "param_scalar":
            s = s * m.temperature[0, 0, 0]
        elif how == "per_head_div":
            s = s / m.temperature
        elif how == "tensor_temperature":
            s = s / torch.tensor(float(D)).sqrt()
        elif how == "varying_along_keys":  # near-miss: not a softmax temperature
            s = s * torch.linspace(0.5, 1.5, N)
        elif how == "varying_along_queries":
            s = s * torch.linspace(0.5, 1.5, N)[:, None]
        return _merge(s.softmax(-1) @ v)
    return fn


def sdpa(transposed: str, **kw):
    def fn(m, x, pad):
        B_, N_, C_ = x.shape
        q, k, v = m.qkv(x).reshape(B_, N_, 3, m.heads, C_ // m.heads).unbind(2)  # (B, N, H, D)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # non-contiguous (B, H, N, D)
        if transposed == "lastdim":  # (B, H, N, D) views whose last axis is not contiguous
            q, k, v = (t.transpose(-2, -1).contiguous().transpose(-2, -1) for t in (q, k, v))
        mask = kw.get("attn_mask")
        if mask == "key_padding":
            mask = pad[:, None, None, :]
        elif mask == "float_causal":
            mask = torch.zeros(N, N).masked_fill(~torch.ones(N, N, dtype=torch.bool).tril(), float("-inf"))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=kw.get("is_causal", False),
                                           scale=kw.get("scale"))
        return _merge(o)
    return fn


def noncontiguous_qkv_input(layout):
    """q, k, v given as inputs (views of other storage)."""
    def fn(m, q, k, v):
        return (q @ k.transpose(-2, -1) * 0.3).softmax(-1) @ v
    return fn


REGRESSIONS = {
    "channel_attention_xca_no_normalize": (xca_no_normalize, ()),
    "channel_attention_xca_contiguous": (xca_contiguous, ()),
    "factorized_attention": (factorized_attention, ()),
    "k_given_pretransposed": (k_given_pretransposed, ()),
    "kT_transpose_pos": (chain(lambda k: k.transpose(2, 3)), ()),
    "kT_permute": (chain(lambda k: k.permute(0, 1, 3, 2)), ()),
    "kT_mT": (chain(lambda k: k.mT), ()),
    "kT_transpose_contiguous": (chain(lambda k: k.transpose(-2, -1).contiguous()), ()),
    "scale_on_q": (chain(lambda k: k.transpose(-2, -1), scale_at="q"), ()),
    "scale_on_k_div": (chain(lambda k: k.transpose(-2, -1), scale_at="k"), ()),
    "softmax_dim_3": (chain(lambda k: k.transpose(-2, -1), dim=3), ()),
    "softmax_F": (chain(lambda k: k.mT, softmax="F"), ()),
    "softmax_float32_cast": (chain(lambda k: k.mT, softmax="torch-f32"), ()),
    "softmax_module": (chain(lambda k: k.mT, softmax="module"), ()),
    "softmax_dim_minus2": (chain(lambda k: k.transpose(-2, -1), dim=-2), ()),
    "softmax_dim_1": (chain(lambda k: k.transpose(-2, -1), dim=1), ()),
    "einsum_bhqd_bhkd": (einsum("bhqd,bhkd->bhqk", "bhqk,bhkd->bhqd"), ()),
    "einsum_operands_swapped": (einsum("bhkd,bhqd->bhqk", "bhqk,bhkd->bhqd", k_first=True), ()),
    "einsum_blhd": (einsum("bqhd,bkhd->bhqk", "bhqk,bkhd->bqhd", q_blhd=True, v_blhd=True), ()),
    "mask_masked_fill_triu": (masked("masked_fill_triu"), ("pad",)),
    "mask_masked_fill_not_tril": (masked("masked_fill_not_tril"), ("pad",)),
    "mask_where_arange": (masked("where_arange"), ("pad",)),
    "mask_additive_finfo_min": (masked("additive_finfo_min"), ("pad",)),
    "mask_sliding_window": (masked("window"), ("pad",)),
    "mask_key_padding": (masked("key_padding"), ("pad",)),
    "relpos_bias": (masked("relpos_bias"), ("pad",)),
    "relpos_bias_and_causal": (masked("relpos_and_causal"), ("pad",)),
    "causal_inf_and_hf_padding_left": (two_masks("causal_inf_hf_padding"), ("pad_left",)),
    "causal_min_and_hf_padding_left": (two_masks("causal_min_hf_padding"), ("pad_left",)),
    "window_inf_and_hf_padding_more_queries_than_keys": (
        two_masks("window_inf_hf_padding_more_queries_than_keys"), ("pad",)),
    "negative_scale_after_additive_mask": (two_masks("negative_scale_after_additive_mask"), ("pad",)),
    "causal_buffer_first_query": (causal_buffer_first_query, ()),
    "additive_min_mask_row_hidden_value_dim_differs": (additive_min_mask_row_hidden_value_dim_differs, ("keep",)),
    "hf_padding_empty_sequence": (hf_padding_empty_sequence, ("pad_empty",)),
    "scale_param_scalar": (scaled("param_scalar"), ()),
    "scale_per_head_div": (scaled("per_head_div"), ()),
    "scale_tensor_temperature": (scaled("tensor_temperature"), ()),
    "scale_varying_along_keys": (scaled("varying_along_keys"), ()),
    "scale_varying_along_queries": (scaled("varying_along_queries"), ()),
    "sdpa_transposed_inputs": (sdpa("bl"), ("pad",)),
    "sdpa_transposed_causal_scale": (sdpa("bl", is_causal=True, scale=0.2), ("pad",)),
    "sdpa_key_padding_bool": (sdpa("bl", attn_mask="key_padding"), ("pad",)),
    "sdpa_float_causal_mask": (sdpa("bl", attn_mask="float_causal"), ("pad",)),
    "sdpa_lastdim_noncontiguous": (sdpa("lastdim"), ("pad",)),
    "qkv_inputs_bl_storage": (noncontiguous_qkv_input("bl_storage"), ("bl_storage",)),
    "qkv_inputs_lastdim_noncontiguous": (noncontiguous_qkv_input("lastdim"), ("lastdim",)),
    "qkv_inputs_sliced": (noncontiguous_qkv_input("sliced"), ("sliced",)),
}


def _regression_inputs(extra: tuple) -> tuple:
    g = torch.Generator().manual_seed(1)
    if extra and extra[0] in ("bl_storage", "lastdim", "sliced"):
        return tuple(_given(g, (B, H, N, D), extra[0]) for _ in range(3))
    x = _rand(g, B, N, C)
    if extra in (("pad",), ("pad_left",), ("pad_empty",)):
        pad = torch.ones(B, N, dtype=torch.bool)
        pad[1, 0 if extra == ("pad_empty",) else N // 2:] = False  # right padding (or none left)
        return x, (pad.flip(-1) if extra == ("pad_left",) else pad)
    if extra == ("keep",):
        keep = torch.rand(B, 1, N, N, generator=g) > 0.3
        keep[1, 0, 2] = False  # query 2 of the second sequence sees no key
        return x, keep
    return (x,)


@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("name", list(REGRESSIONS))
def test_form(name, grad):
    fn, extra = REGRESSIONS[name]
    check(Fn(fn), _regression_inputs(extra), grad=grad)


@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "bwd"])
def test_channel_attention_xca(grad):
    check(Fn(xca), _regression_inputs(()), grad=grad)


@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "bwd"])
def test_channel_context_applied_to_qT(grad):
    check(Fn(channel_context_applied_to_qT), _regression_inputs(()), grad=grad)


@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "bwd"])
def test_channel_context_applied_as_q_ctx(grad):
    check(Fn(channel_context_applied_as_q_ctx), _regression_inputs(()), grad=grad)


# ------------------------------------------------------------------------------------------------
# Survey: python tests/test_fuzz_matcher.py [N]
# ------------------------------------------------------------------------------------------------


def survey(n: int) -> list:
    """Draw ``n`` programs and run each, collecting failures instead of stopping at the first."""
    failures: list = []

    @settings(QUICK, max_examples=n)
    @given(p=programs(), grad=st.sampled_from([False, False, True]))
    def run(p, grad):
        try:
            check(*build(p), capture=p.capture, grad=grad)
        except Exception as e:  # noqa: BLE001 - a survey records every failure
            failures.append((p, grad, f"{type(e).__name__}: {str(e).splitlines()[0]}", str(e)))

    run()
    return failures


if __name__ == "__main__":
    found = survey(int(sys.argv[1]) if len(sys.argv) > 1 else 200)
    for p, grad, head, _ in found:
        print(f"{p!r}  grad={grad}\n    {head}")
    print(f"{len(found)} failing programs")
