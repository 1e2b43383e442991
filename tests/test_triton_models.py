"""`attncomp.optimize` with the interpreter switch: every site runs generated Triton code."""

import pytest
import torch

import attncomp
from attncomp.strategies.dense import launcher as triton_dense
from conftest import rel_err

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")


@pytest.fixture
def triton_calls(monkeypatch):
    """Count launches of the generated forward kernels (and run Triton on CPU meanwhile)."""
    calls = []
    real = triton_dense.dense_fwd

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(triton_dense, "dense_fwd", counting)
    attncomp.set_kernels("triton")
    yield calls
    attncomp.set_kernels(None)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_gpt2_sites_run_generated_triton(triton_calls, impl):
    from transformers import GPT2Config, GPT2Model

    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=32, attn_pdrop=0.0,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_implementation=impl)
    model = GPT2Model(cfg).eval()
    ids = torch.randint(0, 64, (1, 24))
    ref = model(ids).last_hidden_state
    fast = attncomp.optimize(model, "dense", example_inputs=(ids,))  # sdpa: is_causal SDPA calls, asked for
    triton_calls.clear()
    out = fast(ids).last_hidden_state
    assert len(attncomp.explain(fast).replaced) == 2
    assert len(triton_calls) == 2
    assert rel_err(out, ref) <= 1e-5


def test_vit_sites_run_generated_triton(triton_calls):
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=4, depth=2,
                              img_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    ref = model(x)
    fast = attncomp.optimize(model, "dense", example_inputs=(x,))  # SDPA calls without a mask, asked for
    triton_calls.clear()
    out = fast(x)
    assert len(triton_calls) == 2
    assert rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("pad", [False, True])
def test_mistral_window_runs_generated_sparse_triton(monkeypatch, pad):
    """A sliding-window model's sites launch the generated block-sparse kernels, forward and backward."""
    from attncomp.strategies.sparse import launcher as triton_sparse

    calls = []
    for name in ("sparse_fwd", "sparse_bwd"):
        real = getattr(triton_sparse, name)
        monkeypatch.setattr(triton_sparse, name,
                            lambda *a, _real=real, _n=name, **kw: calls.append(_n) or _real(*a, **kw))
    attncomp.set_kernels("triton")
    try:
        cfg = transformers.MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                         sliding_window=8, attn_implementation="sdpa")
        model = transformers.MistralModel(cfg).train()
        ids = torch.randint(0, 64, (2, 40))
        kw = {}
        if pad:
            kw["attention_mask"] = torch.ones(2, 40, dtype=torch.long)
            kw["attention_mask"][1, 31:] = 0
        ref = model(ids, **kw).last_hidden_state
        fast = attncomp.optimize(model, example_inputs=(ids,), example_kwargs=kw, strategy="local")
        calls.clear()
        out = fast(ids, **kw).last_hidden_state
        assert calls == ["sparse_fwd"] * 2
        assert rel_err(out, ref) <= 1e-5
        w = torch.randn_like(out)
        grads = torch.autograd.grad((out * w).sum(), list(model.parameters()))
        refg = torch.autograd.grad((ref * w).sum(), list(model.parameters()))
        assert calls.count("sparse_bwd") == 2
        assert max(rel_err(a, b) for a, b in zip(grads, refg) if b.norm() > 0) <= 1e-5
    finally:
        attncomp.set_kernels(None)
