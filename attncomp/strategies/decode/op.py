"""Decode attention ops: a short query block (LLM decode, ``Lq <= 16``) against a long KV cache.

``attncomp::decode_fwd(q, k, v, kv_lens, scale, window_left, softcap, n_splits) -> (out, lse)``

* q ``(B, Hq, Lq, D)``; k ``(B, Hkv, Lk, D)``; v ``(B, Hkv, Lk, Dv)``; one float dtype; ``Hq % Hkv == 0``
  (GQA / MQA: query head h reads kv head ``h // (Hq / Hkv)``; K / V are never repeated).
* kv_lens ``(B,)`` int32 / int64 on q's device, or None (every sequence has Lk keys): the keys
  ``j < kv_lens[b]`` of sequence b are its cache (ragged lengths / key padding); values outside
  ``[0, Lk]`` are clamped to it.
* Query i of sequence b sits at position ``kv_lens[b] - Lq + i`` (bottom-right aligned causal, as in
  decode with a KV cache) and sees key j iff ``j <= pos`` (hence ``j < kv_lens[b]``) and, when
  ``window_left`` is not None, ``j >= pos - window_left`` (``window_left + 1`` keys at most).
* Scores ``s = scale·q·kᵀ``, soft-capped to ``softcap·tanh(s / softcap)`` when ``softcap > 0``.
* ``n_splits``: how many parts the key range is cut into on the GPU (split-KV, merged by LSE);
  0 = the planner's choice (:func:`attncomp.strategies.decode.plan.decode_splits`). The result does
  not depend on it beyond rounding; the CPU executor ignores it.
* Returns out ``(B, Hq, Lq, Dv)`` in q's dtype and lse ``(B, Hq, Lq)`` float32 (natural log), both
  contiguous. A row that sees no key (``kv_lens[b] - Lq + i < 0``) gets out 0 and lse -inf.

``attncomp::decode_paged_fwd(q, k_cache, v_cache, page_table, kv_lens, scale, window_left, softcap,
n_splits, max_kv_len)`` is the same with the cache in pages, as serving stacks (vLLM, FlashInfer)
lay it out: k_cache ``(num_pages, page_size, Hkv, D)``, v_cache ``(num_pages, page_size, Hkv, Dv)``,
page_table ``(B, max_pages)`` int32 / int64 (key j of sequence b is slot ``j % page_size`` of page
``page_table[b, j // page_size]``), kv_lens ``(B,)`` required, ``max_kv_len`` (an int the caller's
scheduler knows, no device read) bounds kv_lens and the work; None = the page table's capacity
``max_pages·page_size``. Slots past a sequence's length are never read (they may hold -1); the
pages it does use must be valid page numbers (``[0, num_pages)``: out-of-range ones are an index
error on CPU and undefined on the GPU, which cannot check without a device-to-host copy).

Forward only (inference): a call with an input that requires grad under grad mode raises; the
planner routes training calls to the dense op. CUDA → the Triton kernels
(``templates/decode/fwd.py.j2``); CPU → torch's fused CPU flash kernel on the GQA-packed query
(``_scaled_dot_product_flash_attention_for_cpu``, measured fastest at Lq=1, Lk=4096, Hq=32, Hkv=8,
D=128: 0.8 ms vs 1.8 ms for a matmul path and 2.4 ms for SDPA with enable_gqa, fp32, B=1), or a
float32 matmul path when soft-capping or ``D != Dv`` (the fused kernel has neither). No host
synchronisation in either path; NaN / Inf inputs propagate as the arithmetic gives them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from attncomp.runtime import validate
from attncomp.runtime.device import use_triton
from attncomp.strategies.decode import launcher

__all__ = ["cpu_decode", "decode_attention", "decode_fwd", "decode_paged_fwd", "gather_pages",
           "paged_decode_attention"]

_INT_DTYPES = (torch.int32, torch.int64)


# ----------------------------------------------------------------------------- checks
def _check_ints(t, name: str, shape: tuple[int, ...], like: Tensor) -> None:
    validate.check_tensor(t, name)
    if t.dtype not in _INT_DTYPES:
        raise TypeError(f"{name} must be an int32 or int64 tensor, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name} must be on q's device ({like.device}), got {t.device}")


def _check_args(p: str, q: Tensor, kv_lens, window_left, softcap: float, n_splits: int) -> None:
    if kv_lens is not None:
        _check_ints(kv_lens, f"{p}kv_lens", (q.shape[0],), q)
    if window_left is not None and window_left < 0:
        raise ValueError(f"{p}window_left must be None or >= 0, got {window_left}")
    validate.check_softcap(softcap)
    if n_splits < 0:
        raise ValueError(f"{p}n_splits must be >= 0 (0: the planner's choice), got {n_splits}")


def _check_paged(q: Tensor, k_cache: Tensor, v_cache: Tensor, page_table: Tensor, kv_lens: Tensor,
                 max_kv_len: int | None) -> int:
    """Checks of :func:`decode_paged_fwd`'s cache arguments; returns the key capacity ``max_kv_len``."""
    p = "decode_paged_fwd: "
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        validate.check_tensor(x, p + name)
        if x.dim() != 4:
            raise ValueError(f"{p}{name} must be 4-D, got shape {tuple(x.shape)}; q is (B, Hq, Lq, D), the caches "
                             "(num_pages, page_size, Hkv, D)")
    if not q.dtype == k_cache.dtype == v_cache.dtype or q.dtype not in validate.FLOAT_DTYPES:
        raise TypeError(f"{p}q, k_cache and v_cache must share one float dtype: {q.dtype}, {k_cache.dtype}, "
                        f"{v_cache.dtype}")
    if not q.device == k_cache.device == v_cache.device:
        raise ValueError(f"{p}q, k_cache and v_cache must be on one device: {q.device}, {k_cache.device}, "
                         f"{v_cache.device}")
    B, Hq, _, D = q.shape
    _, page_size, Hkv, Dk = k_cache.shape
    if k_cache.shape[:3] != v_cache.shape[:3]:
        raise ValueError(f"{p}k_cache and v_cache must have the same (num_pages, page_size, Hkv): k_cache is "
                         f"{tuple(k_cache.shape)}, v_cache is {tuple(v_cache.shape)}")
    if Dk != D:
        raise ValueError(f"{p}q and k_cache must have the same head dim (last axis): q is {tuple(q.shape)}, "
                         f"k_cache is {tuple(k_cache.shape)}")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"{p}the query heads (axis 1 of q, {Hq}) must be a multiple of the kv heads (axis 2 of "
                         f"k_cache, {Hkv})")
    if page_size == 0:
        raise ValueError(f"{p}page_size (axis 1 of k_cache) must be >= 1, got {tuple(k_cache.shape)}")
    validate.check_tensor(page_table, p + "page_table")
    if page_table.dim() != 2 or page_table.shape[0] != B:
        raise ValueError(f"{p}page_table must have shape (B, max_pages) = ({B}, ...), got {tuple(page_table.shape)}")
    _check_ints(page_table, p + "page_table", tuple(page_table.shape), q)
    _check_ints(kv_lens, p + "kv_lens", (B,), q)
    capacity = page_table.shape[1] * page_size
    if max_kv_len is None:
        return capacity
    if max_kv_len < 0:
        raise ValueError(f"{p}max_kv_len must be >= 0, got {max_kv_len}")
    if max_kv_len > capacity:
        raise ValueError(f"{p}page table too short: max_kv_len={max_kv_len} keys need "
                         f"{-(-max_kv_len // page_size)} pages of {page_size}, page_table has {page_table.shape[1]} "
                         "columns")
    return max_kv_len


def _forward_only(ctx, inputs, output) -> None:
    raise RuntimeError("attncomp decode attention is forward-only (inference): an input requires grad. Call it "
                       "under torch.no_grad() / torch.inference_mode(), or use attncomp::dense_fwd for training")


def _no_backward(ctx, *grads):  # never reached: _forward_only raises first
    raise RuntimeError("attncomp decode attention has no backward")


# ----------------------------------------------------------------------------- CPU executor
def _visibility(kv_lens: Tensor | None, B: int, Lq: int, Lk: int, window_left: int | None,
                device) -> tuple[Tensor, Tensor]:
    """keep ``(B, 1, Lq, Lk)`` bool (key j visible from query i) and dead ``(B, 1, Lq, 1)`` bool (query i
    sees no key: ``pos < 0``)."""
    lens = torch.full((B,), Lk, device=device) if kv_lens is None else kv_lens.long().clamp(0, Lk)
    pos = (lens[:, None] - Lq + torch.arange(Lq, device=device))[:, None, :, None]  # (B, 1, Lq, 1)
    j = torch.arange(Lk, device=device)
    keep = j <= pos
    if window_left is not None:
        keep = keep & (j >= pos - window_left)
    return keep, pos < 0


def _packed(x: Tensor, group: int) -> Tensor:
    """(B, 1, Lq, n) -> the GQA-packed rows (B, 1, group·Lq, n), row g·Lq + i = row i."""
    B, _, Lq, n = x.shape
    return x if Lq == 1 else x[:, :, None].expand(B, 1, group, Lq, n).reshape(B, 1, group * Lq, n)


def cpu_decode(q: Tensor, k: Tensor, v: Tensor, kv_lens: Tensor | None, scale: float, window_left: int | None,
               softcap: float) -> tuple[Tensor, Tensor]:
    """The torch executor: q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv) -> out (B, Hq, Lq, Dv)
    in q's dtype, lse (B, Hq, Lq) f32. The query heads of a kv head are packed into the rows of one
    (B, Hkv, Hq/Hkv·Lq, D) query (a view when q is contiguous), so K / V are read once per kv head.
    With one query, Lk keys each and no window every key is visible: no mask is built at all."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    group = Hq // Hkv
    qg = q.reshape(B, Hkv, group * Lq, D)
    trivial = kv_lens is None and window_left is None and Lq == 1
    keep, dead = (None, None) if trivial else _visibility(kv_lens, B, Lq, Lk, window_left, q.device)
    if softcap == 0.0 and D == Dv:
        mask = None if trivial else torch.zeros((), dtype=q.dtype).masked_fill(~_packed(keep, group), float("-inf"))
        qg, kk, vv = (x if x.stride(-1) == 1 else x.contiguous() for x in (qg, k, v))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qg, kk, vv, 0.0, False,
                                                                              attn_mask=mask, scale=scale)
        lse = lse.float()
    else:
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        s = (qg.to(acc) @ k.to(acc).transpose(-1, -2)) * scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        if not trivial:
            s = s.masked_fill(~_packed(keep, group), float("-inf"))
        m = s.amax(-1, keepdim=True)
        p = torch.exp(s - m.masked_fill(torch.isneginf(m), 0.0))  # a row with no key: exp(-inf) = 0
        total = p.sum(-1, keepdim=True)
        out = ((p / total) @ v.to(acc)).to(q.dtype)
        lse = (m + total.log()).squeeze(-1).float()
    if dead is not None:  # rows with no visible key: out 0, lse -inf (the fused kernel leaves NaN / 0 there)
        dead = _packed(dead, group)
        out = torch.where(dead, torch.zeros((), dtype=out.dtype), out)
        lse = lse.masked_fill(dead[..., 0], -math.inf)
    return out.reshape(B, Hq, Lq, Dv), lse.reshape(B, Hq, Lq)


def gather_pages(cache: Tensor, page_table: Tensor, kv_lens: Tensor, length: int) -> Tensor:
    """Paged cache (num_pages, page_size, Hkv, D) -> contiguous-per-sequence (B, Hkv, length, D) (a
    transposed view of one gather). Page-table slots at or past ``cdiv(kv_lens[b], page_size)`` are
    not read (page 0 is gathered in their place and masked by the kernel's ``j < kv_len``)."""
    page_size = cache.shape[1]
    n_pages = -(-length // page_size)
    pt = page_table[:, :n_pages].long()
    used = (kv_lens.long().clamp(0, length) + page_size - 1) // page_size  # (B,)
    pt = pt.masked_fill(torch.arange(n_pages, device=pt.device) >= used[:, None], 0)
    B = page_table.shape[0]
    flat = cache[pt].reshape(B, n_pages * page_size, cache.shape[2], cache.shape[3])
    return flat[:, :length].transpose(1, 2)


# ----------------------------------------------------------------------------- ops
@torch.library.custom_op("attncomp::decode_fwd", mutates_args=())
def decode_fwd(q: Tensor, k: Tensor, v: Tensor, kv_lens: Tensor | None, scale: float, window_left: int | None,
               softcap: float, n_splits: int) -> tuple[Tensor, Tensor]:
    """Decode attention on a contiguous KV cache; see the module docstring. Returns (out, lse)."""
    validate.check_qkv(q, k, v, name_prefix="decode_fwd: ")
    _check_args("decode_fwd: ", q, kv_lens, window_left, softcap, n_splits)
    if validate.is_empty(q, k, v):
        return validate.empty_result(q, v)
    if use_triton(q):
        out, lse = launcher.decode_fwd(q, k, v, kv_lens, scale, window_left, softcap, n_splits)
    else:
        out, lse = cpu_decode(q, k, v, kv_lens, scale, window_left, softcap)
    return out.contiguous(), lse.contiguous()


@decode_fwd.register_fake
def _(q, k, v, kv_lens, scale, window_left, softcap, n_splits):
    return q.new_empty(*q.shape[:-1], v.shape[-1]), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("attncomp::decode_paged_fwd", mutates_args=())
def decode_paged_fwd(q: Tensor, k_cache: Tensor, v_cache: Tensor, page_table: Tensor, kv_lens: Tensor, scale: float,
                     window_left: int | None, softcap: float, n_splits: int,
                     max_kv_len: int | None) -> tuple[Tensor, Tensor]:
    """Decode attention on a paged KV cache; see the module docstring. Returns (out, lse)."""
    length = _check_paged(q, k_cache, v_cache, page_table, kv_lens, max_kv_len)
    _check_args("decode_paged_fwd: ", q, kv_lens, window_left, softcap, n_splits)
    Dv = v_cache.shape[-1]
    if use_triton(q) and max(q.shape[-1], Dv) > validate.MAX_HEAD_DIM:
        raise ValueError(f"decode_paged_fwd: head dim {max(q.shape[-1], Dv)} exceeds {validate.MAX_HEAD_DIM}, the "
                         "largest the Triton kernels support")
    if q.shape[:-1].numel() == 0 or Dv == 0 or length == 0:
        return validate.empty_result(q, v_cache)
    if use_triton(q):
        out, lse = launcher.decode_fwd(q, k_cache, v_cache, kv_lens, scale, window_left, softcap, n_splits,
                                       page_table=page_table, max_kv_len=length)
    else:
        k = gather_pages(k_cache, page_table, kv_lens, length)
        v = gather_pages(v_cache, page_table, kv_lens, length)
        out, lse = cpu_decode(q, k, v, kv_lens, scale, window_left, softcap)
    return out.contiguous(), lse.contiguous()


@decode_paged_fwd.register_fake
def _(q, k_cache, v_cache, page_table, kv_lens, scale, window_left, softcap, n_splits, max_kv_len):
    return q.new_empty(*q.shape[:-1], v_cache.shape[-1]), q.new_empty(q.shape[:-1], dtype=torch.float32)


decode_fwd.register_autograd(_no_backward, setup_context=_forward_only)
decode_paged_fwd.register_autograd(_no_backward, setup_context=_forward_only)


# ----------------------------------------------------------------------------- Python entry points
def decode_attention(q: Tensor, k: Tensor, v: Tensor, kv_lens: Tensor | None = None, *, scale: float | None = None,
                     window_left: int | None = None, softcap: float = 0.0,
                     n_splits: int = 0) -> tuple[Tensor, Tensor]:
    """``attncomp::decode_fwd`` with defaults: scale ``D**-0.5``. Shapes as in the module docstring;
    returns out (B, Hq, Lq, Dv) in q's dtype and lse (B, Hq, Lq) float32."""
    scale = q.shape[-1] ** -0.5 if scale is None else validate.check_scale(scale)
    return decode_fwd(q, k, v, kv_lens, scale, window_left, float(softcap), int(n_splits))


def paged_decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, page_table: Tensor, kv_lens: Tensor, *,
                           max_kv_len: int | None = None, scale: float | None = None, window_left: int | None = None,
                           softcap: float = 0.0, n_splits: int = 0) -> tuple[Tensor, Tensor]:
    """``attncomp::decode_paged_fwd`` with defaults: scale ``D**-0.5``, ``max_kv_len`` = the page table's
    capacity. Shapes as in the module docstring; returns out (B, Hq, Lq, Dv), lse (B, Hq, Lq) float32."""
    scale = q.shape[-1] ** -0.5 if scale is None else validate.check_scale(scale)
    return decode_paged_fwd(q, k_cache, v_cache, page_table, kv_lens, scale, window_left, float(softcap),
                            int(n_splits), max_kv_len)
