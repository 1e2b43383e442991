"""The strategy registry: select_strategy asks each registered strategy in order, and adding one is a
request class, a plan function, an optional run hook and one registry line (here: a toy strategy that
runs a float64 naive kernel, registered for the test only)."""

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import attncomp
from attncomp import strategies
from attncomp.ir import AttentionSpec, Dims, Full, Plan
from attncomp.passes import select_strategy
from attncomp.strategies import Registered, Strategy
from conftest import rel_err

CALLS = {"run": 0}


@dataclass(frozen=True)
class Toy(Strategy):
    name = "toy"


def toy_plan(spec: AttentionSpec, requested: Strategy) -> Plan | str | None:
    if requested.name != "toy" or spec.kernel != "softmax":
        return None
    if spec.mask != Full():
        return "toy requested, but it takes unmasked sites only"
    return Plan(spec=spec, strategy="toy", reasons=("toy: naive float64 kernel",))


def toy_run(site, q, k, v, bias, scale, causal, keep):
    CALLS["run"] += 1
    groups = q.shape[1] // k.shape[1]
    k, v = (x.repeat_interleave(groups, 1) for x in (k, v))
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.double()
    return (s.softmax(-1) @ v.double()).to(q.dtype)


@pytest.fixture
def toy():
    saved, names = list(strategies.REGISTRY), dict(strategies.BY_NAME)
    strategies.register(Registered("toy", Toy, toy_plan, toy_run))  # the one registry line
    CALLS["run"] = 0
    yield
    strategies.REGISTRY[:] = saved
    strategies.BY_NAME.clear()
    strategies.BY_NAME.update(names)


class Chain(nn.Module):
    def __init__(self, causal=False):
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.causal = causal

    def forward(self, x):
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
        s = q @ k.transpose(-2, -1) / 8 ** 0.5
        if self.causal:
            L = x.shape[1]
            s = s.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
        return (s.softmax(-1) @ v).transpose(1, 2).reshape(x.shape)


def test_select_strategy_asks_the_registry_in_order(toy):
    spec = AttentionSpec(dims=Dims(1, 2, 2, 8, 8, 8, 8))
    assert select_strategy(spec, Toy()).strategy == "toy"
    assert select_strategy(spec, strategies.parse("toy")).strategy == "toy"  # parse knows the new name
    assert select_strategy(spec, strategies.Auto()).strategy == "dense"  # auto never asks for toy


def test_toy_strategy_runs_in_a_model(toy):
    torch.manual_seed(0)
    model = Chain()
    x = torch.randn(2, 12, 16)
    fast = attncomp.optimize(model, strategy="toy")
    assert rel_err(fast(x), model(x)) <= 1e-6
    row = attncomp.explain(fast).rows[0]
    assert row.plan.strategy == "toy" and CALLS["run"] == 1 and row.kernel.calls["fused"] == 1


def test_toy_refusal_reaches_explain(toy):
    torch.manual_seed(0)
    model = Chain(causal=True)
    x = torch.randn(2, 12, 16)
    fast = attncomp.optimize(model, strategy="toy")
    assert rel_err(fast(x), model(x)) <= 1e-5
    row = attncomp.explain(fast).rows[0]
    assert row.plan.strategy == "dense" and "toy requested, but it takes unmasked sites only" in row.reason
    assert CALLS["run"] == 0


def test_registering_a_name_twice_is_an_error(toy):
    with pytest.raises(ValueError, match="registered already"):
        strategies.register(Registered("toy", Toy, toy_plan, toy_run))
