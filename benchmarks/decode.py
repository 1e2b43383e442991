"""Decode attention (one query per head against a long KV cache): attncomp's decode op against torch.

    python benchmarks/decode.py                       # CPU: B in {1, 8}, Lk in {1k, 4k, 16k}
    python benchmarks/decode.py --lk 1024 --b 1       # one point
    python benchmarks/decode.py --gpu                 # on a CUDA machine: the GPU section (see below)

CPU: Lq=1, Hq=32, Hkv=8 (GQA 4:1), D=128, float32 (``--dtype bf16``), random inputs, no grad. For
each point, in alternating turns (so load changes hit every implementation alike):

* ``attncomp`` — ``decode_attention(q, k, v)`` (every sequence has Lk keys);
* ``sdpa_gqa`` — ``F.scaled_dot_product_attention(q, k, v, enable_gqa=True)``;
* ``attncomp_ragged`` — ``decode_attention(q, k, v, kv_lens)``, lengths uniform in [Lk/2, Lk];
* ``sdpa_gqa_mask`` — SDPA with ``enable_gqa=True`` and the bool key-padding mask built from the same
  lengths inside the timed call (what a model does per step);
* ``attncomp_paged`` — ``paged_decode_attention`` on the ragged cache in pages of 16 behind a shuffled
  page table (the CPU executor gathers the pages: that copy is in the time).

Median of ``--repeats`` calls after ``--warmup``; ratio = SDPA median / attncomp median (> 1:
attncomp faster), each against its own peer (plain vs plain, ragged vs masked). Every output is
checked against float64 SDPA with the mask (relative error). JSON lands in
``benchmarks/results/decode-cpu-<date>.json`` (``--out`` to change).

GPU (``--gpu``, needs ``torch.cuda.is_available()``; not run in this repository's CI): bf16,
Lk in {4k, 16k, 64k, 128k}, B in {1, 8}, GQA 8:1 (Hq=32, Hkv=4), D=128: attncomp's Triton split-KV
kernel (contiguous and paged), SDPA (enable_gqa, default backend choice) and compiled FlexAttention
(``flex_attention(..., enable_gqa=True)``, its decoding kernel for short queries), ragged lengths
through each one's mask; ``triton.testing.do_bench`` medians and the K/V bandwidth each reaches.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from attncomp.strategies.decode import decode_attention, paged_decode_attention

HERE = Path(__file__).resolve().parent
PAGE = 16


def make_case(B: int, Hq: int, Hkv: int, Lk: int, D: int, dtype, device, seed: int = 0):
    """q (B, Hq, 1, D), k / v (B, Hkv, Lk, D), ragged lengths (B,) int32 in [Lk/2, Lk], the same ragged
    cache in pages (num_pages, PAGE, Hkv, D) with a shuffled page table (B, Lk / PAGE) int32."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, 1, D, generator=g).to(dtype).to(device)
    k = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype).to(device)
    v = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype).to(device)
    lens = torch.randint(Lk // 2, Lk + 1, (B,), generator=g).to(torch.int32)
    lens[0] = Lk
    lens = lens.to(device)
    pages = Lk // PAGE
    perm = torch.randperm(B * pages, generator=g).to(device)
    table = perm.view(B, pages).to(torch.int32)
    k_cache = torch.empty(B * pages, PAGE, Hkv, D, dtype=dtype, device=device)
    v_cache = torch.empty_like(k_cache)
    k_cache[perm] = k.transpose(1, 2).reshape(B * pages, PAGE, Hkv, D)
    v_cache[perm] = v.transpose(1, 2).reshape(B * pages, PAGE, Hkv, D)
    return q, k, v, lens, (k_cache, v_cache, table)


def key_mask(lens: torch.Tensor, Lk: int) -> torch.Tensor:
    """(B, 1, 1, Lk) bool: key j of sequence b is visible iff j < lens[b]."""
    return (torch.arange(Lk, device=lens.device) < lens[:, None])[:, None, None, :]


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / ref.norm())


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "loadavg": os.getloadavg()}


# ----------------------------------------------------------------------------- CPU
def cpu_point(B: int, Lk: int, dtype, warmup: int, repeats: int) -> dict:
    Hq, Hkv, D = 32, 8, 128
    q, k, v, lens, (kc, vc, table) = make_case(B, Hq, Hkv, Lk, D, dtype, "cpu")
    impls = {
        "attncomp": lambda: decode_attention(q, k, v)[0],
        "sdpa_gqa": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
        "attncomp_ragged": lambda: decode_attention(q, k, v, lens)[0],
        "sdpa_gqa_mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask(lens, Lk),
                                                                enable_gqa=True),
        "attncomp_paged": lambda: paged_decode_attention(q, kc, vc, table, lens, max_kv_len=Lk)[0],
    }
    q64, k64, v64 = q.double(), k.double(), v.double()
    refs = {"full": F.scaled_dot_product_attention(q64, k64, v64, enable_gqa=True),
            "ragged": F.scaled_dot_product_attention(q64, k64, v64, attn_mask=key_mask(lens, Lk), enable_gqa=True)}
    del q64, k64, v64
    errs = {n: rel_err(f(), refs["full" if n in ("attncomp", "sdpa_gqa") else "ragged"]) for n, f in impls.items()}
    for _ in range(warmup):
        for f in impls.values():
            f()
    times: dict[str, list[float]] = {n: [] for n in impls}
    for _ in range(repeats):
        for n, f in impls.items():
            t0 = time.perf_counter()
            f()
            times[n].append((time.perf_counter() - t0) * 1e3)
    med = {n: statistics.median(t) for n, t in times.items()}
    return {"params": {"B": B, "Lq": 1, "Lk": Lk, "Hq": Hq, "Hkv": Hkv, "D": D, "dtype": str(dtype)[6:],
                       "kv_lens": lens.tolist()},
            "median_ms": med, "min_ms": {n: min(t) for n, t in times.items()}, "times_ms": times,
            "rel_err_vs_f64": errs,
            "ratio_sdpa_over_attncomp": {"plain": med["sdpa_gqa"] / med["attncomp"],
                                         "ragged": med["sdpa_gqa_mask"] / med["attncomp_ragged"],
                                         "paged_vs_sdpa_mask": med["sdpa_gqa_mask"] / med["attncomp_paged"]}}


def run_cpu(args) -> dict:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    start = os.getloadavg()
    rows = []
    print(f"{'B':>2} {'Lk':>6} | {'attncomp':>9} {'sdpa_gqa':>9} {'x':>5} | {'ragged':>9} {'sdpa+mask':>9} {'x':>5} | "
          f"{'paged':>9} {'x':>5}   (median ms; x = sdpa / attncomp)")
    with torch.no_grad():
        for B in args.b:
            for Lk in args.lk:
                r = cpu_point(B, Lk, dtype, args.warmup, args.repeats)
                m, x = r["median_ms"], r["ratio_sdpa_over_attncomp"]
                print(f"{B:>2} {Lk:>6} | {m['attncomp']:>9.2f} {m['sdpa_gqa']:>9.2f} {x['plain']:>5.2f} | "
                      f"{m['attncomp_ragged']:>9.2f} {m['sdpa_gqa_mask']:>9.2f} {x['ragged']:>5.2f} | "
                      f"{m['attncomp_paged']:>9.2f} {x['paged_vs_sdpa_mask']:>5.2f}   "
                      f"max rel err {max(r['rel_err_vs_f64'].values()):.1e}")
                rows.append(r)
    return {"section": "cpu", "machine": {**machine(), "loadavg_start": start, "loadavg_end": os.getloadavg()},
            "warmup": args.warmup, "repeats": args.repeats, "results": rows}


# ----------------------------------------------------------------------------- GPU
def gpu_point(B: int, Lk: int, flex) -> dict:  # pragma: no cover - needs CUDA
    """One GPU point: every implementation's do_bench median, K/V bandwidth and error vs f32 SDPA."""
    from torch.nn.attention.flex_attention import create_block_mask
    from triton.testing import do_bench

    Hq, Hkv, D, dtype = 32, 4, 128, torch.bfloat16
    q, k, v, lens, (kc, vc, table) = make_case(B, Hq, Hkv, Lk, D, dtype, "cuda")

    def pad_mod(b, h, q_idx, kv_idx):
        return kv_idx < lens[b]

    block_mask = create_block_mask(pad_mod, B, None, 1, Lk, device="cuda")
    impls = {
        "attncomp": lambda: decode_attention(q, k, v)[0],
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
        "flex": lambda: flex(q, k, v, enable_gqa=True),
        "attncomp_ragged": lambda: decode_attention(q, k, v, lens)[0],
        "attncomp_paged": lambda: paged_decode_attention(q, kc, vc, table, lens, max_kv_len=Lk)[0],
        "sdpa_mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask(lens, Lk), enable_gqa=True),
        "flex_ragged": lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=True),
    }
    ref_full = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=True)
    ref_rag = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=key_mask(lens, Lk),
                                             enable_gqa=True)
    kv_bytes = 2 * k.numel() * k.element_size()
    row = {"params": {"B": B, "Lk": Lk, "Hq": Hq, "Hkv": Hkv, "D": D, "dtype": "bfloat16"}, "impls": {}}
    for name, fn in impls.items():
        try:
            out = fn()
            ms = float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
            ref = ref_rag if name.endswith(("ragged", "paged", "mask")) else ref_full
            row["impls"][name] = {"ms": ms, "kv_GBps": kv_bytes / ms / 1e6, "rel_err": rel_err(out, ref)}
        except Exception as e:  # a backend that does not run is a result, not a crash
            row["impls"][name] = {"error": f"{type(e).__name__}: {e}"[:300]}
    return row


def run_gpu(args) -> dict:  # pragma: no cover - needs CUDA
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    rows = []
    with torch.no_grad():
        for B in (1, 8):
            for Lk in (4096, 16384, 65536, 131072):
                row = gpu_point(B, Lk, flex)
                print(B, Lk, {n: round(r.get("ms", float("nan")), 4) for n, r in row["impls"].items()})
                rows.append(row)
                torch.cuda.empty_cache()
    return {"section": "gpu", "device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--b", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    p.add_argument("--lk", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 4096, 16384])
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--gpu", action="store_true", help="run the GPU section instead (needs CUDA)")
    p.add_argument("--out", type=Path, default=None, help="JSON file (default benchmarks/results/decode-<dev>-<date>)")
    args = p.parse_args(argv)
    if args.gpu and not torch.cuda.is_available():
        p.error("--gpu needs a CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_gpu(args) if args.gpu else run_cpu(args)
    result["date"] = datetime.date.today().isoformat()
    result["argv"] = list(argv) if argv is not None else None
    out = args.out or HERE / "results" / f"decode-{result['section']}-{result['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
