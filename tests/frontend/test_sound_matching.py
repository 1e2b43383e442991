"""Sound matching: operand roles proved from shapes, channel (transposed) attention, and first-call
verification of every replaced site against its own eager nodes."""

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attncomp
from attncomp.runtime import site as sitemodule
from attncomp.strategies.dense import op as runtime
from conftest import rel_err


class XCA(nn.Module):
    """Cross-covariance attention (XCiT-style): q, k, v transposed to (B, H, d, N), q and k
    L2-normalised over tokens, a learned per-head temperature, scores d×d."""

    def __init__(self, dim=64, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.temperature = nn.Parameter(torch.linspace(0.5, 2.0, heads).view(heads, 1, 1))

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k, v = q.transpose(-2, -1), k.transpose(-2, -1), v.transpose(-2, -1)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1)) * self.temperature
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).permute(0, 3, 1, 2).reshape(B, N, C))


class ChannelContext(nn.Module):
    """Transposed attention: ``softmax(kᵀ·v)`` (d×d) applied to ``qᵀ`` as its value (``ctx @ qᵀ``)."""

    def __init__(self, dim=64, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        ctx = ((k.transpose(-2, -1) @ v) * N ** -0.5).softmax(dim=-1)
        return self.proj((ctx @ q.transpose(-2, -1)).permute(0, 3, 1, 2).reshape(B, N, C))


class ContextAppliedToQ(nn.Module):
    """``q @ softmax(kᵀ·v)``: contracts the probabilities over their *query* axis — not attention."""

    def __init__(self, dim=64, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        ctx = ((k.transpose(-2, -1) @ v) * N ** -0.5).softmax(dim=-1)
        return (q @ ctx).transpose(1, 2).reshape(B, N, C)


class Plain(nn.Module):
    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        p = ((q @ k.transpose(-2, -1)) / (C // self.heads) ** 0.5).softmax(-1)
        return (p @ v).transpose(1, 2).reshape(B, N, C)


@pytest.mark.parametrize("capture", ["dynamo", "fx"])
@pytest.mark.parametrize("cls", [XCA, ChannelContext])
@pytest.mark.parametrize("N", [16, 50])
def test_channel_attention_exact_forward_backward(cls, N, capture):
    torch.manual_seed(0)
    model = cls()
    x = torch.randn(2, N, 64, requires_grad=True)
    fast = attncomp.optimize(model, capture=capture)
    out = fast(x)
    row = attncomp.explain(fast).rows[0]
    assert row.status == "replaced", row.reason
    assert "verified on the first call" in str(attncomp.explain(fast))
    assert row.kernel.calls["fused"] == 1 and row.kernel.calls["literal"] == 0
    ref = model(x)
    assert rel_err(out, ref) <= 1e-5
    g_out = torch.autograd.grad(out.square().sum(), [x, *model.parameters()])
    g_ref = torch.autograd.grad(ref.square().sum(), [x, *model.parameters()])
    assert all(rel_err(a, b) <= 1e-5 for a, b in zip(g_out, g_ref))


def test_channel_roles_are_the_transposed_operands():
    torch.manual_seed(0)
    fast = attncomp.optimize(XCA(), example_inputs=torch.randn(2, 20, 64))
    roles = attncomp.explain(fast).rows[0].roles
    # d = 32 channels play the sequence; the 20 tokens are the contracted feature axis
    assert roles.q == (2, 2, 32, 20) and roles.k == (2, 2, 32, 20) and roles.v == (2, 2, 32, 20)
    assert roles.out == (2, 2, 32, 20)
    assert "softmax over the 32 keys" in str(roles)


def test_context_applied_to_q_is_left_with_reason():
    torch.manual_seed(0)
    model = ContextAppliedToQ()
    x = torch.randn(2, 16, 64)
    fast = attncomp.optimize(model)
    assert torch.equal(fast(x), model(x))
    row = attncomp.explain(fast).rows[0]
    assert row.status == "left" and "query axis" in row.reason


def test_noncontiguous_q_reaches_the_cpu_kernel_exactly():
    """torch's fused CPU kernel reads q as if its last axis were contiguous: the op must not pass it a
    transposed view (this gave channel attention garbage / NaN)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 16, 24).transpose(-2, -1) for _ in range(3))
    assert q.stride(-1) != 1
    out, _ = runtime.dense_fwd(q, k, v, None, 0.3, None, 0.0)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=0.3)
    assert rel_err(out, ref) <= 1e-5
    (g,) = torch.autograd.grad(runtime.dense_fwd(q.requires_grad_(), k, v, None, 0.3, None, 0.0)[0].sum(), q)
    (g_ref,) = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, scale=0.3).sum(), q)
    assert rel_err(g, g_ref) <= 1e-5


class LearnedKeys(nn.Module):
    """Keys shared by the whole batch (a 2-D parameter): the product broadcasts over batch and heads."""

    def __init__(self):
        super().__init__()
        self.keys = nn.Parameter(torch.randn(12, 8))
        self.values = nn.Parameter(torch.randn(12, 8))

    def forward(self, q):
        return torch.softmax(q @ self.keys.t(), -1) @ self.values


def test_broadcast_keys_left_with_reason():
    torch.manual_seed(0)
    model = LearnedKeys()
    q = torch.randn(2, 3, 10, 8)
    fast = attncomp.optimize(model)
    assert torch.equal(fast(q), model(q))
    row = attncomp.explain(fast).rows[0]
    assert row.status == "left" and "batch axes" in row.reason


class SeparateCaches(nn.Module):
    """Keys and values as separate inputs, as a KV cache hands them over: after Dynamo's dynamic
    recompile their lengths are two symbols no guard ties."""

    def __init__(self, chain: bool):
        super().__init__()
        self.chain = chain

    def forward(self, q, k, v):
        if self.chain:
            return torch.softmax(q @ k.transpose(-1, -2) / 4.0, -1) @ v
        return F.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("chain", [False, True])
def test_value_rows_of_a_separate_symbolic_input_are_checked_per_call(chain):
    torch.manual_seed(0)
    model = SeparateCaches(chain)
    fast = attncomp.optimize(model, strategy="dense")
    q = torch.randn(1, 2, 1, 16)
    for L in (300, 310, 320):  # the second length makes Dynamo trace k's and v's lengths as symbols
        k, v = torch.randn(1, 2, L, 16), torch.randn(1, 2, L, 16)
        assert rel_err(fast(q, k, v), model(q, k, v)) < 1e-5
    rep = attncomp.explain(fast)
    assert rep.dynamic_graphs == 1
    row = rep.rows[0]
    assert row.status == "replaced", str(rep)
    assert row.kernel.calls["fused"] >= 2
    if not chain:  # SDPA's k and v lengths: two symbols no guard ties (a matmul's meta ties them for the chain)
        assert str(row.roles.k[-2]) != str(row.roles.v[-2]), row.roles
    # a call whose k and v differ in rows: not what either op is for. The site runs its own nodes for it, so it
    # does what the original does: the chain's matmul raises; torch's CPU SDPA does not check the rows and reads
    # past v (its values are not defined, so only the path is compared)
    site = row.kernel
    literal = site.calls["literal"]
    k, v = torch.randn(1, 2, 330, 16), torch.randn(1, 2, 331, 16)
    if chain:
        with pytest.raises(RuntimeError) as want:
            model(q, k, v)
        with pytest.raises(RuntimeError, match=re.escape(str(want.value)[:40])):
            site(q, k, v)
    else:
        assert site(q, k, v).shape == (1, 2, 1, 16)
    assert site.calls["literal"] == literal + 1
    assert "k has 330 rows and v 331" in site.eager_calls_note
    assert site.fallback_reason is None  # later calls stay fused
    k, v = torch.randn(1, 2, 340, 16), torch.randn(1, 2, 340, 16)
    assert rel_err(site(q, k, v), model(q, k, v)) < 1e-5 and site.calls["literal"] == literal + 1


# ------------------------------------------------------------------------------------------------
# first-call verification
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def wrong_dense(monkeypatch):
    """A dense op that is wrong: its output is scaled by 1.5."""
    real = runtime.dense_fwd

    def wrong(*args):
        out, lse = real(*args)
        return out * 1.5, lse

    monkeypatch.setattr(runtime, "dense_fwd", wrong)


@pytest.mark.parametrize("capture", ["dynamo", "modules", "fx"])
def test_injected_wrong_kernel_is_caught(wrong_dense, capture):
    torch.manual_seed(0)
    model = Plain()
    x = torch.randn(2, 12, 32)
    fast = attncomp.optimize(model, capture=capture)
    with pytest.warns(UserWarning, match="first-call verification failed"):
        out = fast(x)
        if not attncomp.explain(fast).rows:  # capture="modules": the first call finds the owners eagerly
            out = fast(x)
    assert rel_err(out, model(x)) <= 1e-6  # the call that found it returns the eager result
    row = attncomp.explain(fast).rows[0]
    assert row.kernel.verify_state == "failed" and row.kernel.calls["fused"] == 0
    assert "first-call verification failed" in str(attncomp.explain(fast))
    assert "relative error 0.5" in str(attncomp.explain(fast))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning, not one per call
        assert rel_err(fast(x), model(x)) <= 1e-6
    assert row.kernel.calls["literal"] == 2 and row.kernel.calls["fused"] == 0


def test_injected_wrong_kernel_with_gradients(wrong_dense):
    torch.manual_seed(0)
    model = Plain()
    x = torch.randn(2, 12, 32, requires_grad=True)
    fast = attncomp.optimize(model)
    with pytest.warns(UserWarning, match="first-call verification failed"):
        out = fast(x)
    ref = model(x)
    (g,), (g_ref,) = torch.autograd.grad(out.sum(), [x]), torch.autograd.grad(ref.sum(), [x])
    assert rel_err(out, ref) <= 1e-6 and rel_err(g, g_ref) <= 1e-6


def test_injected_wrong_mha_kernel_is_caught(wrong_dense):
    torch.manual_seed(0)
    model = nn.MultiheadAttention(16, 2, batch_first=True).eval()
    x = torch.randn(2, 10, 16)

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = model

        def forward(self, x):
            return self.mha(x, x, x, need_weights=False)[0]

    fast = attncomp.optimize(Wrap())
    with pytest.warns(UserWarning, match="first-call verification failed"):
        out = fast(x)
    assert rel_err(out, model(x, x, x, need_weights=False)[0]) <= 1e-6


def test_verify_false_skips_the_check(wrong_dense):
    """Without verification nothing compares the kernel with eager: the injected error goes through
    (which shows that verification is what catches it)."""
    torch.manual_seed(0)
    model = Plain()
    x = torch.randn(2, 12, 32)
    fast = attncomp.optimize(model, verify=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = fast(x)
    assert rel_err(out, model(x)) > 0.4
    row = attncomp.explain(fast).rows[0]
    assert row.kernel.verify_state == "off" and "verified" not in str(attncomp.explain(fast))


def test_verification_budget_skips_and_reports(monkeypatch):
    monkeypatch.setattr(sitemodule, "VERIFY_BUDGET", 1024)
    torch.manual_seed(0)
    model = Plain()
    x = torch.randn(2, 12, 32)
    fast = attncomp.optimize(model)
    assert rel_err(fast(x), model(x)) <= 1e-5
    row = attncomp.explain(fast).rows[0]
    assert row.kernel.verify_state == "skipped"
    assert "not verified on the first call" in str(attncomp.explain(fast))


def test_verify_rejects_non_bool():
    with pytest.raises(TypeError, match="verify"):
        attncomp.optimize(Plain(), verify="yes")


def test_eager_form_is_the_sites_own_nodes_under_dropout():
    """Training dropout runs the site's own nodes: same random stream as the original model."""

    class Drop(Plain):
        def forward(self, x):
            B, N, C = x.shape
            q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
            p = F.dropout(((q @ k.transpose(-2, -1)) * 0.25).softmax(-1), 0.3, training=self.training)
            return (p @ v).transpose(1, 2).reshape(B, N, C)

    torch.manual_seed(0)
    model = Drop().train()
    x = torch.randn(2, 12, 32)
    fast = attncomp.optimize(model)
    torch.manual_seed(1)
    out = fast(x)
    torch.manual_seed(1)
    ref = model(x)
    assert torch.equal(out, ref)
    assert attncomp.explain(fast).rows[0].status == "replaced"
