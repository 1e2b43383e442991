"""Public API: :func:`optimize` and :func:`explain`."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from attncomp import backend as backend_mod
from attncomp.backend import AttncompBackend
from attncomp.distributed import ContextParallel
from attncomp.frontend import budget, dynamic
from attncomp.frontend import capture as C
from attncomp.frontend.modcapture import ModuleCapture
from attncomp.frontend.rules import ROOT_LABEL, label_module_paths
from attncomp.hf.view import view_of
from attncomp.rewrite import SiteRecord, rewrite
from attncomp.runtime import autotune
from attncomp.strategies import for_site, parse, with_tolerance


class OptimizedModel(nn.Module):
    """A model whose attention sites run on attncomp kernels.

    Wraps a structural clone of the user's model: new module objects (own training flags and
    hooks) holding the *same* parameter and buffer tensors, so training either one updates both
    and the original's behaviour never changes. ``state_dict`` / ``load_state_dict`` use the
    original model's keys.

    Dynamo state is this model's own: its input dimensions become dynamic only once *it* has been
    called with them at two sizes (:class:`attncomp.frontend.dynamic.ShapeTracker`), its compiles
    have their own recompile counter, and one call's compiles are bounded by ``capture_budget``
    seconds (:mod:`attncomp.frontend.budget`), past which the model runs as written.
    """

    def __init__(self, model: nn.Module, strategy, capture: str, verify: bool = True, context_parallel=None,
                 capture_budget: float | None = None):
        super().__init__()
        self.model = C.clone_structure(model)
        self.capture = capture
        self.capture_budget = budget.resolve(capture_budget)
        self._shapes = dynamic.ShapeTracker()
        self._abandoned: str | None = None  # why the capture was given up (the model then runs eagerly)
        self._limit_note: str | None = None  # Dynamo's recompile limit was hit (warned once)
        self.verify, self.context_parallel = verify, context_parallel
        self.backend = AttncompBackend(strategy, verify=verify, context_parallel=context_parallel)
        self.backend.root = self.model  # Dynamo compiles self.model: its names are the model's
        self.graph_breaks = 0
        self._fx_records: list[SiteRecord] = []
        self._runner = None
        make = lambda: AttncompBackend(self.backend.strategy, verify=verify, context_parallel=context_parallel)  # noqa: E731
        self._modcap = (ModuleCapture(self.model, self.backend.strategy, make, for_site) if capture == "modules"
                        else None)

    # -- capture -------------------------------------------------------------------------------
    def _build(self, args: tuple, kwargs: dict) -> None:
        if self.capture == "dynamo":
            compiled = torch.compile(self.model, backend=self.backend, **dynamic.compile_options())
            object.__setattr__(self, "_runner", compiled)
            return
        if kwargs:
            raise ValueError(f"capture={self.capture!r} takes positional inputs only; got keyword "
                             f"arguments {sorted(kwargs)}")
        if self.capture == "fx":
            gm = C.capture_fx(self.model, args)
        else:
            gm = C.capture_export(self.model, args)
        label_module_paths(gm, self.model)
        rewrite(gm, self.backend.strategy, self._fx_records, verify=self.verify,
                context_parallel=self.backend.context_parallel)
        object.__setattr__(self, "_runner", gm)
        self.graph_module = gm

    def forward(self, *args, **kwargs):
        if self._abandoned is not None:
            return self._run_eager(args, kwargs)
        marks = []
        if self._modcap is not None:  # owners track their own input shapes (modcapture)
            run = self.model if self._modcap.first_done else self._modcap.first_call
        else:
            if self._runner is None:
                self._build(args, kwargs)
            if self.capture != "dynamo":
                return self._runner(*args)
            run = self._runner
            marks = self._shapes.observe(args, kwargs)
        before, hits = C.graph_break_count(), dynamic.limit_hits()
        try:
            with (budget.watch(self.capture_budget) as watch, dynamic.marked(marks),
                  dynamic.shared_room(backend_mod.STATS["graphs"] - self.graphs)):
                out = run(*args, **kwargs)
        except budget.CaptureBudgetExceeded:
            self._abandon()
            # the interrupted call runs again as written (a model with graph breaks may have run the graphs
            # before the interrupted frame already)
            return self._run_eager(args, kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as e:
            inner = getattr(e, "inner_exception", None)
            if isinstance(inner, ValueError) and str(inner).startswith("attncomp:"):
                raise inner from None  # attncomp's own refusal (context parallelism): the plain error
            raise
        except torch._dynamo.exc.TorchRuntimeError:
            # Dynamo failed while running the model on fake tensors: almost always inputs the model
            # cannot take (a wrong shape or dtype). Nothing real has run yet; run the model itself so
            # the error is the model's own, naming its op and shapes, as without attncomp.
            self._raise_eager_error(args, kwargs)
            raise
        self.graph_breaks += C.graph_break_count() - before
        if (watch is not None and watch.exceeded()) or (self._modcap is not None and self._modcap.abandoned):
            self._abandon()  # this call finished (owners past the budget ran eagerly); the next run eagerly
        if dynamic.limit_hits() > hits:
            self._warn_limit()
        return out

    def _run_eager(self, args: tuple, kwargs: dict):
        """The wrapped model as written (no Dynamo, no compiled owners)."""
        with self._modcap.eager() if self._modcap is not None else contextlib.nullcontext():
            return self.model(*args, **kwargs)

    def _abandon(self) -> None:
        """The capture ran past its budget: from now on the model runs eagerly (one warning)."""
        if self._abandoned is None:
            self._abandoned = budget.reason(self.capture_budget)
            warnings.warn(f"attncomp: {self._abandoned}", stacklevel=4)

    def _warn_limit(self) -> None:
        """Dynamo gave up on a frame of this model for its recompile limit: warn once, note it."""
        if self._limit_note is not None:
            return
        name = dynamic.limit_name()
        self._limit_note = (f"Dynamo hit its recompile limit (torch._dynamo.config.{name}="
                            f"{getattr(torch._dynamo.config, name)}) while running this model: the frame it "
                            "gave up on runs eagerly from now on, its attention sites unoptimized. The model "
                            "recompiles on (nearly) every call (new shapes or other guard failures: "
                            "TORCH_LOGS=recompiles names them); raise the limit if that is expected")
        warnings.warn(f"attncomp: {self._limit_note}", stacklevel=4)

    @property
    def capture_notes(self) -> list[str]:
        """Lines for ``explain``: an abandoned capture, a recompile limit hit, the dynamic dims."""
        lines = [x for x in (self._abandoned, self._limit_note) if x is not None]
        shapes = self._shapes.describe()
        return lines + ([shapes] if shapes else [])

    def _raise_eager_error(self, args: tuple, kwargs: dict) -> None:
        """Run the wrapped model eagerly on inputs Dynamo could not trace; its error (if any) is raised
        with a note that the inputs do not fit the model. Returns when the eager model accepts them."""
        try:
            with self._modcap.eager() if self._modcap is not None else contextlib.nullcontext():
                self.model(*args, **kwargs)
        except Exception as e:
            note = "attncomp: the optimized model cannot run these inputs; the original model raises the same error"
            if hasattr(e, "add_note"):
                e.add_note(note)
            raise e from None

    def __deepcopy__(self, memo):
        if self._modcap is None:  # the default deep copy (the compiled runner is a module over the clone)
            return copy._reconstruct(self, memo, *self.__reduce_ex__(4))
        # capture="modules": the owners' compiled forwards are bound to this clone's modules; the copy
        # is of the model as written, and captures on its own first call
        with self._modcap.eager():
            model = copy.deepcopy(self.model, memo)
        twin = OptimizedModel(model, self.backend.strategy, self.capture, self.verify, self.context_parallel,
                              self.capture_budget)
        memo[id(self)] = twin
        twin.training = self.training  # the copied modules keep their own flags
        return twin

    # -- the wrapped model's attributes ---------------------------------------------------------
    def __getattr__(self, name: str):
        """Attributes this wrapper lacks (``config``, ``generate``, ``generation_config``, ``device``,
        ``get_input_embeddings``, ``save_pretrained``, …) come from the wrapped model, through a view of it
        whose calls run this optimized model (:mod:`attncomp.hf.view`): ``fast.generate(...)`` runs
        attncomp's forward. The wrapper's own names (``model``, ``forward``, ``state_dict``, ``records``, …)
        come first."""
        try:
            return super().__getattr__(name)  # parameters, buffers, submodules (nn.Module)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("model")
            if name.startswith("__") or inner is None:
                raise
        try:
            return getattr(view_of(self, inner), name)
        except AttributeError:
            raise AttributeError(f"'{type(self).__name__}' object and the {type(inner).__name__} it wraps have no "
                                 f"attribute {name!r}") from None

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self, *args, **kwargs):
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.model.load_state_dict(state_dict, strict=strict, assign=assign)

    @property
    def records(self) -> list[SiteRecord]:
        if self._modcap is not None:
            return [r for g in self._modcap.groups.values() for r in g.records()]
        return list(self.backend.records.values()) if self.capture == "dynamo" else list(self._fx_records)

    @property
    def graphs(self) -> int:
        """Graphs compiled (Dynamo graphs, or the one fx / export graph once captured)."""
        if self._modcap is not None:
            return sum(b.graphs for b in self._modcap.backends)
        return self.backend.graphs if self.capture == "dynamo" else int(self._runner is not None)

    @property
    def dynamic_graphs(self) -> int:
        """Of :attr:`graphs`, those Dynamo traced with symbolic sizes (dynamic shapes)."""
        backends = self._modcap.backends if self._modcap is not None else [self.backend]
        return sum(b.dynamic_graphs for b in backends)


def optimize(model: nn.Module, strategy="auto", example_inputs=None, capture: str = "dynamo",
             example_kwargs: dict | None = None, tolerance: float | None = None, verify: bool = True,
             context_parallel=None, capture_budget: float | None = None) -> OptimizedModel:
    """Return a new module whose attention runs on attncomp kernels; ``model`` is not changed.

    Args:
        model: any ``nn.Module``.
        strategy: ``"auto"`` (exact strategies only), ``"dense"``, ``"local"``, ``"sparse"``,
            ``"linear"``, ``"tensor"``, a strategy object (``attncomp.Sparse(topk=4)``), or a dict
            from module-path patterns (fnmatch) to strategies.
        example_inputs: a tuple of positional inputs (or one tensor). When given, capture and
            planning happen here (the model runs once on them); otherwise on the first call.
        capture: ``"dynamo"`` (default: Dynamo on the whole model), ``"modules"`` (Dynamo on each
            module that owns attention, alike layers traced once: much faster to capture, but masks
            built outside those modules stay run-time tensors; see :mod:`attncomp.modcapture`),
            ``"fx"`` (``symbolic_trace``) or ``"export"``.
        example_kwargs: keyword inputs to pass with ``example_inputs`` (dynamo capture).
        tolerance: for approximate strategies (``"linear"``, ``Sparse(topk=…)``,
            ``Tensor(rank=…/degree=…)``): the largest relative error against the exact computation
            (dense attention, or the exact tensor kernel), measured per site on the first call
            (``example_inputs``), above which the site runs exactly instead; ``explain`` reports
            each measured error.
        verify: compare each replaced site's first fused call with the site's own eager computation on
            the same inputs (default); a site that disagrees beyond its dtype's tolerance runs eagerly
            from then on, with one warning, and ``explain`` shows the measured error. ``False`` skips
            the check (and its one-time cost: one eager evaluation of each site).
        context_parallel: ``True`` (the default process group), a ``torch.distributed`` process group, or
            ``attncomp.distributed.ContextParallel(group, layout)``: every replaced site runs as ring
            attention over the group; each rank calls the model on its shard of the sequence (with
            global position ids) in ``layout`` (``"contiguous"`` or ``"zigzag"``,
            :func:`attncomp.distributed.shard`). A site that cannot run as ring attention raises
            ``ValueError`` naming it.
        capture_budget: seconds that the Dynamo compiles of one call of the optimized model may take
            (``capture="dynamo"`` and ``"modules"``); default ``$ATTNCOMP_CAPTURE_BUDGET``, else
            120; ``float("inf")`` for none. A capture past it is stopped (within the trace) and the
            model runs as written from then on, with one warning and the reason in ``explain``.

    Dynamo is managed per optimized model: an input dimension becomes dynamic only once this model
    has been called with it at two sizes (so a text model called at three lengths compiles two
    graphs, static then dynamic), and other optimized models of the same class (which share its
    ``forward`` code) neither make its dimensions dynamic nor use up its recompile limit.

    Parameters and buffers are shared with ``model``, not copied.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize expects an nn.Module, got {type(model).__name__}")
    if capture not in C.CAPTURES:
        raise ValueError(f"capture must be one of {C.CAPTURES}, got {capture!r}")
    strategy = with_tolerance(parse(strategy), tolerance)  # validates early, with the list of options
    if capture == "export" and example_inputs is None:
        raise ValueError("capture='export' needs example_inputs")
    if not isinstance(verify, bool):
        raise TypeError(f"verify must be True or False, got {verify!r}")
    ContextParallel.of(context_parallel)  # validates
    fast = OptimizedModel(model, strategy, capture, verify, context_parallel, capture_budget)
    if example_inputs is not None:
        if isinstance(example_inputs, torch.Tensor):
            example_inputs = (example_inputs,)
        fast(*example_inputs, **(example_kwargs or {}))
        if fast._modcap is not None and fast._modcap.pending():
            fast(*example_inputs, **(example_kwargs or {}))  # owners found after their last call this time
    return fast


@dataclass
class Report:
    """What ``explain`` found: one row per attention site (see ``str(report)``)."""

    rows: list[SiteRecord] = field(default_factory=list)
    capture: str = "dynamo"
    graph_breaks: int = 0
    graphs: int = 0
    autotune_failures: list[dict] = field(default_factory=list)  # failed candidates (autotune.FAILURES)
    # the owner classes and their graphs (capture="modules"), an abandoned capture, a recompile limit
    # hit, the input dimensions made dynamic
    notes: list[str] = field(default_factory=list)
    abandoned: str | None = None  # why the capture was given up (the model runs as written)
    dynamic_graphs: int = 0  # of the graphs, those traced with symbolic sizes

    @property
    def replaced(self) -> list[SiteRecord]:
        return [r for r in self.rows if r.status == "replaced"]

    @property
    def left(self) -> list[SiteRecord]:
        return [r for r in self.rows if r.status == "left"]

    @property
    def kept(self) -> list[SiteRecord]:
        """Sites attncomp found and left as they are because it has nothing to gain there."""
        return [r for r in self.rows if r.status == "kept"]

    def __str__(self) -> str:
        head = ("site", "rule", "shapes", "mask", "strategy", "status", "reason")
        lines = []
        for r in self.rows:
            spec = r.spec
            reason = r.reason
            if r.kernel is not None and r.kernel.fallback_reason:
                reason = f"runs eager at call time: {r.kernel.fallback_reason}"
            note = getattr(r.kernel, "approx_note", lambda: None)()
            if note:
                reason = f"{reason}; {note}"
            if getattr(r.kernel, "eager_calls_note", None):
                reason = f"{reason}; {r.kernel.eager_calls_note}"
            if getattr(r.kernel, "verify_note", None):
                reason = f"{reason}; {r.kernel.verify_note}"
            lines.append((r.path or ROOT_LABEL, r.rule, str(spec.dims) if spec else "-",
                          str(spec.mask) if spec else "-", r.strategy, r.status, reason))
        widths = [max([len(h)] + [len(str(x[i])) for x in lines]) for i, h in enumerate(head)]
        widths[-1] = len(head[-1])
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        out = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
        out += [fmt.format(*map(str, x)) for x in lines]
        if not self.rows:
            yet = self.graphs == 0 and self.abandoned is None
            out.append("(no attention sites found" + (" yet: call the model once or pass example_inputs)"
                                                      if yet else ")"))
        kept = f"{len(self.kept)} kept (nothing to gain), " if self.kept else ""
        dyn = f" ({self.dynamic_graphs} with dynamic shapes)" if self.dynamic_graphs else ""
        out.append(f"{len(self.replaced)} replaced, {kept}{len(self.left)} left; capture={self.capture}, "
                   f"graphs={self.graphs}{dyn}, graph breaks={self.graph_breaks}")
        out += self.notes
        if self.graphs > 1 and self.capture == "dynamo":
            out.append("(Dynamo compiled several graphs — e.g. new shapes or grad modes — and each row shows "
                       "the site in the most recent one)")
        if self.autotune_failures:
            out.append(f"autotune: {len(self.autotune_failures)} candidate config(s) failed in this process "
                       "and were scored infinity (the others, or the heuristic, were used):")
            for f in self.autotune_failures:
                cfg = " ".join(f"{k}={v}" for k, v in f["config"].items())
                out.append(f"  {f['kernel']} [{cfg}] at {f['bucket']}: {f['error'][:200]}")
        return "\n".join(out)


def explain(model) -> Report:
    """The explain report of a model returned by :func:`optimize` (or a rewritten GraphModule)."""
    if isinstance(model, OptimizedModel):
        notes = (model._modcap.summary() if model._modcap is not None else []) + model.capture_notes
        rows = model.records
        if model._abandoned is not None:  # sites of graphs compiled before the budget ran out run eagerly too
            rows = [dataclasses.replace(r, status="left", reason=model._abandoned) for r in rows]
        return Report(rows, model.capture, model.graph_breaks, model.graphs, list(autotune.FAILURES), notes,
                      abandoned=model._abandoned, dynamic_graphs=model.dynamic_graphs)
    raise TypeError(f"explain expects a model returned by attncomp.optimize, got {type(model).__name__}")
