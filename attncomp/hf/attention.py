"""The ``AttentionInterface`` function of ``attn_implementation="attncomp"``: one attention call of a
transformers model on attncomp's ops, with the mask as an :class:`~attncomp.hf.masks.AttncompMask`.

Which op runs (``q`` ``(B, Hq, Lq, D)``, ``k`` / ``v`` ``(B, Hkv, Lk, D)``, GQA without repeating k, v):

* ``Lq == 1`` (a decode step): the visible keys are one range of the cache, cut by key padding. Without
  key padding (and without grad) the split-KV decode op ``attncomp::decode_fwd`` with that range's
  length and window; with key padding (or grad) an additive ``(B, 1, 1, Lk)`` row to
  ``attncomp::dense_fwd`` (:func:`decode_step`).
* full or causal (any offset: bottom-right aligned after a cache), with or without key padding:
  ``attncomp::dense_fwd`` with ``causal_offset`` and an additive ``(B, 1, 1, Lk)`` padding row.
* a sliding window: the block-sparse ``attncomp.ops.attention(q, k, v, ir.Window(...), keep=padding)``,
  which visits only the tiles inside the band.
* packed sequences (document ids): the above per document (an eager loop over the documents: their
  boundaries are read on the host).

No op builds an ``(Lq, Lk)`` mask. A query that sees no key (a left-padding row) gets zeros, where the
eager implementation averages every value: such rows are padding and never reach a real token.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from attncomp import ir
from attncomp.hf.masks import AttncompMask
from attncomp.strategies.decode.op import decode_fwd  # the custom op attncomp::decode_fwd
from attncomp.strategies.dense import op as dense_op
from attncomp.strategies.sparse.masked import attention as masked_attention  # attncomp.ops.attention


def _padding_bias(padding: Tensor | None, row: Tensor | None, like: Tensor) -> Tensor | None:
    """Additive ``(B|1, 1, 1, Lk)`` from key padding ``(B, Lk)`` and a row ``(Lk,)`` (True = visible)."""
    keep = padding if row is None else (row[None] if padding is None else padding & row)
    if keep is None:
        return None
    zero = torch.zeros((), dtype=like.dtype, device=like.device)
    return torch.where(keep, zero, float("-inf"))[:, None, None, :]


def decode_range(mask: AttncompMask, Lk: int) -> tuple[int, int | None] | None:
    """The decode op's ``(kv_len, window_left)`` for the one query of a decode step over ``Lk`` keys, or None.

    The query at ``delta = mask.delta`` sees the keys ``j`` of ``mask.band`` around it: the range
    ``[delta - left, delta + right]`` cut to ``[0, Lk)``. ``attncomp::decode_fwd`` places its query at
    ``kv_len - 1`` and reads ``[kv_len - 1 - window_left, kv_len - 1]``: ``kv_len = end + 1`` and
    ``window_left = end - start`` (None: no left bound). None when the range is empty (the dense path
    then gives such a row its zeros). Python ints only: no tensor is read."""
    right, left = mask.band.right, mask.band.left
    end = Lk - 1 if right is None else min(mask.delta + right, Lk - 1)
    if end < 0:
        return None
    if left is None:
        return end + 1, None
    start = mask.delta - left
    if start > end:
        return None
    return end + 1, end - start


def decode_step(q: Tensor, k: Tensor, v: Tensor, mask: AttncompMask, scale: float, softcap: float) -> Tensor:
    """One query per sequence against the cache: q ``(B, Hq, 1, D)``, k ``(B, Hkv, Lk, D)`` → ``(B, Hq, 1, Dv)``.

    The visible keys are ``mask.band`` at ``delta = q_offset - kv_offset`` (a contiguous range) and the
    key padding. Without key padding, and when no input needs a gradient (the decode op is forward
    only), the range goes to the split-KV decode op ``attncomp::decode_fwd`` (:func:`decode_range`):
    ``kv_lens=None`` when the range ends at the last key (a DynamicCache), else a ``(B,)`` tensor of the
    one length (a StaticCache's unwritten slots lie past it) made from a Python int, no host read. With
    key padding (a ``(B, Lk)`` row per sequence, which the decode op has no input for; whether a row is a
    plain prefix would need a host read) or a gradient, an additive ``(B, 1, 1, Lk)`` row goes to
    ``attncomp::dense_fwd``.
    """
    Lk = k.shape[2]
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    span = None if mask.key_padding is not None or grad else decode_range(mask, Lk)
    if span is not None:
        kv_len, window_left = span
        kv_lens = None if kv_len == Lk else torch.full((q.shape[0],), kv_len, dtype=torch.int64, device=q.device)
        out, _ = decode_fwd(q, k, v, kv_lens, scale, window_left, softcap, 0)
        return out
    row = mask.band.row(mask.delta, Lk, q.device)
    bias = _padding_bias(mask.key_padding, row, q)
    out, _ = dense_op.run(q, k, v, bias, scale, None, softcap, exact_lse=False)  # lse unused
    return out


def _run(q: Tensor, k: Tensor, v: Tensor, pattern, padding: Tensor | None, scale: float, softcap: float) -> Tensor:
    """Attention over the local IR ``pattern`` (``Full`` / ``Causal`` / ``Window``) and key padding
    ``(B, Lk)`` or None; q ``(B, Hq, Lq, D)`` → ``(B, Hq, Lq, Dv)``."""
    if isinstance(pattern, ir.Window):
        keep = None if padding is None else padding[:, None, None, :]
        return masked_attention(q, k, v, pattern, keep=keep, scale=scale, softcap=softcap)
    offset = pattern.offset if isinstance(pattern, ir.Causal) else None
    out, _ = dense_op.run(q, k, v, _padding_bias(padding, None, q), scale, offset, softcap, exact_lse=False)
    return out


def _documents(q: Tensor, k: Tensor, v: Tensor, mask: AttncompMask, scale: float, softcap: float) -> Tensor:
    """Packed sequences: each document of each row on its own (the pattern inside it at offset 0)."""
    pattern = mask.band.local(0)
    rows = []
    for b in range(q.shape[0]):
        ids = mask.documents[b]
        starts = [0] + (torch.nonzero(ids[1:] != ids[:-1]).flatten() + 1).tolist() + [ids.shape[0]]
        parts = [_run(q[b:b + 1, :, s:e], k[b:b + 1, :, s:e], v[b:b + 1, :, s:e], pattern, None, scale, softcap)
                 for s, e in zip(starts[:-1], starts[1:]) if e > s]
        rows.append(torch.cat(parts, 2))
    return torch.cat(rows, 0)


def attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask,
                      scaling: float | None = None, dropout: float = 0.0, sliding_window: int | None = None,
                      softcap: float | None = None, **kwargs) -> tuple[Tensor, None]:
    """transformers' attention-function signature on attncomp's ops.

    Args:
        module: the attention module (its ``is_causal`` is read only when ``attention_mask`` is None).
        query: ``(B, Hq, Lq, D)``; key / value: ``(B, Hkv, Lk, D)`` / ``(B, Hkv, Lk, Dv)``, ``Hq % Hkv == 0``.
        attention_mask: an :class:`AttncompMask` (from :func:`attncomp.hf.masks.mask_interface`); a 4-D
            tensor a caller built itself (bool: True = visible, or additive float), broadcastable to
            ``(B, Hq, Lq, Lk)``; or None (then, as with sdpa, causal when ``module.is_causal`` and
            ``Lq > 1``, else full).
        scaling: score scale (default ``1/sqrt(D)``); softcap: ``softcap·tanh(s/softcap)`` when set.
        dropout: must be 0 (attncomp's ops have no attention dropout): ``NotImplementedError`` otherwise.
        sliding_window: the layer's window (Gemma2, Qwen2, …); the mask already carries it (a layer with a
            window whose mask has none raises ``ValueError``).

    Returns:
        ``(attn_output (B, Lq, Hq, Dv), None)``: no attention weights are formed.
    """
    if dropout:
        raise NotImplementedError(f"attn_implementation='attncomp' has no attention dropout (got dropout={dropout}); "
                                  "set the config's attention dropout to 0 or use attn_implementation='eager'")
    if kwargs.get("output_attentions"):
        raise NotImplementedError("attn_implementation='attncomp' does not form attention weights "
                                  "(output_attentions=True); use attn_implementation='eager'")
    scale = 1.0 / math.sqrt(query.shape[-1]) if scaling is None else float(scaling)
    cap = float(softcap or 0.0)
    if isinstance(attention_mask, AttncompMask):
        m = attention_mask
        if sliding_window is not None and m.band.left is None:
            raise ValueError(f"attncomp: layer {type(module).__name__} has sliding_window={sliding_window} but its "
                             f"mask has no window ({m})")
        if (m.q_length, m.kv_length) != (query.shape[2], key.shape[2]):
            raise ValueError(f"attncomp: mask made for Lq={m.q_length}, Lk={m.kv_length}, called with "
                             f"Lq={query.shape[2]}, Lk={key.shape[2]}")
        if m.documents is not None:
            out = _documents(query, key, value, m, scale, cap)
        elif query.shape[2] == 1:
            out = decode_step(query, key, value, m, scale, cap)
        else:
            out = _run(query, key, value, m.ir(), m.key_padding, scale, cap)
    elif attention_mask is None:
        causal = query.shape[2] > 1 and getattr(module, "is_causal", True)
        out = _run(query, key, value, ir.Causal(0) if causal else ir.Full(), None, scale, cap)
    elif isinstance(attention_mask, Tensor) and attention_mask.dim() == 4:
        if attention_mask.dtype == torch.bool:
            out = masked_attention(query, key, value, keep=attention_mask, scale=scale, softcap=cap)
        else:
            out = masked_attention(query, key, value, bias=attention_mask.to(query.dtype), scale=scale, softcap=cap)
    else:
        shape = f" with shape {tuple(attention_mask.shape)}" if isinstance(attention_mask, Tensor) else ""
        raise TypeError(f"attn_implementation='attncomp' got an attention_mask of type "
                        f"{type(attention_mask).__name__}{shape}; expected the attncomp mask, a 4-D tensor or None")
    return out.transpose(1, 2).contiguous(), None

