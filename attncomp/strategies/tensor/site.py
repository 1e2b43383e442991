"""Rule ``tensor_attention``: tensor (2-simplicial) attention written in a model, lowered exactly to
:func:`attncomp.tensor.tensor_attention` — or, on request (``attncomp.Tensor(rank=…)``), to the
low-rank approximation :func:`attncomp.tensor_lowrank.lowrank_tensor_attention`.

Recognised form (any leading batch axes shared by all operands; letters renamed freely)::

    s = einsum("bhid,bhjd,bhld->bhijl", q, k1, k2) · scale       (mul / div by constants, or none)
    p = softmax(s.flatten(-2), -1).view_as(s)                      (any flatten / view / reshape pair)
    o = einsum("bhijl,bhjd,bhld->bhid", p, v1, v2)

The rule is anchored on the softmax. A softmax whose input is not a flattened three-operand
product is not a candidate (the softmax_chain rule sees it); a candidate that fails a check — a
mask or bias on the scores, dropout, another user of the probabilities — is a
:class:`~attncomp.match.Miss` with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, fx, nn

from attncomp.frontend.rules import Miss, module_path, neg_dim
from attncomp.ir import AttentionSpec, Dims, Full, Plan, Score, TensorForm
from attncomp.ir import ops_table as T
from attncomp.runtime.approx import Approximation
from attncomp.runtime.site import SiteModule
from attncomp.strategies.linear.site import einsum_operands
from attncomp.strategies.tensor import lowrank
from attncomp.strategies.tensor import op as tensor_op

aten = torch.ops.aten
RESHAPES = (T.VIEW | {torch.flatten, torch.unflatten, aten.flatten.using_ints, aten.unflatten.int, aten.view_as.default}
            | {("method", n) for n in ("flatten", "unflatten", "view_as")})


class _No(Exception):
    """A candidate that does not match: the message is the reason."""


@dataclass
class TensorSite:
    """A matched tensor attention: ``inputs`` (q, k1, k2, v1, v2 nodes), its form, the nodes it
    replaces and the node whose value it gives (``output``)."""

    anchor: fx.Node
    output: fx.Node
    inputs: tuple
    form: TensorForm
    region: list = field(default_factory=list)
    module_path: str = "?"
    rule: str = "tensor_attention"

    def spec(self) -> AttentionSpec:
        q, k1, _, v1, _ = (T.shape(x) for x in self.inputs)
        B = q[0] if len(q) == 4 else 1
        H = q[-3] if len(q) >= 3 else 1
        m = T.meta(self.inputs[0])
        dtype = str(m.dtype).replace("torch.", "") if m is not None else "?"
        return AttentionSpec(dims=Dims(B, H, H, q[-2], k1[-2], q[-1], v1[-1]), dtype=dtype, kernel="tensor",
                             score=Score(scale=self.form.scale), mask=Full(), form=self.form)

    def kernel(self, plan: Plan, requested) -> nn.Module:
        return TensorSiteKernel(plan, self.form, self.module_path,
                                approx=requested if plan.spec.contract == "approx" else None)


def _single_user(node: fx.Node, what: str) -> fx.Node:
    users = [u for u in node.users if not T.is_op(u, T.ASSERTS)]
    if len(users) != 1:
        names = ", ".join(u.name for u in users) or "none"
        raise _No(f"{what} `{node.name}` has another user ({names})")
    return users[0]


def _trilinear_behind(node, depth: int = 8) -> bool:
    """Does ``node`` reach a three-operand product through elementwise score ops?"""
    if depth == 0 or not isinstance(node, fx.Node):
        return False
    if einsum_operands(node, "ab,cb,db->acd") is not None:
        return True
    if T.is_op(node, T.MUL | T.DIV | T.ADD | T.SUB | T.MASKED_FILL | T.WHERE | T.CAST | T.VIEW):
        return any(_trilinear_behind(a, depth - 1) for a in node.args)
    return False


def _scores(x) -> tuple[fx.Node, float, list] | str | None:
    """The softmax input as (trilinear product, scale, nodes in between); a reason when the scores
    are a trilinear product with something else applied; None when they are not one at all."""
    if not T.is_op(x, RESHAPES):
        return None
    node, scale, between = x.args[0], 1.0, [x]
    while isinstance(node, fx.Node) and T.is_op(node, T.MUL | T.DIV) and len(node.args) == 2:
        a, b = node.args
        prod, c = (a, b) if isinstance(a, fx.Node) else (b, a)
        const = isinstance(c, (int, float)) and not isinstance(c, bool)
        if not const or (T.is_op(node, T.DIV) and prod is not a):
            break  # not a constant scale: reported below when the scores are trilinear
        scale = scale * c if T.is_op(node, T.MUL) else scale / c
        between.append(node)
        node = prod
    if einsum_operands(node, "ab,cb,db->acd") is None:
        if _trilinear_behind(node):
            return (f"`{node.name}` ({T.op_key(node)}) on the trilinear scores: only a constant scale is "
                    "recognised (no masks or additive terms)")
        return None
    return node, scale, between


def match(sm: fx.Node, gm) -> TensorSite | Miss | None:
    """Rule ``tensor_attention`` anchored on a softmax (see the module docstring)."""
    if not sm.args:
        return None
    got = _scores(sm.args[0])
    if got is None:
        return None  # not a softmax over a flattened product of three operands
    path = module_path(sm)
    if isinstance(got, str):
        return Miss("tensor_attention", sm, got, path)
    try:
        return _match(sm, gm, *got, path)
    except _No as e:
        return Miss("tensor_attention", sm, str(e), path)


def _match(sm, gm, prod, scale, between, path) -> TensorSite:
    cube = T.shape(prod)
    flat = T.shape(sm.args[0])
    if cube is None or flat is None or len(cube) < 3:
        raise _No("the score shapes are unknown")
    if tuple(flat) != (*cube[:-2], cube[-2] * cube[-1]):
        raise _No(f"the softmax input {tuple(flat)} is not the scores {tuple(cube)} with the key pairs flattened")
    dim = T.arg(sm, 1, "dim")
    if T.is_op(sm, {nn.Softmax}, gm):
        dim = gm.get_submodule(sm.target).dim
    if neg_dim(dim, len(flat)) != -1:
        raise _No(f"softmax over dim {dim}, not over the flattened key pairs")
    if not math.isfinite(scale) or scale == 0:
        raise _No(f"the scores are scaled by {scale:g}")
    region = [prod, *between, sm]
    node = sm
    while True:
        nxt = _single_user(node, "the attention probabilities")
        if T.is_op(nxt, T.CAST | T.CONTIGUOUS | RESHAPES):
            node = nxt
            region.append(node)
            continue
        if T.is_op(nxt, T.DROPOUT):
            p, train = T.arg(nxt, 1, "p", 0.5), T.arg(nxt, 2, "training", True)
            if nxt.op == "call_module" or not (p == 0 or train is False):
                raise _No("dropout on tensor-attention probabilities is not supported")
            node = nxt
            region.append(node)
            continue
        break
    if T.shape(node) is None or tuple(T.shape(node)) != tuple(cube):
        raise _No(f"the probabilities are not viewed back to the scores' shape {tuple(cube)} before the product")
    ops = einsum_operands(nxt, "abc,bd,cd->ad")
    if ops is None or ops[0] is not node:
        raise _No(f"`{nxt.name}` ({T.op_key(nxt, gm)}) is not einsum('…ijl,…jd,…ld->…id', p, v1, v2)")
    q, k1, k2 = einsum_operands(prod, "ab,cb,db->acd")
    v1, v2 = ops[1:]
    shapes = [T.shape(x) for x in (q, k1, k2, v1, v2)]
    if any(s is None for s in shapes) or not 3 <= len(shapes[0]) <= 4:
        raise _No("q, k1, k2, v1, v2 must be (B, H, L, D) tensors of known shape")
    sq, s1, s2, sv1, sv2 = shapes
    if len({len(s) for s in shapes}) != 1 or len({s[:-2] for s in shapes}) != 1:
        raise _No("q, k1, k2, v1, v2 have different batch axes (broadcast)")
    if s1[-2] != sv1[-2] or s2[-2] != sv2[-2] or sv1[-1] != sv2[-1]:
        raise _No(f"v1{tuple(sv1)}, v2{tuple(sv2)} do not match k1{tuple(s1)}, k2{tuple(s2)}")
    dtypes = {getattr(T.meta(x), "dtype", None) for x in (q, k1, k2, v1, v2)}
    if len(dtypes) != 1 or not getattr(next(iter(dtypes)), "is_floating_point", False):
        raise _No(f"operand dtypes {sorted(map(str, dtypes))}: tensor_attention needs one float dtype")
    region.append(nxt)
    if any(x in region for x in (q, k1, k2, v1, v2)):
        raise _No("an operand is computed inside the site")
    inside = set(region)
    for n in region[:-1]:
        out = [u.name for u in n.users if u not in inside and not T.is_op(u, T.ASSERTS)]
        if out:
            raise _No(f"the intermediate `{n.name}` has another user ({', '.join(out)})")
    return TensorSite(sm, nxt, (q, k1, k2, v1, v2), TensorForm(float(scale)), region, path)


# ------------------------------------------------------------------------------------------------
# the module that runs the site
# ------------------------------------------------------------------------------------------------


class TensorSiteKernel(Approximation, SiteModule):
    """Runs a recognised tensor-attention site: q ``(..., Lq, D)``, k1/k2 ``(..., L1/L2, D)``,
    v1/v2 ``(..., L1/L2, Dv)`` with one or two leading axes → ``(..., Lq, Dv)``.

    Exact: :func:`attncomp.tensor.tensor_attention`. With ``approx`` (an ``attncomp.Tensor`` with
    rank or degree): the low-rank approximation, its relative error against the exact kernel measured
    on the first call (``explain``), the exact kernel from then on when above ``approx.tolerance``."""

    approx_baseline = "exact"

    def __init__(self, plan: Plan, form: TensorForm, path: str, approx=None):
        super().__init__(path)
        self.plan, self.form, self.approx = plan, form, approx
        self.approx_error, self.approx_rejected, self.approx_failed = None, False, None

    def extra_repr(self) -> str:
        return f"path={self.path!r}, strategy={self.plan.strategy}, {self.form}"

    def eager_bytes(self, inputs: tuple) -> int:
        q, k1, k2 = inputs[:3]
        return 3 * math.prod(q.shape[:-1]) * k1.shape[-2] * k2.shape[-2] * max(q.element_size(), 4)

    def verify_tolerance(self, dtype) -> float:
        tol = super().verify_tolerance(dtype)
        if self.approx is not None and not self.approx_rejected:  # the approximation's own tolerance
            return max(tol, math.inf if self.approx.tolerance is None else self.approx.tolerance)
        return tol

    def fused(self, q: Tensor, k1: Tensor, k2: Tensor, v1: Tensor, v2: Tensor) -> Tensor:
        three = q.dim() == 3
        args = tuple(x[None] for x in (q, k1, k2, v1, v2)) if three else (q, k1, k2, v1, v2)
        out = self._exact_or_approx(*args)
        return out[0] if three else out

    def _exact_or_approx(self, *qkv: Tensor) -> Tensor:
        if self.approx_active():
            return self._lowrank(*qkv)
        out = tensor_op.tensor_attention(*qkv, scale=self.form.scale)
        if self.approx_pending():
            try:
                approx = self._lowrank(*qkv)
            except Exception as e:  # e.g. a degree whose exact rank is too large: stay exact
                self.approx_failed = f"{type(e).__name__}: {str(e)[:200]}"
                self.approx_error, self.approx_rejected = math.nan, True
                return out
            out = self._measure(out, approx)
        return out

    def _lowrank(self, *qkv: Tensor) -> Tensor:
        a = self.approx
        kw = {"degree": a.degree} if a.degree is not None else {}
        return lowrank.lowrank_tensor_attention(*qkv, scale=self.form.scale, method=a.resolved_method, rank=a.rank,
                                        seed=a.seed, **kw)

    def approx_note(self) -> str | None:
        if self.approx_failed:
            return f"the low-rank approximation failed ({self.approx_failed}): runs exact"
        return super().approx_note()
