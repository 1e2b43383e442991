"""Property-based tests: random shapes, head dims, GQA ratios, dtypes and masks (structured kinds and
random unstructured ones, fully masked rows included) — every executor (the CPU torch executor and the
generated Triton kernels, interpreted) against a float64 reference written independently here.

Profiles: the default run draws a few small examples per test (lengths <= 64, derandomized so runs
repeat); ``ATTNCOMP_HYPOTHESIS=slow`` draws 100 random examples per test with lengths up to 160.
"""

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attncomp
import attncomp.ops as O
from attncomp import ir
from attncomp.strategies.linear.op import linear_attention_reference

SLOW = os.environ.get("ATTNCOMP_HYPOTHESIS", "") == "slow"
settings.register_profile("attncomp", deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                 HealthCheck.function_scoped_fixture])
settings.register_profile("attncomp-slow", parent=settings.get_profile("attncomp"), derandomize=False)
PROFILE = settings.get_profile("attncomp-slow" if SLOW else "attncomp")
MAX_L = 160 if SLOW else 64


def examples(default: int, slow: int = 100):
    """Settings for one test: ``default`` examples, or ``slow`` under ATTNCOMP_HYPOTHESIS=slow."""
    return settings(PROFILE, max_examples=slow if SLOW else default)


TOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
EXECUTOR_DTYPES = {"torch": (torch.float32, torch.bfloat16, torch.float64),
                   "triton": (torch.float32, torch.float16, torch.bfloat16)}


@pytest.fixture(params=["torch", "triton"])
def executor(request):
    attncomp.set_kernels(request.param)
    yield request.param
    attncomp.set_kernels(None)


# ------------------------------------------------------------------------------------------------
# Independent references (float64)
# ------------------------------------------------------------------------------------------------


def visible(mask, Lq: int, Lk: int) -> torch.Tensor:
    """``(Lq, Lk)`` bool of a static IR mask, from each kind's definition (not from its ``expr``)."""
    i, j = torch.arange(Lq)[:, None], torch.arange(Lk)[None, :]
    if mask is None:
        return torch.ones(Lq, Lk, dtype=torch.bool)
    if isinstance(mask, ir.Causal):
        return j <= i + mask.offset
    if isinstance(mask, ir.Window):
        return (j >= i - mask.left) & (j <= i + mask.right)
    if isinstance(mask, ir.BlockDiagonal):
        return (i // mask.size) == (j // mask.size)
    if isinstance(mask, ir.Grid):
        return (i % mask.stride) == (j % mask.stride)
    if isinstance(mask, ir.Prefix):
        return (j < mask.n).expand(Lq, Lk)
    parts = [visible(p, Lq, Lk) for p in mask.parts]
    out = parts[0]
    for p in parts[1:]:
        out = out & p if isinstance(mask, ir.And) else out | p
    return out


def attention_ref(q, k, v, keep=None, bias=None, scale=None, softcap=0.0):
    """Softmax attention in float64 with GQA by repetition; ``keep`` (bool, broadcastable) hides keys;
    a row that sees no key (or whose scores are all -inf) gives zeros. Returns (out, lse)."""
    g = q.shape[1] // k.shape[1]
    q, k, v = q.double(), k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias.double()
    if keep is not None:
        s = s.masked_fill(~keep, -math.inf)
    empty = torch.isneginf(s).all(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)  # no NaN, in gradients either
    return p @ v, torch.logsumexp(s.detach(), -1)


# ------------------------------------------------------------------------------------------------
# Strategies
# ------------------------------------------------------------------------------------------------


@st.composite
def shapes(draw, same_length=False, max_groups=3):
    B = draw(st.integers(1, 2))
    hkv = draw(st.integers(1, 2))
    groups = draw(st.integers(1, max_groups))
    Lq = draw(st.integers(1, MAX_L))
    Lk = Lq if same_length else draw(st.integers(1, MAX_L))
    D = draw(st.sampled_from([4, 8, 16, 24, 40, 64]))
    Dv = draw(st.sampled_from([D, D, 8, 32]))
    return B, hkv * groups, hkv, Lq, Lk, D, Dv


@st.composite
def static_masks(draw, Lq: int, Lk: int):
    def leaf():
        return st.one_of(
            st.builds(ir.Causal, st.integers(-Lq, Lk)),
            st.builds(ir.Window, st.integers(0, max(Lk // 2, 1)), st.integers(0, max(Lk // 2, 1))),
            st.builds(ir.BlockDiagonal, st.integers(1, max(Lq, 2))),
            st.builds(ir.Grid, st.integers(1, 8)),
            st.builds(ir.Prefix, st.integers(1, Lk)),
        )

    kind = draw(st.sampled_from(["none", "leaf", "leaf", "and", "or"]))
    if kind == "none":
        return None
    if kind == "leaf":
        return draw(leaf())
    parts = (draw(leaf()), draw(leaf()))
    return ir.And(parts) if kind == "and" else ir.Or(parts)


@st.composite
def keep_masks(draw, B: int, H: int, Lq: int, Lk: int):
    """None, key padding ``(B, 1, 1, Lk)`` or a random unstructured mask ``(B|1, H|1, Lq, Lk)``, with some
    fully masked rows."""
    kind = draw(st.sampled_from(["none", "padding", "random"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    if kind == "none":
        return None
    if kind == "padding":
        lengths = torch.tensor([draw(st.integers(0, Lk)) for _ in range(B)])
        return (torch.arange(Lk)[None, :] < lengths[:, None])[:, None, None, :]
    shape = (draw(st.sampled_from([1, B])), draw(st.sampled_from([1, H])), Lq, Lk)
    keep = torch.rand(shape, generator=g) < draw(st.sampled_from([0.1, 0.5, 0.9]))
    rows = draw(st.lists(st.integers(0, Lq - 1), max_size=3))
    keep[..., rows, :] = False
    return keep


def _inputs(B, Hq, Hkv, Lq, Lk, D, Dv, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, Lq, D, generator=g).to(dtype), torch.randn(B, Hkv, Lk, D, generator=g).to(dtype),
            torch.randn(B, Hkv, Lk, Dv, generator=g).to(dtype))


def _check(out, ref, tol, what="", floor=0.0):
    """Relative error ``‖out − ref‖ / max(‖ref‖, floor)`` at most ``tol`` (``floor``: for results that are
    zero in exact arithmetic, e.g. dq when each query sees one key, where round-off is all there is)."""
    assert out.shape == ref.shape, what
    assert torch.isfinite(out).all(), f"non-finite output {what}"
    err = (out.double() - ref.double()).norm().item() / max(ref.double().norm().item(), floor, 1e-30)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol}"


# ------------------------------------------------------------------------------------------------
# Properties
# ------------------------------------------------------------------------------------------------


@examples(15)
@given(data=st.data())
def test_dense_op_matches_float64(executor, data):
    """attncomp::dense_fwd (and its backward for float32 / float64): any causal offset (rows that see no
    key give zeros and lse -inf), additive biases holding -inf (fully masked rows too), soft-cap."""
    B, Hq, Hkv, Lq, Lk, D, Dv = data.draw(shapes(), "shape")
    dtype = data.draw(st.sampled_from(EXECUTOR_DTYPES[executor]), "dtype")
    q, k, v = _inputs(B, Hq, Hkv, Lq, Lk, D, Dv, dtype, data.draw(st.integers(0, 2**31), "seed"))
    causal = data.draw(st.one_of(st.none(), st.integers(-Lq, Lk)), "causal_offset")
    keep = data.draw(keep_masks(B, Hq, Lq, Lk), "keep")
    bias = None
    if keep is not None or data.draw(st.booleans(), "bias"):
        bias = torch.randn(1, Hq, Lq, Lk).to(dtype)
        if keep is not None:
            bias = bias.masked_fill(~keep, -math.inf)
    softcap = data.draw(st.sampled_from([0.0, 0.0, 5.0]), "softcap")
    scale = data.draw(st.sampled_from([None, 0.3]), "scale") or D ** -0.5
    grad = dtype in (torch.float32, torch.float64) and data.draw(st.booleans(), "grad")
    leaves = [t.clone().requires_grad_(grad) for t in (q, k, v)]
    out, lse = torch.ops.attncomp.dense_fwd(*leaves, bias, scale, causal, softcap)
    vis = None if causal is None else visible(ir.Causal(causal), Lq, Lk)
    ref, ref_lse = attention_ref(q, k, v, vis, bias, scale, softcap)
    _check(out, ref, TOL[dtype], "out")
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), "rows that see no key"
    if grad:
        dout = torch.randn_like(out)
        got = torch.autograd.grad(out, leaves, dout)
        ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
        want = torch.autograd.grad(attention_ref(*ref_leaves, vis, bias, scale, softcap)[0], ref_leaves,
                                   dout.double())
        for name, a, b in zip("qkv", got, want):
            _check(a, b, 1e-4 if dtype == torch.float32 else 1e-9, f"d{name}", floor=1.0)


@examples(15)
@given(data=st.data())
def test_masked_attention_matches_float64(executor, data):
    """attncomp.ops.attention (block-sparse, local): random static masks (causal with any offset,
    windows, block-diagonal, grid, prefix, And / Or of two) AND random keep masks (key padding,
    unstructured, fully masked rows), optional bias; rows that see nothing give zeros."""
    B, Hq, Hkv, Lq, Lk, D, Dv = data.draw(shapes(), "shape")
    dtype = data.draw(st.sampled_from(EXECUTOR_DTYPES[executor]), "dtype")
    q, k, v = _inputs(B, Hq, Hkv, Lq, Lk, D, Dv, dtype, data.draw(st.integers(0, 2**31), "seed"))
    mask = data.draw(static_masks(Lq, Lk), "mask")
    keep = data.draw(keep_masks(B, Hq, Lq, Lk), "keep")
    bias = torch.randn(B, 1, Lq, Lk).to(dtype) if data.draw(st.booleans(), "bias") else None
    grad = dtype in (torch.float32, torch.float64) and data.draw(st.booleans(), "grad")
    leaves = [t.clone().requires_grad_(grad) for t in (q, k, v)]
    out = O.attention(*leaves, mask, keep=keep, bias=bias)
    vis = visible(mask, Lq, Lk) if keep is None else visible(mask, Lq, Lk) & keep
    ref, _ = attention_ref(q, k, v, vis, bias)
    _check(out, ref, TOL[dtype], f"out, mask={mask}")
    if grad:
        dout = torch.randn_like(out)
        got = torch.autograd.grad(out, leaves, dout)
        ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
        want = torch.autograd.grad(attention_ref(*ref_leaves, vis, bias)[0], ref_leaves, dout.double())
        for name, a, b in zip("qkv", got, want):
            _check(a, b, 1e-4 if dtype == torch.float32 else 1e-9, f"d{name}, mask={mask}", floor=1.0)


@examples(15)
@given(data=st.data())
def test_linear_attention_matches_float64(executor, data):
    """attncomp.ops.linear_attention against its float64 recurrence: feature maps, causal or not,
    per-head decay, normalisation, any chunk size."""
    B, H, _, L, _, D, Dv = data.draw(shapes(same_length=True, max_groups=1), "shape")
    dtype = data.draw(st.sampled_from(EXECUTOR_DTYPES[executor]), "dtype")
    q, k, v = _inputs(B, H, H, L, L, D, Dv, dtype, data.draw(st.integers(0, 2**31), "seed"))
    feature_map = data.draw(st.sampled_from(["elu1", "relu"]), "feature_map")
    causal = data.draw(st.booleans(), "causal")
    decay = None
    if causal and data.draw(st.booleans(), "decay"):
        decay = torch.tensor([data.draw(st.floats(0.5, 1.0), "decay_h") for _ in range(H)])
    normalize = data.draw(st.booleans(), "normalize")
    chunk = data.draw(st.integers(1, 80), "chunk")
    out = O.linear_attention(q, k, v, feature_map, causal=causal, decay=decay, normalize=normalize, chunk=chunk)
    ref = linear_attention_reference(q, k, v, feature_map, causal=causal, decay=decay, normalize=normalize)
    tol = {torch.float32: 1e-4}.get(dtype, TOL[dtype] * 2)
    _check(out, ref, tol, f"{feature_map} causal={causal} decay={decay is not None} normalize={normalize}")

