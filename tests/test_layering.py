"""The core's imports run only downward (issue "One house"): kernels at the ground floor, then the shared
types, the methods, the node (ops), policies and reports, the passes, the compiler; no circles, no import
inside a function that would hide one, and nothing of the tools (bench, eval, calibrate, the CLI)."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sparse_compile"
TOOLS = ("sparse_compile.benchmarks", "sparse_compile.calibration", "sparse_compile.evaluation",
         "sparse_compile.__main__", "sparse_compile.argtypes")

# Floor of each core module (a module imports only modules on its floor or below; same floor: no circle).
FLOORS = [
    ("sparse_compile.kernels",),
    ("sparse_compile.params", "sparse_compile.attention_mask"),
    ("sparse_compile.layers", "sparse_compile.method"),
    ("sparse_compile.methods",),
    ("sparse_compile.ops", "sparse_compile.policy"),
    ("sparse_compile.report", "sparse_compile.cache"),
    ("sparse_compile.passes",),
    ("sparse_compile.compiler",),
    ("sparse_compile.explain_graphs",),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def floor_of(module: str) -> int | None:
    for level, prefixes in enumerate(FLOORS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return level
    return None


def core_modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        if name != "sparse_compile" and not name.startswith(TOOLS):
            found[name] = ast.parse(path.read_text())
    return found


def imports(tree: ast.Module) -> list[tuple[str, bool]]:
    """(imported sparse_compile module, at module level?) for every import in the file."""
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sparse_compile"):
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            found += [(n, id(node) in top) for n in names]
        elif isinstance(node, ast.Import):
            found += [(a.name, id(node) in top) for a in node.names if a.name.startswith("sparse_compile")]
    return found


CORE = core_modules()


def resolve(name: str) -> str | None:
    """The core module an import names (`from pkg import submodule` names the submodule)."""
    while name and name not in CORE:
        name = name.rpartition(".")[0]
    return name or None


@pytest.mark.parametrize("module", sorted(CORE))
def test_core_module_imports_only_downward(module: str) -> None:
    level = floor_of(module)
    assert level is not None, f"{module} is on no floor: add it to FLOORS"
    for name, at_top in imports(CORE[module]):
        assert not name.startswith(TOOLS), f"{module} (core) imports the tool {name}"
        target = resolve(name)
        if target is None or target == module:
            continue
        assert at_top, f"{module} imports {name} inside a function"
        assert floor_of(target) <= level, f"{module} (floor {level}) imports {target} (floor {floor_of(target)})"


def test_core_import_graph_has_no_cycle() -> None:
    graph = nx.DiGraph()
    for module, tree in CORE.items():
        graph.add_node(module)
        for name, _ in imports(tree):
            target = resolve(name)
            if target and target != module and not module.startswith(target + "."):
                graph.add_edge(module, target)
    cycles = list(nx.simple_cycles(graph))
    assert cycles == [], cycles
