"""How long ``attncomp.optimize`` takes on a 12-layer GPT-2-shaped model, cold and warm.

    python benchmarks/optimize_time.py [--layers 12] [--L 128] [--use-cache] [--out DIR]

The model is transformers' GPT-2 (random weights, 768 hidden, 12 heads, eager attention), called
with an ``attention_mask`` that pads the second of two sequences. With ``capture="dynamo"`` each
site's mask is proved to be causal AND key padding and runs on the block-sparse kernel; with
``capture="modules"`` the mask reaches each block as a run-time tensor (dense kernel). The CPU tile
sizes of either kernel are autotuned. ``--use-cache`` keeps GPT-2's default KV cache on (its update
is indexed by the layer number, so Dynamo traces every layer once even under ``"modules"``); by
default the model is built with ``use_cache=False``, as for a forward pass that does not generate.
Every scenario runs in a fresh Python process (imports excluded from the timings, Dynamo's first
use in the process included):

* ``lazy``: ``optimize(model)`` without example inputs (capture happens on the first call);
* ``dynamo_alone``: ``torch.compile(model, backend="eager")`` and one call — Dynamo's own tracing
  of the whole model, with no attncomp in it: the floor under whole-model capture;
* ``eager_call``: one call of the model itself — the part of every ``optimize(example_inputs)``
  that is running the model;
* ``cold`` / ``warm``: ``optimize(model, example_inputs=...)`` (whole-model capture) with an empty
  autotune cache (tunes), then with the cache the cold run wrote (must tune nothing: asserted);
* ``modules_cold`` / ``modules_warm``: the same with ``capture="modules"``;
* ``modules_warm_again``: ``modules_warm`` in a process that has optimized another GPT-2 before
  (untimed), so Dynamo's one-time start-up is paid already;
* ``dynamo_first_use``: ``torch.compile`` of a two-op function in a fresh process — Dynamo's one-time
  start-up (its lazy imports), which the first capture of any kind in a process pays.

Within each the time spent in attncomp's graph rewrite (match, mask proofs, planning) is measured
apart by timing ``AttncompBackend.rewrite``. Writes ``optimize_time.json``.

    python benchmarks/optimize_time.py --two-models [--sizes 64 32] [--out DIR]

Two models of one family, one process: a small Swin-like vision model (3 stages of window
attention, the same module classes at every image size) optimized at ``sizes[0]``, then another at
``sizes[1]`` — the second capture timed, against the same capture alone in its process (Dynamo's
one-time start-up paid before either, untimed). Each with ``capture="dynamo"`` and ``"modules"``,
and each once with attncomp's management of Dynamo's state (:mod:`attncomp.frontend.dynamic`) and
once with Dynamo's defaults (``dynamo_defaults``: per-code automatic dynamic, which makes the second
model's sizes symbolic). Writes ``optimize_time_two_models.json``.
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


SCENARIOS = ("lazy", "dynamo_first_use", "dynamo_alone", "eager_call", "cold", "warm", "modules_cold", "modules_warm",
             "modules_warm_again")
REFERENCE = ("lazy", "dynamo_first_use", "dynamo_alone", "eager_call")  # no optimized model to call


def scenario(name: str, layers: int, L: int, use_cache: bool) -> dict:
    """Run in the child process: one scenario, returns its measurements."""
    import torch
    from transformers import GPT2Config, GPT2Model

    import attncomp
    from attncomp import backend
    from attncomp.runtime import autotune

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=layers, attn_implementation="eager", attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
                     use_cache=use_cache)
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
        capture = "modules" if name.startswith("modules") else "dynamo"
        if name == "modules_warm_again":  # this process has optimized another GPT-2 already (untimed)
            attncomp.optimize(GPT2Model(cfg).eval(), example_inputs=(ids,), example_kwargs=kwargs, capture=capture)
            rewrite_s.clear()
        t0 = time.perf_counter()
        if name == "dynamo_first_use":
            x = torch.randn(8, 8)
            out = torch.compile(lambda x: x.softmax(-1) @ x, backend="eager")(x)
        elif name == "dynamo_alone":
            out = torch.compile(model, backend="eager")(ids, **kwargs).last_hidden_state
        elif name == "eager_call":
            out = model(ids, **kwargs).last_hidden_state
        elif name == "lazy":
            fast = attncomp.optimize(model)
        else:
            fast = attncomp.optimize(model, example_inputs=(ids,), example_kwargs=kwargs, capture=capture)
        seconds = time.perf_counter() - t0
        res = {"scenario": name, "seconds": round(seconds, 3), "rewrite_s": round(sum(rewrite_s), 3),
               "autotune": dict(autotune.STATS),
               "tune_s": [e.get("tune_s") for e in autotune.entries() if e.get("tune_s") is not None]}
        if name not in REFERENCE:
            t0 = time.perf_counter()
            out = fast(ids, **kwargs).last_hidden_state
            res["next_call_s"] = round(time.perf_counter() - t0, 3)
            report = attncomp.explain(fast)
            res["sites"] = f"{len(report.replaced)} replaced, {len(report.left)} left"
            res["graphs"] = report.graphs
            res["strategies"] = sorted({r.strategy for r in report.replaced})
            res["masks"] = sorted({str(r.spec.mask) for r in report.rows if r.spec is not None})
        if name not in ("lazy", "dynamo_first_use"):
            res["rel_err"] = ((out - ref).norm() / ref.norm()).item()
    return res


def window_net(dim: int = 16, depth: int = 2, stages: int = 3):
    """A Swin-like model on images (B, 3, S, S), S a multiple of 8·2^(stages-1): patch embedding,
    ``stages`` stages of ``depth`` blocks of 4×4 window attention (learned bias), patch merging."""
    import torch
    from torch import nn

    class WindowAttention(nn.Module):
        def __init__(self, c, heads=2, ws=4):
            super().__init__()
            self.h, self.ws = heads, ws
            self.qkv, self.proj = nn.Linear(c, 3 * c), nn.Linear(c, c)
            self.bias = nn.Parameter(torch.zeros(heads, ws * ws, ws * ws))

        def forward(self, x):  # (B, H, W, C)
            B, H, W, C = x.shape
            ws, N = self.ws, self.ws * self.ws
            x = x.view(B, H // ws, ws, W // ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, N, C)
            q, k, v = self.qkv(x).reshape(-1, N, 3, self.h, C // self.h).permute(2, 0, 3, 1, 4)
            a = ((q * (C // self.h) ** -0.5) @ k.transpose(-2, -1) + self.bias).softmax(-1)
            x = self.proj((a @ v).transpose(1, 2).reshape(-1, N, C))
            return x.view(B, H // ws, W // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.norm, self.attn, self.mlp = nn.LayerNorm(c), WindowAttention(c), nn.Linear(c, c)

        def forward(self, x):
            x = x + self.attn(self.norm(x))
            return x + self.mlp(x)

    class Merge(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.reduce = nn.Linear(4 * c, 2 * c)

        def forward(self, x):
            B, H, W, C = x.shape
            return self.reduce(x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Conv2d(3, dim, 2, 2)
            layers: list[nn.Module] = []
            for i in range(stages):
                layers += [Block(dim * 2 ** i) for _ in range(depth)]
                if i < stages - 1:
                    layers.append(Merge(dim * 2 ** i))
            self.layers = nn.Sequential(*layers)

        def forward(self, img):
            return self.layers(self.embed(img).permute(0, 2, 3, 1)).mean((1, 2))

    return Net


TWO_MODELS = [(name, capture, defaults) for capture in ("dynamo", "modules") for defaults in (False, True)
              for name in ("alone", "second")]


def two_models(name: str, capture: str, dynamo_defaults: bool, sizes: list[int]) -> dict:
    """Run in the child process: the second model's capture, alone or after the first."""
    import torch

    import attncomp
    from attncomp.frontend import dynamic, modcapture

    if dynamo_defaults:  # before attncomp managed Dynamo's state: Dynamo's own defaults, no marks
        modcapture.compile_options = dynamic.compile_options = lambda: {}
        dynamic.ShapeTracker.observe = lambda self, args, kwargs: []
    Net = window_net()
    first, second = (torch.randn(1, 3, s, s) for s in sizes)

    def optimize(x):
        with torch.no_grad():
            return attncomp.optimize(Net().eval(), example_inputs=(x,), capture=capture)

    optimize(second)  # Dynamo's one-time start-up (lazy imports), untimed
    torch._dynamo.reset()
    if name == "second":
        optimize(first)
    t0 = time.perf_counter()
    fast = optimize(second)
    seconds = time.perf_counter() - t0
    report = attncomp.explain(fast)
    return {"scenario": name, "capture": capture, "dynamo_defaults": dynamo_defaults, "sizes": sizes,
            "seconds": round(seconds, 3), "graphs": report.graphs, "dynamic_graphs": report.dynamic_graphs,
            "sites": f"{len(report.replaced)} replaced, {len(report.left)} left"}


def main_two_models(args) -> int:
    results = []
    for name, capture, defaults in TWO_MODELS:
        proc = subprocess.run([sys.executable, __file__, "--two-models", "--child", f"{name}:{capture}:{int(defaults)}",
                               "--sizes", *map(str, args.sizes)], capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            return 1
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    by = {(r["scenario"], r["capture"], r["dynamo_defaults"]): r for r in results}
    for capture in ("dynamo", "modules"):
        for defaults, label in ((True, "Dynamo's defaults"), (False, "attncomp's Dynamo management")):
            alone, second = by[("alone", capture, defaults)], by[("second", capture, defaults)]
            print(f"capture={capture}, {label}: the {args.sizes[1]}px model optimized after a {args.sizes[0]}px "
                  f"one {second['seconds']:.2f} s ({second['dynamic_graphs']} dynamic graph(s)); alone "
                  f"{alone['seconds']:.2f} s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "optimize_time_two_models.json").write_text(json.dumps({"sizes": args.sizes, "results": results},
                                                                 indent=1))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--L", type=int, default=128, help="sequence length of the example inputs (batch 2)")
    p.add_argument("--use-cache", action="store_true", help="keep GPT-2's KV cache on (its default)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    p.add_argument("--two-models", action="store_true", help="two window-attention models of one family (see above)")
    p.add_argument("--sizes", type=int, nargs=2, default=[64, 32], help="--two-models: image sizes, first and second")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.two_models and args.child:
        name, capture, defaults = args.child.split(":")
        print(json.dumps(two_models(name, capture, defaults == "1", args.sizes)))
        return 0
    if args.two_models:
        return main_two_models(args)
    if args.child:
        print(json.dumps(scenario(args.child, args.layers, args.L, args.use_cache)))
        return 0
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, ATTNCOMP_AUTOTUNE="1", ATTNCOMP_AUTOTUNE_CACHE=str(Path(tmp) / "autotune.json"),
                   ATTNCOMP_CACHE_DIR=str(Path(tmp) / "kernels"))
        for name in SCENARIOS:
            if name == "modules_cold":  # its own empty cache: the dense kernel's tiles are tuned here
                env["ATTNCOMP_AUTOTUNE_CACHE"] = str(Path(tmp) / "autotune-modules.json")
            proc = subprocess.run([sys.executable, __file__, "--child", name, "--layers", str(args.layers),
                                   "--L", str(args.L)] + (["--use-cache"] if args.use_cache else []),
                                  env=env, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
                return 1
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(res)
            print(json.dumps(res), flush=True)
    by = {r["scenario"]: r for r in results}
    for capture, cold, warm in (("dynamo", by["cold"], by["warm"]),
                                ("modules", by["modules_cold"], by["modules_warm"])):
        assert warm["autotune"]["tuned"] == 0, f"the warm run ({capture}) tuned: {warm['autotune']}"
        tune = [t for t in cold["tune_s"] if t is not None]
        each = f", {sum(tune) / len(tune):.2f} s of tuning each" if tune else ""
        print(f"capture={capture}: optimize(example_inputs) cold {cold['seconds']:.2f} s "
              f"({cold['autotune']['tuned']} kernel(s) tuned{each}), warm {warm['seconds']:.2f} s (attncomp's "
              f"rewrite {warm['rewrite_s']:.2f} s, {warm['graphs']} graph(s)); next call {warm['next_call_s']:.2f} s")
    again = by["modules_warm_again"]
    assert again["autotune"]["tuned"] == 0, f"modules_warm_again tuned: {again['autotune']}"
    print(f"capture=modules, warm, in a process that optimized another model before: {again['seconds']:.2f} s")
    print(f"GPT-2-shaped, {args.layers} layers, B=2 L={args.L}, use_cache={args.use_cache}: one eager call "
          f"{by['eager_call']['seconds']:.2f} s; Dynamo alone (whole model) {by['dynamo_alone']['seconds']:.2f} s; "
          f"lazy optimize {by['lazy']['seconds'] * 1e3:.0f} ms; Dynamo's first use in a process "
          f"{by['dynamo_first_use']['seconds']:.2f} s")
    tune = [t for r in results for t in r.get("tune_s", []) if t is not None]
    per_kernel = sum(tune) / len(tune) if tune else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "optimize_time.json").write_text(json.dumps({"layers": args.layers, "L": args.L, "B": 2,
                                                        "use_cache": args.use_cache,
                                                        "tuning_s_per_kernel": per_kernel,
                                                        "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
