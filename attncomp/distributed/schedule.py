"""The ring schedule: which key/value rows each rank needs from each peer, and which block calls it runs.

Everything here is pure arithmetic on (mask, layout, world size): every rank computes the same
schedule for every rank, so the sends one rank posts are exactly the receives its peers post.

Masks are IR masks over global positions — ``None`` / ``ir.Full()``, ``ir.Causal(offset)``,
``ir.Window(left, right)``, ``ir.BlockDiagonal(n)`` — and for a (query range, key range) pair each is
decided *empty*, *full* or *partial* by interval arithmetic on ``kv − q`` (causal, window) or on the
document index ``pos // n`` (block-diagonal). Empty pairs are never computed; full ones run without a
mask; partial ones with the mask (built by :mod:`.ring` as a causal offset and/or an additive bias).

Exchange: in step ``d = 1 … W−1`` rank ``r`` receives from ``(r − d) mod W`` and sends to
``(r + d) mod W`` — but only when the receiver's queries see some of the sender's keys, and then only
the rows of the sender's shard that are seen (a window needs only the band's edge of its neighbour).
Steps in which a rank neither sends, receives nor computes are left out of its schedule; the ring
still runs over every shift in order, so each message is posted at the same position on both its
ends, in the forward and in the backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from attncomp import ir

from .layout import ShardLayout

EMPTY, FULL, PARTIAL = "empty", "full", "partial"

# Rows per query tile when a partial pair of a window / block-diagonal mask is cut into tiles, each
# against only the keys it can see (dense block calls cannot skip masked tiles themselves).
TILE_ROWS = 256


def normalize_mask(mask):
    """``None`` for no mask; the mask itself for the kinds ring attention handles; else ``TypeError``."""
    if mask is None or isinstance(mask, ir.Full):
        return None
    if isinstance(mask, ir.Causal):
        if not isinstance(mask.offset, int):
            raise TypeError(f"Causal offset must be an int, got {mask.offset!r}")
        return mask
    if isinstance(mask, ir.Window):
        for side in (mask.left, mask.right):
            if side is not None and not isinstance(side, int):
                raise TypeError(f"Window bounds must be ints or None, got {mask!r}")
        return None if mask.left is None and mask.right is None else mask
    if isinstance(mask, ir.BlockDiagonal):
        if not isinstance(mask.size, int) or mask.size <= 0:
            raise ValueError(f"BlockDiagonal size must be a positive int, got {mask.size!r}")
        return mask
    raise TypeError("ring_attention mask must be None, ir.Causal(offset), ir.Window(left, right) or "
                    f"ir.BlockDiagonal(n) over global positions, got {type(mask).__name__}: {mask!r}")


def band(mask) -> tuple[float, float]:
    """Visible ``kv − q`` band ``[lo, hi]`` of a causal / window mask."""
    inf = float("inf")
    if isinstance(mask, ir.Causal):
        return -inf, mask.offset
    return (-inf if mask.left is None else -mask.left), (inf if mask.right is None else mask.right)


def classify(mask, q0: int, q1: int, k0: int, k1: int) -> str:
    """EMPTY / FULL / PARTIAL for queries ``[q0, q1)`` against keys ``[k0, k1)`` (global positions)."""
    if q0 >= q1 or k0 >= k1:
        return EMPTY
    if mask is None:
        return FULL
    if isinstance(mask, ir.BlockDiagonal):
        n = mask.size
        qa, qb, ka, kb = q0 // n, (q1 - 1) // n, k0 // n, (k1 - 1) // n
        if qb < ka or kb < qa:
            return EMPTY
        return FULL if qa == qb == ka == kb else PARTIAL
    lo, hi = band(mask)
    dmin, dmax = k0 - (q1 - 1), (k1 - 1) - q0  # every integer in [dmin, dmax] occurs in the block
    if dmax < lo or dmin > hi or lo > hi:
        return EMPTY
    return FULL if lo <= dmin and dmax <= hi else PARTIAL


def visible_keys(mask, q0: int, q1: int, k0: int, k1: int) -> tuple[int, int]:
    """The sub-range of keys ``[k0, k1)`` that some query in ``[q0, q1)`` sees (possibly empty)."""
    if mask is None:
        return k0, k1
    if isinstance(mask, ir.BlockDiagonal):
        n = mask.size
        a, b = max(k0, (q0 // n) * n), min(k1, ((q1 - 1) // n + 1) * n)
    else:
        lo, hi = band(mask)
        a = k0 if lo == float("-inf") else max(k0, q0 + int(lo))
        b = k1 if hi == float("inf") else min(k1, q1 - 1 + int(hi) + 1)
    return (a, b) if a < b else (k0, k0)


@dataclass(frozen=True)
class Call:
    """One block call: this rank's query rows ``q`` (local to its shard) against the rows ``kv`` of the
    key/value buffer of this step (local to that buffer); ``masked``: the pair is partial (apply the
    mask), and then key ``j`` of the block is visible from query ``i`` iff the mask's predicate holds
    at ``(q_start + i, kv_start + j)`` — the global positions of the rows, or for a rank's own shard
    under a causal mask (one call), positions in the shard."""

    q: tuple[int, int]
    kv: tuple[int, int]
    q_start: int
    kv_start: int
    masked: bool


@dataclass(frozen=True)
class Step:
    """Step ``shift`` of a rank's schedule. ``recv_from`` / ``send_to``: peer ranks (in the group) or
    None; ``recv_rows`` / ``send_rows``: the row range of the sender's shard that travels; ``calls``:
    the block calls on the received rows (on the rank's own k/v in step 0)."""

    shift: int
    recv_from: int | None
    recv_rows: tuple[int, int] | None
    send_to: int | None
    send_rows: tuple[int, int] | None
    calls: tuple[Call, ...]


@dataclass(frozen=True)
class Schedule:
    rank: int
    layout: ShardLayout
    mask: object
    steps: tuple[Step, ...]

    @property
    def sends(self) -> int:
        return sum(s.send_to is not None for s in self.steps)

    @property
    def recvs(self) -> int:
        return sum(s.recv_from is not None for s in self.steps)


def _split_partial(mask, qc, kc, tile: int) -> list[tuple[int, int, int, int, str]]:
    """A partial chunk pair as (q0, q1, k0, k1, kind) pieces in global positions, each against only
    the keys its queries see; window and block-diagonal pairs are cut into query tiles first."""
    q0, q1, k0, k1 = qc.start, qc.stop, kc.start, kc.stop
    step = q1 - q0 if isinstance(mask, ir.Causal) else tile
    out = []
    for a in range(q0, q1, step):
        b = min(q1, a + step)
        ka, kb = visible_keys(mask, a, b, k0, k1)
        kind = classify(mask, a, b, ka, kb)
        if kind != EMPTY:
            out.append((a, b, ka, kb, kind))
    return out


def _coalesce(calls: list[tuple]) -> list[tuple]:
    """Merge unmasked calls (local coordinates) that share a query range and have adjacent key ranges,
    then those that share a key range and have adjacent query ranges: zigzag's two chunks of a peer
    are one call when both are fully visible. Masked calls stay as they are (global positions matter)."""
    full = [list(c) for c in calls if not c[6]]
    for q_axis in (False, True):
        a, b = (0, 2) if q_axis else (2, 0)  # merge along axis a (start a, stop a+1), same range on b
        merged: list[list] = []
        for c in sorted(full, key=lambda c: (c[b], c[b + 1], c[a])):
            m = merged[-1] if merged else None
            if m and (m[b], m[b + 1]) == (c[b], c[b + 1]) and m[a + 1] == c[a]:
                m[a + 1] = c[a + 1]
            else:
                merged.append(c)
        full = merged
    return [tuple(c) for c in full] + [c for c in calls if c[6]]


def _pair_calls(mask, lay: ShardLayout, r: int, s: int, tile: int) -> list[tuple]:
    """Rank r's queries against rank s's keys: (q_local0, q_local1, kv_local0, kv_local1, q_start,
    kv_start, masked) with kv in s's shard coordinates."""
    calls = []
    for qc in lay.chunks(r):
        for kc in lay.chunks(s):
            kind = classify(mask, qc.start, qc.stop, kc.start, kc.stop)
            if kind == EMPTY:
                continue
            pieces = [(qc.start, qc.stop, kc.start, kc.stop, FULL)] if kind == FULL else _split_partial(mask, qc, kc,
                                                                                                          tile)
            for q0, q1, k0, k1, k in pieces:
                lq, lk = qc.local + q0 - qc.start, kc.local + k0 - kc.start
                calls.append((lq, lq + q1 - q0, lk, lk + k1 - k0, q0, k0, k == PARTIAL))
    return sorted(_coalesce(calls))


def _local_causal(mask, lay: ShardLayout, r: int) -> bool:
    """Rank r's own queries against its own keys are exactly ``Causal(offset)`` in shard coordinates
    (contiguous, and zigzag under ``Causal(0)``: the early chunk precedes the late one): one call."""
    if not isinstance(mask, ir.Causal):
        return False
    chunks = lay.chunks(r)
    for qc in chunks:
        for kc in chunks:
            kind = classify(mask, qc.start, qc.stop, kc.start, kc.stop)
            if kind != classify(mask, qc.local, qc.local + qc.length, kc.local, kc.local + kc.length):
                return False
            if kind == PARTIAL and qc.start - kc.start != qc.local - kc.local:
                return False
    return True


@lru_cache(maxsize=64)
def _calls_and_rows(mask, lay: ShardLayout, r: int, s: int, tile: int):
    if r == s and _local_causal(mask, lay, r):
        # q_start = kv_start = 0: the mask's predicate on shard positions is this block's visibility
        return (Call((0, lay.local_len), (0, lay.local_len), 0, 0, True),), (0, lay.local_len)
    calls = _pair_calls(mask, lay, r, s, tile)
    if not calls:
        return (), None
    lo, hi = min(c[2] for c in calls), max(c[3] for c in calls)
    return tuple(Call((a, b), (c - lo, d - lo), qs, ks, m) for a, b, c, d, qs, ks, m in calls), (lo, hi)


@lru_cache(maxsize=64)
def build_schedule(mask, lay: ShardLayout, rank: int, tile: int) -> Schedule:
    """Rank ``rank``'s schedule for ``mask`` (normalised, see :func:`normalize_mask`) on ``lay``;
    ``tile``: query tile rows for partial window / block-diagonal pairs (:data:`TILE_ROWS`)."""
    W = lay.world
    steps = []
    for d in range(W):
        src, dst = (rank - d) % W, (rank + d) % W
        calls, rows = _calls_and_rows(mask, lay, rank, src, tile)
        if d == 0:
            calls = tuple(Call(c.q, (c.kv[0] + rows[0], c.kv[1] + rows[0]), c.q_start, c.kv_start, c.masked)
                          for c in calls) if calls else ()
            if calls:
                steps.append(Step(0, None, None, None, None, calls))
            continue
        _, out_rows = _calls_and_rows(mask, lay, dst, rank, tile)
        if rows is None and out_rows is None:
            continue
        steps.append(Step(d, src if rows is not None else None, rows,
                          dst if out_rows is not None else None, out_rows, calls))
    return Schedule(rank, lay, mask, tuple(steps))
