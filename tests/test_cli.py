"""The ``attncomp`` command line: shapes syntax, --help, and tune → inspect → optimize end to end on
CPU (Triton kernels under the interpreter) with the cache made by ``tune`` answering every kernel."""

import json
import os
import shlex
import subprocess
import sys

import pytest
import torch

import attncomp
from attncomp import cli
from attncomp.runtime import autotune
from conftest import rel_err

pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "examples.small_model:gpt2_tiny"


def test_parse_shapes():
    assert cli.parse_shapes("B=1,L=512..2048") == [{"B": 1, "L": 512}, {"B": 1, "L": 1024}, {"B": 1, "L": 2048}]
    assert cli.parse_shapes("B=1|2,L=100..300") == [
        {"B": b, "L": n} for b in (1, 2) for n in (100, 128, 256)]
    for bad in ("X=3", "L=8..4", "L=abc", "L=0", "B"):
        with pytest.raises(Exception, match="bad|sizes"):
            cli.parse_shapes(bad)


@pytest.mark.parametrize("command", ["tune", "inspect", "bench"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: attncomp {command}" in text
    if command != "bench":
        assert "--model" in text and "--shapes" in text and "power of two" in text


def test_bad_model_spec_names_the_problem():
    with pytest.raises(SystemExit, match="pkg.module:factory"):
        cli.load_factory("examples.small_model")
    with pytest.raises(SystemExit, match="has no callable 'nope'"):
        cli.load_factory("examples.small_model:nope")


@pytest.fixture
def clean_tuner(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    for var in ("ATTNCOMP_AUTOTUNE", "ATTNCOMP_AUTOTUNE_CACHE", "ATTNCOMP_AUTOTUNE_LOAD"):
        monkeypatch.setenv(var, os.environ.get(var, ""))  # restored after the test (cli sets them)
    autotune.reset()
    yield tmp_path
    autotune.reset()
    attncomp.set_kernels(None)


def test_tune_then_inspect_then_optimize_without_tuning(clean_tuner, capsys, monkeypatch):
    out = clean_tuner / "cache.json"
    env = {**os.environ, "ATTNCOMP_AUTOTUNE_REPS": "1"}
    proc = subprocess.run([sys.executable, "-m", "attncomp", "tune", "--model", MODEL, "--shapes", "B=1,L=16..32",
                           "--kernels", "triton", "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "2/2 done" in proc.stderr and "2 replaced, 0 left" in proc.stdout
    entries = json.loads(out.read_text())["entries"]
    buckets = sorted(e["bucket"]["Lq"] for e in entries if e["kernel"] == "dense_fwd")
    assert sorted(set(buckets)) == [16, 32]  # one bucket per shape point (a static and a dynamic plan each)
    assert all(e["device"] == autotune.device_info("cpu") for e in entries)

    assert cli.main(["inspect", "--model", MODEL, "--shapes", "B=1,L=32", "--kernels", "triton",
                     "--cache", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "h.0.attn" in shown and "h.1.attn" in shown and "2 replaced, 0 left" in shown
    assert f"{len(entries)} entries, {len(entries)} for this device" in shown and "BLOCK_M=" in shown

    # A fresh optimize with the shipped cache: every kernel is answered from it, nothing is tuned.
    autotune.reset()
    monkeypatch.setenv("ATTNCOMP_AUTOTUNE", "1")
    monkeypatch.setenv("ATTNCOMP_AUTOTUNE_CACHE", str(clean_tuner / "empty.json"))
    attncomp.load_cache(out)
    attncomp.set_kernels("triton")
    sys.path.insert(0, ROOT)
    from examples.small_model import gpt2_tiny

    model, make_inputs = gpt2_tiny()
    with torch.no_grad():
        fast = attncomp.optimize(model, example_inputs=make_inputs(1, 32))
        ids = make_inputs(1, 20)
        ref, got = model(*ids), fast(*ids)
    assert autotune.STATS["tuned"] == 0 and autotune.STATS["candidates"] == 0
    assert autotune.STATS["hit"] == 4  # two sites, two calls (L=32 then L=20: buckets 32 and 32)
    assert len(attncomp.explain(fast).replaced) == 2
    assert rel_err(got.last_hidden_state, ref.last_hidden_state) <= 1e-5
    assert not (clean_tuner / "empty.json").exists()


def test_inspect_with_module_capture(clean_tuner, capsys):
    assert cli.main(["inspect", "--model", MODEL, "--shapes", "B=1,L=32", "--capture", "modules"]) == 0
    shown = capsys.readouterr().out
    assert "2 replaced, 0 left; capture=modules, graphs=1" in shown
    assert "GPT2Block ×2 (h.0, h.1): 1 graph(s) compiled for them all" in shown


SHORT_FACTORY = """
from examples.small_model import gpt2_tiny


def short():
    return gpt2_tiny(n_positions={n})
"""


def _short_model(tmp_path, n_positions: int):
    """A ``file.py:factory`` spec for ``gpt2_tiny`` with a position table of ``n_positions``, and the
    error the model itself raises one past it (what ``tune`` must report)."""
    path = tmp_path / "short_model.py"
    path.write_text(SHORT_FACTORY.format(n=n_positions))
    sys.path.insert(0, ROOT)
    from examples.small_model import gpt2_tiny

    model, make_inputs = gpt2_tiny(n_positions=n_positions)
    with pytest.raises(Exception) as e, torch.no_grad():
        model(*make_inputs(1, n_positions + 1))
    return f"{path}:short", f"{type(e.value).__name__}: {str(e.value).strip().splitlines()[0]}"


def test_tune_skips_points_the_model_rejects_and_tunes_the_rest(clean_tuner):
    out = clean_tuner / "cache.json"
    spec, error = _short_model(clean_tuner, 32)
    env = {**os.environ, "ATTNCOMP_AUTOTUNE_REPS": "1"}
    proc = subprocess.run([sys.executable, "-m", "attncomp", "tune", "--model", spec, "--shapes", "B=1,L=16..64",
                           "--kernels", "triton", "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    skipped = [line for line in proc.stderr.splitlines() if "skipped" in line]
    assert skipped[0] == f"attncomp tune: skipped B=1 L=64: {spec} rejects it ({error})"
    assert skipped[1].startswith("attncomp tune: 1 of 3 shape points skipped") and len(skipped) == 2
    assert "2 replaced, 0 left" in proc.stdout
    entries = json.loads(out.read_text())["entries"]
    assert sorted({e["bucket"]["Lq"] for e in entries if e["kernel"] == "dense_fwd"}) == [16, 32]


def test_tune_fails_only_when_every_point_is_rejected(clean_tuner, capsys):
    out = clean_tuner / "cache.json"
    spec, error = _short_model(clean_tuner, 8)
    assert cli.main(["tune", "--model", spec, "--shapes", "B=1,L=16|32", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    for n in (16, 32):
        assert f"attncomp tune: skipped B=1 L={n}: {spec} rejects it ({error})" in err
    assert f"{spec} rejected every shape point" in err
    assert json.loads(out.read_text())["entries"] == []  # a valid cache file, with nothing in it


def test_readme_tune_example_has_no_rejected_point(clean_tuner, capsys):
    """The README's own command, as written, on the CPU executor (nothing to tune there, but every
    point must run, and the cache file must be written)."""
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    (line,) = [ln for ln in readme.splitlines() if ln.startswith("attncomp tune ")]
    argv = shlex.split(line)[1:]
    out = clean_tuner / argv[argv.index("--out") + 1]
    argv[argv.index("--out") + 1] = str(out)
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "skipped" not in captured.err and "done" in captured.err
    assert json.loads(out.read_text())["format"] == "attncomp-autotune"
