"""Rule linear_attention: naive linear attention written in a model runs, exactly, on
attncomp.linear.linear_attention (Dynamo capture)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attncomp
from attncomp.frontend import rules as match
from attncomp.strategies.linear import op as linear
from conftest import rel_err


def elu1(x):
    return F.elu(x) + 1


def nc_matmul(q, k, v):
    q, k = elu1(q), elu1(k)
    kv = k.transpose(-2, -1) @ v
    den = q @ k.sum(-2, keepdim=True).transpose(-2, -1)
    return (q @ kv) / (den + 1e-6)


def nc_einsum_relu_eps(q, k, v):
    q, k = F.relu(q), torch.relu(k)
    kv = torch.einsum("bhnd,bhne->bhde", k, v)
    num = torch.einsum("bhnd,bhde->bhne", q, kv)
    den = torch.einsum("bhnd,bhd->bhn", q, k.sum(2))
    return num / (den[..., None] + 1e-3)


def nc_no_eps_unsqueeze(q, k, v):
    q, k = 1 + F.elu(q), elu1(k)
    return (q @ (k.transpose(-1, -2) @ v)) / (q @ k.sum(-2).unsqueeze(-1))


def causal_cumsum(q, k, v):
    q, k = elu1(q), elu1(k)
    kv = torch.einsum("bhnd,bhne->bhnde", k, v).cumsum(2)
    num = torch.einsum("bhnd,bhnde->bhne", q, kv)
    den = (q * torch.cumsum(k, dim=2)).sum(-1, keepdim=True)
    return num / (den + 1e-6)


def causal_einsum_den_relu(q, k, v):
    q, k = q.relu(), k.relu()
    num = torch.einsum("bhnd,bhnde->bhne", q, torch.einsum("bhnd,bhne->bhnde", k, v).cumsum(-3))
    den = torch.einsum("bhnd,bhnd->bhn", q, k.cumsum(-2))
    return num / (den.unsqueeze(-1) + 1e-2)


def softplus_3d(q, k, v):  # a feature map the op does not name: the model's ops compute it
    q, k = F.softplus(q[0]), F.softplus(k[0])
    return (q @ (k.transpose(-2, -1) @ v[0])) / (q @ k.sum(-2, keepdim=True).transpose(-2, -1) + 1e-6)


CASES = {  # name: (fn, feature map, causal, eps)
    "elu1-matmul-noncausal": (nc_matmul, "elu1", False, 1e-6),
    "relu-einsum-noncausal-eps1e-3": (nc_einsum_relu_eps, "relu", False, 1e-3),
    "elu1-noeps-unsqueeze": (nc_no_eps_unsqueeze, "elu1", False, 0.0),
    "elu1-cumsum-causal": (causal_cumsum, "elu1", True, 1e-6),
    "relu-einsum-den-causal-eps1e-2": (causal_einsum_den_relu, "relu", True, 1e-2),
    "softplus-3d-graph-features": (softplus_3d, "graph", False, 1e-6),
}


class Site(nn.Module):
    """Projections from x, then the naive linear attention ``fn`` on (B, H, L, D) heads."""

    def __init__(self, fn, dim=32, heads=2):
        super().__init__()
        self.fn, self.h = fn, heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        B, L, E = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.h, E // self.h).permute(2, 0, 3, 1, 4)
        o = self.fn(q, k, v)
        if o.dim() == 3:
            o = o[None]
        return self.out(o.transpose(1, 2).reshape(B, L, E))


@pytest.mark.parametrize("name", list(CASES))
def test_recognised_and_exact(name, monkeypatch):
    fn, fmap, causal, eps = CASES[name]
    torch.manual_seed(0)
    model = Site(fn)
    x = torch.randn(2 if fmap != "graph" else 1, 70, 32)
    calls = []
    real = linear.linear_attention
    monkeypatch.setattr(linear, "linear_attention", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    match.COUNTERS.clear()
    fast = attncomp.optimize(model, example_inputs=(x,))
    assert match.COUNTERS["linear_attention:hit"] == 1 and match.COUNTERS["linear_attention:miss"] == 0
    rep = attncomp.explain(fast)
    (row,) = rep.replaced
    assert not rep.left and row.rule == "linear_attention" and row.strategy == "linear"
    assert "linear (exact): recognised naive linear attention" in str(rep)
    assert row.plan.spec.form == attncomp.ir.LinearForm(fmap, causal, eps)
    assert str(row.spec.mask) == ("causal" if causal else "full")
    # outputs and gradients against the eager model
    xf = x.clone().requires_grad_()
    xe = x.clone().requires_grad_()
    out, ref = fast(xf), model(xe)
    assert rel_err(out, ref) <= 1e-5
    dout = torch.randn_like(ref)
    got = torch.autograd.grad((out * dout).sum(), [xf, *model.parameters()])
    want = torch.autograd.grad((ref * dout).sum(), [xe, *model.parameters()])
    for g, w in zip(got, want):
        assert rel_err(g, w) <= 1e-5
    (latest,) = attncomp.explain(fast).replaced  # the row of the most recent graph (one per grad mode)
    assert latest.kernel.calls == {"fused": 1, "literal": 0}
    assert len(calls) == 2 and all(c["causal"] == causal for c in calls)
    assert all(c.get("normalize", True) == (eps == linear.EPS) for c in calls)


def test_float64_causal_matches_to_rounding():
    q, k, v = (torch.randn(1, 2, 50, 8, dtype=torch.float64) for _ in range(3))

    class M(nn.Module):
        def forward(self, q, k, v):
            return causal_cumsum(q, k, v)

    fast = attncomp.optimize(M(), example_inputs=(q, k, v))
    assert attncomp.explain(fast).replaced[0].strategy == "linear"
    assert rel_err(fast(q, k, v), M()(q, k, v)) <= 1e-12


def test_any_requested_strategy_keeps_the_exact_lowering():
    model = Site(nc_matmul)
    x = torch.randn(2, 20, 32)
    fast = attncomp.optimize(model, strategy="dense", example_inputs=(x,))
    (row,) = attncomp.explain(fast).replaced
    assert row.strategy == "linear" and "dense requested, which applies to softmax sites" in row.reason
    assert rel_err(fast(x), model(x)) <= 1e-5


def clamped(q, k, v):  # normalised by clamp(den, eps), not den + eps
    q, k = elu1(q), elu1(k)
    return (q @ (k.transpose(-2, -1) @ v)) / (q @ k.sum(-2, keepdim=True).transpose(-2, -1)).clamp(min=1e-6)


def other_query(q, k, v):  # the normaliser uses other query features
    fq, k = elu1(q), elu1(k)
    return (fq @ (k.transpose(-2, -1) @ v)) / (F.relu(q) @ k.sum(-2, keepdim=True).transpose(-2, -1) + 1e-6)


def tensor_eps(q, k, v):
    q, k = elu1(q), elu1(k)
    den = q @ k.sum(-2, keepdim=True).transpose(-2, -1)
    return (q @ (k.transpose(-2, -1) @ v)) / (den + torch.full_like(den, 1e-6))


@pytest.mark.parametrize("fn,reason", [
    (clamped, "the normaliser `clamp` (('method', 'clamp')) is not φq·Σφk"),
    (other_query, "the normaliser uses other query features than the numerator"),
    (tensor_eps, "the normaliser adds `full_like`, not a constant eps"),
], ids=["clamp-normaliser", "other-query", "tensor-eps"])
def test_non_matching_variant_stays_eager_with_its_reason(fn, reason):
    model = Site(fn)
    x = torch.randn(2, 20, 32)
    match.COUNTERS.clear()
    fast = attncomp.optimize(model, example_inputs=(x,))
    rep = attncomp.explain(fast)
    assert not rep.replaced and match.COUNTERS["linear_attention:miss"] == 1
    (row,) = rep.left
    assert row.rule == "linear_attention" and reason in row.reason and reason in str(rep)
    assert torch.equal(fast(x), model(x))


def test_cross_attention_lengths_are_left_with_the_reason():
    class Cross(nn.Module):
        def forward(self, q, k, v):
            return nc_matmul(q, k, v)

    q, k, v = torch.randn(1, 2, 12, 8), torch.randn(1, 2, 20, 8), torch.randn(1, 2, 20, 8)
    fast = attncomp.optimize(Cross(), example_inputs=(q, k, v))
    (row,) = attncomp.explain(fast).left
    assert "linear_attention needs q, k (B, H, L, D) of one shape" in row.reason
    assert torch.equal(fast(q, k, v), Cross()(q, k, v))


def test_ordinary_divisions_are_not_candidates():
    class Soft(nn.Module):
        def forward(self, q, k, v):
            return ((q @ k.transpose(-2, -1)) / 4.0).softmax(-1) @ (v / 2)

    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    match.COUNTERS.clear()
    fast = attncomp.optimize(Soft(), example_inputs=(q, k, v))
    assert [r.rule for r in attncomp.explain(fast).rows] == ["softmax_chain"]
    assert not any(key.startswith("linear_attention") for key in match.COUNTERS)


@pytest.mark.parametrize("name", ["elu1-matmul-noncausal", "elu1-cumsum-causal"])
def test_export_capture(name):
    fn, fmap, causal, eps = CASES[name]
    model = Site(fn)
    x = torch.randn(2, 24, 32)
    fast = attncomp.optimize(model, capture="export", example_inputs=(x,))
    (row,) = attncomp.explain(fast).replaced
    assert row.plan.spec.form == attncomp.ir.LinearForm(fmap, causal, eps)  # aten.elu(x, 1.0) + 1 is elu1
    assert rel_err(fast(x), model(x)) <= 1e-5
