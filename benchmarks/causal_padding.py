"""The block-sparse op on causal AND key padding (GPT-2 with an ``attention_mask``) on CPU, against
torch's SDPA with the same mask prebuilt as a bool tensor, as an additive one, and SDPA's
``is_causal`` path without padding (a lower bound).

    python benchmarks/causal_padding.py [--L 512,1024,2048,4096] [--repeats 5]

B=2, H=12, D=64, float32, the second sequence padded by a quarter; prints median milliseconds.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[repeats // 2] * 1e3


def point(L: int, repeats: int) -> tuple[list[float], float]:
    """Median ms of each implementation at length ``L``, and attncomp's relative error vs SDPA."""
    from attncomp import ir, ops

    B, H, D = 2, 12, 64
    q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
    pad = torch.ones(B, L, dtype=torch.bool)
    pad[1, L - L // 4:] = False
    keep = pad[:, None, None, :]
    full = torch.ones(L, L, dtype=torch.bool).tril() & keep
    add = torch.zeros(B, 1, L, L).masked_fill(~full, float("-inf"))
    ours = ops.attention(q, k, v, ir.Causal(0), keep=keep)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=full)
    err = ((ours - ref).norm() / ref.norm()).item()
    impls = [lambda: ops.attention(q, k, v, ir.Causal(0), keep=keep),
             lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=full),
             lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=add),
             lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)]
    return [median_ms(f, repeats) for f in impls], err


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--L", default="512,1024,2048,4096")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    print(f"{'L':>6} {'attncomp':>10} {'SDPA bool':>10} {'SDPA add':>10} {'SDPA causal (no pad)':>21}")
    with torch.no_grad():
        for L in map(int, args.L.split(",")):
            row, err = point(L, args.repeats)
            print(f"{L:>6} " + " ".join(f"{x:>10.1f}" for x in row[:3]) + f" {row[3]:>21.1f}   rel err {err:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
