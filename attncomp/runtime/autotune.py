"""Autotuning with an offline, shippable JSON cache.

One generic entry point, :func:`choose`, that any kernel launcher or executor calls to get its
config (a plain dict of knobs)::

    cfg = autotune.choose(
        "dense_fwd",                                   # kernel name
        {"strategy": "dense", "mask": "causal", "dtype": "float16", "D": 64, "gqa": 1},
        autotune.bucket(Lq=Lq, Lk=Lk, BH=B * H),       # shape bucket: sizes rounded up to powers of two
        candidates,                                    # list of config dicts (already pruned)
        lambda cfg: run_kernel(..., config=cfg),       # runs the kernel once with cfg (return ignored)
        default,                                       # heuristic config (ATTNCOMP_AUTOTUNE=0, or all failed)
        device=q.device, version=codegen.source_hash("dense_fwd.py.j2"))

What happens, by ``ATTNCOMP_AUTOTUNE`` (read on every call):

* ``0`` — return ``default``; the cache is neither read nor written (``STATS["heuristic"]``).
* ``1`` (default) — a cached entry for this key is returned (``STATS["hit"]``); otherwise every
  candidate is timed, the fastest is stored in memory and in the JSON cache, and returned
  (``STATS["tuned"]``).
* ``force`` — like ``1``, but each key is re-tuned once per process even when cached.

Timing: on CUDA ``triton.testing.do_bench`` (median); elsewhere the median wall-clock time of
``ATTNCOMP_AUTOTUNE_REPS`` calls (default 3) after one warm-up call. A candidate that raises is
recorded with its error text and scores infinity (``STATS["failed"]``); if every candidate fails,
``default`` is used and recorded. ``bench`` must not keep state between calls that changes results.

The key is (device name and capability, triton and torch versions, kernel, ``version`` (e.g. the
template's hash), ``signature``, ``shape_bucket``): a cache tuned on another GPU, another release or
an edited template is simply never matched. Signature and bucket values must be str / int / float
/ bool. A CPU executor passes ``device="cpu"`` and its own knobs (say ``{"chunk": 64}``) as
candidates; the same rules apply.

The cache file is ``$ATTNCOMP_AUTOTUNE_CACHE`` (default ``~/.cache/attncomp/autotune.json``),
read on first use and merged into on every tuning (under a file lock, written atomically, so
concurrent processes lose nothing). Read-only caches — e.g. one shipped with a model, made by
``attncomp tune`` — are added with :func:`load_cache` or ``ATTNCOMP_AUTOTUNE_LOAD`` (paths separated
by ``os.pathsep``). A corrupt or foreign file is reported once (a ``RuntimeWarning``) and ignored.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from functools import cache
from pathlib import Path

__all__ = ["FAILURES", "STATS", "bucket", "cache_path", "choose", "device_info", "ensure_file", "entries",
           "load_cache", "mode", "reset"]

FORMAT, FORMAT_VERSION = "attncomp-autotune", 1
MODES = ("0", "1", "force")

# Counters so tests (and users) can assert what happened: cache hits, kernels tuned, candidates
# timed, candidates that failed, heuristic answers (mode 0), cache file writes.
STATS: dict[str, int] = {"hit": 0, "tuned": 0, "candidates": 0, "failed": 0, "heuristic": 0, "writes": 0}
# Candidates that failed in this process's tunings (``explain`` lists them): kernel, signature,
# bucket, config, error.
FAILURES: list[dict] = []

_LOCK = threading.RLock()
_MAIN: dict[tuple, dict] = {}      # entries of the main cache file + entries tuned in this process
_SHIPPED: dict[tuple, dict] = {}   # entries from load_cache / ATTNCOMP_AUTOTUNE_LOAD (read-only)
_STATE: dict[str, object] = {"path": None, "load_env": None}
_FORCED: set[tuple] = set()        # keys re-tuned in this process under ATTNCOMP_AUTOTUNE=force
_REPORTED: set[str] = set()


# --------------------------------------------------------------------------------------- settings
def mode() -> str:
    """``ATTNCOMP_AUTOTUNE``: ``"0"``, ``"1"`` (default) or ``"force"``; anything else raises."""
    value = os.environ.get("ATTNCOMP_AUTOTUNE", "1").strip().lower()
    if value not in MODES:
        raise ValueError(f"ATTNCOMP_AUTOTUNE must be one of {MODES}, got {value!r}")
    return value


def cache_path() -> Path:
    """The writable cache file: ``$ATTNCOMP_AUTOTUNE_CACHE`` or ``~/.cache/attncomp/autotune.json``."""
    return Path(os.environ.get("ATTNCOMP_AUTOTUNE_CACHE") or "~/.cache/attncomp/autotune.json").expanduser()


def _reps() -> int:
    return max(1, int(os.environ.get("ATTNCOMP_AUTOTUNE_REPS", "3")))


def _progress(msg: str) -> None:
    if os.environ.get("ATTNCOMP_AUTOTUNE_QUIET", "0") != "1":
        print(f"attncomp autotune: {msg}", file=sys.stderr, flush=True)


def _report_once(tag: str, msg: str) -> None:
    if tag not in _REPORTED:
        _REPORTED.add(tag)
        warnings.warn(f"attncomp autotune: {msg}", RuntimeWarning, stacklevel=3)


# --------------------------------------------------------------------------------------- keys
def bucket(**sizes: int) -> dict[str, int]:
    """Shape bucket: each size rounded up to a power of two (``bucket(L=300, BH=24)`` →
    ``{"L": 512, "BH": 32}``). Sizes within one bucket share a tuned config."""
    return {k: 1 << max(int(v) - 1, 0).bit_length() for k, v in sizes.items()}


@cache
def _device_info(kind: str, index: int | None) -> tuple[tuple[str, str], ...]:
    import platform

    import torch

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    if kind == "cuda":
        idx = torch.cuda.current_device() if index is None else index
        name = torch.cuda.get_device_name(idx)
        capability = "sm_{}{}".format(*torch.cuda.get_device_capability(idx))
    else:
        name = f"{kind} {platform.machine()}"
        capability = torch.backends.cpu.get_cpu_capability() if kind == "cpu" else "-"
    return (("name", name), ("capability", capability), ("triton", triton_version), ("torch", torch.__version__))


def device_info(device=None) -> dict[str, str]:
    """Device name, capability and triton / torch versions: the device part of every key.

    ``device``: a ``torch.device``, a string (``"cuda:0"``) or ``None`` (CPU)."""
    import torch

    dev = torch.device(device if device is not None else "cpu")
    return dict(_device_info(dev.type, dev.index))


def _canon(d: dict, what: str) -> tuple:
    for k, v in d.items():
        if not isinstance(v, (str, int, float, bool)) or isinstance(v, float) and not math.isfinite(v):
            raise TypeError(f"autotune {what} values must be str, int, float or bool; {k}={v!r}")
    return tuple(sorted(d.items()))


def _key(device: dict, kernel: str, version: str, signature: dict, shape_bucket: dict) -> tuple:
    return (_canon(device, "device"), kernel, version, _canon(signature, "signature"),
            _canon(shape_bucket, "shape bucket"))


# --------------------------------------------------------------------------------------- files
def _parse(path: Path) -> dict[tuple, dict] | None:
    """Entries of a cache file by key, or None (reported once) when it is corrupt or foreign."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        _report_once(f"corrupt:{path}", f"ignoring cache file {path}: not readable JSON ({e})")
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), list):
        _report_once(f"foreign:{path}", f"ignoring cache file {path}: not an attncomp autotune cache "
                                        f"(expected format={FORMAT!r} with a list of entries)")
        return None
    if data.get("version") != FORMAT_VERSION:
        _report_once(f"foreign:{path}", f"ignoring cache file {path}: format version {data.get('version')!r}, "
                                        f"this attncomp reads version {FORMAT_VERSION}")
        return None
    out, bad = {}, 0
    for e in data["entries"]:
        try:
            key = _key(e["device"], e["kernel"], e["version"], e["signature"], e["bucket"])
            if not isinstance(e["config"], dict):
                raise TypeError("config is not a dict")
            out[key] = e
        except (KeyError, TypeError, AttributeError):
            bad += 1
    if bad:
        _report_once(f"entries:{path}", f"{path}: skipped {bad} malformed entries")
    return out


def _write(path: Path, entries: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"format": FORMAT, "version": FORMAT_VERSION, "entries": entries}, indent=1, sort_keys=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _persist(path: Path, key: tuple, entry: dict) -> None:
    """Merge one entry into the file under a lock: read the latest file, add, write atomically."""
    from filelock import FileLock, Timeout

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock", timeout=60):
            current: dict[tuple, dict] = {}
            if path.exists():
                parsed = _parse(path)
                if parsed is None and _is_foreign(path):
                    _report_once(f"nowrite:{path}", f"not writing to {path}: it is not an attncomp cache")
                    return
                current = parsed or {}  # a corrupt file holds nothing readable: it is replaced
            current[key] = entry
            _write(path, list(current.values()))
            _MAIN.update(current)
            STATS["writes"] += 1
    except (OSError, Timeout) as e:
        _report_once(f"write:{path}", f"cannot write cache file {path} ({e}); keeping results in memory")


def ensure_file(path: str | os.PathLike) -> None:
    """Create ``path`` as a valid cache with no entries when it does not exist yet; an existing file is
    left as it is. ``attncomp tune`` always leaves its ``--out`` this way, also when nothing needed
    tuning (tuned entries are merged into the file as they are found). A path that cannot be written
    is reported once, like every cache write, and not raised."""
    from filelock import FileLock, Timeout

    p = Path(path).expanduser()
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(p) + ".lock", timeout=60):
            if not p.exists():
                _write(p, [])
    except (OSError, Timeout) as e:
        _report_once(f"write:{p}", f"cannot write cache file {p} ({e})")


def _is_foreign(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return not (isinstance(data, dict) and data.get("format") == FORMAT)


def _ensure_loaded() -> None:
    """(Re)read the main cache when ``$ATTNCOMP_AUTOTUNE_CACHE`` changed, and the env's shipped caches."""
    path = cache_path()
    if _STATE["path"] != path:
        _MAIN.clear()
        _FORCED.clear()
        _STATE["path"] = path
        if path.exists():
            _MAIN.update(_parse(path) or {})
    load_env = os.environ.get("ATTNCOMP_AUTOTUNE_LOAD", "")
    if _STATE["load_env"] != load_env:
        _STATE["load_env"] = load_env
        for p in filter(None, load_env.split(os.pathsep)):
            if Path(p).expanduser().exists():
                load_cache(p)
            else:
                _report_once(f"missing:{p}", f"ATTNCOMP_AUTOTUNE_LOAD names {p}, which does not exist")


def load_cache(path: str | os.PathLike) -> int:
    """Add a (shipped, read-only) autotune cache; returns the number of entries read.

    Entries tuned on another device, triton / torch release or template version are kept but never
    match. A corrupt or foreign file is reported once and adds nothing; a missing file raises
    ``FileNotFoundError``."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"attncomp.load_cache: no such file {p}")
    parsed = _parse(p) or {}
    with _LOCK:
        _SHIPPED.update(parsed)
    return len(parsed)


def entries(device=None) -> list[dict]:
    """Every cached entry known to this process (main cache, tuned here, shipped); with ``device``,
    only those that match it."""
    with _LOCK:
        _ensure_loaded()
        merged = {**_SHIPPED, **_MAIN}
    if device is None:
        return list(merged.values())
    dev = device_info(device)
    return [e for e in merged.values() if e["device"] == dev]


def reset() -> None:
    """Forget everything in memory (entries, shipped caches, reports); counters back to zero."""
    with _LOCK:
        _MAIN.clear()
        _SHIPPED.clear()
        _FORCED.clear()
        _REPORTED.clear()
        _STATE.update(path=None, load_env=None)
        for k in STATS:
            STATS[k] = 0
        FAILURES.clear()


# --------------------------------------------------------------------------------------- tuning
def _time_ms(fn: Callable[[], object], device) -> float:
    import torch

    if torch.device(device if device is not None else "cpu").type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=10, rep=40, return_mode="median"))
    fn()  # warm-up (first-call costs: imports, allocations)
    times = []
    for _ in range(_reps()):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _describe(d: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in d.items())


def _tune(kernel: str, signature: dict, shape_bucket: dict, candidates: list[dict],
          bench: Callable[[dict], object], default: dict, device, dev: dict, version: str) -> dict:
    t0 = time.perf_counter()
    results: list[dict] = []
    for cfg in candidates:
        STATS["candidates"] += 1
        try:
            ms = _time_ms(lambda cfg=cfg: bench(dict(cfg)), device)
            results.append({"config": dict(cfg), "ms": ms})
        except Exception as e:  # a failing candidate is a data point, never fatal
            STATS["failed"] += 1
            results.append({"config": dict(cfg), "ms": None, "error": f"{type(e).__name__}: {e}"[:1000]})
            FAILURES.append({"kernel": kernel, "signature": dict(signature), "bucket": dict(shape_bucket),
                             "config": dict(cfg), "error": results[-1]["error"]})
    ok = [r for r in results if r["ms"] is not None]
    best = min(ok, key=lambda r: r["ms"]) if ok else None
    entry = {
        "kernel": kernel, "version": version, "device": dev, "signature": dict(signature),
        "bucket": dict(shape_bucket), "config": dict(best["config"] if best else default),
        "ms": best["ms"] if best else None, "candidates": results,
        "note": "" if best else "every candidate failed; the heuristic config is used",
        "tune_s": round(time.perf_counter() - t0, 4),
        "tuned_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    failed = len(results) - len(ok)
    _progress(f"{kernel} [{_describe(signature)}] [{_describe(shape_bucket)}]: {len(results)} candidates"
              + (f", {failed} failed" if failed else "")
              + (f"; best {_describe(entry['config'])} ({best['ms']:.3f} ms)" if best else "; using the heuristic")
              + f" in {entry['tune_s']:.2f} s")
    return entry


def _fits(config: dict, default: dict) -> bool:
    """A cached config has every knob of ``default``, each a number where the default's is (an edited or
    damaged cache entry would otherwise reach the kernel launcher)."""
    for name, want in default.items():
        got = config.get(name)
        if isinstance(want, (int, float)) and not isinstance(want, bool):
            if isinstance(got, bool) or not isinstance(got, (int, float)) or got <= 0:
                return False
        elif name not in config:
            return False
    return True


def choose(kernel: str, signature: dict, shape_bucket: dict,
           candidates: list[dict] | Callable[[], list[dict]], bench: Callable[[dict], object], default: dict,
           *, device=None, version: str = "") -> dict:
    """The config to run ``kernel`` with: cached, freshly tuned, or ``default`` (see the module doc).

    Args:
        kernel: kernel name, e.g. ``"dense_fwd"``.
        signature: what the kernel computes, independent of sizes: strategy, mask kind, dtype,
            head dims, GQA ratio... (str / int / float / bool values).
        shape_bucket: sizes rounded with :func:`bucket` (e.g. ``{"Lq": 512, "Lk": 512, "BH": 16}``).
        candidates: config dicts to time, already pruned for the device (may be empty), or a
            function returning them, called only on a cache miss (pruning can be costly).
        bench: ``bench(config)`` runs the kernel once with ``config`` on representative inputs.
        default: the heuristic config (mode ``0``, empty candidates, or every candidate failed).
        device: where ``bench`` runs (``torch.device`` / str / ``None`` for CPU): picks the timer
            and the device part of the key.
        version: changes whenever the kernel's code changes (e.g. :func:`source_hash`).

    Returns a new dict (the caller may modify it).
    """
    m = mode()
    if m == "0":
        STATS["heuristic"] += 1
        return dict(default)
    dev = device_info(device)
    key = _key(dev, kernel, version, signature, shape_bucket)
    with _LOCK:
        _ensure_loaded()
        hit = _MAIN.get(key) or _SHIPPED.get(key)
        if hit is not None and not _fits(hit["config"], default):
            _report_once(f"config:{key}", f"ignoring the cached config {hit['config']} for {kernel}: it does not "
                                          f"have this kernel's knobs ({', '.join(sorted(default))}) as numbers")
            hit = None
        if hit is not None and (m != "force" or key in _FORCED):
            STATS["hit"] += 1
            return dict(hit["config"])
    if callable(candidates):
        candidates = candidates()
    if not candidates:
        return dict(default)
    entry = _tune(kernel, signature, shape_bucket, candidates, bench, default, device, dev, version)
    with _LOCK:
        STATS["tuned"] += 1
        _MAIN[key] = entry
        _FORCED.add(key)
        _persist(cache_path(), key, entry)
    return dict(entry["config"])
