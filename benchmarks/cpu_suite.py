"""CPU benchmark suite: attncomp against eager (and peers) on named cases.

    python benchmarks/cpu_suite.py                      # every case, full sizes
    python benchmarks/cpu_suite.py --quick              # fewer sizes and repeats
    python benchmarks/cpu_suite.py --cases site_dense --out /tmp/bench

Every shape point of a case builds its implementations, checks each output against the eager
baseline (relative error ``||out - ref|| / ||ref||`` in float32, tolerance 1e-4), then times them:
``time.perf_counter`` around one call, warm-up calls excluded, all implementations called in
turns (eager, attncomp, peer, eager, ...) so that a change of machine load hits them alike, and
the median of the repeats reported. Everything runs in eval mode under ``torch.no_grad()``.
A mismatch is printed loudly, marked in the JSON (``"ok": false``) and makes the exit status 1;
it is timed all the same.

Results: ``<out>/cpu_suite.json`` (one row per case × shape × implementation, plus machine and
version info) and ``<out>/cpu_suite.png`` (time vs sequence length, log-log, one panel per case).

Adding a case: write ``def my_case(opts: Options) -> list[Result]`` that calls :func:`run_point`
once per shape point, and add it to :data:`CASES`.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import attncomp

TOL = 1e-4  # relative error allowed against eager, float32
ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------- harness
@dataclass
class Options:
    quick: bool = False
    warmup: int | None = None     # None: the case's default
    repeats: int | None = None
    gpt2_layers: int | None = None
    seed: int = 0


@dataclass
class Result:
    """One row of the JSON: one implementation at one shape point of one case."""

    case: str
    impl: str
    params: dict
    median_ms: float
    min_ms: float
    max_ms: float
    repeats: int
    warmup: int
    times_ms: list[float]
    rel_err: float | None          # against eager (None for eager itself)
    max_abs_err: float | None
    ok: bool                       # rel_err <= TOL (always True for eager)
    attncomp: dict | None = None   # for the attncomp implementation: what explain says
    notes: list[str] = field(default_factory=list)
    peak_mib: float | None = None  # growth of peak resident memory during one call (Linux), MiB


def _errors(out: Tensor, ref: Tensor) -> tuple[float, float]:
    diff = out.double() - ref.double()
    return (diff.norm() / ref.double().norm()).item(), diff.abs().max().item()


def _explain_info(fast: nn.Module) -> dict:
    report = attncomp.explain(fast)
    kernels = [r.kernel for r in report.rows if r.kernel is not None]
    return {
        "sites": len(report.rows),
        "replaced": len(report.replaced),
        "left": len(report.left),
        "masks": sorted({str(r.spec.mask) for r in report.rows if r.spec is not None}),
        "strategies": sorted({str(r.strategy) for r in report.replaced}),
        "fused_calls": sum(k.calls["fused"] for k in kernels),
        "literal_calls": sum(k.calls["literal"] for k in kernels),
        "fallbacks": [f"{k.path}: {k.fallback_reason}" for k in kernels if k.fallback_reason],
        "left_reasons": [f"{r.path}: {r.reason}" for r in report.left],
        "graphs": report.graphs,
        "graph_breaks": report.graph_breaks,
    }


def _time_in_turns(fns: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Milliseconds per call of each function; warm-up excluded; one call of each per round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeats):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
    finally:
        gc.enable()
    return times


def _vm(field_name: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field_name))


def peak_mib(fn: Callable[[], object]) -> float | None:
    """Growth of the process's peak resident memory during one call of ``fn``, in MiB (Linux only):
    free what the allocator holds, reset the high-water mark, call, read it back."""
    try:
        import ctypes

        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _vm("VmRSS:")
        fn()
        return round((_vm("VmHWM:") - base) / 1024, 1)
    except (OSError, StopIteration):
        return None


def run_point(case: str, params: dict, impls: dict[str, Callable[[], Tensor]], warmup: int, repeats: int,
              fast: nn.Module | None = None, notes: list[str] | None = None, memory: bool = False,
              reference: Callable[[], Tensor] | None = None, unchecked: tuple[str, ...] = ()) -> list[Result]:
    """Verify and time one shape point. ``impls`` must start with ``"eager"``, the baseline.

    Each callable takes no arguments and returns the output tensor to compare. ``fast`` is the
    module returned by ``attncomp.optimize`` (its explain report goes into the ``attncomp`` row).
    Outputs are checked against ``reference()`` (computed once, not timed) when given, else against
    eager's. Implementations named in ``unchecked`` compute a different function (a peer that is
    compared for speed only, e.g. softmax attention beside linear attention): not checked.
    """
    assert next(iter(impls)) == "eager" or reference is not None, "the first implementation is the eager baseline"
    label = " ".join(f"{k}={v}" for k, v in params.items())
    print(f"[{case}] {label}: verifying {', '.join(n for n in impls if n not in unchecked)}", flush=True)
    with torch.no_grad():
        ref = reference() if reference is not None else impls["eager"]()
        errs = {name: _errors(fn(), ref) for name, fn in impls.items()
                if name not in unchecked and (name != "eager" or reference is not None)}
        for name, (rel, _) in errs.items():
            if not rel <= TOL:
                print(f"\n{'!' * 78}\n!! MISMATCH [{case}] {label} impl={name}: relative error {rel:.3e} "
                      f"> {TOL:g} against eager\n{'!' * 78}\n", flush=True)
        print(f"[{case}] {label}: timing ({warmup} warm-up, {repeats} repeats, in turns)", flush=True)
        times = _time_in_turns(impls, warmup, repeats)
        peaks = {name: peak_mib(fn) for name, fn in impls.items()} if memory else {}
    info = _explain_info(fast) if fast is not None else None
    if info and (info["literal_calls"] or info["left"] or info["fallbacks"]):
        print(f"[{case}] {label}: note: attncomp did not fuse every site: {info}", flush=True)
    rows = []
    for name, ts in times.items():
        rel, mx = errs.get(name, (None, None))
        extra = ["a different function: compared for speed only"] if name in unchecked else []
        rows.append(Result(case, name, dict(params), statistics.median(ts), min(ts), max(ts), repeats, warmup,
                           [round(t, 4) for t in ts], rel, mx, rel is None or rel <= TOL,
                           info if name == "attncomp" else None, list(notes or []) + extra, peaks.get(name)))
    return rows


def _counts(opts: Options, warmup: int, repeats: int) -> tuple[int, int]:
    return (opts.warmup if opts.warmup is not None else warmup,
            opts.repeats if opts.repeats is not None else repeats)


# ---------------------------------------------------------------------------------- site_dense
def causal_additive_mask(L: int, dtype: torch.dtype, device) -> Tensor:
    """``(L, L)`` additive causal mask: 0 where key ``j <= i``, ``finfo(dtype).min`` elsewhere."""
    idx = torch.arange(L, device=device)
    keep = idx[None, :] <= idx[:, None]
    return torch.where(keep, 0.0, torch.finfo(dtype).min).to(dtype)


class EagerCausalSite(nn.Module):
    """One attention site as the explicit eager chain.

    q, k, v: ``(B, H, L, D)`` float32 → ``(B, H, L, D)``. The mask is built inside ``forward`` from
    ``arange`` and a comparison, the way transformers builds it.
    """

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        L = q.shape[-2]
        idx = torch.arange(L, device=q.device)
        keep = idx[None, :] <= idx[:, None]
        mask = torch.where(keep, 0.0, torch.finfo(q.dtype).min)
        scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5) + mask
        return scores.softmax(-1) @ v


def _site_dense_point(L: int, opts: Options, warmup: int, repeats: int) -> list[Result]:
    B, H, D = 1, 12, 64
    torch.manual_seed(opts.seed)
    q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
    eager = EagerCausalSite().eval()
    torch._dynamo.reset()  # every shape point is captured afresh (static shapes)
    with torch.no_grad():
        fast = attncomp.optimize(eager, example_inputs=(q, k, v))

    def sdpa() -> Tensor:
        mask = causal_additive_mask(L, q.dtype, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    impls = {
        "eager": lambda: eager(q, k, v),
        "attncomp": lambda: fast(q, k, v),
        "sdpa": sdpa,
        "sdpa_causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    }
    params = {"B": B, "H": H, "L": L, "D": D, "dtype": "float32"}
    return run_point("site_dense", params, impls, warmup, repeats, fast)


def site_dense(opts: Options) -> list[Result]:
    """A single causal attention site, B=1 H=12 D=64: eager chain vs attncomp vs SDPA (peers).

    ``eager``: :class:`EagerCausalSite` as is; ``attncomp``: ``attncomp.optimize`` of it;
    ``sdpa``: ``F.scaled_dot_product_attention`` with the same additive float mask (built per
    call, like eager's); ``sdpa_causal``: SDPA with ``is_causal=True`` (no mask tensor).
    """
    lengths = (256, 1024) if opts.quick else (256, 512, 1024, 2048)
    warmup, repeats = _counts(opts, 2 if opts.quick else 3, 5 if opts.quick else 10)
    return [row for L in lengths for row in _site_dense_point(L, opts, warmup, repeats)]


# ---------------------------------------------------------------------------------- gpt2_e2e
def _gpt2(n_layer: int, attn_implementation: str, seed: int) -> nn.Module:
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_head=12, n_embd=768, n_positions=1024,
                        attn_implementation=attn_implementation)
    return GPT2Model(config).eval()


def gpt2_e2e(opts: Options) -> list[Result]:
    """GPT-2 (transformers, random weights, 768 hidden, 12 heads) forward at batch 1."""
    full_layers = 12
    n_layer = opts.gpt2_layers or (4 if opts.quick else full_layers)
    lengths = (1024,) if opts.quick else (512, 1024)
    warmup, repeats = _counts(opts, 1, 3 if opts.quick else 5)
    notes = []
    if n_layer != full_layers:
        notes.append(f"layers reduced from {full_layers} to {n_layer}"
                     + (" (--quick)" if opts.quick and not opts.gpt2_layers else " (--gpt2-layers)"))
    eager = _gpt2(n_layer, "eager", opts.seed)
    sdpa = _gpt2(n_layer, "sdpa", opts.seed)  # same seed: same weights
    e_state, s_state = eager.state_dict(), sdpa.state_dict()
    if e_state.keys() != s_state.keys() or any(not torch.equal(e_state[n], s_state[n]) for n in e_state):
        notes.append("hf_sdpa weights differed from eager's under the same seed; copied eager's weights")
        sdpa.load_state_dict(e_state)
    return [row for L in lengths
            for row in _gpt2_point(eager, sdpa, L, n_layer, opts, warmup, repeats, notes)]


def _gpt2_point(eager: nn.Module, sdpa: nn.Module, L: int, n_layer: int, opts: Options, warmup: int,
                repeats: int, notes: list[str]) -> list[Result]:
    torch.manual_seed(opts.seed)
    ids = torch.randint(0, eager.config.vocab_size, (1, L))
    torch._dynamo.reset()  # every shape point is captured afresh (static shapes)
    with torch.no_grad():
        fast = attncomp.optimize(eager, example_inputs=(ids,))
    impls = {
        "eager": lambda: eager(ids).last_hidden_state,
        "attncomp": lambda: fast(ids).last_hidden_state,
        "hf_sdpa": lambda: sdpa(ids).last_hidden_state,
    }
    params = {"B": 1, "L": L, "n_layer": n_layer, "n_head": 12, "n_embd": 768, "dtype": "float32"}
    return run_point("gpt2_e2e", params, impls, warmup, repeats, fast, notes)


# ---------------------------------------------------------------------------------- local masks
class WindowSite(nn.Module):
    """SDPA under a causal sliding-window bool mask built in ``forward`` (as transformers builds it)."""

    def __init__(self, window: int):
        super().__init__()
        self.window = window

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        idx = torch.arange(q.shape[-2], device=q.device)
        keep = (idx[None, :] <= idx[:, None]) & (idx[None, :] > idx[:, None] - self.window)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


def _flex(mask_mod, L: int):
    """Compiled FlexAttention with ``mask_mod``, or None (with the reason printed) if unavailable."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        block_mask = create_block_mask(mask_mod, None, None, L, L, device="cpu")
        return torch.compile(flex_attention), block_mask
    except Exception as e:  # noqa: BLE001 — a peer that cannot run is reported, not fatal
        print(f"FlexAttention unavailable: {type(e).__name__}: {e}", flush=True)
        return None


def sliding_window(opts: Options) -> list[Result]:
    """Causal sliding window of 256 keys, B=1 H=8 D=64: SDPA with the same bool mask (``eager``, the
    reference) vs attncomp (``attncomp.ops.attention(mask=Window(255, 0))``; ``attncomp_model``:
    ``optimize`` of :class:`WindowSite`, whose mask is recognised from the graph) vs compiled
    FlexAttention with the same ``mask_mod`` (block mask built once, outside the timings)."""
    from attncomp import ir, ops

    W = 256
    lengths = (4096,) if opts.quick else (2048, 4096, 8192)
    warmup, repeats = _counts(opts, 2, 5 if opts.quick else 10)
    rows = []
    for L in lengths:
        torch.manual_seed(opts.seed)
        q, k, v = (torch.randn(1, 8, L, 64) for _ in range(3))
        idx = torch.arange(L)
        keep = (idx[None, :] <= idx[:, None]) & (idx[None, :] > idx[:, None] - W)
        site = WindowSite(W).eval()
        torch._dynamo.reset()
        with torch.no_grad():
            fast = attncomp.optimize(site, example_inputs=(q, k, v))
        impls = {
            "eager": lambda q=q, k=k, v=v, keep=keep: F.scaled_dot_product_attention(q, k, v, attn_mask=keep),
            "attncomp": lambda q=q, k=k, v=v: ops.attention(q, k, v, ir.Window(W - 1, 0)),
            "attncomp_model": lambda q=q, k=k, v=v, fast=fast: fast(q, k, v),
        }
        t0 = time.perf_counter()
        flex = _flex(lambda b, h, qi, ki: (ki <= qi) & (ki > qi - W), L)
        notes = []
        if flex is not None:
            fn, bm = flex
            with torch.no_grad():
                fn(q, k, v, block_mask=bm)
            notes.append(f"flex: block mask + compile {time.perf_counter() - t0:.1f} s, excluded")
            impls["flex_compiled"] = lambda q=q, k=k, v=v, fn=fn, bm=bm: fn(q, k, v, block_mask=bm)
        params = {"B": 1, "H": 8, "L": L, "D": 64, "window": W, "dtype": "float32"}
        rows += run_point("sliding_window", params, impls, warmup, repeats, fast, notes, memory=True)
    return rows


def neighborhood_2d(opts: Options) -> list[Result]:
    """2-D neighborhood attention, kernel 7x7 on a 64x64 grid (L=4096), B=1 H=8 D=64: SDPA with the
    same dense bool mask (``eager``, the reference) vs ``attncomp.ops.neighborhood_attention`` (NATTEN
    layout; the layout change is inside the timing) vs compiled FlexAttention with the same mask."""
    from attncomp import ops
    from attncomp.masks import blocks

    side, K = 64, 7
    L = side * side
    warmup, repeats = _counts(opts, 2, 5 if opts.quick else 10)
    torch.manual_seed(opts.seed)
    q, k, v = (torch.randn(1, 8, L, 64) for _ in range(3))
    expr = ops.neighborhood_mask((side, side), K).expr()
    keep = blocks.dense_keep(expr, L, L)
    natten = [x.transpose(1, 2).reshape(1, side, side, 8, 64) for x in (q, k, v)]

    def na() -> Tensor:
        return ops.neighborhood_attention(*natten, K).reshape(1, L, 8, 64).transpose(1, 2)

    impls = {"eager": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=keep), "attncomp": na}
    t0 = time.perf_counter()
    flex = _flex(lambda b, h, qi, ki: blocks.eval_expr(expr, qi, ki), L)
    notes = []
    if flex is not None:
        fn, bm = flex
        try:
            with torch.no_grad():
                fn(q, k, v, block_mask=bm)
            notes.append(f"flex: block mask + compile {time.perf_counter() - t0:.1f} s, excluded")
            impls["flex_compiled"] = lambda: fn(q, k, v, block_mask=bm)
        except Exception as e:  # noqa: BLE001
            notes.append(f"flex failed: {type(e).__name__}: {str(e)[:200]}")
    params = {"B": 1, "H": 8, "L": L, "D": 64, "grid": f"{side}x{side}", "kernel": K, "dtype": "float32"}
    return run_point("neighborhood_2d", params, impls, warmup, repeats, None, notes, memory=True)


def routed_sparse(opts: Options) -> list[Result]:
    """BiFormer-style content routing, L=4096 B=1 H=8 D=64, regions of 64 tokens, top-16 key regions
    per query region (25% of the tiles): SDPA with the same selection expanded to a dense bool mask
    (``eager``, the reference; mask built outside the timing) vs ``attncomp.ops.routed_attention``
    (region descriptors, top-k and block table inside the timing; the table alone is timed in the notes)."""
    from attncomp import ops
    from attncomp.strategies.sparse import routing

    L, region, topk = 4096, 64, 16
    warmup, repeats = _counts(opts, 2, 5 if opts.quick else 10)
    torch.manual_seed(opts.seed)
    q, k, v = (torch.randn(1, 8, L, 64) for _ in range(3))
    with torch.no_grad():
        keep = routing.expand_selection(routing.selection(q, k, region, topk), region, L, L)
    table_ms = _time_in_turns({"table": lambda: routing.routed_block_table(q, k, region, topk)},
                              warmup, repeats)["table"]
    notes = [f"table building (routing.routed_block_table) median {statistics.median(table_ms):.2f} ms, "
             f"included in attncomp's time", f"visited tiles {keep.float().mean().item():.3f}"]
    impls = {
        "eager": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=keep),
        "attncomp": lambda: ops.routed_attention(q, k, v, region=region, topk=topk),
    }
    params = {"B": 1, "H": 8, "L": L, "D": 64, "region": region, "topk": topk, "dtype": "float32"}
    return run_point("routed_sparse", params, impls, warmup, repeats, None, notes, memory=True)


# ---------------------------------------------------------------------------------- linear_causal
def linear_causal(opts: Options) -> list[Result]:
    """Causal linear attention (φ = elu+1, chunk 64), B=1 H=8 D=64, L = 2k … 16k: causal SDPA
    (``eager``: softmax attention, a different function, compared for speed only) vs
    ``attncomp.ops.linear_attention`` (chunked scan), checked against the float64 recurrence
    ``attncomp.linear.linear_attention_reference`` (one step per position, not timed)."""
    from attncomp import ops
    from attncomp.strategies.linear import op as linear

    lengths = (2048, 8192) if opts.quick else (2048, 4096, 8192, 16384)
    warmup, repeats = _counts(opts, 1, 3 if opts.quick else 5)
    rows = []
    for L in lengths:
        torch.manual_seed(opts.seed)
        q, k, v = (torch.randn(1, 8, L, 64) for _ in range(3))
        impls = {
            "eager": lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
            "attncomp": lambda q=q, k=k, v=v: ops.linear_attention(q, k, v, causal=True),
        }
        params = {"B": 1, "H": 8, "L": L, "D": 64, "feature_map": "elu1", "dtype": "float32"}
        rows += run_point("linear_causal", params, impls, warmup, repeats, memory=True,
                          reference=lambda q=q, k=k, v=v: linear.linear_attention_reference(q, k, v, causal=True),
                          unchecked=("eager",))
    return rows


# ---------------------------------------------------------------------------------- tensor attention
def _naive_tensor(q: Tensor, k1: Tensor, k2: Tensor, v1: Tensor, v2: Tensor, window=None) -> Tensor:
    """Tensor attention as one would write it: the ``(B, H, L, L, L)`` score cube by einsum, a
    softmax over the flattened key pairs, an einsum with v1 and v2 (float32)."""
    s = torch.einsum("bhid,bhjd,bhld->bhijl", q, k1, k2) * q.shape[-1] ** -0.5
    if window is not None:
        i = torch.arange(q.shape[-2])
        rel = i[:, None] - i[None, :]
        vis = ((rel >= 0) & (rel < window[0]))[:, :, None] & ((rel >= 0) & (rel < window[1]))[:, None, :]
        s = s.masked_fill(~vis, float("-inf"))
    p = torch.softmax(s.flatten(-2), -1).view_as(s)
    return torch.einsum("bhijl,bhjd,bhld->bhid", p, v1, v2)


def tensor_exact(opts: Options) -> list[Result]:
    """Exact tensor (2-simplicial) attention, B=1 H=2 D=32, L=128 and 256: the naive einsum over the
    materialised score cube (``eager``) vs ``attncomp.ops.tensor_attention`` (no cube), speed and peak
    memory; both checked against the float64 reference ``attncomp.tensor.tensor_attention_reference``."""
    from attncomp import ops
    from attncomp.strategies.tensor import op as tensor

    rows = []
    warmup, repeats = _counts(opts, 1, 3 if opts.quick else 5)
    for L in ((128,) if opts.quick else (128, 256)):
        torch.manual_seed(opts.seed)
        q, k1, k2, v1, v2 = (torch.randn(1, 2, L, 32) for _ in range(5))
        args = (q, k1, k2, v1, v2)
        impls = {"eager": lambda a=args: _naive_tensor(*a), "attncomp": lambda a=args: ops.tensor_attention(*a)}
        params = {"B": 1, "H": 2, "L": L, "D": 32, "dtype": "float32"}
        rows += run_point("tensor_exact", params, impls, warmup, repeats, memory=True,
                          reference=lambda a=args: tensor.tensor_attention_reference(*a))
    return rows


def tensor_window(opts: Options) -> list[Result]:
    """Windowed causal tensor attention (w1=64, w2=16: query i sees i-64 < j <= i, i-16 < l <= i),
    B=1 H=2 D=32, L = 256 … 4096: ``attncomp.ops.tensor_attention(window=(64, 16))``; the naive
    einsum (``eager``) needs the full (L, L, L) score cube (its size is in the notes; 512 GiB at
    L=4096 in float32) and is run only at L=256. Checked against a float64 reference computed window by
    window (a direct sum over the visible (j, l) pairs of each query, not timed)."""
    from attncomp import ops

    rows = []
    w = (64, 16)
    warmup, repeats = _counts(opts, 1, 3 if opts.quick else 5)
    for L in ((256, 1024) if opts.quick else (256, 1024, 4096)):
        torch.manual_seed(opts.seed)
        q, k1, k2, v1, v2 = (torch.randn(1, 2, L, 32) for _ in range(5))
        args = (q, k1, k2, v1, v2)
        cube_gib = 2 * L ** 3 * 4 / 2 ** 30
        notes = [f"the naive einsum's (B·H, L, L, L) float32 score cube alone needs {cube_gib:,.1f} GiB"]
        impls = {"eager": lambda a=args: _naive_tensor(*a, window=w)} if L <= 256 else {}
        impls["attncomp"] = lambda a=args: ops.tensor_attention(*a, window=w)
        params = {"B": 1, "H": 2, "L": L, "D": 32, "w1": w[0], "w2": w[1], "dtype": "float32"}
        rows += run_point("tensor_window", params, impls, warmup, repeats, notes=notes, memory=True,
                          reference=lambda a=args: _window_reference(*a, w))
    return rows


def _window_reference(q: Tensor, k1: Tensor, k2: Tensor, v1: Tensor, v2: Tensor, w) -> Tensor:
    """Windowed tensor attention in float64, query by query over its (w1, w2) window: O(L·w1·w2·D)."""
    q, k1, k2, v1, v2 = (t.double() for t in (q, k1, k2, v1, v2))
    L, scale = q.shape[-2], q.shape[-1] ** -0.5
    out = torch.empty(*q.shape[:-1], v1.shape[-1], dtype=torch.float64)
    for i in range(L):
        j0, l0 = max(0, i - w[0] + 1), max(0, i - w[1] + 1)
        s = torch.einsum("bhd,bhjd,bhld->bhjl", q[:, :, i], k1[:, :, j0:i + 1], k2[:, :, l0:i + 1]) * scale
        p = torch.softmax(s.flatten(-2), -1).view_as(s)
        out[:, :, i] = torch.einsum("bhjl,bhjd,bhld->bhd", p, v1[:, :, j0:i + 1], v2[:, :, l0:i + 1])
    return out


CASES: dict[str, Callable[[Options], list[Result]]] = {
    "site_dense": site_dense,
    "sliding_window": sliding_window,
    "neighborhood_2d": neighborhood_2d,
    "routed_sparse": routed_sparse,
    "linear_causal": linear_causal,
    "tensor_exact": tensor_exact,
    "tensor_window": tensor_window,
    "gpt2_e2e": gpt2_e2e,
}


# ---------------------------------------------------------------------------------- reporting
def machine_info() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = {
        "platform": platform.platform(), "machine": platform.machine(), "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(), "mkl": torch.backends.mkl.is_available(),
        "python": platform.python_version(), "torch": torch.__version__, "attncomp": attncomp.__version__,
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        info["git_commit"] = _git("rev-parse", "HEAD") or None
        info["git_dirty"] = bool(_git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def _git(*args: str) -> str:
    """Output of a read-only git command in the repository."""
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False)
    return done.stdout.strip()


def print_table(rows: list[Result]) -> None:
    base = {(r.case, json.dumps(r.params, sort_keys=True)): r.median_ms for r in rows if r.impl == "eager"}
    head = ("case", "L", "impl", "median ms", "min ms", "speedup vs eager", "rel err", "peak MiB", "check")
    lines = []
    for r in rows:
        eager_ms = base.get((r.case, json.dumps(r.params, sort_keys=True)))
        speed = f"x{eager_ms / r.median_ms:.2f}" if eager_ms else "-"
        err = "-" if r.rel_err is None else f"{r.rel_err:.2e}"
        if r.rel_err is None:
            check = "baseline" if r.impl == "eager" else "speed only"
        else:
            check = "ok" if r.ok else "MISMATCH"
        peak = "-" if r.peak_mib is None else f"{r.peak_mib:.0f}"
        lines.append((r.case, str(r.params.get("L", "-")), r.impl, f"{r.median_ms:.2f}", f"{r.min_ms:.2f}",
                      speed, err, peak, check))
    widths = [max(len(h), *(len(x[i]) for x in lines)) for i, h in enumerate(head)]
    right = {1, 3, 4, 5, 6, 7}

    def fmt(cells) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    print(fmt(head))
    print(fmt(["-" * w for w in widths]))
    prev = None
    for r, x in zip(rows, lines):
        key = (r.case, json.dumps(r.params, sort_keys=True))
        if prev is not None and key != prev:
            print()
        prev = key
        print(fmt(x))
    print("speedup vs eager = eager median / impl median, measured in the same run (>1: faster than eager)")


def plot(rows: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r.case for r in rows))
    fig, axes = plt.subplots(1, len(cases), figsize=(6 * len(cases), 4.5), squeeze=False)
    for ax, case in zip(axes[0], cases):
        sub = [r for r in rows if r.case == case]
        for impl in dict.fromkeys(r.impl for r in sub):
            pts = sorted((r.params["L"], r.median_ms) for r in sub if r.impl == impl)
            bad = any(not r.ok for r in sub if r.impl == impl)
            ax.plot(*zip(*pts), marker="o", label=impl + (" (MISMATCH)" if bad else ""))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        extra = {k: v for k, v in sub[0].params.items() if k not in ("L", "dtype")}
        ax.set_title(f"{case}  " + " ".join(f"{k}={v}" for k, v in extra.items()), fontsize=9)
        ax.set_xlabel("sequence length L")
        ax.set_ylabel("median time per call (ms)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"attncomp CPU suite — torch {torch.__version__}, {torch.get_num_threads()} threads",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from: {', '.join(CASES)}")
    p.add_argument("--quick", action="store_true", help="fewer sizes and repeats (and a 4-layer GPT-2)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out"), help="output directory")
    p.add_argument("--warmup", type=int, help="warm-up calls per implementation (default: per case)")
    p.add_argument("--repeats", type=int, help="timed calls per implementation (default: per case)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--gpt2-layers", type=int, help="layers of the gpt2_e2e model (default 12; 4 with --quick)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        p.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    opts = Options(quick=args.quick, warmup=args.warmup, repeats=args.repeats, gpt2_layers=args.gpt2_layers,
                   seed=args.seed)
    info = machine_info()
    print(f"attncomp CPU suite: cases {names}{' (quick)' if args.quick else ''}; torch {info['torch']}, "
          f"{info['torch_threads']} threads, {info['cpu']}, load average {info['loadavg_start']}", flush=True)

    start = time.perf_counter()
    rows: list[Result] = []
    case_seconds = {}
    for name in names:
        t0 = time.perf_counter()
        rows += CASES[name](opts)
        case_seconds[name] = round(time.perf_counter() - t0, 1)
    info["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    mismatches = [r for r in rows if not r.ok]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "suite": "cpu", "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv[1:], "quick": args.quick, "tolerance_rel_err": TOL, "machine": info,
        "timing": "time.perf_counter per call; warm-up excluded; implementations called in turns; "
                  "median of repeats; eval mode, torch.no_grad(); each shape point captured afresh",
        "cases": {n: (CASES[n].__doc__ or "").strip() for n in names}, "case_seconds": case_seconds,
        "total_seconds": round(time.perf_counter() - start, 1),
        "mismatches": [f"{r.case} {r.params} {r.impl}: rel err {r.rel_err:.3e}" for r in mismatches],
        "results": [asdict(r) for r in rows],
    }
    (out / "cpu_suite.json").write_text(json.dumps(doc, indent=2))
    plot(rows, out / "cpu_suite.png")

    print()
    print_table(rows)
    print(f"\nload average {info['loadavg_start']} at start, {info['loadavg_end']} at end; "
          f"{doc['total_seconds']} s in all ({case_seconds})")
    print(f"wrote {out / 'cpu_suite.json'} and {out / 'cpu_suite.png'}")
    if mismatches:
        print(f"\n!! {len(mismatches)} MISMATCH(ES) against eager (tolerance {TOL:g}):")
        for m in doc["mismatches"]:
            print(f"!!   {m}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
