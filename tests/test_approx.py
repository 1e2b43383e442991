"""Opt-in approximation: strategy="linear" on softmax sites, with the measured error reported."""

import pytest
import torch
from torch import nn

import attncomp
from attncomp.ops import linear_attention
from conftest import rel_err


class CausalSite(nn.Module):
    """Causal softmax attention written out, mask built from arange (proved causal)."""

    def forward(self, q, k, v):
        i = torch.arange(q.shape[-2])
        mask = torch.where(i[None, :] <= i[:, None], 0.0, torch.finfo(q.dtype).min)
        return ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5 + mask).softmax(-1) @ v


class BiasSite(nn.Module):
    def __init__(self, L):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(L, L))

    def forward(self, q, k, v):
        return ((q @ k.transpose(-1, -2)) * 0.25 + self.bias).softmax(-1) @ v


def _qkv(L=64):
    return tuple(torch.randn(1, 2, L, 16) for _ in range(3))


def test_linear_strategy_reports_the_measured_error():
    q, k, v = _qkv()
    site = CausalSite()
    fast = attncomp.optimize(site, strategy="linear", example_inputs=(q, k, v))
    (row,) = attncomp.explain(fast).replaced
    assert row.strategy == "linear" and "approximate" in row.reason
    # independently: causal linear attention (elu+1 features) against the exact site
    expect = linear_attention(q, k, v, feature_map="elu1", causal=True)
    err = rel_err(expect, site(q, k, v))
    assert err > 1e-3  # a real approximation, not the dense result
    assert abs(row.kernel.approx_error - err) <= 1e-6 * err
    assert f"measured relative error {err:.3g}" in str(attncomp.explain(fast))
    assert rel_err(fast(q, k, v), expect) <= 1e-6


def test_tolerance_keeps_a_site_dense_and_says_so():
    q, k, v = _qkv()
    site = CausalSite()
    fast = attncomp.optimize(site, strategy="linear", tolerance=1e-3, example_inputs=(q, k, v))
    (row,) = attncomp.explain(fast).replaced
    assert row.kernel.approx_rejected and "> tolerance 0.001: runs dense" in str(attncomp.explain(fast))
    assert rel_err(fast(q, k, v), site(q, k, v)) <= 1e-5


def test_linear_is_not_applied_where_it_cannot_express_the_site():
    q, k, v = _qkv()
    fast = attncomp.optimize(BiasSite(64), strategy="linear", example_inputs=(q, k, v))
    (row,) = attncomp.explain(fast).replaced
    assert row.strategy == "dense" and "linear requested, but" in row.reason
    assert row.kernel.approx is None


def test_auto_never_approximates_and_tolerance_is_checked():
    q, k, v = _qkv()
    fast = attncomp.optimize(CausalSite(), example_inputs=(q, k, v))
    assert all(r.strategy != "linear" for r in attncomp.explain(fast).replaced)
    with pytest.raises(ValueError, match="tolerance must be a positive number"):
        attncomp.optimize(CausalSite(), strategy="linear", tolerance=-1.0)
