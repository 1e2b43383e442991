"""GPU suite: correctness of every attncomp kernel, then timings against torch SDPA and FlexAttention.

    python3 benchmarks/gpu_suite.py --out $OUT            # on the GPU machine (< 6 min, --budget-s 330)
    python benchmarks/gpu_suite.py --smoke --out /tmp/s    # CPU: tiny fp32 shapes, Triton interpreter

Sections, in order (each prints its elapsed time):

1. **peak** — a large bf16 / fp16 ``torch.matmul`` (8192³), timed with ``triton.testing.do_bench``:
   the measured peak that every TFLOP/s figure is compared with.
2. **correctness** — every kernel, forward and backward (out, dq, dk, dv, dbias), against an eager
   float64 reference on fresh random inputs: relative error ``‖x − ref‖ / ‖ref‖``, pass when it is at
   most 2e-3 (fp16), 1e-2 (bf16), 1e-5 (fp32, ieee dot). Dense op: plain, causal, bias, GQA, soft-cap,
   head dims 80 / 96, uneven lengths; block-sparse op (``attncomp.ops.attention``): each mask kind.
3. **timings** — median of ``triton.testing.do_bench`` (warm-up excluded; inputs random), forward and
   forward+backward, for attncomp and its peers: torch SDPA pinned to each backend (flash, efficient,
   cuDNN, math — math only up to ``--math-max-l``) and ``torch.compile(flex_attention)`` with the
   equivalent ``create_block_mask``. Compile / autotune / block-mask time is measured apart (the first
   call and the mask build) and never enters a timing. Cases run in priority order; once the time
   budget is spent the remaining cases are skipped and listed.

The forward is timed on inputs that require grad (as flash-attn's and Triton's benchmarks do), so
one compiled FlexAttention graph serves both timings. FLOPs count visible (query, key) pairs only:
``4·B·H·D·pairs`` forward and ``--fwd-bwd-flop-factor`` (3.5: backward = 2.5× forward) times that
for forward+backward; every implementation of a case is credited the same FLOPs.

Output: a short table last; full JSON (environment, options, every case) in ``<out>/gpu_suite.json``,
rewritten after every case, so a run cut short still leaves its results. Exit status 1 when a
correctness check fails.
"""

from __future__ import annotations

import os
import sys
import time

T0 = time.perf_counter()  # the --budget-s clock starts before torch is imported
if "--smoke" in sys.argv:  # Triton reads this when triton.language is first imported (torch imports it)
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import attncomp  # noqa: E402
from attncomp import ir  # noqa: E402
from attncomp.masks import blocks  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_other  # noqa: E402  (linear and tensor attention cases)

ROOT = Path(__file__).resolve().parent.parent
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DT_NAME = {v: k for k, v in DTYPES.items()}
ATTNCOMP_IMPLS = ("attncomp", "attncomp_dense", "attncomp_natten_layout")


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double(), ref.detach().double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def short(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def clean(x):
    """JSON-safe copy: NaN / inf floats become None."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    if isinstance(x, torch.dtype):
        return DT_NAME.get(x, str(x))
    return x


# ------------------------------------------------------------------------------------ entry points
entry = gpu_other.entry  # ``attncomp.ops.<name>`` or ``(None, reason)`` when it does not exist (yet)


def dense_op(q, k, v, bias=None, causal_offset=None, softcap=0.0):
    """attncomp's dense op: out ``(B, Hq, Lq, Dv)``; backward through its autograd formula."""
    return torch.ops.attncomp.dense_fwd(q, k, v, bias, q.shape[-1] ** -0.5, causal_offset, float(softcap))[0]


def reference(q, k, v, keep=None, bias=None, softcap=0.0):
    """Eager attention in q's dtype (float64 here): q ``(B, Hq, Lq, D)``, k/v ``(B, Hkv, Lk, D)``, keep
    ``(Lq, Lk)`` bool, bias broadcastable to ``(B, Hq, Lq, Lk)`` → ``(B, Hq, Lq, Dv)``."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    return s.softmax(-1) @ v


def visible_pairs(expr: str | None, Lq: int, Lk: int, device) -> int:
    """Number of (query, key) pairs a predicate leaves, counted in row chunks."""
    if expr is None:
        return Lq * Lk
    kv = torch.arange(Lk, device=device)[None, :]
    rows, total = max(1, (1 << 24) // Lk), 0
    for s in range(0, Lq, rows):
        q = torch.arange(s, min(Lq, s + rows), device=device)[:, None]
        total += int(blocks.eval_expr(expr, q, kv).expand(q.shape[0], Lk).sum())
    return total


def mask_mod_from_expr(expr: str):
    """A FlexAttention ``mask_mod`` evaluating an IR predicate: a real function (built once from the
    expression's source) so that Dynamo can trace it inside ``flex_attention`` and vmap can batch it."""
    src = f"def mask_mod(b, h, q, kv):\n    return {expr}\n"
    namespace = {"where": torch.where}
    exec(compile(src, "<attncomp mask_mod>", "exec"), namespace)  # noqa: S102 - IR predicate grammar only
    return namespace["mask_mod"]


# ------------------------------------------------------------------------------------ correctness
@dataclass
class Check:
    id: str
    op: str  # "dense" (torch.ops.attncomp.dense_fwd) or "sparse" (attncomp.ops.attention)
    dtype: torch.dtype
    B: int = 2
    Hq: int = 4
    Hkv: int = 0
    Lq: int = 512
    Lk: int = 0
    D: int = 64
    causal: int | None = None
    bias: bool = False
    softcap: float = 0.0
    mask: object = None

    def __post_init__(self):
        self.Hkv = self.Hkv or self.Hq
        self.Lk = self.Lk or self.Lq


def gpu_checks() -> list[Check]:
    bf, fp, f32 = torch.bfloat16, torch.float16, torch.float32
    nb = ir.Neighborhood(shape=(24, 20), kernel=(5, 7), dilation=(2, 1), stride=(2, 1), causal=(True, False))
    return [
        Check("dense-plain-D64-bf16", "dense", bf), Check("dense-plain-D64-fp16", "dense", fp),
        Check("dense-plain-D64-fp32", "dense", f32), Check("dense-plain-D128-bf16", "dense", bf, D=128),
        Check("dense-plain-D128-fp16", "dense", fp, D=128),
        Check("dense-causal-D128-bf16", "dense", bf, D=128, causal=0),
        Check("dense-causal-D64-fp16", "dense", fp, causal=0),
        Check("dense-bias-dbias-D64-bf16", "dense", bf, bias=True),
        Check("dense-gqa-H8/2-causal-D64-fp16", "dense", fp, Hq=8, Hkv=2, causal=0),
        Check("dense-softcap20-D64-bf16", "dense", bf, softcap=20.0),
        Check("dense-plain-D80-fp16", "dense", fp, D=80),
        Check("dense-causal-D96-bf16", "dense", bf, D=96, causal=0),
        Check("dense-Lq300-Lk400-causal-br-D64-fp16", "dense", fp, Lq=300, Lk=400, causal=100),
        Check("sparse-causal-L2048-D128-bf16", "sparse", bf, B=1, Hq=2, Lq=2048, D=128, mask=ir.Causal(0)),
        Check("sparse-window256-L2048-D128-bf16", "sparse", bf, B=1, Hq=2, Lq=2048, D=128, mask=ir.Window(255, 0)),
        Check("sparse-window1024-L2048-D128-bf16", "sparse", bf, B=1, Hq=2, Lq=2048, D=128,
              mask=ir.Window(1023, 0)),
        Check("sparse-doc1024-L2048-D128-bf16", "sparse", bf, B=1, Hq=2, Lq=2048, D=128, mask=ir.BlockDiagonal(1024)),
        Check("sparse-natten2d-64x64-k13-D128-bf16", "sparse", bf, B=1, Hq=2, Lq=4096, D=128,
              mask=_natten2d(64)),
        Check("sparse-natten2d-128x128-k13-D128-bf16", "sparse", bf, B=1, Hq=1, Lq=16384, D=128,
              mask=_natten2d(128)),
        Check("sparse-causal-gqa-H4/2-L1000-D64-fp16", "sparse", fp, B=2, Hq=4, Hkv=2, Lq=1000, mask=ir.Causal(0)),
        Check("sparse-natten2d-24x20-k5x7-d2x1-s2x1-causal10-D64-fp16", "sparse", fp, B=1, Hq=2, Lq=480, mask=nb),
    ]


def smoke_checks() -> list[Check]:
    f32 = torch.float32
    kw = {"B": 1, "Hq": 2, "D": 32}
    nb = ir.Neighborhood(shape=(6, 16), kernel=(3, 5), dilation=(2, 1), stride=(1, 2), causal=(True, False))
    return [
        Check("dense-plain-fp32", "dense", f32, Lq=64, **kw),
        Check("dense-causal-fp32", "dense", f32, Lq=64, causal=0, **kw),
        Check("dense-bias-dbias-fp32", "dense", f32, Lq=64, bias=True, **kw),
        Check("dense-gqa-H2/1-causal-fp32", "dense", f32, Lq=64, Hkv=1, causal=0, **{**kw}),
        Check("dense-softcap20-fp32", "dense", f32, Lq=64, softcap=20.0, **kw),
        Check("dense-D24-Lq48-Lk80-causal-br-fp32", "dense", f32, B=1, Hq=2, D=24, Lq=48, Lk=80, causal=32),
        Check("sparse-causal-fp32", "sparse", f32, Lq=64, mask=ir.Causal(0), **kw),
        Check("sparse-window16-fp32", "sparse", f32, Lq=96, mask=ir.Window(15, 0), **kw),
        Check("sparse-doc32-fp32", "sparse", f32, Lq=96, mask=ir.BlockDiagonal(32), **kw),
        Check("sparse-natten2d-8x8-k3-fp32", "sparse", f32, Lq=64, mask=_natten2d(8, 3), **kw),
        Check("sparse-natten2d-6x16-k3x5-d2x1-s1x2-causal10-fp32", "sparse", f32, Lq=96, mask=nb, **kw),
    ]


def _natten2d(side: int, k: int = 13) -> ir.Neighborhood:
    return ir.Neighborhood(shape=(side, side), kernel=(k, k), dilation=(1, 1), stride=(1, 1), causal=(False, False))


def run_check(c: Check, device: torch.device, seed: int) -> dict:
    rec = {"id": c.id, "op": c.op, "dtype": DT_NAME[c.dtype], "tol": TOL[c.dtype],
           "shape": {"B": c.B, "Hq": c.Hq, "Hkv": c.Hkv, "Lq": c.Lq, "Lk": c.Lk, "D": c.D},
           "causal_offset": c.causal, "bias": c.bias, "softcap": c.softcap,
           "mask": None if c.mask is None else str(c.mask), "errors": {}, "status": "error", "note": ""}
    if c.op == "sparse":
        attention, why = entry("attention")
        if attention is None:
            rec.update(status="skipped", note=why)
            return rec
    gen = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(c.dtype).requires_grad_()

    q, k, v = rnd(c.B, c.Hq, c.Lq, c.D), rnd(c.B, c.Hkv, c.Lk, c.D), rnd(c.B, c.Hkv, c.Lk, c.D)
    leaves = [q, k, v]
    bias = None
    if c.bias:
        bias = rnd(c.B, 1, c.Lq, c.Lk)
        leaves.append(bias)
    t0 = time.perf_counter()
    if c.op == "dense":
        out = dense_op(q, k, v, bias, c.causal, c.softcap)
        expr = ir.Causal(c.causal).expr() if c.causal is not None else None
    else:
        out = attention(q, k, v, mask=c.mask, scale=None)
        expr = c.mask.expr()
    dout = torch.randn(out.shape, generator=gen, device=device, dtype=torch.float32).to(out.dtype)
    grads = torch.autograd.grad(out, leaves, dout)
    sync(device)
    rec["first_call_s"] = round(time.perf_counter() - t0, 3)
    keep = blocks.dense_keep(expr, c.Lq, c.Lk, device) if expr is not None else None
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    ref = reference(*leaves64[:3], keep=keep, bias=leaves64[3] if c.bias else None, softcap=c.softcap)
    ref_grads = torch.autograd.grad(ref, leaves64, dout.double())
    names = ["out", "dq", "dk", "dv", "dbias"]
    errs = {names[0]: rel_err(out, ref)}
    errs.update({n: rel_err(g, r) for n, g, r in zip(names[1:], grads, ref_grads)})
    rec["errors"] = {n: float(f"{e:.3e}") for n, e in errs.items()}
    rec["max_rel_err"] = max(errs.values())
    rec["status"] = "pass" if all(e <= TOL[c.dtype] for e in errs.values()) else "fail"
    return rec


def correctness(opts, device: torch.device, budget: Budget, doc: dict) -> None:
    checks = smoke_checks() if opts.smoke else gpu_checks()
    checks = [c for c in checks if _selected(opts, c.id)]
    for i, c in enumerate(checks):
        if budget.left() < 0:
            doc["correctness"].append({"id": c.id, "op": c.op, "status": "skipped", "note": "time budget reached"})
            continue
        t0 = time.perf_counter()
        try:
            rec = run_check(c, device, opts.seed + i)
        except Exception as e:  # noqa: BLE001 - one failure is recorded, the run goes on
            rec = {"id": c.id, "op": c.op, "dtype": DT_NAME[c.dtype], "status": "error", "note": short(e),
                   "traceback": traceback.format_exc()[-3000:]}
            _after_error(device, doc)
        rec["elapsed_s"] = round(time.perf_counter() - t0, 2)
        doc["correctness"].append(rec)
        errs = " ".join(f"{n}={e:.1e}" for n, e in rec.get("errors", {}).items())
        flag = {"pass": "ok  ", "fail": "FAIL", "skipped": "skip"}.get(rec["status"], "ERR ")
        log(f"check {flag} {c.id:<58} {errs} (tol {TOL[c.dtype]:g}) {rec.get('note', '')} "
            f"[{rec['elapsed_s']:.1f}s]")
        if doc.get("cuda_lost"):
            break
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------ timings
@dataclass
class Case:
    id: str
    dtype: torch.dtype
    B: int
    H: int
    L: int
    D: int
    mask: object = None  # None: dense (no mask)
    label: str = "dense"
    notes: list = field(default_factory=list)


def gpu_cases(opts) -> list[Case]:
    """Timing cases in priority order (the budget skips from the end)."""
    dense_dt = [DTYPES[d] for d in opts.dtypes]
    mask_dt = [DTYPES[d] for d in opts.mask_dtypes]
    B, H = opts.batch, opts.heads

    def dense(dt, D):
        return [Case(f"dense-{DT_NAME[dt]}-D{D}-L{L}", dt, B, H, L, D) for L in opts.lengths]

    def masks(dt, D):
        out = []
        for L in opts.mask_lengths:
            kinds = [("causal", ir.Causal(0)), ("window256", ir.Window(255, 0)),
                     ("window1024", ir.Window(1023, 0)), ("doc1024", ir.BlockDiagonal(1024))]
            side = math.isqrt(L)
            if side * side == L and side >= 13:
                kinds.append((f"natten2d-{side}x{side}-k13", _natten2d(side)))
            out += [Case(f"{name}-{DT_NAME[dt]}-D{D}-L{L}", dt, B, H, L, D, m, name) for name, m in kinds]
        return out

    first, rest = [], []
    for i, dt in enumerate(dense_dt):
        for j, D in enumerate(opts.head_dims):
            (first if i == 0 and j == 0 else rest).extend(dense(dt, D))
    other = gpu_other.other_cases(opts, DT_NAME) if not opts.no_other else []
    cases = first + (masks(mask_dt[0], opts.mask_head_dim) if mask_dt else []) + other + rest
    for dt in mask_dt[1:]:
        cases += masks(dt, opts.mask_head_dim)
    return cases


def smoke_cases(opts) -> list[Case]:
    f32 = torch.float32
    return [Case("dense-fp32-D32-L64", f32, 1, 2, 64, 32),
            Case("window16-fp32-D32-L64", f32, 1, 2, 64, 32, ir.Window(15, 0), "window16")] + \
        ([] if opts.no_other else gpu_other.smoke_other_cases(opts))


class Bench:
    """CUDA: ``triton.testing.do_bench`` median; CPU (smoke): median of ``time.perf_counter`` calls."""

    def __init__(self, device: torch.device, opts):
        self.device, self.opts = device, opts

    def __call__(self, fn, grad_to_none=None) -> float:
        if self.device.type == "cuda":
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=self.opts.warmup_ms, rep=self.opts.rep_ms, grad_to_none=grad_to_none,
                                  return_mode="median"))
        times = []  # the first calls (timed apart) were the warm-up
        for _ in range(self.opts.smoke_repeats):
            for t in grad_to_none or ():
                t.grad = None
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    @property
    def how(self) -> str:
        if self.device.type == "cuda":
            return (f"triton.testing.do_bench median, warmup={self.opts.warmup_ms} ms, rep={self.opts.rep_ms} ms "
                    "(L2 flushed between calls by do_bench)")
        return f"time.perf_counter median of {self.opts.smoke_repeats} calls after the first (CPU smoke)"


_FLEX = {}


def flex_compiled():
    if "fn" not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


def flex_skip_reason(device, opts) -> str | None:
    if opts.no_flex:
        return "--no-flex"
    return None if device.type == "cuda" else "needs CUDA (smoke mode)"


def sdpa_backends() -> dict[str, object]:
    """Name → SDPBackend for each backend this torch has (missing ones are simply absent)."""
    from torch.nn.attention import SDPBackend

    names = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_efficient": "EFFICIENT_ATTENTION",
             "sdpa_cudnn": "CUDNN_ATTENTION", "sdpa_math": "MATH"}
    return {k: getattr(SDPBackend, v) for k, v in names.items() if hasattr(SDPBackend, v)}


def build_impls(case: Case, q, k, v, device, opts) -> tuple[dict, dict]:
    """``(impls, skipped)``: impls maps a name to ``setup``; ``setup()`` (timed apart: mask and block
    table builds) returns ``(fn, leaves)``, the zero-argument forward returning ``(B, H, L, D)`` and the
    tensors its backward writes grads to; ``skipped`` maps a name to the reason."""
    impls, skipped = {}, {}
    expr = case.mask.expr() if case.mask is not None else None
    causal = isinstance(case.mask, ir.Causal) and case.mask.offset == 0
    if case.mask is None:
        impls["attncomp"] = lambda: (lambda: dense_op(q, k, v), [q, k, v])
    else:
        attention, why = entry("attention")
        if attention is None:
            skipped["attncomp"] = why
        else:
            def setup_attncomp(mask=case.mask):
                from attncomp import ops

                try:  # build (and cache) the table attention() will use, so its time is setup time
                    bm, bn = ops.default_blocks(case.D, q.dtype, q.device)
                    table = blocks.block_table(expr, None, case.L, case.L, bm, bn, q.device)
                    case.notes.append(f"attncomp block table {bm}x{bn}: {table.visited_fraction():.3f} of tiles "
                                      "visited")
                except Exception as e:  # noqa: BLE001 - then the first call builds it
                    case.notes.append(f"attncomp block table not pre-built ({short(e)})")
                return (lambda: attention(q, k, v, mask=mask, scale=None)), [q, k, v]
            impls["attncomp"] = setup_attncomp
        if causal:
            impls["attncomp_dense"] = lambda: (lambda: dense_op(q, k, v, causal_offset=0), [q, k, v])
        if isinstance(case.mask, ir.Neighborhood):
            na, why = entry("neighborhood_attention")
            if na is None:
                skipped["attncomp_natten_layout"] = why
            else:
                shape = case.mask.shape

                def setup_na():
                    def natten(x):  # (B, H, L, D) -> NATTEN's (B, *spatial, H, D), a leaf of its own
                        y = x.detach().transpose(1, 2).reshape(case.B, *shape, case.H, case.D).contiguous()
                        return y.requires_grad_()

                    qn, kn, vn = natten(q), natten(k), natten(v)

                    def fn():
                        o = na(qn, kn, vn, kernel_size=case.mask.kernel)
                        return o.reshape(case.B, case.L, case.H, case.D).transpose(1, 2)
                    return fn, [qn, kn, vn]
                impls["attncomp_natten_layout"] = setup_na

    keep = None
    if case.mask is not None and not causal:
        keep = blocks.dense_keep(expr, case.L, case.L, device)
    for name, backend in sdpa_backends().items():
        if device.type != "cuda" and name in ("sdpa_efficient", "sdpa_cudnn"):
            skipped[name] = "needs CUDA"
            continue
        if name == "sdpa_math" and case.L > opts.math_max_l:
            skipped[name] = f"L > --math-max-l {opts.math_max_l} (materialises B·H·L² scores)"
            continue
        if name == "sdpa_flash" and keep is not None:
            skipped[name] = "FLASH_ATTENTION takes no attn_mask"
            continue

        def make(backend=backend):
            from torch.nn.attention import sdpa_kernel

            def fn():
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, is_causal=causal)
            return fn, [q, k, v]
        impls[name] = make
        if keep is not None:
            case.notes.append(f"{name}: dense (L, L) bool attn_mask (computes every tile)")
    why = flex_skip_reason(device, opts)
    if why:
        skipped["flex"] = why
    else:
        def setup_flex():
            from torch.nn.attention.flex_attention import create_block_mask

            bm = None
            if expr is not None:
                bm = create_block_mask(mask_mod_from_expr(expr), None, None, case.L, case.L, device=device)
            flex = flex_compiled()
            return (lambda: flex(q, k, v, block_mask=bm)), [q, k, v]
        impls["flex"] = setup_flex
    return impls, skipped


def time_case(case, device, bench: Bench, peak: float | None, opts, budget: Budget) -> dict:
    """Time one case: a softmax :class:`Case`, or a ``gpu_other.OtherCase`` (linear / tensor)."""
    gen = torch.Generator(device=device).manual_seed(opts.seed)
    rec = {"id": case.id, "label": case.label, "dtype": DT_NAME[case.dtype], "B": case.B, "H": case.H, "L": case.L,
           "D": case.D, "mask": str(case.mask) if case.mask is not None else "none", "impls": {},
           "notes": case.notes}
    speed_only = ()
    if isinstance(case, Case):
        shape = (case.B, case.H, case.L, case.D)
        q, k, v = (torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(case.dtype)
                   .requires_grad_() for _ in range(3))
        dout = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(case.dtype)
        expr = case.mask.expr() if case.mask is not None else None
        pairs = visible_pairs(expr, case.L, case.L, device)
        flops = 4.0 * case.B * case.H * case.D * pairs
        rec.update(expr=expr, visible_pairs=pairs, density=pairs / case.L ** 2)
        impls, skipped = build_impls(case, q, k, v, device, opts)
    else:
        built = case.build(device, opts, gen, sdpa_backends)
        rec.update(kind=case.kind, **built["rec"])
        impls, skipped, dout, flops = built["impls"], built["skipped"], built["dout"], built["flops"]
        speed_only = tuple(built["speed_only"])
    rec.update(flops_fwd=flops, flops_fwd_bwd=flops * opts.fwd_bwd_flop_factor)
    for name, why in skipped.items():
        rec["impls"][name] = {"status": "skipped", "note": why}
    ref_out = None
    leaves: list = []
    for name, setup in impls.items():
        r = rec["impls"][name] = {"status": "error", "note": ""}
        if budget.left() < 0:
            r.update(status="skipped", note="time budget reached")
            continue
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                t0 = time.perf_counter()
                fn, leaves = setup()
                sync(device)
                r["setup_s"] = round(time.perf_counter() - t0, 4)
                t0 = time.perf_counter()
                out = fn()
                sync(device)
                r["first_fwd_s"] = round(time.perf_counter() - t0, 4)

                def fwd_bwd(fn=fn):
                    fn().backward(dout)
                t0 = time.perf_counter()
                fwd_bwd()
                sync(device)
                r["first_fwd_bwd_s"] = round(time.perf_counter() - t0, 4)
            if caught:
                r["warnings"] = sorted({short(w.message)[:200] for w in caught})[:3]
            out = out.detach()
            if name in speed_only:
                r["agree_with"] = "not compared: a different function (speed only)"
            elif ref_out is None and name in ATTNCOMP_IMPLS:
                ref_out, r["agree_with"] = out, "itself (first attncomp impl: the others are compared with it)"
            elif ref_out is not None:
                r["agree_rel_err"] = rel_err(out, ref_out)
                r["agree_ok"] = r["agree_rel_err"] <= 2 * TOL[case.dtype]
            del out
            r["fwd_ms"] = bench(fn)
            if budget.left() >= 0:
                r["fwd_bwd_ms"] = bench(fwd_bwd, grad_to_none=leaves)
            else:
                r["note"] = "fwd+bwd not timed: time budget reached"
            for mode, fl in (("fwd", flops), ("fwd_bwd", flops * opts.fwd_bwd_flop_factor)):
                ms = r.get(f"{mode}_ms")
                if ms:
                    r[f"{mode}_tflops"] = fl / ms * 1e-9
                    r[f"{mode}_pct_peak"] = 100.0 * r[f"{mode}_tflops"] / peak if peak else None
            r["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - one failure is recorded, the run goes on
            r.update(status="error", note=short(e), traceback=traceback.format_exc()[-3000:])
            if not _cuda_alive(device):
                rec["cuda_lost"] = True
                break
        finally:
            for t in leaves:
                t.grad = None
            if device.type == "cuda" and _cuda_alive(device):
                torch.cuda.empty_cache()
        log(f"  {name:<22} " + _impl_line(r))
    rec["speedup"] = speedups(rec["impls"])
    return rec


def _impl_line(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['status']}: {r.get('note', '')}"
    parts = []
    for mode in ("fwd", "fwd_bwd"):
        if r.get(f"{mode}_ms") is not None:
            pct = r.get(f"{mode}_pct_peak")
            parts.append(f"{mode} {r[f'{mode}_ms']:8.3f} ms {r[f'{mode}_tflops']:7.1f} TF/s"
                         + (f" ({pct:4.1f}%)" if pct is not None else ""))
    extra = f" agree {r['agree_rel_err']:.1e}" if "agree_rel_err" in r else ""
    first = f" [setup {r.get('setup_s', 0):.2f}s, first fwd {r.get('first_fwd_s', 0):.2f}s, " \
            f"first fwd+bwd {r.get('first_fwd_bwd_s', 0):.2f}s]"
    return " | ".join(parts) + extra + first


def speedups(impls: dict) -> dict:
    """For each attncomp impl: peer time / attncomp time (> 1: attncomp faster), vs flex and the best SDPA."""
    out = {}
    for a in ATTNCOMP_IMPLS:
        if impls.get(a, {}).get("status") != "ok":
            continue
        s = {}
        for mode in ("fwd", "fwd_bwd"):
            mine = impls[a].get(f"{mode}_ms")
            if not mine:
                continue
            flex = impls.get("flex", {}).get(f"{mode}_ms")
            s[f"vs_flex_{mode}"] = flex / mine if flex else None
            sdpa = {n: r[f"{mode}_ms"] for n, r in impls.items() if n.startswith("sdpa") and r.get(f"{mode}_ms")}
            if sdpa:
                best = min(sdpa, key=sdpa.get)
                s[f"vs_best_sdpa_{mode}"], s[f"best_sdpa_{mode}"] = sdpa[best] / mine, best
            for n, r in impls.items():  # any other peer (e.g. the naive einsum of tensor attention)
                if n not in ATTNCOMP_IMPLS and n != "flex" and not n.startswith("sdpa") and r.get(f"{mode}_ms"):
                    s[f"vs_{n}_{mode}"] = r[f"{mode}_ms"] / mine
        out[a] = s
    return out


def timings(opts, device, peak, budget: Budget, doc: dict) -> None:
    bench = Bench(device, opts)
    doc["timing_method"] = bench.how
    cases = smoke_cases(opts) if opts.smoke else gpu_cases(opts)
    cases = [c for c in cases if _selected(opts, c.id)]
    for case in cases:
        if doc.get("cuda_lost"):
            doc["skipped"].append(f"{case.id}: CUDA context lost earlier")
            continue
        if budget.left() < opts.min_case_s:
            doc["skipped"].append(f"{case.id}: time budget reached ({budget.left():.0f} s left < --min-case-s)")
            log(f"skip {case.id}: time budget reached")
            continue
        log(f"case {case.id}: B={case.B} H={case.H} L={case.L} D={case.D} mask={case.mask or 'none'}")
        t0 = time.perf_counter()
        try:
            rec = time_case(case, device, bench, peak, opts, budget)
        except Exception as e:  # noqa: BLE001
            rec = {"id": case.id, "status": "error", "note": short(e), "traceback": traceback.format_exc()[-3000:]}
            _after_error(device, doc)
        if rec.get("cuda_lost"):
            doc["cuda_lost"] = f"after {case.id}"
        rec["elapsed_s"] = round(time.perf_counter() - t0, 2)
        log(f"case {case.id} done in {rec['elapsed_s']:.1f} s; budget left {budget.left():.0f} s")
        doc["timings"].append(rec)
        write_json(doc, opts)
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------ peak, env, helpers
def measure_peak(device, opts) -> dict:
    if device.type != "cuda":
        return {"note": "not measured (no GPU)"}
    from triton.testing import do_bench

    n = opts.peak_n
    res = {"matmul": f"{n}x{n}x{n}", "flops": 2.0 * n ** 3}
    for name in ("bf16", "fp16"):
        a = torch.randn(n, n, device=device, dtype=DTYPES[name])
        b = torch.randn(n, n, device=device, dtype=DTYPES[name])
        a @ b
        ms = float(do_bench(lambda a=a, b=b: a @ b, warmup=opts.warmup_ms, rep=max(opts.rep_ms, 100),
                            return_mode="median"))
        res[f"{name}_ms"], res[f"{name}_tflops"] = ms, 2.0 * n ** 3 / ms * 1e-9
        del a, b
    torch.cuda.empty_cache()
    return res


def environment(device) -> dict:
    import triton

    env = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
           "triton": triton.__version__, "attncomp": getattr(attncomp, "__version__", None),
           "cuda": torch.version.cuda, "device": str(device), "cpu_count": os.cpu_count(),
           "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
           "ATTNCOMP_AUTOTUNE": os.environ.get("ATTNCOMP_AUTOTUNE")}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                   gpu_memory_gib=round(p.total_memory / 2 ** 30, 1), sm_count=p.multi_processor_count,
                   cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
    try:
        git = ["git", "-C", str(ROOT)]
        env["git_commit"] = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True,
                                           timeout=10).stdout.strip() or None
        env["git_dirty"] = bool(subprocess.run(git + ["status", "--porcelain"], capture_output=True, text=True,
                                               timeout=10).stdout.strip()) if env["git_commit"] else None
    except Exception:  # noqa: BLE001 - no git on the machine
        env["git_commit"] = None
    return env


class Budget:
    def __init__(self, seconds: float):
        self.seconds = seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - T0)


def _cuda_alive(device) -> bool:
    if device.type != "cuda":
        return True
    try:
        torch.cuda.synchronize(device)
        torch.zeros(1, device=device).add_(1).item()
        return True
    except Exception:  # noqa: BLE001
        return False


def _after_error(device, doc: dict) -> None:
    """After a failure: free memory; if the CUDA context is broken (illegal access...), say so."""
    if device.type == "cuda":
        if not _cuda_alive(device):
            doc["cuda_lost"] = doc.get("cuda_lost") or "after an error"
            return
        torch.cuda.empty_cache()


def _selected(opts, case_id: str) -> bool:
    return not opts.cases or any(s in case_id for s in opts.cases)


def write_json(doc: dict, opts) -> Path:
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    doc["elapsed_s"] = round(time.perf_counter() - T0, 1)
    path = out / "gpu_suite.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(clean(doc), indent=1))
    tmp.replace(path)
    return path


def _first_s(r: dict) -> float | None:
    """Setup + first forward + first forward+backward: compile, autotune, mask / block-table builds."""
    parts = [r.get(k) for k in ("setup_s", "first_fwd_s", "first_fwd_bwd_s")]
    return sum(p for p in parts if p is not None) if any(p is not None for p in parts) else None


# (header, width, format, getter(case record, impl record, speedups)) of the summary table
_COLS = [
    ("fwd ms", 9, ".3f", lambda c, r, s: r.get("fwd_ms")),
    ("TF/s", 6, ".1f", lambda c, r, s: r.get("fwd_tflops")),
    ("%pk", 5, ".1f", lambda c, r, s: r.get("fwd_pct_peak")),
    ("f+b ms", 9, ".3f", lambda c, r, s: r.get("fwd_bwd_ms")),
    ("TF/s", 6, ".1f", lambda c, r, s: r.get("fwd_bwd_tflops")),
    ("%pk", 5, ".1f", lambda c, r, s: r.get("fwd_bwd_pct_peak")),
    ("xflex", 6, ".2f", lambda c, r, s: s.get("vs_flex_fwd")),
    ("xflex", 6, ".2f", lambda c, r, s: s.get("vs_flex_fwd_bwd")),
    ("xsdpa", 6, ".2f", lambda c, r, s: s.get("vs_best_sdpa_fwd")),
    ("xsdpa", 6, ".2f", lambda c, r, s: s.get("vs_best_sdpa_fwd_bwd")),
    ("1st s", 6, ".1f", lambda c, r, s: _first_s(r)),
    ("flex 1st s", 10, ".1f", lambda c, r, s: _first_s(c["impls"].get("flex", {}))),
]


def table(doc: dict, opts) -> str:
    """The short summary: one row per case and attncomp implementation."""
    peak = doc["peak"].get("bf16_tflops")
    head = (f"attncomp vs peers: ms = {doc.get('timing_method', '?')}.\n"
            f"TF/s counts visible (q, k) pairs only: fwd 4*B*H*D*pairs, f+b (fwd+bwd) {opts.fwd_bwd_flop_factor:g}x "
            f"fwd; %pk = % of the measured bf16 matmul peak ({f'{peak:.0f} TF/s' if peak else 'not measured'}).\n"
            "xflex / xsdpa = peer ms / attncomp ms, fwd then f+b (> 1: attncomp faster; sdpa = the fastest SDPA "
            "backend that ran, named last).\n1st s = setup + first fwd + first f+b calls (compile, autotune, "
            "block tables), never inside a timing; flex 1st s = the same for FlexAttention (compile, block mask).")
    w0, w1 = 36, 22
    cols = f"{'case':<{w0}} {'impl':<{w1}} " + " ".join(f"{h:>{w}}" for h, w, _, _ in _COLS) + "  best sdpa"
    lines = [head, cols]
    for rec in doc["timings"]:
        shown = False
        for a in ATTNCOMP_IMPLS:
            r = rec.get("impls", {}).get(a)
            if r is None:
                continue
            shown = True
            if r.get("status") != "ok":
                lines.append(f"{rec['id']:<{w0}} {a:<{w1}} {r.get('status')}: {r.get('note', '')}"[:200])
                continue
            s = rec.get("speedup", {}).get(a, {})
            cells = []
            for _, w, fmt, get in _COLS:
                x = get(rec, r, s)
                cells.append(format(x, f">{w}{fmt}") if isinstance(x, (int, float)) else f"{'-':>{w}}")
            best = f"{s.get('best_sdpa_fwd', '-')}/{s.get('best_sdpa_fwd_bwd', '-')}".replace("sdpa_", "")
            others = sorted({k[3:].rsplit("_fwd", 1)[0] for k in s if k.startswith("vs_")} - {"flex", "best_sdpa"})
            for n in others:
                a_, b_ = s.get(f"vs_{n}_fwd"), s.get(f"vs_{n}_fwd_bwd")
                best += f"  x{n} " + "/".join(f"{x:.2f}" if x else "-" for x in (a_, b_))
            lines.append(f"{rec['id']:<{w0}} {a:<{w1}} " + " ".join(cells) + f"  {best}")
        if not shown:
            lines.append(f"{rec['id']:<{w0}} {rec.get('status', 'error')}: {rec.get('note', '')}"[:200])
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)

    def ints(s):
        return [int(x) for x in s.split(",") if x.strip()]

    def dts(s):
        out = [x.strip() for x in s.split(",") if x.strip()]
        bad = [x for x in out if x not in ("bf16", "fp16")]
        if bad:
            raise argparse.ArgumentTypeError(f"dtypes must be bf16 / fp16, got {bad}")
        return out

    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks" / "out"),
                   help="output directory for gpu_suite.json (default: $OUT, else benchmarks/out)")
    p.add_argument("--smoke", action="store_true",
                   help="CPU: tiny fp32 shapes through Triton's interpreter (sets TRITON_INTERPRET=1 itself)")
    p.add_argument("--budget-s", type=float, default=330.0,
                   help="seconds from start after which remaining cases are skipped (default 330)")
    p.add_argument("--min-case-s", type=float, default=20.0,
                   help="do not start a timing case with less budget left than this (default 20)")
    p.add_argument("--autotune", choices=("0", "1", "force"), default="0",
                   help="ATTNCOMP_AUTOTUNE for the run (default 0: heuristic tiles; 1 tunes on first call — its "
                        "time lands in the first-call column — and writes <out>/autotune.json)")
    p.add_argument("--dtypes", type=dts, default=["bf16", "fp16"], help="dense dtypes (default bf16,fp16)")
    p.add_argument("--head-dims", type=ints, default=[128, 64], help="dense head dims (default 128,64)")
    p.add_argument("--lengths", type=ints, default=[1024, 4096, 16384], help="dense L (default 1024,4096,16384)")
    p.add_argument("--mask-dtypes", type=dts, default=["bf16"], help="mask-case dtypes (default bf16)")
    p.add_argument("--mask-head-dim", type=int, default=128, help="mask-case head dim (default 128)")
    p.add_argument("--mask-lengths", type=ints, default=[4096, 16384], help="mask-case L (default 4096,16384)")
    p.add_argument("--batch", type=int, default=4, help="B of the timing cases (default 4)")
    p.add_argument("--heads", type=int, default=16, help="H of the timing cases (default 16)")
    p.add_argument("--math-max-l", type=int, default=1024, help="largest L timed with SDPA's math backend")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention (no torch.compile)")
    p.add_argument("--no-other", action="store_true", help="skip the linear and tensor attention cases")
    p.add_argument("--other-dtype", type=lambda s: DTYPES[dts(s)[0]], default=torch.bfloat16,
                   help="dtype of the linear / tensor cases (default bf16)")
    p.add_argument("--linear-lengths", type=ints, default=[4096, 8192, 16384, 32768],
                   help="causal linear attention L (default 4096..32768)")
    p.add_argument("--tensor-lengths", type=ints, default=[256, 512, 1024], help="exact tensor attention L")
    p.add_argument("--tensor-window", type=ints, default=[64, 16], help="w1,w2 of the windowed tensor cases")
    p.add_argument("--tensor-window-lengths", type=ints, default=[4096, 16384], help="windowed tensor attention L")
    p.add_argument("--tensor-naive-max-gib", type=float, default=24.0,
                   help="largest score cube (GiB) the naive tensor einsum may materialise")
    p.add_argument("--cases", type=lambda s: [x for x in s.split(",") if x],
                   help="only checks / cases whose id contains one of these comma-separated substrings")
    p.add_argument("--skip-correctness", action="store_true")
    p.add_argument("--skip-timings", action="store_true")
    p.add_argument("--warmup-ms", type=int, default=20, help="do_bench warm-up (ms, default 20)")
    p.add_argument("--rep-ms", type=int, default=80, help="do_bench measuring time (ms, default 80)")
    p.add_argument("--smoke-repeats", type=int, default=2, help="timed calls per impl in --smoke (default 2)")
    p.add_argument("--peak-n", type=int, default=8192, help="matmul size for the peak (default 8192)")
    p.add_argument("--fwd-bwd-flop-factor", type=float, default=3.5,
                   help="fwd+bwd FLOPs as a multiple of fwd FLOPs (default 3.5 = fwd + bwd at 2.5× fwd)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--list", action="store_true", help="print the checks and timing cases, in order, and exit")
    return p.parse_args(argv)


def main(argv=None) -> int:
    opts = parse_args(argv)
    if opts.list:
        for c in (smoke_checks() if opts.smoke else gpu_checks()):
            print(f"check {c.id}" + ("" if _selected(opts, c.id) else "  (not selected)"))
        for c in (smoke_cases(opts) if opts.smoke else gpu_cases(opts)):
            print(f"case  {c.id}: B={c.B} H={c.H} L={c.L} D={c.D} mask={c.mask or 'none'}"
                  + ("" if _selected(opts, c.id) else "  (not selected)"))
        return 0
    os.environ["ATTNCOMP_AUTOTUNE"] = opts.autotune
    if opts.autotune != "0":
        os.environ.setdefault("ATTNCOMP_AUTOTUNE_CACHE", str(Path(opts.out).resolve() / "autotune.json"))
    budget = Budget(opts.budget_s)
    if opts.smoke:
        attncomp.set_kernels("triton")
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        print("no CUDA device: run with --smoke for the CPU interpreter check", file=sys.stderr)
        return 2
    for name in ("recompile_limit", "cache_size_limit"):  # each flex shape is its own static compile:
        try:  # never fall back to eager flex after the default 8
            setattr(torch._dynamo.config, name, max(256, getattr(torch._dynamo.config, name)))
        except Exception:  # noqa: BLE001 - absent in this torch
            pass
    doc = {"suite": "attncomp-gpu-suite", "format": 1, "mode": "smoke" if opts.smoke else "gpu",
           "argv": sys.argv[1:], "options": {k: v for k, v in vars(opts).items()},
           "env": environment(device), "tolerances": {DT_NAME[k]: v for k, v in TOL.items()},
           "flop_convention": f"visible (q, k) pairs only; fwd = 4*B*H*D*pairs; fwd+bwd = "
                              f"{opts.fwd_bwd_flop_factor:g} * fwd; same FLOPs credited to every impl of a case",
           "forward_timing": "inputs require grad (training forward); fwd+bwd = forward + backward(dout)",
           "peak": {}, "sections": {}, "correctness": [], "timings": [], "skipped": []}
    log(f"attncomp GPU suite ({doc['mode']}): {doc['env'].get('gpu', device)}, torch {torch.__version__}, "
        f"triton {doc['env']['triton']}, autotune={opts.autotune}, budget {opts.budget_s:.0f} s")
    try:
        t0 = time.perf_counter()
        doc["peak"] = measure_peak(device, opts)
        doc["sections"]["peak_s"] = round(time.perf_counter() - t0, 1)
        log(f"section peak: {doc['peak']} ({doc['sections']['peak_s']} s)")
        if not opts.skip_correctness:
            t0 = time.perf_counter()
            correctness(opts, device, budget, doc)
            doc["sections"]["correctness_s"] = round(time.perf_counter() - t0, 1)
            log(f"section correctness: {doc['sections']['correctness_s']} s")
            write_json(doc, opts)
        if not opts.skip_timings:
            t0 = time.perf_counter()
            timings(opts, device, doc["peak"].get("bf16_tflops"), budget, doc)
            doc["linear_crossover_L"] = gpu_other.linear_crossover(doc["timings"])
            doc["sections"]["timings_s"] = round(time.perf_counter() - t0, 1)
            log(f"section timings: {doc['sections']['timings_s']} s")
    except Exception as e:  # noqa: BLE001 - keep what was measured
        doc["fatal"] = short(e)
        doc["fatal_traceback"] = traceback.format_exc()[-4000:]
        print(doc["fatal_traceback"], file=sys.stderr)
    checks = doc["correctness"]
    bad = [c["id"] for c in checks if c.get("status") in ("fail", "error")]
    doc["summary"] = {"checks_passed": sum(c.get("status") == "pass" for c in checks),
                      "checks_failed_or_error": bad,
                      "checks_skipped": [c["id"] for c in checks if c.get("status") == "skipped"],
                      "cases_timed": len(doc["timings"]), "cases_skipped": len(doc["skipped"])}
    path = write_json(doc, opts)
    print()
    print(f"correctness: {doc['summary']['checks_passed']}/{len(checks)} passed"
          + (f"; FAILED: {', '.join(bad)}" if bad else "")
          + (f"; skipped: {', '.join(doc['summary']['checks_skipped'])}" if doc["summary"]["checks_skipped"] else ""))
    for s in doc["skipped"]:
        print(f"skipped: {s}")
    if doc.get("cuda_lost"):
        print(f"!! CUDA context lost {doc['cuda_lost']}: later cases were not run")
    print(f"sections: {doc['sections']}; total {doc['elapsed_s']} s; JSON: {path}")
    if "linear_crossover_L" in doc:
        print(f"causal linear attention faster than the fastest causal SDPA from L = "
              f"{doc['linear_crossover_L']} (fwd / fwd+bwd)")
    print()
    print(table(doc, opts))
    return 1 if bad or "fatal" in doc else 0


if __name__ == "__main__":
    sys.exit(main())
