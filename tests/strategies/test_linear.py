"""Linear attention (attncomp.linear): chunked CPU executor and Triton kernels (interpreter) against
the float64 recurrent reference, forward and backward; the custom op; input errors."""

import pytest
import torch

from attncomp.ops import linear_attention as exported
from attncomp.strategies.linear.op import linear_attention, linear_attention_reference
from conftest import rel_err


def _sigmoid(x):
    return torch.sigmoid(x)


# (B, H, L, D, Dv, causal, decay, normalize, chunk, feature)
CASES = [
    (2, 2, 50, 16, 16, True, True, True, 16, "elu1"),
    (2, 2, 50, 16, 8, True, False, True, 16, "elu1"),
    (2, 2, 64, 16, 16, True, True, False, 16, "relu"),
    (1, 2, 64, 8, 16, True, True, True, 64, "relu"),
    (2, 2, 50, 16, 16, True, True, True, 7, _sigmoid),
    (2, 2, 50, 16, 16, False, False, True, 16, "elu1"),
    (1, 3, 40, 16, 8, False, False, False, 64, "relu"),
    (1, 1, 1, 4, 4, True, True, False, 16, "elu1"),  # normalised, L=1 gives out = v and dq ≈ 0
    (1, 2, 40, 64, 80, True, True, True, 64, "elu1"),  # Triton: value columns in 3 blocks, chunk capped
]
TRITON_CASES = [CASES[0], CASES[2], CASES[4], CASES[5], CASES[8]]


def _id(c):
    B, H, L, D, Dv, causal, decay, norm, chunk, fm = c
    name = fm if isinstance(fm, str) else "callable"
    return (f"B{B}-H{H}-L{L}-D{D}-Dv{Dv}-{'causal' if causal else 'full'}{'-decay' if decay else ''}"
            f"-{'norm' if norm else 'raw'}-chunk{chunk}-{name}")


def _check_case(case):
    B, H, L, D, Dv, causal, decay, norm, chunk, fm = case
    q, k = (torch.randn(B, H, L, D, requires_grad=True) for _ in range(2))
    v = torch.randn(B, H, L, Dv, requires_grad=True)
    lam = torch.linspace(0.5, 0.97, H) if decay else None
    out = linear_attention(q, k, v, fm, causal, lam, norm, chunk)
    ref = linear_attention_reference(q, k, v, fm, causal, lam, norm)
    assert out.dtype == torch.float32 and out.shape == (B, H, L, Dv)
    assert rel_err(out, ref) <= 1e-5
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q, k, v), g.float())
    refs = torch.autograd.grad(ref, (q, k, v), g)
    for name, a, b in zip("qkv", grads, refs):
        assert rel_err(a, b) <= 1e-5, name


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_cpu_executor(case, torch_kernels):
    _check_case(case)


@pytest.mark.parametrize("case", TRITON_CASES, ids=_id)
def test_triton_interpreter(case, triton_kernels):
    _check_case(case)


@pytest.mark.parametrize("chunk", [1, 5, 16, 50, 200])
def test_chunk_does_not_change_the_result(chunk, torch_kernels):
    q, k, v = (torch.randn(1, 2, 50, 8, dtype=torch.float64) for _ in range(3))
    lam = torch.tensor([0.8, 1.0])
    ref = linear_attention_reference(q, k, v, "elu1", True, lam)
    assert rel_err(linear_attention(q, k, v, "elu1", True, lam, chunk=chunk), ref) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_low_precision(dtype, torch_kernels):
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    ref = linear_attention_reference(q, k, v, "elu1", True, torch.tensor([0.9, 0.7]))
    out = linear_attention(q.to(dtype), k.to(dtype), v.to(dtype), "elu1", True, torch.tensor([0.9, 0.7]), chunk=16)
    assert out.dtype == dtype and rel_err(out, ref) <= 2e-2


def test_reexported_from_ops():
    assert exported is linear_attention


@pytest.mark.parametrize("causal,decay,normalize", [(True, True, True), (False, False, False)],
                         ids=["causal-decay-norm", "full-raw"])
def test_opcheck(causal, decay, normalize, torch_kernels):
    q, k = (torch.randn(1, 2, 20, 8, requires_grad=True) for _ in range(2))
    v = torch.randn(1, 2, 20, 4, requires_grad=True)
    lam = torch.tensor([0.9, 0.6]) if decay else None
    torch.library.opcheck(torch.ops.attncomp.linear_fwd.default, (q, k, v, lam, "elu1", causal, normalize, 8))


def test_errors():
    q, k, v = (torch.randn(1, 2, 10, 4) for _ in range(3))
    with pytest.raises(ValueError, match="causal=True"):
        linear_attention(q, k, v, decay=torch.tensor([0.9, 0.9]))
    with pytest.raises(ValueError, match=r"shape \(H,\)"):
        linear_attention(q, k, v, causal=True, decay=torch.tensor([0.9, 0.9, 0.9]))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        linear_attention(q, k, v, causal=True, decay=torch.tensor([0.0, 0.9]))
    with pytest.raises(ValueError, match="incompatible shapes"):
        linear_attention(q, k[:, :, :5], v)
    with pytest.raises(ValueError, match="incompatible shapes"):
        linear_attention(q, k, v[:, :1])
    with pytest.raises(ValueError, match="4-D"):
        linear_attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="feature_map"):
        linear_attention(q, k, v, feature_map="softmax")
    with pytest.raises(ValueError, match="chunk"):
        linear_attention(q, k, v, chunk=0)
