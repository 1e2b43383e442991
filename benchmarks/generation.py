"""Greedy generation with transformers: tokens/s of ``model.generate`` on each attention implementation.

    python benchmarks/generation.py                    # CPU: 12 layers, prompt 512, 128 new tokens, B in {1, 8}
    python benchmarks/generation.py --quick            # CPU: 4 layers, prompt 256, 32 new tokens, B=1
    python benchmarks/generation.py --b 1 --repeats 1  # one batch size, one timed run
    python benchmarks/generation.py --profile          # + a torch.profiler table of one attncomp decode run
    python benchmarks/generation.py --gpu              # on a CUDA machine: the GPU section (see below)

Model (CPU): a Llama-shaped ``LlamaForCausalLM`` with random weights (seed 0): ``--layers`` (12) layers,
hidden 768, 12 heads of 64, 4 KV heads (GQA 3:1), intermediate 2048, vocabulary 32000, float32, eval.
Inputs: ``--b`` batches of ``--prompt`` random tokens (same length, no padding: generate drops the
all-ones attention mask), greedy, ``min_new_tokens = max_new_tokens = --new`` (no early stop),
``use_cache=True`` with a DynamicCache.

Implementations (the same weights in each):

* ``eager`` / ``sdpa`` — ``attn_implementation="eager"`` / ``"sdpa"``;
* ``opt_sdpa`` / ``opt_eager`` — ``attncomp.optimize`` of the sdpa / eager model (``generate`` runs through
  attncomp's Dynamo-captured forward);
* ``attncomp`` — ``attn_implementation="attncomp"`` (mask as IR, decode steps on ``attncomp::decode_fwd``).

For each batch size: one warm-up ``generate`` per implementation (Dynamo capture for the optimized
models happens here, outside the timings), then ``--repeats`` rounds; in each round every
implementation runs, in turns, ``generate`` with 1 new token (*prefill*: the prompt's forward and one
token) and with ``--new`` tokens (*total*). Medians; decode tokens/s = ``B·(new-1) / (total - prefill)``,
end-to-end tokens/s = ``B·new / total``. Ratios are against eager and sdpa measured in the same run (> 1:
faster). The greedy tokens of every implementation are checked equal to eager's (a mismatch is
reported with the first differing position and makes the exit status 1).

GPU (``--gpu``; needs ``torch.cuda.is_available()``; not run here): (1) the same generation on CUDA in
bfloat16 with ``--gpu-prompt`` tokens (default 4096); (2) op level, decode Lq=1 against Lk in
{4k, 16k, 64k, 128k}, GQA 8:1 (Hq=32, Hkv=4), D=128, bf16, B in {1, 8}: attncomp's split-KV decode op,
SDPA (enable_gqa) and compiled FlexAttention (its decoding kernel) — ``benchmarks/decode.py``'s GPU
section, run from here.

Writes ``benchmarks/results/generation-<cpu|gpu>-<date>.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import attncomp

HERE = Path(__file__).resolve().parent
IMPLS = ("eager", "sdpa", "opt_sdpa", "opt_eager", "attncomp")


def make_model(layers: int, vocab: int, dtype, device, seed: int = 0):
    """The Llama-shaped model (eager attention) with random weights from ``seed``."""
    import transformers as T

    torch.manual_seed(seed)
    cfg = T.LlamaConfig(num_hidden_layers=layers, hidden_size=768, num_attention_heads=12, num_key_value_heads=4,
                        intermediate_size=2048, vocab_size=vocab, max_position_embeddings=8192 + 512,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="eager")
    return T.LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def implementations(base, names) -> dict:
    """name -> a model running that implementation (deep copies of ``base``: the same weights)."""
    out = {}
    for name in names:
        impl = {"opt_sdpa": "sdpa", "opt_eager": "eager"}.get(name, name)
        m = copy.deepcopy(base)
        m.set_attn_implementation(impl)
        out[name] = attncomp.optimize(m) if name.startswith("opt_") else m
    return out


def generate(model, ids, new: int):
    return model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=True,
                          pad_token_id=0)


def timed(fn) -> tuple[float, object]:
    gc.collect()
    gc.disable()
    try:
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out
    finally:
        gc.enable()


def graphs(model) -> int | None:
    try:
        return attncomp.explain(model).graphs
    except Exception:  # not an optimized model
        return None


def first_diff(a: torch.Tensor, b: torch.Tensor):
    if a.shape != b.shape:
        return f"shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    idx = torch.nonzero(a != b)
    return None if idx.numel() == 0 else idx[0].tolist()


def count_decode_calls(model, ids, new: int) -> dict:
    """attncomp op calls (by name) during one ``generate`` (a dispatch mode: outside the timings)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.counts: dict[str, int] = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "attncomp":
                self.counts[func._opname] = self.counts.get(func._opname, 0) + 1
            return func(*args, **(kwargs or {}))

    ops = Ops()
    with ops:
        generate(model, ids, new)
    return ops.counts


def run_batch(models: dict, B: int, args, device) -> dict:
    g = torch.Generator().manual_seed(B)
    ids = torch.randint(3, args.vocab, (B, args.prompt), generator=g).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    tokens, compile_s = {}, {}
    for name, m in models.items():  # warm-up: Dynamo capture of the optimized models happens here
        t, out = timed(lambda m=m: (generate(m, ids, args.new), sync())[0])
        compile_s[name] = t
        tokens[name] = out[:, args.prompt:].cpu()
        # a second generate on the same prompt tensor recompiles the prefill graph once (the tensor now
        # carries Dynamo's dynamic-dim marking from the first): that too happens before the timings
        generate(m, ids, 1)
    prefill: dict[str, list[float]] = {n: [] for n in models}
    total: dict[str, list[float]] = {n: [] for n in models}
    for _ in range(args.repeats):
        for name, m in models.items():
            t, _ = timed(lambda m=m: (generate(m, ids, 1), sync()))
            prefill[name].append(t)
            t, _ = timed(lambda m=m: (generate(m, ids, args.new), sync()))
            total[name].append(t)
    rows = {}
    for name in models:
        p, t = statistics.median(prefill[name]), statistics.median(total[name])
        rows[name] = {"prefill_s": p, "total_s": t, "decode_tok_s": B * (args.new - 1) / max(t - p, 1e-9),
                      "e2e_tok_s": B * args.new / t, "first_generate_s": compile_s[name],  # capture included
                      "prefill_samples_s": prefill[name], "total_samples_s": total[name],
                      "tokens_equal_eager": first_diff(tokens[name], tokens["eager"]) is None if "eager" in tokens
                      else None,
                      "first_token_diff": first_diff(tokens[name], tokens["eager"]) if "eager" in tokens else None,
                      "dynamo_graphs": graphs(models[name])}
    for ref in ("eager", "sdpa"):
        if ref in rows:
            for r in rows.values():
                r[f"decode_x_vs_{ref}"] = r["decode_tok_s"] / rows[ref]["decode_tok_s"]
                r[f"prefill_x_vs_{ref}"] = rows[ref]["prefill_s"] / r["prefill_s"]
                r[f"e2e_x_vs_{ref}"] = r["e2e_tok_s"] / rows[ref]["e2e_tok_s"]
    if "attncomp" in models:
        rows["attncomp"]["op_calls_one_generate"] = count_decode_calls(models["attncomp"], ids, args.new)
    return {"B": B, "impls": rows}


def print_batch(r: dict, new: int) -> None:
    print(f"\nB={r['B']}  ({new} new tokens; x = ratio, > 1 faster)")
    print(f"{'impl':>10} | {'prefill s':>9} {'x eager':>7} {'x sdpa':>6} | {'decode tok/s':>12} {'x eager':>7} "
          f"{'x sdpa':>6} | {'e2e tok/s':>9} | {'tokens':>6} | graphs")
    for name, x in r["impls"].items():
        ok = {True: "=eager", False: "DIFF", None: "-"}[x["tokens_equal_eager"]]
        print(f"{name:>10} | {x['prefill_s']:>9.3f} {x.get('prefill_x_vs_eager', 0):>7.2f} "
              f"{x.get('prefill_x_vs_sdpa', 0):>6.2f} | {x['decode_tok_s']:>12.1f} "
              f"{x.get('decode_x_vs_eager', 0):>7.2f} {x.get('decode_x_vs_sdpa', 0):>6.2f} | "
              f"{x['e2e_tok_s']:>9.1f} | {ok:>6} | {x['dynamo_graphs']}")


def machine() -> dict:
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "loadavg": os.getloadavg()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), info["cpu"])
    except (ImportError, OSError):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def profile_decode(models: dict, args, device) -> str:
    """torch.profiler table (top ops by self CPU time) of one ``generate`` of the attncomp implementation
    and of the optimized sdpa model, B=1."""
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(3, args.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(1)).to(device)
    text = []
    for name in ("attncomp", "opt_sdpa", "sdpa"):
        if name not in models:
            continue
        generate(models[name], ids, args.new)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            generate(models[name], ids, args.new)
        text.append(f"== {name}\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
    return "\n".join(text)


def run(args, device: str, dtype) -> dict:
    start = os.getloadavg()
    base = make_model(args.layers, args.vocab, dtype, device)
    models = {}
    out = {"section": "cpu" if device == "cpu" else "gpu",
           "config": {"layers": args.layers, "hidden": 768, "heads": 12, "kv_heads": 4, "intermediate": 2048,
                      "vocab": args.vocab, "dtype": str(dtype)[6:], "prompt": args.prompt, "new_tokens": args.new,
                      "repeats": args.repeats, "cache": "DynamicCache", "greedy": True},
           "results": []}
    with torch.no_grad():
        for B in args.b:
            torch._dynamo.reset()  # each batch size captured afresh (no recompile-limit carry-over)
            models = implementations(base, args.impls)
            r = run_batch(models, B, args, device)
            print_batch(r, args.new)
            out["results"].append(r)
        if args.profile:
            out["profile"] = profile_decode(models, args, device)
            print(out["profile"])
    out["machine"] = {**machine(), "loadavg_start": start, "loadavg_end": os.getloadavg()}
    out["ok"] = all(x["tokens_equal_eager"] is not False for r in out["results"] for x in r["impls"].values())
    return out


def run_gpu(args) -> dict:  # pragma: no cover - needs CUDA
    sys.path.insert(0, str(HERE))
    import decode

    args.prompt = args.gpu_prompt
    gen = run(args, "cuda", torch.bfloat16)
    gen["decode_op"] = decode.run_gpu(args)  # B in {1, 8}, Lk in {4k, 16k, 64k, 128k}, GQA 8:1, bf16
    return gen


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--b", type=lambda s: [int(x) for x in s.split(",")], default=None, help="batch sizes (1,8)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (12; --quick 4)")
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens (512; --quick 256)")
    p.add_argument("--new", type=int, default=None, help="new tokens (128; --quick 32)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (3; --quick 1)")
    p.add_argument("--impls", type=lambda s: s.split(","), default=list(IMPLS),
                   help=f"comma-separated subset of {','.join(IMPLS)}")
    p.add_argument("--quick", action="store_true", help="4 layers, prompt 256, 32 new tokens, B=1, 1 round")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--profile", action="store_true", help="also profile one generate of attncomp / opt_sdpa / sdpa")
    p.add_argument("--gpu", action="store_true", help="run the GPU section instead (needs CUDA)")
    p.add_argument("--gpu-prompt", type=int, default=4096)
    p.add_argument("--out", type=Path, default=None, help="JSON file (default benchmarks/results/generation-…)")
    args = p.parse_args(argv)
    q = args.quick
    for name, full, quick in (("b", [1, 8], [1]), ("layers", 12, 4), ("prompt", 512, 256), ("new", 128, 32),
                              ("repeats", 3, 1)):
        if getattr(args, name) is None:
            setattr(args, name, quick if q else full)
    if args.gpu and not torch.cuda.is_available():
        p.error("--gpu needs a CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    unknown = set(args.impls) - set(IMPLS)
    if unknown:
        p.error(f"unknown implementations {sorted(unknown)}")
    result = run_gpu(args) if args.gpu else run(args, "cpu", torch.float32)
    result["date"] = datetime.date.today().isoformat()
    result["argv"] = sys.argv[1:] if argv is None else list(argv)
    suffix = "-quick" if q else ""
    out = args.out or HERE / "results" / f"generation-{result['section']}-{result['date']}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    if not result["ok"]:
        print("!! greedy tokens differ from eager's for some implementation (see tokens_equal_eager)")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
