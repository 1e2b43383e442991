"""GPU suite cases for the non-softmax kernels: linear attention and tensor (higher-order) attention.

Imported by ``gpu_suite.py`` (which times them with the same harness as its softmax cases).

* ``linear-causal-<dtype>-D<D>-L<L>``: ``attncomp.ops.linear_attention(causal=True)`` against causal
  SDPA (every backend that runs). They compute different functions: the peers are compared for speed
  only, and the suite reports the *crossover*, the shortest L at which linear attention is faster than
  the fastest SDPA backend. FLOPs credited: ``4·B·H·D·L·(C + D)`` forward for chunk size ``C``
  (intra-chunk products ``2·L·C·D`` twice, state products ``2·L·D·D`` twice).
* ``tensor-exact-<dtype>-D<D>-L<L>`` and ``tensor-window<w1>x<w2>-...``:
  ``attncomp.ops.tensor_attention`` against a naive einsum (``naive``: materialises the
  ``(B, H, L, L1, L2)`` score cube, run only where it fits in ``--tensor-naive-max-gib``). FLOPs
  credited: ``4·B·H·D·triples`` forward, triples = visible (i, j, l).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

CHUNK = 64  # linear attention's default chunk


def entry(name: str):
    """``attncomp.ops.<name>`` or ``(None, reason)`` when it does not exist (yet)."""
    try:
        from attncomp import ops
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return None, f"attncomp.ops not available ({type(e).__name__}: {e})"
    fn = getattr(ops, name, None)
    return (fn, "") if fn is not None else (None, f"attncomp.ops.{name} not available")


def tensor_triples(L: int, window: tuple[int, int] | None) -> int:
    """Visible (i, j, l) triples: all L³, or Σ_i min(i+1, w1)·min(i+1, w2) for the causal window."""
    if window is None:
        return L ** 3
    w1, w2 = window
    return sum(min(i + 1, w1) * min(i + 1, w2) for i in range(L))


def naive_tensor(q, k1, k2, v1, v2, window=None):
    """Tensor attention by einsum over the materialised score cube ``(B, H, L, L1, L2)``."""
    s = torch.einsum("bhid,bhjd,bhld->bhijl", q, k1, k2) * q.shape[-1] ** -0.5
    if window is not None:
        i = torch.arange(q.shape[-2], device=q.device)
        rel = i[:, None] - i[None, :]  # i - j
        ok1 = (rel >= 0) & (rel < window[0])
        ok2 = (rel >= 0) & (rel < window[1])
        s = s.masked_fill(~(ok1[:, :, None] & ok2[:, None, :]), float("-inf"))
    p = torch.softmax(s.flatten(-2).float(), -1).to(q.dtype).view_as(s)
    return torch.einsum("bhijl,bhjd,bhld->bhid", p, v1, v2)


@dataclass
class OtherCase:
    id: str
    kind: str  # "linear" | "tensor"
    dtype: torch.dtype
    B: int
    H: int
    L: int
    D: int
    window: tuple[int, int] | None = None
    label: str = ""
    mask: object = None
    notes: list = field(default_factory=list)

    def build(self, device, opts, gen, sdpa_backends) -> dict:
        """Inputs and implementations: ``{"rec": fields, "impls": name → setup, "skipped": name → why,
        "dout", "flops", "speed_only": names compared for speed only}``; ``setup()`` returns
        ``(fn, leaves)`` like the softmax cases."""
        def rnd(*shape, scale=1.0):
            x = torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * scale
            return x.to(self.dtype).requires_grad_()

        B, H, L, D = self.B, self.H, self.L, self.D
        impls, skipped, speed_only = {}, {}, []
        if self.kind == "linear":
            q, k, v = rnd(B, H, L, D), rnd(B, H, L, D), rnd(B, H, L, D)
            flops = 4.0 * B * H * D * L * (CHUNK + D)
            fn, why = entry("linear_attention")
            if fn is None:
                skipped["attncomp"] = why
            else:
                impls["attncomp"] = lambda: ((lambda: fn(q, k, v, causal=True, chunk=CHUNK)), [q, k, v])
            for name, backend in sdpa_backends().items():
                if name == "sdpa_math" and L > opts.math_max_l:
                    skipped[name] = f"L > --math-max-l {opts.math_max_l}"
                    continue
                if device.type != "cuda" and name in ("sdpa_efficient", "sdpa_cudnn"):
                    skipped[name] = "needs CUDA"
                    continue

                def make(backend=backend):
                    from torch.nn.attention import sdpa_kernel

                    def run():
                        with sdpa_kernel(backend):
                            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
                    return run, [q, k, v]
                impls[name] = make
                speed_only.append(name)
            rec = {"feature_map": "elu1", "chunk": CHUNK}
        else:
            # entries scaled so that scores stay O(1): the fp16/bf16 softmax over L1·L2 pairs is then benign
            q, k1, k2 = (rnd(B, H, L, D, scale=D ** -0.25) for _ in range(3))
            v1, v2 = rnd(B, H, L, D), rnd(B, H, L, D)
            triples = tensor_triples(L, self.window)
            flops = 4.0 * B * H * D * triples
            fn, why = entry("tensor_attention")
            kw = {"window": self.window} if self.window else {}
            if fn is None:
                skipped["attncomp"] = why
            else:
                impls["attncomp"] = lambda: ((lambda: fn(q, k1, k2, v1, v2, **kw)), [q, k1, k2, v1, v2])
            need = B * H * L ** 3 * torch.finfo(self.dtype).bits / 8 * 3 / 2 ** 30  # scores, probs, grads
            if need > opts.tensor_naive_max_gib:
                skipped["naive"] = (f"the score cube needs ~{need:.0f} GiB "
                                    f"(> --tensor-naive-max-gib {opts.tensor_naive_max_gib:g})")
            else:
                impls["naive"] = lambda: ((lambda: naive_tensor(q, k1, k2, v1, v2, self.window)),
                                          [q, k1, k2, v1, v2])
            rec = {"window": list(self.window) if self.window else None, "triples": triples}
        dout = torch.randn(B, H, L, D, generator=gen, device=device, dtype=torch.float32).to(self.dtype)
        return {"rec": rec, "impls": impls, "skipped": skipped, "dout": dout, "flops": flops,
                "speed_only": speed_only}


def other_cases(opts, dt_name: dict) -> list[OtherCase]:
    dt = opts.other_dtype
    B, H = opts.batch, opts.heads
    cases = [OtherCase(f"linear-causal-{dt_name[dt]}-D64-L{L}", "linear", dt, B, H, L, 64, label="linear-causal")
             for L in opts.linear_lengths]
    cases += [OtherCase(f"tensor-exact-{dt_name[dt]}-D64-L{L}", "tensor", dt, 1, H, L, 64, label="tensor-exact")
              for L in opts.tensor_lengths]
    w = tuple(opts.tensor_window)
    cases += [OtherCase(f"tensor-window{w[0]}x{w[1]}-{dt_name[dt]}-D64-L{L}", "tensor", dt, 1, H, L, 64, w,
                        label=f"tensor-window{w[0]}x{w[1]}") for L in opts.tensor_window_lengths]
    return cases


def smoke_other_cases(opts) -> list[OtherCase]:
    f32 = torch.float32
    return [OtherCase("linear-causal-fp32-D16-L64", "linear", f32, 1, 2, 64, 16, label="linear-causal"),
            OtherCase("tensor-exact-fp32-D16-L16", "tensor", f32, 1, 2, 16, 16, label="tensor-exact"),
            OtherCase("tensor-window4x2-fp32-D16-L24", "tensor", f32, 1, 2, 24, 16, (4, 2), label="tensor-window4x2")]


def linear_crossover(timings: list[dict]) -> dict:
    """Shortest L at which causal linear attention beats the fastest SDPA backend (fwd, fwd+bwd)."""
    out = {}
    for mode in ("fwd", "fwd_bwd"):
        faster, seen = [], []
        for rec in timings:
            if not str(rec.get("id", "")).startswith("linear-causal"):
                continue
            impls = rec.get("impls", {})
            mine = impls.get("attncomp", {}).get(f"{mode}_ms")
            sdpa = [r[f"{mode}_ms"] for n, r in impls.items() if n.startswith("sdpa") and r.get(f"{mode}_ms")]
            if mine and sdpa:
                seen.append(rec["L"])
                if mine < min(sdpa):
                    faster.append(rec["L"])
        out[mode] = (min(faster) if faster else
                     (f"not reached up to L={max(seen)}" if seen else "not measured"))
    return out
