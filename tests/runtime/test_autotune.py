"""Autotuning: the JSON cache (round trip, corrupt, foreign, concurrent writers), failing candidates,
modes, pruning, and the hook in the dense Triton launchers (run under Triton's interpreter)."""

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from attncomp.runtime import autotune, codegen
from attncomp.strategies.dense import launcher as triton_dense
from attncomp.strategies.dense import op as runtime
from attncomp.templates.dense import configs as dense_configs
from conftest import rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


SIG = {"strategy": "dense", "mask": "causal", "dtype": "float16", "D": 64, "gqa": 1}
CANDS = [{"x": 1}, {"x": 2}, {"x": 3}]
DEFAULT = {"x": 0}


def sleepy(cfg):
    """A fake kernel whose config x=2 is the fastest."""
    time.sleep({1: 0.02, 2: 0.001, 3: 0.01}[cfg["x"]])


def never(cfg):
    raise AssertionError("bench must not run on a cache hit")


def _entries(path):
    data = json.loads(path.read_text())
    assert data["format"] == "attncomp-autotune" and data["version"] == 1
    return data["entries"]


def test_bucket_rounds_up_to_powers_of_two():
    assert autotune.bucket(L=300, BH=24) == {"L": 512, "BH": 32}
    assert autotune.bucket(L=512, BH=1) == {"L": 512, "BH": 1}
    assert autotune.bucket(L=513) == {"L": 1024}


def test_cache_round_trip(tune_env):
    b = autotune.bucket(L=300, BH=8)
    assert autotune.choose("k", SIG, b, CANDS, sleepy, DEFAULT) == {"x": 2}
    assert autotune.STATS["tuned"] == 1 and autotune.STATS["candidates"] == 3
    (entry,) = _entries(tune_env)
    assert entry["config"] == {"x": 2} and entry["signature"] == SIG and entry["bucket"] == {"L": 512, "BH": 8}
    assert entry["device"] == autotune.device_info("cpu") and len(entry["candidates"]) == 3

    autotune.reset()  # a new process: only the file remains
    assert autotune.choose("k", SIG, autotune.bucket(L=400, BH=7), lambda: never(None), never, DEFAULT) == {"x": 2}
    assert autotune.STATS["tuned"] == 0 and autotune.STATS["hit"] == 1
    # another bucket, kernel version or signature is another key
    assert autotune.choose("k", SIG, autotune.bucket(L=600, BH=8), CANDS, sleepy, DEFAULT) == {"x": 2}
    autotune.choose("k", {**SIG, "D": 128}, b, CANDS, sleepy, DEFAULT)
    autotune.choose("k", SIG, b, CANDS, sleepy, DEFAULT, version="edited-template")
    assert autotune.STATS["tuned"] == 3 and len(_entries(tune_env)) == 4


def test_modes(tune_env, monkeypatch):
    monkeypatch.setenv("ATTNCOMP_AUTOTUNE", "0")
    assert autotune.choose("k", SIG, {"L": 64}, CANDS, never, DEFAULT) == DEFAULT
    assert autotune.STATS["heuristic"] == 1 and not tune_env.exists()
    monkeypatch.setenv("ATTNCOMP_AUTOTUNE", "1")
    autotune.choose("k", SIG, {"L": 64}, CANDS, sleepy, DEFAULT)
    autotune.reset()  # a new process, with the entry in the file
    monkeypatch.setenv("ATTNCOMP_AUTOTUNE", "force")  # re-tunes cached keys once per process, then hits
    autotune.choose("k", SIG, {"L": 64}, CANDS, sleepy, DEFAULT)
    assert autotune.choose("k", SIG, {"L": 64}, CANDS, never, DEFAULT) == {"x": 2}
    assert autotune.STATS["tuned"] == 1 and autotune.STATS["hit"] == 1
    monkeypatch.setenv("ATTNCOMP_AUTOTUNE", "yes")
    with pytest.raises(ValueError, match="ATTNCOMP_AUTOTUNE must be one of"):
        autotune.choose("k", SIG, {"L": 64}, CANDS, sleepy, DEFAULT)


def test_bad_signature_values_are_rejected(tune_env):
    with pytest.raises(TypeError, match="signature values must be"):
        autotune.choose("k", {"dtype": torch.float16}, {"L": 64}, CANDS, sleepy, DEFAULT)


def test_corrupt_file_is_reported_once_and_replaced(tune_env):
    tune_env.write_text('{"format": "attncomp-autotune", "entries": [')  # truncated write
    with pytest.warns(RuntimeWarning, match="not readable JSON"):
        assert autotune.choose("k", SIG, {"L": 64}, CANDS, sleepy, DEFAULT) == {"x": 2}
    assert len(_entries(tune_env)) == 1  # the corrupt file held nothing: it was replaced
    autotune.reset()
    tune_env.write_text("\x00\x01garbage")
    with pytest.warns(RuntimeWarning) as rec:
        autotune.choose("k", SIG, {"L": 32}, CANDS, sleepy, DEFAULT)
        autotune.choose("k", SIG, {"L": 16}, CANDS, sleepy, DEFAULT)
    assert len([w for w in rec if "not readable JSON" in str(w.message)]) == 1  # reported once


def test_foreign_file_is_ignored_and_not_overwritten(tune_env):
    foreign = '{"format": "someone-else", "data": [1, 2]}'
    tune_env.write_text(foreign)
    with pytest.warns(RuntimeWarning) as rec:
        assert autotune.choose("k", SIG, {"L": 64}, CANDS, sleepy, DEFAULT) == {"x": 2}
    messages = " | ".join(str(w.message) for w in rec)
    assert "not an attncomp autotune cache" in messages and "not writing to" in messages
    assert tune_env.read_text() == foreign
    assert autotune.choose("k", SIG, {"L": 64}, CANDS, never, DEFAULT) == {"x": 2}  # kept in memory


def test_cache_from_another_device_is_ignored(tune_env, tmp_path):
    autotune.choose("k", SIG, {"L": 64}, CANDS, sleepy, DEFAULT)
    data = json.loads(tune_env.read_text())
    data["entries"][0]["device"]["name"] = "NVIDIA Imaginary 9000"
    data["entries"][0]["config"] = {"x": 99}
    shipped = tmp_path / "shipped.json"
    shipped.write_text(json.dumps(data))
    tune_env.unlink()
    autotune.reset()
    assert autotune.load_cache(shipped) == 1
    assert autotune.entries("cpu") == [] and len(autotune.entries()) == 1
    assert autotune.choose("k", SIG, {"L": 64}, CANDS, sleepy, DEFAULT) == {"x": 2}  # tuned, not x=99
    assert autotune.STATS["tuned"] == 1 and autotune.STATS["hit"] == 0


def test_shipped_cache_via_env_is_used(tune_env, tmp_path, monkeypatch):
    autotune.choose("k", SIG, {"L": 64}, CANDS, sleepy, DEFAULT)
    shipped = tmp_path / "shipped.json"
    tune_env.rename(shipped)
    autotune.reset()
    monkeypatch.setenv("ATTNCOMP_AUTOTUNE_LOAD", str(shipped))
    assert autotune.choose("k", SIG, {"L": 64}, CANDS, never, DEFAULT) == {"x": 2}
    assert autotune.STATS == {**autotune.STATS, "hit": 1, "tuned": 0}
    with pytest.raises(FileNotFoundError, match="no such file"):
        autotune.load_cache(tmp_path / "missing.json")


def test_failing_candidate_is_recorded_not_fatal(tune_env):
    def bench(cfg):
        if cfg["x"] == 2:
            raise RuntimeError("out of resources: shared memory, Required: 262144")
        sleepy(cfg)

    assert autotune.choose("k", SIG, {"L": 64}, CANDS, bench, DEFAULT) == {"x": 3}
    (entry,) = _entries(tune_env)
    bad = [c for c in entry["candidates"] if c.get("error")]
    assert [c["config"] for c in bad] == [{"x": 2}] and bad[0]["ms"] is None
    assert "RuntimeError: out of resources" in bad[0]["error"]
    assert autotune.STATS["failed"] == 1

    def broken(cfg):
        raise ValueError(f"cannot compile {cfg}")

    assert autotune.choose("k", SIG, {"L": 32}, CANDS, broken, DEFAULT) == DEFAULT
    entry = [e for e in _entries(tune_env) if e["bucket"] == {"L": 32}][0]
    assert entry["config"] == DEFAULT and "every candidate failed" in entry["note"]


WRITER = textwrap.dedent("""
    import importlib.util, os, sys, time
    # attncomp/runtime/autotune.py alone, without the package __init__ (Dynamo, Triton): a faster start
    spec = importlib.util.spec_from_file_location("autotune", os.path.join("attncomp", "runtime", "autotune.py"))
    autotune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(autotune)
    tag, barrier = sys.argv[1], sys.argv[2]
    open(os.path.join(barrier, tag), "w").close()
    while len(os.listdir(barrier)) < 2:  # both processes have imported torch: write together
        time.sleep(0.002)
    for i in range(25):
        autotune.choose("k", {"writer": tag}, {"L": 1 << i}, [{"x": 1}], lambda c: None, {"x": 0})
""")


def test_two_processes_writing_the_same_cache(tune_env, tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT}
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, tag, str(barrier)], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for tag in "ab"]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    entries = _entries(tune_env)  # valid JSON, our format
    got = sorted((e["signature"]["writer"], e["bucket"]["L"]) for e in entries)
    assert got == sorted((tag, 1 << i) for tag in "ab" for i in range(25))  # nothing lost
    assert not [f for f in os.listdir(tune_env.parent) if f.endswith(".tmp")]


def test_prune_drops_what_the_device_cannot_hold():
    reasons = []
    kept = dense_configs.prune(dense_configs.GPU_CANDIDATES, head_dim=128, dtype="float16", Lq=4096, Lk=4096,
                               smem_limit=64 * 1024, reasons=reasons)
    assert kept and all(dense_configs.smem_bytes(c, 128, "float16") <= 64 * 1024 for c in kept)
    assert any("shared memory" in r for r in reasons)
    big = dense_configs.prune(dense_configs.GPU_CANDIDATES, head_dim=256, dtype="float16", Lq=4096, Lk=4096,
                              smem_limit=None)
    assert big and all(max(c["BLOCK_M"], c["BLOCK_N"]) < 128 for c in big)
    short = dense_configs.candidates(head_dim=32, dtype="float32", Lq=16, Lk=16, interpret=True)
    assert short == [{"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}]
    # never empty: a device too small for every config keeps the smallest one
    assert len(dense_configs.prune(dense_configs.GPU_CANDIDATES, head_dim=64, dtype="float32", Lq=64, Lk=64,
                                   smem_limit=1024)) == 1


def _qkv(L, D=16, H=2):
    return [torch.randn(1, H, L, D) for _ in range(3)]


def test_triton_launcher_tunes_once_per_bucket(tune_env, triton_kernels, monkeypatch):
    # One candidate that cannot run (BLOCK_M < 16 is below tl.dot's minimum): recorded, not fatal.
    monkeypatch.setattr(dense_configs, "INTERPRETER_CANDIDATES",
                        ({"BLOCK_M": 8, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1},
                         *dense_configs.INTERPRETER_CANDIDATES[:3]))
    q, k, v = _qkv(40)
    out, _ = triton_dense.dense_fwd(q, k, v, None, 0.25, 0, 0.0)
    ref, _ = runtime._cpu_fwd(q.double(), k.double(), v.double(), None, 0.25, 0, 0.0)
    assert rel_err(out, ref) <= 1e-5
    assert autotune.STATS["tuned"] == 1 and autotune.STATS["failed"] == 1
    (entry,) = _entries(tune_env)
    assert entry["kernel"] == "dense_fwd" and entry["bucket"] == {"Lq": 64, "Lk": 64, "BH": 2}
    assert entry["signature"]["mask"] == "causal" and entry["signature"]["interpret"] is True
    assert "BLOCK_M and BLOCK_N must be >= 16" in [c for c in entry["candidates"] if c.get("error")][0]["error"]

    imports = codegen.STATS["import"]
    q, k, v = _qkv(57)  # same bucket: no tuning, no new kernel module
    out, _ = triton_dense.dense_fwd(q, k, v, None, 0.25, 0, 0.0)
    ref, _ = runtime._cpu_fwd(q.double(), k.double(), v.double(), None, 0.25, 0, 0.0)
    assert rel_err(out, ref) <= 1e-5
    assert autotune.STATS["tuned"] == 1 and autotune.STATS["hit"] == 1
    assert codegen.STATS["import"] == imports


def test_triton_launcher_uses_heuristic_when_off(tune_env, triton_kernels, monkeypatch):
    monkeypatch.setenv("ATTNCOMP_AUTOTUNE", "0")
    q, k, v = _qkv(24)
    triton_dense.dense_fwd(q, k, v, None, 0.25, None, 0.0)
    assert autotune.STATS["heuristic"] == 1 and autotune.STATS["tuned"] == 0 and not tune_env.exists()


class WindowSite(torch.nn.Module):
    """A sliding-window softmax chain (window 8, causal), mask built in forward: a sparse site."""

    def forward(self, q, k, v):
        L = q.shape[-2]
        i = torch.arange(L)
        keep = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - 8)
        s = (q @ k.transpose(-1, -2)) * 0.25
        return torch.softmax(s.masked_fill(~keep, float("-inf")), -1) @ v


def test_explain_lists_failed_candidates(tune_env, monkeypatch):
    """A tile candidate that fails on a real site is scored infinity, the site still runs on the best
    of the others, and explain lists the failure with its error."""
    import attncomp
    from attncomp.templates.sparse import configs as sparse_configs

    monkeypatch.setattr(sparse_configs, "CPU", ((-16, 32), (32, 32), (64, 64)))
    q, k, v = (torch.randn(1, 2, 96, 16) for _ in range(3))
    fast = attncomp.optimize(WindowSite(), example_inputs=(q, k, v), strategy="local")
    torch.testing.assert_close(fast(q, k, v), WindowSite()(q, k, v), rtol=1e-5, atol=1e-5)
    report = attncomp.explain(fast)
    assert report.replaced[0].strategy == "local"
    assert autotune.STATS["tuned"] >= 1 and autotune.STATS["failed"] == 1
    (fail,) = report.autotune_failures
    assert fail["kernel"] == "sparse_fwd" and fail["config"] == {"BLOCK_M": -16, "BLOCK_N": 32}
    text = str(report)
    assert "1 candidate config(s) failed" in text and "sparse_fwd [BLOCK_M=-16 BLOCK_N=32]" in text
    assert fail["error"][:40] in text
