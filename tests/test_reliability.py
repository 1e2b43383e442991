"""Reliability: bad input gets a clear error, odd input (empty, strided, expanded, NaN) a defined
result, faults (failing kernels, broken cache files, a process killed mid-write) never a wrong or
lost result. The README's "Reliability" table lists what each test here checks."""

import json
import math
import os
import subprocess
import sys
import textwrap
import types
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attncomp
import attncomp.ops as O
from attncomp import ir
from attncomp.masks import blocks
from attncomp.runtime import autotune, codegen, validate
from conftest import rel_err

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def triton_cpu():
    """Run the generated Triton kernels on CPU tensors (Triton's interpreter)."""
    attncomp.set_kernels("triton")
    yield
    attncomp.set_kernels(None)


@pytest.fixture(params=["torch", "triton"])
def kernels(request):
    """Both executors: the CPU torch executor and the generated Triton kernels (interpreted)."""
    attncomp.set_kernels(request.param)
    yield request.param
    attncomp.set_kernels(None)


def reference(q, k, v, keep=None, scale=None):
    """Float64 masked attention; q (B, Hq, Lq, D), k/v (B, Hkv, Lk, D*); a row with no visible key → 0."""
    g = q.shape[1] // k.shape[1]
    q, k, v = q.double(), k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if keep is not None:
        s = s.masked_fill(~keep, -math.inf)
    p = torch.softmax(s, -1)
    return torch.where(torch.isnan(p) & torch.isneginf(s).all(-1, keepdim=True), 0.0, p) @ v


def qkv(B=2, Hq=4, Hkv=2, Lq=16, Lk=16, D=8, Dv=None, dtype=torch.float32):
    return (torch.randn(B, Hq, Lq, D, dtype=dtype), torch.randn(B, Hkv, Lk, D, dtype=dtype),
            torch.randn(B, Hkv, Lk, D if Dv is None else Dv, dtype=dtype))


# ------------------------------------------------------------------------------------------------
# 1. Bad input: a clear error naming the argument and the expected form
# ------------------------------------------------------------------------------------------------

q0, k0, v0 = qkv()
BAD_ATTENTION = {
    "q-not-a-tensor": (dict(q=[[1.0]]), TypeError, ["q must be a torch.Tensor", "list"]),
    "q-3d": (dict(q=q0[0]), ValueError, ["q must be 4-D (B, H, L, D)", "(4, 16, 8)"]),
    "int-inputs": (dict(q=q0.long(), k=k0.long(), v=v0.long()), TypeError,
                   ["q must be a floating-point tensor", "torch.int64"]),
    "bool-v": (dict(v=v0 > 0), TypeError, ["v must be a floating-point tensor", "torch.bool"]),
    "dtype-mismatch": (dict(k=k0.double()), TypeError,
                       ["same dtype", "q is torch.float32", "k is torch.float64"]),
    "device-mismatch": (dict(k=k0.to("meta")), ValueError, ["same device", "k on meta"]),
    "head-dim-mismatch": (dict(k=torch.randn(2, 2, 16, 4)), ValueError,
                          ["q and k must have the same head dim (last axis)", "q is (2, 4, 16, 8)",
                           "k is (2, 2, 16, 4)"]),
    "batch-mismatch": (dict(k=torch.randn(3, 2, 16, 8), v=torch.randn(3, 2, 16, 8)), ValueError,
                       ["same batch size (axis 0)"]),
    "kv-length-mismatch": (dict(v=torch.randn(2, 2, 15, 8)), ValueError,
                           ["k and v must have the same number of heads (axis 1) and length (axis 2)",
                            "v is (2, 2, 15, 8)"]),
    "hq-not-multiple-of-hkv": (dict(k=torch.randn(2, 3, 16, 8), v=torch.randn(2, 3, 16, 8)), ValueError,
                               ["multiple of key/value heads (GQA)", "q has 4", "have 3"]),
    "zero-head-dim": (dict(q=torch.randn(2, 4, 16, 0), k=torch.randn(2, 2, 16, 0)), ValueError,
                      ["head dim (last axis) >= 1"]),
    "keep-float": (dict(keep=torch.ones(2, 1, 1, 16)), TypeError, ["keep must be a bool tensor", "torch.float32"]),
    "keep-wrong-shape": (dict(keep=torch.ones(2, 1, 1, 15, dtype=torch.bool)), ValueError,
                         ["keep of shape (2, 1, 1, 15) does not broadcast to (B, Hq, Lq, Lk) = (2, 4, 16, 16)"]),
    "keep-5d": (dict(keep=torch.ones(1, 2, 1, 1, 16, dtype=torch.bool)), ValueError, ["more than 4 dims"]),
    "keep-broadcasts-up": (dict(keep=torch.ones(2, 4, 2, 16, 16, dtype=torch.bool)[0]), ValueError,
                           ["keep of shape (4, 2, 16, 16) does not broadcast"]),
    "bias-int": (dict(bias=torch.zeros(2, 1, 1, 16, dtype=torch.long)), TypeError,
                 ["bias must be a floating-point tensor", "torch.int64"]),
    "bias-wrong-shape": (dict(bias=torch.zeros(16, 17)), ValueError, ["bias of shape (16, 17) does not broadcast"]),
    "bias-device": (dict(bias=torch.zeros(16, 16, device="meta")), ValueError, ["bias must be on q's device"]),
    "mask-tensor": (dict(mask=torch.ones(16, 16, dtype=torch.bool)), TypeError, ["mask must be an attncomp.ir mask"]),
    "scale-nan": (dict(scale=math.nan), ValueError, ["scale must be finite"]),
    "scale-string": (dict(scale="0.1"), TypeError, ["scale must be a number"]),
    "softcap-negative": (dict(softcap=-1.0), ValueError, ["softcap must be a number >= 0"]),
}


@pytest.mark.parametrize("case", list(BAD_ATTENTION))
def test_attention_rejects_bad_input_with_a_clear_message(case):
    change, error, fragments = BAD_ATTENTION[case]
    args = dict(q=q0, k=k0, v=v0) | change
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(error) as info:
        O.attention(q, k, v, **args)
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {str(info.value)!r}"


def test_head_dim_over_the_kernel_maximum(triton_cpu):
    """The Triton kernels take head dims up to validate.MAX_HEAD_DIM; above it a clear error (the torch
    executor has no such limit and computes the exact result)."""
    q, k, v = qkv(B=1, Hq=1, Hkv=1, D=validate.MAX_HEAD_DIM + 8)
    with pytest.raises(ValueError, match=r"head dim 264 of q and k \(last axis\) exceeds 256"):
        O.attention(q, k, v)
    with pytest.raises(ValueError, match=r"head dim 264 of v .* exceeds 256"):
        O.attention(*qkv(B=1, Hq=1, Hkv=1, D=16, Dv=264))
    with pytest.raises(ValueError, match="exceeds 256"):
        torch.ops.attncomp.dense_fwd(q, k, v, None, 0.1, None, 0.0)
    attncomp.set_kernels("torch")
    assert rel_err(O.attention(q, k, v), reference(q, k, v)) <= 1e-5


BAD_OTHER = {
    "linear-int": (lambda: O.linear_attention(q0.long(), q0.long(), q0.long()), TypeError,
                   ["linear_attention: q must be a floating-point tensor"]),
    "linear-gqa": (lambda: O.linear_attention(q0, k0, v0), ValueError,
                   ["linear_attention: q, k and v must have the same number of heads (axis 1)"]),
    "linear-lengths": (lambda: O.linear_attention(q0, q0[:, :, :8], q0[:, :, :8]), ValueError,
                       ["same length (axis 2)"]),
    "linear-chunk": (lambda: O.linear_attention(q0, q0, q0, causal=True, chunk=0), ValueError, ["chunk must be >= 1"]),
    "linear-decay-int": (lambda: O.linear_attention(q0, q0, q0, causal=True, decay=torch.ones(4, dtype=torch.long)),
                         ValueError, ["decay must be a float tensor of shape (H,) = (4,)"]),
    "neighborhood-spatial": (lambda: O.neighborhood_attention(torch.randn(1, 8, 8, 2, 8), torch.randn(1, 8, 7, 2, 8),
                                                              torch.randn(1, 8, 8, 2, 8), 3), ValueError,
                             ["same batch and spatial extents (B, *spatial, H, D)", "k is (1, 8, 7, 2, 8)"]),
    "neighborhood-head-dim": (lambda: O.neighborhood_attention(torch.randn(1, 8, 8, 2, 8), torch.randn(1, 8, 8, 2, 4),
                                                               torch.randn(1, 8, 8, 2, 8), 3), ValueError,
                              ["same head dim (last axis)", "given as (B, *spatial, H, D)"]),
    "neighborhood-int": (lambda: O.neighborhood_attention(*(torch.ones(1, 8, 8, 2, 8, dtype=torch.int32),) * 3, 3),
                         TypeError, ["q must be a floating-point tensor"]),
    "neighborhood-2d-input": (lambda: O.neighborhood_attention(q0[0, 0], q0[0, 0], q0[0, 0], 3), ValueError,
                              ["q must be (B, *spatial, H, D) with 1-3 spatial axes"]),
    "block-window": (lambda: O.block_attention(*(torch.randn(1, 8, 8, 2, 8),) * 3, 3), ValueError,
                     ["multiples of the window"]),
    "grid-not-tensor": (lambda: O.grid_attention(None, None, None, 2), TypeError, ["q must be a torch.Tensor"]),
    "routed-region": (lambda: O.routed_attention(q0, k0, v0, region=0), ValueError, ["region must be >= 1"]),
    "routed-dtype": (lambda: O.routed_attention(q0, k0.half(), v0), TypeError, ["same dtype"]),
    "dense-op-int": (lambda: torch.ops.attncomp.dense_fwd(q0.int(), k0.int(), v0.int(), None, 0.1, None, 0.0),
                     TypeError, ["dense_fwd: q must be a floating-point tensor"]),
    "dense-op-bias": (lambda: torch.ops.attncomp.dense_fwd(q0, k0, v0, torch.zeros(3, 16), 0.1, None, 0.0),
                      ValueError, ["dense_fwd: bias of shape (3, 16) does not broadcast"]),
}


@pytest.mark.parametrize("case", list(BAD_OTHER))
def test_other_ops_reject_bad_input_with_a_clear_message(case):
    call, error, fragments = BAD_OTHER[case]
    with pytest.raises(error) as info:
        call()
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {str(info.value)!r}"


# ------------------------------------------------------------------------------------------------
# Zero-size, strided and expanded inputs: defined results, never an error or a crash
# ------------------------------------------------------------------------------------------------

EMPTY = {"Lq0": dict(Lq=0), "Lk0": dict(Lk=0), "B0": dict(B=0), "Lq0-Lk0": dict(Lq=0, Lk=0), "Dv0": dict(Dv=0)}


@pytest.mark.parametrize("case", list(EMPTY))
def test_zero_size_inputs_have_defined_results(kernels, case):
    """B, Hq or Lq = 0: an empty output; Lk = 0: zeros (no key to attend to), as torch's SDPA gives;
    gradients are zeros. The dense op, masked attention and routing agree."""
    q, k, v = qkv(**EMPTY[case])
    for t in (q, k, v):
        t.requires_grad_()
    want = F.scaled_dot_product_attention(q.detach(), *(t.detach().repeat_interleave(2, 1) for t in (k, v)))
    outs = {"attention": O.attention(q, k, v), "causal": O.attention(q, k, v, ir.Causal(0)),
            "keep": O.attention(q, k, v, keep=torch.ones(k.shape[2], dtype=torch.bool)),
            "dense_fwd": torch.ops.attncomp.dense_fwd(q, k, v, None, 0.3, None, 0.0)[0],
            "routed": O.routed_attention(q, k, v, region=16)}
    for name, out in outs.items():
        assert out.shape == want.shape and torch.equal(out, want.zero_()), name
        grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
        assert all(g is None or (g.shape == t.shape and not g.any()) for g, t in zip(grads, (q, k, v))), name


def test_linear_attention_zero_length(kernels):
    x = torch.randn(2, 4, 0, 8)
    for causal in (False, True):
        out = O.linear_attention(x, x, torch.randn(2, 4, 0, 5), causal=causal)
        assert out.shape == (2, 4, 0, 5)


def _strided_variants(q, k, v):
    """The same values as q, k, v in other layouts: (B, L, H, D) storage seen as (B, H, L, D), a
    batch-expanded (stride 0) k / v, and slices of a larger tensor."""
    B, Hkv, Lk, D = k.shape
    blhd = tuple(t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    k1, v1 = k[:1], v[:1]
    expanded = (q, k1.expand(B, Hkv, Lk, D), v1.expand(B, Hkv, Lk, v.shape[-1]))
    sliced = tuple(torch.cat([t, torch.randn_like(t)], -1)[..., :t.shape[-1]] for t in (q, k, v))
    return {"blhd": blhd, "expanded": expanded, "sliced": sliced}


@pytest.mark.parametrize("mask", [None, ir.Causal(0), ir.Window(3, 3)], ids=["full", "causal", "window"])
def test_non_contiguous_and_expanded_inputs_are_handled(kernels, mask):
    q, k, v = qkv(B=2, Hq=2, Hkv=1, Lq=32, Lk=32, D=16)
    keep = None if mask is None else blocks.dense_keep(mask.expr(), 32, 32, q.device)
    causal = 0 if isinstance(mask, ir.Causal) else None
    for name, (qq, kk, vv) in _strided_variants(q, k, v).items():
        assert rel_err(O.attention(qq, kk, vv, mask), reference(qq, kk, vv, keep)) <= 1e-5, name
        dense, _ = torch.ops.attncomp.dense_fwd(qq, kk, vv, None, 16 ** -0.5, causal, 0.0)
        assert rel_err(dense, reference(qq, kk, vv, keep if causal == 0 else None)) <= 1e-5, name
    # gradients flow back into each layout (an expanded k gets the sum over the batch it was expanded to)
    qq, kk, vv = _strided_variants(q, k, v)["expanded"]
    k1 = kk[:1].detach().clone().requires_grad_()
    qg = qq.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    out = O.attention(qg, k1.expand_as(kk), vv, mask)
    gq, gk = torch.autograd.grad(out.sum(), (qg, k1))
    q64, k64 = qg.detach().double().requires_grad_(), k1.detach().double().requires_grad_()
    rq, rk = torch.autograd.grad(reference(q64, k64.expand_as(kk), vv, keep).sum(), (q64, k64))
    assert gq.shape == qg.shape and gk.shape == k1.shape
    assert rel_err(gq, rq) <= 1e-4 and rel_err(gk, rk) <= 1e-4


@pytest.mark.parametrize("keep", [False, True], ids=["no-mask", "key-padding"])
def test_regression_gqa_inference_with_query_independent_visibility(keep):
    """Regression (found here): the CPU executor's fused inference path built its mask with one row when
    visibility did not depend on the query (no mask, key padding) and failed under GQA."""
    q, k, v = qkv(B=2, Hq=4, Hkv=2, Lq=16, Lk=24)
    kp = torch.ones(2, 1, 1, 24, dtype=torch.bool)
    kp[1, ..., 20:] = False
    with torch.no_grad():
        out = O.attention(q, k, v, keep=kp if keep else None)
    assert rel_err(out, reference(q, k, v, kp if keep else None)) <= 1e-5


# ------------------------------------------------------------------------------------------------
# NaN / Inf: propagate as through the eager site
# ------------------------------------------------------------------------------------------------


class SdpaSite(nn.Module):
    """One attention site: plain, causal (is_causal) or a softmax chain with a causal mask filled with
    ``fill`` (``"-inf"`` or ``"min"`` = finfo.min)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, q, k, v):
        if self.kind == "plain":
            return F.scaled_dot_product_attention(q, k, v)
        if self.kind == "causal":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        L = q.shape[-2]
        hidden = torch.ones(L, L, dtype=torch.bool, device=q.device).triu(1)
        fill = -math.inf if self.kind == "chain-inf" else torch.finfo(q.dtype).min
        s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        return torch.softmax(s.masked_fill(hidden, fill), -1) @ v


@pytest.mark.parametrize("kind", ["plain", "causal", "chain-inf", "chain-min"])
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_nan_and_inf_propagate_like_the_eager_site(kernels, kind, where):
    """NaN / Inf in q (any row) or in keys / values the queries see (NaN in key 0, seen by every query
    under the causal mask; Inf in key 1) give NaN / Inf in exactly the outputs where eager has them, and
    the same finite values elsewhere."""
    q, k, v = (torch.randn(1, 2, 32, 16) for _ in range(3))
    site = SdpaSite(kind)
    fast = attncomp.optimize(site, "dense", example_inputs=(q, k, v))  # SDPA calls without a mask: asked for
    x = {"q": q, "k": k, "v": v}[where]
    x[0, 0, 5 if where == "q" else 0, 3] = math.nan
    x[0, 1, 5 if where == "q" else 1, 1] = math.inf
    if where == "q":
        x[0, 1, 9, 0] = -math.inf
    out, ref = fast(q, k, v), site(q, k, v)
    assert attncomp.explain(fast).replaced, "the site must run on attncomp"
    assert not torch.isfinite(ref).all()
    assert_same_values(out, ref, 1e-5)


def assert_same_values(out, ref, tol):
    """NaN, +Inf and -Inf at the same places; finite values within relative error ``tol``."""
    for name, pick in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        assert torch.equal(pick(out), pick(ref)), f"{name} at different places"
    fin = torch.isfinite(ref)
    assert rel_err(out[fin], ref[fin]) <= tol


# ------------------------------------------------------------------------------------------------
# Numerics edges: additive masks (finfo.min vs -inf, bf16) and fully masked rows, as eager
# ------------------------------------------------------------------------------------------------


class MaskedSite(nn.Module):
    """A site with a run-time mask: ``form`` = chain-masked_fill-(min|inf), chain-additive-(min|inf)
    (a float mask added to the scores), sdpa-bool, sdpa-additive-(min|inf)."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form

    def forward(self, q, k, v, keep):
        fill = torch.finfo(q.dtype).min if self.form.endswith("min") else -math.inf
        additive = torch.zeros(keep.shape, dtype=q.dtype).masked_fill(~keep, fill)
        if self.form == "sdpa-bool":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        if self.form.startswith("sdpa-additive"):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=additive)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        s = s.masked_fill(~keep, fill) if "masked_fill" in self.form else s + additive
        return torch.softmax(s.float(), -1).to(q.dtype) @ v


FORMS = ["chain-masked_fill-min", "chain-masked_fill-inf", "chain-additive-min", "chain-additive-inf", "sdpa-bool",
         "sdpa-additive-min", "sdpa-additive-inf"]


@pytest.mark.parametrize("strategy", ["auto", "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("form", FORMS)
def test_fully_masked_rows_and_additive_masks_match_eager(form, dtype, strategy):
    """Rows with every key masked give what the eager site gives — the mean of v (finfo.min fills: all
    scores equal), NaN (-inf fills through softmax) or zeros (torch SDPA) — and other rows agree."""
    q, k, v = (torch.randn(2, 2, 24, 16).to(dtype) for _ in range(3))
    keep = torch.rand(2, 1, 24, 24) > 0.4
    keep[0, 0, 3] = False  # fully masked rows
    keep[1, 0, 10] = False
    site = MaskedSite(form)
    fast = attncomp.optimize(site, strategy, example_inputs=(q, k, v, keep))
    out, ref = fast(q, k, v, keep), site(q, k, v, keep)
    rep = attncomp.explain(fast)
    # an SDPA call handed a whole mask tensor (no structure to prove) is kept under auto: nothing to gain
    assert rep.kept if strategy == "auto" and form.startswith("sdpa") else rep.replaced, str(rep)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_same_values(out, ref, tol)
    for b, i in ((0, 3), (1, 10)):  # the fully masked rows, one more time, explicitly
        row, want = out[b, :, i], ref[b, :, i]
        assert torch.equal(row.isnan(), want.isnan()) and rel_err(row.nan_to_num(), want.nan_to_num()) <= tol


@pytest.mark.parametrize("kind", ["causal", "chain-inf"])
def test_regression_row_whose_only_score_is_minus_inf(kernels, kind):
    """Regression (found here): torch's fused CPU kernel gave a row whose visible scores are all -inf
    (here from -Inf data) lse 0 instead of -inf, so the site could not tell it apart and returned 0
    where the eager softmax chain gives NaN (SDPA gives 0)."""
    q, k, v = (torch.randn(1, 2, 32, 16) for _ in range(3))
    q[0, 0, 0, 0], k[0, 0, 0, 0] = 1.0, -math.inf  # query 0 sees key 0 only, with score -inf
    site = SdpaSite(kind)
    fast = attncomp.optimize(site, example_inputs=(q, k, v))
    out, ref = fast(q, k, v), site(q, k, v)
    assert bool(ref[0, 0, 0].isnan().all()) == (kind == "chain-inf")
    assert_same_values(out, ref, 1e-5)
    _, lse = torch.ops.attncomp.dense_fwd(q, k, v, None, 0.25, 0, 0.0)
    assert lse[0, 0, 0] == -math.inf


# ------------------------------------------------------------------------------------------------
# 2. Faults: a failing generated kernel → that site runs eager (one warning, explain says so)
# ------------------------------------------------------------------------------------------------


class TwoSites(nn.Module):
    """Two attention sites: a plain softmax chain (dense strategy) and a sliding window (local, block-sparse)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, q, k, v):
        a = torch.softmax((q @ k.transpose(-1, -2)) * 0.25, -1) @ v
        L = q.shape[-2]
        i = torch.arange(L, device=q.device)
        window = (i[:, None] - i[None, :]).abs() <= 8
        return self.proj(a + F.scaled_dot_product_attention(q, k, v, attn_mask=window))


class ChainedSites(nn.Module):
    """The second site's query is the first site's output."""

    def forward(self, q, k, v):
        a = F.scaled_dot_product_attention(q, k, v)
        return F.scaled_dot_product_attention(a, k, v, is_causal=True)


def test_regression_chained_sites_are_both_replaced():
    model = ChainedSites()
    q, k, v = (torch.randn(1, 2, 32, 16) for _ in range(3))
    fast = attncomp.optimize(model, "dense", example_inputs=(q, k, v))  # asked for: SDPA calls replaced
    assert len(attncomp.explain(fast).replaced) == 2
    assert rel_err(fast(q, k, v), model(q, k, v)) <= 1e-5


def _failing_codegen(kind: str):
    """A stand-in for codegen.load_kernel_module: raises (compile failure) or returns a module whose
    kernels raise when launched."""

    def compile_fails(*args, **kwargs):
        raise RuntimeError("simulated compile failure")

    class Kernel:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise RuntimeError("simulated launch failure")
            return launch

    def launch_fails(*args, **kwargs):
        return types.SimpleNamespace(attn_fwd=Kernel(), attn_bwd_preprocess=Kernel(), attn_bwd_dkdv=Kernel(),
                                     attn_bwd_dq=Kernel())

    return compile_fails if kind == "compile" else launch_fails


@pytest.mark.parametrize("kind", ["compile", "launch"])
def test_failing_kernel_falls_back_to_eager_per_site(triton_cpu, monkeypatch, kind):
    """Every site's generated kernel fails (codegen raises, or the launch raises): each site runs its
    eager computation from then on with one warning, explain shows why, the output equals eager."""
    model = TwoSites().eval()
    q, k, v = (torch.randn(1, 2, 32, 16) for _ in range(3))
    fast = attncomp.optimize(model, example_inputs=(q, k, v), strategy="local")  # 32 keys: auto runs it dense
    assert [r.strategy for r in attncomp.explain(fast).replaced] == ["dense", "local"]
    monkeypatch.setattr(codegen, "load_kernel_module", _failing_codegen(kind))
    q, k, v = (torch.randn(1, 2, 32, 16) for _ in range(3))
    with pytest.warns(UserWarning) as caught:
        out = fast(q, k, v)
    ours = [str(w.message) for w in caught if f"simulated {kind} failure" in str(w.message)]
    assert len(ours) == 2, ours  # one per site
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning: the sites stay on their eager path
        out2 = fast(q, k, v)
    ref = model(q, k, v)
    assert rel_err(out, ref) <= 1e-6 and torch.equal(out, out2)
    report = attncomp.explain(fast)
    assert all(f"simulated {kind} failure" in r.kernel.fallback_reason for r in report.replaced)
    assert str(report).count("runs eager at call time: the fused kernel failed") == 2


class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x):
        return self.mha(x, x, x, need_weights=False)[0]


def test_failing_kernel_in_multihead_attention_falls_back(triton_cpu, monkeypatch):
    model = SelfAttention().eval()
    x = torch.randn(2, 24, 16)
    fast = attncomp.optimize(model, example_inputs=(x,))
    assert attncomp.explain(fast).replaced
    monkeypatch.setattr(codegen, "load_kernel_module", _failing_codegen("compile"))
    with pytest.warns(UserWarning, match="simulated compile failure"):
        out = fast(x)
    assert rel_err(out, model(x)) <= 1e-5
    assert "runs eager at call time" in str(attncomp.explain(fast))


def test_failing_kernel_in_a_direct_op_raises(triton_cpu, monkeypatch):
    """A direct op has no eager site to fall back to: the error reaches the caller (never a silent,
    wrong result)."""
    monkeypatch.setattr(codegen, "load_kernel_module", _failing_codegen("compile"))
    with pytest.raises(RuntimeError, match="simulated compile failure"):
        O.attention(*qkv(), ir.Causal(0))


# ------------------------------------------------------------------------------------------------
# Faults: cache files that are corrupt, truncated, foreign, from another version or unwritable
# ------------------------------------------------------------------------------------------------


def _tune(key: int) -> dict:
    """One tuning through the public entry point: two candidates, the second one fails."""

    def bench(cfg):
        if cfg["x"] == 2:
            raise RuntimeError("candidate 2 does not compile")

    return autotune.choose("reliability_test", {"key": key}, autotune.bucket(L=100), [{"x": 1}, {"x": 2}], bench,
                           {"x": 0})


def _valid_cache(path: Path, keys=(1,)) -> bytes:
    for key in keys:
        _tune(key)
    autotune.reset()
    return path.read_bytes()


BROKEN_CACHES = {
    "corrupt": lambda p: p.write_bytes(b"\x00\xff\xfe not json at all"),
    "truncated": lambda p: p.write_bytes(_valid_cache(p, (1, 2))[:150]),
    "empty": lambda p: p.write_bytes(b""),
    "other-version": lambda p: p.write_text(json.dumps({"format": autotune.FORMAT, "version": 999, "entries": []})),
    "malformed-entries": lambda p: p.write_text(json.dumps({"format": autotune.FORMAT,
                                                            "version": autotune.FORMAT_VERSION,
                                                            "entries": [1, {"kernel": "x"}, None]})),
}


@pytest.mark.parametrize("case", list(BROKEN_CACHES))
def test_broken_autotune_cache_is_ignored_with_one_warning_and_replaced(tune_env, case):
    BROKEN_CACHES[case](tune_env)
    autotune.reset()
    with pytest.warns(RuntimeWarning, match=str(tune_env.name)) as caught:
        assert _tune(7) == {"x": 1}
        assert _tune(8) == {"x": 1}
    assert len([w for w in caught if "autotune" in str(w.message)]) == 1, [str(w.message) for w in caught]
    data = json.loads(tune_env.read_text())  # rewritten as a valid cache holding the new entries
    assert {e["signature"]["key"] for e in data["entries"]} >= {7, 8}


def test_foreign_file_at_the_cache_path_is_never_overwritten(tune_env):
    tune_env.write_text('{"someone": "else"}')
    with pytest.warns(RuntimeWarning, match="not an attncomp autotune cache"):
        assert _tune(1) == {"x": 1}
    assert tune_env.read_text() == '{"someone": "else"}'


@pytest.mark.parametrize("case", ["parent-is-a-file", "path-is-a-directory"])
def test_unwritable_autotune_cache_keeps_results_in_memory(tmp_path, tune_env, monkeypatch, case):
    if case == "parent-is-a-file":
        (tmp_path / "blocker").write_text("a file, not a directory")
        path = tmp_path / "blocker" / "autotune.json"
    else:
        path = tmp_path / "a-directory"
        path.mkdir()
    monkeypatch.setenv("ATTNCOMP_AUTOTUNE_CACHE", str(path))
    with pytest.warns(RuntimeWarning, match="a-directory|blocker"):
        assert _tune(1) == {"x": 1}
        assert _tune(1) == {"x": 1}
    assert autotune.STATS["tuned"] == 1 and autotune.STATS["hit"] == 1  # kept in memory


def test_corrupt_autotune_cache_does_not_change_results(tune_env, monkeypatch):
    """End to end: masked attention tunes its tile sizes on CPU; a corrupt cache file is reported and
    the result is still exact."""
    tune_env.write_text('{"format": "attncomp-autotune", "version": 1, "entries": [')
    q, k, v = qkv(Lq=48, Lk=48)
    with pytest.warns(RuntimeWarning, match="ignoring cache file"):
        out = O.attention(q, k, v, ir.Window(4, 4))
    assert autotune.STATS["tuned"] >= 1
    assert rel_err(out, reference(q, k, v, blocks.dense_keep(ir.Window(4, 4).expr(), 48, 48, "cpu"))) <= 1e-5


@pytest.fixture
def kernel_dir(tmp_path, monkeypatch):
    """A private kernel cache directory, nothing memoised, warnings state reset."""
    monkeypatch.setenv("ATTNCOMP_CACHE_DIR", str(tmp_path / "kernels"))
    monkeypatch.setattr(codegen, "_MODULES", {})
    monkeypatch.setattr(codegen, "_WARNED", set())
    monkeypatch.setattr(codegen, "_FALLBACK", {})
    return tmp_path / "kernels"


def _kernel_path(directory: Path, template: str, **flags) -> tuple[Path, str]:
    import hashlib

    source = codegen.render(template, **flags)
    return directory / f"{template}_{hashlib.sha256(source.encode()).hexdigest()[:16]}.py", source


FEATURE_FLAGS = dict(FEATURE="relu", UPCAST_DOT=False)  # the small linear-attention chain-rule kernel


@pytest.mark.parametrize("case", ["truncated", "not-utf8", "other-version"])
def test_broken_kernel_cache_file_is_rewritten_with_one_warning(triton_cpu, kernel_dir, case):
    path, source = _kernel_path(kernel_dir, "linear_bwd", **FEATURE_FLAGS)
    kernel_dir.mkdir(parents=True)
    path.write_bytes({"truncated": source.encode()[: len(source) // 2], "not-utf8": b"\xff\xfe\x00garbage",
                      "other-version": source.replace("tl.", "tl_old.").encode()}[case])
    with pytest.warns(RuntimeWarning, match="kernel cache file") as caught:
        module = codegen.load_kernel_module("linear_bwd", **FEATURE_FLAGS)
    assert len([w for w in caught if "attncomp codegen" in str(w.message)]) == 1
    assert path.read_text() == source and hasattr(module, "feature_grad")
    x, d = torch.randn(100), torch.randn(100)
    from attncomp.strategies.linear import launcher as triton_linear
    assert torch.equal(triton_linear.feature_grad(x, d, "relu"), d * (x > 0))


def test_unwritable_kernel_cache_dir_falls_back_to_a_temporary_one(triton_cpu, kernel_dir, tmp_path, monkeypatch):
    (tmp_path / "blocker").write_text("a file, not a directory")
    monkeypatch.setenv("ATTNCOMP_CACHE_DIR", str(tmp_path / "blocker" / "kernels"))
    q, k, v = qkv(Lq=32, Lk=32)
    with pytest.warns(RuntimeWarning, match="cannot create the kernel cache directory"):
        out = O.attention(q, k, v, ir.Causal(0))
    keep = blocks.dense_keep(ir.Causal(0).expr(), 32, 32, "cpu")
    assert rel_err(out, reference(q, k, v, keep)) <= 1e-5
    assert any(codegen._FALLBACK["dir"].glob("sparse_fwd_*.py"))


# ------------------------------------------------------------------------------------------------
# Faults: a process killed while writing a cache file leaves the previous valid file
# ------------------------------------------------------------------------------------------------

KILL_WHILE_WRITING = textwrap.dedent("""
    import builtins, io, os, signal, sys

    when = sys.argv[1]

    def die():
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    class HalfThenDie:
        # a file whose first write() puts half its text on disk, then the process is killed
        def __init__(self, fh):
            self.fh = fh
        def write(self, text):
            self.fh.write(text[: len(text) // 2])
            self.fh.flush()
            os.fsync(self.fh.fileno())
            die()
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            return self.fh.__exit__(*exc)
        def __getattr__(self, name):
            return getattr(self.fh, name)

    def wrap(opener):
        def patched(file, mode="r", *args, **kwargs):
            fh = opener(file, mode, *args, **kwargs)
            writing = isinstance(mode, str) and any(c in mode for c in "wax+")
            return HalfThenDie(fh) if writing and when == "mid-write" else fh
        return patched

    builtins.open = io.open = wrap(io.open)
    os.fdopen = wrap(os.fdopen)
    if when == "before-rename":
        os.replace = os.rename = lambda *a, **k: die()

    target = sys.argv[2]
    if target == "autotune":
        from attncomp.runtime import autotune
        autotune.choose("reliability_test", {"key": 99}, {"L": 128}, [{"x": 1}], lambda cfg: None, {"x": 0})
    else:
        from attncomp.runtime import codegen
        codegen.load_kernel_module("linear_bwd", FEATURE="relu", UPCAST_DOT=False)
    print("finished without being killed")
""")


def _run_killed(target: str, when: str, env: dict) -> None:
    proc = subprocess.run([sys.executable, "-c", KILL_WHILE_WRITING, when, target], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    assert proc.returncode == -9, (proc.returncode, proc.stdout, proc.stderr[-2000:])


@pytest.mark.parametrize("when", ["mid-write", "before-rename"])
def test_killed_while_writing_the_tune_cache_leaves_the_previous_file(tune_env, when):
    before = _valid_cache(tune_env, (1,))
    _run_killed("autotune", when, {"ATTNCOMP_AUTOTUNE": "1", "ATTNCOMP_AUTOTUNE_CACHE": str(tune_env),
                                   "ATTNCOMP_AUTOTUNE_QUIET": "1"})
    assert tune_env.read_bytes() == before
    autotune.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the file is valid: no warning, entry 1 is a hit
        assert _tune(1) == {"x": 1} and autotune.STATS["hit"] == 1
        _tune(2)  # and the lock the killed process held is free: this write goes through
    assert {e["signature"]["key"] for e in json.loads(tune_env.read_text())["entries"]} == {1, 2}


@pytest.mark.parametrize("when", ["mid-write", "before-rename"])
def test_killed_while_writing_a_kernel_leaves_no_partial_file(triton_cpu, kernel_dir, when):
    path, source = _kernel_path(kernel_dir, "linear_bwd", **FEATURE_FLAGS)
    kernel_dir.mkdir(parents=True)
    path.write_text("# the previous file\n")
    _run_killed("codegen", when, {"ATTNCOMP_CACHE_DIR": str(kernel_dir), "TRITON_INTERPRET": "1"})
    assert path.read_text() == "# the previous file\n"  # untouched: never half of the new source
    with pytest.warns(RuntimeWarning, match="does not hold the source"):
        codegen.load_kernel_module("linear_bwd", **FEATURE_FLAGS)
    assert path.read_text() == source


@pytest.mark.parametrize("causal", [None, 0], ids=["bias", "bias+causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["f32", "bf16", "f64"])
def test_regression_dense_op_lse_of_rows_with_no_visible_key(dtype, causal):
    """Regression (found by tests/test_hypothesis.py): torch's fused CPU kernel returns lse 0, not
    -inf, for a row whose additive mask hides every key, so sites could not tell the row was empty."""
    q, k, v = qkv(B=1, Hq=2, Hkv=1, Lq=6, Lk=6, dtype=dtype)
    bias = torch.zeros(1, 1, 6, 6, dtype=dtype)
    bias[..., 2, :] = -math.inf  # row 2 sees nothing
    bias[..., 4, 0] = -math.inf  # with the causal mask, row 0 ... row 4 still sees keys 1-4
    bias[..., 0, 0] = -math.inf  # with the causal mask, row 0 sees nothing either
    out, lse = torch.ops.attncomp.dense_fwd(q, k, v, bias, 0.5, causal, 0.0)
    empty = torch.tensor([True, False, True, False, False, False]) if causal == 0 else \
        torch.tensor([False, False, True, False, False, False])
    assert torch.equal(torch.isneginf(lse[0, 0]), empty) and not out[0, :, empty].any()


def test_regression_float64_gradients_of_the_dense_op():
    """Regression (found by tests/test_hypothesis.py): the CPU backward passed the float32 lse to torch's
    fused float64 backward kernel (RuntimeError); float64 gradients are now float64-accurate."""
    q, k, v = (t.requires_grad_() for t in qkv(B=1, Hq=2, Hkv=1, Lq=12, Lk=9, dtype=torch.float64))
    out, _ = torch.ops.attncomp.dense_fwd(q, k, v, None, 0.4, None, 0.0)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(reference(q, k, v, scale=0.4), (q, k, v), dout)
    assert all(rel_err(a, b) <= 1e-12 for a, b in zip(got, want))


class CausalPaddedSite(nn.Module):
    """Causal AND key padding (``am`` (B, Lk), 0 = padding) built in the graph, filled with -inf."""

    def forward(self, q, k, v, am):
        i = torch.arange(q.shape[-2], device=q.device)
        keep = (i[None, :] <= i[:, None])[None, None] & am[:, None, None, :].bool()
        s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        return torch.softmax(s.masked_fill(~keep, -math.inf), -1) @ v


@pytest.mark.parametrize("strategy", ["auto", "dense"])
def test_regression_fully_masked_rows_of_a_proven_mask_on_the_dense_kernel(strategy):
    """Regression: with strategy="dense" a proven mask runs the dense kernel on the materialised mask;
    rows the mask empties (padding before the first real key) must be NaN as in eager, not zeros."""
    q, k, v = (torch.randn(2, 2, 16, 16) for _ in range(3))
    am = torch.ones(2, 16, dtype=torch.long)
    am[1, :5] = 0  # queries 0-4 of batch 1 see no key
    site = CausalPaddedSite()
    fast = attncomp.optimize(site, strategy, example_inputs=(q, k, v, am))
    (row,) = attncomp.explain(fast).replaced
    assert row.strategy == "dense" and "key_padding" in str(row.spec.mask)
    assert row.plan.variant == "dense-padding"  # the padding as a per-key shift, under the causal kernel
    out, ref = fast(q, k, v, am), site(q, k, v, am)
    assert ref[1, :, :5].isnan().all()
    assert_same_values(out, ref, 1e-5)


@pytest.mark.parametrize("config", [{"y": 1}, {"x": "fast"}, {"x": -4}, {"x": True}, {"x": None}])
def test_damaged_autotune_entry_is_ignored_and_retuned(tune_env, config):
    """A cache entry whose config lacks the kernel's knobs or holds non-numbers (an edited or damaged
    file) is reported once and re-tuned, never handed to the kernel launcher."""
    _tune(1)
    data = json.loads(tune_env.read_text())
    data["entries"][0]["config"] = config
    tune_env.write_text(json.dumps(data))
    autotune.reset()
    with pytest.warns(RuntimeWarning, match="ignoring the cached config"):
        assert _tune(1) == {"x": 1}
    assert autotune.STATS["tuned"] == 1
    assert json.loads(tune_env.read_text())["entries"][0]["config"] == {"x": 1}


def test_head_dim_over_the_kernel_maximum_in_a_model_runs_eager(triton_cpu):
    """An optimized model's site whose head dim the Triton kernels cannot take runs its eager
    computation, with one warning that says why."""
    q, k, v = (torch.randn(1, 2, 16, validate.MAX_HEAD_DIM + 8) for _ in range(3))
    site = SdpaSite("plain")
    with pytest.warns(UserWarning, match="exceeds 256"):
        fast = attncomp.optimize(site, "dense", example_inputs=(q, k, v))
    assert rel_err(fast(q, k, v), site(q, k, v)) <= 1e-6
    assert "runs eager at call time" in str(attncomp.explain(fast))


class Projected(nn.Module):
    """Projections around a masked softmax-chain site; ``keep`` (B, 1, L, L) bool."""

    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(16, 48), nn.Linear(16, 16)

    def forward(self, x, keep):
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, 2, 8).permute(2, 0, 3, 1, 4)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(8)
        o = torch.softmax(s.masked_fill(~keep, torch.finfo(s.dtype).min), -1) @ v
        return self.out(o.transpose(1, 2).reshape(B, L, 16))


BAD_MODEL_INPUTS = {
    "wrong-feature-size": lambda x, keep: (torch.randn(2, 12, 15), keep),
    "integer-features": lambda x, keep: (x.long(), keep),
    "mask-wrong-shape": lambda x, keep: (x, keep[..., :7]),
    "mask-wrong-dtype": lambda x, keep: (x, keep.float()),
}


@pytest.mark.parametrize("case", list(BAD_MODEL_INPUTS))
def test_optimized_model_raises_the_models_own_error_for_bad_input(case):
    model = Projected().eval()
    x, keep = torch.randn(2, 12, 16), torch.rand(2, 1, 12, 12) > 0.3
    fast = attncomp.optimize(model, example_inputs=(x, keep))
    bad = BAD_MODEL_INPUTS[case](x, keep)
    with pytest.raises(Exception) as eager:
        model(*bad)
    with pytest.raises(type(eager.value)) as got:
        fast(*bad)
    assert str(got.value) == str(eager.value)
    assert rel_err(fast(x, keep), model(x, keep)) <= 1e-5  # and it still runs good inputs


class WindowSite(nn.Module):
    """A softmax chain with a sliding window (|i - j| <= 2) filled with -inf: the local strategy."""

    def forward(self, q, k, v):
        i = torch.arange(q.shape[-2], device=q.device)
        hidden = (i[:, None] - i[None, :]).abs() > 2
        s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        return torch.softmax(s.masked_fill(hidden, -math.inf), -1) @ v


@pytest.mark.parametrize("strategy, variant", [("local", "block-sparse"), ("auto", "dense"), ("dense", "dense")])
def test_regression_inf_keys_hidden_by_a_window_do_not_leak(kernels, strategy, variant):
    """Regression: the CPU block-sparse executor added its mask as -inf to the scores, so an Inf score at
    a hidden key became NaN (inf - inf) in rows that never see that key; eager's masked_fill replaces
    hidden scores. Rows that see the Inf keys are NaN / -inf-only rows as in eager. The same for the dense
    variant (what auto runs at 128 keys on CPU), which materialises this chain's masked scores."""
    q, k, v = (torch.randn(1, 2, 128, 16) for _ in range(3))
    site = WindowSite()
    fast = attncomp.optimize(site, example_inputs=(q, k, v), strategy=strategy)
    assert [r.plan.variant for r in attncomp.explain(fast).replaced] == [variant]
    k[0, 0, 0:3, 0] = -math.inf  # every query's score with keys 0-2 is ±inf
    q[0, 0, 0, 0], q[0, 0, 0, 1:] = 1.0, 0.0  # query 0 sees keys 0-2 only, all with score -inf
    out, ref = fast(q, k, v), site(q, k, v)
    assert ref[0, 0, 0].isnan().all() and not ref[0, 0, 10:].isnan().any()
    assert_same_values(out, ref, 1e-5)


def test_regression_inf_key_hidden_by_a_runtime_masked_fill_does_not_leak(kernels):
    q, k, v = (torch.randn(2, 2, 24, 16) for _ in range(3))
    keep = torch.rand(2, 1, 24, 24) > 0.4
    site = MaskedSite("chain-masked_fill-inf")
    fast = attncomp.optimize(site, example_inputs=(q, k, v, keep))
    k[0, 0, 5, 0] = math.inf
    assert_same_values(fast(q, k, v, keep), site(q, k, v, keep), 1e-5)
    assert "ran eagerly" in str(attncomp.explain(fast))


@pytest.mark.parametrize("mask", [None, ir.Window(20, 5), ir.Causal(0)], ids=["full", "window", "causal"])
@pytest.mark.parametrize("Lq,Lk", [(64, 65), (64, 130), (128, 200)])
def test_regression_bias_with_banded_keys_on_the_cpu_executor(mask, Lq, Lk):
    """Regression (found by tests/test_hypothesis.py, slow profile): the CPU executor's banded path
    reads keys in band order but gathered the bias tiles in the block table's order (partial tail
    blocks first), so a bias with a static mask and a key tail gave wrong outputs at inference."""
    q, k, v = qkv(B=2, Hq=2, Hkv=1, Lq=Lq, Lk=Lk, D=8)
    bias = torch.randn(2, 1, Lq, Lk)
    keep = None if mask is None else blocks.dense_keep(mask.expr(), Lq, Lk, "cpu")
    with torch.no_grad():
        out = O.attention(q, k, v, mask, bias=bias)
    g = 2
    s = q.double() @ k.double().repeat_interleave(g, 1).transpose(-1, -2) * 8 ** -0.5 + bias.double()
    if keep is not None:
        s = s.masked_fill(~keep, -math.inf)
    ref = torch.softmax(s, -1).nan_to_num(0.0) @ v.double().repeat_interleave(g, 1)
    assert rel_err(out, ref) <= 1e-5
