"""``capture="modules"``: Dynamo on each attention module instead of on the whole model.

A 12-layer transformer costs Dynamo about as many traces as it has layers when the whole model is
captured (≈ 0.2 s each for transformers' GPT-2 on CPU, plus the model's own preamble). Here only
the modules that *own* an attention computation are compiled, and all instances of one module
class share one Dynamo code cache, so alike layers are traced once.

How the owners are found: the first call runs the model eagerly (its output is that call's
result) under a :class:`torch.overrides.TorchFunctionMode` that notes every softmax, SDPA and
``F.multi_head_attention_forward`` call together with the stack of modules running it. A softmax
whose result reaches a matmul-like op within a few ops is attention; its owner is the innermost
module that ran the matmul before it, the softmax and the matmul after it, and does not return the
probabilities (transformers' attention modules return them and their callers drop them: there the
caller is the owner). SDPA and MHA calls start from the module that makes them. As soon as an
owner is known, every instance of its class in
the (cloned) model gets a compiled ``forward``: later layers of that same first call already run
it, so the Dynamo trace happens within the first call.

What it trades: each owner is traced on its own, so a mask built *outside* it (transformers builds
one in the model and passes it down) reaches the rewrite as a run-time tensor instead of being
proved causal or key padding from the ops that built it; ``capture="dynamo"`` proves those. Linear
attention written without a softmax is not found here (``capture="dynamo"`` finds it). Instances
that Dynamo must specialise (a KV cache indexed by the layer number) are traced once each.

Shapes: each owner instance keeps its own :class:`attncomp.frontend.dynamic.ShapeTracker`, seeded
with the inputs it ran at in the discovery call; an input dimension is marked dynamic only once that
instance has seen it vary. Instances of one class at different sizes (the stages of a Swin-like
model) each get a static graph instead of making the class's graph symbolic. A compile past the
capture budget (:mod:`attncomp.frontend.budget`) makes that owner, and every owner after it, run as
written (:attr:`ModuleCapture.abandoned`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

if TYPE_CHECKING:
    from attncomp.backend import AttncompBackend

from attncomp.frontend.budget import CaptureBudgetExceeded
from attncomp.frontend.dynamic import ShapeTracker, compile_options, marked, recompile_room
from attncomp.frontend.rules import ROOT_LABEL, label_module_paths

MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__, torch.bmm,
           torch.Tensor.bmm, torch.einsum, torch.baddbmm, torch.Tensor.baddbmm}
SOFTMAXES = {torch.softmax, torch.Tensor.softmax, F.softmax, torch.special.softmax}
FUSED = {F.scaled_dot_product_attention, F.multi_head_attention_forward}
HOPS = 4  # ops allowed between a softmax and the matmul that reads its result (dropout, casts, views)


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for a in x:
            yield from _tensors(a)
    elif isinstance(x, dict):
        for a in x.values():
            yield from _tensors(a)


def _common(*stacks: list[nn.Module]) -> nn.Module | None:
    """The innermost module on every stack (stacks run from the root inwards)."""
    owner = None
    for ms in zip(*stacks):
        if any(m is not ms[0] for m in ms):
            break
        owner = ms[0]
    return owner


class _Recorder(TorchFunctionMode):
    """Notes attention computations (see the module docstring): ``found(module, probs)`` is called
    with the innermost module holding each one and its probabilities (id → tensor)."""

    def __init__(self, stack: list[nn.Module], found):
        super().__init__()
        self.stack, self.found = stack, found
        self.last_matmul: list[nn.Module] | None = None
        self.pending: list[tuple[dict, list, list]] = []  # (id → tensor derived from a softmax, hops; stacks)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        here = list(self.stack)
        if func in FUSED:
            if here:  # MHA returns (output, weights): the weights are its probabilities
                probs = {id(t): t for t in _tensors(out[1:])} if func is F.multi_head_attention_forward else {}
                self.found(here[-1], probs)
            return out
        ins = {id(t) for t in _tensors((args, kwargs))}
        still = []
        for derived, hops, stacks in self.pending:
            if not ins & derived.keys():
                if hops < HOPS:
                    still.append((derived, hops + 1, stacks))
                continue
            if func in MATMULS:
                owner = _common(*stacks, here)
                if owner is not None:
                    self.found(owner, derived)
                continue
            if hops < HOPS:
                derived.update((id(t), t) for t in _tensors(out))
                still.append((derived, hops + 1, stacks))
        self.pending = still
        if func in MATMULS:
            self.last_matmul = here
        elif func in SOFTMAXES and self.last_matmul is not None:
            self.pending.append(({id(t): t for t in _tensors(out)}, 0, [self.last_matmul, here]))
        return out


@dataclass
class Group:
    """Instances of one module class (under one strategy) sharing one compiled ``forward``."""

    cls: type
    backend: AttncompBackend
    compiled: object
    owner: nn.Module | None = None  # the instance now calling the compiled forward
    owner_path: str = ""  # its path in the model
    paths: list[str] = field(default_factory=list)
    latest: tuple[str, list] = ("", [])  # (the owner it was traced for, its records): the newest graph

    def records(self) -> list:
        """The newest graph's sites, one row per instance (alike instances share the graph)."""
        owner, recs = self.latest
        return [dataclasses.replace(r, path=p + r.path[len(owner):] if r.path.startswith(owner) else r.path)
                for p in self.paths for r in recs]


class ModuleCapture:
    """Finds the attention owners of ``model`` on its first call and compiles their ``forward``."""

    def __init__(self, model: nn.Module, strategy, make_backend, for_site):
        self.model = model
        self.strategy = strategy
        self.make_backend, self.for_site = make_backend, for_site
        self.paths = {m: p for p, m in model.named_modules(remove_duplicate=False)}
        self.groups: dict[tuple, Group] = {}
        self.wrapped: dict[nn.Module, Group] = {}
        self.first_done = False
        self._recorder: _Recorder | None = None
        self._ran: set[nn.Module] = set()  # wrapped modules whose compiled forward has run
        self._handles: dict[nn.Module, tuple] = {}  # discovery hooks, while the first call runs
        self._candidates: dict[nn.Module, list[dict]] = {}  # module → probabilities of attention inside it
        # each owner instance's input shapes: a dim is dynamic only once that instance saw it vary (the
        # same class at other sizes in another stage compiles its own static graph)
        self._shapes: dict[nn.Module, ShapeTracker] = {}
        self.abandoned = False  # a compile ran past the capture budget: the owners run as written

    # -- discovery ---------------------------------------------------------------------------
    def first_call(self, *args, **kwargs):
        """Run the model eagerly while finding owners; returns the model's output."""
        stack: list[nn.Module] = []

        def enter(mod, args, kwargs):
            stack.append(mod)
            # the shapes each module ran at: an owner found later in this call starts from them
            self._shapes.setdefault(mod, ShapeTracker()).observe(args, kwargs)

        def leave(mod, args, out):
            while stack and stack.pop() is not mod:  # a module whose hooks were removed inside it
                pass
            for probs in self._candidates.pop(mod, ()):
                if not any(id(t) in probs for t in _tensors(out)):
                    self._own(mod)
                elif stack:  # it returns the probabilities: its caller may drop them
                    self._candidates.setdefault(stack[-1], []).append(probs)
                else:
                    self._own(mod)  # the model returns them: the site stays eager, explain says why

        for m in self.model.modules():
            self._handles[m] = (m.register_forward_pre_hook(enter, with_kwargs=True),
                                m.register_forward_hook(leave, always_call=True))
        self._recorder = _Recorder(stack, lambda m, probs: self._candidates.setdefault(m, []).append(probs))
        try:
            with self._recorder:
                out = self.model(*args, **kwargs)
        finally:
            self._recorder = None
            for hs in self._handles.values():
                for h in hs:
                    h.remove()
            self._handles.clear()
            self._candidates.clear()
        self.first_done = True
        return out

    def _own(self, module: nn.Module) -> None:
        """``module`` owns attention: compile it (and every instance of its class), unless an
        enclosing owner already covers it; owners inside it are unwrapped (it inlines them)."""
        if module in self.wrapped or module not in self.paths:
            return
        path = self.paths[module]
        if any(_inside(path, self.paths[m]) for m in self.wrapped):
            return
        for inner in [m for m in self.wrapped if _inside(self.paths[m], path)]:
            self._unwrap(inner)
        owners = [self.paths[w] for w in self.wrapped]
        for m, p in self.paths.items():  # its alike instances, unless an owner around them covers them
            if type(m) is type(module) and m not in self.wrapped and not any(_inside(p, o) for o in owners):
                self._wrap(m, p)

    def _group(self, module: nn.Module, path: str) -> Group:
        """Alike instances share a group; with strategies by module path, only instances whose every
        submodule path resolves to the same strategies are alike."""
        key: tuple = (type(module),)
        if isinstance(self.strategy, dict):
            key += tuple((p[len(path):], id(self.for_site(self.strategy, p)))
                         for p in sorted(self.paths.values()) if _inside(p, path))
        if key not in self.groups:
            backend = self.make_backend()
            group = Group(type(module), backend, None)
            group.compiled = torch.compile(type(module).forward, backend=_Relabel(group), **compile_options())
            self.groups[key] = group
        return self.groups[key]

    def _wrap(self, module: nn.Module, path: str) -> None:
        group = self._group(module, path)
        group.paths.append(path)
        self.wrapped[module] = group
        # instances Dynamo must specialise (a KV cache indexed by the layer number) each need a cache
        # entry of the shared code; Dynamo's default limit (8) would silently run the rest eagerly
        limit_room = len(self.paths)
        shapes = self._shapes.setdefault(module, ShapeTracker())

        def forward(*args, **kwargs):
            self._ran.add(module)
            if self.abandoned:
                return type(module).forward(module, *args, **kwargs)
            if self._handles:  # first call: Dynamo must not trace the discovery hooks inside it
                for d in module.modules():
                    for h in self._handles.pop(d, ()) if d is not module else ():
                        h.remove()
            group.owner, group.owner_path = module, path
            try:
                with _outside(self._recorder), recompile_room(limit_room), marked(shapes.observe(args, kwargs)):
                    return group.compiled(module, *args, **kwargs)
            except CaptureBudgetExceeded:  # this owner's compile ran past the budget: it and the rest run eagerly
                self.abandoned = True
                return type(module).forward(module, *args, **kwargs)

        module.__dict__["forward"] = forward

    def _unwrap(self, module: nn.Module) -> None:
        group = self.wrapped.pop(module)
        group.paths.remove(self.paths[module])
        module.__dict__.pop("forward", None)

    def pending(self) -> bool:
        """Some owner class has not run its compiled forward yet (its last instance in the first call
        was the one that showed it owns attention), so nothing of it is compiled."""
        ran = {id(self.wrapped[m]) for m in self._ran if m in self.wrapped}
        return any(id(g) not in ran for g in self.groups.values() if g.paths)

    @contextlib.contextmanager
    def eager(self):
        """The model without its compiled forwards (to run it as the user wrote it)."""
        saved = {m: m.__dict__.pop("forward") for m in self.wrapped if "forward" in m.__dict__}
        try:
            yield
        finally:
            for m, f in saved.items():
                m.__dict__["forward"] = f

    # -- report --------------------------------------------------------------------------------
    @property
    def backends(self) -> list[AttncompBackend]:
        return [g.backend for g in self.groups.values()]

    def summary(self) -> list[str]:
        lines = []
        for g in self.groups.values():
            if not g.paths:
                continue
            paths = [p or ROOT_LABEL for p in g.paths]
            shown = ", ".join(paths[:3]) + (f", … {paths[-1]}" if len(paths) > 3 else "")
            lines.append(f"{g.cls.__name__} ×{len(g.paths)} ({shown}): {g.backend.graphs} graph(s) compiled "
                         "for them all")
        return lines


class _Relabel:
    """The group's backend, with the model's module paths in the graph: the graph is traced from
    ``type(owner).forward(owner, ...)``, so Dynamo names modules relative to the owner; they are
    resolved against it and put under its path (:func:`attncomp.match.label_module_paths`)."""

    def __init__(self, group: Group):
        self.group = group

    def __call__(self, gm, example_inputs):
        prefix = self.group.owner_path
        label_module_paths(gm, self.group.owner, prefix)
        backend = self.group.backend
        before = set(map(id, backend.records.values()))
        compiled = backend(gm, example_inputs)
        self.group.latest = (prefix, [r for r in backend.records.values() if id(r) not in before])
        return compiled


def _inside(path: str, outer: str) -> bool:
    return outer == "" or path == outer or path.startswith(outer + ".")


@contextlib.contextmanager
def _outside(recorder: _Recorder | None):
    """Compiled forwards run without the discovery recorder (Dynamo would trace it into the graph)."""
    if recorder is None:
        yield
        return
    from torch.overrides import _pop_mode_temporarily

    with _pop_mode_temporarily():
        yield
