"""Host-side launcher for the linear-attention Triton kernel (``templates/linear_fwd.py.j2``).

One program per (batch, head, block of value columns) walks the chunks in order with the state in
registers (f32); the semantics are those of :mod:`attncomp.linear` (``eps``, the op's ``EPS``, added to the normaliser).
The backward runs the same kernel three times (identity features, no normalisation; see :mod:`attncomp.linear`), then
:func:`feature_grad` (``templates/linear_bwd.py.j2``) for the chain rule through the feature map.
"""

from __future__ import annotations

import torch
import triton

from attncomp.runtime import codegen
from attncomp.runtime.triton_common import block_d, check_interpreter, empty

__all__ = ["block_chunk", "feature_grad", "linear_config", "linear_fwd"]


def _tile_cap(D: int) -> int:
    """The largest chunk / value-column tile for head dim ``D``: ``tile × pow2(D) ≤ 2048``, at least 16.
    The products are f32 ieee tl.dots (FMA, not tensor cores: each thread holds whole rows of the
    reduced axis), and the f32 state lives in registers; larger tiles spill on sm_90 (ptxas:
    BLOCK_D = 128 with 64 × 64 tiles spills ~100 KB and takes minutes to compile)."""
    return max(16, 2048 // block_d(D))


def block_chunk(chunk: int, L: int, D: int = 16) -> int:
    """The kernel's chunk: ``chunk`` rounded up to a power of two in [16, 128] (tl.dot takes tiles
    of 16 or more), no larger than L rounded up to 16 nor than :func:`_tile_cap` of the head dim D.
    The chunk only changes the f32 rounding order, never the result."""
    c = triton.next_power_of_2(max(int(chunk), 1))
    return max(16, min(c, 128, triton.next_power_of_2(max(L, 1)), _tile_cap(D)))


def linear_config(D: int, E: int, chunk: int, L: int) -> dict[str, int]:
    """Tiles and warps for q / k head dim ``D`` and value dim ``E``: BLOCK_C (:func:`block_chunk`),
    BLOCK_D = pow2(D), BLOCK_E = pow2(E) capped at :func:`_tile_cap` (the f32 state S is BLOCK_D ×
    BLOCK_E; wider E runs more column blocks), 8 warps from BLOCK_D = 64 on."""
    bd = block_d(D)
    return {"BLOCK_C": block_chunk(chunk, L, D), "BLOCK_D": bd, "BLOCK_E": min(block_d(E), _tile_cap(D)),
            "num_warps": 8 if bd >= 64 else 4}


def linear_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor | None, feature_map: str,
               causal: bool, normalize: bool, chunk: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear attention forward on the Triton kernel.

    q, k ``(B, H, L, D)``; v ``(B, H, L, E)``, any strides, f32 / f16 / bf16; decay ``(H,)`` in (0, 1]
    or None (causal only); feature_map ``"elu1" | "relu" | "identity"``. Returns out ``(B, H, L, E)``
    float32 and den ``(B, H, L)`` float32 (``(0,)`` when not normalize)."""
    check_interpreter()
    B, H, L, D = q.shape
    E = v.shape[-1]
    out = empty((B, H, L, E), torch.float32, q.device)
    den = empty((B, H, L) if normalize else (0,), torch.float32, q.device)
    if out.numel() == 0:
        return out, den
    if decay is not None and not causal:
        raise ValueError("decay needs causal=True")
    log2_decay = (torch.log2(decay.float()).contiguous() if decay is not None
                  else torch.zeros(1, dtype=torch.float32, device=q.device))
    dstr = den.stride() if normalize else (0, 0, 0)
    mod = codegen.load_kernel_module("linear_fwd", CAUSAL=bool(causal), HAS_DECAY=decay is not None,
                                     NORMALIZE=bool(normalize), FEATURE=feature_map, UPCAST_DOT=False)
    cfg = linear_config(D, E, chunk, L)
    mod.linear_fwd[(B * H, triton.cdiv(E, cfg["BLOCK_E"]))](
        q, k, v, log2_decay, out, den if normalize else out,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *dstr,
        H, L, D, E, float(eps), **cfg, num_stages=1,
    )
    return out, den


def feature_grad(x: torch.Tensor, dphi: torch.Tensor, feature_map: str) -> torch.Tensor:
    """``dφ · φ'(x)`` elementwise: x any shape and float dtype, dphi the same shape (f32). Returns a
    contiguous tensor in x's dtype."""
    check_interpreter()
    x, dphi = x.contiguous(), dphi.contiguous()
    dx = empty(tuple(x.shape), x.dtype, x.device)
    n = x.numel()
    if n:
        mod = codegen.load_kernel_module("linear_bwd", FEATURE=feature_map, UPCAST_DOT=False)
        mod.feature_grad[(triton.cdiv(n, 1024),)](x, dphi, dx, n, BLOCK=1024)
    return dx
