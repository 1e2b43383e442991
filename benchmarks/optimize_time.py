"""How long ``attncomp.optimize`` takes on a 12-layer GPT-2-shaped model, cold and warm.

    python benchmarks/optimize_time.py [--layers 12] [--L 128] [--out DIR]

The model is transformers' GPT-2 (random weights, 768 hidden, 12 heads, eager attention), called
with an ``attention_mask`` that pads the second of two sequences, so each site's mask is proved to be
causal AND key padding and runs on the block-sparse kernel, whose CPU tile sizes are autotuned.
Every scenario runs in a fresh Python process (imports excluded from the timings):

* ``lazy``: ``optimize(model)`` without example inputs (capture happens on the first call);
* ``cold``: ``optimize(model, example_inputs=...)`` with an empty autotune cache (tunes);
* ``warm``: the same with the cache the cold run wrote (must tune nothing: asserted);
* ``dynamo_alone``: ``torch.compile(model, backend="eager")`` and one call — Dynamo's own tracing
  of this model, with no attncomp in it: the floor under any Dynamo-based capture.

Within ``cold`` and ``warm`` the time spent in attncomp's graph rewrite (match, mask proofs,
planning) is measured apart by timing ``AttncompBackend.rewrite``. Writes ``optimize_time.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def scenario(name: str, layers: int, L: int) -> dict:
    """Run in the child process: one scenario, returns its measurements."""
    import torch
    from transformers import GPT2Config, GPT2Model

    import attncomp
    from attncomp import autotune, backend

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=layers, attn_implementation="eager", attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    model = GPT2Model(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, L))
    mask = torch.ones(2, L, dtype=torch.long)
    mask[1, L // 2:] = 0
    kwargs = {"attention_mask": mask}
    with torch.no_grad():
        ref = model(ids, **kwargs).last_hidden_state
        rewrite_s = []
        real_rewrite = backend.AttncompBackend.rewrite

        def timed_rewrite(self, gm):
            t0 = time.perf_counter()
            try:
                return real_rewrite(self, gm)
            finally:
                rewrite_s.append(time.perf_counter() - t0)
        backend.AttncompBackend.rewrite = timed_rewrite
        t0 = time.perf_counter()
        if name == "dynamo_alone":
            out = torch.compile(model, backend="eager")(ids, **kwargs).last_hidden_state
        elif name == "lazy":
            fast = attncomp.optimize(model)
        else:
            fast = attncomp.optimize(model, example_inputs=(ids,), example_kwargs=kwargs)
        seconds = time.perf_counter() - t0
        res = {"scenario": name, "seconds": round(seconds, 3), "rewrite_s": round(sum(rewrite_s), 3),
               "autotune": dict(autotune.STATS),
               "tune_s": [e.get("tune_s") for e in autotune.entries() if e.get("tune_s") is not None]}
        if name in ("cold", "warm"):
            out = fast(ids, **kwargs).last_hidden_state
            report = attncomp.explain(fast)
            res["sites"] = f"{len(report.replaced)} replaced, {len(report.left)} left"
            res["strategies"] = sorted({r.strategy for r in report.replaced})
            res["masks"] = sorted({str(r.spec.mask) for r in report.rows if r.spec is not None})
        if name != "lazy":
            res["rel_err"] = ((out - ref).norm() / ref.norm()).item()
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--L", type=int, default=128, help="sequence length of the example inputs (batch 2)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(scenario(args.child, args.layers, args.L)))
        return 0
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, ATTNCOMP_AUTOTUNE="1", ATTNCOMP_AUTOTUNE_CACHE=str(Path(tmp) / "autotune.json"),
                   ATTNCOMP_CACHE_DIR=str(Path(tmp) / "kernels"))
        for name in ("lazy", "dynamo_alone", "cold", "warm"):
            proc = subprocess.run([sys.executable, __file__, "--child", name, "--layers", str(args.layers),
                                   "--L", str(args.L)], env=env, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
                return 1
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(res)
            print(json.dumps(res), flush=True)
    warm = next(r for r in results if r["scenario"] == "warm")
    cold = next(r for r in results if r["scenario"] == "cold")
    assert warm["autotune"]["tuned"] == 0, f"the warm run tuned: {warm['autotune']}"
    tuned = cold["autotune"]["tuned"]
    per_kernel = sum(cold["tune_s"]) / len(cold["tune_s"]) if cold["tune_s"] else None  # timed by autotune
    alone = next(r for r in results if r["scenario"] == "dynamo_alone")["seconds"]
    lazy = next(r for r in results if r["scenario"] == "lazy")["seconds"]
    each = f", {per_kernel:.2f} s of tuning each" if per_kernel else ""
    print(f"\nGPT-2-shaped, {args.layers} layers, B=2 L={args.L}: optimize(example_inputs) cold "
          f"{cold['seconds']:.2f} s ({tuned} kernel(s) tuned{each}), warm {warm['seconds']:.2f} s (of which "
          f"attncomp's rewrite {warm['rewrite_s']:.2f} s); Dynamo alone {alone:.2f} s; lazy optimize "
          f"{lazy * 1e3:.0f} ms")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "optimize_time.json").write_text(json.dumps({"layers": args.layers, "L": args.L, "B": 2,
                                                        "tuning_s_per_kernel": per_kernel,
                                                        "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
