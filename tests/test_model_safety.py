"""Model safety: ``optimize`` never changes the model it is given, and the optimized model behaves like a
module — state_dict / load_state_dict, deepcopy, no_grad / inference_mode, autocast, train / eval
(dropout honoured) and ``.to(dtype)``."""

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attncomp
from conftest import rel_err


class Block(nn.Module):
    """Two attention sites: a causal softmax chain with attention dropout (nn.Dropout on the
    probabilities) and an SDPA call whose dropout_p follows ``self.training``; a buffer, a LayerNorm."""

    def __init__(self, E: int = 32, H: int = 4, p: float = 0.25):
        super().__init__()
        self.H, self.p = H, p
        self.qkv = nn.Linear(E, 3 * E)
        self.out = nn.Linear(E, E)
        self.norm = nn.LayerNorm(E)
        self.attn_drop = nn.Dropout(p)
        self.register_buffer("gain", torch.ones(E))

    def forward(self, x):
        B, L, E = x.shape
        q, k, v = self.qkv(self.norm(x)).view(B, L, 3, self.H, E // self.H).permute(2, 0, 3, 1, 4)
        hidden = torch.ones(L, L, dtype=torch.bool, device=x.device).triu(1)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(E // self.H)
        a = self.attn_drop(torch.softmax(s.masked_fill(hidden, -math.inf), -1)) @ v
        b = F.scaled_dot_product_attention(q, k, v, dropout_p=self.p if self.training else 0.0)
        y = (a + b).transpose(1, 2).reshape(B, L, E)
        return x + self.out(y) * self.gain


def _model(**kw) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(Block(**kw), Block(**kw)).eval()


def _snapshot(model: nn.Module) -> dict:
    """Everything about a model that optimize must leave alone."""
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "objects": {k: id(v) for k, v in model.state_dict(keep_vars=True).items()},
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "dtypes": {k: v.dtype for k, v in model.state_dict().items()},
        "training": {k: m.training for k, m in model.named_modules()},
        "modules": [(k, type(m)) for k, m in model.named_modules()],
        "hooks": {k: (list(m._forward_hooks), list(m._forward_pre_hooks)) for k, m in model.named_modules()},
        "forward": {k: m.forward for k, m in model.named_modules()},
    }


def _assert_unchanged(model: nn.Module, before: dict) -> None:
    after = _snapshot(model)
    for key in ("objects", "requires_grad", "dtypes", "training", "modules", "hooks"):
        assert after[key] == before[key], key
    assert {k: getattr(f, "__func__", f) for k, f in after["forward"].items()} == \
        {k: getattr(f, "__func__", f) for k, f in before["forward"].items()}
    for k, t in before["tensors"].items():
        assert torch.equal(after["tensors"][k], t), k


@pytest.fixture(params=["dynamo", "modules"])
def opt(request):
    """``attncomp.optimize`` with each Dynamo-based capture (whole model, and per attention module)."""
    # "dense": the SDPA calls without a mask these models make are replaced too (under "auto" they are kept)
    return lambda model, **kw: attncomp.optimize(model, kw.pop("strategy", "dense"), capture=request.param, **kw)


def _replaced(fast) -> int:
    return len(attncomp.explain(fast).replaced)


def test_optimize_never_changes_the_model(opt):
    model = _model()
    calls = []
    model[0].register_forward_hook(lambda m, i, o: calls.append("hook"))
    x = torch.randn(2, 16, 32)
    ref = model(x)
    before = _snapshot(model)
    fast = opt(model, example_inputs=(x,))
    fast.train()  # the optimized model's own flags
    fast(x)
    fast.eval()
    fast.model[1].register_forward_hook(lambda m, i, o: o * 0)  # a hook on the clone only
    fast.requires_grad_(True)
    _assert_unchanged(model, before)
    assert model.training is False and all(not m.training for m in model.modules())
    calls.clear()
    assert torch.equal(model(x), ref) and calls == ["hook"]  # same outputs, its own hook still runs once


def test_model_hooks_run_in_the_optimized_model(opt):
    model = _model()
    model[0].register_forward_hook(lambda m, i, o: o + 1.0)
    x = torch.randn(2, 16, 32)
    fast = opt(model, example_inputs=(x,))
    assert _replaced(fast) == 4
    assert rel_err(fast(x), model(x)) <= 1e-5


def test_state_dict_round_trip(opt):
    model, other = _model(), _model()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 16, 32)
    fast = opt(copy.deepcopy(model), example_inputs=(x,))
    sd = fast.state_dict()
    assert list(sd) == list(model.state_dict())
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    buf = io.BytesIO()
    torch.save(other.state_dict(), buf)
    buf.seek(0)
    fast.load_state_dict(torch.load(buf))
    assert rel_err(fast(x), other(x)) <= 1e-5
    with pytest.raises(RuntimeError, match="Missing key"):
        fast.load_state_dict({})


def test_deepcopy_is_independent_and_runs(opt):
    model = _model()
    x = torch.randn(2, 16, 32)
    fast = opt(model, example_inputs=(x,))
    twin = copy.deepcopy(fast)
    assert isinstance(twin, attncomp.OptimizedModel)
    assert rel_err(twin(x), model(x)) <= 1e-5
    assert _replaced(twin) == 4
    with torch.no_grad():
        for p in twin.parameters():
            p.zero_()
    assert rel_err(fast(x), model(x)) <= 1e-5  # the original and the first optimized model are unaffected
    assert not torch.equal(twin(x), fast(x))


def test_unused_optimized_model_can_be_deepcopied(opt):
    fast = opt(_model())
    twin = copy.deepcopy(fast)
    x = torch.randn(1, 8, 32)
    assert rel_err(twin(x), fast(x)) <= 1e-5


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "enable_grad"])
def test_grad_modes(mode, opt):
    model = _model()
    x = torch.randn(2, 16, 32)
    fast = opt(model)
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "enable_grad": torch.enable_grad}[mode]
    with ctx():
        out = fast(x)
        ref = model(x)
    assert rel_err(out, ref) <= 1e-5
    assert out.requires_grad == (mode == "enable_grad")
    kernels = [r.kernel for r in attncomp.explain(fast).replaced]
    assert len(kernels) == 4 and all(k.calls["fused"] >= 1 for k in kernels)


def test_autocast_bf16_on_cpu(opt):
    model = _model()
    x = torch.randn(2, 16, 32)
    fast = opt(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fast(x)
        ref = model(x)
    assert out.dtype == ref.dtype
    assert rel_err(out, ref) <= 2e-2
    assert _replaced(fast) == 4


def test_train_eval_switching_honours_dropout(opt):
    model = _model()
    x = torch.randn(2, 16, 32)
    fast = opt(model, example_inputs=(x,))
    eval_out = fast(x)
    fast.train()
    model.train()
    torch.manual_seed(3)
    out_a = fast(x)
    torch.manual_seed(3)
    ref_a = model(x)
    torch.manual_seed(4)
    out_b = fast(x)
    assert rel_err(out_a, ref_a) <= 1e-6  # the same dropout masks as the model, from the same seed
    assert not torch.allclose(out_a, out_b)  # and dropout really is on
    assert rel_err(out_a, eval_out) > 1e-3
    fast.eval()
    model.eval()
    assert torch.equal(fast(x), fast(x))
    assert rel_err(fast(x), eval_out) <= 1e-6 and rel_err(fast(x), model(x)) <= 1e-5
    # training through the optimized model: gradients match the eager model's
    fast.train()
    model.train()
    torch.manual_seed(5)
    g_fast = torch.autograd.grad(fast(x).square().sum(), list(fast.parameters()))
    torch.manual_seed(5)
    g_ref = torch.autograd.grad(model(x).square().sum(), list(model.parameters()))
    assert all(rel_err(a, b) <= 1e-5 for a, b in zip(g_fast, g_ref))


def test_to_dtype(opt):
    """``.to(dtype)`` converts the parameters the optimized model shares with the original (as for any
    module sharing parameters); the optimized model re-plans its sites for the new dtype."""
    model = _model()
    x = torch.randn(2, 16, 32)
    fast = opt(model, example_inputs=(x,))
    ref64 = copy.deepcopy(model).double()
    fast = fast.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in fast.parameters())
    out = fast(x.double())
    assert out.dtype == torch.float64
    assert rel_err(out, ref64(x.double())) <= 1e-12
    assert _replaced(fast) == 4 and all(r.spec.dtype == "float64" for r in attncomp.explain(fast).replaced)
