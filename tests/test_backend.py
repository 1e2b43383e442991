"""``torch.compile(model, backend="attncomp")`` by name: outputs match eager, no graph breaks, and
after Dynamo's automatic-dynamic recompile new sizes within a shape bucket recompile nothing."""

import pytest
import torch
from torch._dynamo.utils import counters

import attncomp
from attncomp import backend
from attncomp.runtime import autotune, codegen
from conftest import rel_err

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")


@pytest.fixture
def triton_tuned(tmp_path, monkeypatch):
    """Sites run the generated Triton kernels (interpreter) with autotuning on, cache in tmp."""
    monkeypatch.setenv("ATTNCOMP_AUTOTUNE", "1")
    monkeypatch.setenv("ATTNCOMP_AUTOTUNE_CACHE", str(tmp_path / "autotune.json"))
    monkeypatch.setenv("ATTNCOMP_AUTOTUNE_REPS", "1")
    monkeypatch.setenv("ATTNCOMP_AUTOTUNE_QUIET", "1")
    autotune.reset()
    attncomp.set_kernels("triton")
    yield
    attncomp.set_kernels(None)
    autotune.reset()


def _gpt2():
    from transformers import GPT2Config, GPT2Model

    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=128, attn_pdrop=0.0,
                     resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    return GPT2Model(cfg).eval()


def _vit():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=4, depth=2, img_size=64).eval()


def _counts() -> dict:
    """Dynamo graphs compiled, graphs attncomp rewrote, kernel modules imported, kernels tuned."""
    return {"dynamo": counters["stats"]["unique_graphs"], "rewritten": backend.STATS["graphs"],
            "kernel_modules": codegen.STATS["import"], "tuned": autotune.STATS["tuned"]}


def _run_lengths(compiled, model, make, sizes, warm=2):
    """Run ``sizes``; the first ``warm`` may compile (static, then automatic-dynamic), the rest
    (one shape bucket) must not: returns the counters after the warm-up and at the end."""
    breaks = sum(counters["graph_break"].values())
    after_warm = None
    with torch.no_grad():
        for i, n in enumerate(sizes):
            if i == warm:
                after_warm = _counts()
            x = make(n)
            out, ref = compiled(x), model(x)
            out, ref = (getattr(o, "last_hidden_state", o) for o in (out, ref))
            assert rel_err(out, ref) <= 1e-5, n
    assert sum(counters["graph_break"].values()) == breaks  # the backend introduces no graph break
    return after_warm, _counts()


def _ids(n):
    return torch.randint(0, 64, (1, n))


def test_gpt2_by_name_inductor_dynamic_lengths(triton_tuned):
    model = _gpt2()
    compiled = torch.compile(model, backend="attncomp")  # inner compiler: Inductor
    warm, end = _run_lengths(compiled, model, _ids, [20, 24, 27, 30, 32])
    assert warm["rewritten"] >= 2 and warm["tuned"] >= 1
    assert end == warm, (warm, end)  # no Dynamo recompile, no rewrite, no kernel module, no tuning


def test_gpt2_by_name_eager_inner(triton_tuned):
    model = _gpt2()
    compiled = torch.compile(model, backend="attncomp", options={"inner": "eager"})
    warm, end = _run_lengths(compiled, model, _ids, [40, 36, 48, 50, 64, 33])
    assert end == warm, (warm, end)


def test_vit_by_name_batches(triton_tuned):
    model = _vit()
    compiled = torch.compile(model, backend="attncomp", options={"inner": "eager", "strategy": "dense"})
    # ViT's L is fixed (17 tokens): vary the batch. B*H = 9 and 12 share the bucket BH=16.
    warm, end = _run_lengths(compiled, model, lambda b: torch.randn(b, 3, 64, 64), [1, 2, 3, 4])
    assert end["dynamo"] == warm["dynamo"] and end["rewritten"] == warm["rewritten"]
    assert end["kernel_modules"] == warm["kernel_modules"]
    assert end["tuned"] == warm["tuned"] + 1  # B=3 opens bucket BH=16; B=4 reuses it


@pytest.mark.slow
def test_vit_by_name_inductor():
    model = _vit()
    compiled = torch.compile(model, backend="attncomp")
    warm, end = _run_lengths(compiled, model, lambda b: torch.randn(b, 3, 64, 64), [1, 2, 3, 4])
    assert end["dynamo"] == warm["dynamo"] and end["rewritten"] == warm["rewritten"]


def test_sites_are_rewritten_in_compiled_graph():
    seen = []

    def inner(gm, example_inputs):
        seen.append([n.target for n in gm.graph.nodes if n.op == "call_module"])
        return gm.forward

    compiled = torch.compile(_gpt2(), backend="attncomp", options={"inner": inner})
    with torch.no_grad():
        compiled(_ids(16))
    assert sum(t.startswith("attncomp_site_") for t in seen[0]) == 2


def test_options_are_checked():
    # Dynamo wraps a backend's exception in BackendCompilerFailed; the message names the problem.
    failed = torch._dynamo.exc.BackendCompilerFailed
    with pytest.raises(failed, match="unknown inner compiler 'nope'"):
        torch.compile(_gpt2(), backend="attncomp", options={"inner": "nope"})(_ids(8))
    with pytest.raises(failed, match="unknown strategy 'fastest'"):
        torch.compile(_gpt2(), backend="attncomp", options={"strategy": "fastest"})(_ids(8))
    with pytest.raises(ValueError, match="would rewrite the graph twice"):
        backend.AttncompBackend(inner="attncomp")


def test_optimize_uses_the_backend_with_eager_inner():
    fast = attncomp.optimize(_gpt2(), example_inputs=(_ids(16),))
    assert isinstance(fast.backend, backend.AttncompBackend) and fast.backend.inner == "eager"
    assert len(attncomp.explain(fast).replaced) == 2
