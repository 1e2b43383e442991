"""Autotuning candidates for the block-sparse op (``sparse_fwd.py.j2`` on CUDA, the block-gathering
torch executor on CPU).

The knobs are the tile sizes of the block table, ``BLOCK_M`` × ``BLOCK_N``: they decide how many
tiles a mask leaves and how much of each visited tile is wasted, so they are tuned per mask and
shape bucket. :func:`candidates` lists the configs worth timing; :func:`prune` drops the ones that
cannot run (tiles under 16 for ``tl.dot``, tiles far longer than the sequence), with a reason.
"""

from __future__ import annotations

GPU = ((128, 64), (64, 64), (128, 32), (64, 32))
CPU = ((32, 32), (64, 64), (64, 32), (128, 64), (128, 128))
INTERPRETER = ((32, 16), (16, 16))


def prune(configs, Lq: int, Lk: int, triton: bool, reasons: list | None = None, *, gpu: bool = False,
          head_dim: int = 0, dtype: str = "") -> list[dict[str, int]]:
    """Drop tiles the kernels cannot take or that only add padding; on a GPU (``gpu``), also float32
    128-row tiles at head dims above 64 (f32 tl.dot runs on FMA units: measured on sm_90 by
    tests/test_sm90_compile.py, 128 x 64 tiles at head dim 128 spill 130-220 KB of registers and the
    backward needs 230 KB of shared memory, the edge of sm_90's 227 KiB)."""
    kept = []
    for cfg in configs:
        bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
        why = None
        if triton and min(bm, bn) < 16:
            why = "tl.dot takes tiles of 16 or more"
        elif gpu and dtype == "float32" and head_dim > 64 and max(bm, bn) >= 128:
            why = f"float32 at head dim {head_dim} with a 128-row tile spills registers (sm_90)"
        elif bm > 2 * max(Lq, 16) or bn > 2 * max(Lk, 16):
            why = f"a tile is more than twice the sequence ({Lq}x{Lk})"
        if why is None:
            kept.append(cfg)
        elif reasons is not None:
            reasons.append((cfg, why))
    return kept


def candidates(device_type: str, triton: bool, interpret: bool, Lq: int, Lk: int, head_dim: int = 0,
               dtype: str = "") -> list[dict[str, int]]:
    """Pruned candidate tile sizes for one call (``head_dim``: max of the qk and v head dims; ``dtype``:
    ``"float32"`` / ``"float16"`` / ``"bfloat16"``)."""
    gpu = triton and not interpret and device_type == "cuda"
    sizes = INTERPRETER if interpret else GPU if device_type == "cuda" else CPU
    return prune([{"BLOCK_M": m, "BLOCK_N": n} for m, n in sizes], Lq, Lk, triton, gpu=gpu, head_dim=head_dim,
                 dtype=dtype)
