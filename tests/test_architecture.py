"""The layout is the architecture: the engine stands alone and no module imports itself back.

Imports are read from the source (``ast``), including imports inside functions, so a lazy
import cannot hide a cycle (a submodule importing its own package's ``__init__``, which
imports it back, is a cycle too).
"""

from __future__ import annotations

import ast
from pathlib import Path

import prune_repair

ROOT = Path(prune_repair.__file__).resolve().parent
ENGINE_MAY_NOT_IMPORT = ("prune_repair.prune", "prune_repair.merge", "prune_repair.io", "prune_repair.cli",
                         "prune_repair.zoo")


def module_name(path: Path) -> str:
    parts = ["prune_repair", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The prune_repair modules ``path`` imports (resolved to existing modules)."""
    name, is_package = module_name(path), path.name == "__init__.py"
    package = name if is_package else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            submodules = {f"{target}.{alias.name}" for alias in node.names} & MODULES.keys()
            if node.module is not None or len(submodules) < len(node.names):
                found.add(target)  # "from . import sub" needs only the submodule
            found.update(submodules)
    return {m for m in found if m in MODULES and m != name}


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}
GRAPH = {name: imports_of(path) for name, path in MODULES.items()}


def test_the_engine_imports_no_front_end_and_no_io():
    bad = sorted((name, dep) for name, deps in GRAPH.items() if name.startswith("prune_repair.engine")
                 for dep in deps if dep.startswith(ENGINE_MAY_NOT_IMPORT))
    assert not bad, f"engine modules import front ends or io: {bad}"


def test_there_are_no_import_cycles():
    edges = GRAPH
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(edges[node]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_graph_is_read():
    assert "prune_repair.engine.sites" in GRAPH["prune_repair.engine.stats"]
    assert len(MODULES) > 30
