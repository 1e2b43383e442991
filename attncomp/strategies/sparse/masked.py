"""Masked attention on the block-sparse op: :func:`attention` computes only the tiles a static mask (and an
optional run-time ``keep``) leaves, with tile sizes autotuned per mask and shape (:func:`choose_blocks`)."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch
from torch import Tensor

from attncomp import ir
from attncomp.masks import blocks
from attncomp.runtime import autotune, codegen, validate
from attncomp.runtime.device import use_triton
from attncomp.strategies.sparse import op as _sparse_op  # noqa: F401  (registers attncomp::sparse_fwd)
from attncomp.templates.sparse import configs as sparse_configs

__all__ = ["attention", "choose_blocks", "default_blocks"]


def default_blocks(D: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int]:
    """Tile sizes (BLOCK_M, BLOCK_N) used to build block tables when none are given."""
    if device.type == "cuda":
        return (128, 64) if D <= 64 else (64, 64)
    if use_triton(torch.empty(0, dtype=dtype, device=device)):  # Triton's interpreter: few, small tiles
        return 32, 16
    return 64, 64


def choose_blocks(q: Tensor, k: Tensor, v: Tensor, expr: str | None, keep: Tensor | None, bias: Tensor | None,
                  scale: float, softcap: float) -> tuple[int, int]:
    """Tile sizes of the block table for this call: from the autotune cache, tuned now (each candidate
    of ``attncomp.templates.sparse_configs`` timed on these inputs, wall clock on CPU, ``do_bench`` on
    CUDA), or :func:`default_blocks` (``ATTNCOMP_AUTOTUNE=0``, or while ``torch.compile`` traces)."""

    D, Dv = q.shape[-1], v.shape[-1]
    default = default_blocks(max(D, Dv), q.dtype, q.device)
    if autotune.mode() == "0" or torch.compiler.is_compiling():
        autotune.STATS["heuristic"] += 1
        return default

    B, Hq, Lq, _ = q.shape
    Lk, triton = k.shape[2], use_triton(q)
    interpret = triton and q.device.type != "cuda"

    def bench(cfg):
        bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
        table = blocks.block_table_op(q, keep, expr or "", Lq, Lk, bm, bn)
        with torch.no_grad():
            torch.ops.attncomp.sparse_fwd(q, k, v, bias, keep, *table, scale, softcap, expr or "", bm, bn)

    signature = {"strategy": "sparse", "mask": hashlib.sha1((expr or "").encode()).hexdigest()[:16],
                 "keep": keep is not None, "bias": bias is not None, "softcap": softcap > 0,
                 "dtype": str(q.dtype).removeprefix("torch."), "D": D, "Dv": Dv, "gqa": Hq // k.shape[1],
                 "executor": "triton" if triton else "torch"}
    cfg = autotune.choose("sparse_fwd", signature, autotune.bucket(Lq=Lq, Lk=Lk, BH=B * Hq),
                          lambda: sparse_configs.candidates(q.device.type, triton, interpret, Lq, Lk, max(D, Dv),
                                                            signature["dtype"]), bench,
                          {"BLOCK_M": default[0], "BLOCK_N": default[1]}, device=q.device,
                          version=codegen.source_hash("sparse_fwd.py.j2", "sparse_configs.py",
                                                       str(Path(__file__).with_name("op.py"))))
    return int(cfg["BLOCK_M"]), int(cfg["BLOCK_N"])


def _check_mask(mask) -> str | None:
    if mask is None or isinstance(mask, ir.Full):
        return None
    if isinstance(mask, ir.TensorMask) or (isinstance(mask, ir.And) and ir.runtime_part(mask)):
        raise TypeError("attention(mask=...) takes static masks (ir.Causal, ir.Window, ...); pass run-time "
                        "tensors as keep= (bool) or bias= (additive)")
    if not hasattr(mask, "expr"):
        raise TypeError(f"mask must be an attncomp.ir mask (Causal, Window, Neighborhood, ...), got "
                        f"{type(mask).__name__}")
    return mask.expr()


def attention(q: Tensor, k: Tensor, v: Tensor, mask=None, *, keep: Tensor | None = None,
              bias: Tensor | None = None, scale: float | None = None, softcap: float = 0.0,
              blocks_mn: tuple[int, int] | None = None) -> Tensor:
    """Masked attention that computes only the tiles the mask leaves.

    Args:
        q: ``(B, Hq, Lq, D)``; k: ``(B, Hkv, Lk, D)``; v: ``(B, Hkv, Lk, Dv)``; one float dtype,
            ``Hq % Hkv == 0`` (GQA / MQA without repeating k, v).
        mask: a static IR mask over (query index, key index): ``ir.Causal(offset)``,
            ``ir.Window(left, right)``, ``ir.BlockDiagonal(n)``, ``ir.Grid(s)``, ``ir.Prefix(n)``,
            ``ir.Neighborhood(...)``, ``ir.Predicate(expr)``, or ``And`` / ``Or`` of them.
        keep: optional bool tensor broadcastable to ``(B, Hq, Lq, Lk)``; True = visible (e.g. key
            padding ``(B, 1, 1, Lk)``). ANDed with ``mask``.
        bias: optional additive float tensor broadcastable to ``(B, Hq, Lq, Lk)``.
        scale: score scale (default ``1/sqrt(D)``); softcap: ``softcap·tanh(s/softcap)`` when > 0.
        blocks_mn: tile sizes of the block table (default: :func:`default_blocks`).

    Returns:
        ``(B, Hq, Lq, Dv)`` in q's dtype. A query that sees no key gets zeros (so does every query
        when ``Lk = 0``); ``B``, ``Hq`` or ``Lq`` = 0 give an empty output. Raises ``TypeError`` /
        ``ValueError`` naming the argument for bad inputs (:mod:`attncomp.validate`).
    """
    B, Hq, _, Lq, Lk, D, _ = validate.check_qkv(q, k, v)
    validate.check_keep(keep, (B, Hq, Lq, Lk), q)
    validate.check_additive(bias, (B, Hq, Lq, Lk), q)
    expr = _check_mask(mask)
    scale = validate.check_scale(scale)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    softcap = validate.check_softcap(softcap)
    if validate.is_empty(q, k, v):  # defined results without a block table (validate.empty_result)
        out, _ = torch.ops.attncomp.dense_fwd(q, k, v, None, scale, None, softcap)
        return out
    bm, bn = blocks_mn or choose_blocks(q, k, v, expr, keep, bias, scale, float(softcap))
    table = blocks.block_table_op(q, keep, expr or "", Lq, Lk, bm, bn)
    out, _ = torch.ops.attncomp.sparse_fwd(q, k, v, bias, keep, *table, scale, float(softcap), expr or "", bm, bn)
    return out
