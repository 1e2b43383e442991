"""The package's floor plan: layers import only downward, no import cycles, no private names used
across modules, no import hidden in a function to dodge a cycle."""

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent
# what each layer may import (besides itself); DESIGN.md "Layout"
ALLOWED = {
    "ir": set(),
    "masks": {"ir"},
    "runtime": {"ir", "templates"},
    "templates": set(),
    "frontend": {"ir", "masks"},
    "strategies": {"ir", "masks", "runtime", "templates", "frontend"},
    "passes": {"ir", "masks", "runtime", "strategies"},
    "distributed": {"ir", "masks", "runtime", "strategies"},
    "top": {"ir", "masks", "runtime", "templates", "frontend", "strategies", "passes", "distributed"},
}
# imports inside functions, on purpose: optional or heavy dependencies loaded on first use
LAZY = {
    ("attncomp.strategies.dense.op", "attncomp.strategies.dense.launcher"),  # Triton (Linux x86-64 only)
    ("attncomp.strategies.sparse.op", "attncomp.strategies.sparse.launcher"),
    ("attncomp.strategies.linear.op", "attncomp.strategies.linear.launcher"),
    ("attncomp.strategies.tensor.op", "attncomp.strategies.tensor.launcher"),
    ("attncomp.cli", "attncomp"),  # `attncomp --help` answers without importing torch
    ("attncomp.cli", "attncomp.runtime.autotune"),
}


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] in ("passes", "templates"):
        parts = ["attncomp", *parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else "top"


def _modules() -> dict[str, Path]:
    files = [p for d in ("attncomp", "passes", "templates") for p in (ROOT / d).rglob("*.py")]
    return {_module(p): p for p in files}


def _imports(module: str, path: Path, known: dict):
    """(imported module, imported names, at module level?, line) for every attncomp import."""
    tree = ast.parse(path.read_text())
    top_level = {id(n) for n in tree.body}
    typing_only = {id(n) for node in tree.body if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test)
                   for n in ast.walk(node)}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            if not base.startswith("attncomp"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                target = sub if sub in known else base
                yield target, alias.name, id(node) in top_level, node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("attncomp"):
                    yield alias.name, None, id(node) in top_level, node.lineno


def _private_attributes(module: str, path: Path, known: dict) -> list[str]:
    """``alias._name`` where ``alias`` is another attncomp module imported here."""
    tree = ast.parse(path.read_text())
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("attncomp"):
            for a in node.names:
                if f"{node.module}.{a.name}" in known:
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    return [f"{path.relative_to(ROOT)}:{n.lineno}: private name {n.attr} used from {aliases[n.value.id]}"
            for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
            and n.value.id in aliases and n.attr.startswith("_") and not n.attr.startswith("__")
            and aliases[n.value.id] != module]


def test_layers_cycles_privates_and_hidden_imports():
    known = _modules()
    graph = nx.DiGraph()
    problems = []
    for module, path in known.items():
        graph.add_node(module)
        for target, name, top, line in _imports(module, path, known):
            where = f"{path.relative_to(ROOT)}:{line}"
            if target == module:
                continue
            src, dst = _layer(module), _layer(target)
            if dst != src and dst not in ALLOWED[src]:
                problems.append(f"{where}: layer {src} imports {target} (layer {dst})")
            if name and name.startswith("_"):
                problems.append(f"{where}: private name {name} imported from {target}")
            if top:
                graph.add_edge(module, target)
            elif (module, target) not in LAZY:
                problems.append(f"{where}: import of {target} inside a function")
        problems += _private_attributes(module, path, known)
    for cycle in nx.simple_cycles(graph):
        problems.append("import cycle: " + " -> ".join(cycle + cycle[:1]))
    assert not problems, "\n".join(problems)


def test_checker_sees_a_violation(tmp_path):
    """The checker itself fails on what it must catch (a cycle and a private name)."""
    g = nx.DiGraph([("a", "b"), ("b", "a")])
    assert list(nx.simple_cycles(g))
    src = tmp_path / "m.py"
    src.write_text("from attncomp.frontend.rules import _private\n")
    hits = list(_imports("attncomp.frontend.other", src, {"attncomp.frontend.rules": src}))
    assert hits == [("attncomp.frontend.rules", "_private", True, 1)]
