"""benchmarks/gpu_suite.py --smoke: the GPU suite's own code paths on CPU (Triton interpreter, fp32).

The suite runs in a subprocess (it sets TRITON_INTERPRET itself before importing torch) and writes
its JSON to a temporary --out; every correctness check it ran must pass, and every timing case must
have timed attncomp forward and forward+backward.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "benchmarks" / "gpu_suite.py"


def _has_sparse_op() -> bool:
    try:
        from attncomp import ops
    except Exception:  # noqa: BLE001 - not written yet
        return False
    return hasattr(ops, "attention")


def run_smoke(tmp_path: Path, *extra: str) -> dict:
    env = dict(os.environ, ATTNCOMP_CACHE_DIR=str(tmp_path / "kernels"))
    proc = subprocess.run([sys.executable, str(SUITE), "--smoke", "--out", str(tmp_path), *extra], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"suite failed (rc {proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    doc = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert doc["mode"] == "smoke" and "fatal" not in doc
    assert doc["env"]["torch"] and doc["env"]["triton"]
    return doc


def check_doc(doc: dict, n_checks: int, n_cases: int) -> None:
    checks = doc["correctness"]
    assert len(checks) == n_checks, [c["id"] for c in checks]
    sparse_ok = _has_sparse_op()
    for c in checks:
        if c["op"] == "sparse" and not sparse_ok:
            assert c["status"] == "skipped" and "not available" in c["note"], c
            continue
        assert c["status"] == "pass", c
        assert set(c["errors"]) >= {"out", "dq", "dk", "dv"} and c["max_rel_err"] <= c["tol"], c
    assert len(doc["timings"]) == n_cases, doc["skipped"]
    for case in doc["timings"]:
        impls = case["impls"]
        if "kind" in case:  # a linear / tensor case
            check_other(case)
            continue
        if case["mask"] != "none" and not sparse_ok:
            assert impls["attncomp"]["status"] == "skipped", impls["attncomp"]
        else:
            r = impls["attncomp"]
            assert r["status"] == "ok" and r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0, r
            assert r["fwd_tflops"] > 0 and r["first_fwd_s"] > 0
        assert impls["sdpa_math"]["status"] == "ok" and impls["sdpa_math"]["agree_ok"] in (True, None)
        assert impls["flex"]["status"] == "skipped"
        assert case["visible_pairs"] > 0 and case["flops_fwd"] == 4 * case["B"] * case["H"] * case["D"] * \
            case["visible_pairs"]


def check_other(case: dict) -> None:
    """A linear or tensor attention case: attncomp timed; linear's SDPA peers timed for speed only,
    tensor's naive einsum timed and agreeing with attncomp."""
    impls = case["impls"]
    r = impls["attncomp"]
    assert r["status"] == "ok" and r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["fwd_tflops"] > 0, r
    if case["kind"] == "linear":
        assert impls["sdpa_math"]["status"] == "ok" and "speed only" in impls["sdpa_math"]["agree_with"]
        assert case["flops_fwd"] == 4 * case["B"] * case["H"] * case["D"] * case["L"] * (case["chunk"] + case["D"])
    else:
        assert impls["naive"]["status"] == "ok" and impls["naive"]["agree_ok"], impls["naive"]
        assert case["flops_fwd"] == 4 * case["B"] * case["H"] * case["D"] * case["triples"]


def test_smoke_other_kernels(tmp_path):
    """The linear and tensor attention cases (speed-only peers, crossover, naive einsum agreement)."""
    doc = run_smoke(tmp_path, "--cases", "linear-causal,tensor-window")
    check_doc(doc, n_checks=0, n_cases=2)
    assert set(doc["linear_crossover_L"]) == {"fwd", "fwd_bwd"}


def test_smoke_subset(tmp_path):
    """One dense and one sparse check, one dense and one masked timing case (< 60 s)."""
    doc = run_smoke(tmp_path, "--cases", "dense-plain,sparse-window16,dense-fp32,window16-fp32-D32")
    check_doc(doc, n_checks=2, n_cases=2)


@pytest.mark.slow
def test_smoke_full(tmp_path):
    doc = run_smoke(tmp_path)
    check_doc(doc, n_checks=11, n_cases=5)
