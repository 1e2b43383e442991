"""Real models (random weights, from configs): every attention site found, replaced, and exact."""

import copy

import pytest
import torch

import attncomp
from conftest import rel_err, tiny_gpt2

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

LAYERS = 2


def _hf(kind: str, impl: str):
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

    if kind == "gpt2":
        return tiny_gpt2(LAYERS, impl)
    if kind == "bert":
        cfg = BertConfig(num_hidden_layers=LAYERS, num_attention_heads=4, hidden_size=64, intermediate_size=128,
                         vocab_size=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                         attn_implementation=impl)
        return BertModel(cfg)
    cfg = LlamaConfig(num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                      intermediate_size=128, vocab_size=128, attn_implementation=impl)
    return LlamaModel(cfg)


def _loss(out):
    """A linear loss with fixed random weights (well conditioned, unlike a sum of squares)."""
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    return (out * w).sum()


def _assert_grads_match(named, g_out, g_ref):
    """Relative error ≤ 1e-5 per parameter; a gradient that is zero in exact arithmetic (e.g. a key
    bias under softmax) is round-off on both sides and is compared against the largest gradient."""
    top = max(b.norm().item() for b in g_ref if b is not None)
    for (name, _), a, b in zip(named, g_out, g_ref):
        assert (a is None) == (b is None), name
        if b is None:
            continue
        if b.norm() < 1e-6 * top:
            assert (a - b).norm() <= 1e-6 * top, name
        else:
            assert rel_err(a, b) <= 1e-5, name


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, model.training


@pytest.mark.parametrize("capture", ["dynamo", "modules"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["gpt2", "bert", "llama"])
def test_transformers_model(kind, impl, capture):
    model = _hf(kind, impl)
    ids = torch.randint(0, 128, (2, 20))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, 15:] = 0
    before, training = _snapshot(model)

    model.eval()
    ref = model(ids, attention_mask=mask).last_hidden_state
    fast = attncomp.optimize(model, example_inputs=(ids,), example_kwargs={"attention_mask": mask}, capture=capture)
    out = fast(ids, attention_mask=mask).last_hidden_state
    rep = attncomp.explain(fast)
    # captured per attention module, an sdpa model's mask arrives as an input of the module's graph: an SDPA
    # call with a mask tensor nothing proves a structure in stays as it is (nothing to gain)
    kept = capture == "modules" and impl == "sdpa"
    sites = rep.kept if kept else rep.replaced
    assert len(sites) == LAYERS and len(rep.rows) == LAYERS, str(rep)
    assert len({r.path for r in sites}) == LAYERS, str(rep)
    assert kept or all(r.kernel.calls["fused"] >= 1 for r in rep.replaced)
    if kind == "llama":
        assert all(r.spec.dims.Hkv == 2 and r.spec.dims.Hq == 4 for r in sites)
    keep = mask.bool()[:, None, :, None].expand_as(ref.unsqueeze(1)).squeeze(1)
    assert rel_err(out[keep], ref[keep]) <= 1e-5

    # training mode (dropout 0): gradients of every parameter match eager
    model.train()
    fast.train()
    ref = model(ids, attention_mask=mask).last_hidden_state
    g_ref = torch.autograd.grad(_loss(ref), list(model.parameters()), allow_unused=True)
    out = fast(ids, attention_mask=mask).last_hidden_state
    g_out = torch.autograd.grad(_loss(out), list(fast.model.parameters()), allow_unused=True)
    assert rel_err(out, ref) <= 1e-5
    assert len(attncomp.explain(fast).kept if kept else attncomp.explain(fast).replaced) == LAYERS
    _assert_grads_match(list(model.named_parameters()), g_out, g_ref)

    # the original model is untouched: same parameters, same flags, same outputs
    after, _ = _snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    fast.eval()
    assert model.training is True


def _assert_training_grads_match(model, fast, x):
    """In training mode, the optimized model's parameter gradients on ``x`` equal the original's."""
    model.train()
    fast.train()
    ref = model(x)
    g_ref = torch.autograd.grad(_loss(ref), list(model.parameters()))
    out = fast(x)
    g_out = torch.autograd.grad(_loss(out), list(fast.model.parameters()))
    _assert_grads_match(list(model.named_parameters()), g_out, g_ref)


@pytest.mark.parametrize("capture", ["dynamo", "modules", "fx"])
@pytest.mark.parametrize("fused", [True, False])
def test_timm_vit(fused, capture):
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, depth=LAYERS)
    for blk in model.blocks:
        blk.attn.fused_attn = fused
    model.eval()
    x = torch.randn(2, 3, 224, 224)
    ref = model(x)
    fast = attncomp.optimize(model, example_inputs=(x,), capture=capture)
    out = fast(x)
    rep = attncomp.explain(fast)
    # an SDPA call without a mask is kept as it is (nothing to gain); the explicit chain is replaced
    sites = rep.kept if fused else rep.replaced
    assert len(sites) == LAYERS and len(rep.rows) == LAYERS, str(rep)
    assert {r.rule for r in sites} == {"sdpa_call" if fused else "softmax_chain"}
    assert rel_err(out, ref) <= 1e-5

    _assert_training_grads_match(model, fast, x)


@pytest.mark.parametrize("fused", [True, False])
def test_timm_swin_shifted_windows(fused):
    # shifted-window blocks add their mask to the scores viewed per window, (B/nW, nW, H, N, N), and view
    # them back: the term is a term on the same elements of the scores, so every block is replaced
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=10, img_size=112,
                              depths=(2, 2), num_heads=(2, 4), embed_dim=32, drop_path_rate=0.0)
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused
    model.eval()
    x = torch.randn(2, 3, 112, 112)
    ref = model(x)
    fast = attncomp.optimize(model)
    out = fast(x)
    rep = attncomp.explain(fast)
    # timm's fused path hands SDPA the bias and mask as one float tensor, with no structure to prove: those
    # SDPA calls stay as they are (nothing to gain); the explicit chain is replaced
    assert len(rep.kept if fused else rep.replaced) == 4 and not rep.left, str(rep)
    assert rel_err(out, ref) <= 1e-5

    _assert_training_grads_match(model, fast, x)


def test_optimize_does_not_change_the_original():
    model = _hf("gpt2", "eager").eval()
    ids = torch.randint(0, 128, (1, 12))
    ref = model(ids).last_hidden_state
    state = copy.deepcopy(model.state_dict())
    fast = attncomp.optimize(model, example_inputs=(ids,))
    fast.train()
    assert model.training is False
    assert torch.equal(model(ids).last_hidden_state, ref)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    # parameters are shared, not copied
    assert next(fast.model.parameters()) is next(model.parameters())


def test_unknown_strategy_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown strategy 'fastest'.*'auto'.*'dense'"):
        attncomp.optimize(torch.nn.Linear(2, 2), strategy="fastest")
    with pytest.raises(ValueError, match="strategy must be one of"):
        attncomp.optimize(torch.nn.Linear(2, 2), strategy=3)


@pytest.mark.parametrize("side", ["right", "left"])
@torch.no_grad()
def test_gpt2_causal_padding_exact_on_both_paths(side):
    """Right padding runs each sequence's keys on the dense causal kernel (CPU), left padding the
    block-sparse op: both equal eager on every kept position."""
    model = _hf("gpt2", "eager").eval()
    ids = torch.randint(0, 128, (3, 24))
    mask = torch.ones(3, 24, dtype=torch.long)
    if side == "right":
        mask[1, 17:] = 0
        mask[2, 5:] = 0
    else:
        mask[1, :7] = 0
        mask[2, :19] = 0
    ref = model(ids, attention_mask=mask).last_hidden_state
    fast = attncomp.optimize(model, example_inputs=(ids,), example_kwargs={"attention_mask": mask})
    out = fast(ids, attention_mask=mask).last_hidden_state
    rep = attncomp.explain(fast)
    assert all(str(r.spec.mask) == "causal & key_padding" for r in rep.replaced) and len(rep.replaced) == LAYERS
    assert all(r.kernel.calls["fused"] == 2 for r in rep.replaced)
    keep = mask.bool()
    assert rel_err(out[keep], ref[keep]) <= 1e-5
