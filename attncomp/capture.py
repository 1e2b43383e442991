"""Capture: module → ``torch.fx.GraphModule``(s).

* ``"dynamo"`` (default): Dynamo with attncomp's backend; graphs of torch-level ops, the rest of
  each graph runs as captured. Works on current transformers models, which fx cannot trace.
* ``"fx"``: ``torch.fx.symbolic_trace`` (with timm's leaf modules and autowrapped functions for
  timm models); a plain GraphModule that can be inspected and saved.
* ``"export"``: ``torch.export`` (aten graph), needs example inputs.
"""

from __future__ import annotations

import copy

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

CAPTURES = ("dynamo", "fx", "export")


def clone_structure(model: nn.Module, memo: dict | None = None) -> nn.Module:
    """New module objects, same Parameter and buffer tensors.

    The clone's training flags and hooks are its own, so switching ``.train()`` on the optimized
    model never touches the original; parameters and buffers are shared, not copied.
    """
    memo = {} if memo is None else memo
    if id(model) in memo:
        return memo[id(model)]
    new = copy.copy(model)
    memo[id(model)] = new
    new.__dict__ = dict(model.__dict__)
    new._parameters = dict(model._parameters)
    new._buffers = dict(model._buffers)
    for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                  "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
                  "_state_dict_hooks", "_load_state_dict_pre_hooks", "_state_dict_pre_hooks",
                  "_load_state_dict_post_hooks"):
        if hooks in model.__dict__:
            new.__dict__[hooks] = copy.copy(model.__dict__[hooks])
    new._modules = {k: (None if m is None else clone_structure(m, memo)) for k, m in model._modules.items()}
    return new


def _is_timm(model: nn.Module) -> bool:
    return type(model).__module__.startswith("timm.")


def trace_fx(model: nn.Module) -> fx.GraphModule:
    """``symbolic_trace``, with timm's tracer settings for timm models."""
    if _is_timm(model):
        from timm.layers import _fx as timm_fx

        class _TimmTracer(fx.Tracer):
            def is_leaf_module(self, m, qualname):
                if any(isinstance(m, t) for t in timm_fx.get_notrace_modules()):
                    return True
                return super().is_leaf_module(m, qualname)

        tracer = _TimmTracer(autowrap_functions=tuple(timm_fx.get_notrace_functions()))
        graph = tracer.trace(model)
        return fx.GraphModule(tracer.root, graph, type(model).__name__)
    return fx.symbolic_trace(model)


def capture_fx(model: nn.Module, example_inputs: tuple) -> fx.GraphModule:
    gm = trace_fx(model)
    ShapeProp(gm).propagate(*example_inputs)
    return gm


def capture_export(model: nn.Module, example_inputs: tuple, example_kwargs: dict | None = None):
    ep = torch.export.export(model, tuple(example_inputs), kwargs=example_kwargs or {})
    return ep.module()


def graph_break_count() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())
