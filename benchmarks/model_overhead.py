"""Never slower: every model of the test suite's model list, optimized against its original, at a
shape where per-call overhead dominates (L=32) and at L=1024; and the per-site overhead of a
replaced site against a direct SDPA call.

    python benchmarks/model_overhead.py [--lengths 32,1024] [--repeats 15] [--threads N] [--out DIR]

Models (random weights, CPU, float32, eval, ``torch.no_grad()``), as in ``tests/test_models.py``:
transformers' GPT-2, BERT and Llama (4 layers, hidden 64, 4 heads; Llama with 2 KV heads), each
with ``attn_implementation`` "eager" and "sdpa", batch 2 with the second sequence right-padded to
3/4 of its length (``attention_mask``); timm's ViT-Tiny (4 blocks, 224², its fused SDPA path and
its explicit softmax path: the image size fixes L=197, so it runs once). ``attncomp.optimize``
with default settings (``strategy="auto"``, first-call verification on); capture is outside the
timings.

Timing: the original and the optimized model are called in turns (original, optimized, original,
…) after warm-up, each call timed with ``perf_counter``; the median of ``--repeats`` pairs is
reported, and the ratio original / optimized (> 1: attncomp faster). Outputs are compared first
(relative error on the non-padded positions); a mismatch is reported and fails the run.

Per-site overhead: one attention site module as the rewrite builds it (an SDPA call with a causal
bool mask built in ``forward``, B=1, H=4, L=32, D=16), optimized; its call against a direct
``F.scaled_dot_product_attention(q, k, v, is_causal=True)`` on the same tensors, in µs.

Writes ``benchmarks/results/model-overhead-cpu-<date>.json``.
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
from torch import nn

import attncomp

ROOT = Path(__file__).resolve().parent.parent
LAYERS = 4


def text_model(kind: str, impl: str, L: int):
    import transformers as T

    if kind == "gpt2":
        cfg = T.GPT2Config(n_layer=LAYERS, n_head=4, n_embd=64, vocab_size=128, n_positions=max(L, 64),
                           attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, attn_implementation=impl)
        return T.GPT2Model(cfg)
    if kind == "bert":
        cfg = T.BertConfig(num_hidden_layers=LAYERS, num_attention_heads=4, hidden_size=64, intermediate_size=128,
                           vocab_size=128, max_position_embeddings=max(L, 64), hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0, attn_implementation=impl)
        return T.BertModel(cfg)
    cfg = T.LlamaConfig(num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                        intermediate_size=128, vocab_size=128, attn_implementation=impl)
    return T.LlamaModel(cfg)


def cases(lengths):
    import timm

    for L in lengths:
        for kind in ("gpt2", "bert", "llama"):
            for impl in ("eager", "sdpa"):
                torch.manual_seed(0)
                model = text_model(kind, impl, L).eval()
                ids = torch.randint(0, 128, (2, L))
                mask = torch.ones(2, L, dtype=torch.long)
                mask[1, 3 * L // 4:] = 0
                yield f"{kind}-{impl}", L, model, (ids,), {"attention_mask": mask}, mask.bool()
    for fused in (True, False):
        torch.manual_seed(0)
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, depth=LAYERS).eval()
        for blk in model.blocks:
            blk.attn.fused_attn = fused
        yield f"vit-{'sdpa' if fused else 'eager'}", 197, model, (torch.randn(2, 3, 224, 224),), {}, None


def _out(x):
    return x.last_hidden_state if hasattr(x, "last_hidden_state") else x


def interleaved(fns, warmup: int, repeats: int) -> list[float]:
    """Median seconds per call of each function, called in turns."""
    for _ in range(warmup):
        for f in fns:
            f()
    samples = [[] for _ in fns]
    for _ in range(repeats):
        for f, s in zip(fns, samples):
            t0 = time.perf_counter()
            f()
            s.append(time.perf_counter() - t0)
    return [statistics.median(s) for s in samples]


class CausalSite(nn.Module):
    def forward(self, q, k, v):
        i = torch.arange(q.shape[-2], device=q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=i[None, :] <= i[:, None])


def site_overhead(repeats: int) -> dict:
    q, k, v = (torch.randn(1, 4, 32, 16) for _ in range(3))
    site = CausalSite()
    fast = attncomp.optimize(site, example_inputs=(q, k, v))
    (kernel,) = [r.kernel for r in attncomp.explain(fast).replaced]
    gm = fast._runner  # the compiled runner: Dynamo's guards + the rewritten graph
    direct = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    t_direct, t_site, t_model, t_orig = interleaved(
        [direct, lambda: kernel(q, k, v), lambda: gm(q, k, v), lambda: site(q, k, v)], 50, max(200, 20 * repeats))
    return {"direct_sdpa_us": 1e6 * t_direct, "site_module_us": 1e6 * t_site,
            "site_overhead_us": 1e6 * (t_site - t_direct), "optimized_model_us": 1e6 * t_model,
            "original_model_us": 1e6 * t_orig, "variant": kernel.plan.variant}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="32,1024")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    lengths = [int(x) for x in a.lengths.split(",")]
    rows, bad = [], []
    load0 = os.getloadavg()[0]
    with torch.no_grad():
        for name, L, model, args, kwargs, keep in cases(lengths):
            torch._dynamo.reset()
            fast = attncomp.optimize(model, example_inputs=args, example_kwargs=kwargs)
            ref, out = _out(model(*args, **kwargs)), _out(fast(*args, **kwargs))
            if keep is not None:
                ref, out = ref[keep], out[keep]
            err = ((out - ref).norm() / ref.norm()).item()
            rep = attncomp.explain(fast)
            n = 2 if L >= 512 else 5
            calls = [lambda m=m: m(*args, **kwargs) for m in (model, fast)]  # noqa: B023 (used right here)
            t_orig, t_fast = interleaved(calls, n, a.repeats if L < 512 else max(5, a.repeats // 3))
            row = {"model": name, "L": L, "original_ms": 1e3 * t_orig, "optimized_ms": 1e3 * t_fast,
                   "speedup": t_orig / t_fast, "rel_err": err, "replaced": len(rep.replaced), "kept": len(rep.kept),
                   "variants": sorted({r.plan.variant for r in rep.replaced})}
            rows.append(row)
            if not err <= 1e-4:
                bad.append(row)
            print(f"{name:<12} L={L:<5} original {row['original_ms']:8.2f} ms  optimized {row['optimized_ms']:8.2f} ms"
                  f"  x{row['speedup']:.2f}  err {err:.1e}  replaced {row['replaced']} kept {row['kept']} "
                  f"{','.join(row['variants'])}", flush=True)
        site = site_overhead(a.repeats)
    print(f"per-site: direct SDPA {site['direct_sdpa_us']:.1f} us, site module {site['site_module_us']:.1f} us "
          f"(overhead {site['site_overhead_us']:+.1f} us, variant {site['variant']}); whole one-site model: "
          f"original {site['original_model_us']:.1f} us, optimized {site['optimized_model_us']:.1f} us")
    slower = [r for r in rows if r["speedup"] < 1.0]
    print(f"min speedup x{min(r['speedup'] for r in rows):.2f}; slower than the original: "
          f"{[(r['model'], r['L']) for r in slower] or 'none'}")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    out = Path(a.out) / f"model-overhead-cpu-{time.strftime('%Y-%m-%d')}.json"
    out.write_text(json.dumps({"rows": rows, "site": site, "threads": torch.get_num_threads(),
                               "load_avg": [load0, os.getloadavg()[0]], "torch": torch.__version__}, indent=1))
    print(f"wrote {out}")
    if bad:
        print(f"!! mismatches: {bad}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
