"""Host-side launchers for the tensor (2-simplicial) attention Triton kernels
(``templates/tensor_fwd.py.j2``, ``templates/tensor_bwd.py.j2``).

Semantics are those of :mod:`attncomp.tensor` (inputs validated and oriented there: the inner,
tiled keys ``l`` are ``k2`` / ``v2``). Forward: one program per (query block, b·h), keys j one at a
time, keys l in tiles of ``BLOCK_L``, online softmax over the (j, l) pairs. Backward, deterministic
(no atomics): a dq kernel shaped like the forward, and one dk/dv kernel over tiles of the inner keys,
launched a second time with the two key sets swapped for dk1 / dv1.
"""

from __future__ import annotations

import torch
import triton

from attncomp.runtime import codegen
from attncomp.runtime.triton_common import block_d, check_interpreter, empty, interpreting

__all__ = ["tensor_bwd", "tensor_config", "tensor_fwd"]

LOG2E = 1.4426950408889634


def tensor_config(Lq: int, L_inner: int, causal: bool, w_inner: int, dtype: torch.dtype, D: int = 64,
                  kernel: str = "fwd") -> dict[str, object]:
    """Tile sizes, warps and precision of ``kernel`` (``"fwd"``, also the dq kernel, or ``"dkdv"``):
    ``BLOCK_M`` queries, ``BLOCK_L`` inner keys (powers of two in [16, 64], 16 being the tl.dot
    minimum), the inner tile no wider than what one query block sees (``BLOCK_M + w − 1`` with a
    window). Head dims above 64 (pow2 ≥ 128) and f32 inputs take more registers than 4 warps hold at
    64 × 64 tiles (sm_90 ptxas spills): the fwd / dq kernels run on 8 warps (f32: on 32 × 32 tiles),
    the dk/dv kernel (which also carries the f32 dk, dv tiles) on 16-query × 32-key tiles. Triton's
    interpreter pays per operation, not per element, so there the query tile grows to cover short
    sequences in one block."""
    interp = interpreting()
    f32 = dtype == torch.float32  # f32 tl.dot operands: twice the registers, FMA instead of MMA
    if interp:
        bm, cap_l, warps = min(64, max(16, triton.next_power_of_2(max(Lq, 1)))), 64, 4
    elif (f32 or block_d(D) > 64) and kernel == "dkdv":
        bm, cap_l, warps = 16, 32, 4
    elif f32:
        bm, cap_l, warps = 32, 32, 8
    else:
        bm, cap_l, warps = 64, 64, 8 if block_d(D) > 64 else 4
    span = min(L_inner, bm + w_inner - 1) if causal else L_inner
    return {"BLOCK_M": bm, "BLOCK_L": max(16, min(cap_l, triton.next_power_of_2(max(span, 1)))),
            # f32 inputs: no TF32 rounding in tl.dot; f16 / bf16: the default.
            "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32", "num_warps": warps}


def _flags(dtype: torch.dtype, causal: bool) -> dict[str, bool]:
    # Interpreter bug triton-lang/triton#11584: bf16 tl.dot multiplies raw bit patterns.
    return {"CAUSAL": bool(causal), "UPCAST_DOT": interpreting() and dtype == torch.bfloat16}


def _dims(q, k1, k2, v1, D):
    B, H, Lq, _ = q.shape
    return B, H, Lq, k1.shape[2], k2.shape[2], D, v1.shape[3]


def tensor_fwd(q: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, v1: torch.Tensor, v2: torch.Tensor,
               scale: float, causal: bool, w1: int, w2: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q ``(B, H, Lq, D)``, k1 ``(B, H, L1, D)``, k2 ``(B, H, L2, D)``, v1 ``(B, H, L1, Dv)``, v2
    ``(B, H, L2, Dv)``, any strides, one dtype among f32 / f16 / bf16. Returns out ``(B, H, Lq, Dv)``
    in q's dtype and lse ``(B, H, Lq)`` f32 (natural log, -inf for a row that sees nothing)."""
    check_interpreter()
    B, H, Lq, L1, L2, D, Dv = _dims(q, k1, k2, v1, q.shape[3])
    out = empty((B, H, Lq, Dv), q.dtype, q.device)
    lse = empty((B, H, Lq), torch.float32, q.device)
    if B * H * Lq == 0:
        return out, lse
    cfg = tensor_config(Lq, L2, causal, w2, q.dtype, max(D, Dv))
    mod = codegen.load_kernel_module("tensor_fwd", **_flags(q.dtype, causal))
    grid = (triton.cdiv(Lq, cfg["BLOCK_M"]), B * H)
    mod.tensor_fwd[grid](
        q, k1, k2, v1, v2, out, lse,
        *q.stride(), *k1.stride(), *k2.stride(), *v1.stride(), *v2.stride(), *out.stride(),
        H, Lq, L1, L2, D, Dv, int(w1), int(w2), float(scale) * LOG2E,
        BLOCK_D=block_d(D), BLOCK_DV=block_d(Dv), **cfg, num_stages=1,
    )
    return out, lse


def _dkdv(mod, q, k1, k2, v1, v2, dout, lse, delta, scale, causal, w1, w2):
    """dk2 ``(B, H, L2, D)`` and dv2 ``(B, H, L2, Dv)`` (inputs' dtypes) over tiles of the keys l."""
    B, H, Lq, L1, L2, D, Dv = _dims(q, k1, k2, v1, q.shape[3])
    dk2 = empty(tuple(k2.shape), k2.dtype, k2.device)
    dv2 = empty(tuple(v2.shape), v2.dtype, v2.device)
    if dk2.numel() + dv2.numel() == 0:
        return dk2, dv2
    cfg = tensor_config(Lq, L2, causal, w2, q.dtype, max(D, Dv), "dkdv")
    grid = (triton.cdiv(L2, cfg["BLOCK_L"]), B * H)
    mod.tensor_bwd_dkdv[grid](
        q, k1, k2, v1, v2, dout, lse, delta, dk2, dv2,
        *q.stride(), *k1.stride(), *k2.stride(), *v1.stride(), *v2.stride(), *dout.stride(),
        *dk2.stride(), *dv2.stride(),
        H, Lq, L1, L2, D, Dv, int(w1), int(w2), float(scale) * LOG2E, float(scale),
        BLOCK_D=block_d(D), BLOCK_DV=block_d(Dv), **cfg, num_stages=1,
    )
    return dk2, dv2


def tensor_bwd(dout: torch.Tensor, q: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, v1: torch.Tensor,
               v2: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, scale: float, causal: bool, w1: int,
               w2: int) -> tuple[torch.Tensor, ...]:
    """Gradients ``(dq, dk1, dk2, dv1, dv2)`` in the inputs' shapes and dtypes; dout and out
    ``(B, H, Lq, Dv)``, lse ``(B, H, Lq)`` f32 from :func:`tensor_fwd`."""
    check_interpreter()
    B, H, Lq, L1, L2, D, Dv = _dims(q, k1, k2, v1, q.shape[3])
    lse = lse.float().contiguous()
    delta = (dout.float() * out.float()).sum(-1).contiguous()  # rowsum(dO ⊙ O), f32
    mod = codegen.load_kernel_module("tensor_bwd", **_flags(q.dtype, causal))
    dq = empty(tuple(q.shape), q.dtype, q.device)
    if dq.numel():
        cfg = tensor_config(Lq, L2, causal, w2, q.dtype, max(D, Dv))
        mod.tensor_bwd_dq[(triton.cdiv(Lq, cfg["BLOCK_M"]), B * H)](
            q, k1, k2, v1, v2, dout, lse, delta, dq,
            *q.stride(), *k1.stride(), *k2.stride(), *v1.stride(), *v2.stride(), *dout.stride(), *dq.stride(),
            H, Lq, L1, L2, D, Dv, int(w1), int(w2), float(scale) * LOG2E, float(scale),
            BLOCK_D=block_d(D), BLOCK_DV=block_d(Dv), **cfg, num_stages=1,
        )
    dk2, dv2 = _dkdv(mod, q, k1, k2, v1, v2, dout, lse, delta, scale, causal, w1, w2)
    # The same kernel with the key sets swapped: s and P are symmetric in (k1, v1, w1) <-> (k2, v2, w2).
    dk1, dv1 = _dkdv(mod, q, k2, k1, v2, v1, dout, lse, delta, scale, causal, w2, w1)
    return dq, dk1, dk2, dv1, dv2

