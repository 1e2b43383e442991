"""Find attention sites in a captured graph. Rules are data.

Each rule is named by meaning, anchored on one kind of node, and returns either a :class:`Site`
or a :class:`Miss` carrying a human-readable reason. A failed match changes nothing. ``RULES``
lists them top to bottom and ``COUNTERS`` counts what fired, so tests can assert it.

A site records the operands (q, k, v as graph nodes, each with the few view ops to apply),
the *score program* — the elementwise steps that turn raw ``q·kᵀ`` into the softmax input, in
order — and what happens after the softmax (dropout, casts). The runtime replays the program on
the site's run-time tensors, so scale, biases and masks keep exactly their eager meaning.
"""

from __future__ import annotations

import collections
import math
import re
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
from torch import fx, nn

from attncomp.ir import ops_table as T
from attncomp.ir.program import AddBias, MaskFill, Scale, View

COUNTERS: collections.Counter = collections.Counter()
# How explain names a site in the model's own forward (its module path is "", the model's name in
# named_modules()); a strategy dict may key it either way.
ROOT_LABEL = "<model>"
PATH_META = "attncomp_module_path"  # node.meta key: the model's own path of the module that created the node


@dataclass
class Operand:
    """A graph node plus view ops (``(method, args)``) that bring it to ``(..., L, D)``."""

    node: fx.Node
    views: tuple = ()
    stripped: tuple = ()   # nodes between ``node`` and the product that the site absorbs
    out_views: tuple = ()  # (v only) view ops from the kernel's (..., Lq, Dv) output to the site's


@dataclass
class Site:
    rule: str
    anchor: fx.Node                  # the softmax or SDPA node
    output: fx.Node                  # node whose value the site's output replaces
    q: Operand
    k: Operand
    v: Operand
    steps: list = field(default_factory=list)     # score program (attncomp.ir.program steps), operands nodes/consts
    dropout: tuple = (0.0, "off")     # (p, mode): mode "const" (fixed at capture), "module" (follows .training)
    sdpa: dict = field(default_factory=dict)      # sdpa_call: attn_mask, is_causal, scale, enable_gqa
    kv_groups: int = 1                # >1 when a repeat_kv expansion was folded away (GQA/MQA)
    region: list = field(default_factory=list)    # nodes computed only for this site (replaced)
    module_path: str = "?"


@dataclass
class Miss:
    rule: str
    anchor: fx.Node
    reason: str
    module_path: str = "?"


def dotted(source: str) -> str:
    """A module source recorded by Dynamo, fx or export as a dotted module path relative to the module
    being compiled: ``L['self'].layers[3]._modules['attn']`` → ``layers.3.attn``. The frame's local
    that holds that module (``L['self']``, or ``L['args'][0]`` when its ``forward`` is wrapped by a
    ``def wrapper(*args, **kwargs)`` decorator) and fx's ``self`` are dropped; the module itself is ``""``."""
    path = re.sub(r"^L\['[^']*'\](\[\d+\])*", "", source)
    path = re.sub(r"^self(?=\.|$)", "", path)
    path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']+)'\]", r".\1", path)
    return path.strip(".")


def module_path(node: fx.Node) -> str:
    """Module path (``h.0.attn``) of the module that created ``node``: its name in the model's
    ``named_modules()`` — ``""`` for the model's own ``forward`` (``explain`` shows it as ``<model>``).

    Graphs captured by :func:`attncomp.optimize` carry that name, resolved against the model
    (:func:`label_module_paths`); other graphs (``torch.compile(backend="attncomp")``)
    are read from fx/Dynamo metadata (:func:`dotted`)."""
    if PATH_META in node.meta:
        return node.meta[PATH_META]
    stack = node.meta.get("nn_module_stack")
    return dotted(list(stack.values())[-1][0]) if stack else ""


def label_module_paths(gm: fx.GraphModule, root: nn.Module, prefix: str = "") -> None:
    """Record on every node of ``gm`` (``node.meta[PATH_META]``, read by :func:`module_path`) the path
    in the model of the module that created it. ``gm`` was captured from ``root``'s ``forward`` and
    ``root`` is the model's module at ``prefix`` (``""``: the model itself). Dynamo names modules by
    how the compiled frame reached them (``L['args'][0].model.layers[3]``); each name is resolved
    against ``root`` here, so the path is the one ``model.named_modules()`` gives. A node outside
    every submodule (the root's own ``forward``) gets ``prefix``."""
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        name = _resolve(*list(stack.values())[-1], root) if stack else ""
        node.meta[PATH_META] = ".".join(p for p in (prefix, name) if p)


def _resolve(source: str, cls, root: nn.Module) -> str:
    """The name in ``root.named_modules()`` of the module recorded as ``source`` with class ``cls``
    (a type; export records its qualified name): the longest tail of :func:`dotted` ``(source)`` that
    names a submodule of that class. The class check keeps a head of the source that happens to be a
    module name from being taken for one. A module that is not a registered submodule (kept in a
    plain list, made in ``forward``) has no such name: it keeps the name :func:`dotted` reads."""
    path = dotted(source)
    parts = path.split(".") if path else []
    for i in range(len(parts) + 1):
        name = ".".join(parts[i:])
        try:
            mod = root.get_submodule(name)
        except AttributeError:
            continue
        qualname = f"{type(mod).__module__}.{type(mod).__qualname__}"
        if type(mod) is cls or cls == qualname:
            return name
    return path


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _users(node: fx.Node, gm, region: list) -> list:
    """Users of ``node`` that compute something; run-time shape assertions join ``region``."""
    real = []
    for u in node.users:
        if T.is_op(u, T.ASSERTS, gm) and not u.users:
            region.append(u)
        else:
            real.append(u)
    return real


def _const(x) -> bool:
    return isinstance(x, (int, float, bool)) or x is None


def _only_user(node: fx.Node, user: fx.Node) -> bool:
    return set(node.users) == {user}


def neg_dim(d, nd: int | None) -> int | None:
    if not isinstance(d, int):
        return None
    if d < 0:
        return d
    return None if nd is None else d - nd


def swaps_last_two(node: fx.Node, gm) -> bool:
    nd = T.ndim(node.args[0]) if node.args else None
    if T.is_op(node, T.TRANSPOSE, gm):
        d0, d1 = T.arg(node, 1, "dim0"), T.arg(node, 2, "dim1")
        return {neg_dim(d0, nd), neg_dim(d1, nd)} == {-1, -2}
    if T.is_op(node, T.PERMUTE, gm):
        dims = node.args[1:] if len(node.args) > 2 else T.arg(node, 1, "dims")
        dims = list(dims) if isinstance(dims, (list, tuple)) else None
        if not dims or nd is None or not all(isinstance(d, int) for d in dims):
            return False
        dims = [d % nd for d in dims]
        return dims == list(range(nd - 2)) + [nd - 1, nd - 2]
    return False


def _untranspose(node: fx.Node, gm, user: fx.Node) -> Operand:
    """Operand ``x`` given a node computing ``xᵀ`` (last two axes); inserts a transpose otherwise."""
    if isinstance(node, fx.Node) and swaps_last_two(node, gm) and _only_user(node, user):
        return Operand(node.args[0], stripped=(node,))
    return Operand(node, (("transpose", (-2, -1)),))


def _repeat_kv_source(node: fx.Node, gm) -> tuple[fx.Node, int] | None:
    """``x[:, :, None].expand(B, Hkv, n, L, D).reshape(B, Hkv*n, L, D)`` → (x, n)."""
    if not T.is_op(node, T.VIEW, gm):
        return None
    exp = node.args[0]
    if not T.is_op(exp, T.EXPAND, gm) or len(exp.users) != 1:
        return None
    idx = exp.args[0]
    if not T.is_op(idx, T.GETITEM, gm) or len(idx.users) != 1:
        return None
    src, key = idx.args
    key = key if isinstance(key, tuple) else (key,)
    full = slice(None, None, None)
    if len(key) < 3 or key[0] != full or key[1] != full or key[2] is not None:
        return None
    s_src, s_out = T.shape(src), T.shape(node)
    if s_src is None or s_out is None or len(s_src) != 4 or len(s_out) != 4:
        return None
    if s_src[0] != s_out[0] or s_src[2:] != s_out[2:] or s_out[1] % s_src[1]:
        return None
    return src, s_out[1] // s_src[1]


def _reaches(node, table: set, gm, depth: int = 12) -> bool:
    """Does ``node`` reach a node of ``table`` through score-program ops only?"""
    for _ in range(depth):
        if not isinstance(node, fx.Node):
            return False
        if T.is_op(node, table, gm):
            return True
        if T.is_op(node, T.CAST | T.VIEW | T.CONTIGUOUS, gm):
            node = node.args[0]
        elif T.is_op(node, T.MUL | T.DIV | T.ADD | T.SUB, gm):
            return any(_reaches(a, table, gm, depth - 1) for a in node.args[:2])
        elif T.is_op(node, T.ADD_OPTIONAL, gm):
            node = node.args[0]
        elif T.is_op(node, T.MASKED_FILL, gm):
            node = node.args[0]
        elif T.is_op(node, T.WHERE, gm):
            return any(_reaches(a, table, gm, depth - 1) for a in node.args[1:3])
        else:
            return False
    return False


PRODUCT = T.MATMUL | T.EINSUM | T.BADDBMM


# --------------------------------------------------------------------------------------------
# rule: softmax_chain — product → score program → softmax(-1) → [dropout] → product with v
# --------------------------------------------------------------------------------------------


def _score_program(start: fx.Node, gm) -> tuple[fx.Node, list, list] | str:
    """Walk back from the softmax input to the q·kᵀ product. Returns (product, steps, region)."""
    steps, region, node = [], [], start
    while True:
        if T.is_op(node, PRODUCT, gm):
            steps.reverse()
            return node, steps, region
        region.append(node)
        if len(_users(node, gm, region)) != 1:
            return f"intermediate scores `{node.name}` have another user"
        a = node.args
        if T.is_op(node, T.CAST | T.CONTIGUOUS, gm):
            node = a[0]
        elif T.is_op(node, T.VIEW, gm):
            shp = a[1:] if len(a) > 2 or not isinstance(a[1], (list, tuple)) else a[1]
            steps.append(View(tuple(shp)))
            node = a[0]
        elif T.is_op(node, T.MUL | T.DIV | T.ADD | T.SUB, gm):
            if len(a) < 2 or node.kwargs.get("alpha", 1) != 1 or node.kwargs.get("rounding_mode"):
                return f"`{node.name}`: unsupported arguments {node.kwargs}"
            x, y = a[0], a[1]
            chain_first = _reaches(x, PRODUCT, gm)
            if not chain_first and not _reaches(y, PRODUCT, gm):
                return f"`{node.name}` does not lead back to a q·kᵀ product"
            chain, other = (x, y) if chain_first else (y, x)
            if T.is_op(node, T.DIV | T.SUB, gm) and not chain_first:
                return f"`{node.name}` divides or subtracts the scores from a term"
            op = ("mul" if T.is_op(node, T.MUL, gm) else "div" if T.is_op(node, T.DIV, gm)
                  else "add" if T.is_op(node, T.ADD, gm) else "sub")
            if op in ("mul", "div"):
                s = T.shape(other)
                if s is not None and len(s) and s[-1] != 1:
                    return f"`{node.name}` multiplies scores by a tensor that varies along keys"
            steps.append(Scale(other, divide=op == "div") if op in ("mul", "div")
                         else AddBias(other, -1.0 if op == "sub" else 1.0))
            node = chain
        elif T.is_op(node, T.ADD_OPTIONAL, gm):
            steps.append(AddBias(a[1] if len(a) > 1 else None))
            node = a[0]
        elif T.is_op(node, T.MASKED_FILL, gm):
            steps.append(MaskFill(a[1], T.arg(node, 2, "value"), hide_where=True))
            node = a[0]
        elif T.is_op(node, T.WHERE, gm):
            cond, x, y = a[0], a[1], a[2]
            if _reaches(x, PRODUCT, gm):
                steps.append(MaskFill(cond, y, hide_where=False))
                node = x
            elif _reaches(y, PRODUCT, gm):
                steps.append(MaskFill(cond, x, hide_where=True))
                node = y
            else:
                return f"`{node.name}` does not lead back to a q·kᵀ product"
        else:
            return f"`{node.name}` ({T.op_key(node, gm)}) between product and softmax is not supported"


def _einsum_operands(prod: fx.Node, gm) -> tuple[Operand, Operand] | str:
    eq, ops = prod.args[0], prod.args[1:]
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = ops[0]
    if not isinstance(eq, str) or len(ops) != 2 or "->" not in eq:
        return "einsum is not a two-operand product"
    lhs, out = eq.replace(" ", "").split("->")
    a, b = lhs.split(",")
    if len(out) < 2 or "." in eq:
        return f"einsum `{eq}` is not supported"
    i, j, batch = out[-2], out[-1], out[:-2]
    d = set(a) - set(out)
    if len(d) != 1 or set(b) - set(out) != d:
        return f"einsum `{eq}` does not contract exactly one axis"
    d = d.pop()
    want_a, want_b = batch + i + d, batch + j + d
    if sorted(a) != sorted(want_a) or sorted(b) != sorted(want_b):
        return f"einsum `{eq}` has broadcast axes"

    def perm(src, want):
        p = [src.index(c) for c in want]
        return () if p == list(range(len(p))) else (("permute", tuple(p)),)

    return Operand(ops[0], perm(a, want_a)), Operand(ops[1], perm(b, want_b))


def _qk_operands(prod: fx.Node, gm, steps: list) -> tuple[Operand, Operand, list] | str:
    if T.is_op(prod, T.EINSUM, gm):
        res = _einsum_operands(prod, gm)
        return res if isinstance(res, str) else (*res, steps)
    if T.is_op(prod, T.BADDBMM, gm):
        inp, a, b = prod.args[:3]
        beta, alpha = prod.kwargs.get("beta", 1), prod.kwargs.get("alpha", 1)
        if not (_const(beta) and _const(alpha)):
            return "baddbmm with tensor beta/alpha is not supported"
        pre = [Scale(alpha)] if alpha != 1 else []
        if beta != 0:
            pre.append(AddBias(inp, float(beta)))
        return Operand(a), _untranspose(b, gm, prod), pre + steps
    a, b = prod.args[0], prod.args[1]
    return Operand(a), _untranspose(b, gm, prod), steps


def _pv_operands(prod: fx.Node, p: fx.Node, gm) -> Operand | str:
    if T.is_op(prod, T.EINSUM, gm):
        eq, ops = prod.args[0], prod.args[1:]
        if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
            ops = ops[0]
        if not isinstance(eq, str) or len(ops) != 2 or ops[0] is not p:
            return "einsum with v is not a two-operand product"
        lhs, out = eq.replace(" ", "").split("->")
        a, b = lhs.split(",")
        batch, i, j = a[:-2], a[-2], a[-1]
        if j in out or i not in out:
            return (f"einsum `{eq}` does not contract the probabilities over their normalised (key) axis: "
                    "not attention")
        e = (set(b) - set(a)).pop() if len(set(b) - set(a)) == 1 else None
        canon = batch + i + (e or "")
        if e is None or sorted(out) != sorted(canon) or sorted(b) != sorted(batch + j + e):
            return f"einsum `{eq}` with v is not supported"
        perm = [b.index(c) for c in batch + j + e]
        operand = Operand(ops[1], () if perm == list(range(len(perm))) else (("permute", tuple(perm)),))
        out_perm = [canon.index(c) for c in out]
        operand.out_views = () if out_perm == list(range(len(out))) else (("permute", tuple(out_perm)),)
        return operand
    if T.is_op(prod, T.MATMUL, gm) and prod.args[0] is p:
        return Operand(prod.args[1])
    if T.is_op(prod, T.MATMUL, gm) and len(prod.args) > 1 and prod.args[1] is p:
        return (f"`{prod.name}` = x @ P contracts the probabilities over their query axis, not over the normalised "
                "key axis: not attention")
    return f"`{prod.name}` does not multiply the probabilities by v"


def match_softmax_chain(sm: fx.Node, gm) -> Site | Miss:
    rule = "softmax_chain"
    path = module_path(sm)
    dim = T.arg(sm, 1, "dim")
    if T.is_op(sm, {nn.Softmax}, gm):
        dim = gm.get_submodule(sm.target).dim
    if neg_dim(dim, T.ndim(sm)) != -1:
        return Miss(rule, sm, f"softmax over dim {dim}, not the last axis", path)
    res = _score_program(sm.args[0], gm)
    if isinstance(res, str):
        return Miss(rule, sm, res, path)
    prod, steps, region = res
    if len(_users(prod, gm, region)) != 1:
        return Miss(rule, sm, "the q·kᵀ scores have another user", path)
    # forward from the softmax: casts, dropout, then the product with v
    node, after, dropout = sm, [sm], (0.0, "off")
    while True:
        users = _users(node, gm, region)
        if len(users) != 1:
            names = ", ".join(u.name for u in users) or "none"
            return Miss(rule, sm, f"attention probabilities have another user ({names})", path)
        (nxt,) = users
        if T.is_op(nxt, T.CAST | T.CONTIGUOUS, gm):
            node = nxt
        elif T.is_op(nxt, T.DROPOUT, gm):
            if nxt.op == "call_module":
                dropout = (float(gm.get_submodule(nxt.target).p), "module")
            else:
                p, train = T.arg(nxt, 1, "p", 0.5), T.arg(nxt, 2, "training", True)
                if not (_const(p) and _const(train)):
                    return Miss(rule, sm, "dropout with a run-time probability", path)
                dropout = (float(p) if train else 0.0, "const")
            node = nxt
        else:
            break
        after.append(node)
    v = _pv_operands(nxt, node, gm)
    if isinstance(v, str):
        return Miss(rule, sm, v, path)
    qk = _qk_operands(prod, gm, steps)
    if isinstance(qk, str):
        return Miss(rule, sm, qk, path)
    q, k, steps = qk
    return Site(rule, sm, nxt, q, k, v, steps, dropout,
                region=[*k.stripped, prod, *region, *after, nxt], module_path=path)


# --------------------------------------------------------------------------------------------
# rule: sdpa_call
# --------------------------------------------------------------------------------------------


def match_sdpa_call(node: fx.Node, gm) -> Site | Miss:
    rule = "sdpa_call"
    path = module_path(node)
    q, k, v = node.args[:3]
    opts = {
        "attn_mask": T.arg(node, 3, "attn_mask"),
        "dropout_p": T.arg(node, 4, "dropout_p", 0.0),
        "is_causal": T.arg(node, 5, "is_causal", False),
        "scale": node.kwargs.get("scale"),
        "enable_gqa": node.kwargs.get("enable_gqa", False),
    }
    for name in ("dropout_p", "is_causal", "scale", "enable_gqa"):
        if not _const(opts[name]):
            return Miss(rule, node, f"SDPA argument `{name}` is a run-time value", path)
    steps = []
    mask = opts["attn_mask"]
    if mask is not None:
        m = T.meta(mask)
        if m is not None and m.dtype == torch.bool:
            steps.append(MaskFill(mask, -math.inf, hide_where=False))
        else:
            steps.append(AddBias(mask))
    site = Site(rule, node, node, Operand(q), Operand(k), Operand(v), steps,
                (float(opts["dropout_p"]), "const"), sdpa=opts, region=[node], module_path=path)
    return site


def fold_repeat_kv(site: Site, gm) -> Site:
    """GQA/MQA written as ``repeat_kv`` on both k and v: run on the un-repeated tensors."""
    if site.k.views or site.v.views:
        return site
    rk, rv = _repeat_kv_source(site.k.node, gm), _repeat_kv_source(site.v.node, gm)
    if rk is None or rv is None or rk[1] != rv[1]:
        return site
    extra = []
    for op in (site.k, site.v):
        if len(op.node.users) == 1:
            extra += [op.node, op.node.args[0], op.node.args[0].args[0]]
    site.k, site.v, site.kv_groups = Operand(rk[0]), Operand(rv[0]), rk[1]
    site.region = extra + site.region
    return site


# --------------------------------------------------------------------------------------------
# the rule table
# --------------------------------------------------------------------------------------------

# Rules on one anchor are tried top to bottom; the first site wins. A rule returns None when the
# node is not a candidate for it at all (e.g. a division that is not linear attention's
# normalisation): nothing is recorded or counted. Strategies that bring an attention form of their
# own add their rule with `register_rule` (tensor attention before softmax_chain, whose anchor it
# shares; linear attention, anchored on its normalising division).
RULES: list[tuple[str, set, Any]] = [
    ("sdpa_call", T.SDPA, match_sdpa_call),
    ("softmax_chain", T.SOFTMAX, match_softmax_chain),
]


def register_rule(name: str, anchors: set, rule, before: str | None = None) -> None:
    """Add ``rule`` (``rule(node, gm) -> Site-like | Miss | None``) for nodes of ``anchors``, ahead of
    the rule named ``before`` (else last). Registering a name twice replaces the rule in place."""
    for i, (n, _, _) in enumerate(RULES):
        if n == name:
            RULES[i] = (name, anchors, rule)
            return
    at = next((i for i, (n, _, _) in enumerate(RULES) if n == before), len(RULES))
    RULES.insert(at, (name, anchors, rule))


def find_sites(gm: fx.GraphModule) -> list:
    """All attention sites in ``gm`` (matched or missed), in graph order: :class:`Site`,
    ``LinearSite`` / ``TensorSite`` (lowered whole to their ops) or :class:`Miss`."""
    found = []
    for node in list(gm.graph.nodes):
        first_miss = None
        for name, anchors, rule in RULES:
            if not T.is_op(node, anchors, gm):
                continue
            res = rule(node, gm)
            if res is None:
                continue
            if isinstance(res, Site):
                res = fold_repeat_kv(res, gm)
            if not isinstance(res, Miss) and not _convex(gm, res):
                res = Miss(name, node, "the matched region is not convex", res.module_path)
            COUNTERS[f"{name}:{'miss' if isinstance(res, Miss) else 'hit'}"] += 1
            if not isinstance(res, Miss):
                found.append(res)
                break
            first_miss = first_miss or res
        else:
            if first_miss is not None:
                found.append(first_miss)
    return found


def _convex(gm: fx.GraphModule, site: Site) -> bool:
    """No path leaves the region and re-enters it (networkx over the graph's data edges)."""
    g = nx.DiGraph()
    for n in gm.graph.nodes:
        for u in n.users:
            g.add_edge(n, u)
    region = set(site.region)
    outside_succ = {u for n in region for u in n.users if u not in region}
    for s in outside_succ:
        if any(r in region for r in nx.descendants(g, s)):
            return False
    return True
