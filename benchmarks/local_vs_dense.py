"""Local vs dense on CPU: where the block-sparse kernel starts to beat the dense kernel on a causal
sliding window, the measurement behind ``attncomp.strategies.sparse.tables.MIN_SKIPPED``.

    python benchmarks/local_vs_dense.py [--lengths 128,256,512,1024] [--windows 32,128,256] [--repeats 15]

One module: the mask ``(j <= i) & (j > i - w)`` built from ``arange`` in ``forward`` and passed to
SDPA, B=2, H=4, D=64, float32, ``torch.no_grad()``. Per (L, w): ``optimize(strategy="local")`` (the
block-sparse kernel), ``optimize(strategy="dense")`` (the dense kernel on the materialised mask),
``optimize()`` (what ``auto`` picks) and the module as written, called in turns after warm-up; medians
of ``--repeats`` calls, and the fraction of 64×64 tiles the window skips. Writes
``benchmarks/results/local-vs-dense-cpu-<date>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import attncomp
from attncomp.strategies.sparse.tables import skipped_fraction

ROOT = Path(__file__).resolve().parent.parent


class CausalWindow(torch.nn.Module):
    def __init__(self, w: int):
        super().__init__()
        self.w = w

    def forward(self, q, k, v):
        i = torch.arange(q.shape[-2])[:, None]
        j = torch.arange(k.shape[-2])[None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=(j <= i) & (j > i - self.w))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="128,256,512,1024")
    ap.add_argument("--windows", default="32,128,256")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = ap.parse_args(argv)
    rows = []
    torch.manual_seed(0)
    for L in (int(x) for x in a.lengths.split(",")):
        for w in (int(x) for x in a.windows.split(",")):
            if w >= L:
                continue
            q, k, v = (torch.randn(2, 4, L, 64) for _ in range(3))
            module = CausalWindow(w)
            impls = {"eager": module}
            with torch.no_grad():
                for name in ("local", "dense", "auto"):
                    impls[name] = attncomp.optimize(module, strategy=name)
                    impls[name](q, k, v)
                ref = module(q, k, v)
                times = {n: [] for n in impls}
                for _ in range(3):
                    for f in impls.values():
                        f(q, k, v)
                for _ in range(a.repeats):
                    for n, f in impls.items():
                        t = time.perf_counter()
                        f(q, k, v)
                        times[n].append(time.perf_counter() - t)
                errs = {n: float((impls[n](q, k, v) - ref).abs().max()) for n in ("local", "dense", "auto")}
            rep = attncomp.explain(impls["auto"])
            row = {"L": L, "w": w, "skipped": skipped_fraction(rep.rows[0].spec),
                   "auto_variant": rep.rows[0].plan.variant, "max_abs_err": errs,
                   **{f"{n}_ms": 1e3 * statistics.median(t) for n, t in times.items()}}
            row["local_over_dense"] = row["local_ms"] / row["dense_ms"]
            rows.append(row)
            print(f"L={L:5d} w={w:4d} skipped {row['skipped']:.2f}: local {row['local_ms']:.2f} ms, dense "
                  f"{row['dense_ms']:.2f} ms (local/dense {row['local_over_dense']:.2f}), auto ({row['auto_variant']}) "
                  f"{row['auto_ms']:.2f} ms, eager {row['eager_ms']:.2f} ms", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"local-vs-dense-cpu-{time.strftime('%Y-%m-%d')}.json"
    path.write_text(json.dumps({"rows": rows, "threads": torch.get_num_threads(), "load_avg": os.getloadavg(),
                                "torch": torch.__version__, "argv": sys.argv[1:]}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
