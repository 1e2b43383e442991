"""Capture: module → ``torch.fx.GraphModule``(s).

* ``"dynamo"`` (default): Dynamo with attncomp's backend; graphs of torch-level ops, the rest of
  each graph runs as captured. Works on current transformers models, which fx cannot trace.
* ``"modules"``: Dynamo on each module that owns attention (:mod:`attncomp.modcapture`).
* ``"fx"``: ``torch.fx.symbolic_trace`` (with timm's leaf modules and autowrapped functions for
  timm models); a plain GraphModule that can be inspected and saved.
* ``"export"``: ``torch.export`` (aten graph), needs example inputs.
"""

from __future__ import annotations

import copy
import inspect

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from attncomp.ir.ops_table import NONE_WHEN

CAPTURES = ("dynamo", "modules", "fx", "export")


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


def _concrete_args(model: nn.Module, n_positional: int) -> dict:
    """Forward parameters not given positionally are fixed to their defaults while tracing."""
    params = list(inspect.signature(model.forward).parameters.values())[n_positional:]
    return {p.name: p.default for p in params
            if p.default is not inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD}


def trace_fx(model: nn.Module, n_positional: int | None = None) -> fx.GraphModule:
    """``symbolic_trace``, with timm's tracer settings for timm models.

    With ``n_positional``, forward parameters after the first ``n_positional`` are traced as
    constants equal to their defaults (e.g. ``is_causal=False``, ``attn_mask=None``).
    """
    concrete = None if n_positional is None else _concrete_args(model, n_positional)
    if _is_timm(model):
        from timm.layers import _fx as timm_fx

        class _TimmTracer(fx.Tracer):
            def is_leaf_module(self, m, qualname):
                if any(isinstance(m, t) for t in timm_fx.get_notrace_modules()):
                    return True
                return super().is_leaf_module(m, qualname)

        tracer = _TimmTracer(autowrap_functions=tuple(timm_fx.get_notrace_functions()))
        graph = tracer.trace(model, concrete_args=concrete)
        return fx.GraphModule(tracer.root, graph, type(model).__name__)
    return fx.symbolic_trace(model, concrete_args=concrete)


def fold_none_helpers(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace calls known to return None for their constant arguments (``ops_table.NONE_WHEN``)."""
    for node in list(gm.graph.nodes):
        pred = NONE_WHEN.get(node.target) if node.op == "call_function" else None
        if pred is not None and pred(node.args, node.kwargs):
            for user in list(node.users):
                user.args = tuple(None if a is node else a for a in user.args)
                user.kwargs = {k: (None if a is node else a) for k, a in user.kwargs.items()}
            gm.graph.erase_node(node)
    gm.recompile()
    return gm


def capture_fx(model: nn.Module, example_inputs: tuple) -> fx.GraphModule:
    gm = fold_none_helpers(trace_fx(model, len(example_inputs)))
    ShapeProp(gm).propagate(*example_inputs)
    return gm


def capture_export(model: nn.Module, example_inputs: tuple, example_kwargs: dict | None = None):
    ep = torch.export.export(model, tuple(example_inputs), kwargs=example_kwargs or {})
    return ep.module()


def graph_break_count() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())
