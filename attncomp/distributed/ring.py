"""Ring attention over ``torch.distributed``: each rank holds a shard of the sequence, key/value blocks
travel point to point, partial results merge by log-sum-exp.

Forward, on every rank, for each shift of its :class:`~.schedule.Schedule` (same order everywhere):
post the next step's send/receive, compute the current step's block calls on the rows that arrived
(``attncomp::dense_fwd`` per call: no mask for a full pair, a causal offset and/or an additive bias
for a partial one), merge each ``(out, lse)`` into float32 accumulators, wait. Backward, explicitly
in the autograd Function (never left to autograd's per-rank node order): the same key/value exchange
again; each call runs ``attncomp::dense_bwd`` with the *merged* ``out`` and ``lse`` — with the global
``lse`` the block gradients add up exactly (the FlashAttention backward identity) — ``dq`` stays
here, and ``dk`` / ``dv`` for a peer's rows go back to that peer in the same step, to be summed there.

Communication (:mod:`.comm`): ``dist.isend`` / ``dist.irecv`` — gloo on CPU, NCCL on GPUs, the same
code on device tensors (the NCCL path is written but not measured).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

import attncomp.strategies.dense.op  # noqa: F401  (registers torch.ops.attncomp.dense_fwd / dense_bwd)
from attncomp import ir

from . import schedule as sched_mod
from .comm import Exchange, note_call, pack, recv_buffer, unpack
from .layout import check_layout_name, group_info, make_layout
from .merge import acc_dtype, empty_partial, merge_into
from .schedule import Call, Schedule

# ---------------------------------------------------------------------------------------------
# Block masks
# ---------------------------------------------------------------------------------------------


def _additive(keep: Tensor, dtype) -> Tensor:
    """bool ``(m, n)`` → additive ``(m, n)`` in ``dtype``: 0 where kept, ``-inf`` elsewhere."""
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, float("-inf"))


def _band_bias(m: int, n: int, lo: float, hi: float, dtype, device) -> Tensor:
    """``(m, n)`` additive mask: 0 where ``lo <= j − i <= hi``, ``-inf`` elsewhere."""
    d = torch.arange(n, device=device)[None, :] - torch.arange(m, device=device)[:, None]
    return _additive((d >= lo) & (d <= hi), dtype)


def block_mask(mask, call: Call, dtype, device, cache: dict) -> tuple[Tensor | None, int | None]:
    """``(bias, causal_offset)`` for ``attncomp::dense_fwd`` / ``dense_bwd`` on ``call``'s block.

    bias: ``None`` or ``(m, n)`` additive 0/``-inf`` in ``dtype``; causal_offset: ``None`` or ``c`` with
    key j visible from query i iff ``j <= i + c`` (block-local indices). On CUDA the upper edge of a
    band is always a causal offset (the kernels skip tiles by it); on CPU only an offset of 0 is (torch's
    fused kernel takes is_causal), other bands become a bias.
    """
    if not call.masked:
        return None, None
    m, n = call.q[1] - call.q[0], call.kv[1] - call.kv[0]
    qs, ks = call.q_start, call.kv_start
    if isinstance(mask, ir.BlockDiagonal):
        key = ("bd", qs, ks, m, n)
        if key not in cache:
            s = mask.size
            qdoc = (qs + torch.arange(m, device=device))[:, None] // s
            kdoc = (ks + torch.arange(n, device=device))[None, :] // s
            cache[key] = _additive(qdoc == kdoc, dtype)
        return cache[key], None
    lo, hi = sched_mod.band(mask)  # over global kv - q; locally j - i = (kv - q) - (ks - qs)
    shift = ks - qs
    lo_l, hi_l = lo - shift, hi - shift
    upper = hi_l < n - 1          # the upper edge cuts the block
    lower = lo_l > -(m - 1)       # the lower edge cuts the block
    offset = None
    if upper and (device.type == "cuda" or hi_l == 0):
        offset, upper = int(hi_l), False
    if not (upper or lower):
        return None, offset
    key = ("band", lo_l if lower else None, hi_l if upper else None, m, n)
    if key not in cache:
        cache[key] = _band_bias(m, n, lo_l if lower else -math.inf, hi_l if upper else math.inf, dtype, device)
    return cache[key], offset


# ---------------------------------------------------------------------------------------------
# Block backward
# ---------------------------------------------------------------------------------------------


def _repeat_kv(x: Tensor, groups: int) -> Tensor:
    if groups == 1:
        return x
    B, H, L, D = x.shape
    return x[:, :, None].expand(B, H, groups, L, D).reshape(B, H * groups, L, D)


def _block_bwd64(dout, q, k, v, bias, out, lse, scale, offset):
    """float64 block backward with the given (global) lse. ``attncomp::dense_bwd`` recomputes the
    block's own lse for float64 inputs, which is right for one dense call but not for a block of a
    merged result; the formula is the same as the op's."""
    groups = q.shape[1] // k.shape[1]
    kk, vv = _repeat_kv(k, groups), _repeat_kv(v, groups)
    s = (q @ kk.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias
    if offset is not None:
        i = torch.arange(q.shape[2], device=q.device)[:, None]
        j = torch.arange(k.shape[2], device=q.device)[None, :]
        s = s.masked_fill(j > i + offset, float("-inf"))
    lse = lse.to(s.dtype)
    p = torch.exp(s - torch.where(torch.isneginf(lse), 0.0, lse)[..., None])
    p = torch.where(torch.isneginf(lse)[..., None], 0.0, p)
    dv = p.transpose(-1, -2) @ dout
    dp = dout @ vv.transpose(-1, -2)
    ds = p * (dp - (dout * out).sum(-1, keepdim=True))
    dq = (ds @ kk) * scale
    dk = (ds.transpose(-1, -2) @ q) * scale
    if groups > 1:
        B, Hkv = k.shape[:2]
        dk = dk.reshape(B, Hkv, groups, *dk.shape[2:]).sum(2)
        dv = dv.reshape(B, Hkv, groups, *dv.shape[2:]).sum(2)
    return dq, dk, dv


def _block_bwd(dout, q, k, v, bias, out, lse, scale, offset):
    if q.dtype == torch.float64:
        return _block_bwd64(dout, q, k, v, bias, out, lse, scale, offset)
    dq, dk, dv, _ = torch.ops.attncomp.dense_bwd(dout, q, k, v, bias, out, lse, scale, offset, 0.0, False)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# Forward and backward rings
# ---------------------------------------------------------------------------------------------


def _by_shift(sched: Schedule) -> list:
    """The schedule's steps indexed by shift (None where this rank has nothing to do). The loops below
    run over every shift, so a step's messages are posted at the same position on every rank — NCCL
    matches a pair's messages in the order they are posted."""
    steps = [None] * sched.layout.world
    for st in sched.steps:
        steps[st.shift] = st
    return steps


def _post_kv(sched: Schedule, st, k: Tensor, v: Tensor, group, phase: str) -> Exchange | None:
    if st is None or st.shift == 0:
        return None
    send = None if st.send_to is None else (st.send_to, pack(k, v, st.send_rows))
    recv = None if st.recv_from is None else (st.recv_from, recv_buffer(k, v, st.recv_rows, k.dtype))
    return Exchange(group, sched.rank, phase, "kv", st.shift, st.shift).post(send, recv)


def _step_kv(ex: Exchange | None, st, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    if st.shift == 0:
        return k, v
    buf = ex.wait_recv()
    if buf is None:
        return k[:, :, :0], v[:, :, :0]
    return unpack(buf, k, v, st.recv_rows[1] - st.recv_rows[0])


def ring_forward(q: Tensor, k: Tensor, v: Tensor, sched: Schedule, scale: float, group) -> tuple[Tensor, Tensor]:
    """Forward ring. q ``(B, Hq, n, D)``, k ``(B, Hkv, n, D)``, v ``(B, Hkv, n, Dv)`` (this rank's shard);
    returns out ``(B, Hq, n, Dv)`` in q's dtype and lse ``(B, Hq, n)`` in float32 (float64 for float64
    inputs), ``-inf`` where a query sees no key (its out is 0)."""
    acc = acc_dtype(q.dtype)
    out_acc, lse_acc = empty_partial((*q.shape[:-1], v.shape[-1]), acc, q.device)
    steps, cache = _by_shift(sched), {}
    W = len(steps)
    pending: list[Exchange | None] = [None] * (W + 1)
    for t in range(W):
        if t + 1 < W:  # post the next exchange, compute this step, then wait
            pending[t + 1] = _post_kv(sched, steps[t + 1], k, v, group, "fwd")
        st = steps[t]
        if st is None:
            continue
        kb, vb = _step_kv(pending[t], st, k, v)
        for c in st.calls:
            bias, off = block_mask(sched.mask, c, q.dtype, q.device, cache)
            (a, b), (ka, kb_) = c.q, c.kv
            note_call("fwd", st.shift, b - a, kb_ - ka, c.masked)
            o, lse = torch.ops.attncomp.dense_fwd(q[:, :, a:b], kb[:, :, ka:kb_], vb[:, :, ka:kb_], bias, scale, off,
                                                  0.0)
            merge_into(out_acc, lse_acc, c.q, o, lse)
        if pending[t] is not None:
            pending[t].wait_send()
            pending[t] = None
    return out_acc.to(q.dtype), lse_acc


def ring_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, sched: Schedule,
                  scale: float, group) -> tuple[Tensor, Tensor, Tensor]:
    """Backward ring: gradients ``(dq, dk, dv)`` of this rank's shard, shapes and dtypes of q, k, v.

    dout, out ``(B, Hq, n, Dv)``; lse ``(B, Hq, n)`` (the merged ones from :func:`ring_forward`). The key/
    value rows travel as in the forward; their gradients (float32, or float64) go back to the owner
    in the same step and are summed there."""
    acc = acc_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk, dv = torch.zeros(k.shape, dtype=acc, device=k.device), torch.zeros(v.shape, dtype=acc, device=v.device)
    dout = dout.to(q.dtype)
    steps, cache = _by_shift(sched), {}
    W = len(steps)
    pending: list[Exchange | None] = [None] * (W + 1)
    grads_in: list[tuple[Exchange, tuple[int, int]]] = []  # gradients of our rows coming back
    for t in range(W):
        if t + 1 < W:
            pending[t + 1] = _post_kv(sched, steps[t + 1], k, v, group, "bwd")
        st = steps[t]
        if st is None:
            continue
        kb, vb = _step_kv(pending[t], st, k, v)
        if st.shift == 0:
            gk, gv = dk, dv
        else:
            gk = torch.zeros(kb.shape, dtype=acc, device=k.device)
            gv = torch.zeros(vb.shape, dtype=acc, device=v.device)
        for c in st.calls:
            bias, off = block_mask(sched.mask, c, q.dtype, q.device, cache)
            (a, b), (ka, kb_) = c.q, c.kv
            note_call("bwd", st.shift, b - a, kb_ - ka, c.masked)
            cq, ck, cv = _block_bwd(dout[:, :, a:b], q[:, :, a:b], kb[:, :, ka:kb_], vb[:, :, ka:kb_], bias,
                                    out[:, :, a:b], lse[:, :, a:b], scale, off)
            dq[:, :, a:b] += cq
            gk[:, :, ka:kb_] += ck
            gv[:, :, ka:kb_] += cv
        if st.shift == 0:
            continue
        # the gradients of the rows we received go back to their owner; ours come from whom we sent to
        send = None if st.recv_from is None else (st.recv_from, pack(gk, gv, (0, gk.shape[2])))
        recv = None if st.send_to is None else (st.send_to, recv_buffer(k, v, st.send_rows, acc))
        ex = Exchange(group, sched.rank, "bwd", "dkv", st.shift, W + st.shift).post(send, recv)
        if pending[t] is not None:
            pending[t].wait_send()
            pending[t] = None
        for prev, rows in grads_in:  # the previous step's, received while this one computed
            _add_grads(prev, rows, dk, dv)
        grads_in = []
        if recv is not None:
            grads_in.append((ex, st.send_rows))
        else:
            ex.wait_send()
    for prev, rows in grads_in:
        _add_grads(prev, rows, dk, dv)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _add_grads(ex: Exchange, rows: tuple[int, int], dk: Tensor, dv: Tensor) -> None:
    buf = ex.wait_recv()
    ex.wait_send()
    a, b = rows
    gk, gv = unpack(buf, dk, dv, b - a)
    dk[:, :, a:b] += gk
    dv[:, :, a:b] += gv


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sched, scale, group):
        out, lse = ring_forward(q, k, v, sched, scale, group)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.sched, ctx.scale, ctx.group = sched, scale, group
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ring_backward(dout, q, k, v, out, lse, ctx.sched, ctx.scale, ctx.group)
        return dq, dk, dv, None, None, None


def _check_inputs(q: Tensor, k: Tensor, v: Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"ring_attention: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"ring_attention: {name} must be 4-D (B, H, L/W, D), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"ring_attention: {name} must be a floating-point tensor, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise TypeError(f"ring_attention: q, k, v must share dtype and device, got {q.dtype}/{k.dtype}/{v.dtype} "
                        f"on {q.device}/{k.device}/{v.device}")
    (B, Hq, n, D), (Bk, Hkv, nk, Dk), (Bv, Hv, nv, _) = q.shape, k.shape, v.shape
    if not (B == Bk == Bv) or not (n == nk == nv):
        raise ValueError("ring_attention: q, k, v must have the same batch and hold the same positions (self-"
                         f"attention over one sequence shard): got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if D != Dk or Hkv != Hv or Hkv == 0 or Hq % Hkv:
        raise ValueError(f"ring_attention: need q (B, Hq, L, D), k (B, Hkv, L, D), v (B, Hkv, L, Dv) with Hq a "
                         f"multiple of Hkv; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")


def ring_attention(q: Tensor, k: Tensor, v: Tensor, *, mask=None, scale: float | None = None, group=None,
                   layout: str = "contiguous") -> Tensor:
    """Attention over a sequence sharded across the ranks of ``group`` (context parallelism).

    q ``(B, Hq, L/W, D)``, k ``(B, Hkv, L/W, D)``, v ``(B, Hkv, L/W, Dv)``: this rank's shard of the
    sequence, laid out by ``layout`` (``"contiguous"``: rank r holds ``[r·L/W, (r+1)·L/W)``;
    ``"zigzag"``: chunks r and 2W−1−r of 2W, see :func:`attncomp.distributed.shard`); Hq a multiple of
    Hkv (GQA); one float dtype and device; the same shapes on every rank. ``mask``: ``None``,
    ``ir.Causal(offset)``, ``ir.Window(left, right)`` or ``ir.BlockDiagonal(n)`` over *global*
    positions. ``scale``: default ``D ** -0.5``. ``group``: a process group (default: the world; without
    torch.distributed initialised, one process).

    Returns this rank's output shard ``(B, Hq, L/W, Dv)`` in q's dtype (a query that sees no key gives
    zeros). Differentiable: the backward runs its own ring. Every rank of the group must call it with
    the same mask, layout and shapes (collective).
    """
    _check_inputs(q, k, v)
    check_layout_name(layout)
    world, rank = group_info(group)
    lay = make_layout(layout, world, q.shape[2] * world, what=f"ring_attention: global length (L/W = {q.shape[2]} "
                      f"per rank x {world} ranks)")
    mask = sched_mod.normalize_mask(mask)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    sched = sched_mod.build_schedule(mask, lay, rank, sched_mod.TILE_ROWS)
    return _RingAttention.apply(q, k, v, sched, scale, group)
