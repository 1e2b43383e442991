"""A mask after Dynamo's automatic-dynamic recompile: proved for every length, it should cost what it
costs in a graph compiled for one length.

    python benchmarks/dynamic_masks.py [--L 4096] [--window 256] [--repeats 10] [--threads N] [--out DIR]

One process, CPU, float32, B=1, H=8, D=64: one SDPA site whose causal sliding-window bool mask (the
last ``window`` keys) is built from ``arange`` in ``forward`` (as transformers builds masks). Timed at L:

* ``static``  — ``attncomp.optimize(model)`` called at L only (Dynamo compiles it for that one length);
* ``dynamic`` — a second ``attncomp.optimize(model)`` called first at L/2 and 3L/4 (Dynamo recompiles
  with symbolic sizes at its second length), then timed at L, a length its graph had not seen;
* ``flex``    — ``torch.compile(flex_attention)`` with the same ``mask_mod`` (block mask built and
  compiled outside the timings);
* ``eager``   — the model as written (SDPA on the dense L x L bool mask).

The implementations are called in turns, the garbage collector paused; medians of the repeats. Every
output is compared with eager's. Writes ``<out>/dynamic-masks-cpu-<date>.json`` (default
``benchmarks/results``) with every sample, what explain says about both optimized models, and the
machine's load average.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent


class WindowSite(nn.Module):
    """SDPA under a causal sliding window of ``window`` keys, its bool mask built in ``forward``.
    qkv ``(3, B, H, L, D)`` float32 (q, k, v stacked, as a fused projection makes them: their lengths
    are one size in Dynamo's graph) → ``(B, H, L, D)``."""

    def __init__(self, window: int):
        super().__init__()
        self.window = window

    def forward(self, qkv):
        q, k, v = qkv.unbind(0)
        idx = torch.arange(q.shape[-2], device=q.device)
        keep = (idx[None, :] <= idx[:, None]) & (idx[None, :] > idx[:, None] - self.window)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def explained(fast) -> dict:
    """What ``attncomp.explain`` says about an optimized model's latest graph."""
    import attncomp

    rep = attncomp.explain(fast)
    row = rep.replaced[0] if rep.replaced else rep.rows[0]
    return {"graphs": rep.graphs, "mask": str(row.spec.mask) if row.spec else None, "strategy": row.strategy,
            "reason": row.reason, "calls": dict(getattr(row.kernel, "calls", {}) or {})}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--L", type=int, default=4096)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--out", type=Path, default=ROOT / "results")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import attncomp

    torch.manual_seed(0)
    L, W = args.L, args.window
    load_start = os.getloadavg()
    model = WindowSite(W).eval()

    def qkv(n):
        return torch.randn(3, 1, 8, n, 64)

    x = qkv(L)
    q, k, v = x.unbind(0)
    impls, notes = {}, {}
    with torch.no_grad():
        static = attncomp.optimize(model)
        t0 = time.perf_counter()
        static(x)  # compiled for L (the first length Dynamo sees for this code)
        notes["static_first_call_s"] = time.perf_counter() - t0
        dynamic = attncomp.optimize(model)
        for n in (L // 2, 3 * L // 4):
            dynamic(qkv(n))
        t0 = time.perf_counter()
        dynamic(x)
        notes["dynamic_first_call_at_L_s"] = time.perf_counter() - t0
        impls["static"] = lambda: static(x)
        impls["dynamic"] = lambda: dynamic(x)
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            t0 = time.perf_counter()
            bm = create_block_mask(lambda b, h, qi, ki: (ki <= qi) & (ki > qi - W), None, None, L, L, device="cpu")
            flex = torch.compile(flex_attention)
            flex(q, k, v, block_mask=bm)
            notes["flex_block_mask_and_compile_s"] = time.perf_counter() - t0
            impls["flex"] = lambda: flex(q, k, v, block_mask=bm)
        except Exception as e:  # noqa: BLE001 — a peer that cannot run is reported, not fatal
            notes["flex_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        impls["eager"] = lambda: model(x)
        ref = model(x)
        errors = {name: rel_err(fn(), ref) for name, fn in impls.items()}
        times: dict = {name: [] for name in impls}
        gc.disable()
        try:
            for i in range(args.warmup + args.repeats):
                for name, fn in impls.items():
                    t0 = time.perf_counter()
                    fn()
                    if i >= args.warmup:
                        times[name].append((time.perf_counter() - t0) * 1e3)
        finally:
            gc.enable()
    med = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "date": datetime.date.today().isoformat(),
        "params": {"B": 1, "H": 8, "L": L, "D": 64, "window": W, "dtype": "float32", "device": "cpu",
                   "dynamic_warm_lengths": [L // 2, 3 * L // 4]},
        "machine": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
        "median_ms": med, "times_ms": times, "rel_err_vs_eager": errors,
        "dynamic_over_static": med["dynamic"] / med["static"], "notes": notes,
        "explain": {"static": explained(static), "dynamic": explained(dynamic)},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"dynamic-masks-cpu-{result['date']}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    for name, t in med.items():
        print(f"{name:8s} {t:9.1f} ms  rel err {errors[name]:.1e}  ({med['eager'] / t:.2f}x eager)")
    print(f"dynamic / static = {result['dynamic_over_static']:.3f}; load average {load_start} → "
          f"{result['machine']['loadavg_end']}; wrote {path}")
    for name in ("static", "dynamic"):
        e = result["explain"][name]
        print(f"{name}: graphs {e['graphs']}, mask {e['mask']}, {e['strategy']}: {e['reason']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
