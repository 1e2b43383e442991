"""Many optimized models in one process: Dynamo's per-code-object state is managed per model.

Every ``optimize`` of one model class traces the same ``forward`` code: without care the 9th one
replaces nothing (Dynamo's recompile limit), and one model's shapes make the next one's
dimensions dynamic (a window-partitioned model then spends its capture in symbolic reshape
arithmetic). Also: which dimensions are dynamic is decided per optimized model, and a capture past
its time budget is abandoned.
"""

from __future__ import annotations

import time
import warnings

import pytest
import torch
from torch import nn

import attncomp
from attncomp.frontend import budget, dynamic
from conftest import rel_err, tiny_gpt2


class SelfAttention(nn.Module):
    """Multi-head self-attention on ``x`` (B, L, D) float32, written out (matmul, softmax, matmul);
    ``slow`` extra element-wise steps before it make Dynamo's trace long (for the budget)."""

    def __init__(self, d: int = 32, heads: int = 4, slow: int = 0):
        super().__init__()
        self.h, self.slow = heads, slow
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        for _ in range(self.slow):
            x = x * 1.0001 + 0.0001
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.h, D // self.h).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-1, -2) * (D // self.h) ** -0.5).softmax(-1)
        return self.o((a @ v).transpose(1, 2).reshape(B, L, D))


class WindowAttention(nn.Module):
    """Swin-style attention in ``ws``×``ws`` windows of ``x`` (B, H, W, C), with a learned bias."""

    def __init__(self, dim: int, heads: int = 2, ws: int = 4):
        super().__init__()
        self.h, self.ws = heads, ws
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.bias = nn.Parameter(torch.randn(heads, ws * ws, ws * ws) * 0.1)

    def forward(self, x):
        B, H, W, C = x.shape
        ws = self.ws
        x = x.view(B, H // ws, ws, W // ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, C)
        N = x.shape[1]
        q, k, v = self.qkv(x).reshape(-1, N, 3, self.h, C // self.h).permute(2, 0, 3, 1, 4)
        a = (q * (C // self.h) ** -0.5) @ k.transpose(-2, -1) + self.bias
        x = (a.softmax(-1) @ v).transpose(1, 2).reshape(-1, N, C)
        x = self.proj(x).view(B, H // ws, W // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(B, H, W, C)


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm, self.attn, self.mlp = nn.LayerNorm(dim), WindowAttention(dim), nn.Linear(dim, dim)

    def forward(self, x):
        x = x + self.attn(self.norm(x))
        return x + self.mlp(x)


class Merge(nn.Module):
    """Patch merging: (B, H, W, C) → (B, H/2, W/2, 2C)."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduce = nn.Linear(4 * dim, 2 * dim)

    def forward(self, x):
        B, H, W, C = x.shape
        return self.reduce(x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3))


class WindowNet(nn.Module):
    """A small Swin-like vision model: 3 stages of 2 window-attention blocks, image (B, 3, S, S)."""

    def __init__(self, dim: int = 16, depth: int = 2, stages: int = 3):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 2, 2)
        layers: list[nn.Module] = []
        for i in range(stages):
            layers += [Block(dim * 2 ** i) for _ in range(depth)]
            if i < stages - 1:
                layers.append(Merge(dim * 2 ** i))
        self.layers = nn.Sequential(*layers)

    def forward(self, img):
        return self.layers(self.embed(img).permute(0, 2, 3, 1)).mean((1, 2))


def _optimize_timed(model, x, **kw):
    t0 = time.perf_counter()
    with torch.no_grad():
        fast = attncomp.optimize(model, example_inputs=(x,), **kw)
    return fast, time.perf_counter() - t0


# -- 1. many optimize calls of one class ---------------------------------------------------------

@pytest.mark.parametrize("capture", ["dynamo", "modules"])
def test_twenty_optimize_calls_of_one_class_each_replace_their_sites(capture):
    x = torch.randn(2, 16, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no recompile-limit (or any other) warning either
        for i in range(20):
            model = SelfAttention().eval()
            with torch.no_grad():
                fast = attncomp.optimize(model, example_inputs=(x,), capture=capture)
                out = fast(x)
                assert rel_err(out, model(x)) < 1e-5
            report = attncomp.explain(fast)
            assert len(report.replaced) == 1 and not report.left, f"optimize #{i + 1}:\n{report}"
            assert report.replaced[0].kernel.calls["fused"] >= 1, f"optimize #{i + 1}: the kernel never ran"
            assert not any("recompile limit" in n for n in report.notes)


def test_twenty_optimize_calls_where_torch_has_no_isolate_recompiles(monkeypatch):
    """torch releases without ``torch.compile(isolate_recompiles=...)``: the recompile limit is raised
    around each call by the graphs other optimized models left on the shared code."""
    monkeypatch.setattr(dynamic, "ISOLATES", False)
    assert "isolate_recompiles" not in dynamic.compile_options()
    x = torch.randn(2, 16, 32)
    for i in range(20):
        with torch.no_grad():
            fast = attncomp.optimize(SelfAttention().eval(), example_inputs=(x,))
        report = attncomp.explain(fast)
        assert len(report.replaced) == 1 and report.replaced[0].kernel.calls["fused"] >= 1, f"#{i + 1}:\n{report}"


class Offset(SelfAttention):
    """Self-attention plus a Python int ``n`` that Dynamo specialises on: a new graph per value."""

    def forward(self, x, n: int):
        return super().forward(x) + n


def test_a_model_that_recompiles_every_call_warns_once_and_explain_says_so():
    """A limit still reached (a new ``n`` on every call, the limit lowered to 3 to be quick):
    exactly one warning, and a note in explain; the outputs stay right (eager past the limit)."""
    model = Offset().eval()
    fast = attncomp.optimize(model)
    x = torch.randn(2, 16, 32)
    with (warnings.catch_warnings(record=True) as caught, torch.no_grad(),
          torch._dynamo.config.patch(**{dynamic.limit_name(): 3})):
        warnings.simplefilter("always")
        for n in range(6):
            assert rel_err(fast(x, n), model(x, n)) < 1e-5
    mine = [w for w in caught if "recompile limit" in str(w.message)]
    assert len(mine) == 1, [str(w.message) for w in caught]
    report = attncomp.explain(fast)
    assert report.graphs == 3 and any("recompile limit" in n for n in report.notes), report


# -- 2. attncomp decides which dims are dynamic ----------------------------------------------------

@pytest.mark.parametrize("capture", ["dynamo", "modules"])
def test_a_text_model_at_three_lengths_compiles_a_static_then_one_dynamic_graph(capture):
    model = SelfAttention().eval()
    fast = attncomp.optimize(model, capture=capture)
    with torch.no_grad():
        for L in (16, 24, 40, 56):
            x = torch.randn(2, L, 32)
            assert rel_err(fast(x), model(x)) < 1e-5
            if L == 16 and capture == "dynamo":
                assert attncomp.explain(fast).graphs == 1
    report = attncomp.explain(fast)
    # dynamo: static at 16, dynamic from 24 on; modules: the first call runs eagerly (it finds the
    # owners, noting their input shapes), so 24 is already a second length: dynamic from 24 on
    assert report.graphs == (2 if capture == "dynamo" else 1) and report.dynamic_graphs == 1, report
    if capture == "dynamo":
        assert any("args[0] dims [1]" in n for n in report.notes), report.notes
    assert not hasattr(x, "_dynamo_weak_dynamic_indices"), "the dynamic mark leaked onto the caller's tensor"


def test_a_kv_cache_object_grows_dynamic_after_its_second_length():
    """Decoding with transformers' cache object (tensors in a list of layer objects): its length is
    found and marked, so the steps after the second reuse one dynamic graph (no recompile limit)."""
    transformers = pytest.importorskip("transformers")
    lm = transformers.GPT2LMHeadModel(tiny_gpt2(use_cache=True).config).eval()
    fast = attncomp.optimize(lm)
    ids = torch.randint(0, 128, (1, 8))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")
        past, cur, steps = None, ids, []
        for _ in range(10):
            out = fast(cur, past_key_values=past, use_cache=True)
            past, cur = out.past_key_values, out.logits[:, -1:].argmax(-1)
            steps.append(cur)
        ref = lm.generate(ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(torch.cat([ids, *steps], 1), ref)
    report = attncomp.explain(fast)
    assert report.graphs == 3 and report.dynamic_graphs == 1, report  # prefill, step 1, then dynamic
    assert any("past_key_values" in n for n in report.notes), report.notes


@pytest.mark.parametrize("capture", ["dynamo", "modules"])
def test_two_models_of_one_class_at_different_shapes_stay_static(capture):
    a, b = SelfAttention().eval(), SelfAttention().eval()
    with torch.no_grad():
        fa = attncomp.optimize(a, example_inputs=(torch.randn(2, 16, 32),), capture=capture)
        fb = attncomp.optimize(b, example_inputs=(torch.randn(2, 24, 32),), capture=capture)
        fa(torch.randn(2, 16, 32))
        fb(torch.randn(2, 24, 32))
    for fast in (fa, fb):
        report = attncomp.explain(fast)
        assert report.graphs == 1 and report.dynamic_graphs == 0, report
        assert not any("dynamic input" in n for n in report.notes)


def test_two_window_models_of_one_family_capture_as_fast_as_alone():
    """The same module classes at another image size, optimized second: as fast as alone (Dynamo's
    per-code automatic dynamic made it symbolic and ~10x slower)."""
    small = torch.randn(1, 3, 32, 32)
    _optimize_timed(WindowNet().eval(), small)  # Dynamo's one-time start-up, untimed
    torch._dynamo.reset()
    _, alone = _optimize_timed(WindowNet().eval(), small)
    torch._dynamo.reset()
    _optimize_timed(WindowNet().eval(), torch.randn(1, 3, 64, 64))
    model = WindowNet().eval()
    fast, second = _optimize_timed(model, small)
    assert second < 3 * alone + 0.5, f"second capture {second:.2f} s, alone {alone:.2f} s"
    report = attncomp.explain(fast)
    assert report.graphs == 1 and report.dynamic_graphs == 0 and len(report.replaced) == 6, report
    with torch.no_grad():
        assert rel_err(fast(small), model(small)) < 1e-5


# -- 3. the capture time budget ----------------------------------------------------------------

@pytest.mark.parametrize("capture", ["dynamo", "modules"])
def test_a_capture_past_its_budget_runs_eagerly_with_one_warning(capture):
    model = SelfAttention(slow=400).eval()  # Dynamo traces 800 element-wise ops: well over 0.05 s
    x = torch.randn(2, 16, 32)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        fast = attncomp.optimize(model, example_inputs=(x,), capture=capture, capture_budget=0.05)
        outs = [fast(x), fast(x)]
    mine = [w for w in caught if "capture budget" in str(w.message)]
    assert len(mine) == 1, [str(w.message) for w in caught]
    report = attncomp.explain(fast)
    assert report.abandoned is not None and "capture budget of 0.05 s" in report.abandoned
    assert report.abandoned in str(report) and not report.replaced
    with torch.no_grad():
        ref = model(x)
    for out in outs:
        assert torch.equal(out, ref)


def test_the_budget_stops_dynamo_inside_a_long_trace():
    """The trace is interrupted, not waited for: a model whose trace takes seconds returns in a
    fraction of that (then a model optimized next in the process captures normally)."""
    model, x = SelfAttention(slow=1500).eval(), torch.randn(2, 16, 32)
    torch.compile(SelfAttention(), backend="eager")(x)  # Dynamo's one-time start-up, untimed
    torch._dynamo.reset()
    t0 = time.perf_counter()
    torch.compile(model, backend="eager")(x)
    full = time.perf_counter() - t0
    torch._dynamo.reset()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        fast, took = _optimize_timed(model, x, capture_budget=0.2)
    assert fast._abandoned is not None
    assert took < max(0.5 * full, 1.0), f"abandoned after {took:.2f} s; the full trace takes {full:.2f} s"
    nxt, _ = _optimize_timed(SelfAttention().eval(), x)
    assert len(attncomp.explain(nxt).replaced) == 1


def test_budget_from_the_environment(monkeypatch):
    monkeypatch.setenv(budget.ENV, "7.5")
    assert attncomp.optimize(SelfAttention()).capture_budget == 7.5
    monkeypatch.setenv(budget.ENV, "inf")
    assert attncomp.optimize(SelfAttention()).capture_budget == float("inf")
    monkeypatch.delenv(budget.ENV)
    assert attncomp.optimize(SelfAttention()).capture_budget == budget.DEFAULT_S
    for bad in (0, -1, "soon", True):
        with pytest.raises(ValueError, match="capture_budget"):
            attncomp.optimize(SelfAttention(), capture_budget=bad)
    monkeypatch.setenv(budget.ENV, "soon")
    with pytest.raises(ValueError, match=budget.ENV):
        attncomp.optimize(SelfAttention())
