"""Host-side launcher for the split-KV decode Triton kernels (``templates/decode/fwd.py.j2``).

Semantics (see :mod:`attncomp.strategies.decode.op`): query ``i`` of sequence ``b`` sits at
position ``kv_len[b] - Lq + i`` and sees key ``j`` iff ``j <= pos`` and, with a window,
``j >= pos - window_left``; ``kv_len`` values are clamped to ``[0, Lk]``. Scores are
``scale·q·k`` (soft-capped when ``softcap > 0``); a row with no visible key gets out 0, lse -inf.

Two launches: phase 1 over (split, batch × kv head, row tile) writes per-split outputs and lse in
float32; phase 2 merges them (float32 LSE merge). With one split, phase 1 writes the result
directly and phase 2 is skipped.
"""

from __future__ import annotations

import torch
import triton

from attncomp.runtime import autotune, codegen
from attncomp.runtime.triton_common import block_d, check_interpreter, empty, interpreting, score_consts
from attncomp.strategies.decode.plan import MAX_SPLITS, decode_splits
from attncomp.templates.decode import configs as decode_configs

__all__ = ["decode_fwd", "resolve_splits", "tuned_config"]


def _sm_count(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    idx = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_properties(idx).multi_processor_count


def resolve_splits(n_splits: int, Lq: int, Lk: int, Hq: int, Hkv: int, B: int, block_n: int,
                   device: torch.device) -> int:
    """The split count a launch uses: ``n_splits``, or the planner's (:func:`decode_splits`) when 0;
    at least 1, at most :data:`MAX_SPLITS` and at most one split per key block."""
    n = n_splits or decode_splits(Lq, Lk, Hq, Hkv, B, _sm_count(device))
    return max(1, min(n, MAX_SPLITS, triton.cdiv(max(Lk, 1), block_n)))


def tuned_config(q: torch.Tensor, Lk: int, Hkv: int, Dv: int, flags: dict[str, bool], bench) -> dict[str, int]:
    """Phase 1's config: autotune cache, tuned now with ``bench(config)``, or the heuristic
    (``ATTNCOMP_AUTOTUNE=0``). Candidates live beside the template (``templates/decode/configs.py``)."""
    B, Hq, Lq, D = q.shape
    rows = Hq // Hkv * Lq
    interp = interpreting()
    dtype = str(q.dtype).removeprefix("torch.")
    default = decode_configs.default_config(max(D, Dv), dtype, rows, interp)
    if autotune.mode() == "0":
        autotune.STATS["heuristic"] += 1
        return default
    mask = "+".join(n.lower() for n, on in flags.items() if on and n != "UPCAST_DOT") or "none"
    signature = {"strategy": "decode", "mask": mask, "dtype": dtype, "D": D, "Dv": Dv, "rows": rows,
                 "interpret": interp}
    return autotune.choose(
        "decode_fwd", signature, autotune.bucket(Lk=Lk, BH=B * Hkv),
        lambda: decode_configs.candidates(head_dim=max(D, Dv), dtype=dtype, rows=rows, Lk=Lk, interpret=interp),
        bench, default, device=q.device, version=codegen.source_hash("decode_fwd.py.j2", "_common.py.j2"))


def decode_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_lens: torch.Tensor | None,
    scale: float,
    window_left: int | None,
    softcap: float,
    n_splits: int,
    page_table: torch.Tensor | None = None,
    max_kv_len: int | None = None,
    config: dict[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-KV decode forward (inputs checked by the op).

    q (B, Hq, Lq, D) f32 / f16 / bf16, any strides. Contiguous KV: k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv).
    Paged KV (``page_table`` given): k (num_pages, page_size, Hkv, D), v (num_pages, page_size, Hkv, Dv),
    page_table (B, max_pages) int32 / int64, ``max_kv_len`` keys at most (Lk). kv_lens (B,) int32 / int64
    or None (every sequence has Lk keys). Returns out (B, Hq, Lq, Dv) in q.dtype and lse (B, Hq, Lq) f32
    (natural log), both contiguous."""
    check_interpreter()
    B, Hq, Lq, D = q.shape
    paged = page_table is not None
    Hkv, Dv = (k.shape[2] if paged else k.shape[1]), v.shape[-1]
    Lk = int(max_kv_len) if paged else k.shape[2]
    flags = {
        "HAS_LENS": kv_lens is not None,
        "HAS_WINDOW": window_left is not None,
        "HAS_SOFTCAP": softcap > 0.0,
        "PAGED": paged,
        # Interpreter bug triton-lang/triton#11584: bf16 tl.dot multiplies raw bit patterns.
        "UPCAST_DOT": interpreting() and q.dtype == torch.bfloat16,
    }
    cfg = config or tuned_config(q, Lk, Hkv, Dv, flags, lambda c: decode_fwd(
        q, k, v, kv_lens, scale, window_left, softcap, n_splits, page_table, max_kv_len, config=c))
    bm, bn = int(cfg["BLOCK_M"]), int(cfg["BLOCK_N"])
    if bm < 16 or bn < 16:
        raise ValueError("BLOCK_M and BLOCK_N must be >= 16 (tl.dot minimum)")
    splits = resolve_splits(n_splits, Lq, Lk, Hq, Hkv, B, bn, q.device)
    out = empty((B, Hq, Lq, Dv), q.dtype, q.device)
    lse = empty((B, Hq, Lq), torch.float32, q.device)
    if splits > 1:
        o_part = empty((B, Hq, Lq, splits, Dv), torch.float32, q.device)
        l_part = empty((B, Hq, Lq, splits), torch.float32, q.device)
        o_str, l_str = o_part.stride(), l_part.stride()
    else:  # phase 1 writes the result: the split axis has stride 0
        o_part, l_part = out, lse
        o_str, l_str = (*out.stride()[:3], 0, out.stride(3)), (*lse.stride(), 0)
    bd, bdv = block_d(D), block_d(Dv)
    if paged:  # pages (num_pages, page_size, Hkv, D): page, head, slot, dim strides
        k_str = (k.stride(0), k.stride(2), k.stride(1), k.stride(3))
        v_str = (v.stride(0), v.stride(2), v.stride(1), v.stride(3))
        p_str, page_size = page_table.stride(), k.shape[1]
    else:
        k_str, v_str, p_str, page_size = k.stride(), v.stride(), (0, 0), 1
    qk_scale, cap_scale = score_consts(float(scale), float(softcap))
    mod = codegen.load_kernel_module("decode_fwd", **flags)
    rows = Hq // Hkv * Lq
    mod.decode_split[(splits, B * Hkv, triton.cdiv(rows, bm))](
        q, k, v, kv_lens if kv_lens is not None else q, page_table if paged else q, o_part, l_part,
        *q.stride(), *k_str, *v_str, *p_str, *o_str, *l_str,
        Hkv, Hq // Hkv, Lq, Lk, D, Dv, page_size, splits, qk_scale, cap_scale, int(window_left or 0),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_DV=bdv, EVEN_D=bd == D and bdv == Dv,
        # f32 inputs: no TF32 rounding in tl.dot; f16 / bf16: the default
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=int(cfg.get("num_warps", 4)), num_stages=int(cfg.get("num_stages", 2)),
    )
    if splits > 1:
        mod.decode_merge[(B * Hq * Lq,)](
            o_part, l_part, out, lse, splits, Dv,
            BLOCK_S=max(2, triton.next_power_of_2(splits)), BLOCK_DV=bdv, EVEN_D=bdv == Dv,
        )
    return out, lse
