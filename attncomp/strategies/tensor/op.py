"""Exact tensor (higher-order, 2-simplicial) attention (the "tensor" strategy):
``attncomp::tensor_fwd`` / ``attncomp::tensor_bwd``.

Per batch and head, with queries ``i``, first keys ``j`` (``k1``, ``v1``) and second keys ``l``
(``k2``, ``v2``)::

    s(i, j, l) = scale · Σ_d q[i, d] · k1[j, d] · k2[l, d]          (scale defaults to 1/sqrt(D))
    P(i, ·, ·) = softmax of s(i, ·, ·) over all visible pairs (j, l)
    out[i]     = Σ_{j, l} P(i, j, l) · (v1[j] ⊙ v2[l])               lse[i] = logsumexp_{j,l} s(i, j, l)

Visibility: every pair (non-causal); ``j ≤ i`` and ``l ≤ i`` (causal); ``i − w1 < j ≤ i`` and
``i − w2 < l ≤ i`` (``window=(w1, w2)``, the causal sliding window of 2-simplicial attention).
A query that sees no pair (only possible when ``k1`` or ``k2`` has length 0) gets ``out = 0`` and
``lse = -inf``; its gradients are 0.

Backward, with ``dP(i, j, l) = Σ_e dout[i, e] v1[j, e] v2[l, e]``, ``δ_i = Σ_e dout[i, e] out[i, e]``
and ``dS = P ⊙ (dP − δ)``::

    dq[i]  = scale · Σ_{j,l} dS · (k1[j] ⊙ k2[l])      dv1[j] = Σ_{i,l} P · (dout[i] ⊙ v2[l])
    dk1[j] = scale · Σ_{i,l} dS · (q[i] ⊙ k2[l])       dv2[l] = Σ_{i,j} P · (dout[i] ⊙ v1[j])
    dk2[l] = scale · Σ_{i,j} dS · (q[i] ⊙ k1[j])

The fast paths never build the ``(Lq, L1, L2)`` score cube: for a fixed key ``j``,
``s(i, j, ·) = (q[i] ⊙ k1[j]) · k2ᵀ`` is one matrix product, and the softmax runs online over the
flattened (j, l) pairs (running max and sum). The problem is symmetric in (k1, v1, w1) ↔ (k2, v2, w2);
:func:`tensor_attention` orients it so that the inner, tiled index ``l`` has the smaller window
(or, without a window, the longer key sequence).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from attncomp.runtime.device import use_triton

__all__ = ["tensor_attention", "tensor_attention_reference"]

# Elements of one CPU score block (B·H·queries·keys j·keys l): bounds the executor's working memory.
CPU_BUDGET = 1 << 20  # 4 MiB of f32 scores: measured faster than larger blocks (cache)


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------


def _check(q, k1, k2, v1, v2, scale, window, causal) -> tuple[float, bool, int, int]:
    """Validate the public arguments; returns ``(scale, causal, w1, w2)`` with the windows clamped to
    ``[1, L]`` (``L`` when there is none, i.e. plain causal; unused when not causal)."""
    named = (("q", q), ("k1", k1), ("k2", k2), ("v1", v1), ("v2", v2))
    for name, t in named:
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, L, D), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; all inputs must share one dtype")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
        if t.shape[:2] != q.shape[:2]:
            raise ValueError(f"{name} has (B, H) = {tuple(t.shape[:2])} but q has {tuple(q.shape[:2])}")
    B, H, Lq, D = q.shape
    for name, t in (("k1", k1), ("k2", k2)):
        if t.shape[3] != D:
            raise ValueError(f"{name} has head dim {t.shape[3]} but q has {D}")
    for name, v, k in (("v1", v1, k1), ("v2", v2, k2)):
        if v.shape[2] != k.shape[2]:
            raise ValueError(f"{name} has length {v.shape[2]} but k{name[1]} has {k.shape[2]}")
    if v1.shape[3] != v2.shape[3]:
        raise ValueError(f"v1 and v2 must share the value dim (out = Σ P·(v1 ⊙ v2)), got {v1.shape[3]} "
                         f"and {v2.shape[3]}")
    if scale is None:
        scale = 1.0 / math.sqrt(D) if D > 0 else 1.0
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite float or None, got {scale!r}")
    if window is not None:
        if (not isinstance(window, (tuple, list)) or len(window) != 2
                or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in window)):
            raise ValueError(f"window must be a pair of ints (w1, w2) >= 1, got {window!r}")
        causal = True  # the window is the trailing (causal) one
    causal = bool(causal)
    if causal and not (Lq == k1.shape[2] == k2.shape[2]):
        raise ValueError(f"causal / window attention needs k1, k2 as long as q (Lq == L1 == L2), got "
                         f"Lq={Lq}, L1={k1.shape[2]}, L2={k2.shape[2]}")
    L = max(Lq, 1)
    w1, w2 = (L, L) if window is None else (min(int(window[0]), L), min(int(window[1]), L))
    return float(scale), causal, w1, w2


# ------------------------------------------------------------------------------------------------
# Reference: the materialised score cube, float64
# ------------------------------------------------------------------------------------------------


def _visible(Lq: int, L1: int, L2: int, causal: bool, w1: int, w2: int, device,
             starts: tuple[int, int, int] = (0, 0, 0)) -> Tensor | None:
    """Bool ``(Lq, L1, L2)`` visibility of queries ``starts[0] + [0, Lq)``, keys j ``starts[1] + [0, L1)``
    and keys l ``starts[2] + [0, L2)``; None when not causal (all visible)."""
    if not causal:
        return None
    i, j, l = (torch.arange(n, device=device) + s0 for n, s0 in zip((Lq, L1, L2), starts))  # noqa: E741
    vj = (j[None, :] <= i[:, None]) & (j[None, :] > i[:, None] - w1)
    vl = (l[None, :] <= i[:, None]) & (l[None, :] > i[:, None] - w2)
    return vj[:, :, None] & vl[:, None, :]


def tensor_attention_reference(q: Tensor, k1: Tensor, k2: Tensor, v1: Tensor, v2: Tensor,
                               scale: float | None = None, window: tuple[int, int] | None = None,
                               causal: bool = False) -> Tensor:
    """The definition (module docstring), computed naively in float64 with the full
    ``(B, H, Lq, L1, L2)`` score cube: O(L³) memory, the reference the fast paths are tested against.

    Shapes and arguments as :func:`tensor_attention`; differentiable. Returns ``(B, H, Lq, Dv)``
    float64."""
    scale, causal, w1, w2 = _check(q, k1, k2, v1, v2, scale, window, causal)
    q, k1, k2, v1, v2 = (t.double() for t in (q, k1, k2, v1, v2))
    B, H, Lq, _ = q.shape
    L1, L2 = k1.shape[2], k2.shape[2]
    s = torch.einsum("bhid,bhjd,bhld->bhijl", q, k1, k2) * scale
    vis = _visible(Lq, L1, L2, causal, w1, w2, q.device)
    if vis is not None:
        s = s.masked_fill(~vis, float("-inf"))
    p = torch.softmax(s.reshape(B, H, Lq, L1 * L2), -1).reshape(s.shape).nan_to_num(0.0)
    return torch.einsum("bhijl,bhje,bhle->bhie", p, v1, v2)


# ------------------------------------------------------------------------------------------------
# CPU executor (no score cube; at most CPU_BUDGET scores at a time). Two paths:
#  * blocked (no window, or a wide one): query blocks × chunks of keys j × all visible keys l, an
#    online softmax across the j chunks; the products are matmuls, s(i, j, ·) = (q_i ⊙ k1_j) · k2ᵀ.
#  * gathered (windows up to L/2): each query's own (w1, w2) window of k1 / k2 as strided views,
#    a plain softmax over its w1·w2 pairs, in chunks of queries (no masked pairs but the borders).
# ------------------------------------------------------------------------------------------------


def _plan(BH: int, Lq: int, L1: int, L2: int, causal: bool, w1: int, w2: int) -> tuple[int, int]:
    """(query block, j chunk) sizes: a query block near the smaller window (few masked pairs),
    j chunks as long as the score block ``BH · bq · cj · nl`` stays within :data:`CPU_BUDGET`."""
    bq = max(1, min(64, Lq, max(16, min(w1, w2)) if causal else 64))
    nl = min(L2, bq + w2 - 1) if causal else L2
    cj = max(1, CPU_BUDGET // max(1, BH * bq * max(nl, 1)))
    return bq, cj


def _ranges(i0: int, i1: int, L1: int, L2: int, causal: bool, w1: int, w2: int):
    """Keys j and l any query of [i0, i1) can see: ``(ja, jb), (la, lb)``."""
    if not causal:
        return (0, L1), (0, L2)
    return (max(0, i0 - w1 + 1), min(L1, i1)), (max(0, i0 - w2 + 1), min(L2, i1))


def _blocks(Lq, L1, L2, causal, w1, w2, bq, cj, device):
    """Yield ``(i0, i1, la, lb, [(j0, j1, mask or None)])`` for the CPU executors; the mask is bool
    ``(nq, cj, nl)`` (None when every pair of the block is visible)."""
    for i0 in range(0, Lq, bq):
        i1 = min(Lq, i0 + bq)
        (ja, jb), (la, lb) = _ranges(i0, i1, L1, L2, causal, w1, w2)
        chunks = []
        for j0 in range(ja, jb if lb > la else ja, cj):  # no l: nothing to see
            j1 = min(jb, j0 + cj)
            mask = None
            if causal:
                vis = _visible(i1 - i0, j1 - j0, lb - la, True, w1, w2, device, (i0, j0, la))
                mask = None if bool(vis.all()) else vis
            chunks.append((j0, j1, mask))
        yield i0, i1, la, lb, chunks


def _mm(x: Tensor, y: Tensor) -> Tensor:
    """``(B, H, n, c, K) @ (B, H, K, N) → (B, H, n, c, N)`` as one product per (b, h)."""
    B, H, n, c, K = x.shape
    return (x.reshape(B, H, n * c, K) @ y).view(B, H, n, c, y.shape[-1])


def _scores(qb: Tensor, k1c: Tensor, k2b: Tensor, scale: float, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """``s (B, H, nq, c, nl)`` and ``q ⊙ k1 (B, H, nq, c, D)`` for a query block, j chunk, l range."""
    qk1 = qb[:, :, :, None, :] * k1c[:, :, None, :, :]
    s = _mm(qk1, k2b.transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return s, qk1


# Narrow windows: every query's own (w1, w2) window, gathered as strided views (no masked blocks).


def _gathered(BH: int, L: int, causal: bool, w1: int, w2: int) -> int:
    """Queries per chunk of the gathered-window path, or 0 when the blocked path is used (no window,
    a window wider than L/2, or one query's ``w1 · w2`` scores over the budget)."""
    if not causal or max(w1, w2) > L // 2 or BH * w1 * w2 > CPU_BUDGET:
        return 0
    return max(1, CPU_BUDGET // (BH * w1 * w2))


def _windows(x: Tensor, w: int) -> tuple[Tensor, Tensor]:
    """``(B, H, L, w, E)`` view whose row i holds ``x[i − w + 1 .. i]`` (zero rows before 0), and the
    bool ``(L, w)`` validity of its entries."""
    L = x.shape[2]
    xw = torch.nn.functional.pad(x, (0, 0, w - 1, 0)).unfold(2, w, 1).transpose(-1, -2)
    a = torch.arange(w, device=x.device)
    valid = a[None, :] >= (w - 1 - torch.arange(L, device=x.device))[:, None]
    return xw, valid


def _window_scores(qc, k1w, k2w, scale):
    """Scores ``(B, H, nq, w1, w2)`` of a query chunk over its windows (-inf outside the sequence)
    and ``q ⊙ k1 (B, H, nq, w1, D)``; k1w / k2w are ``(view, valid)`` pairs sliced to the chunk."""
    (k1v, ok1), (k2v, ok2) = k1w, k2w
    qk1 = qc[:, :, :, None, :] * k1v
    s = (qk1 @ k2v.transpose(-1, -2)) * scale
    return s.masked_fill(~(ok1[:, :, None] & ok2[:, None, :]), float("-inf")), qk1


def _fwd_gathered(q, k1, k2, v1, v2, scale, w1, w2, nq):
    B, H, L, _ = q.shape
    K1, K2, V1, V2 = _windows(k1, w1), _windows(k2, w2), _windows(v1, w1)[0], _windows(v2, w2)[0]
    out = torch.empty(B, H, L, v1.shape[3], dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, L, dtype=q.dtype, device=q.device)
    for i0 in range(0, L, nq):
        c = slice(i0, min(L, i0 + nq))
        s, _ = _window_scores(q[:, :, c], (K1[0][:, :, c], K1[1][c]), (K2[0][:, :, c], K2[1][c]), scale)
        lse[:, :, c] = s.flatten(-2).logsumexp(-1)  # j = l = i is always visible: finite
        p = torch.exp(s - lse[:, :, c, None, None])
        out[:, :, c] = ((p @ V2[:, :, c]) * V1[:, :, c]).sum(3)
    return out, lse


def _bwd_gathered(do, q, k1, k2, v1, v2, lse, delta, scale, w1, w2, nq):
    B, H, L, D = q.shape
    K1, K2, V1, V2 = _windows(k1, w1), _windows(k2, w2), _windows(v1, w1)[0], _windows(v2, w2)[0]
    dq = torch.empty_like(q)
    # Window gradients land on padded key positions: row i, window slot a is padded index i + a.
    dk1, dk2 = (q.new_zeros(B, H, L + w - 1, D) for w in (w1, w2))
    dv1, dv2 = (q.new_zeros(B, H, L + w - 1, v1.shape[3]) for w in (w1, w2))
    for i0 in range(0, L, nq):
        i1 = min(L, i0 + nq)
        c = slice(i0, i1)
        qc, doc = q[:, :, c], do[:, :, c]
        k1c, k2c, v1c, v2c = K1[0][:, :, c], K2[0][:, :, c], V1[:, :, c], V2[:, :, c]
        s, qk1 = _window_scores(qc, (k1c, K1[1][c]), (k2c, K2[1][c]), scale)
        p = torch.exp(s - lse[:, :, c, None, None])
        dov1 = doc[:, :, :, None, :] * v1c  # (B, H, nq, w1, Dv)
        ds = p * (dov1 @ v2c.transpose(-1, -2) - delta[:, :, c, None, None])
        t = ds @ k2c  # (B, H, nq, w1, D)
        dq[:, :, c] = (t * k1c).sum(3) * scale
        g1 = (t * qc[:, :, :, None, :] * scale, (p @ v2c) * doc[:, :, :, None, :])  # dk1, dv1 windows
        g2 = ((ds.transpose(-1, -2) @ qk1) * scale, p.transpose(-1, -2) @ dov1)  # dk2, dv2 windows
        for w, (gk, gv), (dk, dv) in ((w1, g1, (dk1, dv1)), (w2, g2, (dk2, dv2))):
            for a in range(w):
                dk[:, :, i0 + a:i1 + a] += gk[:, :, :, a]
                dv[:, :, i0 + a:i1 + a] += gv[:, :, :, a]
    return dq, dk1[:, :, w1 - 1:], dk2[:, :, w2 - 1:], dv1[:, :, w1 - 1:], dv2[:, :, w2 - 1:]


def _cpu_fwd(q, k1, k2, v1, v2, scale, causal, w1, w2):
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k1, k2, v1, v2 = (t.to(acc) for t in (q, k1, k2, v1, v2))
    B, H, Lq, _ = q.shape
    L1, L2, Dv = k1.shape[2], k2.shape[2], v1.shape[3]
    nq = _gathered(B * H, Lq, causal, w1, w2)
    if nq:
        return _fwd_gathered(q, k1, k2, v1, v2, scale, w1, w2, nq)
    out = torch.zeros(B, H, Lq, Dv, dtype=acc, device=q.device)
    lse = torch.full((B, H, Lq), float("-inf"), dtype=acc, device=q.device)
    bq, cj = _plan(B * H, Lq, L1, L2, causal, w1, w2)
    for i0, i1, la, lb, chunks in _blocks(Lq, L1, L2, causal, w1, w2, bq, cj, q.device):
        qb, k2b, v2b = q[:, :, i0:i1], k2[:, :, la:lb], v2[:, :, la:lb]
        m = torch.full((B, H, i1 - i0), float("-inf"), dtype=acc, device=q.device)
        total = torch.zeros_like(m)
        o = torch.zeros(B, H, i1 - i0, Dv, dtype=acc, device=q.device)
        for j0, j1, mask in chunks:
            s, _ = _scores(qb, k1[:, :, j0:j1], k2b, scale, mask)
            m_new = torch.maximum(m, s.amax((-1, -2)))
            m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # all-masked rows
            p = torch.exp(s - m_safe[..., None, None])
            alpha = torch.exp(m - m_safe)
            total = total * alpha + p.sum((-1, -2))
            # Σ_{j,l} p·(v1[j] ⊙ v2[l]) = Σ_j v1[j] ⊙ (p[:, j] @ v2)
            pv = _mm(p, v2b) * v1[:, :, None, j0:j1]
            o = o * alpha[..., None] + pv.sum(3)
            m = m_new
        seen = total > 0
        out[:, :, i0:i1] = torch.where(seen[..., None], o / torch.where(seen, total, 1.0)[..., None], 0.0)
        lse[:, :, i0:i1] = torch.where(seen, m + torch.log(torch.where(seen, total, 1.0)), float("-inf"))
    return out, lse


def _cpu_bwd(dout, q, k1, k2, v1, v2, out, lse, scale, causal, w1, w2):
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dtypes = [t.dtype for t in (q, k1, k2, v1, v2)]
    q, k1, k2, v1, v2, do = (t.to(acc) for t in (q, k1, k2, v1, v2, dout))
    delta = (do * out.to(acc)).sum(-1)
    # A row that sees nothing (lse = -inf) has P = 0: exp(s - inf).
    lse = torch.where(torch.isinf(lse), float("inf"), lse.to(acc))
    B, H, Lq, _ = q.shape
    L1, L2 = k1.shape[2], k2.shape[2]
    nq = _gathered(B * H, Lq, causal, w1, w2)
    if nq:
        grads = _bwd_gathered(do, q, k1, k2, v1, v2, lse, delta, scale, w1, w2, nq)
        return tuple(g.to(dt) for g, dt in zip(grads, dtypes))
    dq, dk1, dk2, dv1, dv2 = (torch.zeros_like(t) for t in (q, k1, k2, v1, v2))
    bq, cj = _plan(B * H, Lq, L1, L2, causal, w1, w2)
    for i0, i1, la, lb, chunks in _blocks(Lq, L1, L2, causal, w1, w2, bq, cj, q.device):
        qb, k2b, v2b, dob = q[:, :, i0:i1], k2[:, :, la:lb], v2[:, :, la:lb], do[:, :, i0:i1]
        lb_, db_ = lse[:, :, i0:i1, None, None], delta[:, :, i0:i1, None, None]
        nq, nl = i1 - i0, lb - la
        for j0, j1, mask in chunks:
            k1c, v1c = k1[:, :, j0:j1], v1[:, :, j0:j1]
            s, qk1 = _scores(qb, k1c, k2b, scale, mask)
            p = torch.exp(s - lb_)  # (B, H, nq, c, nl)
            dov1 = dob[:, :, :, None, :] * v1c[:, :, None]  # (B, H, nq, c, Dv)
            dp = _mm(dov1, v2b.transpose(-1, -2))
            ds = p * (dp - db_)
            t = _mm(ds, k2b)  # Σ_l dS·k2[l]: (B, H, nq, c, D)
            dq[:, :, i0:i1] += (t * k1c[:, :, None]).sum(3) * scale
            dk1[:, :, j0:j1] += (t * qb[:, :, :, None]).sum(2) * scale
            c = j1 - j0
            dk2[:, :, la:lb] += (ds.reshape(B, H, nq * c, nl).transpose(-1, -2)
                                 @ qk1.reshape(B, H, nq * c, -1)) * scale
            u = _mm(p, v2b)  # Σ_l P·v2[l]: (B, H, nq, c, Dv)
            dv1[:, :, j0:j1] += (u * dob[:, :, :, None]).sum(2)
            dv2[:, :, la:lb] += p.reshape(B, H, nq * c, nl).transpose(-1, -2) @ dov1.reshape(B, H, nq * c, -1)
    return tuple(g.to(dt) for g, dt in zip((dq, dk1, dk2, dv1, dv2), dtypes))


# ------------------------------------------------------------------------------------------------
# Custom ops
# ------------------------------------------------------------------------------------------------


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.custom_op("attncomp::tensor_fwd", mutates_args=())
def tensor_fwd(q: Tensor, k1: Tensor, k2: Tensor, v1: Tensor, v2: Tensor, scale: float, causal: bool,
               w1: int, w2: int) -> tuple[Tensor, Tensor]:
    """Tensor attention forward (module docstring) on validated, oriented inputs: q ``(B, H, Lq, D)``,
    k1 ``(B, H, L1, D)``, k2 ``(B, H, L2, D)``, v1 ``(B, H, L1, Dv)``, v2 ``(B, H, L2, Dv)``; windows
    ``1 <= w <= L`` (used when causal). Returns out ``(B, H, Lq, Dv)`` in q's dtype and lse
    ``(B, H, Lq)`` (float32; float64 for float64 inputs)."""
    if use_triton(q):
        from attncomp.strategies.tensor import launcher as triton_tensor
        out, lse = triton_tensor.tensor_fwd(q, k1, k2, v1, v2, scale, causal, w1, w2)
    else:
        out, lse = _cpu_fwd(q, k1, k2, v1, v2, scale, causal, w1, w2)
    return out.to(q.dtype).contiguous(), lse.to(_lse_dtype(q)).contiguous()


@tensor_fwd.register_fake
def _(q, k1, k2, v1, v2, scale, causal, w1, w2):
    return q.new_empty(*q.shape[:-1], v1.shape[-1]), q.new_empty(q.shape[:-1], dtype=_lse_dtype(q))


@torch.library.custom_op("attncomp::tensor_bwd", mutates_args=())
def tensor_bwd(dout: Tensor, q: Tensor, k1: Tensor, k2: Tensor, v1: Tensor, v2: Tensor, out: Tensor, lse: Tensor,
               scale: float, causal: bool, w1: int, w2: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dq, dk1, dk2, dv1, dv2) of :func:`tensor_fwd`, P recomputed from the saved lse."""
    if use_triton(q):
        from attncomp.strategies.tensor import launcher as triton_tensor
        grads = triton_tensor.tensor_bwd(dout, q, k1, k2, v1, v2, out, lse, scale, causal, w1, w2)
    else:
        grads = _cpu_bwd(dout, q, k1, k2, v1, v2, out, lse, scale, causal, w1, w2)
    return tuple(g.to(t.dtype).contiguous() for g, t in zip(grads, (q, k1, k2, v1, v2)))


@tensor_bwd.register_fake
def _(dout, q, k1, k2, v1, v2, out, lse, scale, causal, w1, w2):
    return tuple(t.new_empty(t.shape) for t in (q, k1, k2, v1, v2))


def _setup(ctx, inputs, output):
    *tensors, scale, causal, w1, w2 = inputs
    ctx.save_for_backward(*tensors, *output)
    ctx.args = (scale, causal, w1, w2)


def _backward(ctx, dout, dlse):
    q, k1, k2, v1, v2, out, lse = ctx.saved_tensors
    grads = tensor_bwd(dout.contiguous(), q, k1, k2, v1, v2, out, lse, *ctx.args)
    return (*grads, None, None, None, None)


tensor_fwd.register_autograd(_backward, setup_context=_setup)


# ------------------------------------------------------------------------------------------------
# Public op
# ------------------------------------------------------------------------------------------------


def tensor_attention(q: Tensor, k1: Tensor, k2: Tensor, v1: Tensor, v2: Tensor, scale: float | None = None,
                     window: tuple[int, int] | None = None, causal: bool = False) -> Tensor:
    """Exact tensor (2-simplicial) attention over key pairs, without the score cube.

    Args:
        q: ``(B, H, Lq, D)``; k1: ``(B, H, L1, D)``; v1: ``(B, H, L1, Dv)``; k2: ``(B, H, L2, D)``;
            v2: ``(B, H, L2, Dv)``. One float dtype (float32 / float16 / bfloat16 / float64; computed
            in float32, float64 for float64), one device. Differentiable in all five.
        scale: multiplies the trilinear score ``Σ_d q·k1·k2``; default ``1/sqrt(D)`` (as in
            2-simplicial attention).
        window: ``(w1, w2)`` ints >= 1: query i sees ``i − w1 < j ≤ i`` and ``i − w2 < l ≤ i``.
            A window implies causal; a window >= L is plain causal.
        causal: ``j ≤ i`` and ``l ≤ i``. Causal and windowed attention need ``Lq == L1 == L2``.

    Returns:
        ``(B, H, Lq, Dv)`` in q's dtype: ``Σ_{j,l} softmax(s)(i, j, l) · v1[j] ⊙ v2[l]``. A query that
        sees no pair (a key sequence of length 0) gets zeros.
    """
    scale, causal, w1, w2 = _check(q, k1, k2, v1, v2, scale, window, causal)
    # Orientation: the inner (tiled) keys l get the smaller window, or without a window the longer
    # sequence; the op is symmetric under (k1, v1, w1) <-> (k2, v2, w2).
    if (w2 > w1) if causal else (k2.shape[2] < k1.shape[2]):
        k1, k2, v1, v2, w1, w2 = k2, k1, v2, v1, w2, w1
    out, _ = torch.ops.attncomp.tensor_fwd(q, k1, k2, v1, v2, scale, causal, w1, w2)
    return out
