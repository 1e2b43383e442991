"""The Dynamo backend: ``torch.compile(model, backend="attncomp")``.

Registered under the ``torch_dynamo_backends`` entry point as ``"attncomp"``, so it works by name
right after install. It receives Dynamo's ``fx.GraphModule`` s of torch-level ops, rewrites their
attention sites with the same rules and passes as :func:`attncomp.optimize`
(:func:`attncomp.rewrite.rewrite`), and hands the rewritten graph to an inner compiler:

* ``"inductor"`` — default for ``torch.compile(..., backend="attncomp")``: everything but the
  attention sites is compiled by Inductor; each site stays one call of the custom op
  ``attncomp::dense_fwd`` (opaque to Inductor, with a fake impl and an autograd formula).
* ``"eager"`` — the rewritten graph runs as captured. :func:`attncomp.optimize` uses this: no
  Inductor compile time, and each site's call counters in ``explain`` count real calls.
* any other registered Dynamo backend name, or a backend callable ``(gm, example_inputs)``.

Options: ``torch.compile(m, backend="attncomp", options={"inner": "eager", "strategy": "dense"})``;
other keys are passed to Inductor as config patches (``{"max_autotune": True}``).

Dynamic shapes: the rewrite does not specialise on sizes, so after a dynamic recompile (Dynamo's
automatic dynamic under ``torch.compile``; under :func:`attncomp.optimize`, attncomp's own marks,
:mod:`attncomp.frontend.dynamic`) a new sequence length reuses the graph; attncomp's Triton kernels are keyed on
compile-time flags only, and their tuned configs on power-of-two shape buckets. A mask of such a
graph is proved for every length when its predicate holds no size; a mask whose proof needs the
example sizes specialises the graph to them instead: each such size gets a Dynamo guard
(``size == example``, :class:`attncomp.frontend.guards.SizeGuards`), installed after the rewrite,
so another length recompiles. No mask is checked per call. ``dynamic_graphs`` counts the graphs
traced with symbolic sizes. Inside an optimized model's call the backend is a safe point to stop a
capture past its time budget (:func:`attncomp.frontend.budget.check`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import fx, nn

from attncomp.distributed import ContextParallel
from attncomp.frontend import budget
from attncomp.frontend.guards import SizeGuards
from attncomp.frontend.rules import label_module_paths
from attncomp.rewrite import SiteRecord, rewrite
from attncomp.strategies import parse

INNER = ("inductor", "eager")

# Graphs rewritten by any AttncompBackend in this process (a Dynamo compile or recompile each).
STATS: dict[str, int] = {"graphs": 0}


def _inner_compiler(inner) -> Callable:
    """The compiler the rewritten graph goes to: ``(gm, example_inputs) -> callable``."""
    if callable(inner):
        return inner
    if inner == "eager":
        return lambda gm, example_inputs: gm.forward
    if not isinstance(inner, str):
        raise ValueError(f"inner must be 'inductor', 'eager', a Dynamo backend name or a callable; got {inner!r}")
    if inner == "attncomp":
        raise ValueError("inner='attncomp' would rewrite the graph twice; use 'inductor' or 'eager'")
    from torch._dynamo import list_backends, lookup_backend

    try:
        return lookup_backend(inner)
    except Exception as e:  # torch raises InvalidBackend, a private class
        raise ValueError(f"unknown inner compiler {inner!r}; expected 'inductor', 'eager' or one of "
                         f"{list_backends()}") from e


@contextlib.contextmanager
def _no_size_guards(example_inputs):
    """Analysis reads sizes (for ``Dims`` and the explain table) as their example values; under
    dynamic shapes that must not add guards that specialise the graph to those sizes (it would
    recompile for every new length). The rewrite depends on a size's value only where a mask proof
    needs it, and then guards it deliberately (:class:`attncomp.frontend.guards.SizeGuards`, installed
    after this context); the kernels take sizes at run time."""
    from torch._guards import detect_fake_mode

    mode = detect_fake_mode(example_inputs)
    env = getattr(mode, "shape_env", None)
    with env.suppress_guards() if env is not None else contextlib.nullcontext():
        yield


def _symbolic(example_inputs) -> bool:
    """Some graph input has a symbolic size (the graph was traced with dynamic shapes)."""
    return any(isinstance(e, torch.SymInt) or (isinstance(e, torch.Tensor) and
                                               any(isinstance(s, torch.SymInt) for s in e.shape))
               for e in example_inputs)


class AttncompBackend:
    """A Dynamo backend bound to a strategy and an inner compiler; keeps every site decision for
    ``explain`` (``records``) and counts the graphs it compiled (``graphs``)."""

    def __init__(self, strategy="auto", inner="eager", inner_options: dict | None = None, verify: bool = True,
                 context_parallel=None):
        self.strategy = parse(strategy)
        self.inner = inner
        self.inner_options = dict(inner_options or {})
        if self.inner_options and inner != "inductor":
            raise ValueError(f"options {sorted(self.inner_options)} are Inductor config patches, but inner={inner!r}")
        self._compile = _inner_compiler(inner)
        # first-call verification needs the sites to run as captured too (a compiler traces them once)
        self.verify = verify and inner == "eager"
        self.context_parallel = ContextParallel.of(context_parallel)
        self.graphs = 0
        self.dynamic_graphs = 0  # of them, graphs with symbolic sizes (dynamic shapes)
        self.records: dict[tuple, SiteRecord] = {}
        # The module Dynamo compiles (set by attncomp.optimize): site paths are resolved against it,
        # so they are the model's own names. Without it (torch.compile(backend="attncomp")), they
        # are read from Dynamo's metadata as they are.
        self.root: nn.Module | None = None

    def rewrite(self, gm: fx.GraphModule, guards: SizeGuards | None = None) -> fx.GraphModule:
        """Rewrite ``gm``'s attention sites in place (records kept for ``explain``); sizes a mask proof
        specialises the graph to are requested from ``guards`` (the caller installs them)."""
        if self.root is not None:
            label_module_paths(gm, self.root)
        recs: list[SiteRecord] = []
        rewrite(gm, self.strategy, recs, guards=guards, verify=self.verify, context_parallel=self.context_parallel)
        self.graphs += 1
        STATS["graphs"] += 1
        for i, r in enumerate(recs):
            self.records[(r.path, r.rule, i)] = r
        return gm

    def __call__(self, gm: fx.GraphModule, example_inputs):
        budget.check()  # an optimized model's capture past its time budget stops here (after tracing)
        self.dynamic_graphs += _symbolic(example_inputs)
        guards = SizeGuards()
        with _no_size_guards(example_inputs):
            gm = self.rewrite(gm, guards)
        guards.install()  # outside the suppression: the graph is valid at the specialised sizes only
        budget.check()
        if self.inner == "inductor" and self.inner_options:
            from torch._inductor.compile_fx import compile_fx

            return compile_fx(gm, example_inputs, config_patches=self.inner_options)
        return self._compile(gm, example_inputs)


def attncomp_backend(gm: fx.GraphModule, example_inputs, mode: str | None = None, options: dict | None = None):
    """Entry point registered under ``torch_dynamo_backends`` as ``"attncomp"``.

    ``torch.compile(model, backend="attncomp", options={...})``: ``strategy`` (default ``"auto"``),
    ``inner`` (default ``"inductor"``); remaining keys are Inductor config patches. ``mode``
    (``"max-autotune"``...) is Inductor's (torch.compile accepts ``mode`` or ``options``, not both)."""
    opts = dict(options or {})
    strategy = opts.pop("strategy", "auto")
    inner = opts.pop("inner", "inductor")
    if mode and mode != "default":
        if inner != "inductor":
            raise ValueError(f"mode={mode!r} is an Inductor mode, but inner={inner!r}")
        from torch._inductor import list_mode_options

        opts = {**list_mode_options(mode), **opts}
    return AttncompBackend(strategy, inner, opts)(gm, example_inputs)
