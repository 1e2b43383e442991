"""Dense Triton attention kernels vs an eager float64 reference (Triton interpreter, CPU).

TRITON_INTERPRET must be set before triton is first imported (``import torch._dynamo``, hence
``import attncomp``, imports it): tests/conftest.py sets it before anything else.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("ATTNCOMP_POISON", "1")

import hashlib
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import pytest
import torch

from attncomp.runtime import codegen
from attncomp.strategies.dense import launcher as triton_dense
from conftest import assert_fwd_bwd_match, random_qkv_dout

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DT_NAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@pytest.fixture(autouse=True, scope="module")
def _interpreter_env(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        mp.setenv("ATTNCOMP_POISON", "1")  # launchers fill outputs with NaN before each run
        mp.setenv("ATTNCOMP_CACHE_DIR", str(tmp_path_factory.mktemp("kernels")))
        yield


# ----------------------------------------------------------------------------- reference
def reference(q, k, v, bias, scale, causal_offset, softcap):
    """Eager attention with the kernels' semantics; float64 in, float64 out.

    q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv), bias broadcastable to
    (B, Hq, Lq, Lk) -> out (B, Hq, Lq, Dv), lse (B, Hq, Lq) (-inf on fully masked rows)."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    s = scale * torch.matmul(q, k.transpose(-1, -2))
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias
    Lq, Lk = s.shape[-2:]
    if causal_offset is not None:
        qi = torch.arange(Lq)[:, None]
        kj = torch.arange(Lk)[None, :]
        s = s.masked_fill(kj > qi + causal_offset, float("-inf"))
    dead = torch.isneginf(s).all(dim=-1, keepdim=True)
    lse = torch.logsumexp(torch.where(dead, 0.0, s), dim=-1)
    p = torch.exp(s - lse[..., None])  # dead rows: exp(-inf) = 0
    out = torch.matmul(p, v)
    return out, torch.where(dead[..., 0], float("-inf"), lse)



# ----------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    B: int = 1
    Hq: int = 2
    Hkv: int = 0  # 0: same as Hq
    Lq: int = 64
    Lk: int = 0  # 0: same as Lq
    D: int = 64
    Dv: int = 0  # 0: same as D
    dtype: torch.dtype = torch.float32
    causal: int | None = None  # causal offset; "br" in the id when Lk - Lq
    bias: str = ""  # "", "keypad" (B,1,1,Lk), "head" (1,H,Lq,Lk), "2d" (Lq,Lk), "rowmask"
    bias_grad: bool = False
    softcap: float = 0.0
    strided: bool = False
    config: dict = field(default=None, hash=False, compare=False)

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
    def id(self) -> str:
        parts = [f"B{self.B}", f"H{self.Hq}" + (f"kv{self.Hkv}" if self.hkv != self.Hq else "")]
        parts.append(f"L{self.Lq}" + (f"x{self.lk}" if self.lk != self.Lq else ""))
        parts.append(f"D{self.D}" + (f"v{self.dv}" if self.dv != self.D else ""))
        if self.causal is not None:
            parts.append("causal" if self.causal == 0 else
                         "causal-br" if self.causal == self.lk - self.Lq else f"causal{self.causal}")
        if self.bias:
            parts.append(f"bias-{self.bias}" + ("-grad" if self.bias_grad else ""))
        if self.softcap:
            parts.append("softcap")
        if self.strided:
            parts.append("strided")
        if self.config:
            parts.append(f"m{self.config['BLOCK_M']}n{self.config['BLOCK_N']}")
        parts.append(DT_NAME[self.dtype])
        return "-".join(parts)


f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
CASES = [
    # plain, every dtype, causal top-left
    Case(B=2, Hq=4, Lq=96, D=64, dtype=f32),
    Case(B=2, Hq=4, Lq=96, D=64, dtype=f16, causal=0),
    Case(B=2, Hq=4, Lq=96, D=64, dtype=bf16, causal=0),
    # ragged lengths, odd head dims, Lq != Lk with bottom-right causal (both signs)
    Case(Lq=77, D=56, dtype=f32),
    Case(Lq=100, Lk=61, D=80, dtype=f16, causal=-39),  # first 39 rows fully masked
    Case(Lq=50, Lk=130, D=96, dtype=bf16, causal=80),
    Case(Lq=1, Lk=67, D=64, dtype=f32, causal=66),  # decode-like single query
    Case(Lq=45, Lk=83, D=120, dtype=f16),
    Case(Lq=64, D=16, dtype=f32, causal=0),
    Case(Lq=70, D=128, dtype=bf16, causal=0),
    Case(Lq=40, Lk=24, D=256, dtype=f32, causal=-16),
    Case(Lq=48, Lk=80, D=96, Dv=64, dtype=f32, causal=32),
    # GQA / MQA
    Case(B=2, Hq=4, Hkv=2, Lq=64, dtype=f16),
    Case(Hq=4, Hkv=1, Lq=80, dtype=bf16, causal=0),
    Case(Hq=2, Hkv=1, Lq=57, Lk=90, D=80, dtype=f32, causal=33, bias="2d", bias_grad=True),
    # bias forms
    Case(B=2, Lq=72, dtype=f32, bias="keypad"),
    Case(B=2, Hq=3, Lq=51, Lk=75, D=56, dtype=f32, bias="keypad", bias_grad=True),
    Case(Lq=64, dtype=f16, bias="head", bias_grad=True),
    Case(Lq=59, D=56, dtype=bf16, causal=0, bias="2d", bias_grad=True),
    Case(B=2, Lq=48, dtype=f32, causal=0, bias="rowmask", bias_grad=True),  # all -inf rows
    # soft-cap
    Case(Lq=64, dtype=f32, softcap=2.0),
    Case(Lq=83, D=56, dtype=bf16, causal=0, softcap=2.0),
    Case(B=2, Hq=4, Hkv=2, Lq=40, Lk=56, dtype=f16, softcap=2.0, bias="head", bias_grad=True),
    # strided (B, L, H, D) inputs
    Case(B=2, Lq=64, dtype=f32, strided=True),
    Case(B=2, Hq=4, Hkv=2, Lq=66, D=80, dtype=f16, causal=0, strided=True, bias="keypad"),
    # tilings: BLOCK_M < BLOCK_N and BLOCK_M > BLOCK_N on ragged causal shapes
    Case(Lq=75, Lk=91, dtype=f32, causal=16, config={"BLOCK_M": 16, "BLOCK_N": 32}),
    Case(Lq=130, Lk=99, D=56, dtype=f32, causal=-31, bias="2d", bias_grad=True,
         config={"BLOCK_M": 64, "BLOCK_N": 16}),
]


def make_inputs(c: Case, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, dout = random_qkv_dout(c, g)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    bias = None
    if c.bias == "keypad":
        bias = rnd(c.B, 1, 1, c.lk)
        bias[:, :, :, -(c.lk // 4):] = float("-inf")  # padded keys
    elif c.bias == "head":
        bias = rnd(1, c.Hq, c.Lq, c.lk)
    elif c.bias == "2d":
        bias = rnd(c.Lq, c.lk)
    elif c.bias == "rowmask":
        bias = rnd(c.B, 1, c.Lq, c.lk)
        bias[0, :, 5:9] = float("-inf")  # four fully masked query rows in batch 0
    return q, k, v, dout, bias


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_dense_matches_reference(case: Case):
    q, k, v, dout, bias = make_inputs(case)
    scale = case.D ** -0.5
    out, lse = triton_dense.dense_fwd(q, k, v, bias, scale, case.causal, case.softcap, config=case.config)
    assert out.shape == (case.B, case.Hq, case.Lq, case.dv) and out.dtype == case.dtype
    assert lse.shape == (case.B, case.Hq, case.Lq) and lse.dtype == torch.float32
    dq, dk, dv, dbias = triton_dense.dense_bwd(
        dout, q, k, v, bias, out, lse, scale, case.causal, case.softcap, case.bias_grad, config=case.config)

    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    b64 = None
    if bias is not None:
        b64 = bias.double().requires_grad_(case.bias_grad)
    ref_out, ref_lse = reference(*leaves, b64, scale, case.causal, case.softcap)
    ref_out.backward(dout.double())

    assert_fwd_bwd_match(out, lse, (dq, dk, dv, dbias), ref_out, ref_lse, leaves, (q, k, v), bias,
                         b64 if case.bias_grad else None, TOL[case.dtype])


def test_backward_is_deterministic():
    c = Case(B=1, Hq=4, Hkv=1, Lq=40, Lk=56, D=32, dtype=torch.float32, causal=16, bias="head",
             bias_grad=True)
    q, k, v, dout, bias = make_inputs(c, seed=1)
    out, lse = triton_dense.dense_fwd(q, k, v, bias, 0.2, c.causal)
    first = triton_dense.dense_bwd(dout, q, k, v, bias, out, lse, 0.2, c.causal, 0.0, True)
    second = triton_dense.dense_bwd(dout, q, k, v, bias, out, lse, 0.2, c.causal, 0.0, True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- codegen
FWD_FLAGS = {"HAS_BIAS": True, "IS_CAUSAL": True, "HAS_SOFTCAP": False, "UPCAST_DOT": False}


def test_codegen_memoises_render_and_import():
    # A nonce flag (unused by the template, but part of the header and the key) makes this
    # kernel new to the process whatever ran before.
    flags = {**FWD_FLAGS, "TEST_NONCE": uuid.uuid4().hex}
    before = dict(codegen.STATS)
    mod = codegen.load_kernel_module("dense_fwd", **flags)
    assert codegen.STATS == {"render": before["render"] + 1, "import": before["import"] + 1}
    again = codegen.load_kernel_module("dense_fwd.py.j2", **dict(reversed(list(flags.items()))))
    assert again is mod
    assert codegen.STATS == {"render": before["render"] + 1, "import": before["import"] + 1}, (
        "same flags must neither re-render nor re-import")
    # written to the cache dir under its content hash; the interpreter was picked at import
    path = Path(mod.__file__)
    assert path.parent == Path(os.environ["ATTNCOMP_CACHE_DIR"])
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    assert path.name == f"dense_fwd_{digest}.py"
    assert type(mod.attn_fwd).__name__ == "InterpretedFunction"


def test_codegen_missing_flag_is_an_error():
    with pytest.raises(jinja2.UndefinedError):
        codegen.render("dense_fwd", HAS_BIAS=True, IS_CAUSAL=True, UPCAST_DOT=False)


@pytest.mark.parametrize("template", ["dense_fwd", "dense_bwd"])
def test_every_flag_combination_renders_valid_python(template):
    names = ["HAS_BIAS", "IS_CAUSAL", "HAS_SOFTCAP", "UPCAST_DOT"]
    if template == "dense_bwd":
        names.append("BIAS_GRAD")
    for bits in range(2 ** len(names)):
        flags = {n: bool(bits >> i & 1) for i, n in enumerate(names)}
        source = codegen.render(template, **flags)
        assert "{%" not in source and "{{" not in source
        compile(source, f"<{template} {flags}>", "exec")
