"""attn_implementation="attncomp": the same numbers, tokens and gradients as eager, masks as IR."""

import subprocess
import sys

import pytest
import torch
from models import AttncompCalls, batch, causal_lm, with_impl
from torch.utils._python_dispatch import TorchDispatchMode

import attncomp
from attncomp.hf.masks import AttncompMask, Band, mask_interface
from conftest import rel_err

transformers = pytest.importorskip("transformers")
from transformers import masking_utils as mu  # noqa: E402

KINDS = ["llama", "mistral", "qwen2", "gpt2", "gemma2"]


def _loss_weights(logits):
    return torch.randn(logits.shape, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("kind", KINDS)
def test_logits_and_tokens_match_eager(kind, side):
    ref = causal_lm(kind)
    fast = with_impl(ref, "attncomp")
    ids, mask = batch(side=side)
    keep = mask.bool()
    ops = AttncompCalls()
    with torch.no_grad():
        a = ref(ids, attention_mask=mask).logits
        with ops:
            b = fast(ids, attention_mask=mask).logits
    assert len(ops.calls) >= ref.config.num_hidden_layers, ops.calls  # attncomp's ops ran every layer
    assert rel_err(b[keep], a[keep]) <= 1e-4
    # greedy tokens (right padding: transformers warns, the tokens are still defined and must agree)
    g_ref = ref.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    g_fast = fast.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert torch.equal(g_fast, g_ref)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("kind", KINDS)
def test_gradients_match_eager(kind, side):
    ref = causal_lm(kind).train()
    fast = with_impl(ref, "attncomp").train()
    ids, mask = batch(side=side)
    keep = mask.bool()
    grads = []
    for m in (ref, fast):
        logits = m(ids, attention_mask=mask).logits
        (logits * _loss_weights(logits))[keep].sum().backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    top = max(g.norm().item() for g in grads[0].values() if g is not None)
    for name, g_ref in grads[0].items():
        g_fast = grads[1][name]
        assert (g_ref is None) == (g_fast is None), name
        if g_ref is None:
            continue
        if g_ref.norm() < 1e-6 * top:  # zero in exact arithmetic: round-off on both sides
            assert (g_fast - g_ref).norm() <= 1e-6 * top, name
        else:
            assert rel_err(g_fast, g_ref) <= 1e-4, name


class _BigTensors(TorchDispatchMode):
    """Records every op output whose storage holds at least ``n`` elements (views of small tensors,
    like an expanded padding row, do not count; attncomp's custom ops are single calls here)."""

    def __init__(self, n: int):
        super().__init__()
        self.n, self.hits = n, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() // t.element_size() >= self.n:
                self.hits.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_no_quadratic_tensor(kind):
    L = 256
    ref = causal_lm(kind, **({"sliding_window": 64} if kind == "mistral" else {}))
    ids, mask = batch(B=1, L=L, pad=0)
    mask[0, :7] = 0  # left padding: the key-padding row travels with the mask description
    control = _BigTensors(L * L)
    with torch.no_grad(), control:
        with_impl(ref, "sdpa")(ids, attention_mask=mask)
    assert control.hits, "sdpa builds an (L, L) mask here: the check must see it"
    fast = with_impl(ref, "attncomp")
    seen = _BigTensors(L * L)
    with seen:
        logits = fast(ids, attention_mask=mask).logits
        logits.sum().backward()
    assert not seen.hits, seen.hits[:5]


# -- the mask description against transformers' own dense masks ------------------------------------


def _dense(m: AttncompMask) -> torch.Tensor:
    """The ``(B, Lq, Lk)`` bool mask a description stands for (test reference only)."""
    B, Lq, Lk = m.batch_size, m.q_length, m.kv_length
    i = torch.arange(Lq)[:, None] + m.q_offset
    j = torch.arange(Lk)[None, :] + m.kv_offset
    keep = torch.ones(Lq, Lk, dtype=torch.bool)
    if m.band.left is not None:
        keep &= j >= i - m.band.left
    if m.band.right is not None:
        keep &= j <= i + m.band.right
    keep = keep.expand(B, Lq, Lk)
    if m.key_padding is not None:
        keep = keep & m.key_padding[:, None, :]
    if m.documents is not None:
        keep = keep & (m.documents[:, :, None] == m.documents[:, None, :])
    # and the IR the attention function runs agrees with the band
    local = attncomp.blocks.dense_keep(m.ir().expr(), Lq, Lk)
    band_only = torch.ones(Lq, Lk, dtype=torch.bool)
    if m.band.left is not None:
        band_only &= j >= i - m.band.left
    if m.band.right is not None:
        band_only &= j <= i + m.band.right
    assert torch.equal(local, band_only), m
    return keep


FUNCTIONS = {
    "causal": lambda: mu.causal_mask_function,
    "bidirectional": lambda: mu.bidirectional_mask_function,
    "sliding5": lambda: mu.sliding_window_causal_mask_function(5),
    "bidir_sliding3": lambda: mu.sliding_window_bidirectional_mask_function(3),
}


@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("sizes", [(9, 9, 0, 0), (1, 13, 12, 0), (3, 14, 11, 0), (1, 7, 9, 3), (4, 10, 8, 2),
                                   (6, 16, 2, 0)], ids=lambda s: "Lq{}-Lk{}-qo{}-ko{}".format(*s))
@pytest.mark.parametrize("fn", sorted(FUNCTIONS))
def test_mask_matches_transformers(fn, sizes, padding):
    Lq, Lk, q_offset, kv_offset = sizes
    att = None
    if padding:
        att = torch.ones(2, max(q_offset + Lq, kv_offset + Lk) - 1, dtype=torch.bool)  # shorter: padded on the right
        att[1, :3] = False
    kw = dict(batch_size=2, q_length=Lq, kv_length=Lk, q_offset=q_offset, kv_offset=kv_offset,
              mask_function=FUNCTIONS[fn](), attention_mask=att)
    ref = mu.sdpa_mask(**kw, allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
    ref = torch.ones(2, Lq, Lk, dtype=torch.bool) if ref is None else ref[:, 0].expand(2, Lq, Lk)
    got = mask_interface(**kw)
    assert got.shape == (2, 1, Lq, Lk) and got.dtype == torch.bool
    assert torch.equal(_dense(got), ref)


def test_packed_sequences_read_as_documents():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 1, 2]])
    docs = mu.find_packed_sequence_indices(pos)
    for inner in (mu.causal_mask_function, mu.sliding_window_causal_mask_function(2)):
        fn = mu.packed_sequence_compatibility_function(inner, pos, docs)
        kw = dict(batch_size=2, q_length=9, kv_length=9, mask_function=fn)
        ref = mu.sdpa_mask(**kw, allow_is_causal_skip=False)[:, 0]
        got = mask_interface(**kw)
        assert got.documents is docs and torch.equal(_dense(got), ref)


def test_packed_sequences_match_eager():
    ref = causal_lm("mistral")
    fast = with_impl(ref, "attncomp")
    ids, _ = batch(B=2, L=20, pad=0)
    pos = torch.cat([torch.arange(7), torch.arange(13)])[None].expand(2, 20).clone()
    pos[1] = torch.cat([torch.arange(12), torch.arange(8)])
    with torch.no_grad():
        a, b = ref(ids, position_ids=pos).logits, fast(ids, position_ids=pos).logits
    assert rel_err(b, a) <= 1e-4


def test_unreadable_mask_function_raises():
    fn = mu.or_masks(mu.causal_mask_function, mu.sliding_window_overlay(3))
    with pytest.raises(ValueError, match="cannot read the mask function .*or_mask"):
        mask_interface(batch_size=1, q_length=4, kv_length=4, mask_function=fn)


def test_mask_description_is_not_a_tensor():
    m = mask_interface(batch_size=1, q_length=4, kv_length=4, mask_function=mu.causal_mask_function)
    assert m.band == Band(None, 0) and str(m.ir()) == "causal"
    with pytest.raises(TypeError, match="description"):
        m[:, :, :2]


def test_dropout_raises():
    model = with_impl(causal_lm("llama", attention_dropout=0.1), "attncomp").train()
    ids, mask = batch()
    with pytest.raises(NotImplementedError, match="dropout"):
        model(ids, attention_mask=mask)


def test_import_registers_lazily():
    code = ("import sys, attncomp; assert 'transformers' not in sys.modules, 'imported transformers'\n"
            "import transformers.modeling_utils as m, transformers.masking_utils as k\n"
            "assert 'attncomp' in m.ALL_ATTENTION_FUNCTIONS.valid_keys()\n"
            "assert 'attncomp' in k.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping\n"
            "assert m.ALL_ATTENTION_FUNCTIONS['attncomp'].__module__ == 'attncomp.hf.attention'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/")
    assert proc.returncode == 0, proc.stderr


def test_explicit_register():
    attncomp.hf.register()
    assert attncomp.hf.is_registered()
