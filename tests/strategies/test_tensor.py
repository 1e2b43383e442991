"""Tensor (2-simplicial) attention (attncomp.tensor): the CPU executor and the Triton kernels
(interpreter) against the float64 score-cube reference, forward and all five gradients; the custom
op (opcheck, torch.compile); input errors."""

from dataclasses import dataclass

import pytest
import torch

from attncomp.ops import tensor_attention as exported
from attncomp.strategies.tensor import op as tensor_mod
from attncomp.strategies.tensor.op import tensor_attention, tensor_attention_reference
from conftest import rel_err

NAMES = ("q", "k1", "k2", "v1", "v2")


@dataclass(frozen=True)
class Case:
    B: int
    H: int
    L: int
    D: int
    Dv: int = 16
    L1: int | None = None  # None: L
    L2: int | None = None
    window: tuple[int, int] | None = None
    causal: bool = False

    @property
    def id(self) -> str:
        s = f"B{self.B}-H{self.H}-L{self.L}-D{self.D}"
        if self.Dv != 16:
            s += f"-Dv{self.Dv}"
        if self.L1 is not None or self.L2 is not None:
            s += f"-L1x{self.L1 or self.L}-L2x{self.L2 or self.L}"
        if self.window:
            s += f"-w{self.window[0]}x{self.window[1]}"
        elif self.causal:
            s += "-causal"
        return s


def _inputs(c: Case, dtype=torch.float32):
    L1, L2 = c.L1 or c.L, c.L2 or c.L
    shapes = ((c.L, c.D), (L1, c.D), (L2, c.D), (L1, c.Dv), (L2, c.Dv))
    return [torch.randn(c.B, c.H, n, d, dtype=dtype, requires_grad=True) for n, d in shapes]


def _check_case(c: Case, tol: float = 1e-5) -> None:
    xs = _inputs(c)
    out = tensor_attention(*xs, window=c.window, causal=c.causal)
    ref = tensor_attention_reference(*xs, window=c.window, causal=c.causal)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    errs = {"out": rel_err(out, ref)}
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, xs, g.float())
    refs = torch.autograd.grad(ref, xs, g)
    for name, a, b, x in zip(NAMES, grads, refs, xs):
        assert a.shape == x.shape and a.dtype == x.dtype, name
        errs["d" + name] = rel_err(a, b)
    bad = {n: e for n, e in errs.items() if not e <= tol}
    assert not bad, f"relative errors above {tol:g}: {bad} (all: {errs})"


CPU_CASES = [
    Case(1, 2, 37, 16),
    Case(2, 2, 50, 16, Dv=8),
    Case(1, 2, 20, 16, L1=13, L2=29),
    Case(1, 2, 20, 16, L1=29, L2=13),
    Case(1, 2, 37, 16, causal=True),
    Case(1, 2, 40, 16, window=(5, 3)),
    Case(1, 2, 40, 16, window=(3, 9)),
    Case(2, 2, 70, 8, window=(2, 1)),
    Case(1, 2, 70, 32, window=(16, 64)),
    Case(1, 1, 2, 4, causal=True),  # query 0 sees the single pair (0, 0)
]
TRITON_CASES = [  # default interpreter tiles (one query block up to L = 64)
    Case(1, 2, 37, 16),
    Case(1, 2, 20, 16, Dv=8, L1=13, L2=29),
    Case(1, 2, 37, 16, causal=True),
]
SMALL_TILE_CASES = [  # 16 × 16 tiles: several query blocks and key tiles, ragged last ones
    Case(1, 2, 40, 16, window=(5, 3)),
    Case(1, 1, 50, 16, Dv=8, window=(3, 20)),
    Case(1, 1, 37, 8, causal=True),
    Case(1, 1, 20, 16, L1=13, L2=35),
]
SLOW_CASES = [
    Case(2, 2, 64, 32, L1=64, L2=48),
    Case(1, 2, 64, 24, Dv=20, causal=True),
    Case(1, 2, 64, 16, window=(17, 40)),
    Case(1, 2, 128, 32, window=(32, 8)),
    Case(1, 1, 100, 16, causal=True),
]
@pytest.mark.parametrize("c", CPU_CASES, ids=lambda c: c.id)
def test_cpu_executor(c, torch_kernels):
    _check_case(c)


@pytest.mark.parametrize("c", [Case(1, 2, 37, 16), Case(1, 2, 40, 16, window=(7, 4)), Case(1, 2, 33, 8, causal=True)],
                         ids=lambda c: c.id)
def test_cpu_executor_small_chunks(c, torch_kernels, monkeypatch):
    """A tiny score budget: one key j per chunk, so the online softmax merges many chunks."""
    monkeypatch.setattr(tensor_mod, "CPU_BUDGET", 1)
    _check_case(c)


@pytest.mark.parametrize("c", TRITON_CASES, ids=lambda c: c.id)
def test_triton_interpreter(c, triton_kernels):
    _check_case(c)


@pytest.fixture
def small_tiles(monkeypatch):
    from attncomp.strategies.tensor import launcher as triton_tensor

    def config(Lq, L_inner, causal, w_inner, dtype, D=64, kernel="fwd"):
        return {"BLOCK_M": 16, "BLOCK_L": 16, "DOT_PRECISION": "ieee"}

    monkeypatch.setattr(triton_tensor, "tensor_config", config)


@pytest.mark.parametrize("c", SMALL_TILE_CASES, ids=lambda c: c.id)
def test_triton_interpreter_small_tiles(c, triton_kernels, small_tiles):
    _check_case(c)


@pytest.mark.slow
@pytest.mark.parametrize("c", SLOW_CASES, ids=lambda c: c.id)
def test_triton_interpreter_slow(c, triton_kernels):
    _check_case(c)


@pytest.mark.slow
@pytest.mark.parametrize("c", [Case(2, 4, 128, 64, causal=True), Case(2, 2, 96, 32, L1=80, L2=112)],
                         ids=lambda c: c.id)
def test_cpu_executor_slow(c, torch_kernels):
    _check_case(c)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_triton_low_precision(dtype, triton_kernels):
    xs = [x.detach() for x in _inputs(Case(1, 1, 20, 16, window=(6, 4)))]
    ref = tensor_attention_reference(*xs, window=(6, 4))
    out = tensor_attention(*(x.to(dtype) for x in xs), window=(6, 4))
    assert out.dtype == dtype and rel_err(out, ref) <= 2e-2


def test_triton_empty_keys_give_zeros(triton_kernels):
    q, k1, v1 = torch.randn(1, 1, 5, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)
    k2, v2 = torch.randn(1, 1, 0, 4), torch.randn(1, 1, 0, 4)
    out, lse = torch.ops.attncomp.tensor_fwd(q, k1, k2, v1, v2, 0.5, False, 5, 5)
    assert torch.equal(out, torch.zeros(1, 1, 5, 4)) and bool(torch.isneginf(lse).all())


def test_cpu_gathered_windows_in_query_chunks(torch_kernels, monkeypatch):
    """Narrow windows take the gathered-window path; a budget of 5 queries per chunk splits it."""
    c = Case(1, 2, 40, 16, window=(7, 4))
    monkeypatch.setattr(tensor_mod, "CPU_BUDGET", 2 * 7 * 4 * 5)
    assert tensor_mod._gathered(2, 40, True, 7, 4) == 5
    _check_case(c)


def test_float64_matches_reference_closely(torch_kernels):
    c = Case(1, 2, 30, 8, window=(6, 11))
    xs = _inputs(c, torch.float64)
    out = tensor_attention(*xs, window=c.window)
    ref = tensor_attention_reference(*xs, window=c.window)
    assert out.dtype == torch.float64 and rel_err(out, ref) <= 1e-12
    for a, b in zip(torch.autograd.grad(out.sum(), xs), torch.autograd.grad(ref.sum(), xs)):
        assert rel_err(a, b) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_low_precision(dtype, torch_kernels):
    xs = [x.detach() for x in _inputs(Case(1, 2, 24, 16, causal=True))]
    ref = tensor_attention_reference(*xs, causal=True)
    out = tensor_attention(*(x.to(dtype) for x in xs), causal=True)
    assert out.dtype == dtype and rel_err(out, ref) <= 2e-2


def test_window_larger_than_sequence_is_causal(torch_kernels):
    xs = [x.detach() for x in _inputs(Case(1, 1, 12, 8))]
    assert torch.equal(tensor_attention(*xs, window=(50, 12)), tensor_attention(*xs, causal=True))


def test_empty_keys_give_zeros(torch_kernels):
    q, k1, v1 = torch.randn(1, 1, 5, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)
    k2, v2 = torch.randn(1, 1, 0, 4), torch.randn(1, 1, 0, 4)
    out, lse = torch.ops.attncomp.tensor_fwd(q, k1, k2, v1, v2, 0.5, False, 5, 5)
    assert torch.equal(out, torch.zeros(1, 1, 5, 4)) and bool(torch.isneginf(lse).all())


def test_scale_is_explicit(torch_kernels):
    xs = [x.detach() for x in _inputs(Case(1, 1, 10, 16))]
    default = tensor_attention(*xs)
    assert rel_err(default, tensor_attention(*xs, scale=0.25)) <= 1e-6  # 1/sqrt(16)
    assert rel_err(tensor_attention(*xs, scale=0.1), tensor_attention_reference(*xs, scale=0.1)) <= 1e-5
    assert rel_err(default, tensor_attention(*xs, scale=1.0)) > 1e-2


def test_reexported_from_ops():
    assert exported is tensor_attention


@pytest.mark.parametrize("causal,w1,w2", [(False, 9, 9), (True, 4, 3)], ids=["full", "w4x3"])
def test_opcheck(causal, w1, w2, torch_kernels):
    q, k1, k2 = (torch.randn(1, 2, 9, 8, requires_grad=True) for _ in range(3))
    v1, v2 = (torch.randn(1, 2, 9, 4, requires_grad=True) for _ in range(2))
    torch.library.opcheck(torch.ops.attncomp.tensor_fwd.default, (q, k1, k2, v1, v2, 0.3, causal, w1, w2))


def test_torch_compile_fullgraph(torch_kernels):
    xs = _inputs(Case(1, 2, 12, 8, Dv=8))

    def f(q, k1, k2, v1, v2):
        return tensor_attention(q * 2, k1, k2, v1, v2, window=(4, 3)).sum()

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(*xs)
    assert rel_err(got, f(*xs)) <= 1e-6
    got.backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in xs)


def test_errors():
    q, k1, k2, v1, v2 = (torch.randn(1, 2, 10, 4) for _ in range(5))
    with pytest.raises(ValueError, match="k2 must be 4-D"):
        tensor_attention(q, k1, k2[0], v1, v2)
    with pytest.raises(TypeError, match="v1 must be a floating-point"):
        tensor_attention(q, k1, k2, v1.long(), v2)
    with pytest.raises(TypeError, match="k1 has dtype"):
        tensor_attention(q, k1.double(), k2, v1, v2)
    with pytest.raises(ValueError, match="k2 has head dim"):
        tensor_attention(q, k1, k2[..., :3], v1, v2)
    with pytest.raises(ValueError, match="v2 has length 9 but k2 has 10"):
        tensor_attention(q, k1, k2, v1, v2[:, :, :9])
    with pytest.raises(ValueError, match="v1 and v2"):
        tensor_attention(q, k1, k2, v1, v2[..., :3])
    with pytest.raises(ValueError, match=r"k1 has \(B, H\)"):
        tensor_attention(q, k1[:, :1], k2, v1[:, :1], v2)
    with pytest.raises(ValueError, match="window"):
        tensor_attention(q, k1, k2, v1, v2, window=(0, 3))
    with pytest.raises(ValueError, match="window"):
        tensor_attention(q, k1, k2, v1, v2, window=5)
    with pytest.raises(ValueError, match="Lq == L1 == L2"):
        tensor_attention(q, k1[:, :, :5], k2, v1[:, :, :5], v2, causal=True)
    with pytest.raises(TypeError, match="scale"):
        tensor_attention(q, k1, k2, v1, v2, scale=float("nan"))
    with pytest.raises(TypeError, match="v2 must be a torch.Tensor"):
        tensor_attention(q, k1, k2, v1, None)
