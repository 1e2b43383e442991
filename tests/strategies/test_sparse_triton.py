"""Block-sparse Triton attention kernels vs an eager float64 reference (Triton interpreter, CPU).

The reference builds the visible matrix element by element from the mask predicate
(``blocks.dense_keep``) and the keep tensor; the kernels only see the block table. Outputs are
poisoned (NaN) before every launch, so an element a kernel forgets to write fails the comparison.
TRITON_INTERPRET must be set before triton is first imported: tests/conftest.py does it.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("ATTNCOMP_POISON", "1")

from dataclasses import dataclass

import jinja2
import pytest
import torch

from attncomp import ir
from attncomp.masks import blocks
from attncomp.runtime import codegen
from attncomp.strategies.sparse import launcher as triton_sparse
from conftest import assert_fwd_bwd_match, random_qkv_dout

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DT_NAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16


@pytest.fixture(autouse=True, scope="module")
def _interpreter_env(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        mp.setenv("ATTNCOMP_POISON", "1")  # launchers fill outputs with NaN before each run
        mp.setenv("ATTNCOMP_CACHE_DIR", str(tmp_path_factory.mktemp("kernels")))
        yield


# ----------------------------------------------------------------------------- reference
def reference(q, k, v, bias, visible, scale, softcap):
    """Eager attention over an explicit visibility matrix; float64 in, float64 out.

    q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv), bias and visible (bool) broadcastable
    to (B, Hq, Lq, Lk) -> out (B, Hq, Lq, Dv), lse (B, Hq, Lq) (-inf on rows with no visible key)."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    s = scale * torch.matmul(q, k.transpose(-1, -2))
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias
    s = s.masked_fill(~visible, float("-inf"))
    dead = torch.isneginf(s).all(dim=-1, keepdim=True)
    lse = torch.logsumexp(torch.where(dead, 0.0, s), dim=-1)
    p = torch.exp(s - lse[..., None])  # dead rows: exp(-inf) = 0
    return torch.matmul(p, v), torch.where(dead[..., 0], float("-inf"), lse)



# ----------------------------------------------------------------------------- cases
def nbh(shape, kernel, dilation=None, stride=None, causal=None) -> ir.Neighborhood:
    n = len(shape)
    return ir.Neighborhood(tuple(shape), tuple(kernel), tuple(dilation or (1,) * n), tuple(stride or (1,) * n),
                           tuple(causal or (False,) * n))


@dataclass(frozen=True)
class Case:
    B: int = 1
    Hq: int = 2
    Hkv: int = 0  # 0: same as Hq
    Lq: int = 77
    Lk: int = 0  # 0: same as Lq
    D: int = 40
    Dv: int = 0  # 0: same as D
    dtype: torch.dtype = f32
    mask: object = None  # an ir mask with expr(), or None
    keep: str = ""  # "", "keypad" (B,1,1,Lk, per-batch [start, end) of valid keys), "tiles" (B,Hq,Lq,Lk)
    bias: str = ""  # "", "head" (1,Hq,Lq,Lk)
    bias_grad: bool = False
    softcap: float = 0.0
    blocks: tuple = (16, 16)
    strided: bool = False

    @property
    def hkv(self) -> int:
        return self.Hkv or self.Hq

    @property
    def lk(self) -> int:
        return self.Lk or self.Lq

    @property
    def dv(self) -> int:
        return self.Dv or self.D

    @property
    def expr(self) -> str | None:
        return None if self.mask is None else self.mask.expr()

    @property
    def id(self) -> str:
        parts = [f"B{self.B}", f"H{self.Hq}" + (f"kv{self.Hkv}" if self.hkv != self.Hq else "")]
        parts.append(f"L{self.Lq}" + (f"x{self.lk}" if self.lk != self.Lq else ""))
        parts.append(f"D{self.D}" + (f"v{self.dv}" if self.dv != self.D else ""))
        if self.mask is not None:
            parts.append(str(self.mask).replace(" ", ""))
        if self.keep:
            parts.append(f"keep-{self.keep}")
        if self.bias:
            parts.append(f"bias-{self.bias}" + ("-grad" if self.bias_grad else ""))
        if self.softcap:
            parts.append("softcap")
        if self.strided:
            parts.append("strided")
        if self.blocks != (16, 16):
            parts.append(f"m{self.blocks[0]}n{self.blocks[1]}")
        parts.append(DT_NAME[self.dtype])
        return "-".join(parts)


CASES = [
    # static masks, fp32
    Case(mask=ir.Causal(0)),
    Case(B=2, Hq=4, Lq=64, Lk=96, D=32, mask=ir.Causal(32)),  # bottom-right causal, Lq != Lk
    Case(Lq=50, Lk=77, mask=ir.Causal(27), blocks=(32, 16)),  # ragged bottom-right
    Case(mask=ir.Window(17, 0)),
    Case(B=2, Hq=4, mask=ir.Window(9, 5)),
    Case(Lq=131, D=16, mask=ir.Window(9, 5), blocks=(32, 16)),
    Case(Lq=96, D=32, mask=ir.BlockDiagonal(24)),
    Case(Lq=70, D=32, mask=ir.Grid(3)),
    Case(mask=ir.Or((ir.Prefix(10), ir.Causal(0)))),
    # NATTEN neighborhoods: 1-D (dilation 2 does not divide 77), 2-D, 3-D
    Case(mask=nbh((77,), (7,), (2,))),
    Case(mask=nbh((77,), (7,), (2,), (3,))),
    Case(mask=nbh((77,), (7,), (2,), (1,), (True,))),
    Case(mask=nbh((77,), (7,), (2,), (3,), (True,)), blocks=(32, 16)),
    Case(Lq=117, D=32, mask=nbh((9, 13), (3, 5), (1, 2), (1, 1), (False, True))),
    Case(Lq=120, D=32, mask=nbh((4, 5, 6), (3, 3, 3))),
    # run-time keep masks, alone and with a static mask (batch 1 of keypad leaves rows 0..19 empty
    # under causal); "tiles" mixes EMPTY / FULL / PARTIAL tiles per (batch, head)
    Case(B=2, keep="keypad"),
    Case(B=2, mask=ir.Causal(0), keep="keypad"),
    Case(B=2, Hq=2, Hkv=1, D=80, mask=ir.Causal(0), keep="keypad", bias="head", bias_grad=True),
    Case(B=2, Lq=64, D=32, keep="tiles"),
    Case(B=2, Hq=4, Hkv=2, Lq=64, D=32, mask=ir.Window(17, 0), keep="tiles", blocks=(32, 16)),
    # GQA, bias, softcap, odd sizes, layouts
    Case(Hq=4, Hkv=2, mask=ir.Causal(0)),
    Case(Hq=4, Hkv=2, Lq=64, D=32, mask=ir.BlockDiagonal(24), bias="head", bias_grad=True),
    Case(mask=ir.Causal(0), softcap=2.0),
    Case(Lq=131, D=80, Dv=40, mask=ir.Window(17, 0), bias="head", bias_grad=True, softcap=2.0),
    Case(B=2, Hq=2, Hkv=1, Lq=64, D=32, mask=ir.Grid(3), strided=True),
    Case(Lq=160, D=64, mask=None, keep="keypad", blocks=(32, 16)),
    # half precision
    Case(mask=ir.Causal(0), dtype=f16),
    Case(B=2, Hq=1, mask=nbh((77,), (7,), (2,), (3,)), keep="keypad", dtype=f16),
    Case(mask=ir.Window(9, 5), dtype=bf16),
    Case(Hq=4, Hkv=2, Lq=64, D=32, mask=ir.Causal(0), keep="tiles", bias="head", bias_grad=True, softcap=2.0,
         dtype=bf16),
]


def make_keep(c: Case, g: torch.Generator) -> torch.Tensor | None:
    if c.keep == "keypad":
        # batch b keeps keys [start_b, end_b): right padding in batch 0, left padding (20 keys) after
        keep = torch.zeros(c.B, 1, 1, c.lk, dtype=torch.bool)
        for b in range(c.B):
            start, end = (0, c.lk - 13) if b == 0 else (20, c.lk - 3 * b)
            keep[b, ..., start:end] = True
        return keep
    if c.keep == "tiles":
        # per 16x16 tile: 0 all hidden, 1 all visible, 2 random elements (~70% visible)
        tm, tn = -(-c.Lq // 16), -(-c.lk // 16)
        kind = torch.randint(0, 3, (c.B, c.Hq, tm, tn), generator=g)
        kind = kind.repeat_interleave(16, 2).repeat_interleave(16, 3)[..., :c.Lq, :c.lk]
        rand = torch.rand(c.B, c.Hq, c.Lq, c.lk, generator=g) < 0.7
        return (kind == 1) | ((kind == 2) & rand)
    return None


def make_inputs(c: Case, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, dout = random_qkv_dout(c, g)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    bias = None
    if c.bias == "head":
        bias = rnd(1, c.Hq, c.Lq, c.lk)
        bias[..., 5:9, :] = float("-inf")  # four rows whose every score is -inf: out 0, lse -inf
        bias[..., 11] = float("-inf")
    return q, k, v, dout, bias, make_keep(c, g)


def visible_matrix(c: Case, keep: torch.Tensor | None) -> torch.Tensor:
    vis = blocks.dense_keep(c.expr, c.Lq, c.lk)
    return vis if keep is None else vis & keep


def run_and_compare(c: Case, q, k, v, dout, bias, keep, table, visible):
    """Run both kernels with ``table`` and compare every output with the reference over ``visible``."""
    scale = c.D ** -0.5
    out, lse = triton_sparse.sparse_fwd(q, k, v, bias, keep, table, scale, c.softcap, c.expr)
    assert out.shape == (c.B, c.Hq, c.Lq, c.dv) and out.dtype == c.dtype
    assert lse.shape == (c.B, c.Hq, c.Lq) and lse.dtype == torch.float32
    dq, dk, dv, dbias = triton_sparse.sparse_bwd(dout, q, k, v, bias, keep, out, lse, table, scale, c.softcap,
                                                 c.expr, c.bias_grad)

    clean = [torch.nan_to_num(x.detach().double(), nan=0.0) for x in (q, k, v)]  # see test_empty_tiles_*
    leaves = [x.requires_grad_() for x in clean]
    b64 = None if bias is None else bias.double().requires_grad_(c.bias_grad)
    ref_out, ref_lse = reference(*leaves, b64, visible, scale, c.softcap)
    ref_out.backward(dout.double())

    assert_fwd_bwd_match(out, lse, (dq, dk, dv, dbias), ref_out, ref_lse, leaves, (q, k, v), bias,
                         b64 if c.bias_grad else None, TOL[c.dtype])
    return out, lse, (dq, dk, dv, dbias)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_sparse_matches_reference(case: Case):
    q, k, v, dout, bias, keep = make_inputs(case)
    table = blocks.block_table(case.expr, keep, case.Lq, case.lk, *case.blocks, q.device)
    out, lse, grads = run_and_compare(case, q, k, v, dout, bias, keep, table, visible_matrix(case, keep))
    dead = torch.isneginf(lse)
    if case.keep == "keypad" and case.mask == ir.Causal(0):
        assert dead[1, :, :20].all()  # left-padded batch: rows before its first key see nothing
        assert case.bias or not dead[0].any()
    if dead.any():
        assert (out[dead] == 0).all(), "rows with no visible key must give out = 0"
    for g in grads:
        assert g is None or torch.isfinite(g).all()


# ----------------------------------------------------------------------------- EMPTY / FULL tiles
def tile_visible(c: Case, states: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Element visibility (B, Hq, Lq, Lk) that the table's tile states prescribe: EMPTY tiles
    hidden, FULL tiles visible, PARTIAL tiles by predicate and keep."""
    bm, bn = c.blocks
    st = states.repeat_interleave(bm, 2).repeat_interleave(bn, 3)[..., :c.Lq, :c.lk]
    elem = visible_matrix(c, keep).expand(c.B, c.Hq, c.Lq, c.lk)
    return (st == blocks.FULL) | ((st == blocks.PARTIAL) & elem)


@pytest.mark.parametrize("case", [
    pytest.param(c, id=c.id) for c in (
        Case(Lq=40, Lk=96, D=32, mask=ir.Causal(0)),  # keys >= 40 hidden from every query
        Case(B=2, Hq=2, Hkv=1, Lq=48, Lk=80, D=32, keep="keypad", bias="head", bias_grad=True),
    )])
def test_empty_tiles_are_never_loaded(case: Case):
    """K / V rows of key blocks that are EMPTY for every query block are NaN: one visit of such a
    tile, even masked, reaches out (p @ v with p = 0) and dq (dp = dO @ vT). Bias entries of every
    EMPTY tile are NaN too (caught if one were read as FULL). dK / dV of keys nobody sees are 0."""
    q, k, v, dout, bias, keep = make_inputs(case)
    table = blocks.block_table(case.expr, keep, case.Lq, case.lk, *case.blocks, q.device)
    states = table.states.expand(case.B, case.Hq, -1, -1)
    bn = case.blocks[1]
    group = case.Hq // case.hkv
    # key blocks EMPTY for every query block of every head of the group
    dead_kb = (states == blocks.EMPTY).all(2).view(case.B, case.hkv, group, -1).all(2)
    dead_keys = dead_kb.repeat_interleave(bn, 2)[..., :case.lk]  # (B, Hkv, Lk)
    assert dead_keys.any() and not dead_keys.all(), "the case must leave some key blocks unseen"
    k, v = k.clone(), v.clone()
    k[dead_keys] = float("nan")
    v[dead_keys] = float("nan")
    if bias is not None:
        tiles = states.repeat_interleave(case.blocks[0], 2).repeat_interleave(bn, 3)[..., :case.Lq, :case.lk]
        bias = torch.where(tiles == blocks.EMPTY, float("nan"), bias.expand_as(tiles)).contiguous()
    # the reference reads the NaNs as 0 (q, k, v) or hides them (bias: only in hidden tiles)
    out, _, grads = run_and_compare(case, q, k, v, dout, bias, keep, table, visible_matrix(case, keep))
    for name, t in zip(("out", "dq", "dk", "dv", "dbias"), (out, *grads)):
        assert t is None or not torch.isnan(t).any(), f"{name}: an EMPTY tile was loaded"
    dk, dv = grads[1], grads[2]
    assert (dk[dead_keys] == 0).all() and (dv[dead_keys] == 0).all()


def test_table_decides_which_tiles_are_visited():
    """The kernels follow the table, not the predicate: a PARTIAL tile relabelled FULL is read whole
    (its hidden elements become visible), one relabelled EMPTY is skipped."""
    c = Case(B=1, Hq=2, Lq=64, Lk=64, D=32, mask=ir.Window(9, 5), bias="head", bias_grad=True)
    q, k, v, dout, bias, keep = make_inputs(c)
    states = blocks.static_states(c.expr, c.Lq, c.lk, *c.blocks, q.device).clone()
    assert states[0, 0, 1, 1] == blocks.PARTIAL and states[0, 0, 2, 1] == blocks.PARTIAL
    states[0, 0, 1, 1] = blocks.FULL  # interior tile (not a tail): FULL is allowed there
    states[0, 0, 2, 1] = blocks.EMPTY
    table = blocks.table_from_states(states, *c.blocks, c.Lq, c.lk)
    visible = tile_visible(c, table.states, keep)
    assert not torch.equal(visible[0, 0], visible_matrix(c, keep)), "the relabelling must change visibility"
    run_and_compare(c, q, k, v, dout, bias, keep, table, visible)


# ----------------------------------------------------------------------------- launcher checks
def test_backward_is_deterministic():
    c = Case(Hq=4, Hkv=1, Lq=48, D=32, mask=ir.Causal(0), keep="tiles", bias="head", bias_grad=True)
    q, k, v, dout, bias, keep = make_inputs(c, seed=1)
    table = blocks.block_table(c.expr, keep, c.Lq, c.lk, *c.blocks, q.device)
    out, lse = triton_sparse.sparse_fwd(q, k, v, bias, keep, table, 0.2, 0.0, c.expr)
    first = triton_sparse.sparse_bwd(dout, q, k, v, bias, keep, out, lse, table, 0.2, 0.0, c.expr, True)
    second = triton_sparse.sparse_bwd(dout, q, k, v, bias, keep, out, lse, table, 0.2, 0.0, c.expr, True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_config_block_sizes_must_match_table():
    q = k = v = torch.randn(1, 1, 32, 16)
    table = blocks.block_table(None, None, 32, 32, 16, 16, "cpu")
    with pytest.raises(ValueError, match="BLOCK_M=32 differs"):
        triton_sparse.sparse_fwd(q, k, v, None, None, table, 1.0, 0.0, None, config={"BLOCK_M": 32, "BLOCK_N": 16})
    other = blocks.block_table(None, None, 32, 48, 16, 16, "cpu")
    with pytest.raises(ValueError, match="block table is for L"):
        triton_sparse.sparse_fwd(q, k, v, None, None, other, 1.0, 0.0, None)


# ----------------------------------------------------------------------------- codegen
MASKS = [ir.Causal(0), ir.Causal(-3), ir.Window(17, 0), ir.Window(9, 5), ir.BlockDiagonal(24), ir.Grid(3),
         ir.Or((ir.Prefix(10), ir.Causal(0))), nbh((77,), (7,), (2,), (3,), (True,)),
         nbh((9, 13), (3, 5), (1, 2), (1, 1), (False, True)), nbh((4, 5, 6), (3, 3, 3))]


@pytest.mark.parametrize("bad", ["__import__('os')", "q.real", "q ** 2", "open(kv)", "where(q, kv)", "q < 1.5",
                                 "lambda: q", "q; kv"])
def test_render_mask_rejects_outside_grammar(bad):
    with pytest.raises(ValueError):
        triton_sparse.render_mask(bad)


def test_render_mask_maps_where():
    src = triton_sparse.render_mask(ir.Neighborhood((9,), (3,), (2,), (3,), (False,)).expr())
    assert "tl.where(" in src and "where(" not in src.replace("tl.where(", "")


@pytest.mark.parametrize("template", ["sparse_fwd", "sparse_bwd"])
def test_every_flag_combination_renders_valid_python(template):
    names = ["HAS_KEEP", "HAS_BIAS", "HAS_SOFTCAP", "UPCAST_DOT"] + (["BIAS_GRAD"] if template == "sparse_bwd" else [])
    for expr in [None] + [m.expr() for m in MASKS]:
        for bits in range(2 ** len(names)):
            flags = {n: bool(bits >> i & 1) for i, n in enumerate(names)}
            flags.update(HAS_MASK=expr is not None, MASK_EXPR=triton_sparse.render_mask(expr) if expr else "")
            source = codegen.render(template, **flags)
            assert "{%" not in source and "{{" not in source
            compile(source, f"<{template} {flags}>", "exec")


def test_codegen_missing_flag_is_an_error():
    with pytest.raises(jinja2.UndefinedError):
        codegen.render("sparse_fwd", HAS_MASK=True, HAS_KEEP=False, HAS_BIAS=False, HAS_SOFTCAP=False,
                       UPCAST_DOT=False)


# The offline sm_90 compile of these kernels (and of every other template) is tests/test_sm90_compile.py.
