"""attncomp quickstart: optimize a GPT-2 and a ViT, check the outputs, time both.

    python examples/quickstart.py

Runs on CPU with random weights (no downloads) in well under two minutes on two cores.
For each model it prints:

1. the ``attncomp.explain`` table: every attention site found, and whether it was replaced;
2. the error of the optimized model against the eager model on the same input
   (max |out - ref| and the relative error ||out - ref|| / ||ref||);
3. eager vs optimized forward time: the median of a few runs after warm-up, both measured
   the same way, in turns, in this process, under ``torch.no_grad()``. Wall-clock times on a
   shared machine are noisy: the load average is printed beside them.

On CPU attncomp's dense kernel is the torch executor (PyTorch's fused CPU attention); the
generated Triton kernels run on CUDA. Small models on few cores are dominated by the
projections and MLPs, so expect end-to-end speedups far smaller than attention-only ones.
"""

from __future__ import annotations

import os
import statistics
import time

import timm
import torch
from transformers import GPT2Config, GPT2Model

import attncomp

SEED = 0
WARMUP = 2
REPEATS = 7


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


def compare(name: str, model: torch.nn.Module, inputs: tuple, output=lambda out: out) -> None:
    """Optimize ``model``, print its explain table, its error against eager and both timings.

    ``inputs`` is the tuple of positional inputs; ``output`` picks the tensor to compare from the
    model's output (e.g. ``last_hidden_state``).
    """
    heading(name)
    model.eval()
    with torch.no_grad():
        t0 = time.perf_counter()
        # Capture (Dynamo) and planning happen here, on the example inputs; `model` is untouched.
        fast = attncomp.optimize(model, example_inputs=inputs)
        compile_s = time.perf_counter() - t0

        print(f"\n-- attncomp.explain  (capture + planning took {compile_s:.1f} s)")
        print(attncomp.explain(fast))

        ref = output(model(*inputs))
        out = output(fast(*inputs))
        max_abs = (out - ref).abs().max().item()
        rel = ((out - ref).norm() / ref.norm()).item()
        print(f"\n-- accuracy vs eager  (output {tuple(ref.shape)}, {ref.dtype})")
        print(f"max abs error   {max_abs:.3e}")
        print(f"relative error  {rel:.3e}   ({'OK' if rel <= 1e-4 else 'MISMATCH'}: tolerance 1e-4)")

        times = time_ms({"eager": lambda: model(*inputs), "attncomp": lambda: fast(*inputs)})
    eager_ms, fast_ms = (statistics.median(times[k]) for k in ("eager", "attncomp"))
    print(f"\n-- forward time  (median of {REPEATS} runs after {WARMUP} warm-up, taken in turns; "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f})")
    print(f"eager      {eager_ms:9.1f} ms   (min {min(times['eager']):.1f})")
    print(f"attncomp   {fast_ms:9.1f} ms   (min {min(times['attncomp']):.1f})   "
          f"speedup x{eager_ms / fast_ms:.2f}")


def gpt2() -> tuple[torch.nn.Module, tuple]:
    """A small GPT-2 (4 layers, 4 heads, 256 hidden) with random weights, on ``(1, 256)`` ids."""
    torch.manual_seed(SEED)
    config = GPT2Config(n_layer=4, n_head=4, n_embd=256, n_positions=256, attn_implementation="eager")
    model = GPT2Model(config)
    input_ids = torch.randint(0, config.vocab_size, (1, 256))
    return model, (input_ids,)


def vit() -> tuple[torch.nn.Module, tuple]:
    """timm ``vit_tiny_patch16_224`` with random weights, on a ``(2, 3, 224, 224)`` image batch."""
    torch.manual_seed(SEED)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    images = torch.randn(2, 3, 224, 224)
    return model, (images,)


def main() -> None:
    torch.manual_seed(SEED)
    start = time.perf_counter()
    print(f"attncomp {attncomp.__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads")

    model, inputs = gpt2()
    compare("GPT-2  (transformers, eager attention, 4 layers x 4 heads, hidden 256, L=256)",
            model, inputs, output=lambda out: out.last_hidden_state)

    model, inputs = vit()
    compare("ViT  (timm vit_tiny_patch16_224, batch 2, 197 tokens)", model, inputs)

    print(f"\ndone in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
