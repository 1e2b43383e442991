"""Linear attention (the "linear" strategy): ``attncomp::linear_fwd`` / ``attncomp::linear_bwd``.

With features ``φq = φ(q)``, ``φk = φ(k)`` and a per-head decay ``λ`` (1 when there is none)::

    causal      num_t = Σ_{s≤t} λ^{t-s} (φq_t·φk_s) v_s     den_t = Σ_{s≤t} λ^{t-s} φq_t·φk_s
    non-causal  num   = φQ (φKᵀ V)                        den   = φQ (φKᵀ 1)
    out = num / (den + EPS)  (normalize)   or   out = num  (not normalize)

i.e. the recurrence ``S_t = λ·S_{t-1} + φk_tᵀ v_t``, ``z_t = λ·z_{t-1} + φk_t``, ``num_t = φq_t S_t``,
``den_t = φq_t·z_t``. The causal fast paths are chunked (Lightning Attention's intra/inter split):
inside a chunk the masked quadratic product with decay powers, across chunks ``φQ_chunk·S`` with the
state carried (decayed) from the previous chunks.

The backward reuses the same chunk scan: with ``v' = [v, 1]`` and ``g' = [dnum, dden]``
(``dnum = dout/(den+EPS)``, ``dden = -(dout·out)/(den+EPS)``)::

    dφq = scan(q=g', k=v', v=φk)                 (causal)
    dφk = flip(scan(q=flip v', k=flip g', v=flip φq))   (anti-causal = causal on the reversed sequence)
    dv' = flip(scan(q=flip φk, k=flip φq, v=flip g'))

then ``dq = dφq·φ'(q)``, ``dk = dφk·φ'(k)``, ``dv = dv'[..., :Dv]``. The decay is a constant (no grad).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from attncomp.runtime import validate
from attncomp.runtime.device import use_triton

__all__ = ["EPS", "FEATURES", "linear_attention", "linear_attention_reference", "scan", "torch_scan"]

EPS = 1e-6  # added to the normaliser: out = num / (den + EPS)
FEATURES = ("elu1", "relu", "identity")


# ------------------------------------------------------------------------------------------------
# Feature maps
# ------------------------------------------------------------------------------------------------


def feature(x: Tensor, name: str) -> Tensor:
    """φ(x) elementwise: ``elu1`` = elu(x) + 1 (> 0), ``relu``, ``identity``."""
    if name == "elu1":
        return F.elu(x) + 1.0
    if name == "relu":
        return torch.relu(x)
    return x


def feature_grad(x: Tensor, name: str) -> Tensor:
    """φ'(x): elu1 → 1 (x > 0) else exp(x); relu → 1 (x > 0) else 0; identity → 1."""
    if name == "elu1":
        return torch.where(x > 0, torch.ones_like(x), torch.exp(x))
    if name == "relu":
        return (x > 0).to(x.dtype)
    return torch.ones_like(x)


# ------------------------------------------------------------------------------------------------
# Reference (float64, a python loop over t)
# ------------------------------------------------------------------------------------------------


def linear_attention_reference(q: Tensor, k: Tensor, v: Tensor, feature_map: str | Callable = "elu1",
                               causal: bool = False, decay: Tensor | None = None,
                               normalize: bool = True) -> Tensor:
    """The recurrence, one step per position, in float64 (differentiable, slow).

    q, k ``(B, H, L, D)``; v ``(B, H, L, Dv)``; decay ``(H,)`` or None. Returns ``(B, H, L, Dv)``
    float64."""
    fq, fk, vv = _apply_feature(q.double(), feature_map), _apply_feature(k.double(), feature_map), v.double()
    B, H, L, D = q.shape
    lam = torch.ones(H, dtype=torch.float64) if decay is None else decay.double().to(q.device)
    lam = lam.view(1, H, 1, 1)
    if not causal:
        num = fq @ (fk.transpose(-1, -2) @ vv)
        den = fq @ fk.sum(2, keepdim=True).transpose(-1, -2)
        return num / (den + EPS) if normalize else num
    S = torch.zeros(B, H, D, v.shape[-1], dtype=torch.float64, device=q.device)
    z = torch.zeros(B, H, D, 1, dtype=torch.float64, device=q.device)
    outs = []
    for t in range(L):
        S = lam * S + fk[:, :, t, :, None] * vv[:, :, t, None, :]
        z = lam * z + fk[:, :, t, :, None]
        num = (fq[:, :, t, None, :] @ S)[:, :, 0]
        den = (fq[:, :, t, None, :] @ z)[:, :, 0]
        outs.append(num / (den + EPS) if normalize else num)
    return torch.stack(outs, 2)


def _apply_feature(x: Tensor, feature_map: str | Callable) -> Tensor:
    return feature_map(x) if callable(feature_map) else feature(x, feature_map)


# ------------------------------------------------------------------------------------------------
# Torch executor: the chunk scan, vectorised over chunks
# ------------------------------------------------------------------------------------------------


def torch_scan(fq: Tensor, fk: Tensor, v: Tensor, log_decay: Tensor | None, causal: bool, chunk: int) -> Tensor:
    """Numerator ``Σ_{s≤t} λ^{t-s} (fq_t·fk_s) v_s`` (all s when not causal) on features.

    fq, fk ``(B, H, L, D)``; v ``(B, H, L, E)``, one float dtype (f32 / f64: the accumulation dtype);
    log_decay ``(H,)`` natural log of λ, or None. Returns ``(B, H, L, E)``. No Python loop over L:
    per-chunk state contributions, a prefix over chunks (a cumsum, or with decay a loop over the
    chunks), and the intra-chunk masked products batched over all chunks."""
    B, H, L, D = fq.shape
    E = v.shape[-1]
    if not causal:
        return fq @ (fk.transpose(-1, -2) @ v)
    C = max(1, min(int(chunk), L))
    n = -(-L // C)
    pad = n * C - L
    # Padded key rows are zero features, so they add nothing to any state.
    fq, fk, v = (F.pad(x, (0, 0, 0, pad)).view(B, H, n, C, x.shape[-1]) for x in (fq, fk, v))
    if log_decay is None:  # no decay: the same sums without the λ weights, in place where possible
        A = (fq @ fk.transpose(-1, -2)).tril_()   # (B, H, n, C, C): s ≤ t within the chunk
        out = A @ v                               # (B, H, n, C, E)
        if n > 1:
            U = fk.transpose(-1, -2) @ v          # each chunk's state contribution (B, H, n, D, E)
            S = U.cumsum(2).sub_(U)               # state before each chunk: an exclusive prefix sum
            out.add_(fq @ S)
        return out.reshape(B, H, n * C, E)[:, :, :L]
    g = log_decay.to(fq)
    i = torch.arange(C, device=fq.device, dtype=fq.dtype)
    # Intra-chunk: M[h, i, j] = λ^{i-j} for j <= i (exp of a non-positive number: no overflow).
    diff = i[:, None] - i[None, :]
    M = torch.where(diff >= 0, torch.exp(g.view(H, 1, 1) * diff.clamp_min(0)), torch.zeros((), dtype=fq.dtype))
    out = ((fq @ fk.transpose(-1, -2)) * M[None, :, None]) @ v  # (B, H, n, C, E)
    if n == 1:
        return out.reshape(B, H, n * C, E)[:, :, :L]
    # Each chunk's contribution to the state at its end: U_c = Σ_j λ^{C-1-j} fk_jᵀ v_j.
    w = torch.exp(g.view(H, 1) * (C - 1 - i))  # (H, C)
    U = (fk * w[None, :, None, :, None]).transpose(-1, -2) @ v  # (B, H, n, D, E)
    # State before chunk c: S_c = Σ_{c'<c} λ^{C(c-1-c')} U_c' (decayed prefix over chunks), linear in
    # the number of chunks: S_c = λ^C·S_{c-1} + U_{c-1}.
    step = torch.exp(g * C).view(1, H, 1, 1)
    states = [torch.zeros_like(U[:, :, 0])]
    for c in range(1, n):
        states.append(states[-1] * step + U[:, :, c - 1])
    S = torch.stack(states, 2)
    # Inter-chunk: query i of a chunk sees the carried state decayed by λ^{i+1}.
    wq = torch.exp(g.view(H, 1) * (i + 1))
    out = out + (fq * wq[None, :, None, :, None]) @ S
    return out.reshape(B, H, n * C, E)[:, :, :L]


def scan(fq: Tensor, fk: Tensor, v: Tensor, decay: Tensor | None, causal: bool, chunk: int,
         reverse: bool = False) -> Tensor:
    """:func:`torch_scan` on the executor for these tensors (Triton kernels or torch); ``reverse``
    sums over ``s ≥ t`` instead (the causal scan of the time-reversed sequence). Inputs are features
    (identity map), returns ``(B, H, L, E)`` float32 (float64 for float64 inputs)."""
    if reverse and causal:
        return scan(*(x.flip(2) for x in (fq, fk, v)), decay, causal, chunk).flip(2)
    if use_triton(fq):
        from attncomp.strategies.linear import launcher as triton_linear
        out, _ = triton_linear.linear_fwd(fq, fk, v, decay, "identity", causal, False, chunk, EPS)
        return out
    acc = torch.float64 if fq.dtype == torch.float64 else torch.float32
    log_decay = None if decay is None else torch.log(decay.to(acc))
    return torch_scan(fq.to(acc), fk.to(acc), v.to(acc), log_decay, causal, chunk)


def _cpu_forward(q, k, v, decay, feature_map, causal, normalize, chunk):
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    fq, fk, va = feature(q.to(acc), feature_map), feature(k.to(acc), feature_map), v.to(acc)
    if normalize:
        va = torch.cat([va, torch.ones_like(va[..., :1])], -1)  # the last column carries den
    log_decay = None if decay is None else torch.log(decay.to(acc))
    res = torch_scan(fq, fk, va, log_decay, causal, chunk)
    if not normalize:
        return res.to(q.dtype), q.new_empty(0, dtype=torch.float32)
    den = res[..., -1]
    return (res[..., :-1] / (den[..., None] + EPS)).to(q.dtype), den.float()


# ------------------------------------------------------------------------------------------------
# Custom ops
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("attncomp::linear_fwd", mutates_args=())
def linear_fwd(q: Tensor, k: Tensor, v: Tensor, decay: Tensor | None, feature_map: str, causal: bool,
               normalize: bool, chunk: int) -> tuple[Tensor, Tensor]:
    """Linear attention forward (module docstring). q, k ``(B, H, L, D)``, v ``(B, H, L, Dv)``, decay
    ``(H,)`` or None, feature_map in :data:`FEATURES`. Returns out ``(B, H, L, Dv)`` in q's dtype and
    den ``(B, H, L)`` float32 (empty ``(0,)`` when not normalize)."""
    if use_triton(q):
        from attncomp.strategies.linear import launcher as triton_linear
        out, den = triton_linear.linear_fwd(q, k, v, decay, feature_map, causal, normalize, chunk, EPS)
        out = out.to(q.dtype)
    else:
        out, den = _cpu_forward(q, k, v, decay, feature_map, causal, normalize, chunk)
    return out.contiguous(), den.contiguous()


@linear_fwd.register_fake
def _(q, k, v, decay, feature_map, causal, normalize, chunk):
    den = q.new_empty(q.shape[:-1], dtype=torch.float32) if normalize else q.new_empty(0, dtype=torch.float32)
    return q.new_empty(*q.shape[:-1], v.shape[-1]), den


@torch.library.custom_op("attncomp::linear_bwd", mutates_args=())
def linear_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, decay: Tensor | None, out: Tensor, den: Tensor,
               feature_map: str, causal: bool, normalize: bool, chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) of :func:`linear_fwd` by three chunk scans (module docstring)."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qa, ka, g = q.to(acc), k.to(acc), dout.to(acc)
    fq, fk, va = feature(qa, feature_map), feature(ka, feature_map), v.to(acc)
    if normalize:  # g' = [dout/(den+EPS), -(dout·out)/(den+EPS)], v' = [v, 1]
        r = 1.0 / (den.to(acc)[..., None] + EPS)
        g = torch.cat([g * r, -(g * out.to(acc)).sum(-1, keepdim=True) * r], -1)
        va = torch.cat([va, torch.ones_like(va[..., :1])], -1)
    dfq = scan(g, va, fk, decay, causal, chunk)
    dfk = scan(va, g, fq, decay, causal, chunk, reverse=True)
    dva = scan(fk, fq, g, decay, causal, chunk, reverse=True)
    if use_triton(q):
        from attncomp.strategies.linear import launcher as triton_linear
        dq, dk = (triton_linear.feature_grad(x, d, feature_map) for x, d in ((q, dfq), (k, dfk)))
    else:
        dq = (dfq.to(acc) * feature_grad(qa, feature_map)).to(q.dtype)
        dk = (dfk.to(acc) * feature_grad(ka, feature_map)).to(k.dtype)
    dv = dva[..., :v.shape[-1]].to(v.dtype)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@linear_bwd.register_fake
def _(dout, q, k, v, decay, out, den, feature_map, causal, normalize, chunk):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup(ctx, inputs, output):
    q, k, v, decay, *args = inputs
    ctx.save_for_backward(q, k, v, decay, *output)
    ctx.args = args


def _backward(ctx, dout, dden):
    q, k, v, decay, out, den = ctx.saved_tensors
    dq, dk, dv = linear_bwd(dout.contiguous(), q, k, v, decay, out, den, *ctx.args)
    return dq, dk, dv, None, None, None, None, None


linear_fwd.register_autograd(_backward, setup_context=_setup)


# ------------------------------------------------------------------------------------------------
# Public op
# ------------------------------------------------------------------------------------------------


def _check(q: Tensor, k: Tensor, v: Tensor, decay: Tensor | None, causal: bool, chunk: int) -> None:
    try:
        validate.check_qkv(q, k, v, name_prefix="linear_attention: ", gqa=False, same_length=True)
    except ValueError as e:  # mismatched axes: say so first
        raise ValueError(f"incompatible shapes: {e}" if "axis" in str(e) else str(e)) from None
    if isinstance(chunk, bool) or not isinstance(chunk, int):
        raise TypeError(f"chunk must be an int, got {type(chunk).__name__}")
    if int(chunk) < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if decay is None:
        return
    if not causal:
        raise ValueError("decay needs causal=True (the decayed state S_t = decay·S_{t-1} + φ(k_t)ᵀv_t "
                         "is defined over past positions only)")
    if not isinstance(decay, Tensor) or decay.shape != (q.shape[1],) or not decay.is_floating_point():
        raise ValueError(f"decay must be a float tensor of shape (H,) = ({q.shape[1]},), got "
                         f"{(tuple(decay.shape), decay.dtype) if isinstance(decay, Tensor) else type(decay).__name__}")
    if not bool(((decay > 0) & (decay <= 1)).all()):
        raise ValueError("decay values must lie in (0, 1]")


def linear_attention(q: Tensor, k: Tensor, v: Tensor, feature_map: str | Callable = "elu1", causal: bool = False,
                     decay: Tensor | None = None, normalize: bool = True, chunk: int = 64) -> Tensor:
    """Linear attention ``φ(Q)(φ(K)ᵀV)``, causal by a chunked scan (Lightning Attention's split).

    Args:
        q, k: ``(B, H, L, D)``; v: ``(B, H, L, Dv)``; one dtype among float32 / float16 / bfloat16 /
            float64 (computed in float32, float64 for float64).
        feature_map: ``"elu1"`` (elu(x) + 1), ``"relu"``, or a callable applied elementwise (run in
            torch before the op; the kernels then use the identity map).
        causal: position t sees positions s ≤ t.
        decay: None or ``(H,)`` with values in (0, 1] (causal only): ``S_t = decay·S_{t-1} + φ(k_t)ᵀv_t``
            and the same for the normaliser ``z_t``. Treated as a constant (no gradient).
        normalize: divide by ``φ(q_t)·z_t + EPS`` with ``EPS = 1e-6`` (guards rows whose normaliser
            is 0, e.g. relu features); False returns the raw numerator.
        chunk: positions per chunk of the causal scan (any value ≥ 1; the Triton kernels round it to
            a power of two in [16, 128]); the result does not depend on it beyond rounding.

    Returns:
        ``(B, H, L, Dv)`` in q's dtype.
    """
    _check(q, k, v, decay, causal, chunk)
    if callable(feature_map):
        q, k, name = feature_map(q), feature_map(k), "identity"
    elif feature_map in ("elu1", "relu"):
        name = feature_map
    else:
        raise ValueError(f"feature_map must be 'elu1', 'relu' or a callable, got {feature_map!r}")
    if decay is not None:
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        decay = decay.to(device=q.device, dtype=acc).contiguous()
        if bool((decay == 1).all()):
            decay = None
    out, _ = torch.ops.attncomp.linear_fwd(q, k, v, decay, name, bool(causal), bool(normalize), int(chunk))
    return out

