"""Helpers every Triton launcher shares: interpreter checks, output allocation, head-dim tiles,
input checks, broadcast bias views and score constants (log2 units)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["LOG2E", "interpreting", "check_interpreter", "empty", "empty_like", "block_d", "check_inputs",
           "bias_4d", "reduce_dbias", "score_consts"]

LOG2E = 1.4426950408889634


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_interpreter() -> None:
    """Under TRITON_INTERPRET=1, triton.language's own @jit helpers (tl.zeros, tl.sum, tl.max)
    must have been built for the interpreter, which happens only if the variable was set
    before triton was first imported (``import torch._dynamo`` imports triton)."""
    if interpreting() and isinstance(tl.zeros, triton.JITFunction):
        raise RuntimeError(
            "TRITON_INTERPRET=1 was set after triton was imported, so triton.language was built "
            "for the compiler; set it before the first import of triton (or torch._dynamo)")


def _poisoning() -> bool:
    # Debug aid: fill outputs with NaN before launch so unwritten elements show up.
    return os.environ.get("ATTNCOMP_POISON", "0") == "1"


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if _poisoning():
        out.fill_(float("nan"))
    return out


def empty_like(t: torch.Tensor) -> torch.Tensor:
    # Same layout as t (dq keeps q's (B, L, H, D) storage order, say), like a fake impl's empty_like.
    out = torch.empty_like(t)
    if _poisoning():
        out.fill_(float("nan"))
    return out


def block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int, int, int]:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be 4-D (B, H, L, D)")
    B, Hq, Lq, D = q.shape
    Bk, Hkv, Lk, Dk = k.shape
    if Bk != B or v.shape[:3] != k.shape[:3] or Dk != D:
        raise ValueError(f"incompatible shapes q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"Hq={Hq} must be a multiple of Hkv={Hkv}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError("q, k, v must share a dtype")
    if k.device != q.device or v.device != q.device:
        raise ValueError("q, k, v must be on one device")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"unsupported dtype {q.dtype}")
    return B, Hq, Hkv, Lq, Lk, D, v.shape[-1]


def bias_4d(bias: torch.Tensor | None, shape: tuple[int, int, int, int], ref: torch.Tensor) -> torch.Tensor:
    """Broadcast view of ``bias`` as (B, Hq, Lq, Lk), stride 0 on broadcast dims (no copy).

    Without a bias, returns ``ref`` as a never-read placeholder pointer."""
    if bias is None:
        return ref
    if not bias.is_floating_point() or bias.dim() > 4 or bias.device != ref.device:
        raise ValueError("bias must be a floating tensor on q's device, broadcastable to (B, Hq, Lq, Lk)")
    return bias.expand(shape)


def reduce_dbias(ds: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Sum dS (B, Hq, Lq, Lk) f32 over the dims ``bias`` was broadcast along -> bias.shape."""
    padded = (1,) * (4 - bias.dim()) + tuple(bias.shape)
    dims = [i for i in range(4) if padded[i] == 1 and ds.shape[i] != 1]
    red = ds.sum(dim=dims, keepdim=True) if dims else ds
    return red.reshape(bias.shape).to(bias.dtype)


def score_consts(scale: float, softcap: float) -> tuple[float, float]:
    """(qk_scale, cap_scale) so that the kernels' log2-unit score is
    qk * qk_scale (no cap) or tanh(qk * qk_scale) * cap_scale (cap)."""
    if softcap > 0.0:
        return scale / softcap, softcap * LOG2E
    return scale * LOG2E, 0.0
