"""Local attention with attncomp: a sliding-window model optimized from its graph, and the ops.

    .venv/bin/python examples/local_attention.py

1. A small Mistral-style model (transformers, random weights) whose sliding-window mask is built
   inside its graph: ``attncomp.optimize`` proves the mask is a window, runs each site on the
   block-sparse kernel, and ``explain`` says which fraction of tiles it skips.
2. ``attncomp.ops.attention`` with an IR mask and ``attncomp.ops.neighborhood_attention`` (NATTEN
   semantics), checked against dense SDPA with the same boolean mask and timed against it.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

import attncomp
from attncomp import ir, ops
from attncomp.masks import blocks


def median_ms(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def sliding_window_model() -> None:
    from transformers import MistralConfig, MistralModel

    torch.manual_seed(0)
    config = MistralConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                           num_key_value_heads=2, vocab_size=1000, sliding_window=256, attn_implementation="sdpa")
    model = MistralModel(config).eval()
    ids = torch.randint(0, 1000, (1, 2048))
    with torch.no_grad():
        fast = attncomp.optimize(model, example_inputs=(ids,))
        print(attncomp.explain(fast))
        err = rel_err(fast(ids).last_hidden_state, model(ids).last_hidden_state)
        t_eager = median_ms(lambda: model(ids))
        t_fast = median_ms(lambda: fast(ids))
    print(f"relative error {err:.1e}; forward {t_eager:.0f} ms eager, {t_fast:.0f} ms attncomp "
          f"(x{t_eager / t_fast:.2f}; the MLPs are the same in both)\n")


def ops_demo() -> None:
    torch.manual_seed(0)
    B, H, side, D = 1, 8, 64, 64
    L = side * side
    q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
    with torch.no_grad():
        window = ir.Window(255, 0)  # causal sliding window of 256 keys
        keep = blocks.dense_keep(window.expr(), L, L)
        out = ops.attention(q, k, v, window)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        print(f"ops.attention, {window}, L={L}: relative error {rel_err(out, ref):.1e}; "
              f"{median_ms(lambda: ops.attention(q, k, v, window)):.1f} ms vs dense masked SDPA "
              f"{median_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=keep)):.1f} ms")

        grid = [x.transpose(1, 2).reshape(B, side, side, H, D) for x in (q, k, v)]  # NATTEN layout
        mask = ops.neighborhood_mask((side, side), 7)
        keep = blocks.dense_keep(mask.expr(), L, L)
        out = ops.neighborhood_attention(*grid, kernel_size=7).reshape(B, L, H, D).transpose(1, 2)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        print(f"ops.neighborhood_attention, 7x7 on {side}x{side}: relative error {rel_err(out, ref):.1e}; "
              f"{median_ms(lambda: ops.neighborhood_attention(*grid, kernel_size=7)):.1f} ms vs dense masked SDPA "
              f"{median_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=keep)):.1f} ms")


if __name__ == "__main__":
    sliding_window_model()
    ops_demo()
