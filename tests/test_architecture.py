"""The layout is the architecture: each part imports only the parts below it, and nothing cycles.

The rule table :data:`MAY_IMPORT` is the picture of ARCHITECTURE.md in code: a part of
the package (an engine sub-package, a front end, io, ...) may import its own modules and
the parts listed for it, nothing else. Outside the engine, no module imports a private
engine module or a private engine name.

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
                         "prune_repair.zoo", "prune_repair.metrics")

ENGINE_PARTS = ("engine.base", "engine.run", "engine.sites", "engine.stats", "engine.refit", "engine.correct")
MAY_IMPORT: dict[str, set[str]] = {
    "engine.base": set(),                       # registry, checks, producers: layer kinds and checks
    "engine.run": {"engine.base"},              # passes over the data, lockstep, blockwise, ranks
    "engine.sites": {"engine.base", "engine.run"},
    "engine.stats": {"engine.base", "engine.run", "engine.sites"},
    "engine.refit": {"engine.base", "engine.run", "engine.sites"},
    "engine.correct": {"engine.base", "engine.run", "engine.sites", "engine.stats", "engine.refit"},
    "engine": set(ENGINE_PARTS),                # engine/__init__.py: the engine's public names
    "io": {"engine.base", "zoo"},
    "metrics": {"engine.run", "io"},
    "zoo": set(),
    "prune": {*ENGINE_PARTS, "engine", "io", "metrics"},
    "merge": {*ENGINE_PARTS, "engine", "metrics"},
    "cli": {*ENGINE_PARTS, "engine", "io", "metrics", "prune", "merge", "zoo", "root"},
    "root": {*ENGINE_PARTS, "engine", "prune", "merge", "metrics"},
    "__main__": {"cli"},
}


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


def part_of(module: str) -> str:
    """``prune_repair.engine.run.lockstep`` -> ``engine.run``; ``prune_repair.engine.checks`` -> ``engine.base``."""
    parts = module.split(".")[1:]
    if not parts:
        return "root"
    if parts[0] != "engine":
        return parts[0]
    if len(parts) == 1:
        return "engine"
    sub = f"engine.{parts[1]}"
    return sub if sub in ENGINE_PARTS else "engine.base"


def test_every_part_imports_only_what_the_rule_table_allows():
    assert {part_of(m) for m in MODULES} <= MAY_IMPORT.keys(), "a new part of the package needs its row in MAY_IMPORT"
    bad = sorted((name, dep) for name, deps in GRAPH.items() for dep in deps
                 if part_of(dep) != part_of(name) and part_of(dep) not in MAY_IMPORT[part_of(name)])
    assert not bad, f"imports against the rule table: {bad}"


def test_no_module_outside_the_engine_imports_private_engine_names():
    bad = []
    for name, path in MODULES.items():
        if name.startswith("prune_repair.engine"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and "engine" in node.module.split("."):
                tail = node.module.split(".")[node.module.split(".").index("engine"):]
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                if any(p.startswith("_") for p in tail) or private:
                    bad.append(f"{name}:{node.lineno}")
    assert not bad, f"private engine modules or names imported from outside the engine: {bad}"


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
    assert "prune_repair.engine.sites.find" in GRAPH["prune_repair.engine.stats.activation"]
    assert len(MODULES) > 30
