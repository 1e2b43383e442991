"""The module that runs an ``nn.MultiheadAttention`` site (rule: :mod:`attncomp.frontend.mha`).

Dynamo keeps ``F.multi_head_attention_forward`` as one call (inputs ``(L, B, E)``); fx keeps the
module as a leaf (``call_module``, inputs batch-first when the module is). Both become an
:class:`MHAKernel` call with the projection weights as inputs; the attention itself runs on
``attncomp::dense_fwd`` with the masks merged exactly as torch merges them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from attncomp.frontend.mha import TENSORS
from attncomp.ir import Plan
from attncomp.runtime.site import SiteModule
from attncomp.strategies.dense import op as runtime


def _float_mask(m: Tensor | None, dtype) -> Tensor | None:
    if m is None:
        return None
    if m.dtype == torch.bool:
        return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, -math.inf)
    return m.to(dtype)


class MHAKernel(SiteModule):
    """Runs one ``multi_head_attention_forward`` call whose weights are not used.

    Inputs are the call's tensors named in ``TENSORS`` (``None`` where absent); returns
    ``(out, None)`` like torch. query ``(L, B, E)`` (``(B, L, E)`` when ``batch_first``) or ``(L, E)``.
    Training dropout runs the call itself (the site's eager form).
    """

    def __init__(self, plan: Plan, num_heads: int, dropout_p: float, training_const: bool | None,
                 is_causal: bool, separate: bool, batch_first: bool, path: str):
        super().__init__(path)
        self.plan, self.num_heads, self.dropout_p = plan, num_heads, dropout_p
        self.training_const, self.is_causal, self.separate = training_const, is_causal, separate
        self.batch_first = batch_first

    def _p(self) -> float:
        training = self.training if self.training_const is None else self.training_const
        return self.dropout_p if training else 0.0

    def use_fused(self, inputs: tuple) -> bool:
        return self._p() == 0

    def comparable(self, out) -> list:
        return [out[0]]  # the weights are not read (the rule requires it)

    def eager_bytes(self, inputs: tuple) -> int:
        query, key = inputs[0], inputs[1]
        S = key.shape[1] if self.batch_first and key.dim() == 3 else key.shape[0]
        return 3 * (query.numel() // query.shape[-1]) * S * max(query.element_size(), 4) * self.num_heads

    def fused(self, *tensors):
        t = dict(zip(TENSORS, tensors))
        query, key, value = t["query"], t["key"], t["value"]
        if self.batch_first and query.dim() == 3:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        L, B, E = query.shape
        S, H = key.shape[0], self.num_heads
        hd = E // H
        if self.separate:
            wq, wk, wv = t["q_proj_weight"], t["k_proj_weight"], t["v_proj_weight"]
        else:
            wq, wk, wv = t["in_proj_weight"].chunk(3)
        bq, bk, bv = t["in_proj_bias"].chunk(3) if t["in_proj_bias"] is not None else (None,) * 3
        q = F.linear(query, wq, bq).view(L, B * H, hd).transpose(0, 1).reshape(B, H, L, hd)
        k = F.linear(key, wk, bk).view(S, B * H, hd).transpose(0, 1).reshape(B, H, S, hd)
        v = F.linear(value, wv, bv).view(S, B * H, hd).transpose(0, 1).reshape(B, H, S, hd)
        kpm, am = t["key_padding_mask"], t["attn_mask"]
        if unbatched and kpm is not None:
            kpm = kpm.unsqueeze(0)
        causal = self.is_causal and kpm is None
        bias = None
        if am is not None and not causal:
            am = _float_mask(am, q.dtype)
            bias = am.view(B, H, L, S) if am.dim() == 3 else am
        if kpm is not None:
            kp = _float_mask(kpm, q.dtype).view(B, 1, 1, S)
            bias = kp if bias is None else bias + kp
        out, _ = runtime.dense_fwd(q, k, v, bias, 1.0 / math.sqrt(hd), 0 if causal else None, 0.0)
        out = out.permute(2, 0, 1, 3).reshape(L * B, E)
        out = F.linear(out, t["out_proj_weight"], t["out_proj_bias"]).view(L, B, E)
        if unbatched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, None
