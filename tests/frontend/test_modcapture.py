"""capture="modules": Dynamo on the modules that own attention, alike layers traced once."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attncomp
from attncomp import backend
from conftest import rel_err, tiny_gpt2

D, H = 32, 4


class ChainAttn(nn.Module):
    """Hand-written attention that returns its probabilities, as transformers' modules do."""

    def __init__(self, idx=0, specialise=False):
        super().__init__()
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.idx, self.specialise = idx, specialise

    def forward(self, x, mask=None):
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, H, D // H).permute(2, 0, 3, 1, 4)
        scale = (D // H) ** -0.5
        if self.specialise:  # a per-instance constant Dynamo specialises on (like a KV cache's layer index)
            scale = scale / (self.idx + 1)
        s = q @ k.transpose(-1, -2) * scale
        if mask is not None:
            s = s + mask
        p = s.softmax(-1)
        return self.proj((p @ v).transpose(1, 2).reshape(B, L, D)), p


class SdpaAttn(nn.Module):
    def __init__(self, idx=0, specialise=False):
        super().__init__()
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, x, mask=None):
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, H, D // H).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(o.transpose(1, 2).reshape(B, L, D))


class SoftmaxModuleAttn(ChainAttn):
    """The softmax is a child module (as in some vision models): the owner is this module."""

    def __init__(self, idx=0, specialise=False):
        super().__init__(idx, specialise)
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x, mask=None):
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, H, D // H).permute(2, 0, 3, 1, 4)
        p = self.softmax(q @ k.transpose(-1, -2) * (D // H) ** -0.5)
        return self.proj((p @ v).transpose(1, 2).reshape(B, L, D))


class MHAAttn(nn.Module):
    def __init__(self, idx=0, specialise=False):
        super().__init__()
        self.mha = nn.MultiheadAttention(D, H, batch_first=True)

    def forward(self, x, mask=None):
        return self.mha(x, x, x)[0]  # need_weights=True by default: the weights are dropped here


class Block(nn.Module):
    def __init__(self, attn_cls, idx, specialise=False):
        super().__init__()
        self.ln, self.attn = nn.LayerNorm(D), attn_cls(idx, specialise)
        self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))

    def forward(self, x, mask=None):
        a = self.attn(self.ln(x), mask)
        x = x + (a[0] if isinstance(a, tuple) else a)
        return x + self.mlp(x)


class Net(nn.Module):
    def __init__(self, attn_cls=ChainAttn, layers=3, specialise=False):
        super().__init__()
        self.blocks = nn.ModuleList(Block(attn_cls, i, specialise) for i in range(layers))
        self.head = nn.Linear(D, 5)

    def forward(self, x, mask=None):
        for b in self.blocks:
            x = b(x, mask)
        return self.head(x)


def _owner_classes(fast):
    return {g.cls.__name__ for g in fast._modcap.groups.values() if g.paths}


def _loss(out):
    return (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(3))).sum()


@pytest.mark.parametrize("attn_cls, owner, rule", [(ChainAttn, "Block", "softmax_chain"),
                                                   (SdpaAttn, "SdpaAttn", "sdpa_call"),
                                                   (SoftmaxModuleAttn, "SoftmaxModuleAttn", "softmax_chain"),
                                                   (MHAAttn, "MHAAttn", "multihead_attention")])
@torch.no_grad()  # with grad, the first block's input (not requiring grad) gets a graph of its own
def test_owners_found_and_alike_layers_traced_once(attn_cls, owner, rule):
    model = Net(attn_cls, layers=3).eval()
    x = torch.randn(2, 16, D)
    ref = model(x)
    graphs = backend.STATS["graphs"]
    fast = attncomp.optimize(model, "dense", capture="modules", example_inputs=(x,))  # SDPA calls too
    assert backend.STATS["graphs"] - graphs == 1  # one trace serves the three layers
    assert _owner_classes(fast) == {owner}
    assert rel_err(fast(x), ref) <= 1e-5
    rep = attncomp.explain(fast)
    assert len(rep.replaced) == 3 and not rep.left, str(rep)
    assert {r.rule for r in rep.replaced} == {rule}
    assert sorted(r.path.split(".")[1] for r in rep.replaced) == ["0", "1", "2"]
    assert all(r.kernel.calls["fused"] >= 1 for r in rep.replaced)
    assert f"{owner} ×3" in str(rep) and "capture=modules, graphs=1" in str(rep)


def test_training_gradients_match_eager():
    model = Net(ChainAttn, layers=2)
    x = torch.randn(2, 12, D)
    mask = torch.zeros(1, 1, 12, 12).masked_fill(torch.ones(12, 12, dtype=torch.bool).triu(1), float("-inf"))
    fast = attncomp.optimize(model, capture="modules")
    params = list(model.parameters())
    out = fast(x, mask)  # the first call: owners found while the model runs
    g_out = torch.autograd.grad(_loss(out), list(fast.model.parameters()))
    out = fast(x, mask)  # compiled throughout
    g_out2 = torch.autograd.grad(_loss(out), list(fast.model.parameters()))
    ref = model(x, mask)
    g_ref = torch.autograd.grad(_loss(ref), params)
    assert rel_err(out, ref) <= 1e-5
    for a, a2, b in zip(g_out, g_out2, g_ref):
        assert rel_err(a, b) <= 1e-5 and rel_err(a2, b) <= 1e-5
    assert len(attncomp.explain(fast).replaced) == 2


@torch.no_grad()
def test_instances_dynamo_specialises_are_all_compiled_past_the_recompile_limit():
    layers = 10  # Dynamo's default recompile limit is 8: without room, the last two would run eagerly
    model = Net(ChainAttn, layers=layers, specialise=True).eval()
    x = torch.randn(1, 8, D)
    ref = model(x)
    fast = attncomp.optimize(model, capture="modules", example_inputs=(x,))
    fast(x)
    assert rel_err(fast(x), ref) <= 1e-5
    calls = {}
    for g in fast._modcap.groups.values():
        for r in g.backend.records.values():
            calls[r.path] = r.kernel.calls["fused"]
    assert len(calls) == layers and all(c >= 1 for c in calls.values()), calls
    assert attncomp.explain(fast).graphs == layers


def test_strategy_by_module_path():
    model = Net(ChainAttn, layers=3).eval()
    x = torch.randn(2, 16, D)
    fast = attncomp.optimize(model, strategy={"blocks.1.*": "dense"}, capture="modules", example_inputs=(x,))
    assert rel_err(fast(x), model(x)) <= 1e-5
    rep = attncomp.explain(fast)
    assert [r.path for r in rep.replaced] == ["blocks.1.attn"], str(rep)
    assert {r.path for r in rep.left} == {"blocks.0.attn", "blocks.2.attn"}
    assert all("no strategy pattern matches" in r.reason for r in rep.left)


@torch.no_grad()
def test_new_lengths_within_a_bucket_reuse_the_graph():
    model = Net(SdpaAttn, layers=2).eval()
    fast = attncomp.optimize(model, capture="modules", example_inputs=(torch.randn(1, 40, D),))
    graphs = []
    for L in (44, 48, 52, 60):
        x = torch.randn(1, L, D)
        assert rel_err(fast(x), model(x)) <= 1e-5
        graphs.append(attncomp.explain(fast).graphs)
    assert graphs == [2, 2, 2, 2]  # attncomp marks the length dynamic at the second length only


def test_model_without_attention_runs_eagerly_and_says_so():
    model = nn.Sequential(nn.Linear(D, D), nn.Softmax(-1), nn.Linear(D, 3))  # a softmax, but no attention
    x = torch.randn(4, D)
    fast = attncomp.optimize(model, capture="modules", example_inputs=(x,))
    assert torch.equal(fast(x), model(x))
    rep = attncomp.explain(fast)
    assert not rep.rows and rep.graphs == 0
    assert "no attention sites found" in str(rep)


def test_bad_input_raises_the_models_error():
    model = Net(ChainAttn, layers=2).eval()
    fast = attncomp.optimize(model, capture="modules", example_inputs=(torch.randn(1, 8, D),))
    with pytest.raises(RuntimeError) as e:
        fast(torch.randn(1, 8, D + 1))
    with pytest.raises(RuntimeError) as e_ref:
        model(torch.randn(1, 8, D + 1))
    assert str(e_ref.value).splitlines()[0] in str(e.value)


@pytest.mark.parametrize("use_cache", [False, True])
@torch.no_grad()
def test_gpt2_layers_share_one_trace_unless_a_kv_cache_specialises_them(use_cache):
    model = tiny_gpt2(3, use_cache=use_cache).eval()
    ids = torch.randint(0, 128, (2, 20))
    ref = model(ids).last_hidden_state
    fast = attncomp.optimize(model, capture="modules", example_inputs=(ids,))
    assert rel_err(fast(ids).last_hidden_state, ref) <= 1e-5
    rep = attncomp.explain(fast)
    assert [r.path for r in rep.replaced] == ["h.0.attn", "h.1.attn", "h.2.attn"], str(rep)
    assert _owner_classes(fast) == {"GPT2Block"}  # GPT2Attention returns its weights; the block drops them
    # the cache's update is indexed by each layer's number: Dynamo traces every layer once
    assert rep.graphs == (3 if use_cache else 1), str(rep)
