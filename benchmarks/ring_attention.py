"""Ring attention (``attncomp.distributed.ring_attention``) on CPU with gloo: time and bytes per rank.

    python benchmarks/ring_attention.py [--world 4] [--seq 8192] [--heads 4] [--dim 64] [--window 512]
                                        [--repeats 3] [--threads 1] [--out FILE]

``--world`` processes on 127.0.0.1 (gloo), each holding ``seq/world`` positions of one sequence,
B=1, ``--heads`` heads of ``--dim``, float32, random inputs. Cases:

* ``ring causal contiguous`` / ``ring causal zigzag`` — causal mask, both layouts;
* ``all-gather causal`` — the baseline: all-gather k and v, then this rank's queries against all keys
  with the causal mask as a bool ``attn_mask`` in ``F.scaled_dot_product_attention`` (torch's fused
  CPU kernel); its backward all-reduces dk/dv (autograd through an all-gather);
* ``ring window`` / ``all-gather window`` — a causal sliding window of ``--window`` keys
  (``ir.Window(window − 1, 0)``), contiguous layout;
* torch's own ``context_parallel`` (``torch.distributed.tensor.experimental``) on the same causal
  problem, where it runs (on CPU it does not: the exact error is recorded).

Per case: forward and forward+backward wall time (median of ``--repeats`` after one warm-up; each
timed between two barriers, so the slowest rank), CPU seconds per rank for one forward+backward
(``time.process_time``: the work each rank did, independent of how the OS shared the cores — with 4
ranks on 2 busy cores the wall times hide part of an imbalance, the CPU times do not), and bytes sent
per rank: measured for ring attention (``attncomp.distributed.traffic``); for the all-gather baseline
the bytes any all-gather must send, ``(W−1)·shard`` per rank for k and v (and ``2(W−1)/W`` of the
full dk/dv for a ring all-reduce in the backward) — gloo's own traffic is not instrumented. The
outputs of the ring and the baseline are compared (relative difference). Prints a table and writes
JSON to ``benchmarks/results/ring-attention-cpu-<date>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import socket
import statistics
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _bench(fn, repeats: int, dist, warmup: bool = True) -> tuple[float, float]:
    """(median wall seconds between barriers, this rank's CPU seconds of one call)."""
    if warmup:
        fn()
    walls = []
    cpu = 0.0
    for _ in range(repeats):
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        cpu = time.process_time() - c0
        dist.barrier()
        walls.append(time.perf_counter() - t0)
    return statistics.median(walls), cpu


def _torch_context_parallel(q, k, v, world, dist, repeats):
    """torch's experimental context_parallel on the causal problem; returns a dict (or the error)."""
    import torch
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = {}
    mesh = init_device_mesh("cpu", (world,))
    for backend in ("default", "math"):
        bufs = [t.clone() for t in (q, k, v)]
        try:
            def run(bufs=bufs, backend=backend):
                kernels = sdpa_kernel([SDPBackend.MATH]) if backend == "math" else contextlib.nullcontext()
                with context_parallel(mesh, buffers=bufs, buffer_seq_dims=[2, 2, 2]), kernels:
                    return F.scaled_dot_product_attention(*bufs, is_causal=True)
            wall, _ = _bench(run, repeats, dist)
            out[backend] = {"ran": True, "fwd_s": wall}
        except Exception as e:  # noqa: BLE001 — recorded verbatim
            last = traceback.extract_tb(e.__traceback__)[-1]
            out[backend] = {"ran": False, "error": f"{type(e).__name__}: {e}".strip()[:400],
                            "raised_at": f"{Path(last.filename).name}:{last.lineno}"}
        torch.distributed.barrier()
    return out


def _worker(rank: int, args, port: int, path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from attncomp import ir
    from attncomp.distributed import ring_attention, shard, traffic, unshard

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=args.world, timeout=datetime.timedelta(seconds=1800))
    W, L, H, D = args.world, args.seq, args.heads, args.dim
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, L, D, generator=g) for _ in range(3))
    dout = torch.randn(1, H, L, D, generator=g)
    pos = torch.arange(L)
    window = ir.Window(args.window - 1, 0)
    results, outputs = [], {}

    def ring(mask, layout):
        xs = [shard(t, 2, layout).requires_grad_() for t in (q, k, v)]
        do = shard(dout, 2, layout)

        def fwd():
            with torch.no_grad():
                return ring_attention(*xs, mask=mask, layout=layout)

        def fwd_bwd():
            for x in xs:
                x.grad = None
            ring_attention(*xs, mask=mask, layout=layout).backward(do)

        return fwd, fwd_bwd, layout

    def allgather(keep_fn):
        layout = "contiguous"
        xs = [shard(t, 2, layout).requires_grad_() for t in (q, k, v)]
        do = shard(dout, 2, layout)
        qpos = shard(pos, 0, layout)
        keep = keep_fn(qpos[:, None], pos[None, :])  # (L/W, L) bool: key visible from query

        def attend():
            kk, vv = unshard(xs[1], 2, layout), unshard(xs[2], 2, layout)
            return F.scaled_dot_product_attention(xs[0], kk, vv, attn_mask=keep)

        def fwd():
            with torch.no_grad():
                return attend()

        def fwd_bwd():
            for x in xs:
                x.grad = None
            attend().backward(do)

        return fwd, fwd_bwd, layout

    shard_bytes = 2 * 1 * H * (L // W) * D * 4  # k and v of one rank, float32
    cases = [
        ("ring causal contiguous", *ring(ir.Causal(0), "contiguous")),
        ("ring causal zigzag", *ring(ir.Causal(0), "zigzag")),
        ("all-gather causal", *allgather(lambda i, j: j <= i)),
        (f"ring window {args.window}", *ring(window, "contiguous")),
        (f"all-gather window {args.window}", *allgather(lambda i, j: (j <= i) & (j > i - args.window))),
    ]
    for name, fwd, fwd_bwd, layout in cases:
        ring_case = name.startswith("ring")
        with traffic() as t:
            out = fwd()
        with traffic() as tb:
            fwd_bwd()
        fwd_s, _ = _bench(fwd, args.repeats, dist, warmup=False)  # the two calls above were the warm-up
        fb_s, cpu = _bench(fwd_bwd, args.repeats, dist, warmup=False)
        if ring_case:
            sent = (t.bytes_sent("fwd"), tb.bytes_sent("bwd"))
        else:
            sent = ((W - 1) * shard_bytes, 2 * (W - 1) * shard_bytes)  # all-gather; ring all-reduce of full dk, dv
        per_rank = [None] * W
        dist.all_gather_object(per_rank, {"cpu_s": cpu, "fwd_bytes": sent[0], "bwd_bytes": sent[1],
                                          "fwd_scores": t.score_elements("fwd") if ring_case else None})
        outputs[name] = unshard(out, 2, layout)
        results.append({"case": name, "layout": layout, "fwd_s": fwd_s, "fwd_bwd_s": fb_s, "per_rank": per_rank,
                        "bytes": "measured" if ring_case else "algorithmic (all-gather / all-reduce)"})
    for r in results:
        base = outputs["all-gather causal" if "causal" in r["case"] else f"all-gather window {args.window}"]
        r["rel_diff_vs_allgather"] = _rel(outputs[r["case"]], base)
    cp = _torch_context_parallel(q, k, v, W, dist, args.repeats)
    if rank == 0:
        report = {"benchmark": "ring_attention", "date": datetime.date.today().isoformat(),
                  "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                              "threads_per_rank": args.threads, "load_avg_1m": os.getloadavg()[0]},
                  "params": {"world": W, "seq": L, "B": 1, "heads": H, "dim": D, "dtype": "float32",
                             "window": args.window, "repeats": args.repeats, "backend": "gloo"},
                  "results": results, "torch_context_parallel": cp}
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
    dist.destroy_process_group()


def _table(report: dict) -> str:
    W = report["params"]["world"]
    head = f"{'case':<26} {'fwd s':>7} {'fwd+bwd s':>9}  {'CPU s per rank (fwd+bwd)':<28} " \
           f"{'MiB sent per rank fwd / bwd':<40} {'rel diff':>8}"
    lines = [head, "-" * len(head)]
    for r in report["results"]:
        cpu = " ".join(f"{p['cpu_s']:.2f}" for p in r["per_rank"])
        mib = " ".join(f"{p['fwd_bytes'] / 2**20:.2f}/{p['bwd_bytes'] / 2**20:.2f}" for p in r["per_rank"])
        mark = "" if r["bytes"] == "measured" else " *"
        lines.append(f"{r['case']:<26} {r['fwd_s']:>7.2f} {r['fwd_bwd_s']:>9.2f}  {cpu:<28} {mib + mark:<40} "
                     f"{r['rel_diff_vs_allgather']:>8.1e}")
    lines.append(f"(* bytes any all-gather of k, v / ring all-reduce of dk, dv sends; {W} ranks, gloo on 127.0.0.1)")
    for backend, c in report["torch_context_parallel"].items():
        if c["ran"]:
            lines.append(f"torch context_parallel ({backend} SDPA backends): ran, fwd {c['fwd_s']:.2f} s")
        else:
            lines.append(f"torch context_parallel ({backend} SDPA backends): did not run — {c['error']} "
                         f"(raised at {c['raised_at']})")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    import torch.multiprocessing as mp

    out = Path(args.out or ROOT / "benchmarks" / "results" / f"ring-attention-cpu-{datetime.date.today()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    mp.spawn(_worker, args=(args, port, str(out)), nprocs=args.world, join=True)
    report = json.loads(out.read_text())
    report["total_s"] = time.perf_counter() - t0
    out.write_text(json.dumps(report, indent=1))
    p = report["params"]
    print(f"ring attention, CPU/gloo: {p['world']} ranks, L={p['seq']}, B=1, H={p['heads']}, D={p['dim']}, float32, "
          f"{report['machine']['threads_per_rank']} thread(s) per rank on {report['machine']['cpus']} CPUs "
          f"(load {report['machine']['load_avg_1m']:.1f}); median of {p['repeats']} after a warm-up")
    print(_table(report))
    print(f"wrote {out} ({report['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
