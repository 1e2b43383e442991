"""attncomp quickstart: what attncomp is for, shown on this machine's CPU.

    python examples/quickstart.py [--threads N]        (or: make demo)

Three small models with random weights (no downloads), each optimized with ``attncomp.optimize``
as written, without touching its code:

1. ``SlidingWindowLM`` (below): a decoder over 4096 tokens in which each token attends to the
   last 256 only. Like transformers' models, it builds its mask in ``forward`` from ``arange``
   and hands SDPA a dense 4096 x 4096 bool mask. attncomp reads that subgraph, proves the mask
   is a causal sliding window and runs each site on its block-sparse kernel, which visits only
   the tiles the window touches.
2. ``NeighborhoodViT`` (below): a vision model on a 64 x 64 patch grid whose tokens attend to
   their 7 x 7 neighbourhood (NATTEN's rule: the window shifts at the borders), its mask also
   built in ``forward``. attncomp recognises it as 2-D neighborhood attention.
3. timm's ``vit_tiny_patch16_224``: global attention through ``F.scaled_dot_product_attention``
   with no mask. There is nothing to skip, and torch's fused attention kernel is already what the
   model calls: attncomp keeps those sites as they are (``explain`` lists them as ``kept``, and
   why), so the optimized model is never slower for it.

For each model it prints:

* the ``attncomp.explain`` table: every attention site, the mask proved, the strategy, and why;
* the difference from the eager model on the same input (max |out - ref|, relative error);
* eager vs optimized forward time under ``torch.no_grad()``: the median of several runs after
  warm-up, the two models called in turns so that a change of machine load hits both alike;
  and their ratio (> 1: attncomp is faster). The load average is printed beside them: on a
  shared machine wall-clock times are noisy.

Threads: torch's default, unless other processes already keep the cores busy when the demo
starts (1-minute load average): then as many threads as cores are left, at least 1. A torch op
run on more threads than there are free cores waits for each of them to be scheduled, which
costs many small ops (attncomp's block-sparse executor) far more than a few large ones, so the
ratio would measure the contention (see benchmarks/README.md). ``--threads N`` sets it.

About half a minute on two cores, capture and planning included (longer on a busy machine).
The end-to-end ratio counts the projections and MLPs too, which are the same in both models.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import timm
import torch
import torch.nn.functional as F
from torch import nn

import attncomp

SEED = 0
WARMUP = 2
REPEATS = 7


# ------------------------------------------------------------------------------------- models
class SelfAttention(nn.Module):
    """Multi-head self-attention through SDPA under a bool ``keep`` mask (True: may attend).
    x ``(B, L, dim)`` float32, keep ``(L, L)`` bool → ``(B, L, dim)``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        return self.proj(out.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    """Pre-norm transformer block: attention under ``keep``, then an MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), keep)
        return x + self.mlp(self.norm2(x))


class SlidingWindowLM(nn.Module):
    """Decoder whose tokens attend to themselves and the ``window - 1`` tokens before them.
    input_ids ``(B, L)`` int64 → hidden states ``(B, L, dim)``."""

    def __init__(self, vocab: int = 1000, dim: int = 128, heads: int = 2, depth: int = 2, window: int = 256):
        super().__init__()
        self.window = window
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        i = torch.arange(input_ids.shape[1], device=input_ids.device)
        q_idx, kv_idx = i[:, None], i[None, :]
        keep = (kv_idx <= q_idx) & (kv_idx > q_idx - self.window)  # (L, L): causal, the last `window` keys
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, keep)
        return self.norm(x)


class NeighborhoodViT(nn.Module):
    """Patch grid of ``side x side`` tokens, each attending to its ``kernel x kernel`` neighbourhood;
    near the borders the window is shifted inside the grid, never cut (NATTEN's rule).
    images ``(B, 3, side * patch, side * patch)`` float32 → class logits ``(B, classes)``."""

    def __init__(self, patch: int = 4, dim: int = 128, heads: int = 2, depth: int = 2, kernel: int = 7,
                 classes: int = 10):
        super().__init__()
        self.kernel = kernel
        self.embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed(images)                          # (B, dim, side, side)
        side = x.shape[-1]
        x = x.flatten(2).transpose(1, 2)                # (B, side * side, dim), row-major grid
        i = torch.arange(side * side, device=x.device)
        q, kv, r = i[:, None], i[None, :], self.kernel // 2
        centre_row = (q // side).clamp(r, side - 1 - r)  # the window's centre, kept inside the grid
        centre_col = (q % side).clamp(r, side - 1 - r)
        keep = ((kv // side - centre_row).abs() <= r) & ((kv % side - centre_col).abs() <= r)
        for block in self.blocks:
            x = block(x, keep)
        return self.head(self.norm(x).mean(1))


# ------------------------------------------------------------------------------------ measuring
def heading(text: str) -> None:
    print(f"\n{'=' * 78}\n{text}\n{'=' * 78}")


def time_ms(fns: dict, warmup: int = WARMUP, repeats: int = REPEATS) -> dict:
    """Wall times in milliseconds of each ``fns[name]()``, warm-up runs excluded.

    The functions are timed in turns (eager, attncomp, eager, attncomp, ...) so that a change in
    machine load during the measurement hits both alike. Returns ``{name: [ms, ...]}``.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def threads() -> str:
    n = torch.get_num_threads()
    return f"{n} CPU thread{'s' if n != 1 else ''}"


def choose_threads(requested: int | None) -> str:
    """Set torch's thread count (see the module docstring); returns why, for the header line."""
    if requested is not None:
        torch.set_num_threads(requested)
        return "--threads"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    load, default = os.getloadavg()[0], torch.get_num_threads()
    free = max(1, min(default, cores - round(load)))
    if free == default:
        return "torch's default"
    torch.set_num_threads(free)
    return f"load average {load:.1f} on {cores} cores at the start: {free} of torch's default {default}"


def nothing_to_gain(report: attncomp.Report) -> bool:
    """Every site was kept: an SDPA call with no mask tensor is already torch's fused kernel."""
    return bool(report.rows) and all(r.status == "kept" for r in report.rows)


def compare(name: str, model: nn.Module, inputs: tuple) -> None:
    """Optimize ``model``, print its explain table, its difference from eager and both timings.
    ``inputs``: the model's positional inputs; its output is one tensor."""
    heading(name)
    model.eval()
    with torch.no_grad():
        t0 = time.perf_counter()
        # Capture (Dynamo) and planning happen here, on the example inputs; `model` is untouched.
        fast = attncomp.optimize(model, example_inputs=inputs)
        compile_s = time.perf_counter() - t0
        report = attncomp.explain(fast)
        print(f"\n-- attncomp.explain  (capture + planning took {compile_s:.1f} s)")
        print(report)
        if nothing_to_gain(report):
            print("   every site is an SDPA call with no mask: nothing to skip, and torch's fused kernel is what "
                  "the model\n   already runs, so attncomp kept them as they are (the ratio shows what capture "
                  "alone costs or saves)")

        ref, out = model(*inputs), fast(*inputs)
        max_abs = (out - ref).abs().max().item()
        rel = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
        print(f"\n-- difference from eager  (output {tuple(ref.shape)}, {ref.dtype})")
        print(f"max |out - ref|   {max_abs:.3e}")
        print(f"relative error    {rel:.3e}   ({'OK' if rel <= 1e-4 else 'MISMATCH'}: tolerance 1e-4)")

        times = time_ms({"eager": lambda: model(*inputs), "attncomp": lambda: fast(*inputs)})
    eager_ms, fast_ms = (statistics.median(times[k]) for k in ("eager", "attncomp"))
    print(f"\n-- forward time  (median of {REPEATS} runs after {WARMUP} warm-up, taken in turns; "
          f"{threads()}, load average {os.getloadavg()[0]:.1f})")
    print(f"eager      {eager_ms:9.1f} ms   (min {min(times['eager']):.1f})")
    print(f"attncomp   {fast_ms:9.1f} ms   (min {min(times['attncomp']):.1f})")
    print(f"ratio      eager / attncomp = x{eager_ms / fast_ms:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: see below)")
    args = parser.parse_args()
    why = choose_threads(args.threads)
    start = time.perf_counter()
    print(f"attncomp {attncomp.__version__}, torch {torch.__version__}, {threads()} ({why})")

    torch.manual_seed(SEED)
    compare("SlidingWindowLM  (hand-written: 2 layers, 2 heads of 64, L=4096, each token sees the last 256)",
            SlidingWindowLM(), (torch.randint(0, 1000, (1, 4096)),))

    torch.manual_seed(SEED)
    compare("NeighborhoodViT  (hand-written: 2 blocks, 2 heads of 64, 64x64 patch grid, 7x7 neighbourhoods)",
            NeighborhoodViT(), (torch.randn(1, 3, 256, 256),))

    torch.manual_seed(SEED)
    compare("ViT-Tiny  (timm vit_tiny_patch16_224, batch 2, 197 tokens, global attention, no mask)",
            timm.create_model("vit_tiny_patch16_224", pretrained=False), (torch.randn(2, 3, 224, 224),))

    print(f"\ndone in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
