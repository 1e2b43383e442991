"""Host-side launchers for the block-sparse Triton attention kernels ("local" / "sparse" strategies).

The kernels iterate a :class:`attncomp.blocks.BlockTable` instead of every key block. Semantics, per
(batch b, query head h, query i, key j), for a tile (i-block, j-block) of the table::

    EMPTY    never visited (K / V / bias / keep of that tile are never loaded)
    FULL     every in-range element visible; no predicate, no keep load, no bounds check
    PARTIAL  (i, j) visible iff j < Lk and mask_expr(i, j) (if any) and keep[b, h, i, j] (if any)

    s = scale * (q[b, h, i] . k[b, h // (Hq // Hkv), j])
    s = softcap * tanh(s / softcap)                  # only when softcap > 0
    s = s + bias[b, h, i, j]                         # bias broadcast to (B, Hq, Lq, Lk)
    out = softmax over visible j of s @ v  (f32 accumulation, cast to q.dtype);  lse = logsumexp (f32)

A row with no visible key gets ``out = 0`` and ``lse = -inf``. ``mask_expr`` is an IR predicate string
(``attncomp.ir``: ``q``, ``kv``, integer literals, ``+ - * // % < <= > >= == != & | ~``, ``where``),
rendered into the kernels inline (``where`` -> ``tl.where``, ``q`` / ``kv`` -> ``mask_q`` / ``mask_kv``).
The table's BLOCK_M / BLOCK_N are the kernels' tile sizes; a config only chooses num_warps / num_stages.
"""

from __future__ import annotations

import ast
import re
from functools import lru_cache

import torch
import triton

from attncomp.masks.blocks import BlockTable
from attncomp.runtime import codegen
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
from attncomp.strategies.dense import launcher as triton_dense

__all__ = ["default_config", "render_mask", "sparse_bwd", "sparse_fwd"]

_EXPR_NAMES = frozenset({"q", "kv", "where"})
_EXPR_NODES = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Compare, ast.Call, ast.Name, ast.Load, ast.Constant,
               ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Mod, ast.BitAnd, ast.BitOr, ast.Invert, ast.USub,
               ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.Eq, ast.NotEq)


@lru_cache(maxsize=256)
def render_mask(expr: str) -> str:
    """The Triton expression of an IR predicate: validated (only the IR's grammar, so nothing else
    reaches the generated file), ``where(`` -> ``tl.where(``, ``q`` / ``kv`` -> ``mask_q`` / ``mask_kv``."""
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"mask predicate is not an expression: {expr!r}") from exc
    for node in ast.walk(tree):
        ok = isinstance(node, _EXPR_NODES)
        if isinstance(node, ast.Name):
            ok = node.id in _EXPR_NAMES
        elif isinstance(node, ast.Call):
            ok = isinstance(node.func, ast.Name) and node.func.id == "where" and len(node.args) == 3 \
                and not node.keywords
        elif isinstance(node, ast.Constant):
            ok = type(node.value) is int
        if not ok:
            raise ValueError(f"mask predicate {expr!r}: {type(node).__name__} is outside the IR's grammar")
    src = re.sub(r"\bwhere\(", "tl.where(", " ".join(expr.split()))
    # The kernels evaluate it inline, on the index tensors mask_q [BM, 1] / mask_kv [1, BN] (or their
    # transposes): q is the query tile's name there.
    return re.sub(r"\bkv\b", "mask_kv", re.sub(r"\bq\b", "mask_q", src))


def default_config(D: int, dtype: torch.dtype, interpret: bool, block_m: int = 64,
                   block_n: int = 64) -> dict[str, int]:
    """Launch options (num_warps, num_stages) for head dim ``D`` (max of the qk and v head dims) and the
    block table's tiles; the tile sizes come from the block table. 8 warps from head dims above 64 or
    tiles of 128 × 64 on: sm_90 ptxas spills the backward kernels' f32 dk / dv / dq tiles on 4 (the
    forward is spill-free either way)."""
    if interpret:
        return {"num_warps": 4, "num_stages": 1}
    warps = 8 if block_d(D) > 64 or block_m * block_n >= 128 * 64 else 4
    return {"num_warps": warps, "num_stages": 3 if block_d(D) <= 64 else 2}


def _meta(table: BlockTable, config: dict | None, Lq: int, Lk: int, D: int, Dv: int,
          dtype: torch.dtype) -> dict[str, object]:
    """Compile-time kernel arguments (tl.constexpr) and launch options."""
    bm, bn = int(table.block_m), int(table.block_n)
    cfg = dict(config or default_config(max(D, Dv), dtype, interpreting(), bm, bn))
    for key, have in (("BLOCK_M", bm), ("BLOCK_N", bn)):
        if key in cfg and int(cfg[key]) != have:
            raise ValueError(f"config {key}={cfg[key]} differs from the block table's {have}: the table's "
                             "blocks are the kernels' tiles (build the table with the config's sizes)")
    if bm < 16 or bn < 16 or bm & (bm - 1) or bn & (bn - 1):
        raise ValueError(f"block sizes must be powers of two >= 16 (tl.dot), got {bm}x{bn}")
    return triton_dense.launch_meta({**cfg, "BLOCK_M": bm, "BLOCK_N": bn}, Lq, Lk, D, Dv, dtype)


def _flags(dtype: torch.dtype, mask_expr: str | None, has_keep: bool, has_bias: bool,
           softcap: float) -> dict[str, object]:
    return {
        "HAS_MASK": mask_expr is not None,
        "MASK_EXPR": render_mask(mask_expr) if mask_expr is not None else "",
        "HAS_KEEP": has_keep,
        "HAS_BIAS": has_bias,
        "HAS_SOFTCAP": softcap > 0.0,
        # Interpreter bug triton-lang/triton#11584: bf16 tl.dot multiplies raw bit patterns.
        "UPCAST_DOT": interpreting() and dtype == torch.bfloat16,
    }


def _keep_4d(keep: torch.Tensor | None, shape: tuple[int, int, int, int],
             ref: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """uint8 broadcast view of the bool ``keep`` as (B, Hq, Lq, Lk) (stride 0 on broadcast dims, no
    copy) and its strides; without one, ``ref`` as a never-read placeholder and zero strides."""
    if keep is None:
        return ref, (0, 0, 0, 0)
    if keep.dtype != torch.bool or keep.dim() > 4 or keep.device != ref.device:
        raise ValueError("keep must be a bool tensor on q's device, broadcastable to (B, Hq, Lq, Lk)")
    k4 = keep.expand(shape).view(torch.uint8)
    return k4, k4.stride()


def _table_strides(table: BlockTable, B: int, Hq: int, Lq: int, Lk: int, device: torch.device,
                   transposed: bool) -> tuple[tuple[torch.Tensor, ...], tuple[int, ...]]:
    """The table's (num, idx, full_num, full_idx) tensors, forward or transposed lists, and their
    strides (num: batch, head; idx: batch, head, row) with 0 on a shared (size 1) batch / head dim."""
    if (table.Lq, table.Lk) != (Lq, Lk):
        raise ValueError(f"block table is for L {table.Lq}x{table.Lk}, inputs are {Lq}x{Lk}")
    tensors = ((table.q_num, table.q_idx, table.qfull_num, table.qfull_idx) if transposed
               else (table.kv_num, table.kv_idx, table.full_num, table.full_idx))
    num, idx = tensors[0], tensors[1]
    rows = -(-(Lk if transposed else Lq) // (table.block_n if transposed else table.block_m))
    Bt, Ht = num.shape[0], num.shape[1]
    if num.dim() != 3 or idx.dim() != 4 or Bt not in (1, B) or Ht not in (1, Hq) or num.shape[2] != rows:
        raise ValueError(f"block table lists of shape {tuple(num.shape)} / {tuple(idx.shape)} do not fit "
                         f"B={B}, Hq={Hq}, {rows} blocks")
    for t in tensors:
        if t.dtype != torch.int32 or t.device != device:
            raise ValueError("block table tensors must be int32 on the inputs' device")
        if not t.is_contiguous() or t.shape != (num.shape if t.dim() == 3 else idx.shape):
            raise ValueError("block table tensors must be contiguous, partial and full lists alike")
    strides = (0 if Bt == 1 else num.stride(0), 0 if Ht == 1 else num.stride(1),
               0 if Bt == 1 else idx.stride(0), 0 if Ht == 1 else idx.stride(1), idx.stride(2))
    return tensors, strides


def sparse_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    keep: torch.Tensor | None,
    table: BlockTable,
    scale: float,
    softcap: float,
    mask_expr: str | None,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention forward.

    q (B, Hq, Lq, D); k (B, Hkv, Lk, D); v (B, Hkv, Lk, Dv), any strides, one dtype among f32 / f16 /
    bf16, Hq % Hkv == 0; bias None or float, broadcastable to (B, Hq, Lq, Lk); keep None or bool,
    broadcastable to (B, Hq, Lq, Lk); table from ``blocks.block_table(mask_expr, keep, Lq, Lk, BM, BN,
    device)``. Returns out (B, Hq, Lq, Dv) in q.dtype and lse (B, Hq, Lq) f32 (natural log)."""
    (B, Hq, Hkv, Lq, Lk, D, Dv), out, lse = triton_dense.fwd_outputs(q, k, v)
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    meta = _meta(table, config, Lq, Lk, D, Dv, q.dtype)
    tabs, tstr = _table_strides(table, B, Hq, Lq, Lk, q.device, transposed=False)
    shape4 = (B, Hq, Lq, Lk)
    b4 = bias_4d(bias, shape4, q)
    bstr = b4.stride() if bias is not None else (0, 0, 0, 0)
    m4, mstr = _keep_4d(keep, shape4, q)
    qk_scale, cap_scale = score_consts(float(scale), float(softcap))
    mod = codegen.load_kernel_module("sparse_fwd", **_flags(q.dtype, mask_expr, keep is not None,
                                                            bias is not None, softcap))
    grid = (triton.cdiv(Lq, meta["BLOCK_M"]), B * Hq)
    mod.attn_fwd[grid](
        q, k, v, b4, m4, out, lse, *tabs,
        *q.stride(), *k.stride(), *v.stride(), *bstr, *mstr, *out.stride(), *tstr,
        Hq, Hq // Hkv, Lq, Lk, D, Dv, qk_scale, cap_scale,
        **meta,
    )
    return out, lse


def sparse_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    keep: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    table: BlockTable,
    scale: float,
    softcap: float,
    mask_expr: str | None,
    bias_requires_grad: bool,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Block-sparse attention backward (deterministic: no atomics).

    dout, out (B, Hq, Lq, Dv) any strides; q, k, v, bias, keep, table, mask_expr as in
    :func:`sparse_fwd`; lse (B, Hq, Lq) f32 from the forward. Returns dq (B, Hq, Lq, D), dk (B, Hkv, Lk,
    D), dv (B, Hkv, Lk, Dv) in the inputs' dtypes and layouts (``empty_like``), and dbias with bias's
    shape and dtype when ``bias_requires_grad`` (else None): a zero-filled (B, Hq, Lq, Lk) f32 dS,
    written on visited tiles, summed over bias's broadcast dims."""
    B, Hq, Hkv, Lq, Lk, D, Dv = check_inputs(q, k, v)
    check_interpreter()
    bias_grad = bias is not None and bias_requires_grad
    dq, dk, dv = empty_like(q), empty_like(k), empty_like(v)
    # EMPTY tiles are never visited, so dS starts at zero (not poisoned) and only visited tiles are written.
    ds = torch.zeros((B, Hq, Lq, Lk), dtype=torch.float32, device=q.device) if bias_grad else q
    if B * Hq == 0 or (Lq == 0 and Lk == 0):
        return dq, dk, dv, (reduce_dbias(ds, bias) if bias_grad else None)
    meta = _meta(table, config, Lq, Lk, D, Dv, q.dtype)
    tabs, tstr = _table_strides(table, B, Hq, Lq, Lk, q.device, transposed=False)
    tabs_t, tstr_t = _table_strides(table, B, Hq, Lq, Lk, q.device, transposed=True)
    lse = lse.contiguous()
    delta = empty((B, Hq, Lq), torch.float32, q.device)
    shape4 = (B, Hq, Lq, Lk)
    b4 = bias_4d(bias, shape4, q)
    bstr = b4.stride() if bias is not None else (0, 0, 0, 0)
    m4, mstr = _keep_4d(keep, shape4, q)
    dsstr = ds.stride() if bias_grad else (0, 0, 0, 0)
    qk_scale, cap_scale = score_consts(float(scale), float(softcap))
    mod = codegen.load_kernel_module("sparse_bwd", BIAS_GRAD=bias_grad,
                                     **_flags(q.dtype, mask_expr, keep is not None, bias is not None, softcap))
    bm, bn = meta["BLOCK_M"], meta["BLOCK_N"]
    shape_args = (Hq, Hq // Hkv, Lq, Lk, D, Dv, qk_scale, cap_scale, float(scale))

    triton_dense.preprocess(mod, out, dout, delta, meta)
    if Lk > 0:
        mod.attn_bwd_dkdv[(triton.cdiv(Lk, bn), B * Hkv)](
            q, k, v, b4, m4, dout, lse, delta, dk, dv, *tabs_t,
            *q.stride(), *k.stride(), *v.stride(), *bstr, *mstr, *dout.stride(), *dk.stride(), *dv.stride(),
            *tstr_t, *shape_args, **meta,
        )
    if Lq > 0:
        mod.attn_bwd_dq[(triton.cdiv(Lq, bm), B * Hq)](
            q, k, v, b4, m4, dout, lse, delta, dq, ds, *tabs,
            *q.stride(), *k.stride(), *v.stride(), *bstr, *mstr, *dout.stride(), *dq.stride(), *dsstr,
            *tstr, *shape_args, **meta,
        )
    return dq, dk, dv, (reduce_dbias(ds, bias) if bias_grad else None)
