"""Tiling heuristics and autotuning candidates for the split-KV decode template (``decode/fwd.py.j2``).

A config is a plain dict: ``BLOCK_M`` (packed query rows per program: the ``Hq / Hkv × Lq`` rows
that share one kv head, padded to at least 16 for ``tl.dot``), ``BLOCK_N`` (keys per iteration),
``num_warps``, ``num_stages``. The number of splits is not a tiling knob: the planner picks it
(:func:`attncomp.strategies.decode.plan.decode_splits`), or the caller passes it.

Decode reads every key once and multiplies it by a handful of query rows, so it is bound by memory
bandwidth: the knobs that matter on a GPU are enough loads in flight (``BLOCK_N`` × stages) and
enough programs (splits) to cover the SMs.
"""

from __future__ import annotations

import itertools

MAX_BLOCK_M = 64  # more packed rows than this (GQA 8 × Lq 16 = 128, say): a third grid axis over row tiles

GPU_CANDIDATES: tuple[dict[str, int], ...] = tuple(
    {"BLOCK_N": n, "num_warps": w, "num_stages": s} for n, w, s in itertools.product((32, 64, 128), (4, 8), (2, 3))
)
INTERPRETER_CANDIDATES: tuple[dict[str, int], ...] = (
    {"BLOCK_N": 32, "num_warps": 4, "num_stages": 1},
    {"BLOCK_N": 64, "num_warps": 4, "num_stages": 1},
)


def block_m(rows: int) -> int:
    """Packed query rows per program for ``rows = Hq / Hkv × Lq``: a power of two in [16, MAX_BLOCK_M]."""
    return min(MAX_BLOCK_M, max(16, 1 << (max(int(rows), 1) - 1).bit_length()))


def default_config(head_dim: int, dtype: str, rows: int, interpret: bool) -> dict[str, int]:
    """Heuristic config for head dim ``head_dim`` (max of the qk and v head dims), dtype name
    (``"bfloat16"``...) and ``rows`` packed query rows."""
    bm = block_m(rows)
    if interpret:  # one numpy op per tile: few, mid-sized tiles; 32 keys exercise block edges in tests
        return {"BLOCK_M": bm, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    wide = dtype == "float32" or head_dim > 128  # f32 / wide tiles: half the keys per iteration
    return {"BLOCK_M": bm, "BLOCK_N": 32 if wide else 64, "num_warps": 4, "num_stages": 3 if head_dim <= 128 else 2}


def candidates(*, head_dim: int, dtype: str, rows: int, Lk: int, interpret: bool) -> list[dict[str, int]]:
    """Configs worth timing: the lists above with ``BLOCK_M`` set, dropping key tiles longer than the
    padded key range and 128-key tiles at head dims above 128 (register spills)."""
    base = INTERPRETER_CANDIDATES if interpret else GPU_CANDIDATES
    n_cap = max(16, 1 << (max(int(Lk), 1) - 1).bit_length())
    out = []
    for cfg in base:
        if cfg["BLOCK_N"] > n_cap or (head_dim > 128 and cfg["BLOCK_N"] >= 128):
            continue
        out.append({"BLOCK_M": block_m(rows), **cfg})
    return out or [default_config(head_dim, dtype, rows, interpret)]
