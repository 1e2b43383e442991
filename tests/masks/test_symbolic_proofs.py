"""Mask proofs that hold for every length.

A graph with symbolic sizes (Dynamo's automatic-dynamic recompile) has its mask read with the sizes as
symbols: a predicate that holds no size is proved for every length, so the rewrite drops the mask's
subgraph and no call computes or checks an Lq x Lk tensor; a predicate that does hold a size is proved
at the example shape and the graph is specialised to it (a guard), never claimed general.
"""

import pytest
import sympy as sp
import torch
import torch.nn.functional as F
from torch import nn
from torch._guards import detect_fake_mode
from torch.utils._python_dispatch import TorchDispatchMode

import attncomp
from attncomp.masks.analysis import analyze_mask
from attncomp.masks.blocks import dense_keep
from attncomp.masks.sym import Size, SizeDependent
from conftest import rel_err

# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------


class SlidingWindowLM(nn.Module):
    """examples/quickstart.py's decoder, small: the (L, L) keep-mask of a causal window of ``window``
    keys is built from ``arange`` in ``forward`` and handed to SDPA by every layer.
    input_ids ``(B, L)`` int64 → ``(B, L, dim)``."""

    def __init__(self, vocab=50, dim=32, heads=2, depth=2, window=16):
        super().__init__()
        self.heads, self.window = heads, window
        self.embed = nn.Embedding(vocab, dim)
        self.qkv = nn.ModuleList(nn.Linear(dim, 3 * dim) for _ in range(depth))
        self.mlp = nn.ModuleList(nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
                                 for _ in range(depth))

    def forward(self, input_ids):
        B, L = input_ids.shape
        i = torch.arange(L, device=input_ids.device)
        keep = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - self.window)
        x = self.embed(input_ids)
        for qkv, mlp in zip(self.qkv, self.mlp):
            q, k, v = qkv(x).view(B, L, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            x = x + F.scaled_dot_product_attention(q, k, v, attn_mask=keep).transpose(1, 2).reshape(B, L, -1)
            x = x + mlp(x)
        return x


class SizedMask(nn.Module):
    """One SDPA site over ``P`` learned memory keys prepended to the sequence's (Lk = L + P), under
    ``mask(Lq, Lk)``. x ``(B, L, 16)`` → ``(B, L, 16)``."""

    P, H = 4, 2

    def __init__(self, mask):
        super().__init__()
        self.qkv, self.mask = nn.Linear(16, 48), mask
        self.mem = nn.Parameter(torch.randn(2, 1, self.H, self.P, 8))

    def forward(self, x):
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.H, 8).permute(2, 0, 3, 1, 4)
        k = torch.cat([self.mem[0].expand(B, -1, -1, -1), k], 2)
        v = torch.cat([self.mem[1].expand(B, -1, -1, -1), v], 2)
        Lq, Lk = q.shape[-2], k.shape[-2]
        keep = self.mask(torch.arange(Lq)[:, None], torch.arange(Lk)[None, :], Lq, Lk)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep).transpose(1, 2).reshape(B, L, -1)


def causal_after_memory(q, kv, Lq, Lk):  # kv <= q + (Lk - Lq): the sizes cancel (Lk - Lq = P)
    return kv <= q + (Lk - Lq)


def causal_or_first_half(q, kv, Lq, Lk):  # prefix-LM: the first Lk // 2 keys are seen by all; holds a size
    return (kv <= q + (Lk - Lq)) | (kv < Lk // 2)


class NumelRecorder(TorchDispatchMode):
    """Records every op's output element count (``numel[i] = (op, n)``), the compiled graph's ops
    included (``ignore_compile_internals``: Dynamo runs its compiled code under the mode instead of
    falling back to the eager model)."""

    def __init__(self):
        super().__init__()
        self.numel: list = []

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel.append((str(func), t.numel()))
        return out


def _rows(fast):
    rep = attncomp.explain(fast)
    assert rep.replaced, str(rep)
    return rep, rep.replaced


# ---------------------------------------------------------------------------------------------
# (a) a sliding window proved for every length: no Lq x Lk tensor in steady state
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def test_sliding_window_steady_state_builds_no_lq_by_lk_tensor():
    model = SlidingWindowLM().eval()
    fast = attncomp.optimize(model)
    for L in (256, 320, 384):  # the second length recompiles with symbolic sizes
        ids = torch.randint(0, 50, (1, L))
        assert rel_err(fast(ids), model(ids)) <= 1e-5
    # long enough for the window to leave most tiles empty (at high density the executor runs the dense
    # kernel on the materialised mask, which is faster there)
    L = 512
    ids = torch.randint(0, 50, (1, L))
    fused = [r.kernel.calls["fused"] for r in attncomp.explain(fast).replaced]
    with NumelRecorder() as rec:
        out = fast(ids)
    assert rel_err(out, model(ids)) <= 1e-5
    # the sites ran their kernels under the recorder (in inference they call their executors directly)
    assert [r.kernel.calls["fused"] for r in attncomp.explain(fast).replaced] == [n + 1 for n in fused]
    assert rec.numel, "the compiled graph did not run under the recorder"
    big = [(op, n) for op, n in rec.numel if n >= L * L]
    assert not big, f"steady state at L={L} built Lq x Lk-sized tensors: {big}"
    rep, rows = _rows(fast)
    assert rep.graphs == 2, str(rep)  # L=384 and L=512 reused the dynamic graph
    for r in rows:
        assert str(r.spec.mask) == "window(15,0)" and r.strategy != "eager", str(rep)
        assert "proved for every length" in r.reason and "specialised" not in r.reason
        assert r.kernel.calls["literal"] == 0


# ---------------------------------------------------------------------------------------------
# (b) transformers' masks (causal AND right padding) proved for every length
# ---------------------------------------------------------------------------------------------


def _hf(name: str, impl: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    if name == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=64, bos_token_id=0,
                                      eos_token_id=0, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_implementation=impl, use_cache=False)
        return transformers.GPT2Model(cfg).eval()
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                   vocab_size=64, intermediate_size=64, attn_implementation=impl, use_cache=False)
    return transformers.LlamaModel(cfg).eval()


@pytest.mark.parametrize("name,impl", [("gpt2", "sdpa"), ("gpt2", "eager"), ("llama", "sdpa"), ("llama", "eager")])
@torch.no_grad()
def test_transformers_right_padding_is_proved_for_every_length(name, impl):
    model = _hf(name, impl)
    fast = attncomp.optimize(model)
    for L in (12, 16, 21):
        ids = torch.randint(0, 64, (2, L))
        mask = torch.ones(2, L, dtype=torch.long)
        mask[1, L - 5:] = 0
        ref = model(ids, attention_mask=mask).last_hidden_state
        out = fast(ids, attention_mask=mask).last_hidden_state
        keep = mask.bool()
        assert rel_err(out[keep], ref[keep]) <= 1e-5
    rep, rows = _rows(fast)
    assert rep.graphs == 2 and len(rows) == 2, str(rep)
    for r in rows:
        assert str(r.spec.mask) == "causal & key_padding", str(rep)
        assert "proved for every length" in r.reason and "specialised" not in r.reason, r.reason
        assert r.kernel.calls["literal"] == 0


# ---------------------------------------------------------------------------------------------
# (c) masks that depend on a size: never claimed general, right at every length
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def test_sizes_that_cancel_give_a_general_proof():
    model = SizedMask(causal_after_memory).eval()
    fast = attncomp.optimize(model)
    for L in (12, 16, 20, 24):
        x = torch.randn(2, L, 16)
        assert rel_err(fast(x), model(x)) <= 1e-5
    rep, (row,) = _rows(fast)
    assert rep.graphs == 2 and str(row.spec.mask) == "causal(+4)", str(rep)
    assert "proved for every length" in row.reason


@torch.no_grad()
def test_a_mask_holding_a_size_is_specialised_and_exact_at_every_length():
    model = SizedMask(causal_or_first_half).eval()
    fast = attncomp.optimize(model)
    lengths = (12, 16, 20, 24, 16)
    for L in lengths:
        x = torch.randn(2, L, 16)
        assert rel_err(fast(x), model(x)) <= 1e-5
    rep, (row,) = _rows(fast)
    assert rep.graphs == len(set(lengths)), str(rep)  # each new length recompiled: the guard held
    assert "specialised to 24x28 (guard" in row.reason and "mask is proved for every length" not in row.reason
    assert "not proved for every length: the predicate depends on the size(s)" in row.reason
    assert row.kernel.calls["literal"] == 0
    # the guard is on the lengths only: a new batch size recompiles once (the batch becomes dynamic), then no more
    for B in (3, 4, 5):
        x = torch.randn(B, 16, 16)
        assert rel_err(fast(x), model(x)) <= 1e-5
    assert attncomp.explain(fast).graphs == len(set(lengths)) + 1


# ---------------------------------------------------------------------------------------------
# (d) the reader on small graphs with symbolic sizes (torch.compile(dynamic=True))
# ---------------------------------------------------------------------------------------------


def _prove(fn, *args, Lq: int | None = None, Lk: int | None = None):
    """What ``analyze_mask`` proves for ``fn``'s returned mask in its Dynamo graph with symbolic sizes
    (``dynamic=True``), on the ``(Lq, Lk)`` grid (default: the mask's last two extents)."""
    want = fn(*args)
    Lq, Lk = Lq or want.shape[-2], Lk or want.shape[-1]
    facts = []

    def backend(gm, example_inputs):
        node = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        node = node[0] if isinstance(node, (tuple, list)) else node
        with detect_fake_mode(example_inputs).shape_env.suppress_guards():
            facts.append(analyze_mask(node, Lq, Lk, hint=True))
        return gm.forward

    torch.compile(fn, backend=backend, dynamic=True)(*args)
    fact, = facts
    assert not isinstance(fact, str), fact
    return fact


def _holds_at(fact, fn, *args) -> bool:
    """Whether ``fn(*args)`` (a bool keep-mask, no run-time part) is ``fact.static`` at its own shape."""
    got = fn(*args)
    want = dense_keep(fact.static.expr(), got.shape[-2], got.shape[-1])
    return torch.equal(got, want.expand(got.shape))


def window(x):
    i = torch.arange(x.shape[0])
    return (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - 4)


def half(x):
    i = torch.arange(x.shape[0])
    return (i[None, :] < x.shape[0] // 2).expand(x.shape[0], -1)


def diagonal_from_size(x):
    return torch.ones(x.shape[0], x.shape[0], dtype=torch.bool).tril(x.shape[0] // 4)


def last_rows(x):  # rows L.. of an (L + 3)-square causal table: kv <= q + 3 at every L; read as [-L:]
    i = torch.arange(x.shape[0] + 3)
    return (i[None, :] <= i[:, None])[-x.shape[0]:, 3:]


def documents(x):  # equal documents of 4 tokens; the reshapes keep the symbolic extent whole
    d = (torch.arange(x.shape[0]) // 4).view(1, -1).reshape(-1)
    return d[:, None] == d[None, :]


def documents_by_view(x):  # the same, but viewed (L // 4, 4): whether L == 4 * (L // 4) depends on L
    d = torch.arange(x.shape[0]).view(-1, 4)[:, :1].expand(-1, 4).reshape(-1)
    return d[:, None] == d[None, :]


def with_past(x, past: int):  # a past length (a SymInt input) enters the predicate
    i = torch.arange(x.shape[0])
    return i[None, :] <= i[:, None] + past


@pytest.mark.parametrize("fn,kind", [(window, "window(3,0)"), (documents, "block_diagonal(4)")],
                         ids=["window", "documents"])
def test_reader_proves_a_size_free_predicate_for_every_length(fn, kind):
    fact = _prove(fn, torch.zeros(24))
    assert fact.general and fact.sizes == () and str(fact.static) == kind, fact.proof
    assert "proved for every length" in fact.proof
    for L in (8, 28, 44):  # the claim, tested at other lengths
        assert _holds_at(fact, fn, torch.zeros(L))


@pytest.mark.parametrize("fn", [half, diagonal_from_size, last_rows, documents_by_view],
                         ids=["half", "tril-of-size", "negative-slice", "view-of-size"])
def test_reader_does_not_claim_a_size_dependent_proof_general(fn):
    fact = _prove(fn, torch.zeros(24))
    assert not fact.general and fact.sizes, fact.proof
    assert all(isinstance(s, torch.SymInt) for s in fact.sizes)
    assert "not proved for every length" in fact.proof
    assert _holds_at(fact, fn, torch.zeros(24))  # at the example shape it holds


def test_reader_sees_a_symint_input_enter_the_predicate():
    fact = _prove(with_past, torch.zeros(12), 5)
    assert not fact.general and str(fact.static) == "causal(+5)", fact.proof


def causal_and_padding(x, am):
    i = torch.arange(x.shape[0])
    return (i[None, :] <= i[:, None]) & am.bool()[:, None, None, :]


def test_key_padding_to_the_end_of_a_symbolic_width_is_general():
    fact = _prove(causal_and_padding, torch.zeros(16), torch.ones(2, 16, dtype=torch.long))
    assert fact.general and fact.role == "key_padding" and fact.keep_fn.length is None, fact.proof
    assert str(fact.static) == "causal"
    am = torch.ones(2, 30, dtype=torch.long)
    am[1, 20:] = 0
    assert torch.equal(fact.keep_fn(am), am.bool()[:, None, None, :])


def test_size_comparisons_hold_for_every_size_or_refuse():
    s = sp.Symbol("s0", integer=True, positive=True)
    L = Size(24, s, {s: 2})
    assert (L == 1) is False and (L > 1) is True and L + 3 - L == 3 and type(L + 3 - L) is int
    assert (L + 4 == L + 4) is True and sp.sympify(L * 2) == 2 * s
    with pytest.raises(SizeDependent):
        _ = L == 24  # holds at the example only
    with pytest.raises(SizeDependent):
        _ = L < 30
    with pytest.raises(SizeDependent):
        _ = L / 2
    with pytest.raises(TypeError):
        int(L)  # no silent example value
