"""The Dynamo backend: ``torch.compile(model, backend="attncomp")``.

Receives Dynamo's ``fx.GraphModule`` s of torch-level ops, rewrites their attention sites
(:func:`attncomp.rewrite.rewrite`) and runs the graph as captured (``inner="eager"``).
"""

from __future__ import annotations

from torch import fx

from .rewrite import SiteRecord, rewrite
from .strategies import parse


class AttncompBackend:
    """A Dynamo backend bound to a strategy; keeps every site decision for ``explain``."""

    def __init__(self, strategy="auto"):
        self.strategy = parse(strategy)
        self.graphs = 0
        self.records: dict[tuple, SiteRecord] = {}

    def rewrite(self, gm: fx.GraphModule) -> fx.GraphModule:
        recs: list[SiteRecord] = []
        rewrite(gm, self.strategy, recs)
        self.graphs += 1
        for i, r in enumerate(recs):
            self.records[(r.path, r.rule, i)] = r
        return gm

    def __call__(self, gm: fx.GraphModule, example_inputs):
        return self.rewrite(gm).forward


def attncomp_backend(gm: fx.GraphModule, example_inputs, **options):
    """Entry point registered under ``torch_dynamo_backends`` as ``"attncomp"``."""
    return AttncompBackend(options.get("strategy", "auto"))(gm, example_inputs)
