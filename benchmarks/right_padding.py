"""Causal AND right padding on CPU, at model level: transformers' GPT-2 (eager attention,
``use_cache=False``, B=2, the second sequence padded by a quarter) eager, optimized, and optimized
without the right-padding step of the CPU executor (each sequence's keys cut to its length and run
on the dense causal kernel), timed in alternating runs in one process.

    python benchmarks/right_padding.py [--layers 4] [--L 1024,2048] [--repeats 4]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--L", default="1024,2048")
    p.add_argument("--repeats", type=int, default=4)
    args = p.parse_args(argv)
    from transformers import GPT2Config, GPT2Model

    import attncomp
    from attncomp.strategies import softmax_site as executor

    torch.manual_seed(0)
    lengths = [int(x) for x in args.L.split(",")]
    cfg = GPT2Config(n_layer=args.layers, n_positions=max(1024, *lengths), attn_implementation="eager",
                     attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, use_cache=False)
    model = GPT2Model(cfg).eval()
    real = executor._right_padding
    try:
        for L in lengths:
            ids = torch.randint(0, cfg.vocab_size, (2, L))
            mask = torch.ones(2, L, dtype=torch.long)
            mask[1, L - L // 4:] = 0
            with torch.no_grad():
                fast = attncomp.optimize(model, example_inputs=(ids,), example_kwargs={"attention_mask": mask})
                times: dict[str, list[float]] = {"eager": [], "attncomp": [], "without the step": []}
                for _ in range(args.repeats + 1):
                    for name in times:
                        executor._right_padding = real if name == "attncomp" else (lambda keep, Lk: None)
                        fn = model if name == "eager" else fast
                        t0 = time.perf_counter()
                        fn(ids, attention_mask=mask)
                        times[name].append(time.perf_counter() - t0)
            print(f"L={L}: " + ", ".join(f"{k} {statistics.median(v[1:]) * 1e3:.0f} ms" for k, v in times.items()))
    finally:
        executor._right_padding = real
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
