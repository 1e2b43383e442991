"""Mask analysis: a mask node → a proved :class:`MaskFact` (static IR kind, run-time key padding, fill).

Pipeline (one direction):

1. :mod:`attncomp.mask_graph` reads the node's subgraph into sympy: a Boolean ``E`` over the query
   index ``q`` (axis -2), the key index ``kv`` (axis -1), and at most one run-time atom — the
   user's 2-D ``attention_mask`` gathered at ``[batch, kv + c]`` (a key-padding mask). Additive
   masks are read as ``Piecewise`` values; ``E`` is then "the value is 0".
2. The run-time atom is split off as ``keep``: ``E[keep=False]`` must be false on the whole grid,
   so ``E == E[keep=True] & keep`` (a conjunct, proved by evaluation, not assumed).
3. The static part ``P = E[keep=True]`` is classified by ``ATOM_RULES`` (rules as data, named by
   meaning) into ``Causal`` / ``Window`` / ``Prefix`` / ``BlockDiagonal`` / ``Grid`` / ``And`` /
   ``Or``; unrecognised atoms stay ``Predicate`` leaves printed from sympy into the expr language.
4. **Check**: ``P`` (printed and evaluated with :func:`attncomp.blocks.eval_expr`) is compared with
   ``blocks.dense_keep(static.expr())`` on every ``(q, kv)`` of the site's ``(Lq, Lk)`` grid; parts
   that are vacuous on that grid are dropped the same way. No fact is returned unless it holds.

The fact is exact for the site's shape (Dynamo graphs are specialised to it; for fx graphs analyse
again per shape). A graph with symbolic sizes is first read with its sizes as symbols
(:class:`~attncomp.masks.sym.Size`): when no size enters the predicate and every step is exact as a
predicate (the rules are syntactic; the grid-fitted steps — dropping parts vacuous on the grid,
fitting a neighborhood — are skipped; every ``//``/``%`` operand is proved non-negative for all
``q, kv >= 0``), the fact holds for every length (``general``). Otherwise it is read at its example
shape (``hint``) and holds there only: the fact lists the sizes it read, for the graph to be
specialised (guarded) to them.
Everything else — model-input masks, parameters, data-dependent masks, finite fills — is refused
with a reason string.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import sympy as sp
import torch
from torch import fx

from attncomp import ir
from attncomp.ir.program import BIG
from attncomp.masks.blocks import dense_keep, eval_expr
from attncomp.masks.graph import AXES, GraphReader, Refuse, to_bool
from attncomp.masks.sym import Size, SizeDependent, hint_of

Q = sp.Symbol("q", integer=True, nonnegative=True)
KV = sp.Symbol("kv", integer=True, nonnegative=True)
KEEP = sp.Symbol("keep")
COUNTERS: collections.Counter = collections.Counter()


@dataclass(frozen=True)
class KeyPadding:
    """``keep_fn`` of a key-padding mask: the user's ``attention_mask`` → bool keep-mask.

    ``x``: ``(B, N)`` (or ``(B, 1, ..., N)``, or ``(N,)``), any dtype; returns ``x != 0`` restricted
    to columns ``start : start + length``, as a bool ``(B, 1, 1, length)`` tensor (``B = 1`` for 1-D
    input), which broadcasts to ``(B, H, Lq, Lk)``. ``!= 0`` is what ``.to(torch.bool)`` computes."""

    start: int
    length: int | None  # None: to the end (a graph with symbolic sizes, where the mask's width varies)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x != 0
        if x.dim() > 2:  # the proof reads index 0 on every middle axis (e.g. a causal buffer's first row)
            x = x[(slice(None),) + (0,) * (x.dim() - 2)]
        x = x.reshape(x.shape[0] if x.dim() > 1 else 1, x.shape[-1])
        stop = None if self.length is None else self.start + self.length
        return x[:, self.start:stop][:, None, None, :]


@dataclass(frozen=True)
class MaskFact:
    """What a mask node computes, proved on the site's grid.

    Bool masks: ``value(node) == static(q, kv) & keep_fn(value(keep_src))`` (``~value`` when
    analysed with ``negate=True``), for every element broadcast to ``(B, H, Lq, Lk)``.
    Additive masks: ``value(node) == where(static & keep, 0, fill)``.
    """

    static: ir.Mask                       # Full() or static kinds over absolute (q, kv) indices
    keep_src: fx.Node | None              # run-time input whose value, after keep_fn, is ANDed with static
    keep_fn: Callable | None              # KeyPadding: keep_src value → bool (B, 1, 1, Lk)
    role: str | None                      # "key_padding" when keep is constant along queries and heads
    fill: float | None                    # additive masks: the value at masked positions; bool: None
    proof: str                            # what was recognised and how it was checked
    # True: holds at every shape the graph admits (a static graph's one shape, or every size of a
    # symbolic one). False: holds wherever the symbolic ``sizes`` (torch.SymInt) keep their example values
    general: bool = True
    sizes: tuple = ()
    not_general: str = ""  # a symbolic graph's fact that is not general: why the proof for every length failed


# ---------------------------------------------------------------------------------------------
# sympy → expr language (the predicate strings of attncomp.ir)
# ---------------------------------------------------------------------------------------------

_REL = {sp.StrictLessThan: "<", sp.LessThan: "<=", sp.StrictGreaterThan: ">", sp.GreaterThan: ">=",
        sp.Equality: "==", sp.Unequality: "!="}


def _int_src(n: int) -> str:
    return str(n) if n >= 0 else f"(0 - {-n})"


def _add_src(e: sp.Add) -> str:
    out = ""
    for t in sorted(sp.Add.make_args(e), key=lambda t: t.is_number):  # constants last
        c, rest = t.as_coeff_Mul()
        neg = c < 0
        term = to_src(-t if neg else t)
        out = (f"0 - {term}" if neg else term) if not out else f"{out} {'-' if neg else '+'} {term}"
    return f"({out})"


def _mul_src(e: sp.Mul) -> str:
    c, rest = e.as_coeff_Mul()
    if not c.is_Integer:
        raise Refuse(f"non-integer coefficient in {e}")
    factors = [to_src(f) for f in sp.Mul.make_args(rest)]
    return "(" + " * ".join(([_int_src(int(c))] if c != 1 else []) + factors) + ")"


def _floor_src(e) -> str:
    n, d = sp.fraction(sp.together(e.args[0]))
    if not (d.is_Integer and d > 0):
        raise Refuse(f"floor-division by a non-constant in {e}")
    return to_src(n) if d == 1 else f"({to_src(n)} // {int(d)})"


def _mod_src(e) -> str:
    a, m = e.args
    if not (m.is_Integer and m > 0):
        raise Refuse(f"modulo by a non-positive or non-constant value in {e}")
    return f"({to_src(a)} % {int(m)})"


def _piecewise_src(e) -> str:
    *branches, (last, cond) = e.args
    if cond is not sp.true:
        raise Refuse(f"Piecewise without a default branch: {e}")
    out = to_src(last)
    for v, c in reversed(branches):
        out = f"where({to_src(c)}, {to_src(v)}, {out})"
    return out


def _minmax_src(e) -> str:
    args = [to_src(a) for a in e.args]
    out, op = args[0], "<" if isinstance(e, sp.Min) else ">"
    for a in args[1:]:
        out = f"where({out} {op} {a}, {out}, {a})"
    return out


def _xor_src(a: str, b: str) -> str:
    return f"(({a} & (~{b})) | ((~{a}) & {b}))"


PRINT = {
    sp.Symbol: lambda e: {"q": "q", "kv": "kv"}[e.name],
    sp.Integer: lambda e: _int_src(int(e)),
    sp.Add: _add_src,
    sp.Mul: _mul_src,
    sp.floor: _floor_src,
    sp.Mod: _mod_src,
    sp.Abs: lambda e: f"where({to_src(e.args[0])} < 0, 0 - {to_src(e.args[0])}, {to_src(e.args[0])})",
    sp.Min: _minmax_src,
    sp.Max: _minmax_src,
    sp.Piecewise: _piecewise_src,
    sp.And: lambda e: "(" + " & ".join(to_src(a) for a in e.args) + ")",
    sp.Or: lambda e: "(" + " | ".join(to_src(a) for a in e.args) + ")",
    sp.Not: lambda e: f"(~{to_src(e.args[0])})",
    sp.Xor: lambda e: _xor_src(to_src(e.args[0]), to_src(sp.Xor(*e.args[1:]))),
    sp.Equivalent: lambda e: f"(~{_xor_src(to_src(e.args[0]), to_src(sp.Equivalent(*e.args[1:])))})",
    type(sp.true): lambda e: "(q == q)",
    type(sp.false): lambda e: "(q != q)",
    **{rel: (lambda e: f"({to_src(e.lhs)} {_REL[type(e)]} {to_src(e.rhs)})") for rel in _REL},
}


def to_src(e: sp.Basic) -> str:
    """Print a sympy predicate over ``q``, ``kv`` in the expr language of :mod:`attncomp.ir`."""
    for cls in type(e).__mro__:
        if cls in PRINT:
            return PRINT[cls](e)
    raise Refuse(f"cannot print {type(e).__name__} `{e}` as a mask predicate")


def _grid(src: str, Lq: int, Lk: int) -> torch.Tensor:
    q, kv = torch.arange(Lq)[:, None], torch.arange(Lk)[None, :]
    return eval_expr(src, q, kv).expand(Lq, Lk).to(torch.bool)


def _safe_divisions(e: sp.Basic, Lq: int, Lk: int) -> str | None:
    """Why a printed predicate is unsafe for Triton (``//``/``%`` of a negative operand), or None."""
    for f in e.atoms(sp.floor, sp.Mod):
        num = sp.fraction(sp.together(f.args[0]))[0]
        vals = eval_expr(to_src(num), torch.arange(Lq)[:, None], torch.arange(Lk)[None, :])
        if bool((torch.as_tensor(vals) < 0).any()):
            return f"`{f}` divides a negative value (torch floors, Triton truncates)"
    return None


# ---------------------------------------------------------------------------------------------
# classification: rules as data
# ---------------------------------------------------------------------------------------------


def _linear_le(e: sp.Basic) -> tuple[int, int, int] | str:
    """A relational over (q, kv) as ``a*q + b*kv + c <= 0`` (integers, gcd(a, b) = 1)."""
    if not isinstance(e, (sp.StrictLessThan, sp.LessThan, sp.StrictGreaterThan, sp.GreaterThan)):
        return "not an inequality"
    d = e.lhs - e.rhs if isinstance(e, (sp.StrictLessThan, sp.LessThan)) else e.rhs - e.lhs
    if isinstance(e, (sp.StrictLessThan, sp.StrictGreaterThan)):
        d = d + 1
    try:
        p = sp.Poly(sp.expand(d), Q, KV)
    except sp.PolynomialError:
        return "not linear in (q, kv)"
    if p.total_degree() > 1 or not all(c.is_Integer for c in p.coeffs()):
        return "not linear in (q, kv) with integer coefficients"
    a, b, c = int(p.coeff_monomial(Q)), int(p.coeff_monomial(KV)), int(p.coeff_monomial(1))
    g = math.gcd(a, b)
    if g == 0:
        return "does not involve q or kv"
    return a // g, b // g, -((-c) // g)


def rule_causal(e) -> ir.Mask | str:
    """``kv <= q + offset``."""
    lin = _linear_le(e)
    return lin if isinstance(lin, str) else ir.Causal(-lin[2]) if lin[:2] == (-1, 1) else "not kv - q <= c"


def rule_window_left(e) -> ir.Mask | str:
    """``kv >= q - left`` (the lower edge of a sliding window)."""
    lin = _linear_le(e)
    return lin if isinstance(lin, str) else ir.Window(-lin[2], None) if lin[:2] == (1, -1) else "not q - kv <= c"


def rule_prefix(e) -> ir.Mask | str:
    """``kv < n``: the first ``n`` keys."""
    lin = _linear_le(e)
    return lin if isinstance(lin, str) else ir.Prefix(1 - lin[2]) if lin[:2] == (0, 1) else "not kv <= c"


def rule_window_abs(e) -> ir.Mask | str:
    """``|q - kv| <= w``: a symmetric sliding window."""
    if not isinstance(e, (sp.LessThan, sp.StrictLessThan)) or not isinstance(e.lhs, sp.Abs):
        return "not |x| <= c"
    inner, w = sp.expand(e.lhs.args[0]), e.rhs
    if not w.is_Integer or inner not in (Q - KV, KV - Q):
        return "not |q - kv| <= integer"
    w = int(w) - (1 if isinstance(e, sp.StrictLessThan) else 0)
    return ir.Window(w, w)


def _same_class(e, fn) -> int | str:
    """``fn(q, s) == fn(kv, s)`` → s."""
    if not isinstance(e, sp.Equality):
        return "not an equality"
    for s in {sp.fraction(sp.together(f.args[0]))[1] for f in e.atoms(sp.floor)} | {
            f.args[1] for f in e.atoms(sp.Mod)}:
        if s.is_Integer and s > 0 and sp.expand(e.lhs - e.rhs) in (
                sp.expand(fn(Q, s) - fn(KV, s)), sp.expand(fn(KV, s) - fn(Q, s))):
            return int(s)
    return "no matching divisor"


def rule_block_diagonal(e) -> ir.Mask | str:
    """``q // s == kv // s``: equal-length documents."""
    s = _same_class(e, lambda x, s: sp.floor(x / s))
    return s if isinstance(s, str) else ir.BlockDiagonal(s)


def rule_grid(e) -> ir.Mask | str:
    """``q % s == kv % s``: dilated / grid attention."""
    s = _same_class(e, sp.Mod)
    return s if isinstance(s, str) else ir.Grid(s)


ATOM_RULES: list[tuple[str, Callable]] = [
    ("causal", rule_causal),
    ("window_left", rule_window_left),
    ("window_abs", rule_window_abs),
    ("prefix", rule_prefix),
    ("block_diagonal", rule_block_diagonal),
    ("grid", rule_grid),
]


def classify_atom(e: sp.Basic, fired: list) -> ir.Mask:
    """The first rule of ``ATOM_RULES`` that applies (each returns a reason string when it does not)."""
    for name, rule in ATOM_RULES:
        res = rule(e)
        if not isinstance(res, str):
            COUNTERS[name] += 1
            fired.append(name)
            return res
    COUNTERS["predicate"] += 1
    fired.append("predicate")
    return ir.Predicate(to_src(e))


def _merge_bounds(parts: list) -> list:
    """``Causal(r) & Window(l, None)`` → ``Window(l, r)``; the tightest bound on each side wins."""
    lefts = [p.left for p in parts if isinstance(p, ir.Window) and p.left is not None]
    rights = [p.offset for p in parts if isinstance(p, ir.Causal)] + [
        p.right for p in parts if isinstance(p, ir.Window) and p.right is not None]
    rest = [p for p in parts if not isinstance(p, (ir.Causal, ir.Window))]
    if lefts:
        return [ir.Window(min(lefts), min(rights) if rights else None)] + rest
    return ([ir.Causal(min(rights))] if rights else []) + rest


def classify(e: sp.Basic, fired: list) -> ir.Mask:
    """A static predicate over (q, kv) → IR mask (``Predicate`` leaves where no rule applies)."""
    if e is sp.true:
        return ir.Full()
    if isinstance(e, sp.And):
        return ir.mask_and(*_merge_bounds([classify(a, fired) for a in e.args]))
    if isinstance(e, sp.Or):
        parts = [classify(a, fired) for a in e.args]
        return ir.Or(tuple(sorted(parts, key=lambda p: (not isinstance(p, ir.Prefix), str(p)))))
    return classify_atom(e, fired)


def _simplify(mask: ir.Mask, truth: torch.Tensor, Lq: int, Lk: int, notes: list) -> ir.Mask:
    """Drop parts of ``mask`` that are vacuous on the grid (checked by evaluation)."""

    def same(m: ir.Mask) -> bool:
        return torch.equal(dense_keep(m.expr(), Lq, Lk), truth)

    if same(ir.Full()):
        notes.append(f"{mask} holds everywhere on the grid")
        return ir.Full()
    if isinstance(mask, ir.And):
        parts = list(mask.parts)
        for p in list(parts):
            rest = ir.mask_and(*[x for x in parts if x is not p])
            if same(rest):
                notes.append(f"{p} is vacuous on the grid")
                parts.remove(p)
        mask = ir.mask_and(*parts)
    if isinstance(mask, ir.Window) and mask.right is not None and same(ir.Causal(mask.right)):
        notes.append(f"the left edge of {mask} is vacuous on the grid")
        mask = ir.Causal(mask.right)
    return mask


def neighborhood_from_grid(truth: torch.Tensor) -> ir.Neighborhood | None:
    """A 1-D / 2-D neighborhood (dilation and stride 1, causal or not on every axis) equal to the
    ``(L, L)`` visibility ``truth``, or None. The corner query (first, or last for causal) sees
    ``kx`` runs of ``ky`` consecutive keys, one grid row apart: that fixes the grid width and the
    kernel; the candidate is then checked against ``truth`` on the whole grid."""
    L = truth.shape[0]
    for causal, row in ((False, 0), (True, L - 1)):
        seen = truth[row].nonzero().flatten().tolist()
        if not seen:
            continue
        runs = [[seen[0]]]
        for j in seen[1:]:
            if j == runs[-1][-1] + 1:
                runs[-1].append(j)
            else:
                runs.append([j])
        ky, kx = len(runs[0]), len(runs)
        if any(len(r) != ky for r in runs):
            continue
        if kx == 1:
            shape, kernel = (L,), (ky,)
        else:
            Y = runs[1][0] - runs[0][0]
            if Y <= 0 or L % Y or any(b[0] - a[0] != Y for a, b in zip(runs, runs[1:])):
                continue
            shape, kernel = (L // Y, Y), (kx, ky)
        if any(k > n for k, n in zip(kernel, shape)):
            continue
        n = len(shape)
        cand = ir.Neighborhood(shape, kernel, (1,) * n, (1,) * n, (causal,) * n)
        if torch.equal(dense_keep(cand.expr(), L, L), truth):
            return cand
    return None


# ---------------------------------------------------------------------------------------------
# run-time part
# ---------------------------------------------------------------------------------------------


def _split_keep(E: sp.Basic, reader: GraphReader, shape: tuple, Lk: int):
    """Replace the key-padding atom by ``KEEP``. Returns (E, keep_src, keep_fn, note) or a reason."""
    atoms = E.atoms(sp.core.function.AppliedUndef)
    if not atoms:
        return E, None, None, ""
    if len(atoms) > 1:
        return f"the mask reads several run-time tensor positions ({', '.join(map(str, atoms))})"
    (atom,) = atoms
    src = reader.runtime[type(atom).__name__]
    rshape = tuple(reader.out(src)[0])
    E = E.xreplace({sp.Ne(atom, 0): KEEP, sp.Eq(atom, 0): sp.Not(KEEP)})
    if atom in E.atoms(sp.core.function.AppliedUndef):
        return f"run-time tensor `{src.name}` is used other than as `!= 0` / `.bool()`"
    args, n = atom.args, len(shape)
    why = f"run-time tensor `{src.name}` is read at {atom.args}, not as a key-padding mask [batch, kv + c]"
    if len(args) > 1:
        batch_ok = (n == 4 and args[0] == AXES[4] and rshape[0] == shape[0]) or (args[0] == 0 and rshape[0] == 1)
        if not batch_ok or any(a != 0 for a in args[1:-1]):
            return why
    c = sp.expand(args[-1] - AXES[1])
    width = shape[-1]  # the mask's key extent: Lk at the example (a Size when read symbolically)
    if not c.is_Integer or hint_of(width) != Lk or not (0 <= int(c) and int(c) + width <= rshape[-1]):
        return why
    c = int(c)
    to_end = c + width == rshape[-1]  # a Size comparison holds for every size, or raises SizeDependent
    if reader.sizes == "symbolic":
        if not to_end and isinstance(width, Size):
            raise SizeDependent(f"the keys read from `{src.name}` stop {rshape[-1] - c - width} before its end")
        length = None if to_end else width
    else:  # an example-size reading of a symbolic graph keeps the old rule: to the end when it reaches it
        length = Lk if not to_end or reader.sizes == "static" else None
    stop = "" if length is None else c + length
    return E, src, KeyPadding(c, length), f"key padding `{src.name}`[:, {c}:{stop}] != 0"


def _leaves(v: sp.Basic) -> set:
    if isinstance(v, sp.Piecewise):
        return set().union(*[_leaves(x) for x, _ in v.args])
    return {v}


def _additive(V: sp.Basic) -> tuple[sp.Basic, float] | str:
    """An additive mask value → (the Boolean "value is 0", fill)."""
    fills = {x for x in _leaves(V) if x != 0}
    if len(fills) > 1:
        return f"the additive mask holds several non-zero values {sorted(map(float, fills))}"
    fill = float(fills.pop()) if fills else -math.inf
    if fill > -BIG:
        return f"the additive mask fills with {fill:g}; only -inf or values <= -1e30 are masks"
    return sp.Not(to_bool(V)), fill


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------


def analyze_mask(node: fx.Node, Lq: int, Lk: int, negate: bool = False, hint: bool = False) -> MaskFact | str:
    """Prove what mask ``node`` computes on the site's ``(Lq, Lk)`` grid, or say why not.

    ``hint=True`` (a graph with symbolic sizes): the mask is first read with every size as a symbol;
    when the predicate holds no size and every step of the proof is exact as a predicate, the fact
    holds for every length (``general``). Otherwise it is read at the example sizes: the fact holds
    wherever the sizes it read (``MaskFact.sizes``) keep their example values — whoever uses it must
    specialise the graph to them.

    ``node``: a bool keep-mask (``True`` = visible, SDPA's convention), or an additive float mask,
    broadcastable to ``(B, H, Lq, Lk)``. ``negate=True`` analyses ``~value(node)`` (the node is a
    ``masked_fill`` condition, ``True`` = hidden). See :class:`MaskFact` for the guaranteed equation.
    """
    if not hint:
        return _prove(node, Lq, Lk, negate, "static")
    general = _prove(node, Lq, Lk, negate, "symbolic")
    if isinstance(general, MaskFact):
        return general
    fact = _prove(node, Lq, Lk, negate, "hint")
    if isinstance(fact, str):
        return fact
    return replace(fact, proof=f"{fact.proof}; not proved for every length: {general}", not_general=general)


def _divides_negative(e: sp.Basic) -> str | None:
    """Why a predicate may be unsafe for Triton at some ``q, kv >= 0`` (``//``/``%`` of an operand
    sympy cannot prove non-negative), or None."""
    for f in e.atoms(sp.floor, sp.Mod):
        num = sp.fraction(sp.together(f.args[0]))[0]
        if not num.is_nonnegative:
            return f"`{f}` may divide a negative value for some (q, kv) (torch floors, Triton truncates)"
    return None


def _prove(node: fx.Node, Lq: int, Lk: int, negate: bool, sizes: str) -> MaskFact | str:
    """:func:`analyze_mask` with the graph's sizes read as ``sizes`` (see :class:`GraphReader`)."""
    if not isinstance(node, fx.Node):
        return f"the mask is not a graph node ({node!r})"
    symbolic = sizes == "symbolic"
    reader = GraphReader(node.graph.owning_module, sizes=sizes)
    try:
        av = reader.read(node)
        if not hasattr(av, "expr"):
            return f"`{node.name}` is not a tensor"
        shape = av.shape
        hs = tuple(hint_of(d) for d in shape)  # the graph's broadcasting holds at every size
        if len(hs) > 4 or (hs and hs[-1] not in (1, Lk)) or (len(hs) > 1 and hs[-2] not in (1, Lq)):
            return f"mask shape {hs} does not broadcast to (..., {Lq}, {Lk})"
        fill = None
        if av.dtype == torch.bool:
            E = av.expr
        elif av.dtype.is_floating_point and not negate:
            res = _additive(av.expr)
            if isinstance(res, str):
                return res
            E, fill = res
        else:
            return f"`{node.name}` is a {av.dtype} mask" + (" (negate applies to bool masks)" if negate else "")
        E = sp.Not(E) if negate else E
        split = _split_keep(E, reader, shape, Lk)
        if isinstance(split, str):
            return split
        E, keep_src, keep_fn, keep_note = split
        E = E.xreplace({AXES[2]: Q, AXES[1]: KV})
        stray = E.free_symbols - {Q, KV, KEEP}
        if stray & set(AXES):
            return f"the static part varies along batch / head axes ({', '.join(map(str, stray & set(AXES)))})"
        if stray:
            return f"the predicate depends on the size(s) {', '.join(sorted(map(str, stray)))}"
        P = E.xreplace({KEEP: sp.true})
        truth = _grid(to_src(P), Lq, Lk)
        if keep_src is not None:
            hidden = E.xreplace({KEEP: sp.false})
            if symbolic and hidden is not sp.false:
                return f"the run-time part ({keep_note}) is not a conjunct of the predicate as read"
            if bool(_grid(to_src(hidden), Lq, Lk).any()):
                return f"the run-time part ({keep_note}) is not a conjunct: some positions are visible without it"
        fired: list = []
        static = classify(P, fired)
        notes: list = []
        if not torch.equal(dense_keep(static.expr(), Lq, Lk), truth):
            notes.append(f"classification {static} disagreed with the predicate; kept as a predicate")
            static = ir.Predicate(to_src(P))
        if not symbolic:  # both fit the example grid: a general proof keeps the predicate's own kinds
            static = _simplify(static, truth, Lq, Lk, notes)
            leaves = static.parts if isinstance(static, (ir.And, ir.Or)) else (static,)
            if Lq == Lk and any(isinstance(x, ir.Predicate) for x in leaves):
                na = neighborhood_from_grid(truth)
                if na is not None:
                    notes.append(f"{static} is {na} on the grid")
                    static = na
        if not torch.equal(dense_keep(static.expr(), Lq, Lk), truth):
            return f"internal: {static} does not match the predicate on the grid"
        leaves = static.parts if isinstance(static, (ir.And, ir.Or)) else (static,)
        unsafe = None
        if any(isinstance(x, ir.Predicate) for x in leaves):
            unsafe = _divides_negative(P) if symbolic else _safe_divisions(P, Lq, Lk)
        if unsafe:
            return unsafe
    except Refuse as e:
        return str(e)
    except TypeError as e:
        if not symbolic:
            raise
        return f"a symbolic size is used where only its example value works ({e})"
    kind = "additive" if fill is not None else "bool"
    checked = (f"proved for every length (no size enters the predicate), checked at {Lq}x{Lk}" if symbolic
               else f"checked at all {Lq}x{Lk} (q, kv)")
    proof = (f"{kind} mask `{node.name}`{' (negated)' if negate else ''}: static {to_src(P)} → {static} "
             f"[rules: {', '.join(fired) or 'none'}]; {checked}")
    if keep_src is not None:
        proof += f"; run-time: {keep_note}, a conjunct (no position visible where it is false)"
    if fill is not None:
        proof += f"; fill {fill:g}, visible positions exactly 0"
    if notes:
        proof += "; " + "; ".join(notes)
    used = tuple(reader.used.values()) if sizes == "hint" else ()
    return MaskFact(static, keep_src, keep_fn, "key_padding" if keep_src is not None else None, fill, proof,
                    general=sizes != "hint", sizes=used)
