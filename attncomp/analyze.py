"""Matched site → :class:`~attncomp.ir.AttentionSpec` (shapes, dtype, scale, score terms, mask).

Also proves, from the graph alone, that the fused path can express the site's score program;
when it cannot, the reason is returned and the site stays on its eager path.
"""

from __future__ import annotations

import math

import torch

from . import ops_table as T
from .ir import AttentionSpec, Causal, Dims, Score, TensorMask, mask_and
from .match import Site

BIG = 1e30


def _shape_after(node, views) -> tuple | None:
    s = T.shape(node)
    if s is None:
        return None
    try:
        x = torch.empty([int(d) for d in s], device="meta")
        for name, args in views:
            x = getattr(x, name)(*args)
        return tuple(x.shape)
    except Exception:
        return None


def _const_value(x):
    if isinstance(x, (int, float)):
        return float(x)
    return None


def check_program(site: Site) -> str | None:
    """Why the fused path cannot run this score program, or ``None`` if it can."""
    fill, masked, viewed = None, False, False
    for step in site.steps:
        op, args = step[0], step[1:]
        if op in ("mul", "div"):
            c = _const_value(args[0])
            if c is None and (masked or viewed):
                return "the scores are scaled by a tensor after a mask or a view"
            if masked and c is not None and not c > 0:
                return "the masked scores are scaled by a non-positive constant"
        elif op in ("add", "sub", "add_scaled"):
            if masked and (fill is None or fill > -BIG):
                return f"a term is added after a mask filled with {fill}"
        elif op in ("masked_fill", "masked_fill_not"):
            v = _const_value(args[1])
            if v is None:
                shp = T.shape(args[1])
                if shp is None or math.prod(shp) != 1:
                    return "a mask is filled with a tensor of values"
            elif v > -BIG:
                return (f"masked_fill with the finite value {v:g} replaces scores; only -inf or "
                        "finfo.min fills are fused")
            if fill is not None and v is not None and v != fill and not (v <= -BIG and fill <= -BIG):
                return "two masks with different fill values"
            fill, masked = (v if v is not None else -math.inf), True
        elif op == "view":
            viewed = True
    return None


def analyze(site: Site) -> AttentionSpec:
    """Build the spec of ``site`` from the node metadata recorded at capture."""
    qs, ks, vs = (_shape_after(o.node, o.views) for o in (site.q, site.k, site.v))
    qm = T.meta(site.q.node)
    dims = Dims()
    if qs and ks and vs:
        B = qs[0] if len(qs) == 4 else 1
        Hq = qs[-3] if len(qs) >= 3 else 1
        Hkv = ks[-3] if len(ks) >= 3 else 1
        dims = Dims(B, Hq, Hkv, qs[-2], ks[-2], qs[-1], vs[-1])
    dtype = str(qm.dtype).replace("torch.", "") if qm is not None else "?"
    masks, bias = [], []
    if site.sdpa.get("is_causal"):
        masks.append(Causal(0))
    for step in site.steps:
        if step[0] in ("masked_fill", "masked_fill_not"):
            masks.append(TensorMask("bool", T.shape(step[1])))
        elif step[0] in ("add", "sub", "add_scaled") and isinstance(step[1], torch.fx.Node):
            m = T.meta(step[1])
            kind = "bool" if m is not None and m.dtype == torch.bool else "additive"
            masks.append(TensorMask(kind, T.shape(step[1])))
            bias.append("tensor")
    scale = site.sdpa.get("scale") if site.sdpa else 1.0
    for step in site.steps:
        if step[0] in ("mul", "div"):
            c = _const_value(step[1])
            if c is None:
                scale = "tensor"
            elif isinstance(scale, float):
                scale = scale * c if step[0] == "mul" else scale / c
    if site.sdpa and scale is None and dims.Dk:
        scale = 1.0 / math.sqrt(dims.Dk)
    return AttentionSpec(
        dims=dims, dtype=dtype, score=Score(scale=scale, bias=tuple(bias)), mask=mask_and(*masks),
        dropout_p=site.dropout[0], empty_rows="zero" if site.sdpa else "nan")
