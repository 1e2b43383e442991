"""``nn.MultiheadAttention``: the rule that finds it and the module that runs it.

Dynamo keeps ``F.multi_head_attention_forward`` as one call (inputs ``(L, B, E)``); fx keeps the
module as a leaf (``call_module``, inputs batch-first when the module is). Both become an
:class:`MHAKernel` call with the projection weights as inputs; the attention itself runs on
``attncomp::dense_fwd`` with the masks merged exactly as torch merges them.
"""

from __future__ import annotations

import inspect
import math
import operator

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from . import runtime
from .ir import AttentionSpec, Causal, Dims, Plan, Score, TensorMask, mask_and
from .sitemodule import SiteModule

_SIG = inspect.signature(F.multi_head_attention_forward)
_MOD_SIG = inspect.signature(nn.MultiheadAttention.forward)
TENSORS = ("query", "key", "value", "in_proj_weight", "in_proj_bias", "out_proj_weight", "out_proj_bias",
           "key_padding_mask", "attn_mask", "q_proj_weight", "k_proj_weight", "v_proj_weight")


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


def _weights_used(node: fx.Node) -> bool:
    """Whether anything reads the call's returned weights (anything but ``out = call(...)[0]``)."""
    return any(not (u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0)
               for u in node.users)


def match_mha(node: fx.Node, gm: fx.GraphModule):
    """Rule ``multihead_attention``: (site args, kernel kwargs) or a reason string."""
    module = gm.get_submodule(node.target) if node.op == "call_module" else None
    try:
        bound = (_MOD_SIG.bind(None, *node.args, **node.kwargs) if module is not None
                 else _SIG.bind(*node.args, **node.kwargs))
    except TypeError as e:
        return f"unexpected arguments: {e}"
    bound.apply_defaults()
    a = dict(bound.arguments)
    if a.get("need_weights", True) and _weights_used(node):
        return "need_weights=True: the attention probabilities have another user (the returned weights)"
    if module is not None:
        if module.bias_k is not None or module.add_zero_attn:
            return "add_bias_kv / add_zero_attn are not supported"
        separate = not module._qkv_same_embed_dim
        names = ("q_proj_weight", "k_proj_weight", "v_proj_weight") if separate else ("in_proj_weight",)
        with gm.graph.inserting_before(node):
            params = {n: gm.graph.get_attr(f"{node.target}.{n}") for n in names}
            if module.in_proj_bias is not None:
                params["in_proj_bias"] = gm.graph.get_attr(f"{node.target}.in_proj_bias")
            params["out_proj_weight"] = gm.graph.get_attr(f"{node.target}.out_proj.weight")
            if module.out_proj.bias is not None:
                params["out_proj_bias"] = gm.graph.get_attr(f"{node.target}.out_proj.bias")
        a.update(params)
        kw = dict(num_heads=module.num_heads, dropout_p=module.dropout, training_const=None,
                  is_causal=bool(a.get("is_causal")), separate=separate, batch_first=module.batch_first)
    else:
        if a.get("bias_k") is not None or a.get("add_zero_attn") or a.get("static_k") is not None:
            return "bias_k/bias_v, add_zero_attn and static k/v are not supported"
        for name in ("num_heads", "dropout_p", "training", "is_causal", "use_separate_proj_weight"):
            if isinstance(a.get(name), fx.Node):
                return f"`{name}` is a run-time value"
        kw = dict(num_heads=a["num_heads"], dropout_p=float(a["dropout_p"]), training_const=bool(a["training"]),
                  is_causal=bool(a["is_causal"]), separate=bool(a["use_separate_proj_weight"]), batch_first=False)
    return [a.get(n) for n in TENSORS], kw


def mha_spec(node: fx.Node, args: list, kw: dict) -> AttentionSpec:
    from . import ops_table as T

    s = T.shape(args[0])
    dims = Dims()
    if s:
        L, B, E = (s[1], s[0], s[2]) if kw["batch_first"] and len(s) == 3 else (s[0], s[1] if len(s) == 3 else 1,
                                                                               s[-1])
        hd = E // kw["num_heads"]
        Sk = T.shape(args[1])
        Lk = (Sk[1] if kw["batch_first"] and len(Sk) == 3 else Sk[0]) if Sk else None
        dims = Dims(B, kw["num_heads"], kw["num_heads"], L, Lk, hd, hd)
    masks = [Causal(0)] if kw["is_causal"] and args[7] is None else []
    for m in (args[8], args[7]):
        if isinstance(m, fx.Node):
            masks.append(TensorMask("bool" if getattr(T.meta(m), "dtype", None) == torch.bool else "additive",
                                    T.shape(m)))
    scale = 1.0 / math.sqrt(dims.Dk) if dims.Dk else None
    return AttentionSpec(dims=dims, dtype=str(getattr(T.meta(args[0]), "dtype", "?")).replace("torch.", ""),
                         score=Score(scale=scale), mask=mask_and(*masks), dropout_p=kw["dropout_p"],
                         empty_rows="zero")
