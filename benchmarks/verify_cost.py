"""What first-call verification costs: ``optimize(model, example_inputs=…)`` with ``verify=True``
(the default) against ``verify=False``, and the steady-state call after it.

    python benchmarks/verify_cost.py [--repeats 3] [--out DIR]

Models (random weights, CPU, float32): transformers' GPT-2 (12 layers, 768 wide, 12 heads, eager
attention, B=2, L=128, the second sequence padded) and a 12-block stack of XCiT-style
cross-covariance attention (channel attention, dim 192, 4 heads, B=2, N=196). Each measurement runs
in a fresh Python process (imports excluded, Dynamo's first use in the process included), the two
settings alternating, ``--repeats`` times each; the medians are reported. The steady-state call is
the median of 10 calls after 2 warm-up calls. Writes ``benchmarks/results/verify-cost-cpu-<date>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("gpt2", "xca")


def _build(name: str):
    import torch
    import torch.nn.functional as F
    from torch import nn

    torch.manual_seed(0)
    if name == "gpt2":
        from transformers import GPT2Config, GPT2Model

        cfg = GPT2Config(n_layer=12, attn_implementation="eager", attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
                         use_cache=False)
        model = GPT2Model(cfg).eval()
        ids = torch.randint(0, cfg.vocab_size, (2, 128))
        mask = torch.ones(2, 128, dtype=torch.long)
        mask[1, 96:] = 0
        return model, (ids,), {"attention_mask": mask}

    class XCA(nn.Module):
        def __init__(self, dim=192, heads=4):
            super().__init__()
            self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
            self.norm = nn.LayerNorm(dim)

        def forward(self, x):
            B, N, C = x.shape
            q, k, v = self.qkv(self.norm(x)).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 4, 1)
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
            attn = ((q @ k.transpose(-2, -1)) * self.temperature).softmax(-1)
            return x + self.proj((attn @ v).permute(0, 3, 1, 2).reshape(B, N, C))

    model = nn.Sequential(*[XCA() for _ in range(12)]).eval()
    return model, (torch.randn(2, 196, 192),), {}


def child(name: str, verify: bool) -> dict:
    import torch

    import attncomp

    model, args, kwargs = _build(name)
    with torch.no_grad():
        t0 = time.perf_counter()
        fast = attncomp.optimize(model, example_inputs=args, example_kwargs=kwargs, verify=verify)
        first = time.perf_counter() - t0
        for _ in range(2):
            fast(*args, **kwargs)
        steady = []
        for _ in range(10):
            t0 = time.perf_counter()
            fast(*args, **kwargs)
            steady.append(time.perf_counter() - t0)
        err = (fast(*args, **kwargs)[0] if name == "gpt2" else fast(*args)).sub(
            model(*args, **kwargs)[0] if name == "gpt2" else model(*args)).abs().max().item()
    rep = attncomp.explain(fast)
    return {"first_s": first, "steady_ms": 1e3 * statistics.median(steady), "max_abs_diff": err,
            "replaced": len(rep.replaced), "verified": sum(r.kernel.verify_state == "passed" for r in rep.replaced)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], a.child[1] == "1")))
        return
    runs: dict = {}
    for name in MODELS:
        for r in range(a.repeats):
            for verify in (True, False):
                out = subprocess.run([sys.executable, __file__, "--child", name, str(int(verify))], check=True,
                                     capture_output=True, text=True, cwd=ROOT).stdout.strip().splitlines()[-1]
                runs.setdefault(f"{name}/verify={verify}", []).append(json.loads(out))
                print(f"{name} verify={verify} run {r + 1}: {out}", file=sys.stderr)
    summary = {}
    print(f"{'model':<6} {'verify':<6} {'optimize(example) s':>20} {'steady call ms':>15} {'sites verified':>15}")
    for key, rs in runs.items():
        name, v = key.split("/verify=")
        s = {"first_s": statistics.median(x["first_s"] for x in rs),
             "steady_ms": statistics.median(x["steady_ms"] for x in rs),
             "verified": rs[0]["verified"], "replaced": rs[0]["replaced"],
             "max_abs_diff": max(x["max_abs_diff"] for x in rs)}
        summary[key] = s
        print(f"{name:<6} {v:<6} {s['first_s']:>20.2f} {s['steady_ms']:>15.1f} {s['verified']:>9}/{s['replaced']:<5}")
    for name in MODELS:
        on, off = summary[f"{name}/verify=True"], summary[f"{name}/verify=False"]
        print(f"{name}: verification adds {on['first_s'] - off['first_s']:+.2f} s to the first call "
              f"({on['first_s'] / off['first_s']:.2f}x)")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    out = Path(a.out) / f"verify-cost-cpu-{time.strftime('%Y-%m-%d')}.json"
    out.write_text(json.dumps({"runs": runs, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
