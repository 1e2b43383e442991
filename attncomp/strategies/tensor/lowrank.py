"""Low-rank approximation of tensor (second-order) attention for bounded entries.

Exact tensor attention (``attncomp.tensor``) scores every key *pair* (j, l)::

    s(i, j, l) = scale · Σ_d q[i,d] k1[j,d] k2[l,d]          P(i, ·, ·) = softmax over (j, l)
    out[i]     = Σ_{j,l} P(i, j, l) · (v1[j] ⊙ v2[l])                       O(L·L1·L2·D)

Polynomial method (Alman & Song, "How to capture higher-order correlations: generalizing matrix
softmax attention to Kronecker computation", ICLR 2024, and the tensor attention follow-ups): when
``|s| ≤ R`` replace ``exp`` by a degree-p polynomial ``p(x) = Σ_{m≤p} a_m x^m`` (Taylor, or a
Chebyshev interpolant on [−R, R]). Each power of the trilinear form is a trilinear form of features::

    x^m = scale^m (Σ_d q_d a_d b_d)^m = Σ_{|α|=m} c_α · scale^m · q^α a^α b^α     c_α = m! / Π_d α_d!

with α running over the multisets of size m from {0..D-1} (``C(D+m-1, m)`` of them; ``q^α = Π_d q_d^{α_d}``).
Putting ``w_α = a_m c_α scale^m`` as ``sign(w)|w|^{1/3}`` on q's features and ``|w|^{1/3}`` on each key's
gives ``p(s(i,j,l)) = Σ_r φq[i,r] φ1[j,r] φ2[l,r]``, i.e. ``A ≈ φQ (φ1 ⊘ φ2)ᵀ`` (⊘ = column-wise
Kronecker / Khatri–Rao product), and ``(φ1 ⊘ φ2)ᵀ (V1 ⊘ V2) = (φ1ᵀ V1) ∘ (φ2ᵀ V2)`` turns the pair sum into::

    num[i] = Σ_r φq[i,r] · (Σ_j φ1[j,r] v1[j]) ⊙ (Σ_l φ2[l,r] v2[l])       den: the same with v = 1
    out[i] = num[i] / den[i]                                                O(L · r · Dv), no pairs formed

Exact rank ``r(D, p) = Σ_{m≤p} C(D+m-1, m)`` (= C(D+p, p)): D=8 → p=1..4: 9, 45, 165, 495; D=16 → 17,
153, 969, 4845; D=64 → 65, 2145, 47905 (use ``method="random"`` there).

``method="random"``: a random sketch of the same polynomial features with ``rank`` features in all —
coordinate sampling: per degree m, ``r_m`` of its ``n_m = C(D+m-1, m)`` symmetric features drawn
uniformly without replacement and weighted ``n_m / r_m``, so numerator and denominator are unbiased
estimates of the degree-p polynomial kernel's (the output, their ratio, has a small bias, second order
in the sampling noise) and
the result is exact once ``r_m = n_m``. The budget is water-filled over degrees (``r_m ∝ |a_m| ρ^m √n_m``
capped at ``n_m``, ρ = the rms score on 1024 random triples): low degrees come out exact, high ones
sampled; a degree given 0 features is dropped (a bias, shown as 0 in ``LowRankInfo.per_degree``).
Why not Performer-style features: Gaussian positive random features do not extend to a trilinear
form (a Gaussian moment-generating function only produces quadratic forms of the inputs). A dense
trilinear Rademacher sketch ``(ω·q)(ω'·a)((ω⊙ω')·b)`` (unbiased since ``E[ω_d ω'_e ω_f ω'_f] = δ_df δ_ef``,
random Maclaurin features after Kar & Karnick 2012) was measured and dropped: its variance grows like
``(‖q‖‖k1‖‖k2‖ / |Σ q k1 k2|)^{2m} ≈ D^{2m}`` per feature, and at D=16, p=4, rank 2048 (L=128, entries
in [−1, 1]) its error against softmax was 0.15 where coordinate sampling gives 5e-4.

Causal form (``causal=True``, L1 = L2 = L): pairs with j ≤ i and l ≤ i, by prefix sums of
``φ1[j] ⊗ v1[j]`` and ``φ2[l] ⊗ v2[l]``, chunked so memory is O(chunk · r · Dv) — still O(L r Dv).

Accuracy regime. All error statements hinge on ``R = score_bound(q, k1, k2, scale)`` (≤ scale·D·B³ with
``B = entry_bound(q, k1, k2)`` the largest |entry|). Taylor: per-weight relative error ≤
``R^{p+1} e^{2R} / (p+1)!``; Chebyshev on [−R, R]: absolute error ≤ ``R^{p+1} e^R / (2^p (p+1)!)``,
to compare with the smallest weight ``e^{-R}``. So the method is accurate when R is O(1) and the
degree grows like R + log(1/ε) (Alman & Song: an almost-linear-time algorithm when the entries are
bounded by B = o(∛log n) in their normalisation, none under SETH at B = Θ(∛log n)); for large R
the polynomial can be negative, and then so can the denominator. Measured (``benchmarks/
tensor_lowrank_table.py``, L=256, D=16): entries in [−1, 1] (max |s| 1.2, R 2.3), Taylor p=1..4:
2.7e-2, 4.9e-3, 6.5e-4, 8.7e-5; entries in [−1.5, 1.5] (max |s| 4.1, R 7.6): 0.27, 0.15, 0.064, 0.030.

Failure mode and guard: the approximated denominator can be near zero or negative (a polynomial
that dips below 0 on the scores, e.g. Taylor of odd degree for s < −1.6 at p=3, or a fit on too wide
an interval; sampling noise). The true one is at least the Jensen bound ``npairs(i)·exp(mean_{j,l} s)``,
computable in O(L·D) because the mean over pairs factors; a denominator below ``DEN_FLOOR`` (½) of
that bound is clamped to it, the rows counted in ``LowRankInfo.clamped_rows`` and a ``RuntimeWarning``
issued; those rows' outputs are not meaningful.
"""

from __future__ import annotations

import itertools
import math
import random
import warnings
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from torch import Tensor

__all__ = ["DEN_FLOOR", "FITS", "MAX_EXACT_RANK", "METHODS", "LowRankInfo", "entry_bound", "feature_rank",
           "lowrank_tensor_attention", "poly_coefficients", "poly_features", "poly_tensor_attention_reference",
           "sampled_features", "score_bound"]

DEN_FLOOR = 0.5  # rows whose den < DEN_FLOOR · (Jensen lower bound of the true den) are clamped and reported
MAX_EXACT_RANK = 20_000  # exact polynomial features beyond this: use method="random"
METHODS = ("poly", "random")
FITS = ("chebyshev", "taylor")
_CHUNK_ELEMS = 1 << 22  # causal prefix sums: at most this many elements per (B, H, chunk, r, Dv+1) block


@dataclass
class LowRankInfo:
    """What one call did: ``rank`` features in all, per degree ``"exact"`` or the number sampled."""

    method: str
    degree: int
    fit: str
    coeffs: list[float]                       # a_m of p(x) = Σ a_m x^m ≈ exp(x)
    entry_bound: float                        # B: max |entry| of q, k1, k2
    score_bound: float                        # R: proven max |s(i, j, l)|
    radius: float                             # the interval [−radius, radius] the fit used
    rank: int                                 # total number of features
    per_degree: dict[int, str | int] = field(default_factory=dict)  # m → "exact" or number sampled
    clamped_rows: int = 0                     # (batch, head, query) rows whose den was floored (unreliable)


# ------------------------------------------------------------------------------------------------
# Bounds and polynomial
# ------------------------------------------------------------------------------------------------


def entry_bound(q: Tensor, k1: Tensor, k2: Tensor) -> float:
    """B = the largest |entry| of q ``(B, H, L, D)``, k1 ``(B, H, L1, D)``, k2 ``(B, H, L2, D)``.

    The low-rank approximation is accurate when ``scale·D·B³`` (a bound on |s|) is O(1); see
    :func:`score_bound` for a tighter bound on the scores actually used by the fit."""
    return max(float(x.detach().abs().max()) if x.numel() else 0.0 for x in (q, k1, k2))


def score_bound(q: Tensor, k1: Tensor, k2: Tensor, scale: float) -> float:
    """R with ``|s(i, j, l)| ≤ R`` for all i, j, l, batches and heads (no pair is formed).

    Per (batch, head) the smaller of ``Σ_d max|q_d| max|k1_d| max|k2_d|`` and the three Hölder bounds
    ``max‖x‖₂ max‖y‖₂ max|z|`` over the orderings of (q, k1, k2); then the max over (batch, head),
    times |scale|. Always ≤ |scale|·D·B³ with B = :func:`entry_bound`. Inputs as in :func:`entry_bound`."""
    m = [x.detach().double().abs() for x in (q, k1, k2)]
    if any(x.shape[2] == 0 for x in m):
        return 0.0
    col = [x.amax(2) for x in m]                        # (B, H, D): max over positions
    norm = [x.norm(dim=-1).amax(2) for x in m]          # (B, H)
    inf = [c.amax(-1) for c in col]                     # (B, H)
    bounds = [(col[0] * col[1] * col[2]).sum(-1),
              norm[0] * norm[1] * inf[2], norm[0] * inf[1] * norm[2], inf[0] * norm[1] * norm[2]]
    return abs(float(scale)) * float(torch.stack(bounds).amin(0).max())


def poly_coefficients(degree: int, radius: float | None = None, fit: str = "taylor") -> Tensor:
    """Monomial coefficients ``a_0..a_p`` ``(p+1,)`` float64 of ``p(x) ≈ exp(x)``.

    ``fit="taylor"``: ``a_m = 1/m!`` (radius unused; positive everywhere for even p, negative for
    x < some −c when p is odd). ``fit="chebyshev"``: the interpolant of exp at the p+1 Chebyshev nodes
    of [−radius, radius] (near-minimax there; falls back to Taylor for radius < 1e-6)."""
    p = int(degree)
    if fit == "taylor" or radius is None or radius < 1e-6:
        return torch.tensor([1.0 / math.factorial(m) for m in range(p + 1)], dtype=torch.float64)
    t = torch.cos(math.pi * (torch.arange(p + 1, dtype=torch.float64) + 0.5) / (p + 1))  # nodes in [-1, 1]
    c = torch.linalg.solve(t[:, None] ** torch.arange(p + 1, dtype=torch.float64), torch.exp(radius * t))
    return c / radius ** torch.arange(p + 1, dtype=torch.float64)    # p(x) = Σ c_m (x/R)^m


def _typical_score(q: Tensor, k1: Tensor, k2: Tensor, scale: float, rng: random.Random, n: int = 1024) -> float:
    """ρ = root-mean-square of s over n random (batch, head, i, j, l) triples (for the sampling plan)."""
    B, H, L, _ = q.shape
    pick = [[rng.randrange(x) for _ in range(n)] for x in (B, H, L, k1.shape[2], k2.shape[2])]
    b, h, i, j, l2 = (torch.tensor(t, device=q.device) for t in pick)
    s = float(scale) * (q[b, h, i].double() * k1[b, h, j].double() * k2[b, h, l2].double()).sum(-1)
    return float(s.pow(2).mean().sqrt())


def _poly(x: Tensor, coeffs: Tensor) -> Tensor:
    out = torch.zeros_like(x)
    for a in reversed(coeffs.tolist()):  # Horner
        out = out * x + a
    return out


# ------------------------------------------------------------------------------------------------
# Features
# ------------------------------------------------------------------------------------------------


def feature_rank(D: int, degree: int) -> int:
    """Exact rank ``Σ_{m≤p} C(D+m-1, m) = C(D+p, p)`` of the symmetric degree-p features."""
    return math.comb(int(D) + int(degree), int(degree))


@lru_cache(maxsize=64)
def _multisets(D: int, m: int) -> tuple[list[int], list[int], list[float]]:
    """Multisets of size m from range(D) in lexicographic order: (index of the multiset without its
    last element among those of size m-1, that last element, multinomial m!/Π α_d!)."""
    prev = {c: i for i, c in enumerate(itertools.combinations_with_replacement(range(D), m - 1))}
    parent, last, mult = [], [], []
    for c in itertools.combinations_with_replacement(range(D), m):
        parent.append(prev[c[:-1]])
        last.append(c[-1])
        mult.append(math.factorial(m) / math.prod(math.factorial(c.count(d)) for d in set(c)))
    return parent, last, mult


def _split(w: Tensor) -> tuple[Tensor, Tensor]:
    """w → (sign(w)|w|^⅓, |w|^⅓): the weight shared between q's features and each key's."""
    root = w.abs() ** (1.0 / 3.0)
    return torch.sign(w) * root, root


def poly_features(q: Tensor, k1: Tensor, k2: Tensor, coeffs: Tensor, scale: float,
                  degrees: list[int] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Exact symmetric features with ``Σ_r φq[i,r] φ1[j,r] φ2[l,r] = Σ_m a_m s(i,j,l)^m`` (sum over
    ``degrees``, default all m ≤ p). q ``(B, H, L, D)``, k1 ``(B, H, L1, D)``, k2 ``(B, H, L2, D)``,
    coeffs ``(p+1,)``; returns ``(…, L, r)``, ``(…, L1, r)``, ``(…, L2, r)`` in q's dtype."""
    D = q.shape[-1]
    degrees = list(range(len(coeffs))) if degrees is None else degrees
    outs: list[list[Tensor]] = [[], [], []]
    powers = [torch.ones_like(x[..., :1]) for x in (q, k1, k2)]  # degree-0 monomials
    for m in range(max(degrees, default=0) + 1):
        if m > 0:
            parent, last, mult = _multisets(D, m)
            pi = torch.tensor(parent, device=q.device)
            li = torch.tensor(last, device=q.device)
            powers = [pw[..., pi] * x[..., li] for pw, x in zip(powers, (q, k1, k2))]
        else:
            mult = [1.0]
        if m not in degrees:
            continue
        w = float(coeffs[m]) * float(scale) ** m * torch.tensor(mult, dtype=torch.float64)
        wq, wk = (t.to(device=q.device, dtype=q.dtype) for t in _split(w))
        for out, pw, s in zip(outs, powers, (wq, wk, wk)):
            out.append(pw * s)
    return tuple(torch.cat(o, -1) for o in outs)  # type: ignore[return-value]


def _unrank(D: int, m: int, x: int) -> tuple[int, ...]:
    """The x-th multiset of size m from range(D) in lexicographic order (as a sorted tuple): the x-th
    m-combination of range(D+m-1) (stars and bars), minus (0, 1, …, m-1)."""
    out, e = [], 0
    for t in range(m):
        while x >= (cnt := math.comb(D + m - 2 - e, m - t - 1)):
            x, e = x - cnt, e + 1
        out.append(e - t)
        e += 1
    return tuple(out)


def sampled_features(q: Tensor, k1: Tensor, k2: Tensor, coeff: float, scale: float, m: int, rank: int,
                     rng: random.Random) -> tuple[Tensor, Tensor, Tensor]:
    """``rank`` of the ``n = C(D+m-1, m)`` degree-m symmetric features, drawn uniformly without
    replacement and weighted ``n / rank``: ``Σ_r φq φ1 φ2`` is an unbiased estimate of
    ``a_m s(i,j,l)^m`` (exact when rank = n). Shapes as in :func:`poly_features` with r = rank."""
    D = q.shape[-1]
    n = math.comb(D + m - 1, m)
    alphas = [_unrank(D, m, x) for x in rng.sample(range(n), rank)]
    mult = [math.factorial(m) / math.prod(math.factorial(c.count(d)) for d in set(c)) for c in alphas]
    w = float(coeff) * float(scale) ** m * (n / rank) * torch.tensor(mult, dtype=torch.float64)
    wq, wk = (t.to(device=q.device, dtype=q.dtype) for t in _split(w))
    idx = torch.tensor(alphas, device=q.device).view(rank, m)
    return tuple(x[..., idx].prod(-1) * s for x, s in zip((q, k1, k2), (wq, wk, wk)))  # type: ignore[return-value]


def _plan(D: int, coeffs: Tensor, rank: int | None, rho: float) -> dict[int, str | int]:
    """Per degree m: "exact", or how many of its ``n_m = C(D+m-1, m)`` features to sample (0 = dropped).

    Sampling r_m of n_m features adds noise ≈ S_m·√(n_m / r_m) with S_m = |a_m| ρ^m the term's typical
    size (ρ = typical |s|), so ``r_m = min(n_m, λ S_m √n_m)`` (water-filling, Σ r_m = rank) minimises
    the total; degrees that reach n_m are exact."""
    p = len(coeffs) - 1
    n = {m: math.comb(D + m - 1, m) for m in range(p + 1)}
    if rank is None or rank >= sum(n.values()):
        return {m: "exact" for m in range(p + 1)}
    weight = {m: abs(float(coeffs[m])) * rho ** m * math.sqrt(n[m]) for m in range(p + 1)}
    capped: set[int] = set()
    while True:
        free = [m for m in n if m not in capped and weight[m] > 0]
        lam = (rank - sum(n[m] for m in capped)) / max(sum(weight[m] for m in free), 1e-300)
        newly = {m for m in free if lam * weight[m] >= n[m]}
        if not newly:
            break
        capped |= newly
    sizes = {m: (n[m] if m in capped else min(n[m], int(lam * weight[m]))) for m in n}
    left = rank - sum(sizes.values())
    for m in sorted(n):  # rounding leftovers: lowest degrees first
        extra = min(left, n[m] - sizes[m])
        sizes[m], left = sizes[m] + extra, left - extra
    return {m: ("exact" if sizes[m] == n[m] else sizes[m]) for m in n}


# ------------------------------------------------------------------------------------------------
# Contraction: O(L · r · Dv), no pairs formed
# ------------------------------------------------------------------------------------------------


def _contract(fq: Tensor, f1: Tensor, f2: Tensor, v1: Tensor, v2: Tensor, causal: bool) -> tuple[Tensor, Tensor]:
    """num ``(B, H, L, Dv)`` and den ``(B, H, L)`` from features ``(…, L|L1|L2, r)`` and v1 ``(…, L1, Dv)``,
    v2 ``(…, L2, Dv)``: ``Σ_r φq[i,r] (Σ_j φ1[j,r] v1'[j]) ⊙ (Σ_l φ2[l,r] v2'[l])`` with ``v' = [v, 1]``
    (the last column carries den); causal sums j, l ≤ i by chunked prefix sums."""
    v1e = torch.cat([v1, torch.ones_like(v1[..., :1])], -1)
    v2e = torch.cat([v2, torch.ones_like(v2[..., :1])], -1)
    if not causal:
        res = fq @ ((f1.transpose(-1, -2) @ v1e) * (f2.transpose(-1, -2) @ v2e))
        return res[..., :-1], res[..., -1]
    B, H, L, r = fq.shape
    E = v1e.shape[-1]
    C = max(1, min(L, _CHUNK_ELEMS // max(1, B * H * r * E)))
    s1 = fq.new_zeros(B, H, r, E)
    s2 = fq.new_zeros(B, H, r, E)
    outs = []
    for c0 in range(0, L, C):
        sl = slice(c0, c0 + C)
        z1 = s1[:, :, None] + (f1[:, :, sl, :, None] * v1e[:, :, sl, None, :]).cumsum(2)  # (B, H, C, r, E)
        z2 = s2[:, :, None] + (f2[:, :, sl, :, None] * v2e[:, :, sl, None, :]).cumsum(2)
        outs.append(torch.einsum("bhcr,bhcre->bhce", fq[:, :, sl], z1 * z2))
        s1, s2 = z1[:, :, -1], z2[:, :, -1]
    res = torch.cat(outs, 2)
    return res[..., :-1], res[..., -1]


# ------------------------------------------------------------------------------------------------
# Reference (float64, forms every pair)
# ------------------------------------------------------------------------------------------------


def _jensen_bound(q: Tensor, k1: Tensor, k2: Tensor, scale: float, causal: bool) -> Tensor:
    """``(B, H, L)``: ``npairs(i) · exp(mean_{j,l} s(i,j,l)) ≤ Σ_{j,l} exp(s(i,j,l))`` (Jensen), in O(L·D):
    the mean over pairs factors, ``scale · Σ_d q[i,d] mean_j k1[j,d] mean_l k2[l,d]`` (prefix means when
    causal)."""
    if causal:
        n = torch.arange(1, q.shape[2] + 1, device=q.device, dtype=q.dtype)[:, None]
        m1, m2 = k1.cumsum(2) / n, k2.cumsum(2) / n
        npairs = n[:, 0] ** 2
    else:
        m1, m2 = k1.mean(2, keepdim=True), k2.mean(2, keepdim=True)
        npairs = torch.tensor(float(k1.shape[2] * k2.shape[2]), device=q.device, dtype=q.dtype)
    mean = scale * (q * m1 * m2).sum(-1)
    return npairs * torch.exp(mean.clamp(max=80.0))


def poly_tensor_attention_reference(q: Tensor, k1: Tensor, k2: Tensor, v1: Tensor, v2: Tensor,
                                    coeffs: Tensor | list[float], scale: float | None = None,
                                    causal: bool = False) -> Tensor:
    """Tensor attention with softmax's exp replaced by ``p(x) = Σ a_m x^m``, normalised, in float64:
    ``out[i] = Σ_{j,l} p(s_ijl) v1[j]⊙v2[l] / Σ_{j,l} p(s_ijl)`` (j, l ≤ i when causal). Forms the
    ``(B, H, L, L1, L2)`` tensor: small inputs only. Shapes as in :func:`lowrank_tensor_attention`;
    coeffs ``(p+1,)`` (kept in float64: pass a list or a float64 tensor); returns ``(B, H, L, Dv)`` float64."""
    q, k1, k2, v1, v2 = (x.double() for x in (q, k1, k2, v1, v2))
    coeffs = torch.as_tensor(coeffs, dtype=torch.float64)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    w = _poly(scale * torch.einsum("bhid,bhjd,bhld->bhijl", q, k1, k2), coeffs)
    if causal:
        i = torch.arange(q.shape[2], device=q.device)
        w = w * ((i[None, :] <= i[:, None])[:, :, None] & (i[None, :] <= i[:, None])[:, None, :])
    num = torch.einsum("bhijl,bhjv,bhlv->bhiv", w, v1, v2)
    return num / w.sum((-1, -2))[..., None]


# ------------------------------------------------------------------------------------------------
# Public op
# ------------------------------------------------------------------------------------------------


def _check(q, k1, k2, v1, v2, degree, method, rank, fit, radius, causal) -> None:
    names = ("q", "k1", "k2", "v1", "v2")
    for name, x in zip(names, (q, k1, k2, v1, v2)):
        if not isinstance(x, Tensor) or x.dim() != 4:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a 4-D tensor (B, H, L, D), got {got}")
    if not all(x.dtype == q.dtype for x in (k1, k2, v1, v2)) or not q.is_floating_point():
        raise TypeError(f"q, k1, k2, v1, v2 must share one float dtype, got "
                        f"{', '.join(str(x.dtype) for x in (q, k1, k2, v1, v2))}")
    shapes = " ".join(f"{n}{tuple(x.shape)}" for n, x in zip(names, (q, k1, k2, v1, v2)))
    for name, x in (("k1", k1), ("k2", k2)):
        if x.shape[:2] != q.shape[:2] or x.shape[-1] != q.shape[-1]:
            raise ValueError(f"{name} must be (B, H, L_{name[-1]}, D) with q's B, H and D; got {shapes}")
    for name, v, k in (("v1", v1, k1), ("v2", v2, k2)):
        if v.shape[:3] != k.shape[:3]:
            raise ValueError(f"{name} must be (B, H, L_{name[-1]}, Dv) matching k{name[-1]}'s first three dims; "
                             f"got {shapes}")
    if k1.shape[2] == 0 or k2.shape[2] == 0:
        raise ValueError(f"k1 and k2 need at least one position each (softmax over no pairs); got {shapes}")
    if v1.shape[-1] != v2.shape[-1]:
        raise ValueError(f"v1 and v2 must have the same last dim Dv (out = Σ P·v1⊙v2); got {shapes}")
    if causal and not (q.shape[2] == k1.shape[2] == k2.shape[2]):
        raise ValueError(f"causal=True needs L == L1 == L2 (pairs j, l ≤ i); got {shapes}")
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 0:
        raise ValueError(f"degree must be an int >= 0, got {degree!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    if radius is not None and not (float(radius) > 0 and math.isfinite(float(radius))):
        raise ValueError(f"radius must be a positive finite number, got {radius!r}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be None or an int >= 1, got {rank!r}")
    D = q.shape[-1]
    if method == "random" and rank is None:
        raise ValueError("method='random' needs rank= (the number of random features)")
    if method == "poly":
        full = feature_rank(D, degree)
        if rank is not None and rank < full:
            raise ValueError(f"rank={rank} is below the exact rank C(D+p, p) = {full} of method='poly' "
                             f"(D={D}, degree={degree}); use method='random' for a random-projection rank cap")
        if full > MAX_EXACT_RANK:
            raise ValueError(f"degree={degree} with D={D} needs {full} exact features (> {MAX_EXACT_RANK}); "
                             "lower degree or use method='random' with rank=")


def lowrank_tensor_attention(q: Tensor, k1: Tensor, k2: Tensor, v1: Tensor, v2: Tensor, scale: float | None = None,
                             degree: int = 2, method: str = "poly", rank: int | None = None,
                             seed: int | None = None, causal: bool = False, fit: str = "taylor",
                             radius: float | None = None, return_info: bool = False):
    """Tensor attention with exp replaced by a degree-p polynomial, in O(L · rank · Dv) (module docstring).

    Args:
        q: ``(B, H, L, D)``; k1: ``(B, H, L1, D)``; k2: ``(B, H, L2, D)``; v1: ``(B, H, L1, Dv)``;
            v2: ``(B, H, L2, Dv)``; one float dtype (computed in float32, float64 for float64 inputs).
        scale: s = scale · Σ_d q k1 k2; default ``D ** -0.5``.
        degree: p, the polynomial degree (0 = uniform average over pairs). The default 2 keeps the
            exact rank practical up to D ≈ 128 (C(D+2, 2): 2145 at D=64); even Taylor degrees are
            positive everywhere, so the denominator cannot go negative.
        method: ``"poly"`` — exact symmetric features, rank ``C(D+p, p)`` (:func:`feature_rank`);
            ``"random"`` — ``rank`` of those features: low degrees exact, higher degrees sampled
            (unbiased numerator and denominator; module docstring).
        rank: ``"random"``: the number of features (required); ``"poly"``: None, or ≥ the exact rank.
        seed: seeds the sampling (``"random"``); None draws a seed from torch's global generator.
        causal: pairs with j ≤ i and l ≤ i only (needs L == L1 == L2).
        fit: ``"taylor"`` — Σ x^m/m! (exact at 0: best when most scores are small, as measured on
            random bounded inputs); ``"chebyshev"`` — interpolant of exp on [−radius, radius]
            (uniform error on the interval: for scores that fill it).
        radius: the Chebyshev interval; default :func:`score_bound` (a proven bound on |s|, often
            ~2× the largest score actually present). A smaller radius fits typical scores better.
        return_info: also return a :class:`LowRankInfo` (bounds, rank, clamped rows).

    Returns:
        ``(B, H, L, Dv)`` in q's dtype (and the info when ``return_info``). Differentiable by autograd.

    Accurate when ``score_bound`` R is O(1) (entries bounded by B with scale·D·B³ small); the error
    falls like R^{p+1}/(p+1)! (poly) plus sampling noise that vanishes at the exact rank (random).
    Rows whose approximated denominator is below ``DEN_FLOOR`` times the Jensen lower bound of the
    true one are clamped to it and reported (RuntimeWarning, ``LowRankInfo.clamped_rows``).
    """
    _check(q, k1, k2, v1, v2, degree, method, rank, fit, radius, causal)
    D = q.shape[-1]
    scale = D ** -0.5 if scale is None else float(scale)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qa, k1a, k2a, v1a, v2a = (x.to(acc) for x in (q, k1, k2, v1, v2))
    R = score_bound(q, k1, k2, scale)
    rad = R if radius is None else float(radius)
    coeffs = poly_coefficients(degree, rad, fit)
    rng = None
    if method == "random":  # only the random method touches torch's global generator (seed=None)
        rng = random.Random(int(torch.randint(2**62, (1,)).item()) if seed is None else int(seed))
    rho = _typical_score(q, k1, k2, scale, rng) if rng is not None else 0.0
    plan = _plan(D, coeffs, rank if method == "random" else None, rho)
    exact = [m for m, how in plan.items() if how == "exact"]
    parts = [poly_features(qa, k1a, k2a, coeffs, scale, exact)] if exact else []
    for m, how in plan.items():
        if how != "exact" and how > 0:
            parts.append(sampled_features(qa, k1a, k2a, float(coeffs[m]), scale, m, int(how), rng))
    fq, f1, f2 = (torch.cat(fs, -1) for fs in zip(*parts))
    num, den = _contract(fq, f1, f2, v1a, v2a, causal)
    floor = DEN_FLOOR * _jensen_bound(qa.detach(), k1a.detach(), k2a.detach(), scale, causal)
    low = den.detach() < floor
    clamped = int(low.sum())
    if clamped:
        warnings.warn(f"lowrank_tensor_attention: {clamped} (batch, head, query) row(s) had an approximated "
                      f"denominator below {DEN_FLOOR:g}× a lower bound of the exact one (score bound R = {R:.3g}, "
                      f"degree {degree}, fit {fit!r}, method {method!r}): the approximation is not accurate on "
                      "these scores; clamped, their outputs are unreliable. Raise degree / rank, use an even "
                      "Taylor degree, or bound the entries.", RuntimeWarning, stacklevel=2)
        den = torch.where(low, floor.expand_as(den), den)
    out = (num / den[..., None]).to(q.dtype)
    if not return_info:
        return out
    info = LowRankInfo(method, degree, fit, coeffs.tolist(), entry_bound(q, k1, k2), R, rad, fq.shape[-1],
                       plan, clamped)
    return out, info
