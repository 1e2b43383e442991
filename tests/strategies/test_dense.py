"""The attncomp::dense_fwd op on CPU: against a float64 reference, opcheck, torch.compile."""

import math

import pytest
import torch

from attncomp.strategies.dense import op as R
from conftest import rel_err


def reference(q, k, v, bias, scale, causal_offset):
    """Eager float64 attention; q (B, Hq, Lq, D), k/v (B, Hkv, Lk, D*)."""
    g = q.shape[1] // k.shape[1]
    q, k, v = q.double(), k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        s = s + bias.double()
    if causal_offset is not None:
        i = torch.arange(q.shape[2])[:, None]
        j = torch.arange(k.shape[2])[None]
        s = s.masked_fill(j > i + causal_offset, -math.inf)
    return torch.softmax(s, -1) @ v


CASES = {
    "B2-H4-L64-D32": dict(B=2, Hq=4, Hkv=4, Lq=64, Lk=64, D=32, bias=None, causal=None),
    "B2-H4-L64-D32-causal": dict(B=2, Hq=4, Hkv=4, Lq=64, Lk=64, D=32, bias=None, causal=0),
    "B1-H4/2-L48x80-D16-bias-causal-bottomright": dict(B=1, Hq=4, Hkv=2, Lq=48, Lk=80, D=16, bias="full",
                                                       causal=32),
    "B2-H4/1-L33-D24-keypad": dict(B=2, Hq=4, Hkv=1, Lq=33, Lk=33, D=24, bias="keypad", causal=None),
    # two head dims (LeViT: keys 16, values 32; and the other way): the fused CPU kernel takes one, so the
    # narrower side gets zero columns
    "B2-H4-L49-D16-Dv32-bias": dict(B=2, Hq=4, Hkv=4, Lq=49, Lk=49, D=16, Dv=32, bias="full", causal=None),
    "B1-H4/2-L40-D32-Dv8-causal-keypad": dict(B=2, Hq=4, Hkv=2, Lq=40, Lk=40, D=32, Dv=8, bias="keypad", causal=0),
}


def _inputs(c, requires_grad=False, dtype=torch.float32):
    q = torch.randn(c["B"], c["Hq"], c["Lq"], c["D"], dtype=dtype)
    k = torch.randn(c["B"], c["Hkv"], c["Lk"], c["D"], dtype=dtype)
    v = torch.randn(c["B"], c["Hkv"], c["Lk"], c.get("Dv", c["D"]), dtype=dtype)
    bias = None
    if c["bias"] == "full":
        bias = torch.randn(1, c["Hq"], c["Lq"], c["Lk"], dtype=dtype)
    elif c["bias"] == "keypad":
        bias = torch.zeros(c["B"], 1, 1, c["Lk"], dtype=dtype)
        bias[0, ..., -7:] = -math.inf
    for t in (q, k, v) + ((bias,) if bias is not None and c["bias"] == "full" else ()):
        t.requires_grad_(requires_grad)
    return q, k, v, bias


@pytest.mark.parametrize("name", list(CASES))
def test_dense_fwd_bwd_cpu_matches_float64(name):
    c = CASES[name]
    q, k, v, bias = _inputs(c, requires_grad=True)
    scale = c["D"] ** -0.5
    out, lse = R.dense_fwd(q, k, v, bias, scale, c["causal"], 0.0)
    ref = reference(q, k, v, bias, scale, c["causal"])
    assert rel_err(out, ref) <= 1e-5
    go = torch.randn_like(out)
    wrt = [q, k, v] + ([bias] if bias is not None and bias.requires_grad else [])
    got = torch.autograd.grad(out, wrt, go)
    want = torch.autograd.grad(ref, wrt, go.double())
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("exact_lse", [True, False])
@pytest.mark.parametrize("name", list(CASES))
def test_inference_entry_matches_float64(name, exact_lse):
    """``run`` (what site modules call, the op's body without its dispatch under no_grad)."""
    c = CASES[name]
    q, k, v, bias = _inputs(c)
    scale = c["D"] ** -0.5
    with torch.no_grad():
        out, lse = R.run(q, k, v, bias, scale, c["causal"], 0.0, exact_lse=exact_lse)
    ref = reference(q, k, v, bias, scale, c["causal"])
    assert out.shape == ref.shape and rel_err(out, ref) <= 1e-5
    if exact_lse:
        assert lse.shape == ref.shape[:-1]
        assert torch.allclose(lse.double(), _lse(q, k, bias, scale, c["causal"]), atol=1e-4)


def _lse(q, k, bias, scale, causal_offset):
    g = q.shape[1] // k.shape[1]
    s = q.double() @ k.double().repeat_interleave(g, 1).transpose(-1, -2) * scale
    if bias is not None:
        s = s + bias.double()
    if causal_offset is not None:
        i, j = torch.arange(q.shape[2])[:, None], torch.arange(k.shape[2])[None]
        s = s.masked_fill(j > i + causal_offset, -math.inf)
    return torch.logsumexp(s, -1)


def test_opcheck_dense_fwd():
    c = CASES["B2-H4-L64-D32-causal"]
    q, k, v, _ = _inputs(c, requires_grad=True)
    torch.library.opcheck(torch.ops.attncomp.dense_fwd.default, (q, k, v, None, 0.2, 0, 0.0))
    c = CASES["B1-H4/2-L48x80-D16-bias-causal-bottomright"]
    q, k, v, bias = _inputs(c, requires_grad=True)
    torch.library.opcheck(torch.ops.attncomp.dense_fwd.default, (q, k, v, bias, 0.25, 32, 0.0))


def test_opcheck_dense_bwd():
    c = CASES["B2-H4/1-L33-D24-keypad"]
    q, k, v, bias = _inputs(c)
    out, lse = R.dense_fwd(q, k, v, bias, 0.2, None, 0.0)
    torch.library.opcheck(torch.ops.attncomp.dense_bwd.default,
                          (torch.randn_like(out), q, k, v, bias, out, lse, 0.2, None, 0.0, False))


def test_compile_fullgraph_calls_the_op():
    c = CASES["B2-H4-L64-D32"]
    q, k, v, _ = _inputs(c)

    def f(q, k, v):
        return R.dense_fwd(q * 2, k, v, None, 0.125, 0, 0.0)[0] + 1

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert rel_err(compiled(q, k, v), f(q, k, v)) <= 1e-6
