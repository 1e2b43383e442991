"""``import attncomp`` alone gives every submodule the README documents as ``attncomp.<name>``."""

import os
import re
import subprocess
import sys

import pytest

import attncomp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fresh(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a new interpreter (nothing of attncomp imported yet), from outside the checkout."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/")


def _readme_submodules() -> list[str]:
    """Names ``attncomp.<name>`` in the README that are submodules of the package."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    names = set(re.findall(r"(?<![\w.])attncomp\.([a-z_]+)", text))
    return sorted(n for n in names if os.path.isfile(os.path.join(ROOT, "attncomp", f"{n}.py")))


def test_readme_names_ops():
    assert "ops" in _readme_submodules()  # the scan below would be empty if the README's spelling changed


def test_ops_after_a_plain_import():
    proc = _fresh("import attncomp; attncomp.ops.linear_attention")
    assert proc.returncode == 0, proc.stderr


def test_every_submodule_the_readme_names():
    names = _readme_submodules()
    proc = _fresh("import attncomp\n" + "".join(f"print(attncomp.{n}.__name__)\n" for n in names))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [f"attncomp.{n}" for n in names]


def test_unknown_attribute_still_raises():
    with pytest.raises(AttributeError, match="module 'attncomp' has no attribute 'opz'"):
        attncomp.opz  # noqa: B018
