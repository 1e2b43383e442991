"""Rule ``multihead_attention``: ``nn.MultiheadAttention`` / ``F.multi_head_attention_forward`` calls
whose attention weights are not used. Dynamo keeps ``F.multi_head_attention_forward`` as one call
(inputs ``(L, B, E)``); fx keeps the module call. The site runs on
:class:`attncomp.strategies.dense.mha.MHAKernel`.
"""

from __future__ import annotations

import inspect
import math
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from attncomp.ir import AttentionSpec, Causal, Dims, Score, TensorMask, mask_and
from attncomp.ir import ops_table as T

_SIG = inspect.signature(F.multi_head_attention_forward)
_MOD_SIG = inspect.signature(nn.MultiheadAttention.forward)
TENSORS = ("query", "key", "value", "in_proj_weight", "in_proj_bias", "out_proj_weight", "out_proj_bias",
           "key_padding_mask", "attn_mask", "q_proj_weight", "k_proj_weight", "v_proj_weight")


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
                         empty_rows="zero", device=T.device_type(args[0]))
