"""``attncomp.optimize(hf_model)`` works where the model does: ``generate`` (through attncomp's compiled
forward), ``config``, ``device``, ``save_pretrained``…"""

import inspect
import json

import pytest
import torch
from models import batch, causal_lm, with_impl

import attncomp
from attncomp.strategies.decode.plan import DECODE_MIN_KEYS
from conftest import rel_err

transformers = pytest.importorskip("transformers")

NEW = 20
# Dynamo graphs over a 20-token greedy generation with DynamicCache (measured: 3 — the prefill, the first
# decode step, then one graph with a dynamic cache length for every later step)
GRAPH_BOUND = 4


def _generate(model, ids, mask, **kw):
    return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, **kw)


def _assert_through_attncomp(fast, layers: int):
    rep = attncomp.explain(fast)
    assert len(rep.replaced) == layers, str(rep)
    assert all(r.kernel.calls["fused"] >= 1 for r in rep.replaced), str(rep)
    return rep


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_greedy_matches_and_recompiles_are_bounded(kind):
    ref = causal_lm(kind)
    fast = attncomp.optimize(ref)
    ids, mask = batch(side="left")
    out = _generate(fast, ids, mask, do_sample=False)
    assert torch.equal(out, _generate(ref, ids, mask, do_sample=False))
    assert out.shape == (2, ids.shape[1] + NEW)
    rep = _assert_through_attncomp(fast, ref.config.num_hidden_layers)
    assert 2 <= rep.graphs <= GRAPH_BOUND, f"{rep.graphs} Dynamo graphs over {NEW} tokens"
    assert rep.graph_breaks == 0


def test_unpadded_decode_steps_run_the_split_kv_variant():
    # an sdpa model's decode step is one SDPA call with no mask; with the cache past DECODE_MIN_KEYS the
    # planner picks the decode kernel, also in the graph traced with a dynamic cache length (where the
    # keys and values are two cache tensors whose lengths are separate symbols)
    ref = with_impl(causal_lm("llama"), "sdpa")
    fast = attncomp.optimize(ref)
    ids, mask = batch(L=DECODE_MIN_KEYS + 4, pad=0)
    out = _generate(fast, ids, mask, do_sample=False)
    assert torch.equal(out, _generate(ref, ids, mask, do_sample=False))
    rep = _assert_through_attncomp(fast, ref.config.num_hidden_layers)
    assert rep.dynamic_graphs == 1, str(rep)  # rows show the newest graph: the dynamic decode steps
    assert {(r.plan.variant, r.plan.reduction) for r in rep.replaced} == {("decode", "split_kv")}, str(rep)
    assert all(r.kernel.calls["fused"] >= NEW - 3 for r in rep.replaced), str(rep)


def test_sampling_with_a_seed_matches():
    ref = causal_lm("llama")
    fast = attncomp.optimize(ref)
    ids, mask = batch(side="left")
    outs = []
    for m in (ref, fast):
        torch.manual_seed(123)
        outs.append(_generate(m, ids, mask, do_sample=True, top_k=20, temperature=1.5))
    assert torch.equal(outs[1], outs[0])
    _assert_through_attncomp(fast, 2)


def test_beam_search_matches():
    ref = causal_lm("gpt2")
    fast = attncomp.optimize(ref)
    ids, mask = batch(side="left")
    a = ref.generate(ids, attention_mask=mask, max_new_tokens=8, num_beams=3, do_sample=False)
    b = fast.generate(ids, attention_mask=mask, max_new_tokens=8, num_beams=3, do_sample=False)
    assert torch.equal(b, a)
    _assert_through_attncomp(fast, 2)


def test_static_cache():
    ref = causal_lm("llama")
    fast = attncomp.optimize(ref)
    ids, mask = batch(side="left")
    out = _generate(fast, ids, mask, do_sample=False, cache_implementation="static")
    assert torch.equal(out, _generate(ref, ids, mask, do_sample=False, cache_implementation="static"))
    rep = _assert_through_attncomp(fast, 2)
    assert rep.graphs <= GRAPH_BOUND, f"{rep.graphs} Dynamo graphs over {NEW} tokens (StaticCache)"


def test_sliding_window_model_past_its_window():
    ref = causal_lm("mistral")  # window 8 < prompt 20 + 20 new tokens
    fast = attncomp.optimize(ref)
    ids, mask = batch(side="left")
    assert torch.equal(_generate(fast, ids, mask, do_sample=False), _generate(ref, ids, mask, do_sample=False))
    _assert_through_attncomp(fast, 2)


def test_attributes_reach_the_model(tmp_path):
    ref = causal_lm("llama")
    fast = attncomp.optimize(ref)
    assert fast.config is ref.config and fast.generation_config is ref.generation_config
    assert fast.device == ref.device and fast.dtype == ref.dtype
    assert fast.get_input_embeddings().weight is ref.get_input_embeddings().weight
    assert isinstance(fast.generate.__self__, transformers.LlamaForCausalLM)
    # generate reads the forward's parameters
    assert "attention_mask" in inspect.signature(fast.generate.__self__.forward).parameters
    with pytest.raises(AttributeError, match="OptimizedModel' object and the LlamaForCausalLM it wraps have no "
                                             "attribute 'no_such_thing'"):
        fast.no_such_thing  # noqa: B018
    # the wrapper's own names come first
    assert isinstance(fast.model, transformers.LlamaForCausalLM) and callable(fast.records.__iter__)

    fast.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids, mask = batch()
    with torch.no_grad():
        assert rel_err(back(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits) == 0


def test_view_shares_state_with_the_optimized_model():
    ref = causal_lm("llama")
    fast = attncomp.optimize(ref)
    view = fast.generate.__self__
    fast.train()
    assert view.training and view.model.layers[0].training and not ref.training
    fast.eval()
    assert not view.training
    ids, mask = batch()
    with torch.no_grad():  # calling the view is calling the optimized model
        out = view(ids, attention_mask=mask).logits
    assert attncomp.explain(fast).graphs == 1
    assert rel_err(out, ref(ids, attention_mask=mask).logits) <= 1e-5


def test_attncomp_implementation_generates_with_static_and_sliding_caches():
    for kind in ("llama", "mistral"):
        ref = causal_lm(kind)
        fast = with_impl(ref, "attncomp")
        ids, mask = batch(side="left")
        for cache in (None, "static"):
            kw = dict(do_sample=False, cache_implementation=cache)
            assert torch.equal(_generate(fast, ids, mask, **kw), _generate(ref, ids, mask, **kw)), (kind, cache)
