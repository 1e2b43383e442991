"""Content routing as an opt-in strategy: optimize(model, strategy=attncomp.Sparse(topk, region))."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attncomp
from conftest import rel_err


class Plain(nn.Module):
    """Softmax attention written out, no mask."""

    def forward(self, q, k, v):
        return ((q @ k.transpose(-1, -2)) * 0.3).softmax(-1) @ v


class SdpaGQA(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


class Causal(nn.Module):
    def forward(self, q, k, v):
        i = torch.arange(q.shape[-2])
        mask = torch.where(i[None, :] <= i[:, None], 0.0, torch.finfo(q.dtype).min)
        return ((q @ k.transpose(-1, -2)) * 0.3 + mask).softmax(-1) @ v


class SdpaCausal(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class Window(nn.Module):
    def forward(self, q, k, v):
        i = torch.arange(q.shape[-2])
        near = (i[None, :] - i[:, None]).abs() <= 8
        return (q @ k.transpose(-1, -2)).masked_fill(~near, float("-inf")).softmax(-1) @ v


def routed_by_hand(q, k, v, region, topk, scale, causal=False):
    """float64 routed attention from first principles: region means (the last region averages its
    own tokens), affinities, the topk key regions per query region (ties to the lower index; causal:
    among the key regions not after the query region), then softmax over the tokens of the kept
    regions only (causal: and key ≤ query)."""
    q, k, v = q.double(), k.double(), v.double()
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    nq, nk = math.ceil(Lq / region), math.ceil(Lk / region)
    visible = torch.zeros(B, H, Lq, Lk, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            km = [k[b, h, j * region:(j + 1) * region].mean(0) for j in range(nk)]
            for i in range(nq):
                qm = q[b, h, i * region:(i + 1) * region].mean(0)
                aff = [float((qm @ km[j]).detach()) for j in range(nk)]
                allowed = [j for j in range(nk) if not causal or j <= i]
                for j in sorted(allowed, key=lambda j: (-aff[j], j))[:topk]:
                    visible[b, h, i * region:(i + 1) * region, j * region:(j + 1) * region] = True
    if causal:
        visible &= torch.ones(Lq, Lk, dtype=torch.bool).tril()
    s = (q @ k.transpose(-1, -2) * scale).masked_fill(~visible, -math.inf)
    return s.softmax(-1) @ v


def _qkv(hq=2, hkv=2, L=64, D=16, grad=False):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(2, h, L, D, generator=g).requires_grad_(grad) for h in (hq, hkv, hkv))


def test_routed_strategy_reports_the_measured_error():
    q, k, v = _qkv()
    site = Plain()
    fast = attncomp.optimize(site, strategy=attncomp.Sparse(topk=2, region=16), example_inputs=(q, k, v))
    (row,) = attncomp.explain(fast).replaced
    assert row.strategy == "sparse" and "routed (approximate, opt-in)" in row.reason
    expect = routed_by_hand(q, k, v, 16, 2, 0.3)
    err = rel_err(expect, site(q, k, v))  # routed against dense, computed independently
    assert err > 1e-2  # a real approximation: half of the key regions are dropped
    assert abs(row.kernel.approx_error - err) <= 1e-5 * err
    assert f"measured relative error {err:.3g} vs dense" in str(attncomp.explain(fast))
    assert rel_err(fast(q, k, v), expect) <= 1e-5
    assert row.kernel.calls["fused"] == 2


def test_routed_gradients_follow_the_routed_function():
    q, k, v = _qkv(grad=True)
    fast = attncomp.optimize(Plain(), strategy=attncomp.Sparse(topk=3, region=16), example_inputs=(q, k, v))
    out = fast(q, k, v)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad((out * dout).sum(), (q, k, v))
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = routed_by_hand(*leaves, 16, 3, 0.3)  # the selection is not differentiated: a fixed mask
    ref_grads = torch.autograd.grad((ref * dout.double()).sum(), leaves)
    assert rel_err(out, ref) <= 1e-5
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want) <= 1e-5


def test_sdpa_site_with_gqa_uses_its_default_scale():
    q, k, v = _qkv(hq=4, hkv=2, L=48)
    fast = attncomp.optimize(SdpaGQA(), strategy=attncomp.Sparse(topk=1, region=16), example_inputs=(q, k, v))
    (row,) = attncomp.explain(fast).replaced
    expect = routed_by_hand(q, k, v, 16, 1, 1 / math.sqrt(16))
    assert abs(row.kernel.approx_error - rel_err(expect, SdpaGQA()(q, k, v))) <= 1e-5 * row.kernel.approx_error
    assert rel_err(fast(q, k, v), expect) <= 1e-5


def test_tolerance_keeps_a_site_dense_and_says_so():
    q, k, v = _qkv()
    site = Plain()
    fast = attncomp.optimize(site, strategy=attncomp.Sparse(topk=2, region=16), tolerance=1e-3,
                             example_inputs=(q, k, v))
    (row,) = attncomp.explain(fast).replaced
    assert row.kernel.approx.tolerance == 1e-3 and row.kernel.approx_rejected
    assert "> tolerance 0.001: runs dense" in str(attncomp.explain(fast))
    assert rel_err(fast(q, k, v), site(q, k, v)) <= 1e-5
    # a loose tolerance keeps the routed result
    loose = attncomp.optimize(site, strategy=attncomp.Sparse(topk=2, region=16), tolerance=0.9,
                              example_inputs=(q, k, v))
    assert not attncomp.explain(loose).replaced[0].kernel.approx_rejected
    assert rel_err(loose(q, k, v), routed_by_hand(q, k, v, 16, 2, 0.3)) <= 1e-5


@pytest.mark.parametrize("model,scale", [(Causal(), 0.3), (SdpaCausal(), 0.25)],
                         ids=["chain-arange-mask", "sdpa-is_causal"])
def test_causal_sites_route_among_earlier_regions(model, scale):
    q, k, v = _qkv(L=72, grad=True)  # the last region is short (72 = 4·16 + 8)
    fast = attncomp.optimize(model, strategy=attncomp.Sparse(topk=2, region=16), example_inputs=(q, k, v))
    (row,) = attncomp.explain(fast).replaced
    assert row.strategy == "sparse" and "(none after it; causal inside the kept tiles)" in row.reason
    expect = routed_by_hand(q, k, v, 16, 2, scale, causal=True)
    err = rel_err(expect, model(q, k, v))
    assert err > 1e-3 and abs(row.kernel.approx_error - err) <= 1e-5 * err
    out = fast(q, k, v)
    assert rel_err(out, expect) <= 1e-5
    dout = torch.randn_like(out)
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref_grads = torch.autograd.grad((routed_by_hand(*leaves, 16, 2, scale, causal=True) * dout.double()).sum(), leaves)
    for got, want in zip(torch.autograd.grad((out * dout).sum(), (q, k, v)), ref_grads):
        assert rel_err(got, want) <= 1e-5


def test_other_masks_and_biases_stay_dense_with_the_reason():
    q, k, v = _qkv()
    fast = attncomp.optimize(Window(), strategy=attncomp.Sparse(topk=2, region=16), example_inputs=(q, k, v))
    (row,) = attncomp.explain(fast).replaced
    assert row.strategy == "dense" and row.kernel.approx is None
    assert "routed sparse requested, but routing is combined with no mask but causal, not with the site's window" \
        in row.reason
    assert rel_err(fast(q, k, v), Window()(q, k, v)) <= 1e-5


def test_never_chosen_without_topk_and_arguments_checked():
    q, k, v = _qkv()
    for strategy in ("auto", "sparse"):
        fast = attncomp.optimize(Plain(), strategy=strategy, example_inputs=(q, k, v))
        (row,) = attncomp.explain(fast).replaced
        assert row.kernel.approx is None and "routed" not in row.reason
    with pytest.raises(ValueError, match="positive int"):
        attncomp.Sparse(topk=0)
    with pytest.raises(ValueError, match="needs topk"):
        attncomp.Sparse(region=16)


def test_causal_routing_on_the_triton_kernels(monkeypatch):
    from attncomp.ops import routed_attention
    from attncomp.strategies.sparse import launcher as triton_sparse

    calls = {"fwd": 0, "bwd": 0}
    for name in calls:
        fn = getattr(triton_sparse, f"sparse_{name}")
        monkeypatch.setattr(triton_sparse, f"sparse_{name}",
                            lambda *a, _fn=fn, _n=name, **kw: calls.__setitem__(_n, calls[_n] + 1) or _fn(*a, **kw))
    q, k, v = _qkv(L=72, grad=True)
    attncomp.set_kernels("triton")
    try:
        out = routed_attention(q, k, v, region=16, topk=2, scale=0.25, causal=True)
        dout = torch.randn_like(out)
        grads = torch.autograd.grad((out * dout).sum(), (q, k, v))
    finally:
        attncomp.set_kernels(None)
    assert calls["fwd"] >= 1 and calls["bwd"] >= 1, calls
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = routed_by_hand(*leaves, 16, 2, 0.25, causal=True)
    assert rel_err(out, ref) <= 1e-4
    for got, want in zip(grads, torch.autograd.grad((ref * dout.double()).sum(), leaves)):
        assert rel_err(got, want) <= 1e-4
