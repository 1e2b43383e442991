"""The one base of every module that replaces an attention site in a rewritten graph.

A site module holds two ways to compute its site:

* ``fused(*inputs)`` — the subclass's kernel call (dense / block-sparse op, linear, tensor, MHA);
* ``eager`` — the site's **own nodes**, copied out of the captured graph before they were erased
  (:func:`extract_region`): the exact computation the model did, with the same ops, dropout and
  casts. It is what runs whenever the fused path does not: a kernel that fails, a call the fused
  path cannot express, and a site whose first call disagrees with it.

**First-call verification** (on by default, ``optimize(..., verify=False)`` turns it off): the first
fused call of each site is compared with ``eager`` on the same inputs; a relative error above the
dtype's tolerance makes the site run ``eager`` from then on, with one warning, and ``explain``
shows the measured error. A site whose eager form would hold more than :data:`VERIFY_BUDGET` bytes of
scores is not verified, and ``explain`` says so.

The kernel call in the graph passes the fused path's inputs first, then whatever else the eager
nodes read (``n_inputs`` splits them). A mask that the compiler proved and removed from the graph
is rebuilt from its proof for the eager nodes (``rebuild_mask``), so keeping the eager form costs
the steady state nothing.
"""

from __future__ import annotations

import math
import os
import warnings

import torch
from torch import Tensor, fx, nn

# the eager form of a site is verified only when its scores (and softmax) fit in this many bytes
VERIFY_BUDGET = int(os.environ.get("ATTNCOMP_VERIFY_BUDGET", 1 << 30))
# relative error ‖fused − eager‖ / ‖eager‖ above which a first call counts as a mismatch
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


class Unsupported(Exception):
    """The fused path cannot express this site; it runs its eager form from now on."""


class EagerThisCall(Exception):
    """This call's inputs need the site's eager form (the fused path stays for later calls)."""


def kernel_failed(site: nn.Module, error: Exception) -> None:
    """A site's generated kernel failed to compile or launch: from now on the site (a module with
    ``path`` and ``fallback_reason``) runs its exact eager computation; one warning says why.
    While ``torch.compile`` traces, the error propagates instead."""
    if torch.compiler.is_compiling():
        raise error
    site.fallback_reason = f"the fused kernel failed ({type(error).__name__}: {str(error)[:300]})"
    warnings.warn(f"attncomp: site {site.path} runs its eager computation from now on: {site.fallback_reason}",
                  stacklevel=3)


def extract_region(gm: fx.GraphModule, region: list, output: fx.Node) -> tuple[fx.GraphModule, list]:
    """Copy the nodes of ``region`` (which ends in ``output``) into a new GraphModule; its
    placeholders are the nodes outside ``region`` that the region reads, returned in order."""
    members = set(region)
    ordered = [n for n in gm.graph.nodes if n in members]
    graph, env, inputs = fx.Graph(), {}, []

    def arg(n: fx.Node):
        if n not in env:
            inputs.append(n)
            env[n] = graph.placeholder(f"in_{len(inputs)}_{n.name}")
            env[n].meta = dict(n.meta)
        return env[n]

    for n in ordered:
        env[n] = graph.node_copy(n, lambda a: env[a] if a in env else arg(a))
    graph.output(env[output])
    return fx.GraphModule(gm, graph, class_name="EagerSite"), inputs


def _relative_error(a: Tensor, b: Tensor) -> float:
    """``‖a − b‖ / ‖b‖`` in float64; positions where both are NaN (or the same infinity) agree, a NaN
    or infinity on one side only is an infinite error."""
    a, b = a.detach().double(), b.detach().double()
    same = (a == b) | (torch.isnan(a) & torch.isnan(b))
    if not bool((torch.isfinite(a) | same).all()) or not bool((torch.isfinite(b) | same).all()):
        return math.inf
    a, b = torch.where(same, 0.0, a), torch.where(same, 0.0, b)
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


class SiteModule(nn.Module):
    """Base of the modules that run a site. Subclasses set ``path`` and implement ``fused``;
    ``use_fused`` may send a call to the eager form (e.g. training dropout), ``replay`` computes the
    site from the fused inputs when no eager nodes were attached (a module built by hand)."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.calls = {"fused": 0, "literal": 0}
        self.fallback_reason: str | None = None
        self.eager_calls_note: str | None = None  # some calls (not all) ran eagerly, and why
        self.eager: fx.GraphModule | None = None
        self.eager_args: tuple = ()
        self.n_inputs: int | None = None
        self.verify_state = "off"            # off | pending | passed | failed | skipped
        self.verify_note: str | None = None  # what explain says about the first-call verification

    def attach_eager(self, eager: fx.GraphModule, eager_args: tuple, n_inputs: int, verify: bool) -> None:
        """The site's own nodes; ``eager_args[i]`` says where its i-th placeholder comes from:
        ``("arg", j)`` the call's j-th argument, ``("mask", j, dtype)`` proved mask ``j`` rebuilt."""
        self.eager, self.eager_args, self.n_inputs = eager, eager_args, n_inputs
        self.verify_state = "pending" if verify else "off"

    # -- to implement ---------------------------------------------------------------------------
    def fused(self, *inputs):
        raise NotImplementedError

    def use_fused(self, inputs: tuple) -> bool:
        return True

    def replay(self, *inputs):
        raise Unsupported("no eager form attached to this site module")

    def rebuild_mask(self, j: int, dtype, args: tuple) -> Tensor:
        raise Unsupported("this site has no proved masks")

    def eager_bytes(self, inputs: tuple) -> int:
        """Bytes the eager form holds at its peak (scores and probabilities), for the budget."""
        return 0

    def comparable(self, out) -> list:
        """The tensors of a result that verification compares."""
        return _tensors(out)

    def verify_tolerance(self, dtype) -> float:
        """Largest relative error of the first fused call against the eager form."""
        return TOLERANCE.get(dtype, 1e-4)

    # -- running --------------------------------------------------------------------------------
    def forward(self, *args):
        inputs = args if self.n_inputs is None else args[:self.n_inputs]
        if self.fallback_reason is None and self.use_fused(inputs):
            try:
                out = self.fused(*inputs)
            except EagerThisCall as e:
                self.eager_calls_note = str(e)  # explain shows it; the fused path stays for later calls
            except Unsupported as e:
                self.fallback_reason = str(e)
                warnings.warn(f"attncomp: site {self.path} runs its eager computation: {e}", stacklevel=2)
            except Exception as e:  # a generated kernel that fails to compile or launch
                kernel_failed(self, e)
            else:
                if self.verify_state == "pending" and not torch.compiler.is_compiling():
                    out = self._verify(out, args, inputs)  # the eager result when they disagree
                self.calls["fused" if self.fallback_reason is None else "literal"] += 1
                return out
        self.calls["literal"] += 1
        return self.literal(args)

    def literal(self, args: tuple):
        """The site's own eager computation on the call's arguments."""
        if self.eager is None:
            return self.replay(*(args if self.n_inputs is None else args[:self.n_inputs]))
        vals = [args[s[1]] if s[0] == "arg" else self.rebuild_mask(s[1], s[2], args) for s in self.eager_args]
        return self.eager(*vals)

    def _verify(self, out, args: tuple, inputs: tuple):
        """First fused call: compare with the eager form. Returns what the call should return (the
        eager result, recomputed with autograd, after a mismatch)."""
        if self.eager is None:
            self.verify_state, self.verify_note = "skipped", "not verified: no eager form"
            return out
        need = self.eager_bytes(inputs)
        if need > VERIFY_BUDGET:
            self.verify_state = "skipped"
            self.verify_note = (f"not verified on the first call: its eager form needs {need / 2**20:.0f} MiB of "
                                f"scores, above the budget of {VERIFY_BUDGET / 2**20:.0f} MiB (ATTNCOMP_VERIFY_BUDGET)")
            return out
        with torch.no_grad():
            ref = self.literal(args)
        got, want = self.comparable(out), self.comparable(ref)
        errs = [_relative_error(a, b) for a, b in zip(got, want)]
        dtype = next((t.dtype for t in want), torch.float32)
        tol = self.verify_tolerance(dtype)
        err = max(errs, default=0.0)
        if len(got) == len(want) and all(a.shape == b.shape for a, b in zip(got, want)) and err <= tol:
            self.verify_state, self.verify_note = "passed", f"verified on the first call (relative error {err:.2g})"
            return out
        self.verify_state = "failed"
        self.fallback_reason = (f"first-call verification failed: the fused result differs from the site's eager "
                                f"computation by relative error {err:.3g} (tolerance {tol:g} for {dtype})")
        self.verify_note = None
        warnings.warn(f"attncomp: site {self.path} runs its eager computation from now on: {self.fallback_reason}",
                      stacklevel=3)
        return self.literal(args) if torch.is_grad_enabled() else ref


def _tensors(x) -> list:
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for e in x for t in _tensors(e)]
    return []
