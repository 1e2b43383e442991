"""Sites are named by the model's own module paths (``model.named_modules()``) under every capture,
also when Dynamo reaches the model through a ``def wrapper(*args, **kwargs)`` decorator on its
``forward`` (Dynamo then names modules ``L['args'][0].…``), and strategy dicts keyed by those paths
take effect."""

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attncomp
from attncomp.frontend.rules import ROOT_LABEL
from conftest import rel_err, tiny_gpt2

CAPTURES = ["dynamo", "modules", "fx", "export"]


def args_wrapper(forward):
    """A decorator of the kind some libraries put on ``forward``: ``self`` arrives in ``args``."""

    @functools.wraps(forward)
    def wrapper(*args, **kwargs):
        return forward(*args, **kwargs)

    return wrapper


class Attn(nn.Module):
    def __init__(self, d: int = 16, heads: int = 2):
        super().__init__()
        self.qkv, self.heads = nn.Linear(d, 3 * d), heads

    def forward(self, x):
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-1, -2)) * (D // self.heads) ** -0.5
        return (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, L, D)


class WrappedAttn(Attn):
    forward = args_wrapper(Attn.forward)


class Block(nn.Module):
    def __init__(self, attn: type):
        super().__init__()
        self.attn, self.mlp = attn(), nn.Linear(16, 16)

    def forward(self, x):
        return x + self.mlp(x + self.attn(x))


class Net(nn.Module):
    """Attention two levels down (``stages.<i>.<j>.attn``) and one SDPA call in its own forward."""

    def __init__(self, attn: type = Attn):
        super().__init__()
        self.stages = nn.ModuleList([nn.Sequential(Block(attn), Block(attn)) for _ in range(2)])
        self.head = nn.Linear(16, 16)

    def forward(self, x):
        for stage in self.stages:
            x = stage(x)
        q = self.head(x)[:, None]
        return F.scaled_dot_product_attention(q, q, q)[:, 0]


class WrappedNet(Net):
    forward = args_wrapper(Net.forward)


def _net(wrapped: bool) -> nn.Module:
    return WrappedNet(WrappedAttn).eval() if wrapped else Net().eval()


def _attention_modules(model: nn.Module, cls: type) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, cls)]


@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "args-wrapped"])
@pytest.mark.parametrize("capture", CAPTURES)
def test_paths_are_the_models_module_names(capture, wrapped):
    model, x = _net(wrapped), torch.randn(2, 8, 16)
    fast = attncomp.optimize(model, "dense", example_inputs=(x,), capture=capture)  # SDPA without a mask too
    report = attncomp.explain(fast)
    # the model's own forward is "" in named_modules() and in the report, shown as <model>
    assert sorted(r.path for r in report.rows) == sorted(["", *_attention_modules(model, Attn)]), str(report)
    assert {r.path for r in report.rows} <= {name for name, _ in model.named_modules()}
    assert all(r.status == "replaced" for r in report.rows), str(report)
    assert [line.split()[0] for line in str(report).splitlines()[2:] if "sdpa_call" in line] == [ROOT_LABEL]
    assert rel_err(fast(x), model(x)) <= 1e-5


@pytest.mark.parametrize("capture", CAPTURES)
def test_strategy_dict_keyed_by_those_paths(capture):
    model, x = _net(wrapped=True), torch.randn(2, 8, 16)
    chosen = _attention_modules(model, Attn)[1]
    fast = attncomp.optimize(model, strategy={chosen: "dense", ROOT_LABEL: "dense"}, example_inputs=(x,),
                             capture=capture)
    report = attncomp.explain(fast)
    assert sorted(r.path for r in report.replaced) == sorted(["", chosen]), str(report)
    assert {r.path for r in report.left} == set(_attention_modules(model, Attn)) - {chosen}
    assert all("no strategy pattern matches" in r.reason for r in report.left)
    assert rel_err(fast(x), model(x)) <= 1e-5


def _wrapped_llama():
    transformers = pytest.importorskip("transformers")

    class WrappedLlama(transformers.LlamaForCausalLM):
        forward = args_wrapper(transformers.LlamaForCausalLM.forward)

    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64, attn_implementation="eager")
    return WrappedLlama(cfg).eval(), transformers.models.llama.modeling_llama.LlamaAttention


def _gpt2():
    transformers = pytest.importorskip("transformers")
    return tiny_gpt2(n_layer=3).eval(), transformers.models.gpt2.modeling_gpt2.GPT2Attention


@pytest.mark.parametrize("make", [_wrapped_llama, _gpt2], ids=["llama-args-wrapped", "gpt2"])
@pytest.mark.parametrize("capture", ["dynamo", "modules"])
def test_transformers_paths_and_strategy_by_path(make, capture):
    model, attn_cls = make()
    names = _attention_modules(model, attn_cls)
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        fast = attncomp.optimize(model, example_inputs=(ids,), capture=capture)
        assert [r.path for r in attncomp.explain(fast).replaced] == names, str(attncomp.explain(fast))

        # "<first layer's parent>.*": only that layer's site is replaced
        pattern = names[0].rsplit(".", 1)[0] + ".*"
        fast = attncomp.optimize(model, strategy={pattern: "dense"}, example_inputs=(ids,), capture=capture)
        report = attncomp.explain(fast)
        assert [r.path for r in report.replaced] == names[:1], str(report)
        assert [r.path for r in report.left] == names[1:], str(report)
        ref, out = model(ids), fast(ids)
    hidden = "logits" if "logits" in ref else "last_hidden_state"
    assert rel_err(out[hidden], ref[hidden]) <= 1e-5
