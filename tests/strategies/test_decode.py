"""Split-KV decode (``attncomp::decode_fwd``, ``attncomp::decode_paged_fwd``) against a float64
reference: the Triton kernels (interpreter, CPU tensors) and the CPU executor, contiguous and paged
KV caches, ragged lengths, windows, soft-cap, GQA, one and several splits."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import attncomp
from attncomp.strategies.decode import launcher, naive, op
from attncomp.strategies.decode.plan import MAX_SPLITS, decode_splits
from conftest import rel_err

f32, bf16 = torch.float32, torch.bfloat16
TOL = {f32: 1e-5, bf16: 1e-2}
DT_NAME = {f32: "fp32", bf16: "bf16"}


@pytest.fixture(autouse=True, scope="module")
def _interpreter_env(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATTNCOMP_POISON", "1")  # launchers fill outputs with NaN: unwritten rows fail
        mp.setenv("ATTNCOMP_CACHE_DIR", str(tmp_path_factory.mktemp("kernels")))
        yield


# ----------------------------------------------------------------------------- reference
def reference(q, k, v, lens, scale, window_left, softcap):
    """Dense float64 decode attention: scores, a broadcast visibility mask, softmax.

    q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv), lens (B,) -> out (B, Hq, Lq, Dv),
    lse (B, Hq, Lq); query i at position lens - Lq + i; rows seeing no key: 0 and -inf."""
    q, k, v = q.double(), k.double(), v.double()
    Lq, Lk = q.shape[2], k.shape[2]
    g = q.shape[1] // k.shape[1]
    s = scale * torch.einsum("bhqd,bhkd->bhqk", q, k.repeat_interleave(g, 1))
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    pos = lens.long().view(-1, 1, 1, 1) - Lq + torch.arange(Lq).view(1, 1, -1, 1)
    j = torch.arange(Lk).view(1, 1, 1, -1)
    vis = (j < lens.long().view(-1, 1, 1, 1)) & (j <= pos)
    if window_left is not None:
        vis &= j >= pos - window_left
    s = s.masked_fill(~vis, float("-inf"))
    dead = ~vis.any(-1)
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    out = p @ v.repeat_interleave(g, 1)
    return out, lse.masked_fill(dead, float("-inf"))


# ----------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    B: int = 2
    Hq: int = 8
    Hkv: int = 2
    Lq: int = 1
    Lk: int = 384
    D: int = 64
    Dv: int = 0  # 0: D
    window: int | None = None
    softcap: float = 0.0
    paged: bool = False
    dtype: torch.dtype = f32
    splits: int = 1
    strided: bool = False

    @property
    def id(self) -> str:
        parts = [f"B{self.B}", f"Hq{self.Hq}", f"Hkv{self.Hkv}", f"Lq{self.Lq}", f"Lk{self.Lk}", f"D{self.D}"]
        parts[-1] += f"v{self.Dv}" if self.Dv else ""
        parts += ["win"] * (self.window is not None) + ["cap"] * bool(self.softcap) + ["paged"] * self.paged
        parts += ["strided"] * self.strided + [f"s{self.splits}", DT_NAME[self.dtype]]
        return "-".join(parts)

    def lens(self) -> torch.Tensor:
        """Ragged: a sequence with 1 key, one with all Lk, then odd lengths."""
        base = [1, self.Lk, self.Lk * 2 // 3 + 1, 37]
        return torch.tensor(base[: self.B], dtype=torch.int32)


PAGE = 16


def make_inputs(c: Case, seed: int = 0):
    """q, k, v in c.dtype (k, v contiguous (B, Hkv, Lk, D) — the reference's view), kv_lens, and for a
    paged case the caches (num_pages, PAGE, Hkv, D) with a shuffled page table whose unused slots hold
    -1, plus 3 spare pages the table never names."""
    g = torch.Generator().manual_seed(seed)
    dv = c.Dv or c.D
    lens = c.lens()
    if c.strided:  # (B, Lq, Hq, D) storage seen as (B, Hq, Lq, D)
        q = torch.randn(c.B, c.Lq, c.Hq, c.D, generator=g).to(c.dtype).transpose(1, 2)
    else:
        q = torch.randn(c.B, c.Hq, c.Lq, c.D, generator=g).to(c.dtype)
    if not c.paged:
        k = torch.randn(c.B, c.Hkv, c.Lk, c.D, generator=g).to(c.dtype)
        v = torch.randn(c.B, c.Hkv, c.Lk, dv, generator=g).to(c.dtype)
        return q, k, v, lens, None
    max_pages = -(-c.Lk // PAGE)
    used = [-(-int(n) // PAGE) for n in lens]
    n_pages = sum(used) + 3
    k_cache = torch.randn(n_pages, PAGE, c.Hkv, c.D, generator=g).to(c.dtype)
    v_cache = torch.randn(n_pages, PAGE, c.Hkv, dv, generator=g).to(c.dtype)
    perm = torch.randperm(n_pages, generator=g)
    table = torch.full((c.B, max_pages), -1, dtype=torch.int32)
    at = 0
    for b, n in enumerate(used):
        table[b, :n] = perm[at: at + n].to(torch.int32)
        at += n
    k = naive.unpage(k_cache, table, lens, c.Lk)
    v = naive.unpage(v_cache, table, lens, c.Lk)
    return q, k, v, lens, (k_cache, v_cache, table)


def run(c: Case, q, k, v, lens, paged):
    scale = c.D ** -0.5
    if paged:
        return op.decode_paged_fwd(q, *paged[:2], paged[2], lens, scale, c.window, c.softcap, c.splits, c.Lk)
    return op.decode_fwd(q, k, v, lens, scale, c.window, c.softcap, c.splits)


def check(c: Case, out, lse, q, k, v, lens):
    ref_out, ref_lse = reference(q, k, v, lens, c.D ** -0.5, c.window, c.softcap)
    assert out.shape == ref_out.shape and out.dtype == c.dtype and out.is_contiguous()
    assert lse.shape == ref_lse.shape and lse.dtype == torch.float32
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isneginf(lse), ~finite), "rows with no visible key differ"
    assert torch.all(out[~finite] == 0), "rows with no visible key must be 0"
    errs = {"out": rel_err(out, ref_out), "lse": rel_err(lse[finite], ref_lse[finite])}
    bad = {n: e for n, e in errs.items() if not e <= TOL[c.dtype]}
    assert not bad, f"relative errors above {TOL[c.dtype]:g}: {bad}"


# The CPU executor: cheap, so the wide matrix.
CPU_CASES = [
    Case(Lq=lq, Hq=hq, Hkv=hkv, window=w, softcap=cap, paged=pg, dtype=dt, Lk=lk)
    for lq, hq, hkv, lk in ((1, 8, 2, 384), (4, 8, 8, 300), (16, 8, 1, 512), (4, 16, 2, 257))
    for w, cap, pg, dt in ((None, 0.0, False, f32), (40, 0.0, True, bf16), (None, 5.0, True, f32),
                           (100, 5.0, False, bf16))
] + [Case(B=3, Lq=4, D=64, Dv=32), Case(B=3, Lq=2, strided=True, window=7, dtype=bf16)]

# The Triton kernels under the interpreter: few, small cases covering every template flag, one split
# (phase 1 writes the result) and several (with a split past the visible range: 12 key blocks, 7 splits).
TRITON_CASES = [
    Case(Lq=1, splits=1),
    Case(Lq=1, splits=7, window=100, paged=True, dtype=bf16),
    Case(Lq=4, Hq=8, Hkv=8, Lk=300, splits=3, softcap=5.0),
    Case(Lq=16, Hq=8, Hkv=1, Lk=200, splits=2, window=40, dtype=bf16),  # 128 packed rows: two row tiles
    Case(B=3, Lq=4, Hq=4, Hkv=1, Lk=160, D=40, Dv=24, splits=4, paged=True, softcap=5.0, strided=True),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CPU_CASES])
def test_cpu_executor(case, torch_kernels):
    q, k, v, lens, paged = make_inputs(case)
    out, lse = run(case, q, k, v, lens, paged)
    check(case, out, lse, q, k, v, lens)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in TRITON_CASES])
def test_triton_kernels(case, triton_kernels):
    q, k, v, lens, paged = make_inputs(case)
    out, lse = run(case, q, k, v, lens, paged)
    check(case, out, lse, q, k, v, lens)


def test_splits_agree(triton_kernels):
    """1 split and 5 splits (the second one's merge) give the same numbers up to f32 rounding."""
    c = Case(Lq=2, Lk=256, D=32)
    q, k, v, lens, _ = make_inputs(c)
    a = op.decode_fwd(q, k, v, lens, 0.2, None, 0.0, 1)
    b = op.decode_fwd(q, k, v, lens, 0.2, None, 0.0, 5)
    fin = torch.isfinite(a[1])
    assert not fin.all() and torch.equal(fin, torch.isfinite(b[1]))  # sequence 0 (1 key): query 0 sees none
    assert rel_err(b[0], a[0]) < 1e-6 and rel_err(b[1][fin], a[1][fin]) < 1e-6


# ----------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_empty_rows_and_clamped_lengths(kernels):
    """kv_len 0, kv_len < Lq (leading rows see nothing) and lengths outside [0, Lk] (clamped)."""
    attncomp.set_kernels(kernels)
    try:
        g = torch.Generator().manual_seed(1)
        q, k, v = (torch.randn(4, 2, 4, 32, generator=g), torch.randn(4, 2, 64, 32, generator=g),
                   torch.randn(4, 2, 64, 32, generator=g))
        lens = torch.tensor([0, 2, 99, -5])
        out, lse = op.decode_fwd(q, k, v, lens, 0.3, None, 0.0, 2)
        assert torch.all(out[0] == 0) and torch.all(torch.isneginf(lse[0]))
        assert torch.all(out[1, :, :2] == 0) and torch.all(torch.isneginf(lse[1, :, :2]))
        assert torch.isfinite(lse[1, :, 2:]).all() and torch.isfinite(out).all()
        ref_out, ref_lse = reference(q, k, v, lens.clamp(0, 64), 0.3, None, 0.0)
        assert rel_err(out, ref_out) < 1e-5
        assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
        assert torch.all(out[3] == 0)  # -5 clamps to 0
        out2, _ = op.decode_fwd(q, k, v, None, 0.3, None, 0.0, 1)  # None = every sequence has Lk keys
        assert rel_err(out2[2], out[2]) < 1e-6
    finally:
        attncomp.set_kernels(None)


def test_empty_inputs():
    q = torch.randn(2, 4, 1, 16)
    out, lse = op.decode_fwd(q, torch.randn(2, 2, 0, 16), torch.randn(2, 2, 0, 16), None, 1.0, None, 0.0, 0)
    assert out.shape == (2, 4, 1, 16) and torch.all(out == 0) and torch.all(torch.isneginf(lse))


def test_naive_reference_matches_sdpa():
    """The package's naive reference (python loops) == this file's reference == SDPA with a bool mask."""
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(2, 4, 3, 16, generator=g), torch.randn(2, 2, 40, 16, generator=g), torch.randn(
        2, 2, 40, 16, generator=g)
    lens = torch.tensor([17, 40])
    a = naive.decode_reference(q, k, v, lens, 0.25, 5)
    b = reference(q, k, v, lens, 0.25, 5, 0.0)
    assert rel_err(a[0], b[0]) < 1e-12 and torch.allclose(a[1], b[1])
    pos = lens.view(-1, 1, 1, 1) - 3 + torch.arange(3).view(1, 1, -1, 1)
    j = torch.arange(40).view(1, 1, 1, -1)
    keep = (j < lens.view(-1, 1, 1, 1)) & (j <= pos) & (j >= pos - 5)
    sd = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=keep, scale=0.25,
                                        enable_gqa=True)
    assert rel_err(a[0], sd) < 1e-12


def test_fake_impl_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k, v = torch.empty(3, 8, 2, 64, dtype=bf16), torch.empty(3, 2, 100, 64, dtype=bf16), torch.empty(
            3, 2, 100, 32, dtype=bf16)
        out, lse = torch.ops.attncomp.decode_fwd(q, k, v, None, 0.1, None, 0.0, 0)
        assert out.shape == (3, 8, 2, 32) and out.dtype == bf16 and lse.shape == (3, 8, 2) and lse.dtype == f32
        kc, vc = torch.empty(10, 16, 2, 64, dtype=bf16), torch.empty(10, 16, 2, 32, dtype=bf16)
        pt, lens = torch.empty(3, 7, dtype=torch.int32), torch.empty(3, dtype=torch.int32)
        out, lse = torch.ops.attncomp.decode_paged_fwd(q, kc, vc, pt, lens, 0.1, None, 0.0, 0, None)
        assert out.shape == (3, 8, 2, 32) and lse.shape == (3, 8, 2)


# ----------------------------------------------------------------------------- errors
def _bad_calls():
    q, k, v = torch.randn(2, 8, 1, 32), torch.randn(2, 2, 64, 32), torch.randn(2, 2, 64, 32)
    kc, vc = torch.randn(9, 16, 2, 32), torch.randn(9, 16, 2, 32)
    pt, lens = torch.zeros(2, 4, dtype=torch.int32), torch.tensor([10, 64], dtype=torch.int32)
    yield "head-dim", lambda: op.decode_fwd(q, torch.randn(2, 2, 64, 16), v, None, 1.0, None, 0.0, 0), \
        ValueError, "same head dim"
    yield "gqa", lambda: op.decode_fwd(torch.randn(2, 6, 1, 32), torch.randn(2, 4, 64, 32), torch.randn(2, 4, 64, 32),
                                       None, 1.0, None, 0.0, 0), ValueError, "multiple of key/value heads"
    yield "batch", lambda: op.decode_fwd(q, torch.randn(3, 2, 64, 32), torch.randn(3, 2, 64, 32), None, 1.0, None,
                                         0.0, 0), ValueError, "batch size"
    yield "lens-shape", lambda: op.decode_fwd(q, k, v, lens[:1], 1.0, None, 0.0, 0), ValueError, r"kv_lens must have"
    yield "lens-dtype", lambda: op.decode_fwd(q, k, v, lens.float(), 1.0, None, 0.0, 0), TypeError, "int32 or int64"
    yield "window", lambda: op.decode_fwd(q, k, v, lens, 1.0, -1, 0.0, 0), ValueError, "window_left"
    yield "splits", lambda: op.decode_fwd(q, k, v, lens, 1.0, None, 0.0, -2), ValueError, "n_splits"
    yield "page-table-short", lambda: op.decode_paged_fwd(q, kc, vc, pt, lens, 1.0, None, 0.0, 0, 65), \
        ValueError, "page table too short"
    yield "page-table-batch", lambda: op.decode_paged_fwd(q, kc, vc, pt[:1], lens, 1.0, None, 0.0, 0, None), \
        ValueError, r"page_table must have shape \(B, max_pages\)"
    yield "page-table-dtype", lambda: op.decode_paged_fwd(q, kc, vc, pt.float(), lens, 1.0, None, 0.0, 0, None), \
        TypeError, "page_table must be an int32"
    yield "cache-heads", lambda: op.decode_paged_fwd(q, kc, torch.randn(9, 16, 3, 32), pt, lens, 1.0, None, 0.0, 0,
                                                     None), ValueError, "same \\(num_pages, page_size, Hkv\\)"
    yield "cache-gqa", lambda: op.decode_paged_fwd(q, torch.randn(9, 16, 3, 32), torch.randn(9, 16, 3, 32), pt, lens,
                                                   1.0, None, 0.0, 0, None), ValueError, "multiple of the kv heads"


@pytest.mark.parametrize("name,call,exc,match", [pytest.param(*c, id=c[0]) for c in _bad_calls()])
def test_bad_inputs(name, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_grad_is_refused_and_no_grad_runs():
    q = torch.randn(1, 4, 1, 16, requires_grad=True)
    k, v = torch.randn(1, 2, 32, 16), torch.randn(1, 2, 32, 16)
    with pytest.raises(RuntimeError, match="forward-only"):
        op.decode_attention(q, k, v)
    with torch.no_grad():
        out, _ = op.decode_attention(q, k, v)
    ref, _ = reference(q.detach(), k, v, torch.tensor([32]), 0.25, None, 0.0)
    assert rel_err(out, ref) < 1e-5


# ----------------------------------------------------------------------------- planning
def test_decode_splits():
    assert decode_splits(17, 8192, 32, 8, 1, 132) == 0  # not decode
    assert decode_splits(1, 512, 32, 8, 1, 132) == 0  # too few keys
    assert decode_splits(1, 8192, 32, 8, 64, 132) == 0  # B·Hkv = 512 programs fill the GPU
    n = decode_splits(1, 4096, 32, 8, 1, 132)
    assert 2 <= n <= 4096 // 256 and decode_splits(1, 4096, 32, 8, 1, None) == n  # None: an H100
    assert decode_splits(1, 1 << 17, 32, 8, 1, 132) <= MAX_SPLITS
    assert decode_splits(1, 4096, 32, 8, 8, 132) < n  # more sequences, fewer splits
    # the launcher caps at one split per key block and never goes below 1
    assert launcher.resolve_splits(50, 1, 100, 8, 2, 1, 32, torch.device("cpu")) == 4
    assert launcher.resolve_splits(0, 1, 100, 8, 2, 1, 32, torch.device("cpu")) == 1
