"""Low-rank tensor attention (attncomp.tensor_lowrank): the O(L·r·Dv) factorisation against the
polynomial-kernel attention formed pair by pair in float64 (exact up to rounding), the error against
exact softmax tensor attention as degree / rank grow, causal prefix sums, bounds, the denominator
guard, gradients and input errors."""

import itertools
import math
import random

import pytest
import torch

from attncomp.strategies.tensor import lowrank as tl
from attncomp.strategies.tensor.lowrank import (
    entry_bound,
    feature_rank,
    lowrank_tensor_attention,
    poly_coefficients,
    poly_features,
    poly_tensor_attention_reference,
    sampled_features,
    score_bound,
)
from conftest import rel_err


def softmax_tensor_reference(q, k1, k2, v1, v2, scale=None, causal=False):
    """Exact tensor attention in float64 by forming the (L, L1, L2) score cube (test-local reference)."""
    q, k1, k2, v1, v2 = (x.double() for x in (q, k1, k2, v1, v2))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = scale * torch.einsum("bhid,bhjd,bhld->bhijl", q, k1, k2)
    if causal:
        i = torch.arange(q.shape[2])
        vis = i[None, :] <= i[:, None]
        s = s.masked_fill(~(vis[:, :, None] & vis[:, None, :]), float("-inf"))
    B, H, L, L1, L2 = s.shape
    p = torch.softmax(s.reshape(B, H, L, L1 * L2), -1).reshape(s.shape)
    return torch.einsum("bhijl,bhjv,bhlv->bhiv", p, v1, v2)


def _inputs(B, H, L, L1, L2, D, Dv, bound, dtype=torch.float64, seed=0):
    """q, k1, k2 uniform in [-bound, bound]; v1, v2 standard normal."""
    g = torch.Generator().manual_seed(seed)
    q, k1, k2 = ((torch.rand(B, H, n, D, generator=g, dtype=torch.float64) * 2 - 1) * bound for n in (L, L1, L2))
    v1, v2 = (torch.randn(B, H, n, Dv, generator=g, dtype=torch.float64) for n in (L1, L2))
    return tuple(x.to(dtype) for x in (q, k1, k2, v1, v2))


# ------------------------------------------------------------------------------------------------
# The factorisation is exact for the polynomial kernel itself
# ------------------------------------------------------------------------------------------------

# (B, H, L, L1, L2, D, Dv, degree, fit, causal, bound)
POLY_CASES = [
    (2, 2, 24, 24, 24, 8, 8, 0, "taylor", False, 1.0),
    (2, 2, 24, 17, 31, 8, 5, 1, "taylor", False, 1.0),
    (1, 2, 24, 24, 24, 8, 8, 2, "taylor", False, 1.5),
    (2, 1, 20, 13, 9, 8, 4, 3, "chebyshev", False, 1.0),
    (1, 2, 16, 16, 16, 12, 8, 4, "taylor", False, 1.0),
    (1, 2, 16, 20, 16, 16, 8, 3, "taylor", False, 1.0),
    (2, 2, 24, 24, 24, 8, 8, 2, "taylor", True, 1.0),
    (1, 2, 24, 24, 24, 8, 6, 3, "chebyshev", True, 1.0),
    (1, 1, 20, 20, 20, 12, 8, 4, "taylor", True, 1.0),
]


def _poly_id(c):
    B, H, L, L1, L2, D, Dv, p, fit, causal, bound = c
    return f"B{B}-H{H}-L{L}-L1{L1}-L2{L2}-D{D}-Dv{Dv}-p{p}-{fit}-{'causal' if causal else 'full'}-bound{bound}"


@pytest.mark.parametrize("case", POLY_CASES, ids=_poly_id)
def test_factorisation_equals_polynomial_kernel_attention(case):
    B, H, L, L1, L2, D, Dv, p, fit, causal, bound = case
    q, k1, k2, v1, v2 = _inputs(B, H, L, L1, L2, D, Dv, bound)
    out, info = lowrank_tensor_attention(q, k1, k2, v1, v2, degree=p, fit=fit, causal=causal, return_info=True)
    ref = poly_tensor_attention_reference(q, k1, k2, v1, v2, info.coeffs, causal=causal)
    assert out.shape == (B, H, L, Dv) and out.dtype == torch.float64
    assert info.rank == feature_rank(D, p) == math.comb(D + p, p) and info.clamped_rows == 0
    assert rel_err(out, ref) <= 1e-10


def test_polynomial_features_reproduce_each_power():
    """Σ_r φq φ1 φ2 = a_m s^m for each degree alone (the multinomial weights and the cube-root split)."""
    q, k1, k2, _, _ = _inputs(1, 2, 5, 6, 7, 5, 1, 1.0)
    s = 0.7 * torch.einsum("bhid,bhjd,bhld->bhijl", q, k1, k2)
    for m in range(5):
        coeffs = torch.zeros(5, dtype=torch.float64)
        coeffs[m] = -0.3 if m % 2 else 0.4  # a negative weight goes on q's features
        fq, f1, f2 = poly_features(q, k1, k2, coeffs, 0.7, degrees=[m])
        assert fq.shape[-1] == f1.shape[-1] == f2.shape[-1] == math.comb(5 + m - 1, m)
        got = torch.einsum("bhir,bhjr,bhlr->bhijl", fq, f1, f2)
        assert rel_err(got, coeffs[m] * s ** m) <= 1e-13, m


def test_float32_inputs():
    args64 = _inputs(1, 2, 32, 32, 32, 8, 8, 1.0)
    args32 = tuple(x.float() for x in args64)
    out32 = lowrank_tensor_attention(*args32, degree=3)
    out64 = lowrank_tensor_attention(*args64, degree=3)
    assert out32.dtype == torch.float32 and rel_err(out32, out64) <= 1e-5
    out32c = lowrank_tensor_attention(*args32, degree=3, causal=True)
    assert rel_err(out32c, lowrank_tensor_attention(*args64, degree=3, causal=True)) <= 1e-5


@pytest.mark.parametrize("elems", [1, 500, 10**9], ids=["chunk1", "chunk-few", "one-chunk"])
def test_causal_chunking_does_not_change_the_result(elems, monkeypatch):
    """The causal prefix sums carry state across chunks; chunk size (from _CHUNK_ELEMS) must not matter."""
    monkeypatch.setattr(tl, "_CHUNK_ELEMS", elems)
    q, k1, k2, v1, v2 = _inputs(1, 2, 37, 37, 37, 6, 5, 1.0)
    out, info = lowrank_tensor_attention(q, k1, k2, v1, v2, degree=3, causal=True, return_info=True)
    ref = poly_tensor_attention_reference(q, k1, k2, v1, v2, info.coeffs, causal=True)
    assert rel_err(out, ref) <= 1e-10


def test_gradients_match_the_polynomial_reference():
    q, k1, k2, v1, v2 = (x.requires_grad_() for x in _inputs(1, 2, 12, 12, 12, 6, 4, 1.0))
    for causal in (False, True):
        out, info = lowrank_tensor_attention(q, k1, k2, v1, v2, degree=3, causal=causal, return_info=True)
        ref = poly_tensor_attention_reference(q, k1, k2, v1, v2, info.coeffs, causal=causal)
        g = torch.randn_like(ref)
        got = torch.autograd.grad(out, (q, k1, k2, v1, v2), g)
        want = torch.autograd.grad(ref, (q, k1, k2, v1, v2), g)
        for name, a, b in zip(("q", "k1", "k2", "v1", "v2"), got, want):
            assert rel_err(a, b) <= 1e-9, (causal, name)


# ------------------------------------------------------------------------------------------------
# Random (sampled) features
# ------------------------------------------------------------------------------------------------


def test_unrank_enumerates_multisets_in_order():
    for D, m in [(5, 3), (4, 4), (7, 2), (3, 1), (6, 0)]:
        every = list(itertools.combinations_with_replacement(range(D), m))
        assert [tl._unrank(D, m, x) for x in range(len(every))] == every


def test_sampled_features_are_unbiased_and_exact_at_full_rank():
    q, k1, k2, _, _ = _inputs(1, 1, 3, 3, 3, 3, 1, 1.0)
    s = 0.5 * torch.einsum("bhid,bhjd,bhld->bhijl", q, k1, k2)
    target = 0.25 * s ** 2  # n = C(3+1, 2) = 6 degree-2 features
    full = sampled_features(q, k1, k2, 0.25, 0.5, 2, 6, random.Random(0))
    assert rel_err(torch.einsum("bhir,bhjr,bhlr->bhijl", *full), target) <= 1e-13
    draws = torch.stack([torch.einsum("bhir,bhjr,bhlr->bhijl", *sampled_features(q, k1, k2, 0.25, 0.5, 2, 2,
                                                                                  random.Random(t)))
                         for t in range(3000)])
    err = (draws.mean(0) - target).abs()
    stderr = draws.std(0) / math.sqrt(len(draws))
    assert bool((err <= 5 * stderr + 1e-12).all())  # Monte Carlo: within 5 standard errors everywhere


def test_random_method_converges_to_poly_and_is_seeded():
    args = _inputs(1, 2, 24, 24, 24, 8, 8, 1.0)
    poly = lowrank_tensor_attention(*args, degree=3)
    full, info = lowrank_tensor_attention(*args, degree=3, method="random", rank=165, seed=1, return_info=True)
    assert info.per_degree == {0: "exact", 1: "exact", 2: "exact", 3: "exact"} and rel_err(full, poly) <= 1e-12
    a = lowrank_tensor_attention(*args, degree=3, method="random", rank=80, seed=3)
    b, info = lowrank_tensor_attention(*args, degree=3, method="random", rank=80, seed=3, return_info=True)
    assert torch.equal(a, b) and info.rank == 80
    assert info.per_degree[0] == info.per_degree[1] == "exact" and isinstance(info.per_degree[3], int)


# ------------------------------------------------------------------------------------------------
# Against exact softmax tensor attention (bounded entries: |s| ≤ ~1)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_error_falls_with_degree(causal):
    args = _inputs(2, 2, 40, 40, 40, 8, 8, 1.0, seed=1)
    exact = softmax_tensor_reference(*args, causal=causal)
    errs = [rel_err(lowrank_tensor_attention(*args, degree=p, causal=causal), exact) for p in range(5)]
    for lo, hi in zip(errs[1:], errs[:-1]):
        assert lo <= 0.35 * hi, errs  # measured ratios 0.12-0.18
    assert errs[-1] <= 3e-4, errs     # measured 4.1e-5 (causal) / 7.4e-5 (full)


def test_error_falls_with_rank():
    args = _inputs(1, 2, 40, 40, 40, 16, 8, 1.0, seed=2)
    exact = softmax_tensor_reference(*args)
    ranks = [64, 256, 1024, 4096, feature_rank(16, 4)]
    errs = [sum(rel_err(lowrank_tensor_attention(*args, degree=4, method="random", rank=r, seed=s), exact)
                for s in range(2)) / 2 for r in ranks]
    for lo, hi in zip(errs[1:], errs[:-1]):
        assert lo <= 0.6 * hi, errs  # measured 5.9e-2, 1.2e-2, 2.6e-3, 2.1e-4, 8.3e-5 (the last: exact rank)
    assert errs[-2] <= 1e-3 and errs[-1] <= 3e-4, errs


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_exact_reference_of_the_tensor_module_agrees(causal):
    """Cross-check of the test-local softmax reference with attncomp.tensor's (when that module exists)."""
    tensor = pytest.importorskip("attncomp.tensor")
    args = _inputs(1, 2, 12, 12, 12, 8, 4, 1.0)
    assert rel_err(tensor.tensor_attention_reference(*args, scale=0.3, causal=causal),
                   softmax_tensor_reference(*args, scale=0.3, causal=causal)) <= 1e-12


# ------------------------------------------------------------------------------------------------
# Bounds and the denominator guard
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bound", [0.5, 1.0, 2.0])
def test_bounds(bound):
    q, k1, k2, _, _ = _inputs(2, 3, 20, 15, 10, 8, 1, bound, seed=3)
    s = 0.4 * torch.einsum("bhid,bhjd,bhld->bhijl", q, k1, k2)
    B = entry_bound(q, k1, k2)
    R = score_bound(q, k1, k2, 0.4)
    assert B == max(x.abs().max().item() for x in (q, k1, k2)) <= bound
    assert s.abs().max().item() <= R * (1 + 1e-12) and R <= 0.4 * 8 * B ** 3
    assert score_bound(q, k1, k2, -0.4) == R


def test_chebyshev_fit_is_near_minimax_on_its_interval():
    x = torch.linspace(-2, 2, 2001, dtype=torch.float64)
    for p in (2, 4, 6):
        cheb = (tl._poly(x, poly_coefficients(p, 2.0, "chebyshev")) - x.exp()).abs().max()
        taylor = (tl._poly(x, poly_coefficients(p, None, "taylor")) - x.exp()).abs().max()
        # measured max errors (p = 2, 4, 6): Chebyshev 0.68, 0.027, 5.7e-4; Taylor 2.4, 0.39, 0.034
        assert cheb < taylor / 3
        assert cheb <= 2.0 ** (p + 1) / (2 ** p * math.factorial(p + 1)) * math.exp(2)  # interpolation bound


def test_denominator_guard_clamps_and_warns():
    """All scores near −3 (q < 0, keys > 0): odd Taylor degrees are negative there, so the denominator
    is; the rows are clamped to the Jensen floor and reported. Even Taylor degrees stay positive."""
    q, k1, k2, v1, v2 = _inputs(1, 2, 24, 24, 24, 8, 4, 1.0, seed=4)
    q, k1, k2 = -(q.abs() * 0.5 + 1.0), k1.abs() * 0.5 + 1.0, k2.abs() * 0.5 + 1.0
    s = 8 ** -0.5 * torch.einsum("bhid,bhjd,bhld->bhijl", q, k1, k2)
    assert s.max() < -2.8
    for p in (1, 3):
        with pytest.warns(RuntimeWarning, match="denominator"):
            out, info = lowrank_tensor_attention(q, k1, k2, v1, v2, degree=p, return_info=True)
        assert info.clamped_rows == 2 * 24 and torch.isfinite(out).all(), p
    out, info = lowrank_tensor_attention(q, k1, k2, v1, v2, degree=4, return_info=True)
    assert info.clamped_rows == 0
    floor = tl.DEN_FLOOR * tl._jensen_bound(q, k1, k2, 8 ** -0.5, False)
    assert bool((torch.exp(s).sum((-1, -2)) >= floor).all())  # the floor is below the true denominator


# ------------------------------------------------------------------------------------------------
# Input errors
# ------------------------------------------------------------------------------------------------


def test_errors():
    q, k1, k2, v1, v2 = _inputs(1, 2, 6, 5, 4, 4, 3, 1.0)
    f = lowrank_tensor_attention
    with pytest.raises(ValueError, match="q must be a 4-D"):
        f(q[0], k1, k2, v1, v2)
    with pytest.raises(ValueError, match="v2 must be a 4-D"):
        f(q, k1, k2, v1, None)
    with pytest.raises(TypeError, match="one float dtype"):
        f(q, k1.float(), k2, v1, v2)
    with pytest.raises(ValueError, match="k1 must be"):
        f(q, k1[..., :3], k2, v1, v2)
    with pytest.raises(ValueError, match="k2 must be"):
        f(q, k1, k2[:, :1], v1, v2)
    with pytest.raises(ValueError, match="v1 must be"):
        f(q, k1, k2, v1[:, :, :2], v2)
    with pytest.raises(ValueError, match="v1 and v2 must have the same last dim"):
        f(q, k1, k2, v1, v2[..., :2])
    with pytest.raises(ValueError, match="at least one position"):
        f(q, k1[:, :, :0], k2, v1[:, :, :0], v2)
    with pytest.raises(ValueError, match="causal=True needs L == L1 == L2"):
        f(q, k1, k2, v1, v2, causal=True)
    with pytest.raises(ValueError, match="degree must be"):
        f(q, k1, k2, v1, v2, degree=-1)
    with pytest.raises(ValueError, match="degree must be"):
        f(q, k1, k2, v1, v2, degree=2.0)
    with pytest.raises(ValueError, match="method must be"):
        f(q, k1, k2, v1, v2, method="performer")
    with pytest.raises(ValueError, match="fit must be"):
        f(q, k1, k2, v1, v2, fit="pade")
    with pytest.raises(ValueError, match="radius must be"):
        f(q, k1, k2, v1, v2, radius=0.0)
    with pytest.raises(ValueError, match="rank must be"):
        f(q, k1, k2, v1, v2, method="random", rank=0)
    with pytest.raises(ValueError, match="needs rank="):
        f(q, k1, k2, v1, v2, method="random")
    with pytest.raises(ValueError, match="below the exact rank"):
        f(q, k1, k2, v1, v2, degree=2, rank=10)
    big = torch.zeros(1, 1, 2, 64, dtype=torch.float64)
    with pytest.raises(ValueError, match="exact features"):
        f(big, big, big, big, big, degree=3)
