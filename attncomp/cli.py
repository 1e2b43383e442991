"""The ``attncomp`` command line (also ``python -m attncomp``).

    attncomp tune    --model pkg.module:factory --shapes "B=1,L=512..8192" --out cache.json
    attncomp inspect --model pkg.module:factory [--shapes "B=1,L=128"] [--cache cache.json]
    attncomp bench   [--suite cpu|gpu] [-- suite arguments]

``--model`` names a factory (``pkg.module:fn`` or ``path/to/file.py:fn``) that takes no arguments
and returns a module, or ``(module, make_inputs)`` with ``make_inputs(B, L)`` giving the positional
inputs; without it, transformers models get random ``input_ids`` of shape ``(B, L)``.

``tune`` and shape points the model rejects: a point whose inputs the model itself (eager, without
attncomp) cannot run — e.g. a length beyond its position table — is reported in one line on stderr
and skipped; the other points are tuned and ``--out`` is written with them. The exit status is 1
only when the model rejected every point (nothing was run), else 0. A point the model runs but the
optimized model fails on is attncomp's error: it is raised with its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import time
from pathlib import Path

SHAPES_HELP = ('comma-separated KEY=VALUES for B (batch) and L (sequence length); VALUES is one number, '
               'A..B (every power of two from A to B: one per shape bucket) or A|B|C. Example: "B=1,L=512..8192"')


# --------------------------------------------------------------------------------------- helpers
def parse_shapes(text: str) -> list[dict[str, int]]:
    """``"B=1,L=16..64"`` → ``[{"B": 1, "L": 16}, {"B": 1, "L": 32}, {"B": 1, "L": 64}]``."""
    axes: dict[str, list[int]] = {"B": [1], "L": [128]}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, values = part.partition("=")
        key = key.strip()
        if not sep or key not in axes:
            raise argparse.ArgumentTypeError(f"bad shape item {part!r}: expected B=... or L=... ({SHAPES_HELP})")
        try:
            if ".." in values:
                lo, hi = (int(x) for x in values.split(".."))
                if lo < 1 or hi < lo:
                    raise ValueError
                out, p = [], lo
                while p <= hi:
                    out.append(p)
                    p = 1 << p.bit_length() if p & (p - 1) else p * 2  # next power of two
                axes[key] = out
            else:
                axes[key] = [int(x) for x in values.split("|")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad values in {part!r} ({SHAPES_HELP})") from None
        if any(v < 1 for v in axes[key]):
            raise argparse.ArgumentTypeError(f"sizes must be >= 1 in {part!r}")
    return [{"B": b, "L": n} for b in axes["B"] for n in axes["L"]]


def load_factory(spec: str):
    """Import ``pkg.module:factory`` or ``path/to/file.py:factory`` and return the callable."""
    mod_name, sep, attr = spec.rpartition(":")
    if not sep or not mod_name or not attr:
        raise SystemExit(f"--model must look like pkg.module:factory or path/file.py:factory, got {spec!r}")
    if mod_name.endswith(".py") or os.path.sep in mod_name:
        path = Path(mod_name).resolve()
        if not path.is_file():
            raise SystemExit(f"--model: no such file {path}")
        mspec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(module)
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # like `python -m`: modules in the working directory
        try:
            module = importlib.import_module(mod_name)
        except ImportError as e:
            raise SystemExit(f"--model: cannot import {mod_name!r}: {e}") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise SystemExit(f"--model: {mod_name} has no callable {attr!r}")
    return fn


def build(spec: str):
    """``(model, make_inputs)`` from a factory spec; the model is put in eval mode."""
    made = load_factory(spec)()
    model, make_inputs = made if isinstance(made, tuple) else (made, None)
    if make_inputs is None:
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if vocab is None:
            raise SystemExit(f"--model {spec}: the factory returned no make_inputs(B, L) and the model has no "
                             "config.vocab_size to make input_ids from; return (model, make_inputs)")

        def make_inputs(B, L):
            import torch

            return (torch.randint(0, vocab, (B, L)),)
    return model.eval(), make_inputs


def _first_tensor(out):
    import torch

    if isinstance(out, torch.Tensor):
        return out
    values = out.values() if isinstance(out, dict) else out
    for v in values:
        t = _first_tensor(v)
        if t is not None:
            return t
    return None


def _to(inputs: tuple, device: str) -> tuple:
    return tuple(x.to(device) if hasattr(x, "to") else x for x in inputs)


def _bar(i: int, n: int, label: str, t0: float) -> None:
    width = 24
    done = int(width * i / max(n, 1))
    line = f"[{'#' * done}{'.' * (width - done)}] {i}/{n} {label}  {time.perf_counter() - t0:.1f} s"
    end = "\r" if sys.stderr.isatty() and i < n else "\n"
    print(line, end=end, file=sys.stderr, flush=True)


def _ensure_interpreter(args: argparse.Namespace) -> None:
    """``--kernels triton`` on a machine without CUDA runs Triton's interpreter, which must be chosen
    before triton is imported: re-run this command with ``TRITON_INTERPRET=1`` in the environment."""
    if args.kernels != "triton" or os.environ.get("TRITON_INTERPRET") == "1":
        return
    import torch

    if args.device == "cuda" or (args.device is None and torch.cuda.is_available()):
        return
    print("attncomp: re-running with TRITON_INTERPRET=1 (Triton kernels on CPU run in Triton's interpreter, "
          "which must be chosen before triton is imported)", file=sys.stderr)
    sys.stdout.flush()
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    os.execve(sys.executable, [sys.executable, "-m", "attncomp", *sys.argv[1:]], env)


def _setup(args: argparse.Namespace):
    import torch

    import attncomp

    _ensure_interpreter(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    attncomp.set_kernels(None if args.kernels == "auto" else args.kernels)
    model, make_inputs = build(args.model)
    return torch, attncomp, model.to(device), make_inputs, device


# --------------------------------------------------------------------------------------- commands
def _run(torch, model, inputs: tuple, backward: bool) -> None:
    if backward:
        _first_tensor(model(*inputs)).float().sum().backward()
    else:
        with torch.no_grad():
            model(*inputs)


def _eager_error(torch, model, inputs: tuple, backward: bool) -> str | None:
    """``"IndexError: index out of range in self"`` when the model itself (eager, no attncomp) rejects
    ``inputs``; ``None`` when it runs them. Only the first line of the message is kept."""
    try:
        _run(torch, model, inputs, backward)
    except Exception as e:
        lines = str(e).strip().splitlines()
        return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
    return None


def cmd_tune(args: argparse.Namespace) -> int:
    """Capture the model, run every shape point with autotuning on, write the cache to --out."""
    out = Path(args.out).expanduser().resolve()
    os.environ["ATTNCOMP_AUTOTUNE_CACHE"] = str(out)        # tuned entries are merged into --out
    os.environ["ATTNCOMP_AUTOTUNE"] = "force" if args.force else "1"
    os.environ.setdefault("ATTNCOMP_AUTOTUNE_REPS", str(args.reps))
    torch, attncomp, model, make_inputs, device = _setup(args)
    from attncomp.runtime import autotune

    points = parse_shapes(args.shapes)
    print(f"attncomp tune: {args.model} on {device} ({autotune.device_info(device)['name']}), "
          f"{len(points)} shape points, kernels={args.kernels}, cache {out}", file=sys.stderr)
    before = dict(autotune.STATS)
    t0 = time.perf_counter()
    # Each point runs twice: in one model that Dynamo recompiles with dynamic sizes after the first
    # point (what a long-running process sees), and in a fresh capture specialised to the point (what
    # a process whose first call has this shape sees): plans may differ between the two (a mask
    # proved from static sizes), and each plan's kernels need their own entries.
    fast = attncomp.optimize(model, capture=args.capture)
    rejected = 0
    for i, pt in enumerate(points):
        _bar(i, len(points), f"B={pt['B']} L={pt['L']}", t0)
        inputs = _to(make_inputs(pt["B"], pt["L"]), device)
        try:
            _run(torch, fast, inputs, args.backward)
            if i > 0:
                with torch._dynamo.config.patch(automatic_dynamic_shapes=False):  # a capture with static sizes
                    _run(torch, attncomp.optimize(model, capture=args.capture), inputs, args.backward)
        except Exception:
            why = _eager_error(torch, model, inputs, args.backward)
            if why is None:
                raise  # the model itself runs this point: the failure is attncomp's, and its traceback says where
            rejected += 1
            # One line, then the next point: a model that takes only some of the lengths asked for
            # (a position table shorter than L) still gets the others tuned.
            newline = "\n" if sys.stderr.isatty() else ""  # ends the progress bar's line ("\r" on a terminal)
            print(f"{newline}attncomp tune: skipped B={pt['B']} L={pt['L']}: {args.model} rejects it ({why})",
                  file=sys.stderr, flush=True)
    _bar(len(points), len(points), "done", t0)
    autotune.ensure_file(out)  # tuned entries are already in it; nothing tuned still leaves a valid cache
    if rejected == len(points):
        print(f"attncomp tune: {args.model} rejected every shape point, so nothing ran and nothing was added "
              f"to {out}", file=sys.stderr)
        return 1
    if rejected:
        print(f"attncomp tune: {rejected} of {len(points)} shape points skipped (the model rejects them, see "
              "above); the others were run and tuned", file=sys.stderr)
    report = attncomp.explain(fast)
    tuned = autotune.STATS["tuned"] - before["tuned"]
    failed = autotune.STATS["failed"] - before["failed"]
    print(report)
    print(f"\n{tuned} kernels tuned ({autotune.STATS['candidates'] - before['candidates']} candidates timed, "
          f"{failed} failed), {autotune.STATS['hit'] - before['hit']} answered from the cache, "
          f"in {time.perf_counter() - t0:.1f} s")
    if not report.replaced:
        print("no attention site was replaced, so nothing was tuned (see the reasons above)")
    elif tuned == 0 and autotune.STATS["hit"] == before["hit"]:
        print(f"nothing to tune: the kernels that ran on {device} have no knobs (the dense CPU executor is "
              "torch's fused kernel); use --kernels triton to tune the Triton kernels")
    print(f"cache: {out} ({len(autotune.entries(device))} entries for this device)")
    return 0


def _cache_table(entries: list[dict]) -> str:
    rows = [("kernel", "signature", "bucket", "config", "ms", "tune s", "failed candidates")]
    for e in sorted(entries, key=lambda e: (e["kernel"], sorted(e["bucket"].items()))):
        fails = [f"{' '.join(f'{k}={v}' for k, v in c['config'].items())}: {c['error']}"
                 for c in e.get("candidates", []) if c.get("error")]
        rows.append((e["kernel"], " ".join(f"{k}={v}" for k, v in e["signature"].items()),
                     " ".join(f"{k}={v}" for k, v in e["bucket"].items()),
                     " ".join(f"{k}={v}" for k, v in e["config"].items()),
                     "-" if e.get("ms") is None else f"{e['ms']:.3f}", f"{e.get('tune_s', 0):.2f}",
                     "; ".join(fails) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * len(rows[0][-1]))
    return "\n".join(lines)


def cmd_inspect(args: argparse.Namespace) -> int:
    """Capture and plan the model on one shape point and print the explain table."""
    os.environ["ATTNCOMP_AUTOTUNE"] = "0"  # inspecting never tunes (heuristic configs)
    torch, attncomp, model, make_inputs, device = _setup(args)
    from attncomp.runtime import autotune

    pt = parse_shapes(args.shapes)[0]
    with torch.no_grad():
        fast = attncomp.optimize(model, example_inputs=_to(make_inputs(pt["B"], pt["L"]), device),
                                 capture=args.capture)
    print(f"{args.model} on {device}, B={pt['B']} L={pt['L']}\n")
    print(attncomp.explain(fast))
    if args.cache:
        n = attncomp.load_cache(args.cache)
        mine = autotune.entries(device)
        print(f"\nautotune cache {args.cache}: {n} entries, {len(mine)} for this device "
              f"({autotune.device_info(device)['name']})")
        if mine:
            print(_cache_table(mine))
    return 0


def cmd_bench(args: argparse.Namespace, rest: list[str]) -> int:
    """Run a benchmark suite script from the source checkout's ``benchmarks/``."""
    import subprocess

    root = Path(__file__).resolve().parent.parent / "benchmarks"
    script = root / f"{args.suite}_suite.py"
    if not script.is_file():
        raise SystemExit(f"attncomp bench: {script} not found (the suites live in a source checkout's "
                         "benchmarks/ folder)")
    return subprocess.call([sys.executable, str(script), *rest])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attncomp", description="attncomp: an attention compiler for PyTorch.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{tune,inspect,bench}")

    def model_args(sp, shapes_default):
        sp.add_argument("--model", required=True, metavar="MODULE:FACTORY",
                        help="factory returning a module or (module, make_inputs(B, L)): pkg.module:fn or file.py:fn")
        sp.add_argument("--shapes", default=shapes_default, help=SHAPES_HELP + f" (default {shapes_default!r})")
        sp.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
        sp.add_argument("--kernels", choices=("auto", "triton", "torch"), default="auto",
                        help="auto: Triton on CUDA, torch executor on CPU; triton: Triton everywhere (CPU runs "
                             "Triton's interpreter); torch: torch executor everywhere")
        sp.add_argument("--capture", choices=("dynamo", "modules"), default="dynamo",
                        help="dynamo: Dynamo on the whole model (masks built anywhere in it are proved); "
                             "modules: Dynamo on each module that owns attention, alike layers traced once "
                             "(faster to capture; masks built outside those modules stay run-time tensors)")

    t = sub.add_parser("tune", help="tune every kernel of a model over shape buckets; write a cache file",
                       description="Capture the model, plan every attention site, run it at every shape point "
                                   "with autotuning on (one tuning per kernel and shape bucket) and write the "
                                   "results to --out (merged into it if it exists). Ship the file and load it with "
                                   "attncomp.load_cache(path) or ATTNCOMP_AUTOTUNE_LOAD=path. A shape point the model "
                                   "itself rejects (e.g. L beyond its position table) is reported in one line and "
                                   "skipped; exit status 1 only when the model rejected every point.")
    model_args(t, "B=1,L=512..8192")
    t.add_argument("--out", required=True, help="cache file to write (JSON)")
    t.add_argument("--force", action="store_true", help="re-tune keys already in --out")
    t.add_argument("--backward", action="store_true", help="also tune the backward kernels (runs a backward pass)")
    t.add_argument("--reps", type=int, default=3, help="timed repetitions per candidate on CPU (default 3)")

    i = sub.add_parser("inspect", help="print the explain table of a model (what is replaced, and why)",
                       description="Capture and plan the model on the first shape point and print every attention "
                                   "site: found / replaced / left, and why. With --cache, also the tuned configs "
                                   "(and failed candidates with their errors) for this device.")
    model_args(i, "B=1,L=128")
    i.add_argument("--cache", help="an autotune cache file to show")

    b = sub.add_parser("bench", help="run a benchmark suite (benchmarks/<suite>_suite.py)",
                       description="Run benchmarks/<suite>_suite.py; arguments after the options are passed "
                                   "to the suite (e.g. attncomp bench --suite cpu --quick).")
    b.add_argument("--suite", choices=("cpu", "gpu"), default="cpu")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``attncomp`` console script."""
    p = parser()
    args, rest = p.parse_known_args(argv)
    if args.command == "bench":
        return cmd_bench(args, rest)
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    return cmd_tune(args) if args.command == "tune" else cmd_inspect(args)


if __name__ == "__main__":
    sys.exit(main())
