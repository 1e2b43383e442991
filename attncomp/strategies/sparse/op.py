"""Block-sparse attention: the ``attncomp::sparse_fwd`` / ``attncomp::sparse_bwd`` custom ops.

Inputs (normalised, as for ``attncomp::dense_fwd``):

* q ``(B, Hq, Lq, D)``, k ``(B, Hkv, Lk, D)``, v ``(B, Hkv, Lk, Dv)``, ``Hq % Hkv == 0``.
* bias: ``None`` or a float tensor broadcastable to ``(B, Hq, Lq, Lk)`` (additive).
* keep: ``None`` or a bool tensor broadcastable to ``(B, Hq, Lq, Lk)`` (True = visible).
* the block table's index tensors (``attncomp.blocks.BlockTable``, built for ``block_m × block_n``
  tiles from ``mask_expr`` and ``keep``) and ``mask_expr``, a static predicate (``""``: none).

Key ``j`` is visible from query ``i`` iff tile ``(i // block_m, j // block_n)`` is FULL, or it is
PARTIAL and ``j < Lk``, ``mask_expr(i, j)`` and ``keep[b, h, i, j]`` hold. EMPTY tiles are never
computed. Scores are ``scale·q·kᵀ`` (soft-capped when ``softcap > 0``) ``+ bias`` over the visible
keys; ``out = softmax @ v``; ``lse`` ``(B, Hq, Lq)`` float32. A row with no visible key gives
``out = 0`` and ``lse = -inf``.

CUDA tensors run the generated Triton kernels (``attncomp.triton_sparse``); CPU tensors run the
torch executor below, which gathers, per query block, only the key blocks the table lists — memory
``O(Lq · keys per block)``, never ``O(Lq · Lk)``. Its backward recomputes that forward under
autograd (exact, same memory bound).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from attncomp.masks.blocks import LRU, BlockTable, block_table, eval_expr
from attncomp.runtime import validate
from attncomp.runtime.device import use_triton
from attncomp.strategies.dense.op import cpu_flash, repeat_kv

_SCORE_BUDGET = 1 << 24  # score elements per chunk of query blocks in the CPU executor
# CPU inference: above this fraction of visited tiles, one fused call on the materialised mask beats
# gathering key blocks per query block (measured: causal & key padding, 53% of 64x64 tiles visited at
# L=1024, 225 ms gathered vs 49 ms dense, B=2 H=12 D=64 float32, 2 cores)
DENSE_AT = 0.4
_VIS = LRU(256)  # visibility of static tables, per (expr, shape, blocks, chunk)


# ------------------------------------------------------------------------------------------------
# CPU executor
# ------------------------------------------------------------------------------------------------


def _union(kv_num, kv_idx, full_num, full_idx) -> tuple[Tensor, Tensor, Tensor]:
    """Per query block: the visited key blocks (partial then full), their FULL flags and a validity
    mask, each ``(Bt, Ht, nQB, maxK)``."""
    kmax = int((kv_num + full_num).max()) if kv_num.numel() else 0
    kmax = max(kmax, 1)
    p = int(kv_num.max()) if kv_num.numel() else 0
    f = int(full_num.max()) if full_num.numel() else 0
    slots_p = torch.arange(p, device=kv_idx.device)
    slots_f = torch.arange(f, device=kv_idx.device)
    # concatenate [partial (p slots) | full (f slots)], then compact the valid slots to the front
    idx = torch.cat([kv_idx[..., :p], full_idx[..., :f]], -1)
    valid = torch.cat([slots_p < kv_num[..., None], slots_f < full_num[..., None]], -1)
    full = torch.cat([torch.zeros_like(valid[..., :p]), torch.ones_like(valid[..., p:])], -1)
    order = torch.sort((~valid).to(torch.int8), dim=-1, stable=True).indices[..., :kmax]
    take = (lambda t: torch.gather(t, -1, order)) if idx.shape[-1] else (lambda t: t[..., :0])
    idx, full, valid = take(idx).long(), take(full), take(valid)
    if idx.shape[-1] < kmax:  # nothing visited anywhere: one dummy, invalid slot
        pad = kmax - idx.shape[-1]
        idx = torch.nn.functional.pad(idx, (0, pad))
        full = torch.nn.functional.pad(full, (0, pad))
        valid = torch.nn.functional.pad(valid, (0, pad))
    return idx, full & valid, valid


def _gather_blocks(x: Tensor, idx: Tensor, block: int) -> Tensor:
    """x ``(B, H, nKB*block, D)``, idx ``(B|1, H|1, nQ, K)`` → ``(B, H, nQ, K*block, D)``."""
    B, H, _, D = x.shape
    nkb = x.shape[2] // block
    idx = idx.expand(B, H, *idx.shape[2:])
    base = (torch.arange(B, device=x.device)[:, None] * H + torch.arange(H, device=x.device)[None, :]) * nkb
    flat = (idx + base[:, :, None, None]).reshape(-1)
    out = x.reshape(B * H * nkb, block, D).index_select(0, flat)
    return out.reshape(B, H, idx.shape[2], idx.shape[3] * block, D)


def _gather_tiles(m: Tensor, idx: Tensor, q0: int, nq: int, block_m: int, block_n: int) -> Tensor:
    """m ``(Bm, Hm, nQB*block_m, nKB*block_n)`` (padded), idx ``(Bt, Ht, nq, K)`` → the visited tiles
    of query blocks ``q0 .. q0+nq`` as ``(B', H', nq, block_m, K*block_n)``."""
    Bm, Hm = m.shape[:2]
    nkb = m.shape[3] // block_n
    B2, H2 = max(Bm, idx.shape[0]), max(Hm, idx.shape[1])
    tiles = m[:, :, q0 * block_m:(q0 + nq) * block_m].reshape(Bm, Hm, nq, block_m, nkb, block_n)
    tiles = tiles.expand(B2, H2, *tiles.shape[2:])
    index = idx[:, :, :, None, :, None].expand(B2, H2, nq, block_m, idx.shape[3], block_n)
    return torch.gather(tiles, 4, index).reshape(B2, H2, nq, block_m, idx.shape[3] * block_n)


def _pad_to(x: Tensor, dim: int, n: int, value=0) -> Tensor:
    extra = n - x.shape[dim]
    if extra == 0:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [0, extra]
    return torch.nn.functional.pad(x, pad, value=value)


def _full4(t: Tensor, Lq: int, Lk: int) -> Tensor:
    """``t`` broadcastable to ``(B, H, Lq, Lk)`` as a 4-D view expanded along the last two dims."""
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t.expand(t.shape[0], t.shape[1], Lq, Lk)


_HOST = LRU(64)  # host-side decisions of static tables (run): per (mask_expr, shape, blocks, device, keep?)


def run(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, keep: Tensor | None, mask_expr: str,
        block_m: int, block_n: int, scale: float) -> tuple[Tensor, Tensor]:
    """:func:`sparse_fwd` for a site module, on the static table of ``mask_expr`` with ``keep`` (bool,
    broadcastable to ``(B, Hq, Lq, Lk)``) applied inside the visited tiles.

    The custom op runs when autograd needs its formula, a compiler traces the call, or the Triton
    kernels run. CPU inference runs the executor directly with its host-side decisions (the visited
    key blocks per query block, bands, dense-or-gathered) computed once per static table and cached:
    no host read per call, and a new ``keep`` tensor builds no table. NaN / Inf in q or k follow the
    executor's arithmetic, with no pre-scan: a hidden key inside a visited tile is masked additively,
    so an Inf there gives NaN (as torch's SDPA does with a mask); the site's first-call verification
    compares with the eager form."""
    Lq, Lk = q.shape[2], k.shape[2]
    if (torch.compiler.is_compiling() or use_triton(q) or (torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v, bias)))):
        table = torch.ops.attncomp.block_table(q, keep, mask_expr, Lq, Lk, block_m, block_n)
        return torch.ops.attncomp.sparse_fwd(q, k, v, bias, keep, *table, scale, 0.0, mask_expr, block_m, block_n)
    if validate.is_empty(q, k, v):
        return validate.empty_result(q, v)
    key = (mask_expr, Lq, Lk, block_m, block_n, str(q.device), keep is not None)
    host = _HOST.get_or(key, lambda: _host_plan(block_table(mask_expr or None, None, Lq, Lk, block_m, block_n,
                                                            q.device), keep is not None))
    return cpu_forward(q, k, v, bias, keep, *host["table"], scale, 0.0, mask_expr, block_m, block_n, host=host)


def _host_plan(table: BlockTable, keep: bool) -> dict:
    """What the executor decides from a static table alone, once: the union of visited key blocks per
    query block (with ``keep``, FULL tiles are checked element-wise like PARTIAL ones)."""
    idx, full, valid = _union(table.kv_num, table.kv_idx, table.full_num, table.full_idx)
    if keep:
        full = torch.zeros_like(full)
    nqb, nkb = table.kv_num.shape[-1], table.kv_idx.shape[-1]
    return {"table": (table.kv_num, table.kv_idx, table.full_num, table.full_idx), "union": (idx, full, valid),
            "dense": bool(valid.sum() >= DENSE_AT * valid.shape[0] * valid.shape[1] * nqb * nkb), "runs": {}}


def cpu_forward(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, keep: Tensor | None,
                kv_num: Tensor, kv_idx: Tensor, full_num: Tensor, full_idx: Tensor, scale: float,
                softcap: float, mask_expr: str, block_m: int, block_n: int,
                host: dict | None = None) -> tuple[Tensor, Tensor]:
    """The torch executor (differentiable in q, k, v, bias). Shapes as in the module docstring.
    ``host``: the table's cached host-side decisions (:func:`run`); None computes them here (the op)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    nqb, nkb = -(-Lq // block_m), -(-Lk // block_n)
    idx, full, valid = host["union"] if host is not None else _union(kv_num, kv_idx, full_num, full_idx)
    Ht = idx.shape[1]
    if Ht not in (1, Hq):
        raise ValueError(f"block table has {Ht} heads; expected 1 or {Hq}")
    G = Hq // Hkv
    if Ht == Hq and G > 1:  # per-query-head tables: give every query head its own k / v rows
        k, v = repeat_kv(k, G), repeat_kv(v, G)
        Hkv, G = Hq, 1
    grad = torch.is_grad_enabled()
    # torch's fused kernel takes the mask as an additive -inf, which turns an Inf score at a hidden key into
    # NaN; with NaN / Inf in q or k the masked_fill path below replaces hidden scores, as eager does
    fused = (not grad and not softcap and q.device.type == "cpu" and D == Dv
             and (host is not None or (bool(torch.isfinite(q).all()) and bool(torch.isfinite(k).all()))))
    dense = host["dense"] if host is not None else bool(
        valid.sum() >= DENSE_AT * valid.shape[0] * valid.shape[1] * nqb * nkb)
    if fused and dense:
        return _dense_forward(q, k, v, bias, keep, mask_expr, scale, acc, idx, valid, block_m, block_n)
    kp = _pad_to(k, 2, nkb * block_n).to(acc)
    vp = _pad_to(v, 2, nkb * block_n).to(acc)
    qp = _pad_to(q, 2, nqb * block_m).to(acc)
    # (B, Hkv, nQB, G*block_m, D): the group's query heads share one gathered key set
    qg = qp.reshape(B, Hkv, G, nqb, block_m, D).permute(0, 1, 3, 2, 4, 5).reshape(B, Hkv, nqb, G * block_m, D)
    keep4 = None if keep is None else _pad_to(_pad_to(_full4(keep, Lq, Lk), 2, nqb * block_m, False),
                                               3, nkb * block_n, False)
    bias4 = None if bias is None else _pad_to(_pad_to(_full4(bias, Lq, Lk), 2, nqb * block_m),
                                               3, nkb * block_n).to(acc)
    static = keep4 is None and idx.shape[:2] == (1, 1)  # the table and visibility depend on shapes only
    if fused and static and host is not None:
        runs = host["runs"].get("runs", "?")
        if runs == "?":
            runs = host["runs"]["runs"] = _band_runs(idx, valid, block_m, block_n)
    else:
        runs = _band_runs(idx, valid, block_m, block_n) if fused and static else None
    if runs is not None:  # runs of query blocks that read keys at a fixed stride: views, no gather
        front = max(c for _, _, c, _ in runs) * block_n
        back = max((b - 1) * block_m - c * block_n + W * block_n for _, b, c, W in runs)
        kb, vb = (_band_source(x, front, back) for x in (kp, vp))
    chunks = []  # (first query block, count, band (c, W) or None, keys per query block)
    for a, b, c, W in runs or [(0, nqb, None, idx.shape[-1])]:
        step = max(1, _SCORE_BUDGET // max(B * Hq * block_m * W * block_n, 1))
        chunks += [(q0, min(step, b - q0), None if c is None else (c, W), W) for q0 in range(a, b, step)]
    outs, lses = [], []
    for q0, nq, band, K in chunks:
        ib = idx[:, :, q0:q0 + nq]
        key = (mask_expr, Lq, Lk, block_m, block_n, q0, nq, K, str(q.device), band)
        if band is not None:
            kg, vg = (_band_view(x, front, q0, nq, block_m, band[0] * block_n, K * block_n) for x in (kb, vb))
            vis = _VIS.get_or(key, functools.partial(_band_visibility, mask_expr, q0, nq, Lk, block_m,
                                                     block_n, *band))
        else:
            kg = _gather_blocks(kp, ib, block_n)  # (B, Hkv, nq, K*bn, D); ib's heads are 1 or Hkv (== Hq)
            vg = _gather_blocks(vp, ib, block_n)
            make = functools.partial(_visibility, mask_expr, ib, full[:, :, q0:q0 + nq], valid[:, :, q0:q0 + nq],
                                     keep4, q0, nq, Lk, block_m, block_n)
            vis = _VIS.get_or(key, make) if static else make()
        if fused:  # torch's fused CPU flash kernel on the gathered blocks: batch = query blocks
            grouped = _heads_to_group(vis, Hkv, G)
            if static:
                mask, empty = _VIS.get_or((*key, "flash", acc, G),
                                          functools.partial(_flash_mask, grouped, B, Hkv, G, block_m, acc))
            else:
                mask, empty = _flash_mask(grouped, B, Hkv, G, block_m, acc)
            if bias4 is not None:  # (B', H', nq, bm, K*bn), in the order the keys were read
                bt = (_gather_tiles(bias4, ib, q0, nq, block_m, block_n) if band is None
                      else _band_bias(bias4, q0, nq, block_m, block_n, band[0], K))
                mask = mask + _flash_layout(_heads_to_group(bt, Hkv, G), B, Hkv, G, block_m)
            qf = qg[:, :, q0:q0 + nq].permute(2, 0, 1, 3, 4).reshape(nq, B * Hkv, G * block_m, D)
            kf = kg.permute(2, 0, 1, 3, 4).reshape(nq, B * Hkv, K * block_n, D)
            vf = vg.permute(2, 0, 1, 3, 4).reshape(nq, B * Hkv, K * block_n, Dv)
            o, lse = cpu_flash(qf, kf, vf, False, mask, scale)
            lse = lse.float().masked_fill(empty, float("-inf")).expand(nq, B * Hkv, G * block_m)
            lse = lse.reshape(nq, B, Hkv, G, block_m).permute(1, 2, 0, 3, 4)
            o = o.view(nq, B, Hkv, G, block_m, Dv).permute(1, 2, 0, 3, 4, 5)
            outs.append(o)
            lses.append(lse)
            continue
        vis = _heads_to_group(vis, Hkv, G)  # (B'|1, Hkv|1, nq, G|1, bm, K*bn)
        s = (qg[:, :, q0:q0 + nq] * scale) @ kg.transpose(-1, -2)  # (B, Hkv, nq, G*bm, K*bn)
        s = s.view(B, Hkv, nq, G, block_m, K * block_n)
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        if bias4 is not None:
            s = s + _heads_to_group(_gather_tiles(bias4, ib, q0, nq, block_m, block_n), Hkv, G)
        if grad:  # differentiable and NaN-free for rows with no visible key
            s = s.masked_fill(~vis, float("-inf"))
            m = s.amax(-1, keepdim=True).detach()
            m = torch.where(torch.isfinite(m), m, torch.zeros((), dtype=acc))
            e = torch.exp(s - m)
            den = e.sum(-1, keepdim=True)
            o = (e.view(B, Hkv, nq, G * block_m, K * block_n) @ vg).view(B, Hkv, nq, G, block_m, Dv)
            o = o / torch.where(den > 0, den, torch.ones((), dtype=acc))
            lse = (m + torch.log(den)).squeeze(-1)
        else:  # inference: torch's fused softmax, lse from the row max: lse = m - log(max p)
            s.masked_fill_(~vis, float("-inf"))
            m = s.amax(-1)
            p = torch.softmax(s, -1)
            empty = torch.isneginf(m)
            p.masked_fill_(empty[..., None], 0.0)
            o = (p.view(B, Hkv, nq, G * block_m, K * block_n) @ vg).view(B, Hkv, nq, G, block_m, Dv)
            lse = torch.where(empty, m, m - torch.log(p.amax(-1)))
        outs.append(o)
        lses.append(lse)
    out = (outs[0] if len(outs) == 1 else torch.cat(outs, 2)).permute(0, 1, 3, 2, 4, 5)
    lse = (lses[0] if len(lses) == 1 else torch.cat(lses, 2)).permute(0, 1, 3, 2, 4)
    out = out.reshape(B, Hq, nqb * block_m, Dv)[:, :, :Lq]
    lse = lse.reshape(B, Hq, nqb * block_m)[:, :, :Lq]
    return out.to(q.dtype), lse.float()


def _dense_forward(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, keep: Tensor | None, mask_expr: str,
                   scale: float, acc, idx: Tensor, valid: Tensor, block_m: int, block_n: int) -> tuple[Tensor, Tensor]:
    """CPU inference when most tiles are visited: torch's fused kernel on the whole mask — the table's
    tiles (which may select fewer than the mask, e.g. content routing) AND the mask AND keep — in
    chunks of query rows whose mask holds at most ``_SCORE_BUDGET`` elements."""
    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    nkb = -(-Lk // block_n)
    tiles = torch.zeros(*idx.shape[:3], nkb + 1, dtype=torch.bool)
    tiles.scatter_(-1, torch.where(valid, idx, nkb), True)
    tiles = tiles[..., :nkb].repeat_interleave(block_n, -1)[..., :Lk]  # (B'|1, H'|1, nQB, Lk)
    G = Hq // k.shape[1]
    qa, ka, va = q.to(acc), repeat_kv(k, G).to(acc), repeat_kv(v, G).to(acc)
    lead = torch.broadcast_shapes(tiles.shape[:2],
                                  *(_full4(t, Lq, Lk).shape[:2] for t in (keep, bias) if t is not None))
    rows = max(block_m, _SCORE_BUDGET // (lead[0] * lead[1] * Lk) // block_m * block_m)
    outs, lses = [], []
    for r0 in range(0, Lq, rows):
        r1 = min(Lq, r0 + rows)
        vis = tiles[:, :, r0 // block_m:-(-r1 // block_m)].repeat_interleave(block_m, 2)[:, :, :r1 - r0]
        if mask_expr:
            vis = vis & eval_expr(mask_expr, torch.arange(r0, r1)[:, None], torch.arange(Lk)[None, :])
        if keep is not None:
            vis = vis & _full4(keep, Lq, Lk)[:, :, r0:r1]
        empty = ~vis.any(-1, keepdim=True)  # rows that see no key: output 0 and lse -inf, as when gathered
        add = torch.zeros((), dtype=acc).masked_fill(~(vis | empty), float("-inf"))
        if bias is not None:
            add = add + _full4(bias, Lq, Lk)[:, :, r0:r1].to(acc)
        o, lse = cpu_flash(qa[:, :, r0:r1], ka, va, False, add.expand(B, Hq, r1 - r0, Lk), scale)
        outs.append(o.masked_fill(empty, 0.0))
        lses.append(lse.float().masked_fill(empty.squeeze(-1).expand(B, Hq, r1 - r0), float("-inf")))
    return torch.cat(outs, 2).to(q.dtype), torch.cat(lses, 2)


def _band_runs(idx: Tensor, valid: Tensor, block_m: int, block_n: int) -> list | None:
    """Runs ``(a, b, c, W)`` of query blocks ``a <= i < b`` that each visit only key blocks in
    ``[i·r - c, i·r - c + W)``, ``r = block_m / block_n`` — windows, causal bands, neighborhoods in
    row-major order (the blocks at the borders, whose windows are shifted, form short runs of their
    own). None when that would compute over 1.5× the keys the table lists."""
    if block_m % block_n:
        return None
    r = block_m // block_n
    ok = valid[0, 0]
    n = ok.sum(-1)
    first = torch.where(ok, idx[0, 0], 1 << 30).amin(-1)
    last = torch.where(ok, idx[0, 0], -1).amax(-1)
    i = torch.arange(idx.shape[2]) * r
    shift = (i - first).tolist()
    runs, a = [], 0
    for j in range(1, len(shift) + 1):
        if j == len(shift) or (n[j] > 0 and shift[j] != shift[a]):
            rows = n[a:j] > 0
            c = shift[a] if bool(rows.any()) else 0
            W = int((last[a:j] - (i[a:j] - c))[rows].max()) + 1 if bool(rows.any()) else 1
            runs.append((a, j, c, W))
            a = j
    band_keys = sum((b - a) * W for a, b, _, W in runs)
    return runs if band_keys <= 1.5 * max(int(n.sum()), 1) else None


def _band_source(x: Tensor, front: int, back: int) -> Tensor:
    """``x`` ``(B, H, L, D)`` padded with ``front`` zero rows before and up to row ``back`` after."""
    return torch.nn.functional.pad(x, (0, 0, front, max(0, back - x.shape[2]))).contiguous()


def _band_view(xp: Tensor, front: int, q0: int, nq: int, block_m: int, shift: int, width: int) -> Tensor:
    """``(B, H, nq, width, D)`` overlapping view of a :func:`_band_source`: query block ``q0 + t``
    reads rows ``(q0 + t)·block_m - shift`` onwards of the unpadded tensor."""
    B, H, P, D = xp.shape
    offset = xp.storage_offset() + (front + q0 * block_m - shift) * D
    return xp.as_strided((B, H, nq, width, D), (H * P * D, P * D, block_m * D, D, 1), offset)


def _band_bias(m: Tensor, q0: int, nq: int, block_m: int, block_n: int, c: int, W: int) -> Tensor:
    """Bias ``m`` ``(Bm, Hm, nQB*bm, nKB*bn)`` (padded) at a band's keys, ``(Bm, Hm, nq, bm, W*bn)``: query
    block ``q0 + t`` reads keys from ``(q0 + t)·block_m - c·block_n`` on, as :func:`_band_view` does (not
    in the block table's order); keys outside ``m`` get 0 (they are not visible)."""
    Bm, Hm = m.shape[:2]
    rows = m[:, :, q0 * block_m:(q0 + nq) * block_m].reshape(Bm, Hm, nq, block_m, m.shape[3])
    start = torch.arange(q0, q0 + nq, device=m.device) * block_m - c * block_n
    cols = start[:, None] + torch.arange(W * block_n, device=m.device)  # (nq, W*bn)
    inside = (cols >= 0) & (cols < m.shape[3])
    index = cols.clamp(0, m.shape[3] - 1)[None, None, :, None, :].expand(Bm, Hm, nq, block_m, W * block_n)
    return torch.gather(rows, 4, index).masked_fill(~inside[None, None, :, None, :], 0)


def _band_visibility(mask_expr, q0, nq, Lk, block_m, block_n, c, W) -> Tensor:
    """Visibility ``(1, 1, nq, bm, W*bn)`` of a band's keys (in range, and the predicate)."""
    qi = torch.arange(q0 * block_m, (q0 + nq) * block_m).view(nq, block_m, 1)
    start = torch.arange(q0, q0 + nq) * block_m - c * block_n
    kvi = start.view(nq, 1, 1) + torch.arange(W * block_n).view(1, 1, -1)
    vis = (kvi >= 0) & (kvi < Lk)
    if mask_expr:
        vis = vis & eval_expr(mask_expr, qi, kvi)
    return vis[None, None]


def _visibility(mask_expr, ib, fb, vb, keep4, q0, nq, Lk, block_m, block_n) -> Tensor:
    """Which gathered scores are visible: bool ``(B', H', nq, bm, K*bn)``."""
    qi = torch.arange(q0 * block_m, (q0 + nq) * block_m, device=ib.device).view(nq, block_m, 1)
    kvi = (ib[..., None] * block_n + torch.arange(block_n, device=ib.device)).flatten(-2)[:, :, :, None, :]
    vis = kvi < Lk
    if mask_expr:
        vis = vis & eval_expr(mask_expr, qi, kvi)
    if keep4 is not None:
        vis = vis & _gather_tiles(keep4, ib, q0, nq, block_m, block_n)
    full = fb.repeat_interleave(block_n, -1)[:, :, :, None, :]
    valid = vb.repeat_interleave(block_n, -1)[:, :, :, None, :]
    return valid & (full | vis)


def _flash_layout(t: Tensor, B: int, Hkv: int, G: int, block_m: int) -> Tensor:
    """``(B'|1, Hkv|1, nq, G|1, bm|1, S)`` → ``(nq, 1 | B·Hkv, G·bm, S)``, the fused kernel's mask layout
    (batch = query blocks, heads = batch × kv heads, rows = the group's queries). A row axis of 1 (a
    visibility that does not depend on the query) stays 1 without GQA and is expanded to ``block_m``
    with it, since the group's heads are stacked along the rows."""
    lead = (1, 1) if t.shape[:2] == (1, 1) else (B, Hkv)
    rows = t.shape[4] if G == 1 else block_m
    t = t.expand(*lead, t.shape[2], G, rows, t.shape[5])
    nq, bm, S = t.shape[2], t.shape[4], t.shape[5]
    return t.permute(2, 0, 1, 3, 4, 5).reshape(nq, lead[0] * lead[1], G * bm, S)


def _flash_mask(vis: Tensor, B: int, Hkv: int, G: int, block_m: int, dtype) -> tuple[Tensor, Tensor]:
    """Additive mask (0 / -inf) for the fused kernel and the rows that see nothing (the kernel's lse
    is not -inf for those), from grouped visibility ``(B'|1, Hkv|1, nq, G|1, bm|1, S)``."""
    v = _flash_layout(vis, B, Hkv, G, block_m)
    mask = torch.zeros((), dtype=dtype, device=vis.device).masked_fill(~v, float("-inf"))
    return mask, ~v.any(-1)


def _heads_to_group(t: Tensor, Hkv: int, G: int) -> Tensor:
    """``(B', H', nq, bm, S)`` with H' in {1, Hq} → ``(B', Hkv|1, nq, G|1, bm, S)``."""
    if t.shape[1] == 1:
        return t[:, :, :, None]
    return t.reshape(t.shape[0], Hkv, G, *t.shape[2:]).permute(0, 1, 3, 2, 4, 5)


def _autograd_inside_op():
    """A custom op's kernel runs below the autograd dispatch keys; the CPU backward re-enables them
    (only inside this op) to differentiate the executor's own forward."""
    keys = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (keys.AutogradFunctionality, keys.AutogradOther, keys.AutogradNestedTensor):
        exclude = exclude.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


# ------------------------------------------------------------------------------------------------
# Custom ops
# ------------------------------------------------------------------------------------------------


def _table(kv_num, kv_idx, full_num, full_idx, block_m, block_n, Lq, Lk, q_lists) -> BlockTable:
    """A BlockTable view of the op's index tensors (for the Triton launchers)."""
    return BlockTable(block_m, block_n, Lq, Lk, kv_num, kv_idx, full_num, full_idx, *q_lists, states=None)


@torch.library.custom_op("attncomp::sparse_fwd", mutates_args=())
def sparse_fwd(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, keep: Tensor | None,
               kv_num: Tensor, kv_idx: Tensor, full_num: Tensor, full_idx: Tensor, q_num: Tensor, q_idx: Tensor,
               qfull_num: Tensor, qfull_idx: Tensor, scale: float, softcap: float, mask_expr: str, block_m: int,
               block_n: int) -> tuple[Tensor, Tensor]:
    """Block-sparse attention forward; see the module docstring (the table's eight index tensors, in
    ``BlockTable.tensors`` order). Returns (out, lse)."""
    validate.check_qkv(q, k, v, name_prefix="sparse_fwd: ")
    if validate.is_empty(q, k, v):  # zero-size inputs: zeros and lse = -inf (validate.empty_result)
        return validate.empty_result(q, v)
    if use_triton(q):
        from attncomp.strategies.sparse import launcher as triton_sparse
        table = _table(kv_num, kv_idx, full_num, full_idx, block_m, block_n, q.shape[2], k.shape[2],
                       (q_num, q_idx, qfull_num, qfull_idx))
        out, lse = triton_sparse.sparse_fwd(q, k, v, bias, keep, table, scale, softcap, mask_expr or None)
    else:
        with torch.no_grad():
            out, lse = cpu_forward(q, k, v, bias, keep, kv_num, kv_idx, full_num, full_idx, scale, softcap,
                                   mask_expr, block_m, block_n)
    return out.contiguous(), lse.contiguous()


@sparse_fwd.register_fake
def _(q, k, v, bias, keep, kv_num, kv_idx, full_num, full_idx, q_num, q_idx, qfull_num, qfull_idx, scale, softcap,
      mask_expr, block_m, block_n):
    return q.new_empty(*q.shape[:-1], v.shape[-1]), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("attncomp::sparse_bwd", mutates_args=())
def sparse_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, keep: Tensor | None,
               out: Tensor, lse: Tensor, kv_num: Tensor, kv_idx: Tensor, full_num: Tensor, full_idx: Tensor,
               q_num: Tensor, q_idx: Tensor, qfull_num: Tensor, qfull_idx: Tensor, scale: float, softcap: float,
               mask_expr: str, block_m: int, block_n: int,
               want_dbias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv, dbias) of :func:`sparse_fwd`; dbias is empty unless ``want_dbias``."""
    if validate.is_empty(q, k, v):  # nothing was attended to: every gradient is zero
        db = torch.zeros_like(bias) if want_dbias else q.new_empty(0)
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), db
    if use_triton(q):
        from attncomp.strategies.sparse import launcher as triton_sparse
        table = _table(kv_num, kv_idx, full_num, full_idx, block_m, block_n, q.shape[2], k.shape[2],
                       (q_num, q_idx, qfull_num, qfull_idx))
        dq, dk, dv, db = triton_sparse.sparse_bwd(dout, q, k, v, bias, keep, out, lse, table, scale, softcap,
                                                  mask_expr or None, want_dbias)
    else:
        with _autograd_inside_op(), torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            b = bias.detach().requires_grad_() if want_dbias else bias
            o, _ = cpu_forward(*leaves, b, keep, kv_num, kv_idx, full_num, full_idx, scale, softcap, mask_expr,
                               block_m, block_n)
            grads = torch.autograd.grad(o, leaves + ([b] if want_dbias else []), dout, allow_unused=True)
        dq, dk, dv = (g if g is not None else torch.zeros_like(t) for g, t in zip(grads[:3], (q, k, v)))
        db = grads[3] if want_dbias else None
    db = db if db is not None else q.new_empty(0)
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), db.contiguous()


@sparse_bwd.register_fake
def _(dout, q, k, v, bias, keep, out, lse, kv_num, kv_idx, full_num, full_idx, q_num, q_idx, qfull_num, qfull_idx,
      scale, softcap, mask_expr, block_m, block_n, want_dbias):
    db = bias.new_empty(bias.shape) if (want_dbias and bias is not None) else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), db


def _setup(ctx, inputs, output):
    q, k, v, bias, keep, *lists = inputs[:13]
    ctx.save_for_backward(q, k, v, bias, keep, *lists, *output)
    ctx.args = inputs[13:]
    ctx.want_dbias = bias is not None and bias.requires_grad


def _backward(ctx, dout, dlse):
    q, k, v, bias, keep, *rest = ctx.saved_tensors
    lists, (out, lse) = rest[:8], rest[8:]
    dq, dk, dv, db = sparse_bwd(dout.contiguous(), q, k, v, bias, keep, out, lse, *lists, *ctx.args,
                                ctx.want_dbias)
    return dq, dk, dv, (db if ctx.want_dbias else None), *(None,) * 14


sparse_fwd.register_autograd(_backward, setup_context=_setup)
