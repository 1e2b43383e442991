"""Mask analysis: masks built in the graph are recognised, and the proved equation holds numerically.

For every case the mask node is found through ``match.find_sites``, analysed, and the graph is run
(``fx.Interpreter``) to compare the mask's real value with ``dense_keep(static) & keep_fn(keep_src)``
(bool) or ``where(static & keep, 0, fill)`` (additive), broadcast to the mask's shape.
"""

import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from attncomp import ir
from attncomp.frontend import rules as match
from attncomp.frontend.capture import capture_fx
from attncomp.ir.program import AddBias, MaskFill
from attncomp.masks.analysis import KeyPadding, MaskFact, analyze_mask
from attncomp.masks.blocks import dense_keep

B, H, L, D = 2, 2, 12, 8
NEG = float("-inf")
MIN = torch.finfo(torch.float32).min


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def capture_dynamo(model: nn.Module, *args, **kwargs) -> tuple[fx.GraphModule, list]:
    """The first Dynamo graph of ``model(*args, **kwargs)`` and its example inputs."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=backend)(*args, **kwargs)
    assert len(graphs) == 1, "expected one graph (no graph break)"
    return graphs[0]


def mask_of(site) -> tuple[fx.Node | None, bool]:
    """The site's mask node and whether it is a masked_fill condition (True = hidden)."""
    if site.sdpa:
        return site.sdpa["attn_mask"], False
    for step in site.steps:
        if isinstance(step, MaskFill):
            return step.cond, step.hide_where
        if isinstance(step, AddBias) and isinstance(step.term, fx.Node):
            return step.term, False
    return None, False


def run_values(gm: fx.GraphModule, inputs) -> dict:
    """Every node's value when ``gm`` runs on ``inputs``."""
    vals = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            vals[n] = out = super().run_node(n)
            return out

    with torch.no_grad():
        Recorder(gm).run(*inputs)
    return vals


def check_equation(fact: MaskFact, vals: dict, node: fx.Node, negate: bool, Lq: int, Lk: int) -> None:
    """``value(node)`` equals what the fact says, element by element."""
    keep = dense_keep(fact.static.expr(), Lq, Lk)
    if fact.keep_src is not None:
        assert fact.role == "key_padding"
        keep = keep & fact.keep_fn(vals[fact.keep_src])
    value = vals[node]
    if fact.fill is None:
        assert value.dtype == torch.bool
        got, want = (~value if negate else value), keep
    else:
        assert fact.fill <= -1e30
        got, want = value, torch.where(keep, torch.tensor(0.0), torch.tensor(fact.fill)).to(value.dtype)
    shape = torch.broadcast_shapes(got.shape, want.shape)
    assert torch.equal(got.expand(shape), want.expand(shape))


def analyse_first_site(gm: fx.GraphModule, Lq: int, Lk: int):
    sites = [s for s in match.find_sites(gm) if isinstance(s, match.Site)]
    assert sites, "no attention site found"
    node, negate = mask_of(sites[0])
    return sites[0], node, negate, (analyze_mask(node, Lq, Lk, negate=negate) if node is not None else None)


# ---------------------------------------------------------------------------------------------
# transformers: the masks that Dynamo captures from real models
# ---------------------------------------------------------------------------------------------

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=64, intermediate_size=64)
TL = 20


def _model(name: str, impl: str) -> nn.Module:
    import transformers

    if name == "mistral":
        cfg = transformers.MistralConfig(**TINY, num_key_value_heads=1, sliding_window=8, attn_implementation=impl)
        return transformers.MistralModel(cfg).eval()
    if name == "llama":
        cfg = transformers.LlamaConfig(**TINY, num_key_value_heads=1, attn_implementation=impl)
        return transformers.LlamaModel(cfg).eval()
    if name == "gpt2":
        cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0,
                                      attn_implementation=impl)
        return transformers.GPT2Model(cfg).eval()
    cfg = transformers.BertConfig(**TINY, attn_implementation=impl)
    return transformers.BertModel(cfg).eval()


def _padding(kind: str, n: int = TL):
    if kind == "none":
        return None
    am = torch.ones(B, n, dtype=torch.long)
    if kind == "right":
        am[1, -5:] = 0
    else:
        am[1, :5] = 0
        am[0, :2] = 0  # rows differ: left padding of 2 and 5
    return am


STATIC = {"mistral": "window(7,0)", "llama": "causal", "gpt2": "causal", "bert": "full"}
HF_CASES = [(m, impl, pad) for m in STATIC for impl in ("eager", "sdpa") for pad in ("none", "right")] + [
    ("mistral", "sdpa", "left"), ("llama", "eager", "left"), ("gpt2", "sdpa", "left"), ("bert", "eager", "left")]


@pytest.mark.parametrize("name,impl,pad", HF_CASES, ids=["-".join(c) for c in HF_CASES])
def test_transformers_masks(name, impl, pad):
    pytest.importorskip("transformers")
    model = _model(name, impl)
    ids = torch.randint(0, 64, (B, TL))
    am = _padding(pad)
    gm, inputs = capture_dynamo(model, input_ids=ids, **({} if am is None else {"attention_mask": am}))
    site, node, negate, fact = analyse_first_site(gm, TL, TL)
    if node is None:
        # no mask in the graph: SDPA's own causal flag (llama, gpt2) or no mask at all (bert)
        assert pad == "none" and name in ("llama", "gpt2", "bert")
        assert site.sdpa.get("is_causal", False) == (name != "bert")
        return
    assert isinstance(fact, MaskFact), fact
    assert str(fact.static) == STATIC[name]
    assert (fact.fill is None) == (impl == "sdpa")
    assert (fact.keep_src is not None) == (am is not None)
    if am is not None:
        assert fact.keep_src.op == "placeholder" and fact.keep_fn == KeyPadding(0, TL)
    check_equation(fact, run_values(gm, inputs), node, negate, TL, TL)


@pytest.mark.parametrize("name,impl", [("llama", "sdpa"), ("mistral", "eager")], ids=["llama-sdpa-cache",
                                                                                     "mistral-eager-cache"])
def test_transformers_masks_with_cache(name, impl):
    """Decoding 8 tokens after 12 cached: queries are offset (cache_position); Mistral's cache keeps a window."""
    pytest.importorskip("transformers")
    model = _model(name, impl)
    ids, am = torch.randint(0, 64, (B, TL)), _padding("left")
    with torch.no_grad():
        past = model(input_ids=ids[:, :12], attention_mask=am[:, :12], use_cache=True).past_key_values
    gm, inputs = capture_dynamo(model, input_ids=ids[:, 12:], attention_mask=am, past_key_values=past, use_cache=True)
    sites = [s for s in match.find_sites(gm) if isinstance(s, match.Site)]
    node, negate = mask_of(sites[0])
    Lk = tuple(match.T.shape(node))[-1]
    fact = analyze_mask(node, 8, Lk)
    assert isinstance(fact, MaskFact), fact
    if name == "llama":  # key j visible from query i iff j <= i + 12
        assert fact.static == ir.Causal(12) and fact.keep_fn == KeyPadding(0, TL)
    else:  # the sliding cache holds the last 15 keys (positions 5..19): window of 8 in local indices
        assert Lk == 15 and fact.static == ir.Window(0, 7) and fact.keep_fn == KeyPadding(5, 15)
    check_equation(fact, run_values(gm, inputs), node, negate, 8, Lk)


# ---------------------------------------------------------------------------------------------
# synthetic masks, captured with Dynamo and with torch.fx.symbolic_trace
# ---------------------------------------------------------------------------------------------


class Chain(nn.Module):
    """Attention with a mask built by ``fn(q, k, v, *extra)``."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, q, k, v):
        return self.fn(q, k, v)


class ChainPad(Chain):
    def forward(self, q, k, v, pad):
        return self.fn(q, k, v, pad)


def _idx(lq, lk=None):
    """Query and key index tensors ``(lq, 1)``, ``(1, lk)``; sizes come from the inputs, so fx traces them."""
    return torch.arange(lq)[:, None], torch.arange(lq if lk is None else lk)[None, :]


def _sdpa(mask):
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask(q.shape[-2], k.shape[-2], q))


def _chain(mask, how):
    """Explicit chain; ``mask(lq, lk, q)`` used by masked_fill (True = hidden), where (True = kept) or add."""

    def fn(q, k, v):
        s, m = q @ k.transpose(-2, -1) * 0.3, mask(q.shape[-2], k.shape[-2], q)
        s = s.masked_fill(m, NEG) if how == "fill" else torch.where(m, s, NEG) if how == "where" else s + m
        return s.softmax(-1) @ v

    return fn


def _scores(q, k):
    return q @ k.transpose(-2, -1) * 0.3


def _flat2d(lq, lk, q):
    """3x4 image, flattened: keys within one row and one column of the query."""
    i, j = _idx(lq, lk)
    return ((i // 4 - j // 4).abs() <= 1) & ((i % 4 - j % 4).abs() <= 1)


def _natten2d(lq, lk, q):
    """NATTEN's 3x3 neighbourhood on a (lq // 4) x 4 image: windows centred on the query, clamped
    inside the image (shifted at the borders, not truncated)."""
    i, j = _idx(lq, lk)
    rows = lq // 4
    ci, cj = (i // 4).clamp(1, rows - 2), (i % 4).clamp(1, 2)
    return ((j // 4 - ci).abs() <= 1) & ((j % 4 - cj).abs() <= 1)


def _window_where(lq, lk, q):
    i, j = _idx(lq, lk)
    return torch.where((i - j < 5) & (j <= i), 0.0, MIN)


SYNTHETIC = {  # id: (attention fn, expected str(static), Lq, Lk)
    "synthetic-triu": (_chain(lambda lq, lk, q: q.new_ones(lq, lk).triu(1).bool(), "fill"), "causal", L, L),
    "synthetic-tril": (_sdpa(lambda lq, lk, q: torch.tril(q.new_ones(lq, lk, dtype=torch.bool))), "causal", L, L),
    "synthetic-arange-ge": (_chain(lambda lq, lk, q: _idx(lq)[0] >= _idx(lq)[1], "where"), "causal", L, L),
    "synthetic-abs-window": (_sdpa(lambda lq, lk, q: (_idx(lq)[0] - _idx(lq)[1]).abs() <= 3), "window(3,3)", L, L),
    "synthetic-block-diagonal": (_sdpa(lambda lq, lk, q: _idx(lq)[0] // 4 == _idx(lq)[1] // 4),
                                 "block_diagonal(4)", L, L),
    "synthetic-grid": (_sdpa(lambda lq, lk, q: _idx(lq)[0] % 3 == _idx(lq)[1] % 3), "grid(3)", L, L),
    "synthetic-prefix-lm": (_sdpa(lambda lq, lk, q: (_idx(lq)[1] < 4) | (_idx(lq)[1] <= _idx(lq)[0])),
                            "(prefix(4) | causal)", L, L),
    "synthetic-causal-offset": (_sdpa(lambda lq, lk, q: q.new_ones(lq, lk, dtype=torch.bool).tril(lk - lq)),
                                "causal(+10)", 6, 16),
    "synthetic-sliding-tril": (_sdpa(lambda lq, lk, q: q.new_ones(lq, lk).tril().bool() & ~q.new_ones(lq, lk).tril(-4)
                                     .bool()), "window(3,0)", L, L),
    "synthetic-additive-inf": (_chain(lambda lq, lk, q: q.new_full((lq, lk), NEG).triu(1), "add"), "causal", L, L),
    "synthetic-additive-where": (_chain(_window_where, "add"), "window(4,0)", L, L),
    "synthetic-reshape": (_sdpa(lambda lq, lk, q: (_idx(lq)[0] >= _idx(lq)[1]).reshape(lq * lk).view(1, 1, lq, lk)),
                          "causal", L, L),
    "synthetic-2d-local": (_sdpa(_flat2d), "predicate & predicate", L, L),
    "synthetic-natten-2d": (_sdpa(_natten2d), "neighborhood(5x4,k=3x3)", 20, 20),
}


def _qkv(lq, lk):
    return torch.randn(B, H, lq, D), torch.randn(B, H, lk, D), torch.randn(B, H, lk, D)


@pytest.mark.parametrize("capture", ["dynamo", "fx"])
@pytest.mark.parametrize("case", list(SYNTHETIC))
def test_synthetic_masks(case, capture):
    fn, want, lq, lk = SYNTHETIC[case]
    inputs = _qkv(lq, lk)
    model = Chain(fn)
    gm, inputs = capture_dynamo(model, *inputs) if capture == "dynamo" else (capture_fx(model, inputs), inputs)
    _, node, negate, fact = analyse_first_site(gm, lq, lk)
    assert isinstance(fact, MaskFact), fact
    assert str(fact.static) == want, fact.proof
    assert fact.keep_src is None and fact.role is None
    if case == "synthetic-2d-local":
        assert all(isinstance(p, ir.Predicate) for p in fact.static.parts)
    check_equation(fact, run_values(gm, inputs), node, negate, lq, lk)


def _pad_causal(q, k, v, pad):
    i, j = _idx(q.shape[-2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=(j <= i) & pad[:, None, None, :].bool())


def _pad_gather(q, k, v, pad):
    b = torch.arange(B)[:, None, None, None]
    j = torch.arange(2, L + 2)[None, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=pad.bool()[b, j])


@pytest.mark.parametrize("capture", ["dynamo", "fx"])
@pytest.mark.parametrize("fn,want,start", [(_pad_causal, "causal", 0), (_pad_gather, "full", 2)],
                         ids=["synthetic-keypad-unsqueeze", "synthetic-keypad-gather-offset"])
def test_synthetic_key_padding(fn, want, start, capture):
    pad = torch.ones(B, L + 2, dtype=torch.long) if start else torch.ones(B, L, dtype=torch.long)
    pad[0, -3:] = 0
    pad[1, :4] = 0
    inputs = (*_qkv(L, L), pad)
    model = ChainPad(fn)
    gm, inputs = capture_dynamo(model, *inputs) if capture == "dynamo" else (capture_fx(model, inputs), inputs)
    _, node, negate, fact = analyse_first_site(gm, L, L)
    assert isinstance(fact, MaskFact), fact
    assert str(fact.static) == want and fact.role == "key_padding"
    assert fact.keep_fn == KeyPadding(start, L)
    check_equation(fact, run_values(gm, inputs), node, negate, L, L)


# ---------------------------------------------------------------------------------------------
# refused: masks whose values are not known at compile time
# ---------------------------------------------------------------------------------------------


class Biased(nn.Module):
    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(L, L))

    def forward(self, q, k, v):
        return (_scores(q, k) + self.bias).softmax(-1) @ v


NEGATIVE = {  # id: (model, extra inputs, expected words in the reason)
    "neg-input-mask": (ChainPad(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m)),
                       (torch.rand(L, L) > 0.5,), "not as a key-padding mask"),
    "neg-parameter": (Biased(), (), "floating-point run-time tensor"),
    "neg-data-dependent": (Chain(lambda q, k, v: F.scaled_dot_product_attention(
        q, k, v, attn_mask=q.sum(-1, keepdim=True) > k.sum(-1)[..., None, :])), (), "not an index or mask op"),
    "neg-finite-fill": (Chain(_chain(lambda lq, lk, q: torch.where(_idx(lq)[1] <= _idx(lq)[0], 0.0, -1e4), "add")),
                        (), "fills with -10000"),
    "neg-padding-along-queries": (ChainPad(lambda q, k, v, pad: F.scaled_dot_product_attention(
        q, k, v, attn_mask=pad.bool()[:, None, :, None])), (torch.ones(B, L, dtype=torch.long),),
        "not as a key-padding mask"),
}


@pytest.mark.parametrize("case", list(NEGATIVE))
def test_refused(case):
    model, extra, words = NEGATIVE[case]
    gm, _ = capture_dynamo(model, *_qkv(L, L), *extra)
    _, node, negate, fact = analyse_first_site(gm, L, L)
    assert isinstance(fact, str) and words in fact, fact


def test_key_padding_fn_is_picklable():
    fn = pickle.loads(pickle.dumps(KeyPadding(2, 3)))
    x = torch.tensor([[1, 1, 0, 1, 1], [0, 0, 1, 1, 0]])
    assert fn(x).shape == (2, 1, 1, 3)
    assert fn(x)[:, 0, 0].tolist() == [[False, True, True], [True, True, False]]
    assert math.isfinite(fn.start)
