"""Masks built inside real models are recognised from the graph and run on the block-sparse kernel."""

import os
import sys

import pytest
import torch

import attncomp
from attncomp.strategies.softmax_site import AttentionKernel
from conftest import rel_err

transformers = pytest.importorskip("transformers")


def _kernels(fast) -> list[AttentionKernel]:
    return [r.kernel for r in attncomp.explain(fast).replaced]


def _mistral(impl: str, window: int = 8, layers: int = 2):
    cfg = transformers.MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                     sliding_window=window, attn_implementation=impl)
    return transformers.MistralModel(cfg).eval()


def _padding(kind: str, B: int, L: int):
    if kind == "none":
        return {}
    am = torch.ones(B, L, dtype=torch.long)
    if kind == "right":
        am[1, L - 7:] = 0
    else:  # left padding: with a causal mask, the first rows of batch 1 see no key at all
        am[1, :5] = 0
    return {"attention_mask": am}


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("pad", ["none", "right", "left"])
def test_mistral_sliding_window_is_recognised(impl, pad):
    model = _mistral(impl)
    ids = torch.randint(0, 64, (2, 40))
    kw = _padding(pad, 2, 40)
    ref = model(ids, **kw).last_hidden_state
    # 40 tokens: under "auto" the CPU planner runs such a short window densely (test below); asked for, local
    fast = attncomp.optimize(model, example_inputs=(ids,), example_kwargs=kw, strategy="local")
    out = fast(ids, **kw).last_hidden_state
    report = attncomp.explain(fast)
    assert len(report.replaced) == 2
    for r in report.replaced:
        assert r.strategy == "local"
        assert "window(7,0)" in str(r.spec.mask)
        assert ("key_padding" in str(r.spec.mask)) == (pad != "none")
    assert all(k.calls["fused"] >= 1 and k.calls["literal"] == 0 for k in _kernels(fast))
    assert rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("pad", ["none", "left"])
def test_short_window_runs_dense_on_cpu_and_says_why(pad):
    """40 tokens, a window of 8: the mask leaves one 64x64 tile of one, nothing to skip. ``auto`` proves the
    window and runs the dense kernel on it (materialised once per shape), exact, with the reason."""
    model = _mistral("sdpa")
    ids = torch.randint(0, 64, (2, 40))
    kw = _padding(pad, 2, 40)
    fast = attncomp.optimize(model, example_inputs=(ids,), example_kwargs=kw)
    report = attncomp.explain(fast)
    assert len(report.replaced) == 2, str(report)
    for r in report.replaced:
        assert r.strategy == "dense" and r.plan.variant == "dense" and "window(7,0)" in str(r.spec.mask)
        assert "skips 0% of 64x64 tiles at 40x40" in r.reason and "beats the dense one on cpu" in r.reason
    assert rel_err(fast(ids, **kw).last_hidden_state, model(ids, **kw).last_hidden_state) <= 1e-5


def test_long_sliding_window_reports_skipped_tiles():
    model = _mistral("sdpa", window=64, layers=1)
    ids = torch.randint(0, 64, (1, 512))
    ref = model(ids).last_hidden_state
    fast = attncomp.optimize(model, example_inputs=(ids,))
    (row,) = attncomp.explain(fast).replaced
    assert "window(63,0)" in str(row.spec.mask) and "of 64x64 tiles skipped" in row.reason
    frac = int(row.reason.split("% of 64x64")[0].rsplit(" ", 1)[-1])
    assert frac >= 75  # 8 query tiles see at most 2 key tiles each: 1 - 15/64 of the tiles skipped
    assert "local block-sparse kernel" in str(attncomp.explain(fast))
    assert rel_err(fast(ids).last_hidden_state, ref) <= 1e-5


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_mistral_training_gradients(impl):
    model = _mistral(impl).train()
    ids = torch.randint(0, 64, (2, 40))
    kw = _padding("right", 2, 40)
    fast = attncomp.optimize(model, example_inputs=(ids,), example_kwargs=kw)
    w = torch.randn(2, 40, 32)
    (model(ids, **kw).last_hidden_state * w).sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    (fast(ids, **kw).last_hidden_state * w).sum().backward()
    for n, p in model.named_parameters():
        assert rel_err(p.grad, ref[n]) <= 1e-5, n


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("pad", ["none", "right", "left"])
def test_llama_causal_and_padding(impl, pad):
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                   attn_implementation=impl)
    model = transformers.LlamaModel(cfg).eval()
    ids = torch.randint(0, 64, (2, 24))
    kw = _padding(pad, 2, 24)
    ref = model(ids, **kw).last_hidden_state
    fast = attncomp.optimize(model, example_inputs=(ids,), example_kwargs=kw)
    out = fast(ids, **kw).last_hidden_state
    for r in attncomp.explain(fast).replaced:
        assert "causal" in str(r.spec.mask) and "tensor[" not in str(r.spec.mask)
        assert r.strategy == "dense" and r.plan.variant == ("dense-causal" if pad == "none" else "dense-padding")
    assert rel_err(out.nan_to_num(7.0), ref.nan_to_num(7.0)) <= 1e-5
    assert torch.equal(out.isnan(), ref.isnan())


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_bert_key_padding(impl):
    cfg = transformers.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  vocab_size=64, attn_implementation=impl, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 64, (2, 20))
    kw = _padding("right", 2, 20)
    ref = model(ids, **kw).last_hidden_state
    fast = attncomp.optimize(model, example_inputs=(ids,), example_kwargs=kw)
    rows = attncomp.explain(fast).replaced
    # key padding alone: the dense kernel with the padding as a per-key shift (no L x L mask)
    assert len(rows) == 2 and all(str(r.spec.mask) == "key_padding" and r.plan.variant == "dense-padding"
                                  for r in rows)
    assert rel_err(fast(ids, **kw).last_hidden_state, ref) <= 1e-5


def test_dense_request_materialises_the_proven_mask():
    model = _mistral("eager")
    ids = torch.randint(0, 64, (2, 40))
    kw = _padding("right", 2, 40)
    fast = attncomp.optimize(model, strategy="dense", example_inputs=(ids,), example_kwargs=kw)
    assert all(r.strategy == "dense" for r in attncomp.explain(fast).replaced)
    assert rel_err(fast(ids, **kw).last_hidden_state, model(ids, **kw).last_hidden_state) <= 1e-5


class NeighborhoodSite(torch.nn.Module):
    """2-D neighborhood attention written by hand: a 7x7 window on a 16x16 grid, clamped inside the
    grid (NATTEN's border rule), as a bool mask built from arange in ``forward``."""

    def forward(self, q, k, v):
        L, W, r = q.shape[-2], 16, 3
        i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
        ci, cj = (i // W).clamp(r, L // W - 1 - r), (i % W).clamp(r, W - 1 - r)
        mask = ((j // W - ci).abs() <= r) & ((j % W - cj).abs() <= r)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_handwritten_neighborhood_is_recognised():
    q, k, v = (torch.randn(2, 2, 256, 16) for _ in range(3))
    site = NeighborhoodSite()
    fast = attncomp.optimize(site, example_inputs=(q, k, v), strategy="local")  # 256 keys: auto runs it dense
    (row,) = attncomp.explain(fast).replaced
    assert str(row.spec.mask) == "neighborhood(16x16,k=7x7)" and row.strategy == "local"
    assert rel_err(fast(q, k, v), site(q, k, v)) <= 1e-5


def test_a_failing_kernel_falls_back_and_warns_once(monkeypatch):
    """A fused kernel that raises (e.g. fails to compile) leaves the site on its exact eager
    computation: one warning, the reason in explain, outputs still equal eager."""
    model = _mistral("sdpa")
    ids = torch.randint(0, 64, (2, 40))
    fast = attncomp.optimize(model, example_inputs=(ids,), strategy="local")

    def broken(*args, **kwargs):
        raise RuntimeError("simulated compile failure")

    monkeypatch.setattr(torch.ops.attncomp, "sparse_fwd", broken)
    with pytest.warns(UserWarning, match="simulated compile failure") as caught:
        out = fast(ids).last_hidden_state
        out2 = fast(ids).last_hidden_state
    assert sum("simulated compile failure" in str(w.message) for w in caught) == 2  # one per site, once each
    ref = model(ids).last_hidden_state
    assert rel_err(out, ref) <= 1e-6 and torch.equal(out, out2)
    assert all("the fused kernel failed" in r.kernel.fallback_reason for r in attncomp.explain(fast).replaced)
    assert "runs eager at call time" in str(attncomp.explain(fast))


def test_gqa_sdpa_training_dropout_runs_the_literal_site():
    """Training with attention dropout runs each site's own eager SDPA call (k, v repeated back for the
    folded GQA), with the same random stream as the original model."""
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64, attn_implementation="sdpa",
                                   attention_dropout=0.2)
    model = transformers.LlamaModel(cfg).train()
    ids = torch.randint(0, 64, (2, 24))
    fast = attncomp.optimize(model, example_inputs=(ids,))
    torch.manual_seed(1)
    out = fast(ids).last_hidden_state
    torch.manual_seed(1)
    ref = model(ids).last_hidden_state
    assert all(k.calls["literal"] >= 1 for k in _kernels(fast))
    assert rel_err(out, ref) <= 1e-6



def _quickstart():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.path.insert(0, os.path.join(root, "examples"))
    import quickstart

    return quickstart


QUICKSTART_CASES = {  # model (smaller than the demo's), its inputs, the mask it must be proved to have
    "sliding-window": (lambda q: q.SlidingWindowLM(window=64), lambda: (torch.randint(0, 1000, (1, 512)),),
                       "window(63,0)"),
    "neighborhood": (lambda q: q.NeighborhoodViT(kernel=7), lambda: (torch.randn(1, 3, 128, 128),),
                     "neighborhood(32x32,k=7x7)"),
}


@pytest.mark.parametrize("case", QUICKSTART_CASES)
def test_quickstart_models_are_recognised(case):
    """The demo's (``make demo``) hand-written models: their masks, built in ``forward``, are proved a
    window / a 2-D neighbourhood and run on the local kernel, with eager's results."""
    make, make_inputs, mask = QUICKSTART_CASES[case]
    model, inputs = make(_quickstart()).eval(), make_inputs()
    with torch.no_grad():
        fast = attncomp.optimize(model, example_inputs=inputs)
        report = attncomp.explain(fast)
        assert len(report.replaced) == 2 and not report.left, str(report)
        assert all(r.strategy == "local" and str(r.spec.mask) == mask for r in report.replaced), str(report)
        assert all(k.calls["fused"] >= 1 for k in _kernels(fast))
        assert rel_err(fast(*inputs), model(*inputs)) <= 1e-5
