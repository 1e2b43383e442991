"""How many splits of the key range a decode call is worth (FlashDecoding's split-KV).

Pure function of sizes, for the ``choose_reduction_order`` pass and the launcher's ``n_splits=0``.
"""

from __future__ import annotations

import math

from attncomp.ir import Causal, Full, Window, runtime_part, static_part

__all__ = ["DEFAULT_SM_COUNT", "MAX_LQ", "MAX_SPLITS", "MIN_KEYS_PER_SPLIT", "MIN_LK", "decode_splits", "decode_window"]

MAX_LQ = 16  # longer query blocks fill the GPU from the query axis: the dense kernel does better
MIN_LK = 1024  # shorter key ranges: one program per (batch, kv head) is done before a split pays
MIN_KEYS_PER_SPLIT = 256  # each split reads at least this many keys (its merge costs one row write)
MAX_SPLITS = 64  # the merge kernel holds all splits of a row in one tile
DEFAULT_SM_COUNT = 132  # device unknown (planning without a GPU): an H100 SXM


def decode_splits(Lq: int, Lk: int, Hq: int, Hkv: int, B: int, device_sm_count: int | None) -> int:
    """Number of key splits for a decode call; 0 = not worth splitting (use the one-pass kernel).

    Lq query rows per head, Lk keys (the longest sequence), Hq / Hkv heads, B sequences, the
    device's SM count (None: :data:`DEFAULT_SM_COUNT`). Phase 1 runs ``B·Hkv·splits`` programs (the
    query heads of a kv head share one program), so splitting pays when ``B·Hkv`` programs leave
    program slots idle (two per SM: a memory-bound kernel needs a second program to hide its load
    latency). As in FlashAttention-2's ``num_splits_heuristic`` (which is also given 2 × SMs): among
    the split counts that keep at least :data:`MIN_KEYS_PER_SPLIT` keys per split, take the smallest
    whose wave efficiency (programs / (waves × slots)) is within 85% of the best one."""
    if Lq < 1 or Lq > MAX_LQ or Lk < MIN_LK or Hkv < 1 or B < 1:
        return 0
    slots = 2 * (int(device_sm_count) if device_sm_count else DEFAULT_SM_COUNT)
    programs = B * Hkv
    if programs >= 0.8 * slots:  # one wave is (nearly) full already
        return 0
    max_splits = min(MAX_SPLITS, Lk // MIN_KEYS_PER_SPLIT)

    def efficiency(n: int) -> float:
        waves = programs * n / slots
        return waves / math.ceil(waves)

    best = max(efficiency(n) for n in range(1, max_splits + 1))
    for n in range(1, max_splits + 1):
        if efficiency(n) >= 0.85 * best:
            return n if n > 1 else 0
    return 0


DECODE_MIN_KEYS = 256  # fewer keys: the dense kernel's one pass is as good


def decode_window(spec) -> tuple[int | None] | None:
    """``(window_left,)`` when ``spec`` is a decode call the split-KV kernel computes exactly — at most
    ``decode.plan.MAX_LQ`` queries at the end of at least :data:`DECODE_MIN_KEYS` keys, seeing every
    key up to their own position (bottom-right causal; one query: every key) or a window ending there —
    else None. Static sizes only: the kernel places query ``i`` at ``Lk - Lq + i``."""
    d = spec.dims
    if not (isinstance(d.Lq, int) and isinstance(d.Lk, int)) or not (1 <= d.Lq <= MAX_LQ and d.Lk >= DECODE_MIN_KEYS):
        return None
    if runtime_part(spec.mask) or spec.dropout_p or spec.score.softcap:
        return None
    m, end = static_part(spec.mask), d.Lk - d.Lq
    if (isinstance(m, Full) and d.Lq == 1) or m == Causal(end):
        return (None,)
    if isinstance(m, Window) and m.right == end and m.left is not None:
        return (m.left + end,)
    return None
