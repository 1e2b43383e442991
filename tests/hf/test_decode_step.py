"""attn_implementation="attncomp" decode steps on the split-KV decode op (``attncomp::decode_fwd``) where it
is exact (no key padding, no grad), on ``attncomp::dense_fwd`` elsewhere; tokens equal eager's."""

import pytest
import torch
from models import AttncompCalls, batch, causal_lm, with_impl

from attncomp.hf.attention import decode_range, decode_step
from attncomp.hf.masks import AttncompMask, Band
from conftest import rel_err

transformers = pytest.importorskip("transformers")

NEW = 16


def _generate(model, ids, mask, cache):
    return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                          cache_implementation=cache)


@pytest.mark.parametrize("cache", [None, "static"])
@pytest.mark.parametrize("kind", ["llama", "mistral", "gemma2"])  # full, sliding window 8, soft-cap + alternating
def test_unpadded_greedy_decode_runs_the_decode_op(kind, cache):
    ref = causal_lm(kind)
    fast = with_impl(ref, "attncomp")
    ids, mask = batch(B=2, L=20, pad=0)  # prompt 20 + 16 new tokens: past mistral's and gemma2's window of 8
    ops = AttncompCalls()
    with ops:
        got = _generate(fast, ids, mask, cache)
    assert torch.equal(got, _generate(ref, ids, mask, cache))
    layers = ref.config.num_hidden_layers
    # every decode step of every layer (NEW - 1 steps after the prefill) on the decode op, none on dense
    assert ops.count("decode_fwd") == layers * (NEW - 1), ops.calls
    assert ops.count("dense_fwd", Lq=1) == 0, ops.calls


@pytest.mark.parametrize("kind", ["llama", "mistral", "gemma2"])
def test_padded_batch_keeps_the_dense_decode(kind):
    ref = causal_lm(kind)
    fast = with_impl(ref, "attncomp")
    ids, mask = batch(B=2, L=20, pad=5, side="left")
    ops = AttncompCalls()
    with ops:
        got = _generate(fast, ids, mask, None)
    assert torch.equal(got, _generate(ref, ids, mask, None))
    assert ops.count("decode_fwd") == 0, ops.calls  # key padding: the decode op has no per-key mask
    assert ops.count("dense_fwd", Lq=1) > 0 or ops.count("masked_attention") > 0, ops.calls


def test_a_decode_step_with_grad_stays_differentiable():
    ref = causal_lm("llama").train()
    fast = with_impl(ref, "attncomp").train()
    ids, _ = batch(B=2, L=12, pad=0)
    grads = []
    for m in (ref, fast):
        with torch.no_grad():
            past = m(ids[:, :-1], use_cache=True).past_key_values
        ops = AttncompCalls()
        with ops:
            logits = m(ids[:, -1:], past_key_values=past, use_cache=True).logits
            logits.square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
        assert ops.count("decode_fwd") == 0, ops.calls  # forward-only op: the dense op's autograd runs
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert rel_err(grads[1][name], g) <= 1e-4, name


def _mask(band: Band, q_offset: int, kv_offset: int, Lk: int, B: int = 2) -> AttncompMask:
    return AttncompMask(band, q_offset, kv_offset, None, None, B, 1, Lk, torch.device("cpu"))


# (band, q_offset, kv_offset, Lk) -> (kv_len, window_left) of the decode op, or None (no visible key)
RANGES = [
    ((None, 0), 11, 0, 12, (12, None)),  # causal, DynamicCache: every key
    ((None, 0), 11, 0, 32, (12, None)),  # causal, StaticCache: the slots past the query are not written yet
    ((7, 0), 30, 0, 31, (31, 7)),  # sliding window of 8 over the full cache
    ((7, 0), 30, 23, 8, (8, 7)),  # sliding-window cache: the last keys of the window, shifted by kv_offset
    ((7, 0), 3, 0, 16, (4, 7)),  # window longer than the past: the op clips it at key 0
    ((None, None), 5, 0, 9, (9, None)),  # bidirectional: every key, no causal cut
    ((2, 2), 5, 0, 16, (8, 4)),  # bidirectional window of 2 either side
    ((None, 0), 0, 4, 8, None),  # the query sits before every key
    ((1, None), 12, 0, 8, None),  # the window starts past the last key
]


@pytest.mark.parametrize("band, q_offset, kv_offset, Lk, want", RANGES,
                         ids=[f"band{r[0]}-qo{r[1]}-ko{r[2]}-Lk{r[3]}" for r in RANGES])
def test_decode_range_matches_the_band(band, q_offset, kv_offset, Lk, want):
    m = _mask(Band(*band), q_offset, kv_offset, Lk)
    assert decode_range(m, Lk) == want
    row = m.band.row(m.delta, Lk, "cpu")
    if want is None:
        assert not row.any()
    else:
        kv_len, left = want
        j = torch.arange(Lk)
        assert torch.equal(row, (j < kv_len) & (j >= (0 if left is None else kv_len - 1 - left)))


@pytest.mark.parametrize("softcap", [0.0, 2.0])
@pytest.mark.parametrize("band, q_offset, kv_offset, Lk, want", RANGES,
                         ids=[f"band{r[0]}-qo{r[1]}-ko{r[2]}-Lk{r[3]}" for r in RANGES])
def test_decode_step_matches_a_float64_reference(band, q_offset, kv_offset, Lk, want, softcap):
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, D = 2, 6, 2, 16
    q = torch.randn(B, Hq, 1, D, generator=g)
    k, v = (torch.randn(B, Hkv, Lk, D, generator=g) for _ in range(2))
    m = _mask(Band(*band), q_offset, kv_offset, Lk, B)
    ops = AttncompCalls()
    with torch.no_grad(), ops:
        out = decode_step(q, k, v, m, 0.25, softcap)
    assert ops.count("decode_fwd") == (want is not None), ops.calls
    row = m.band.row(m.delta, Lk, "cpu")
    kk, vv = (x.double().repeat_interleave(Hq // Hkv, 1) for x in (k, v))
    s = q.double() @ kk.transpose(-1, -2) * 0.25
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    p = torch.softmax(s.masked_fill(~row, float("-inf")), -1).nan_to_num(0.0)  # no visible key: zeros
    ref = p @ vv
    assert out.shape == ref.shape
    assert (out.abs().max() == 0) if want is None else rel_err(out, ref) <= 1e-5
