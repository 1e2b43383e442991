"""Autotuning candidates for the dense templates (``dense_fwd.py.j2``, ``dense_bwd.py.j2``).

A candidate is a plain dict of the launcher's knobs: ``BLOCK_M``, ``BLOCK_N`` (query / key tile
rows), ``num_warps``, ``num_stages``. The dense kernels have no strategy knobs (no split-KV or
chunk size yet); a template that has them adds them to its candidates here, beside it.

:func:`candidates` lists the configs worth timing for one kernel call; :func:`prune` drops those
the device cannot hold. Every dropped config has a reason (``prune(..., reasons=list)``) so a
tuning log can say why a config was never timed.
"""

from __future__ import annotations

import itertools

# Configs timed on a GPU: tiles of 32-128 rows, 4 or 8 warps, 1-4 pipeline stages. Deliberately a
# short list (16): each candidate costs a compile (~1 s) and a do_bench (~0.1 s) per shape bucket.
GPU_CANDIDATES: tuple[dict[str, int], ...] = tuple(
    {"BLOCK_M": m, "BLOCK_N": n, "num_warps": w, "num_stages": s}
    for (m, n), w, s in itertools.product(((128, 64), (128, 32), (64, 64), (64, 32)), (4, 8), (2, 3))
)

# Configs timed under Triton's interpreter (CPU tensors, TRITON_INTERPRET=1). The interpreter runs
# one numpy op per tile, so the tile sizes are what matters; warps / stages are ignored by it.
INTERPRETER_CANDIDATES: tuple[dict[str, int], ...] = (
    {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1},
    {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1},
    {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1},
    {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1},
)

_ELEM_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def block_d(d: int) -> int:
    """The padded head dim the kernels use (power of two, at least 16)."""
    return max(16, 1 << (max(int(d), 1) - 1).bit_length())


def smem_bytes(cfg: dict[str, int], head_dim: int, dtype: str) -> int:
    """Shared memory a forward config needs, estimated as the Q tile plus ``num_stages`` buffered
    K and V tiles, in the input dtype (Triton's pipeliner buffers each loaded tile per stage)."""
    bd = block_d(head_dim)
    elem = _ELEM_BYTES.get(dtype, 4)
    stages = max(1, int(cfg.get("num_stages", 1)))
    return elem * (cfg["BLOCK_M"] * bd + stages * cfg["BLOCK_N"] * 2 * bd)


def prune(configs, *, head_dim: int, dtype: str, Lq: int, Lk: int, smem_limit: int | None,
          reasons: list[str] | None = None) -> list[dict[str, int]]:
    """Drop configs the device cannot hold or that cannot help this shape.

    * shared memory (:func:`smem_bytes`) above ``smem_limit`` (``None``: no limit, e.g. the
      interpreter);
    * head dims above 128 with 128-row tiles (the accumulators spill registers), and float32 above 64
      (FMA dots: the backward needs more than sm_90's 227 KiB of shared memory);
    * tiles larger than the padded sequence (``BLOCK_M > max(16, pow2(Lq))``, same for keys): they
      only compute padding, and duplicate a smaller config.

    ``reasons`` (if given) receives one line per dropped config. Never returns an empty list when
    ``configs`` is not empty: if every config is dropped, the smallest one is kept.
    """
    kept, dropped = [], []
    m_cap, n_cap = block_d(max(Lq, 16)), block_d(max(Lk, 16))
    for cfg in configs:
        why = None
        if smem_limit is not None and smem_bytes(cfg, head_dim, dtype) > smem_limit:
            why = f"needs {smem_bytes(cfg, head_dim, dtype)} B shared memory > {smem_limit} B"
        elif block_d(head_dim) > 128 and max(cfg["BLOCK_M"], cfg["BLOCK_N"]) >= 128:
            why = f"head dim {head_dim} with a 128-row tile spills registers"
        elif dtype == "float32" and block_d(head_dim) > 64 and max(cfg["BLOCK_M"], cfg["BLOCK_N"]) >= 128:
            # f32 tl.dot runs on FMA units: measured on sm_90 (tests/test_sm90_compile.py), 128 x 64 tiles at
            # head dim 128 spill ~270 KB in the forward and the backward kernels need 257 KB of shared memory.
            why = f"float32 at head dim {head_dim} with a 128-row tile: backward exceeds sm_90 shared memory"
        elif (smem_limit is not None and (block_d(head_dim) > 64 or dtype == "float32")
              and cfg["BLOCK_M"] * cfg["BLOCK_N"] >= 128 * 64 and cfg.get("num_stages", 1) >= 3):
            # The estimate above is the forward's; measured on sm_90, the backward's dK/dV kernel with 128 x 64
            # tiles and 3 stages needs 297 KB at head dim 128 (bf16; 2 stages: 161-206 KB) and 264 KB at head
            # dim 64 in float32 with a bias gradient.
            why = (f"head dim {head_dim} ({dtype}) with 128 x 64 tiles and 3 stages: backward exceeds "
                   f"{smem_limit} B shared memory")
        elif cfg["BLOCK_M"] > m_cap or cfg["BLOCK_N"] > n_cap:
            why = f"tile larger than the padded sequence ({m_cap}x{n_cap})"
        if why:
            dropped.append((cfg, why))
        else:
            kept.append(dict(cfg))
    if not kept and dropped:
        kept = [dict(min((c for c, _ in dropped), key=lambda c: (c["BLOCK_M"] * c["BLOCK_N"], c["num_stages"])))]
    if reasons is not None:
        reasons.extend(f"{fmt(c)}: {why}" for c, why in dropped if c not in kept)
    return kept


def candidates(*, head_dim: int, dtype: str, Lq: int, Lk: int, interpret: bool,
               smem_limit: int | None = None, reasons: list[str] | None = None) -> list[dict[str, int]]:
    """The configs worth timing for a dense kernel call (after :func:`prune`)."""
    base = INTERPRETER_CANDIDATES if interpret else GPU_CANDIDATES
    return prune(base, head_dim=head_dim, dtype=dtype, Lq=Lq, Lk=Lk,
                 smem_limit=None if interpret else smem_limit, reasons=reasons)


def fmt(cfg: dict) -> str:
    """``BLOCK_M=64 BLOCK_N=32 w4 s2`` — a config on one line."""
    parts = [f"{k}={v}" for k, v in cfg.items() if k not in ("num_warps", "num_stages")]
    if "num_warps" in cfg:
        parts.append(f"w{cfg['num_warps']}")
    if "num_stages" in cfg:
        parts.append(f"s{cfg['num_stages']}")
    return " ".join(parts)
