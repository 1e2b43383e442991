"""Masks after Dynamo's automatic-dynamic recompile: proved at the example shape and checked per call,
against the same graph with the mask left a tensor (attncomp before per-call checks), and eager.

    python benchmarks/dynamic_masks.py [--layers 4] [--L 1024] [--repeats 5]

The model is transformers' GPT-2 (random weights, 768 wide, 12 heads, eager attention,
``use_cache=False``), B=2, the second sequence padded by a quarter. Each optimized model is first
called at L/2 and at 3L/4 (the second length makes Dynamo recompile with symbolic sizes), then
timed at L — a length the dynamic graph had not seen. Prints medians and writes nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--L", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    from transformers import GPT2Config, GPT2Model

    import attncomp

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=args.layers, n_positions=max(1024, args.L), attn_implementation="eager",
                     attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, use_cache=False)
    model = GPT2Model(cfg).eval()

    def inputs(L):
        ids = torch.randint(0, cfg.vocab_size, (2, L))
        mask = torch.ones(2, L, dtype=torch.long)
        mask[1, L - L // 4:] = 0
        return ids, mask

    def timed(fn, ids, mask):
        times = []
        for _ in range(args.repeats + 1):
            t0 = time.perf_counter()
            out = fn(ids, attention_mask=mask).last_hidden_state
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:]), out

    results = {}
    with torch.no_grad():
        ids, mask = inputs(args.L)
        results["eager"], ref = timed(model, ids, mask)
        for name, checked in (("mask kept a tensor", False), ("mask proved, checked per call", True)):
            fast = attncomp.optimize(model)
            fast.backend.checked_masks = checked
            for L in (args.L // 2, 3 * args.L // 4):
                short_ids, short_mask = inputs(L)
                fast(short_ids, attention_mask=short_mask)
            results[name], out = timed(fast, ids, mask)
            keep = mask.bool()
            err = ((out - ref)[keep].norm() / ref[keep].norm()).item()
            row = attncomp.explain(fast).replaced[0]
            print(f"{name}: mask {row.spec.mask}, strategy {row.strategy}, calls {row.kernel.calls}, rel err {err:.1e}")
    for name, t in results.items():
        print(f"{name:32s} {t * 1e3:8.1f} ms  ({results['eager'] / t:.2f}x eager)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
