"""Masks under dynamic shapes: after Dynamo's automatic-dynamic recompile a mask whose predicate holds no
size is proved for every length (no per-call check, no recompile for a new length); a mask whose proof
needs the example sizes specialises the graph to them by a guard, so each new length recompiles and is
proved again there. explain says which."""

import math

import pytest
import torch
from torch import nn

import attncomp
from conftest import rel_err, tiny_gpt2

H, D = 2, 8
class Attn(nn.Module):
    """q, k, v from one projection; the mask is built from the length by ``hidden(L)``."""

    def __init__(self, hidden):
        super().__init__()
        self.qkv, self.hidden = nn.Linear(H * D, 3 * H * D), hidden

    def forward(self, x):
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, H, D).permute(2, 0, 3, 1, 4)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(D)
        s = s.masked_fill(self.hidden(L, x.device), -math.inf)
        return (s.softmax(-1) @ v).transpose(1, 2).reshape(B, L, H * D)


def causal(L, device):
    return torch.ones(L, L, dtype=torch.bool, device=device).triu(1)


def shifting(L, device):  # visible up to L//2 - 4 keys past the diagonal: the mask's kind changes with L
    return torch.ones(L, L, dtype=torch.bool, device=device).triu(L // 2 - 3)


def _latest(fast, graphs: int = 2):
    rep = attncomp.explain(fast)
    assert rep.graphs == graphs and len(rep.replaced) == 1, str(rep)  # the static graph, then the dynamic ones
    return rep.replaced[0]


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_causal_mask_is_proved_for_every_length(mode):
    model = Attn(causal).eval()
    fast = attncomp.optimize(model)
    with mode():
        for L in (16, 20, 24, 30):
            x = torch.randn(2, L, H * D)
            assert rel_err(fast(x), model(x)) <= 1e-5
    row = _latest(fast)  # 24 and 30 reuse the graph of 20: nothing was specialised
    assert str(row.spec.mask) == "causal" and row.strategy != "eager"
    assert "proved for every length" in row.reason and "specialised" not in row.reason
    assert row.kernel.calls == {"fused": 3, "literal": 0} and row.kernel.eager_calls_note is None


@torch.no_grad()
def test_a_mask_that_changes_with_the_length_is_specialised_by_a_guard():
    model = Attn(shifting).eval()
    fast = attncomp.optimize(model)
    for L in (16, 20, 20, 24, 28, 24):
        x = torch.randn(2, L, H * D)
        assert rel_err(fast(x), model(x)) <= 1e-5
    # 16 static; 20, 24, 28 each a graph guarded to its length (the second 24 reuses its graph)
    row = _latest(fast, graphs=4)
    assert str(row.spec.mask) == "causal(+10)" and row.strategy != "eager"  # triu(28 // 2 - 3) hides kv >= q + 11
    assert "specialised to 28x28 (guard" in row.reason
    assert row.kernel.calls == {"fused": 1, "literal": 0}


def test_gradients_with_a_mask_proved_for_every_length():
    model = Attn(causal)
    fast = attncomp.optimize(model)
    for L in (12, 16, 20):
        x = torch.randn(2, L, H * D, requires_grad=True)
        g = torch.randn(2, L, H * D)
        out, ref = fast(x), model(x)
        gx, = torch.autograd.grad(out, x, g)
        gr, = torch.autograd.grad(ref, x, g)
        assert rel_err(out, ref) <= 1e-5 and rel_err(gx, gr) <= 1e-5
    assert _latest(fast).kernel.calls["literal"] == 0


@pytest.mark.parametrize("pad", [0, 3])
@torch.no_grad()
def test_key_padding_from_a_runtime_mask_is_proved_for_every_length(pad):
    model = tiny_gpt2(use_cache=False).eval()
    fast = attncomp.optimize(model)
    for L in (20, 24, 28, 31):
        ids = torch.randint(0, 128, (2, L))
        mask = torch.ones(2, L, dtype=torch.long)
        mask[1, L - 5 - pad:] = 0
        ref = model(ids, attention_mask=mask).last_hidden_state
        out = fast(ids, attention_mask=mask).last_hidden_state
        keep = mask.bool()
        assert rel_err(out[keep], ref[keep]) <= 1e-5
    rep = attncomp.explain(fast)
    assert rep.graphs == 2 and len(rep.replaced) == 2, str(rep)
    for r in rep.replaced:
        assert str(r.spec.mask) == "causal & key_padding" and r.plan.variant == "dense-padding"
        assert "proved for every length" in r.reason
        assert r.kernel.calls == {"fused": 3, "literal": 0}
