"""Offline sm_90 (H100 / H200) compile of every Triton kernel variant the launchers run: dense,
block-sparse, linear and tensor attention, forward and backward, for the configs the autotuner
would try on CUDA. No GPU is needed, and none is used.

The launchers run on CPU tensors against a recording stand-in for the generated kernel module
(``codegen.load_kernel_module``); each recorded launch is then specialised as Triton's JIT would
specialise it on a GPU (argument types, ``== 1`` integers, 16-byte divisibility of pointers and
integers) and compiled with ``triton.compile(..., target=GPUTarget("cuda", 90, 32))`` down to a cubin
(ptxas included). A kernel fails when compiling raises, or when it needs more shared memory than an
sm_90 block can have (227 KiB, checked at load time on a GPU: such a config must be pruned before it
is timed). ptxas' register and spill counts are reported beside each kernel.

This needs TRITON_INTERPRET=0 (the interpreter is chosen when triton is first imported), so the tests
run this file as a subprocess: ``python tests/test_sm90_compile.py [--full] [--family dense ...]``.
The default test compiles a small subset; ``-m slow`` compiles the whole sweep per family.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

SM90_SHARED = 232448  # bytes: the most dynamic shared memory one sm_90 block can opt in to (227 KiB)
FAMILIES = ("dense", "sparse", "linear", "tensor")


# ----------------------------------------------------------------------------- record and compile
def record(run) -> list[tuple]:
    """Run ``run()`` (which calls launchers on CPU tensors) with every generated kernel replaced by a
    recorder; returns the launches as ``(jit_function, args, kwargs)``."""
    from attncomp.runtime import codegen

    calls = []

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **kw: calls.append((self.fn, args, dict(kw)))

    real_load = codegen.load_kernel_module

    def load(template, **flags):
        mod = real_load(template, **flags)
        jit = {n: Recorder(getattr(mod, n)) for n in vars(mod)
               if hasattr(getattr(mod, n), "arg_names") and not n.startswith("_")}
        return type("RecordingModule", (), jit)

    codegen.load_kernel_module = load
    try:
        run()
    finally:
        codegen.load_kernel_module = real_load
    return calls


def _source(fn, args, kw, target):
    """The ASTSource, options and a dedupe key of one launch, specialised as the JIT would (triton's
    own binder when this triton has it, else plain types with the constexpr keywords)."""
    import torch
    from triton.compiler import ASTSource

    try:
        from triton.compiler.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature
    except ImportError:  # another triton: no specialisation beyond types
        make_backend = None
    if make_backend is not None and hasattr(fn, "_pack_args"):
        backend = make_backend(target)
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, spec, opts = binder(*args, **kw)
        options, sig, consts, attrs = fn._pack_args(backend, kw, bound, spec, opts)
        key = (fn.fn.__module__, fn.__name__, str(spec), str(sorted(options.__dict__.items())))
        return ASTSource(fn, sig, consts, attrs), options.__dict__, key
    ptr = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.uint8: "*u8",
           torch.int32: "*i32"}
    options = {"num_warps": kw.pop("num_warps", 4), "num_stages": kw.pop("num_stages", 2)}
    sig, consts = {}, {}
    for name, a in zip(fn.arg_names, list(args) + [kw[n] for n in fn.arg_names[len(args):]]):
        if name in kw:
            sig[name], consts[name] = "constexpr", kw[name]
        elif isinstance(a, torch.Tensor):
            sig[name] = ptr[a.dtype]
        elif isinstance(a, float):
            sig[name] = "fp32"
        else:
            sig[name] = "i32" if -2 ** 31 <= a < 2 ** 31 else "i64"
    key = (fn.fn.__module__, fn.__name__, str(sig), str(consts), str(options))
    return ASTSource(fn, sig, consts), options, key


def _ptxas_usage(log: str) -> tuple[int | None, int | None]:
    """(registers, spill bytes stored + loaded) from ptxas -v output."""
    regs = re.findall(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return (int(regs[-1]) if regs else None,
            sum(int(a) + int(b) for a, b in spills) if spills else None)


def _cubin_usage(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers, stack bytes) from cuobjdump's resource usage (fallback when no ptxas log)."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    reg, stack = re.search(r"REG:(\d+)", out), re.search(r"STACK:(\d+)", out)
    return (int(reg.group(1)) if reg else None, int(stack.group(1)) if stack else None)


def compile_launch(fn, args, kw, target) -> dict:
    """Compile one recorded launch for ``target``: name, constexprs, options, ok / error, registers,
    spill bytes, shared memory, seconds."""
    import triton

    src, options, _ = _source(fn, args, dict(kw), target)
    consts = {k: v for k, v in kw.items() if k not in ("num_warps", "num_stages")}
    res = {"kernel": fn.__name__, "consts": consts, "warps": options.get("num_warps"),
           "stages": options.get("num_stages")}
    t0 = time.perf_counter()
    log = io.StringIO()
    knobs = getattr(getattr(triton, "knobs", None), "nvidia", None)
    use_log = knobs is not None and hasattr(knobs, "dump_ptxas_log")
    try:
        ctx = knobs.scope() if use_log and hasattr(knobs, "scope") else contextlib.nullcontext()
        with ctx, contextlib.redirect_stdout(log):
            if use_log:
                knobs.dump_ptxas_log = True
            kernel = triton.compile(src, target=target, options=options)
    except Exception as exc:  # reported; the caller decides
        res.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:3000]}")
        return res
    finally:
        if use_log and not hasattr(knobs, "scope"):
            knobs.dump_ptxas_log = False
    res["seconds"] = time.perf_counter() - t0
    shared = int(kernel.metadata.shared)
    regs, spills = _ptxas_usage(log.getvalue())
    if regs is None:
        regs, spills = _cubin_usage(kernel.asm["cubin"])
    res.update(ok=shared <= SM90_SHARED, regs=regs, spills=spills, shared=shared)
    if shared > SM90_SHARED:
        res["error"] = f"OutOfResources: needs {shared} B shared memory > {SM90_SHARED} B (sm_90)"
    return res


def fmt(res: dict, label: str) -> str:
    head = "ok  " if res["ok"] else "FAIL"
    c = res["consts"]
    tiles = " ".join(f"{k}={c[k]}" for k in ("BLOCK_M", "BLOCK_N", "BLOCK_L", "BLOCK_C", "BLOCK_D", "BLOCK_DV",
                                              "BLOCK_E") if k in c)
    usage = (f"regs={res.get('regs')} spill={res.get('spills')} smem={res.get('shared')} "
             f"{res.get('seconds', 0):.1f}s") if "shared" in res else ""
    line = f"{head} {label:<44} {res['kernel']:<20} {tiles} w{res['warps']} s{res['stages']} {usage}"
    return line + (f"\n      {res['error']}" if "error" in res else "")


def compile_variants_sm90(variants) -> list[str]:
    """Record and compile ``variants`` (``(label, thunk)`` pairs, each thunk calling launchers), each
    distinct specialised kernel once. Returns one line per kernel (``ok`` / ``FAIL``). Needs
    TRITON_INTERPRET=0 and no GPU."""
    from triton.backends.compiler import GPUTarget

    assert os.environ.get("TRITON_INTERPRET") == "0", "run with TRITON_INTERPRET=0 (a subprocess)"
    target = GPUTarget("cuda", 90, 32)
    lines, seen = [], set()
    for label, thunk in variants:
        try:
            calls = record(thunk)
        except Exception as exc:
            lines.append(f"FAIL {label}: launcher raised {type(exc).__name__}: {exc}")
            continue
        for fn, args, kw in calls:
            key = _source(fn, args, dict(kw), target)[2]
            if key in seen:
                continue
            seen.add(key)
            lines.append(fmt(compile_launch(fn, args, kw, target), label))
            print(lines[-1], flush=True)
    return lines


# ----------------------------------------------------------------------------- variants
def _dt(name):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _randn(*shape, dtype):
    import torch

    return torch.randn(*shape).to(dtype)


# name: (causal offset or None, bias, bias grad, softcap, Hkv) on B=2, Hq=4
DENSE_FLAGS = {
    "plain": (None, False, False, 0.0, 4),
    "causal": (0, False, False, 0.0, 4),
    "bias": (None, True, False, 0.0, 4),
    "causal-bias-grad": (0, True, True, 0.0, 4),
    "softcap": (None, False, False, 2.0, 4),
    "causal-softcap-bias-grad": (0, True, True, 2.0, 4),
    "gqa": (None, False, False, 0.0, 2),
    "gqa-causal-bias-grad": (0, True, True, 0.0, 1),
}


def dense_variants(full: bool):
    """Dense fwd + bwd. Full: every dtype x head dim {64, 128, ragged 80 / L 200} x flag set, each with
    the heuristic config, plus every pruned GPU candidate on the heaviest and the lightest flags.
    Quick: bf16 D=128 heaviest flags, heuristic config."""
    from attncomp.strategies.dense import launcher as triton_dense
    from attncomp.templates.dense import configs as dense_configs

    def thunk(dtype, D, L, flags, cfg):
        def run():
            causal, has_bias, bias_grad, softcap, hkv = flags
            dt = _dt(dtype)
            q, dout = _randn(2, 4, L, D, dtype=dt), _randn(2, 4, L, D, dtype=dt)
            k, v = _randn(2, hkv, L, D, dtype=dt), _randn(2, hkv, L, D, dtype=dt)
            bias = _randn(1, 4, L, L, dtype=_dt("fp32")) if has_bias else None
            out, lse = triton_dense.dense_fwd(q, k, v, bias, D ** -0.5, causal, softcap, config=cfg)
            triton_dense.dense_bwd(dout, q, k, v, bias, out, lse, D ** -0.5, causal, softcap, bias_grad, config=cfg)
        return run

    dtypes, shapes = (("fp16", "bf16", "fp32"), ((64, 256), (128, 256), (80, 200))) if full else \
        (("bf16",), ((128, 256),))
    for dtype, (D, L) in itertools.product(dtypes, shapes):
        default = triton_dense.default_config(D, _dt(dtype), interpret=False)
        names = DENSE_FLAGS if full else ("causal-softcap-bias-grad",)
        for name in names:
            yield f"dense {dtype} D{D} L{L} {name} default", thunk(dtype, D, L, DENSE_FLAGS[name], default)
        if not full or L != 256:
            continue
        for cfg in dense_configs.candidates(head_dim=D, dtype=str(_dt(dtype)).removeprefix("torch."), Lq=L, Lk=L,
                                            interpret=False, smem_limit=SM90_SHARED):
            for name in ("plain", "causal-softcap-bias-grad"):
                yield (f"dense {dtype} D{D} {name} {dense_configs.fmt(cfg)}",
                       thunk(dtype, D, L, DENSE_FLAGS[name], cfg))


def sparse_variants(full: bool):
    """Sparse fwd + bwd on the GPU tile sizes ``sparse_configs.candidates`` keeps and the CUDA default
    (launch options from the launcher's heuristic). Full: every such tile x dtype x head dim {64, 128} x
    (mask, keep, bias, softcap) set and every mask of test_triton_sparse; quick: fp16 D=128, one tile,
    window + keep + bias + softcap."""
    import torch
    from test_sparse_triton import MASKS, Case, make_inputs

    from attncomp import ir
    from attncomp.masks import blocks
    from attncomp.ops import default_blocks
    from attncomp.strategies.sparse import launcher as triton_sparse
    from attncomp.templates.sparse import configs as sparse_configs

    def thunk(c: Case):
        def run():
            q, k, v, dout, bias, keep = make_inputs(c)
            table = blocks.block_table(c.expr, keep, c.Lq, c.lk, *c.blocks, q.device)
            out, lse = triton_sparse.sparse_fwd(q, k, v, bias, keep, table, 0.1, c.softcap, c.expr)
            triton_sparse.sparse_bwd(dout, q, k, v, bias, keep, out, lse, table, 0.1, c.softcap, c.expr, c.bias_grad)
        return run

    if not full:
        c = Case(B=2, Hq=4, Hkv=2, Lq=256, D=128, dtype=torch.float16, mask=ir.Window(33, 17), keep="tiles",
                 bias="head", bias_grad=True, softcap=2.0, blocks=(64, 64))
        yield f"sparse {c.id}", thunk(c)
        return
    sets = [dict(mask=m, keep=kp, bias=b, bias_grad=bool(b), softcap=sc)
            for m in (None, ir.Window(33, 17)) for kp in ("", "tiles") for b in ("", "head") for sc in (0.0, 2.0)]
    for dt, D in itertools.product((torch.float16, torch.bfloat16, torch.float32), (64, 128)):
        name = str(dt).removeprefix("torch.")
        tiles = {default_blocks(D, dt, torch.device("cuda"))} | {
            (c["BLOCK_M"], c["BLOCK_N"]) for c in sparse_configs.candidates("cuda", True, False, 256, 256, D, name)}
        for bm, bn in sorted(tiles):
            for kw in sets:
                c = Case(B=2, Hq=4, Hkv=2, Lq=256, D=D, dtype=dt, blocks=(bm, bn), **kw)
                yield f"sparse {c.id}", thunk(c)
    for m in MASKS:  # every mask predicate the interpreter tests render
        c = Case(Lq=256, D=64, dtype=torch.float16, mask=m, blocks=(128, 64))
        yield f"sparse {c.id}", thunk(c)


def linear_variants(full: bool):
    """Linear fwd and the backward's launches (three identity-feature scans in f32, the last dims
    E + 1 when normalised, then the feature-map gradient). Full: every chunk tile {16..128} x head dim
    {64, 128} x (causal, decay, feature map, normalize) x input dtype; quick: D=128, chunk 64, causal,
    decay, elu1, normalize, bf16."""
    import torch

    from attncomp.strategies.linear import launcher as triton_linear

    def thunk(dtype, D, chunk, causal, decay, fmap, normalize):
        def run():
            dt, f32, L, H = _dt(dtype), torch.float32, 256, 4
            q, k, v = (_randn(2, H, L, D, dtype=dt) for _ in range(3))
            lam = torch.full((H,), 0.9) if decay else None
            triton_linear.linear_fwd(q, k, v, lam, fmap, causal, normalize, chunk, 1e-6)
            E = D + 1 if normalize else D  # v' = [v, 1], g' = [g / den, -(g . out) / den]
            g, va, fq = _randn(2, H, L, E, dtype=f32), _randn(2, H, L, E, dtype=f32), _randn(2, H, L, D, dtype=f32)
            triton_linear.linear_fwd(g, va, fq, lam, "identity", causal, False, chunk, 1e-6)  # dφq
            triton_linear.linear_fwd(fq, fq, g, lam, "identity", causal, False, chunk, 1e-6)  # dv'
            triton_linear.feature_grad(q, _randn(2, H, L, D, dtype=f32), fmap)
        return run

    if not full:
        yield "linear bf16 D128 C64 causal decay elu1 normalize", thunk("bf16", 128, 64, True, True, "elu1", True)
        return
    forms = [(c, d, f, n) for c in (False, True) for d in ((False, True) if c else (False,))
             for f in ("elu1", "relu", "identity") for n in (False, True)]
    for dtype, D, chunk in itertools.product(("fp16", "bf16", "fp32"), (64, 128), (16, 32, 64, 128)):
        for causal, decay, fmap, normalize in forms:
            label = (f"linear {dtype} D{D} C{chunk} {'causal' if causal else 'full'}{' decay' if decay else ''} "
                     f"{fmap}{' normalize' if normalize else ''}")
            yield label, thunk(dtype, D, chunk, causal, decay, fmap, normalize)


# name: (L1, L2, causal, w1, w2)
TENSOR_FORMS = {
    "full": (128, 128, False, 128, 128),
    "causal": (256, 256, True, 256, 256),
    "window": (256, 256, True, 16, 48),
    "L1!=L2": (96, 160, False, 96, 160),
    "short-l": (128, 20, False, 128, 20),  # BLOCK_L 32
    "tiny-l": (128, 9, False, 128, 9),  # BLOCK_L 16
}


def tensor_variants(full: bool):
    """Tensor (2-simplicial) fwd + bwd (dq; dk/dv launched for both key sets). Full: fp16 / bf16 / fp32 x
    head dim {64, 128} x every form of TENSOR_FORMS; quick: bf16 D=128 windowed."""
    from attncomp.strategies.tensor import launcher as triton_tensor

    def thunk(dtype, D, form):
        def run():
            L1, L2, causal, w1, w2 = form
            dt, Lq = _dt(dtype), (L1 if causal else 256)
            q, dout = _randn(2, 4, Lq, D, dtype=dt), _randn(2, 4, Lq, D, dtype=dt)
            k1, v1 = _randn(2, 4, L1, D, dtype=dt), _randn(2, 4, L1, D, dtype=dt)
            k2, v2 = _randn(2, 4, L2, D, dtype=dt), _randn(2, 4, L2, D, dtype=dt)
            out, lse = triton_tensor.tensor_fwd(q, k1, k2, v1, v2, D ** -0.5, causal, w1, w2)
            triton_tensor.tensor_bwd(dout, q, k1, k2, v1, v2, out, lse.float(), D ** -0.5, causal, w1, w2)
        return run

    if not full:
        yield "tensor bf16 D128 window", thunk("bf16", 128, TENSOR_FORMS["window"])
        return
    for dtype, D, name in itertools.product(("fp16", "bf16", "fp32"), (64, 128), TENSOR_FORMS):
        yield f"tensor {dtype} D{D} {name}", thunk(dtype, D, TENSOR_FORMS[name])


VARIANTS = {"dense": dense_variants, "sparse": sparse_variants, "linear": linear_variants,
            "tensor": tensor_variants}


# ----------------------------------------------------------------------------- tests
def _run_compile(tmp_path, *argv: str, timeout: int, tensor_spill: int = 0) -> str:
    env = {**os.environ, "TRITON_INTERPRET": "0", "ATTNCOMP_POISON": "0", "ATTNCOMP_AUTOTUNE": "0",
           "ATTNCOMP_CACHE_DIR": str(tmp_path / "kernels"), "TRITON_CACHE_DIR": str(tmp_path / "triton")}
    res = subprocess.run([sys.executable, __file__, *argv], env=env, capture_output=True, text=True,
                         timeout=timeout, cwd=Path(__file__).parent)
    out = res.stdout
    assert res.returncode == 0 and "FAIL" not in out, out[-6000:] + res.stderr[-4000:]
    compiled = re.search(r"(\d+) of (\d+) kernels compiled", out)
    assert compiled and int(compiled.group(1)) == int(compiled.group(2)) > 0, out[-2000:]
    # The tensor kernels' tiles are chosen per head dim and dtype so that ptxas spills nothing, or next
    # to nothing (``tensor_spill`` bytes: a few f32 / short-sequence tilings keep 8-80 B).
    spilled = [line for line in out.splitlines()
               if (m := re.search(r" tensor_\w+ .* spill=(\d+)", line)) and int(m.group(1)) > tensor_spill]
    assert not spilled, "\n".join(spilled)
    return out


def test_quick_subset_compiles_for_sm90(tmp_path):
    """One demanding variant per kernel family (every kernel of it: fwd, bwd preprocess / dq / dkdv)."""
    out = _run_compile(tmp_path, timeout=600)
    for kernel in ("attn_fwd", "attn_bwd_dq", "attn_bwd_dkdv", "attn_bwd_preprocess", "linear_fwd", "feature_grad",
                   "tensor_fwd", "tensor_bwd_dq", "tensor_bwd_dkdv"):
        assert re.search(rf"^ok .* {kernel} ", out, re.M), f"{kernel} was not compiled:\n{out[-3000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_every_variant_compiles_for_sm90(tmp_path, family):
    """Offline compile (no GPU) of every kernel variant of a family for sm_90: catches constructs the
    interpreter accepts and the compiler does not, and configs that do not fit an sm_90 block."""
    _run_compile(tmp_path, "--full", "--family", family, timeout=3600, tensor_spill=128)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="the whole sweep (default: the quick subset)")
    parser.add_argument("--family", action="append", choices=FAMILIES, help="kernel families (default: all)")
    parser.add_argument("--match", default="", help="only variants whose label contains this")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).parent))
    sys.path.insert(0, str(Path(__file__).parent / "strategies"))
    variants = [(label, thunk) for fam in (args.family or FAMILIES) for label, thunk in VARIANTS[fam](args.full)
                if args.match in label]
    t0 = time.perf_counter()
    report = compile_variants_sm90(variants)
    ok = sum(r.startswith("ok") for r in report)
    print(f"{ok} of {len(report)} kernels compiled for sm_90 in {time.perf_counter() - t0:.0f} s")
    return int(ok != len(report))


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "0")
    os.environ.setdefault("ATTNCOMP_AUTOTUNE", "0")
    raise SystemExit(main())
