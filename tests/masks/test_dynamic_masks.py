"""Masks under dynamic shapes: after Dynamo's automatic-dynamic recompile a mask is proved at the
graph's example shape and every call checks the graph's own mask against that proof; a call where
they differ runs the site's own computation (exact), and explain says so."""

import math

import pytest
import torch
from torch import nn

import attncomp
from attncomp.strategies.softmax_site import MISMATCH
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


def _latest(fast):
    rep = attncomp.explain(fast)
    assert rep.graphs == 2 and len(rep.replaced) == 1, str(rep)  # the static graph, then the dynamic one
    return rep.replaced[0]


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_causal_mask_stays_proved_after_the_dynamic_recompile(mode):
    model = Attn(causal).eval()
    fast = attncomp.optimize(model)
    with mode():
        for L in (16, 20, 24, 30):
            x = torch.randn(2, L, H * D)
            assert rel_err(fast(x), model(x)) <= 1e-5
    row = _latest(fast)
    assert str(row.spec.mask) == "causal" and row.strategy != "eager"
    assert "sizes are symbolic" in row.reason and "checked against the graph's mask on every call" in row.reason
    assert row.kernel.calls == {"fused": 3, "literal": 0} and row.kernel.eager_calls_note is None


@torch.no_grad()
def test_a_mask_that_changes_with_the_length_runs_exactly_where_the_proof_fails():
    model = Attn(shifting).eval()
    fast = attncomp.optimize(model)
    for L in (16, 20, 20, 24, 28):
        x = torch.randn(2, L, H * D)
        assert rel_err(fast(x), model(x)) <= 1e-5
    row = _latest(fast)  # proved at L=20: Causal(offset 7); at 24 and 28 the offset differs
    assert row.kernel.calls == {"fused": 2, "literal": 2}
    assert row.kernel.eager_calls_note == MISMATCH and MISMATCH in str(attncomp.explain(fast))


def test_gradients_with_a_checked_mask():
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
def test_key_padding_from_a_runtime_mask_is_checked_per_call(pad):
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
        assert r.kernel.calls == {"fused": 3, "literal": 0}
