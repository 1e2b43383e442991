"""Which graph nodes mean what, in the three graph forms attncomp reads.

fx (``symbolic_trace``: ``call_module`` Softmax/Dropout, ``call_method``), Dynamo (torch-level
functions such as ``torch._C._nn.scaled_dot_product_attention``) and ``torch.export`` (aten ops).
Each op class is a set of keys; :func:`op_key` turns a node into its key.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

aten = torch.ops.aten


def _m(*names: str) -> set:
    return {("method", n) for n in names}


SDPA = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention,
        aten.scaled_dot_product_attention.default}
MATMUL = {operator.matmul, torch.matmul, torch.bmm, aten.matmul.default, aten.bmm.default} | _m(
    "matmul", "bmm", "__matmul__")
EINSUM = {torch.einsum, aten.einsum.default}
BADDBMM = {torch.baddbmm, aten.baddbmm.default} | _m("baddbmm")
MHA = {F.multi_head_attention_forward, nn.MultiheadAttention}
SOFTMAX = {F.softmax, torch.softmax, aten._softmax.default, aten.softmax.int, nn.Softmax} | _m("softmax")
DROPOUT = {F.dropout, torch.dropout, aten.dropout.default, nn.Dropout} | _m("dropout")
CAST = {aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.type_as.default} | _m(
    "to", "type", "type_as", "float", "half", "bfloat16", "double")
TRANSPOSE = {torch.transpose, aten.transpose.int} | _m("transpose")
PERMUTE = {torch.permute, aten.permute.default} | _m("permute")
MUL = {operator.mul, torch.mul, aten.mul.Tensor, aten.mul.Scalar, operator.imul} | _m("mul", "__mul__")
DIV = {operator.truediv, torch.div, torch.true_divide, aten.div.Tensor, aten.div.Scalar,
       operator.itruediv} | _m("div", "__truediv__")
ADD = {operator.add, torch.add, aten.add.Tensor, aten.add.Scalar, operator.iadd} | _m("add", "__add__")
SUB = {operator.sub, torch.sub, aten.sub.Tensor, aten.sub.Scalar, operator.isub} | _m("sub", "__sub__")
MASKED_FILL = {torch.masked_fill, aten.masked_fill.Scalar, aten.masked_fill.Tensor} | _m("masked_fill")
WHERE = {torch.where, aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar}
VIEW = {torch.reshape, aten.view.default, aten.reshape.default, aten._unsafe_view.default} | _m(
    "view", "reshape")
EXPAND = {aten.expand.default} | _m("expand")
GETITEM = {operator.getitem}
# Opaque helpers that some libraries wrap for fx tracing and that mean ``scores + mask`` (the mask
# may be None at run time): timm's ``maybe_add_mask``.
ADD_OPTIONAL: set = set()
# Opaque helpers that return None for the constant arguments given (fx graphs traced with
# defaults fixed): target → predicate over the node's args.
NONE_WHEN: dict = {}
try:
    from timm.layers import attention as _timm_attention

    ADD_OPTIONAL.add(_timm_attention.maybe_add_mask)
    # resolve_self_attn_mask(seq_len, attn, attn_mask=None, is_causal=False) is None without mask
    NONE_WHEN[_timm_attention.resolve_self_attn_mask] = lambda a, kw: (
        (a[2] if len(a) > 2 else kw.get("attn_mask")) is None
        and (a[3] if len(a) > 3 else kw.get("is_causal", False)) is False)
except Exception:  # timm missing or moved: nothing to add
    pass
ASSERTS = {aten._assert_tensor_metadata.default, aten._assert_scalar.default, torch._assert}
CONTIGUOUS = {aten.clone.default} | _m("contiguous")


def op_key(node: fx.Node, gm: fx.GraphModule | None = None):
    """A hashable key naming what ``node`` computes (function object, method name or module type)."""
    if node.op == "call_function":
        return node.target
    if node.op == "call_method":
        return ("method", node.target)
    if node.op == "call_module" and gm is not None:
        try:
            return type(gm.get_submodule(node.target))
        except AttributeError:
            return None
    return None


def is_op(node, table: set, gm: fx.GraphModule | None = None) -> bool:
    if not isinstance(node, fx.Node):
        return False
    key = op_key(node, gm)
    try:
        return key in table
    except TypeError:
        return False


def arg(node: fx.Node, index: int, name: str, default=None):
    """Positional-or-keyword argument ``name`` of a call node."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def meta(node) -> torch.Tensor | None:
    """The example value (fake or real tensor) recorded for ``node``, if any."""
    if not isinstance(node, fx.Node):
        return None
    for key in ("val", "example_value", "tensor_meta"):
        v = node.meta.get(key)
        if v is not None:
            return v
    return None


def ndim(node) -> int | None:
    m = meta(node)
    shape = getattr(m, "shape", None)
    return None if shape is None else len(shape)


def shape(node) -> tuple | None:
    m = meta(node)
    s = getattr(m, "shape", None)
    return None if s is None else tuple(s)


def device_type(node) -> str:
    """The device type ("cpu", "cuda") of the tensor recorded for ``node``; "cpu" when none is recorded."""
    return getattr(getattr(meta(node), "device", None), "type", None) or "cpu"
