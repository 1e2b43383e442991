"""Low-rank tensor attention: error against exact softmax tensor attention, and CPU time against L.

    .venv/bin/python benchmarks/tensor_lowrank_table.py            # both tables (~2-3 min on 1 thread)
    .venv/bin/python benchmarks/tensor_lowrank_table.py --quick    # smaller L, fewer points

Inputs: q, k1, k2 uniform in [-B, B] (B = the entry bound, printed with the proven score bound R and
the largest |s| actually present), v1, v2 standard normal, scale = D^-1/2. Errors are
‖out − exact‖ / ‖exact‖ with the exact output in float64 (pair cube formed per query block). The
degree table runs ``method="poly"`` (exact features, rank C(D+p, p)) with both fits; the rank table
runs ``method="random"`` at degree 4 (mean and max over seeds). The timing table runs float32,
non-causal and causal, against exact tensor attention: the naive float32 pair cube (query-blocked)
and ``attncomp.tensor.tensor_attention`` when that module is present.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import torch

from attncomp.strategies.tensor.lowrank import entry_bound, feature_rank, lowrank_tensor_attention, score_bound


def inputs(B, H, L, D, Dv, bound, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q, k1, k2 = ((torch.rand(B, H, L, D, generator=g, dtype=torch.float64) * 2 - 1) * bound for _ in range(3))
    v1, v2 = (torch.randn(B, H, L, Dv, generator=g, dtype=torch.float64) for _ in range(2))
    return tuple(x.to(dtype) for x in (q, k1, k2, v1, v2))


def exact_naive(q, k1, k2, v1, v2, scale, causal=False, block=32):
    """Softmax tensor attention by forming (block, L1, L2) score slabs; returns (out, max |s|)."""
    outs, smax = [], 0.0
    L = q.shape[2]
    for i0 in range(0, L, block):
        s = scale * torch.einsum("bhid,bhjd,bhld->bhijl", q[:, :, i0:i0 + block], k1, k2)
        smax = max(smax, float(s.abs().max()))
        if causal:
            i = torch.arange(i0, min(L, i0 + block))[:, None]
            vis = torch.arange(L)[None, :] <= i
            s = s.masked_fill(~(vis[:, :, None] & vis[:, None, :]), float("-inf"))
        B, H, n, L1, L2 = s.shape
        p = torch.softmax(s.reshape(B, H, n, L1 * L2), -1).reshape(s.shape)
        outs.append(torch.einsum("bhijl,bhjv,bhlv->bhiv", p, v1, v2))
    return torch.cat(outs, 2), smax


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def error_tables(L, D, bounds, ranks, seeds):
    scale = D ** -0.5
    for bound in bounds:
        args = inputs(1, 2, L, D, 8, bound, torch.float64, seed=0)
        exact, smax = exact_naive(*args, scale)
        B, R = entry_bound(*args[:3]), score_bound(*args[:3], scale)
        print(f"\n### Error vs degree — L={L}, D={D}, H=2, entries in [-{bound}, {bound}]: B = {B:.3f}, "
              f"R = score_bound = {R:.2f} (≤ scale·D·B³ = {scale * D * B ** 3:.2f}), max|s| present = {smax:.2f}\n")
        print("| degree p | rank C(D+p,p) | rel. error (taylor) | rel. error (chebyshev on [-R, R]) |")
        print("|---|---|---|---|")
        for p in range(5):
            errs = []
            for fit in ("taylor", "chebyshev"):
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    out, info = lowrank_tensor_attention(*args, degree=p, fit=fit, return_info=True)
                flag = f" ({info.clamped_rows} rows clamped)" if caught and info.clamped_rows else ""
                errs.append(f"{rel(out, exact):.2e}{flag}")
            print(f"| {p} | {feature_rank(D, p)} | {errs[0]} | {errs[1]} |")
        print(f"\n### Error vs rank — method='random', degree 4 (exact rank {feature_rank(D, 4)}), taylor, "
              f"same inputs (B = {B:.3f}); {len(seeds)} seeds\n")
        print("| rank | mean rel. error | max rel. error | features per degree (last seed) |")
        print("|---|---|---|---|")
        for r in ranks:
            errs = []
            for s in seeds:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    out, info = lowrank_tensor_attention(*args, degree=4, method="random", rank=r, seed=s,
                                                         return_info=True)
                errs.append(rel(out, exact))
            per = ", ".join(f"{m}:{'all' if h == 'exact' else h}" for m, h in info.per_degree.items())
            print(f"| {r} | {sum(errs) / len(errs):.2e} | {max(errs):.2e} | {per} |")


def best_time(fn, args, repeats, **kwargs):
    fn(*args, **kwargs)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args, **kwargs)
        times.append(time.perf_counter() - t0)
    return min(times)


def timing_table(lengths, D, degree, naive_max, fast_max, repeats):
    try:
        from attncomp.strategies.tensor.op import tensor_attention
    except ImportError:
        tensor_attention = None
    B, H, Dv = 1, 4, D
    print(f"\n### CPU time vs L — B={B}, H={H}, D=Dv={D}, float32, degree {degree} "
          f"(rank {feature_rank(D, degree)}), best of {repeats}, {torch.get_num_threads()} thread(s)\n")
    print("| L | lowrank (s) | lowrank causal (s) | exact naive (s) | exact attncomp.tensor (s) | "
          "lowrank ratio to previous L |")
    print("|---|---|---|---|---|---|")
    prev = None
    for L in lengths:
        args = inputs(B, H, L, D, Dv, 1.0, torch.float32, seed=1)
        t = best_time(lowrank_tensor_attention, args, repeats, degree=degree)
        tc = best_time(lowrank_tensor_attention, args, repeats, degree=degree, causal=True)
        tn = f"{best_time(exact_naive, (*args, D ** -0.5), 1):.3f}" if L <= naive_max else "—"
        tf = "—"
        if tensor_attention is not None and L <= fast_max:
            tf = f"{best_time(tensor_attention, args, 1):.3f}"
        ratio = f"{t / prev:.2f}" if prev else ""
        print(f"| {L} | {t:.4f} | {tc:.4f} | {tn} | {tf} | {ratio} |")
        prev = t


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="L=128 errors, L up to 2048 timings")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    L = 128 if a.quick else 256
    error_tables(L, 16, bounds=(1.0, 1.5), ranks=(64, 256, 1024, 4096) if a.quick else (64, 128, 256, 512, 1024,
                                                                                        2048, 4096),
                 seeds=range(2 if a.quick else 3))
    lengths = [256 * 2 ** i for i in range(4 if a.quick else 6)]
    timing_table(lengths, D=8, degree=3, naive_max=256 if a.quick else 512, fast_max=512 if a.quick else 1024,
                 repeats=2 if a.quick else 3)
    print(f"\n(exact rank C(D+p, p): D=8 → {[math.comb(8 + p, p) for p in range(1, 5)]}, "
          f"D=16 → {[math.comb(16 + p, p) for p in range(1, 5)]} for p = 1..4)")


if __name__ == "__main__":
    main()
