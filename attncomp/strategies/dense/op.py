"""Custom ops that run attention: CUDA → generated Triton kernels, CPU → the torch executor.

``attncomp::dense_fwd`` / ``attncomp::dense_bwd`` take normalised inputs:

* q ``(B, Hq, Lq, D)``, k ``(B, Hkv, Lk, D)``, v ``(B, Hkv, Lk, Dv)``, ``Hq % Hkv == 0``; any float dtype.
* bias: ``None`` or a float tensor broadcastable to ``(B, Hq, Lq, Lk)`` — additive, may hold ``-inf``.
* ``causal_offset``: key ``j`` visible from query ``i`` iff ``j <= i + causal_offset``; ``None``: no causal mask.

Scores are ``s = scale·q·kᵀ`` (soft-capped when ``softcap > 0``) ``+ bias``; the output is
``softmax(s) @ v`` and ``lse`` ``(B, Hq, Lq)`` float32 is ``logsumexp(s)``. A row whose scores are
all ``-inf`` gives zeros (the caller patches the site's own semantics).
"""

from __future__ import annotations

import torch
from torch import Tensor

from attncomp.runtime import validate
from attncomp.runtime.device import use_triton


def repeat_kv(x: Tensor, groups: int) -> Tensor:
    if groups == 1:
        return x
    B, H, L, D = x.shape
    return x[:, :, None].expand(B, H, groups, L, D).reshape(B, H * groups, L, D)


def _causal_bias(Lq: int, Lk: int, offset: int, device, dtype) -> Tensor:
    i = torch.arange(Lq, device=device)[:, None]
    j = torch.arange(Lk, device=device)[None, :]
    return torch.zeros((), device=device, dtype=dtype).masked_fill(j > i + offset, float("-inf"))


def math_scores(q, k, bias, scale, causal_offset, softcap) -> Tensor:
    """Reference scores in float32 (or float64 for float64 inputs), ``(B, Hq, Lq, Lk)``."""
    groups = q.shape[1] // k.shape[1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = (q.to(acc) @ repeat_kv(k, groups).to(acc).transpose(-1, -2)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias.to(acc)
    if causal_offset is not None:
        s = s + _causal_bias(q.shape[2], k.shape[2], causal_offset, q.device, acc)
    return s


def _cpu_fused_ok(q: Tensor, softcap: float, causal_offset) -> bool:
    """torch's fused CPU flash kernel covers this call (else the math path runs)."""
    return q.device.type == "cpu" and softcap == 0.0 and causal_offset in (None, 0)


def unit_stride(x: Tensor | None) -> Tensor | None:
    """``x`` with a contiguous last axis. torch's fused CPU flash kernels read q (forward) and out
    (backward) as if their last axis were contiguous without checking it: a transposed view — channel
    attention's ``qᵀ``, say — gives wrong results, so every tensor handed to them goes through here."""
    return x if x is None or x.stride(-1) == 1 or x.dim() == 0 else x.contiguous()


def cpu_flash(q: Tensor, k: Tensor, v: Tensor, causal: bool, attn_mask: Tensor | None, scale: float):
    """``aten._scaled_dot_product_flash_attention_for_cpu`` on unit-stride inputs: ``(out, lse)``."""
    q, k, v = unit_stride(q), unit_stride(k), unit_stride(v)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=attn_mask,
                                                                      scale=scale)


def nonfinite(*ts) -> bool:
    """Whether any of ``ts`` holds NaN or Inf (a host read: never on a steady-state path)."""
    return not all(bool(torch.isfinite(t).all()) for t in ts if t is not None)


def _one_head_dim(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v with one head dim, for torch's fused CPU kernel (it takes no ``Dv != D``): zero columns
    appended to q and k (each product gains exact zeros) or to v (the extra output columns are cut)."""
    D, Dv = k.shape[-1], v.shape[-1]
    if D < Dv:
        return torch.nn.functional.pad(q, (0, Dv - D)), torch.nn.functional.pad(k, (0, Dv - D)), v
    return q, k, torch.nn.functional.pad(v, (0, D - Dv))


def _cpu_fwd(q, k, v, bias, scale, causal_offset, softcap, exact_lse: bool = True):
    if exact_lse and nonfinite(q, k):
        # NaN / Inf in q or k: torch's fused kernel propagates them as the scores' arithmetic does, except a
        # row whose visible scores are all -inf (from -inf data), which it gives lse 0, not -inf. The op's
        # contract is exact, so such calls run the math path; a site that knows its empty rows from the
        # proof asks for exact_lse=False and pays no scan (the host read this takes)
        return _cpu_math(q, k, v, bias, scale, causal_offset, softcap, True, propagate_nan=True)
    Dv = v.shape[-1]
    if _cpu_fused_ok(q, softcap, causal_offset):
        if k.shape[-1] == Dv:
            return _cpu_fused(q, k, v, bias, scale, causal_offset, exact_lse)
        out, lse = _cpu_fused(*_one_head_dim(q, k, v), bias, scale, causal_offset, exact_lse)
        return out[..., :Dv], lse
    return _cpu_math(q, k, v, bias, scale, causal_offset, softcap, exact_lse)


def _cpu_math(q, k, v, bias, scale, causal_offset, softcap, exact_lse: bool, propagate_nan: bool = False):
    """The scores materialised (soft-capping, causal masks at an offset, NaN / Inf in q or k). A row
    with no visible key gives 0; ``propagate_nan``: NaN scores stay NaN, as the data's own arithmetic
    gives them. ``exact_lse=False``: the caller reads no lse, which is not computed."""
    groups = q.shape[1] // k.shape[1]
    s = math_scores(q, k, bias, scale, causal_offset, softcap)
    # softmax, not exp(s - lse): at finfo.min magnitudes (a row that an additive mask hides) lse's log(n)
    # rounds away and exp(s - lse) would sum to n
    p = torch.softmax(s, -1)
    lse = torch.logsumexp(s, -1) if exact_lse or propagate_nan else s.new_empty(s.shape[:-1])
    p = p.masked_fill(torch.isneginf(lse)[..., None], 0.0) if propagate_nan else p.nan_to_num(0.0)
    return (p @ repeat_kv(v, groups).to(p.dtype)).to(q.dtype), lse.float()


def _cpu_fused(q, k, v, bias, scale, causal_offset, exact_lse: bool):
    """torch's fused CPU flash kernel: no soft-cap, causal offset 0 or None, one head dim."""
    groups = q.shape[1] // k.shape[1]
    if (groups > 1 and causal_offset is None
            and (bias is None or (bias.dim() == 4 and bias.shape[1] == 1 and bias.shape[2] == 1))):
        # GQA whose mask does not depend on the query (a key-padding row, a decode step): the query heads
        # of one kv head become rows of one problem, so k and v are read once, not repeated
        B, Hq, Lq, D = q.shape
        qp = q.reshape(B, k.shape[1], groups * Lq, D)
        mask = None if bias is None else bias.to(q.dtype).expand(B, k.shape[1], groups * Lq, k.shape[2])
        out, lse = cpu_flash(qp, k, v, False, mask, scale)
        out, lse = out.reshape(B, Hq, Lq, v.shape[-1]), lse.float().reshape(B, Hq, Lq)
        if bias is not None and exact_lse:  # see below: a row with no visible key gets lse -inf
            lse = lse.masked_fill(torch.isneginf(bias.to(q.dtype)).all(-1).expand(B, Hq, Lq), float("-inf"))
        return out, lse
    kk, vv = repeat_kv(k, groups), repeat_kv(v, groups)
    mask = None if bias is None else bias.to(q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    out, lse = cpu_flash(q, kk, vv, causal_offset == 0, mask, scale)
    lse = lse.float()
    if bias is not None and exact_lse:  # the fused kernel gives a row with no visible key lse 0: make it -inf
        hidden = torch.isneginf(bias.to(q.dtype))  # bias's own (broadcast) shape, not (B, H, Lq, Lk)
        if causal_offset == 0:
            upper = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).triu(1)
            hidden = hidden | upper
        lse = lse.masked_fill(hidden.all(-1), float("-inf"))
    return out, lse


def run(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float,
        causal_offset: int | None, softcap: float = 0.0, exact_lse: bool = True) -> tuple[Tensor, Tensor]:
    """:func:`dense_fwd` for a site module that already holds checked inputs: the custom op when
    autograd needs its formula or a compiler traces the call, else its body directly (the op's
    dispatch costs more than the kernel on small inputs). ``exact_lse=False``: the caller reads only
    ``out`` (it knows its rows with no visible key itself); on CPU the returned lse is then unspecified."""
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v, bias))):
        return dense_fwd(q, k, v, bias, scale, causal_offset, softcap)
    if use_triton(q):  # the kernels' own limits (head dim), as the op checks them
        validate.check_qkv(q, k, v, name_prefix="dense_fwd: ")
    elif (not exact_lse and bias is None and softcap == 0.0 and k.shape[-1] == v.shape[-1]
          and (causal_offset == 0 or (causal_offset is None and q.shape[1] == k.shape[1]))
          and not validate.is_empty(q, k, v)):  # the common case, directly (GQA without causal: packed below)
        groups = q.shape[1] // k.shape[1]
        return cpu_flash(q, repeat_kv(k, groups), repeat_kv(v, groups), causal_offset == 0, None, scale)
    return _forward(q, k, v, bias, scale, causal_offset, softcap, exact_lse)


@torch.library.custom_op("attncomp::dense_fwd", mutates_args=())
def dense_fwd(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float,
              causal_offset: int | None, softcap: float) -> tuple[Tensor, Tensor]:
    """Dense attention forward; see the module docstring for shapes. Returns (out, lse)."""
    validate.check_qkv(q, k, v, name_prefix="dense_fwd: ")
    validate.check_additive(bias, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]), q, "dense_fwd: bias")
    return _forward(q, k, v, bias, scale, causal_offset, softcap)


def _forward(q, k, v, bias, scale, causal_offset, softcap, exact_lse: bool = True):
    if validate.is_empty(q, k, v):  # zero-size inputs: zeros and lse = -inf (validate.empty_result)
        return validate.empty_result(q, v)
    if use_triton(q):
        from attncomp.strategies.dense import launcher as triton_dense
        out, lse = triton_dense.dense_fwd(q, k, v, bias, scale, causal_offset, softcap)
    else:
        out, lse = _cpu_fwd(q, k, v, bias, scale, causal_offset, softcap, exact_lse)
    return out.contiguous(), lse.contiguous()


@dense_fwd.register_fake
def _(q, k, v, bias, scale, causal_offset, softcap):
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
    return out, lse


def _cpu_bwd(dout, q, k, v, bias, out, lse, scale, causal_offset, softcap, want_dbias):
    groups = q.shape[1] // k.shape[1]
    B, Hkv = k.shape[:2]
    # float64: the math path, with lse recomputed (the op returns lse in float32, which the fused
    # kernel's float64 backward does not take and which would cost the gradients their precision)
    # rows whose scores sit at finfo.min magnitudes (an additive mask hides the whole row): the fused
    # backward's exp(s - lse) loses lse's log(n) there; the math path's softmax keeps it
    huge = bias is not None and bool(((lse.abs() > 1e30) & torch.isfinite(lse)).any())
    fused = (_cpu_fused_ok(q, softcap, causal_offset) and k.shape[-1] == v.shape[-1] and not want_dbias
             and q.dtype != torch.float64 and not huge)
    if fused:
        kk, vv = repeat_kv(k, groups), repeat_kv(v, groups)
        mask = None if bias is None else bias.to(q.dtype).expand(
            q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            *(unit_stride(t) for t in (dout, q, kk, vv, out)), lse.masked_fill(torch.isneginf(lse), 0.0), 0.0,
            causal_offset == 0, attn_mask=mask, scale=scale)  # rows with no visible key: the kernel's own lse (0)
        dbias = None
    else:
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        qa, ka, va = q.to(acc), repeat_kv(k, groups).to(acc), repeat_kv(v, groups).to(acc)
        s = math_scores(q, k, bias, scale, causal_offset, 0.0)
        raw = s
        if softcap:  # recompute capped scores to get dtanh
            raw = (qa @ ka.transpose(-1, -2)) * scale
            s = math_scores(q, k, bias, scale, causal_offset, softcap)
        lse_acc = torch.logsumexp(s, -1) if acc == torch.float64 else lse.to(acc)
        p = torch.exp(s - lse_acc[..., None]).nan_to_num(0.0)  # lse may be a merged one (ring attention)
        huge = (lse_acc.abs() > 1e30) & torch.isfinite(lse_acc)  # finfo.min rows: see _cpu_fwd
        p = torch.where(huge[..., None], torch.softmax(s, -1).nan_to_num(0.0), p)
        do = dout.to(acc)
        dv = p.transpose(-1, -2) @ do
        dp = do @ va.transpose(-1, -2)
        ds = p * (dp - (do * out.to(acc)).sum(-1, keepdim=True))
        dbias = ds if want_dbias else None
        if softcap:
            ds = ds * (1 - torch.tanh(raw / softcap) ** 2)
        dq = (ds @ ka) * scale
        dk = (ds.transpose(-1, -2) @ qa) * scale
    if groups > 1:
        dk = dk.reshape(B, Hkv, groups, *dk.shape[2:]).sum(2)
        dv = dv.reshape(B, Hkv, groups, *dv.shape[2:]).sum(2)
    if dbias is not None:
        dbias = dbias.sum_to_size(bias.shape).to(bias.dtype)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbias


@torch.library.custom_op("attncomp::dense_bwd", mutates_args=())
def dense_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, out: Tensor,
              lse: Tensor, scale: float, causal_offset: int | None, softcap: float,
              want_dbias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv, dbias) of :func:`dense_fwd`; dbias is empty unless ``want_dbias``."""
    if validate.is_empty(q, k, v):  # nothing was attended to: every gradient is zero
        db = torch.zeros_like(bias) if want_dbias and bias is not None else q.new_empty(0)
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), db
    if use_triton(q):
        from attncomp.strategies.dense import launcher as triton_dense
        dq, dk, dv, db = triton_dense.dense_bwd(dout, q, k, v, bias, out, lse, scale, causal_offset,
                                                softcap, want_dbias)
    else:
        dq, dk, dv, db = _cpu_bwd(dout, q, k, v, bias, out, lse, scale, causal_offset, softcap, want_dbias)
    db = db if db is not None else q.new_empty(0)
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), db.contiguous()


@dense_bwd.register_fake
def _(dout, q, k, v, bias, out, lse, scale, causal_offset, softcap, want_dbias):
    db = bias.new_empty(bias.shape) if (want_dbias and bias is not None) else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), db


def _setup(ctx, inputs, output):
    q, k, v, bias, scale, causal_offset, softcap = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, bias, out, lse)
    ctx.args = (scale, causal_offset, softcap)
    ctx.want_dbias = bias is not None and bias.requires_grad


def _backward(ctx, dout, dlse):
    q, k, v, bias, out, lse = ctx.saved_tensors
    dq, dk, dv, db = dense_bwd(dout.contiguous(), q, k, v, bias, out, lse, *ctx.args, ctx.want_dbias)
    return dq, dk, dv, (db if ctx.want_dbias else None), None, None, None


dense_fwd.register_autograd(_backward, setup_context=_setup)
