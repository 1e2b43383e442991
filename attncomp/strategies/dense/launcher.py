"""Host-side launchers for the dense (flash-style) Triton attention kernels.

Score semantics, per (batch b, query head h, query i, key j)::

    s = scale * (q[b, h, i] . k[b, h // (Hq // Hkv), j])
    s = softcap * tanh(s / softcap)                  # only when softcap > 0
    s = s + bias[b, h, i, j]                         # bias broadcast to (B, Hq, Lq, Lk)
    s = -inf where j > i + causal_offset             # only when causal_offset is not None
    out = softmax(s) @ v  (f32 accumulation, cast to q.dtype);  lse = logsumexp(s)  (f32)

``causal_offset = 0`` is top-left aligned causal (SDPA ``is_causal``); ``Lk - Lq`` is
bottom-right aligned. A row whose scores are all -inf gets ``out = 0`` and ``lse = -inf``.
GQA / MQA never materialise repeated K / V: the kernels map query head ``h`` to kv head
``h // (Hq // Hkv)`` and the dK/dV kernel reduces over the group deterministically.
"""

from __future__ import annotations

import torch
import triton

from attncomp.runtime import autotune, codegen
from attncomp.runtime.triton_common import (
    bias_4d,
    block_d,
    check_inputs,
    check_interpreter,
    empty,
    empty_like,
    interpreting,
    reduce_dbias,
    score_consts,
)
from attncomp.templates.dense import configs as dense_configs

__all__ = ["default_config", "dense_bwd", "dense_fwd", "tuned_config"]

def default_config(D: int, dtype: torch.dtype, interpret: bool) -> dict[str, int]:
    """Heuristic tiling for head dim ``D`` (max of the qk and v head dims) and input dtype.

    A plain dict (BLOCK_M, BLOCK_N, num_warps, num_stages) used by the forward and both
    backward kernels; autotuning replaces it. The interpreter runs one numpy op per tile,
    so it prefers few, moderately sized tiles."""
    if interpret:
        return {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    bd = block_d(D)
    wide = dtype == torch.float32  # f32 tiles take twice the shared memory / registers
    if bd <= 64:  # f32: 8 warps (sm_90 ptxas spills the f32 FMA tiles on 4)
        return {"BLOCK_M": 64, "BLOCK_N": 32 if wide else 64, "num_warps": 8 if wide else 4, "num_stages": 3}
    if bd <= 128:
        return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4 if not wide else 8, "num_stages": 2}
    return {"BLOCK_M": 32 if wide else 64, "BLOCK_N": 16 if wide else 32, "num_warps": 8, "num_stages": 1}


def tuned_config(kernel: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, has_bias: bool,
                 causal: bool, softcap: float, bench, dbias: bool = False) -> dict[str, int]:
    """The config for ``kernel`` (``"dense_fwd"`` / ``"dense_bwd"``) on these inputs: from the autotune
    cache, tuned now with ``bench(config)``, or :func:`default_config` (``ATTNCOMP_AUTOTUNE=0``).

    Candidates and pruning live beside the templates (``attncomp.templates.dense_configs``)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    interp = interpreting()
    default = default_config(max(D, Dv), q.dtype, interp)
    if autotune.mode() == "0":
        autotune.STATS["heuristic"] += 1
        return default
    dtype = str(q.dtype).removeprefix("torch.")
    mask = "+".join(n for n, on in (("bias", has_bias), ("dbias", dbias), ("causal", causal),
                                    ("softcap", softcap > 0)) if on)
    signature = {"strategy": "dense", "mask": mask or "none", "dtype": dtype, "D": D, "Dv": Dv,
                 "gqa": Hq // max(Hkv, 1), "interpret": interp}

    def cands() -> list[dict]:  # only evaluated on a cache miss
        smem = None
        if q.is_cuda and not interp:
            idx = q.device.index if q.device.index is not None else torch.cuda.current_device()
            smem = int(triton.runtime.driver.active.utils.get_device_properties(idx)["max_shared_mem"])
        return dense_configs.candidates(head_dim=max(D, Dv), dtype=dtype, Lq=Lq, Lk=Lk, interpret=interp,
                                        smem_limit=smem)

    return autotune.choose(kernel, signature, autotune.bucket(Lq=Lq, Lk=Lk, BH=B * Hq), cands, bench, default,
                           device=q.device, version=codegen.source_hash(f"{kernel}.py.j2", "_common.py.j2"))


def launch_meta(cfg: dict[str, int], Lq: int, Lk: int, D: int, Dv: int, dtype: torch.dtype) -> dict[str, object]:
    """Compile-time kernel arguments (tl.constexpr) and launch options."""
    bm, bn = int(cfg["BLOCK_M"]), int(cfg["BLOCK_N"])
    if bm < 16 or bn < 16:
        raise ValueError("BLOCK_M and BLOCK_N must be >= 16 (tl.dot minimum)")
    bd, bdv = block_d(D), block_d(Dv)
    return {
        "BLOCK_M": bm,
        "BLOCK_N": bn,
        "BLOCK_D": bd,
        "BLOCK_DV": bdv,
        "EVEN_M": Lq % bm == 0,
        "EVEN_N": Lk % bn == 0,
        "EVEN_D": bd == D and bdv == Dv,
        # f32 inputs: no TF32 rounding in tl.dot; f16/bf16: the default.
        "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
        "num_warps": int(cfg.get("num_warps", 4)),
        "num_stages": int(cfg.get("num_stages", 2)),
    }


def _flags(dtype: torch.dtype, has_bias: bool, causal: bool, softcap: float) -> dict[str, bool]:
    return {
        "HAS_BIAS": has_bias,
        "IS_CAUSAL": causal,
        "HAS_SOFTCAP": softcap > 0.0,
        # Interpreter bug triton-lang/triton#11584: bf16 tl.dot multiplies raw bit patterns.
        "UPCAST_DOT": interpreting() and dtype == torch.bfloat16,
    }


def fwd_outputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[tuple[int, ...], torch.Tensor,
                                                                           torch.Tensor]:
    """A forward launcher's prologue: checked sizes ``(B, Hq, Hkv, Lq, Lk, D, Dv)`` and the empty
    (poisoned when ``ATTNCOMP_POISON=1``) outputs ``out (B, Hq, Lq, Dv)`` and ``lse (B, Hq, Lq)`` f32."""
    dims = check_inputs(q, k, v)
    check_interpreter()
    B, Hq, _, Lq, _, _, Dv = dims
    return dims, empty((B, Hq, Lq, Dv), q.dtype, q.device), empty((B, Hq, Lq), torch.float32, q.device)


def dense_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    causal_offset: int | None,
    softcap: float = 0.0,
    config: dict[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention forward.

    q (B, Hq, Lq, D); k (B, Hkv, Lk, D); v (B, Hkv, Lk, Dv), any strides, one dtype among
    f32 / f16 / bf16, Hq % Hkv == 0; bias None or float, broadcastable to (B, Hq, Lq, Lk).
    Returns out (B, Hq, Lq, Dv) in q.dtype and lse (B, Hq, Lq) f32 (natural log)."""
    (B, Hq, Hkv, Lq, Lk, D, Dv), out, lse = fwd_outputs(q, k, v)
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    cfg = config or tuned_config("dense_fwd", q, k, v, bias is not None, causal_offset is not None, softcap,
                                 lambda c: dense_fwd(q, k, v, bias, scale, causal_offset, softcap, config=c))
    meta = launch_meta(cfg, Lq, Lk, D, Dv, q.dtype)
    b4 = bias_4d(bias, (B, Hq, Lq, Lk), q)
    bstr = b4.stride() if bias is not None else (0, 0, 0, 0)
    qk_scale, cap_scale = score_consts(float(scale), float(softcap))
    mod = codegen.load_kernel_module("dense_fwd", **_flags(q.dtype, bias is not None,
                                                           causal_offset is not None, softcap))
    grid = (triton.cdiv(Lq, meta["BLOCK_M"]), B * Hq)
    mod.attn_fwd[grid](
        q, k, v, b4, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *bstr, *out.stride(),
        Hq, Hq // Hkv, Lq, Lk, D, Dv, qk_scale, cap_scale, int(causal_offset or 0),
        **meta,
    )
    return out, lse


def preprocess(mod, out: torch.Tensor, dout: torch.Tensor, delta: torch.Tensor, meta: dict) -> None:
    """Launch the backward's first kernel: ``delta = rowsum(dout * out)`` (f32, ``(B, Hq, Lq)``)."""
    B, Hq, Lq, Dv = out.shape
    if Lq > 0:
        mod.attn_bwd_preprocess[(triton.cdiv(Lq, meta["BLOCK_M"]), B * Hq)](
            out, dout, delta, *out.stride(), *dout.stride(), Hq, Lq, Dv,
            BLOCK_M=meta["BLOCK_M"], BLOCK_DV=meta["BLOCK_DV"], EVEN_M=meta["EVEN_M"], EVEN_D=meta["EVEN_D"],
        )


def dense_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    causal_offset: int | None,
    softcap: float,
    bias_requires_grad: bool,
    config: dict[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Dense attention backward (deterministic: no atomics).

    dout, out (B, Hq, Lq, Dv) any strides; q, k, v, bias as in :func:`dense_fwd`;
    lse (B, Hq, Lq) f32 from the forward. Returns dq (B, Hq, Lq, D), dk (B, Hkv, Lk, D),
    dv (B, Hkv, Lk, Dv) in the inputs' dtypes and layouts (``empty_like``), and dbias with
    bias's shape and dtype when ``bias_requires_grad`` (else None); dbias goes through a
    full (B, Hq, Lq, Lk) f32 dS summed over bias's broadcast dims."""
    B, Hq, Hkv, Lq, Lk, D, Dv = check_inputs(q, k, v)
    check_interpreter()
    bias_grad = bias is not None and bias_requires_grad
    dq, dk, dv = empty_like(q), empty_like(k), empty_like(v)
    ds = empty((B, Hq, Lq, Lk), torch.float32, q.device) if bias_grad else q
    if B * Hq == 0 or (Lq == 0 and Lk == 0):
        return dq, dk, dv, (reduce_dbias(ds, bias) if bias_grad else None)
    cfg = config or tuned_config(
        "dense_bwd", q, k, v, bias is not None, causal_offset is not None, softcap,
        lambda c: dense_bwd(dout, q, k, v, bias, out, lse, scale, causal_offset, softcap, bias_requires_grad, c),
        dbias=bias_grad)
    meta = launch_meta(cfg, Lq, Lk, D, Dv, q.dtype)
    lse = lse.contiguous()
    delta = empty((B, Hq, Lq), torch.float32, q.device)
    b4 = bias_4d(bias, (B, Hq, Lq, Lk), q)
    bstr = b4.stride() if bias is not None else (0, 0, 0, 0)
    dsstr = ds.stride() if bias_grad else (0, 0, 0, 0)
    qk_scale, cap_scale = score_consts(float(scale), float(softcap))
    flags = _flags(q.dtype, bias is not None, causal_offset is not None, softcap)
    mod = codegen.load_kernel_module("dense_bwd", BIAS_GRAD=bias_grad, **flags)
    bm, bn = meta["BLOCK_M"], meta["BLOCK_N"]
    shape_args = (Hq, Hq // Hkv, Lq, Lk, D, Dv, qk_scale, cap_scale, float(scale), int(causal_offset or 0))

    preprocess(mod, out, dout, delta, meta)
    if Lk > 0:
        mod.attn_bwd_dkdv[(triton.cdiv(Lk, bn), B * Hkv)](
            q, k, v, b4, dout, lse, delta, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), *bstr, *dout.stride(), *dk.stride(), *dv.stride(),
            *shape_args, **meta,
        )
    if Lq > 0:
        mod.attn_bwd_dq[(triton.cdiv(Lq, bm), B * Hq)](
            q, k, v, b4, dout, lse, delta, dq, ds,
            *q.stride(), *k.stride(), *v.stride(), *bstr, *dout.stride(), *dq.stride(), *dsstr,
            *shape_args, **meta,
        )
    return dq, dk, dv, (reduce_dbias(ds, bias) if bias_grad else None)
