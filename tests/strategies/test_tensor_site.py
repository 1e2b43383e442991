"""Rule tensor_attention: tensor (2-simplicial) attention written in a model runs on
attncomp.tensor.tensor_attention (exact), or on request on the low-rank approximation with its
error measured against the exact kernel (Dynamo capture)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attncomp
from attncomp.frontend import rules as match
from conftest import rel_err

tensor = pytest.importorskip("attncomp.tensor")


def flat_view_as(q, k1, k2, v1, v2):
    s = torch.einsum("bhid,bhjd,bhld->bhijl", q, k1, k2) * 0.25
    p = torch.softmax(s.flatten(-2), -1).view_as(s)
    return torch.einsum("bhijl,bhjd,bhld->bhid", p, v1, v2)


def reshape_div_sqrt(q, k1, k2, v1, v2):
    B, H, L, D = q.shape
    s = torch.einsum("bnid,bnjd,bnld->bnijl", q, k1, k2) / math.sqrt(D)
    p = F.softmax(s.reshape(B, H, L, -1), dim=-1).reshape(s.shape)
    return torch.einsum("bnijl,bnjd,bnld->bnid", p, v1, v2)


def three_d_unscaled(q, k1, k2, v1, v2):  # (B·H, L, D) operands, no scale
    q, k1, k2, v1, v2 = (x.flatten(0, 1) for x in (q, k1, k2, v1, v2))
    s = torch.einsum("zid,zjd,zld->zijl", q, k1, k2)
    p = s.flatten(-2).softmax(-1).view(s.shape)
    return torch.einsum("zijl,zjd,zld->zid", p, v1, v2)


CASES = {"flatten-view_as-mul": (flat_view_as, 0.25), "reshape-div-sqrtD": (reshape_div_sqrt, 0.5),
         "3d-unscaled": (three_d_unscaled, 1.0)}


class Site(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, q, k1, k2, v1, v2):
        return self.fn(q, k1, k2, v1, v2)


def _inputs(L=(12, 10, 9), D=4, Dv=6, grad=False, seed=0, amp=0.7):
    g = torch.Generator().manual_seed(seed)
    Lq, L1, L2 = L
    shapes = [(2, 2, Lq, D), (2, 2, L1, D), (2, 2, L2, D), (2, 2, L1, Dv), (2, 2, L2, Dv)]
    return tuple((torch.randn(s, generator=g) * amp).requires_grad_(grad) for s in shapes)


@pytest.mark.parametrize("name", list(CASES))
def test_recognised_and_exact(name, monkeypatch):
    fn, scale = CASES[name]
    calls = []
    real = tensor.tensor_attention
    monkeypatch.setattr(tensor, "tensor_attention", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    model = Site(fn)
    x = _inputs()
    match.COUNTERS.clear()
    fast = attncomp.optimize(model, example_inputs=x)
    assert match.COUNTERS["tensor_attention:hit"] == 1
    assert match.COUNTERS["softmax_chain:hit"] == match.COUNTERS["softmax_chain:miss"] == 0
    rep = attncomp.explain(fast)
    (row,) = rep.replaced
    assert not rep.left and row.rule == "tensor_attention" and row.strategy == "tensor"
    assert "tensor (exact): recognised tensor attention" in str(rep)
    assert row.spec.form.scale == pytest.approx(scale) and row.kernel.approx is None
    xf = tuple(t.detach().clone().requires_grad_() for t in x)
    xe = tuple(t.detach().clone().requires_grad_() for t in x)
    out, ref = fast(*xf), model(*xe)
    assert rel_err(out, ref) <= 1e-5
    assert rel_err(out.view(2, 2, 12, 6), tensor.tensor_attention_reference(*x, scale=scale)) <= 1e-5
    dout = torch.randn_like(ref)
    for g, w in zip(torch.autograd.grad((out * dout).sum(), xf), torch.autograd.grad((ref * dout).sum(), xe)):
        assert rel_err(g, w) <= 1e-5
    assert len(calls) == 2 and all(c["scale"] == pytest.approx(scale) for c in calls)
    (latest,) = attncomp.explain(fast).replaced
    assert latest.kernel.calls == {"fused": 1, "literal": 0}


def masked(q, k1, k2, v1, v2):
    L = q.shape[-2]
    i = torch.arange(L)
    keep = (i[None, :, None] <= i[:, None, None]) & (i[None, None, :] <= i[:, None, None])
    s = (torch.einsum("bhid,bhjd,bhld->bhijl", q, k1, k2) * 0.5).masked_fill(~keep, float("-inf"))
    return torch.einsum("bhijl,bhjd,bhld->bhid", s.flatten(-2).softmax(-1).view_as(s), v1, v2)


def returns_probs(q, k1, k2, v1, v2):
    s = torch.einsum("bhid,bhjd,bhld->bhijl", q, k1, k2) * 0.5
    p = torch.softmax(s.flatten(-2), -1).view_as(s)
    return torch.einsum("bhijl,bhjd,bhld->bhid", p, v1, v2), p


def tensor_scale(q, k1, k2, v1, v2):
    s = torch.einsum("bhid,bhjd,bhld->bhijl", q, k1, k2) * q.abs().mean()
    return torch.einsum("bhijl,bhjd,bhld->bhid", s.flatten(-2).softmax(-1).view_as(s), v1, v2)


@pytest.mark.parametrize("fn,reason", [
    (masked, "on the trilinear scores: only a constant scale is recognised (no masks or additive terms)"),
    (returns_probs, "the attention probabilities `p` has another user"),
    (tensor_scale, "on the trilinear scores: only a constant scale is recognised"),
], ids=["masked", "probabilities-returned", "tensor-scale"])
def test_non_matching_variants_stay_eager_with_the_reason(fn, reason):
    model = Site(fn)
    x = _inputs(L=(8, 8, 8))
    match.COUNTERS.clear()
    fast = attncomp.optimize(model, example_inputs=x)
    rep = attncomp.explain(fast)
    assert not rep.replaced and match.COUNTERS["tensor_attention:miss"] == 1
    (row,) = rep.left
    assert row.rule == "tensor_attention" and reason in row.reason and reason in str(rep)
    out, ref = fast(*x), model(*x)
    for a, b in zip(out if isinstance(out, tuple) else (out,), ref if isinstance(ref, tuple) else (ref,)):
        assert torch.equal(a, b)


def _lowrank(x, scale, **kw):
    lowrank = pytest.importorskip("attncomp.tensor_lowrank")
    return lowrank.lowrank_tensor_attention(*x, scale=scale, **kw)


@pytest.mark.parametrize("strategy,kw", [
    (attncomp.Tensor(degree=3), {"degree": 3, "method": "poly", "seed": 0}),
    (attncomp.Tensor(rank=24, degree=4, seed=5), {"degree": 4, "method": "random", "rank": 24, "seed": 5}),
], ids=["poly-degree3", "random-rank24"])
def test_lowrank_reports_the_error_against_the_exact_kernel(strategy, kw):
    model = Site(flat_view_as)
    x = _inputs()
    expect = _lowrank(x, 0.25, **kw)
    err = rel_err(expect, tensor.tensor_attention_reference(*x, scale=0.25))  # independently
    assert err > 1e-6  # a real approximation
    fast = attncomp.optimize(model, strategy=strategy, example_inputs=x)
    (row,) = attncomp.explain(fast).replaced
    assert row.strategy == "tensor" and "tensor low-rank (approximate, opt-in)" in row.reason
    assert abs(row.kernel.approx_error - err) <= 1e-4 * err
    assert f"measured relative error {err:.3g} vs exact on the first call" in str(attncomp.explain(fast))
    assert rel_err(fast(*x), expect) <= 1e-5


def test_tolerance_keeps_the_site_exact():
    model = Site(flat_view_as)
    x = _inputs()
    pytest.importorskip("attncomp.tensor_lowrank")
    fast = attncomp.optimize(model, strategy=attncomp.Tensor(degree=1), tolerance=1e-9, example_inputs=x)
    (row,) = attncomp.explain(fast).replaced
    assert row.kernel.approx.tolerance == 1e-9 and row.kernel.approx_rejected
    assert "> tolerance 1e-09: runs exact" in str(attncomp.explain(fast))
    assert rel_err(fast(*x), model(*x)) <= 1e-5


def test_an_approximation_that_cannot_run_leaves_the_site_exact():
    model = Site(flat_view_as)
    x = _inputs(D=16)
    pytest.importorskip("attncomp.tensor_lowrank")
    fast = attncomp.optimize(model, strategy=attncomp.Tensor(degree=12, method="poly"), example_inputs=x)
    (row,) = attncomp.explain(fast).replaced
    assert "the low-rank approximation failed (ValueError" in str(attncomp.explain(fast))
    assert rel_err(fast(*x), model(*x)) <= 1e-5 and row.kernel.fallback_reason is None


def test_softmax_sites_are_not_tensor_sites():
    class Soft(nn.Module):
        def forward(self, q, k, v):
            return (q @ k.transpose(-2, -1)).softmax(-1) @ v

    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    fast = attncomp.optimize(Soft(), strategy="tensor", example_inputs=(q, k, v))
    (row,) = attncomp.explain(fast).replaced
    assert row.rule == "softmax_chain" and row.strategy == "dense" and "tensor requested, but" in row.reason
    with pytest.raises(ValueError, match="method"):
        attncomp.Tensor(rank=4, method="svd")


def test_export_capture():
    model = Site(flat_view_as)
    x = _inputs()
    fast = attncomp.optimize(model, capture="export", example_inputs=x)
    (row,) = attncomp.explain(fast).replaced
    assert row.rule == "tensor_attention" and row.strategy == "tensor"
    assert rel_err(fast(*x), model(*x)) <= 1e-5
