"""Rule ``linear_attention``: naive linear attention written in a model, lowered exactly to
:func:`attncomp.linear.linear_attention`.

Recognised forms (φ a feature map applied to q and k; any number of leading batch axes; each
product a ``matmul`` or the equivalent ``einsum``)::

    non-causal  num = φq @ (φkᵀ @ v)                     den = φq @ Σ_n φk  (keepdim, transposed)
    causal      num = einsum(φq, cumsum_n(φk ⊗ v))        den = Σ_d φq · cumsum_n(φk)
    out = num / (den + eps)                               (eps a constant, possibly 0)

The rule is anchored on the division. A division whose numerator is not ``φq · (φk, v)``-shaped
is not a candidate (no record); a candidate that fails a check is a :class:`~attncomp.match.Miss`
with the reason. φ = ``F.elu(x) + 1`` or ``relu(x)`` on both q and k runs inside the op
(``feature_map="elu1"`` / ``"relu"``); any other φ stays the model's own ops and the op gets the
features (identity map). ``eps`` equal to :data:`attncomp.linear.EPS` is the op's own normaliser;
any other ``eps`` runs the op unnormalised on ``[v, 1]`` and divides by ``den + eps`` outside: the
same sums either way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from attncomp.frontend.rules import Miss, module_path, swaps_last_two
from attncomp.ir import AttentionSpec, Causal, Dims, Full, LinearForm, Plan, Score
from attncomp.ir import ops_table as T
from attncomp.runtime.site import SiteModule
from attncomp.strategies.linear import op as linear_op

aten = torch.ops.aten
ELU = {F.elu, aten.elu.default} | {("method", "elu")}
RELU = {F.relu, torch.relu, aten.relu.default} | {("method", "relu")}
SUM = {torch.sum, aten.sum.dim_IntList} | {("method", "sum")}
CUMSUM = {torch.cumsum, aten.cumsum.default} | {("method", "cumsum")}
UNSQUEEZE = {torch.unsqueeze, aten.unsqueeze.default} | {("method", "unsqueeze")}


class _No(Exception):
    """A candidate that does not match: the message is the reason."""


# ------------------------------------------------------------------------------------------------
# small graph readers
# ------------------------------------------------------------------------------------------------


def einsum_operands(node, tail: str) -> list | None:
    """The operands of ``node`` if it is an einsum whose equation is ``tail`` after its leading batch
    letters (shared by every term) and a renaming of the other letters, e.g. tail ``"ab,ac->bc"``
    matches ``"bhnd,bhne->bhde"``; else None."""
    if not T.is_op(node, T.EINSUM) or not isinstance(node.args[0], str):
        return None
    ops = node.args[1:]
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = ops[0]
    eq = node.args[0].replace(" ", "")
    if "->" not in eq or "." in eq:
        return None
    lhs, out = eq.split("->")
    terms, want = lhs.split(",") + [out], tail.replace("->", ",").split(",")
    if len(terms) != len(want) or len(ops) != len(terms) - 1:
        return None
    nb = len(terms[0]) - len(want[0])
    if nb < 0 or any(len(t) != len(w) + nb or t[:nb] != terms[0][:nb] for t, w in zip(terms, want)):
        return None
    names: dict = {}
    for t, w in zip(terms, want):
        for c, p in zip(t[nb:], w):
            if names.setdefault(c, p) != p or c in terms[0][:nb]:
                return None
    if len(set(names.values())) != len(names):
        return None
    return list(ops)


def _dim(node: fx.Node, index: int, name: str, ndim: int | None):
    d = T.arg(node, index, name)
    if isinstance(d, (list, tuple)) and len(d) == 1:
        d = d[0]
    if not isinstance(d, int) or ndim is None:
        return None
    return d - ndim if d >= 0 else d


def _is_sum(node, dim: int, keepdim: bool):
    """``x.sum(dim, keepdim=keepdim)`` → x (dim negative, counted on x's axes)."""
    if not T.is_op(node, SUM) or node.kwargs.get("dtype") is not None:
        return None
    x = node.args[0]
    if _dim(node, 1, "dim", T.ndim(x)) != dim or bool(T.arg(node, 2, "keepdim", False)) != keepdim:
        return None
    return x


def _is_cumsum(node, dim: int):
    if not T.is_op(node, CUMSUM) or node.kwargs.get("dtype") is not None:
        return None
    x = node.args[0]
    return x if _dim(node, 1, "dim", T.ndim(x)) == dim else None


def _unsqueezed_last(node):
    """``x.unsqueeze(-1)`` / ``x[..., None]`` → x."""
    if T.is_op(node, UNSQUEEZE) and _dim(node, 1, "dim", T.ndim(node)) == -1:
        return node.args[0]
    if T.is_op(node, T.GETITEM) and node.args[1] == (Ellipsis, None):
        return node.args[0]
    return None


def _product(node, tail: str, matmul_t: bool = False):
    """Operands ``(a, b)`` of ``node`` as the product ``tail`` (einsum) or ``a @ b`` (``matmul_t``: the
    matmul's first operand is ``aᵀ``, last two axes)."""
    ops = einsum_operands(node, tail)
    if ops is not None:
        return ops
    if T.is_op(node, T.MATMUL) and node.op != "call_module" and len(node.args) == 2:
        a, b = node.args
        if not matmul_t:
            return [a, b]
        if isinstance(a, fx.Node) and swaps_last_two(a, None):
            return [a.args[0], b]
    return None


def _default_elu(node: fx.Node) -> bool:
    """``elu(x)`` with alpha 1 (positional or keyword; torch.export writes ``elu(x, 1.0)``), not in place."""
    extra = list(node.args[1:]) + [v for k, v in node.kwargs.items() if k != "inplace"]
    return len(extra) <= 1 and all(a == 1 for a in extra) and not node.kwargs.get("inplace")


def _feature(node) -> tuple[str, fx.Node] | None:
    """``F.elu(x) + 1`` (either order, alpha 1) → ("elu1", x); ``relu(x)`` → ("relu", x)."""
    if T.is_op(node, RELU) and len(node.args) == 1 and not node.kwargs.get("inplace"):
        return "relu", node.args[0]
    if T.is_op(node, T.ADD) and len(node.args) == 2 and not node.kwargs:
        a, b = node.args
        elu, one = (a, b) if isinstance(a, fx.Node) else (b, a)
        if one == 1 and T.is_op(elu, ELU) and _default_elu(elu):
            return "elu1", elu.args[0]
    return None


# ------------------------------------------------------------------------------------------------
# the rule
# ------------------------------------------------------------------------------------------------


@dataclass
class LinearSite:
    """A matched naive linear attention: ``inputs`` (q, k, v nodes, raw when φ runs in the op),
    its form, and the nodes it replaces."""

    anchor: fx.Node
    inputs: tuple
    form: LinearForm
    region: list = field(default_factory=list)
    module_path: str = "?"
    rule: str = "linear_attention"

    @property
    def output(self) -> fx.Node:
        return self.anchor

    def spec(self) -> AttentionSpec:
        q, _, v = (T.shape(x) for x in self.inputs)
        B = q[0] if len(q) == 4 else 1
        H = q[-3] if len(q) >= 3 else 1
        dims = Dims(B, H, H, q[-2], q[-2], q[-1], v[-1])
        m = T.meta(self.inputs[0])
        dtype = str(m.dtype).replace("torch.", "") if m is not None else "?"
        return AttentionSpec(dims=dims, dtype=dtype, kernel="linear", score=Score(scale=1.0),
                             mask=Causal(0) if self.form.causal else Full(), form=self.form)

    def kernel(self, plan: Plan, requested) -> nn.Module:
        return LinearSiteKernel(plan, self.form, self.module_path)


def _numerator(num) -> tuple | None:
    """``num`` as (φq, φk, v, causal, nodes it reads through), or None when it is not linear
    attention's numerator."""
    pair = _product(num, "ab,bc->ac")
    if pair is not None:
        fq, kv = pair
        inner = _product(kv, "ab,ac->bc", matmul_t=True)
        if inner is not None:
            through = [kv] + ([kv.args[0]] if T.is_op(kv, T.MATMUL) else [])
            return fq, inner[0], inner[1], False, through
    pair = einsum_operands(num, "ab,abc->ac")
    if pair is not None:
        fq, state = pair
        outer = _is_cumsum(state, -3)
        ops = einsum_operands(outer, "ab,ac->abc") if outer is not None else None
        if ops is not None:
            return fq, ops[0], ops[1], True, [state, outer]
    return None


def _denominator(den, causal: bool, region: list) -> tuple[fx.Node, fx.Node]:
    """``den`` (``(..., L, 1)``) as (φq, φk); raises :class:`_No` with the reason."""
    inner = _unsqueezed_last(den)
    flat = inner if inner is not None else den
    region.append(flat)
    if causal:
        ops = einsum_operands(flat, "ab,ab->a") if inner is not None else None
        if ops is None:
            prod = _is_sum(flat, -1, keepdim=inner is None)
            if prod is not None and T.is_op(prod, T.MUL) and len(prod.args) == 2:
                region.append(prod)
                ops = list(prod.args)
        if ops is None:
            raise _No(f"the normaliser `{den.name}` is not φq·cumsum(φk) summed over the features")
        fq, z = ops if _is_cumsum(ops[1], -2) is not None else ops[::-1]
        fk = _is_cumsum(z, -2) if isinstance(z, fx.Node) else None
        if fk is None:
            raise _No(f"the normaliser `{den.name}` does not use the prefix sum of φk over positions")
        region.append(z)
        return fq, fk
    if inner is not None:
        ops = einsum_operands(flat, "ab,b->a")
        fk = _is_sum(ops[1], -2, keepdim=False) if ops else None
        if fk is None:
            raise _No(f"the normaliser `{den.name}` is not φq·Σφk")
        region.append(ops[1])
        return ops[0], fk
    pair = _product(flat, "ab,bc->ac")
    if pair is None:
        raise _No(f"the normaliser `{den.name}` ({T.op_key(den)}) is not φq·Σφk")
    fq, col = pair
    fk = None
    if isinstance(col, fx.Node) and swaps_last_two(col, None):  # Σφk (keepdim) transposed
        fk = _is_sum(col.args[0], -2, keepdim=True)
    elif _unsqueezed_last(col) is not None:  # Σφk unsqueezed to a column
        fk = _is_sum(_unsqueezed_last(col), -2, keepdim=False)
    if fk is None:
        raise _No(f"the normaliser `{den.name}` is not φq·Σφk")
    region += [col, col.args[0]]
    return fq, fk


def match(node: fx.Node, gm) -> LinearSite | Miss | None:
    """Rule ``linear_attention`` anchored on a division (see the module docstring)."""
    if not T.is_op(node, T.DIV, gm) or len(node.args) != 2 or node.kwargs:
        return None
    num, denom = node.args
    got = _numerator(num) if isinstance(num, fx.Node) else None
    if got is None:
        return None  # not linear attention at all
    path = module_path(node)
    try:
        return _match(node, num, denom, got, path)
    except _No as e:
        return Miss("linear_attention", node, str(e), path)


def _match(node, num, denom, got, path) -> LinearSite:
    fq, fk, v, causal, through = got
    region = [num, *through]
    eps = 0.0
    if T.is_op(denom, T.ADD) and len(denom.args) == 2 and not denom.kwargs:
        a, b = denom.args
        c, den = (b, a) if isinstance(a, fx.Node) else (a, b)
        if isinstance(c, fx.Node) or not isinstance(c, (int, float)) or isinstance(c, bool):
            raise _No(f"the normaliser adds `{getattr(c, 'name', c)}`, not a constant eps")
        eps = float(c)
        region.append(denom)
    else:
        den = denom
    if not isinstance(den, fx.Node):
        raise _No("the division is not by a normaliser tensor")
    dq, dk = _denominator(den, causal, region)
    region.append(den)
    if dq is not fq:
        raise _No("the normaliser uses other query features than the numerator")
    if dk is not fk:
        raise _No("the normaliser sums other key features than the numerator's")
    if not eps >= 0:
        raise _No(f"eps {eps:g} is negative")
    shapes = [T.shape(x) for x in (fq, fk, v)]
    if any(s is None for s in shapes):
        raise _No("the shapes of q, k, v are unknown")
    sq, sk, sv = shapes
    if not 3 <= len(sq) <= 4 or sq != sk or sv[:-1] != sq[:-1] or len(sv) != len(sq):
        raise _No(f"q{tuple(sq)}, k{tuple(sk)}, v{tuple(sv)}: linear_attention needs q, k (B, H, L, D) of "
                  "one shape and v (B, H, L, Dv)")
    dtypes = {getattr(T.meta(x), "dtype", None) for x in (fq, fk, v)}
    if len(dtypes) != 1 or not getattr(next(iter(dtypes)), "is_floating_point", False):
        raise _No(f"q, k, v dtypes {sorted(map(str, dtypes))}: linear_attention needs one float dtype")
    fmap, qk = "graph", (fq, fk)
    fa, fb = _feature(fq), _feature(fk)
    if fa is not None and fb is not None and fa[0] == fb[0]:
        fmap, qk = fa[0], (fa[1], fb[1])
        for f in (fq, fk):
            region += [f, *[a for a in f.args if isinstance(a, fx.Node) and T.is_op(a, ELU)]]
    region.append(node)
    form = LinearForm(feature_map=fmap, causal=causal, eps=eps)
    return LinearSite(node, (*qk, v), form, list(dict.fromkeys(region)), path)


# ------------------------------------------------------------------------------------------------
# the module that runs the site
# ------------------------------------------------------------------------------------------------


def _identity(x: Tensor) -> Tensor:
    return x


def feature_of(form: LinearForm):
    """The ``feature_map`` argument of :func:`linear_attention` for ``form``."""
    return _identity if form.feature_map == "graph" else form.feature_map


class LinearSiteKernel(SiteModule):
    """Runs a recognised linear attention site on :func:`attncomp.linear.linear_attention`.

    Inputs q, k ``(..., L, D)`` (raw, or features when ``form.feature_map == "graph"``), v
    ``(..., L, Dv)`` with one or two leading axes; output ``(..., L, Dv)``."""

    def __init__(self, plan: Plan, form: LinearForm, path: str):
        super().__init__(path)
        self.plan, self.form = plan, form

    def extra_repr(self) -> str:
        return f"path={self.path!r}, form={self.form}"

    def fused(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        three = q.dim() == 3
        if three:
            q, k, v = q[None], k[None], v[None]
        f, causal, eps = feature_of(self.form), self.form.causal, self.form.eps
        if eps == linear_op.EPS:
            out = linear_op.linear_attention(q, k, v, feature_map=f, causal=causal)
        else:  # the op's sums on [v, 1] (last column: the normaliser), divided here by den + eps
            res = linear_op.linear_attention(q, k, torch.cat([v, torch.ones_like(v[..., :1])], -1), feature_map=f,
                                   causal=causal, normalize=False)
            out = res[..., :-1] / (res[..., -1:] + eps)
        return out[0] if three else out
