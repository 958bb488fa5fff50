"""The tools' side of the layering (test_layering.py holds the core's floors): the tools (benchmarks,
calibration, evaluation, the CLI) import each other with no circle, the core runs with every tool
unimportable, and every registered method declares what the tools read (bench cases, knobs, phases)."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
import textwrap
from pathlib import Path

from sparse_compile.benchmarks.methods import case_params
from sparse_compile.calibration.harness import RUNNERS
from sparse_compile.calibration.quality import quality_knobs
from sparse_compile.methods import METHODS

PACKAGE = Path(__file__).resolve().parents[1] / "sparse_compile"
TOOL_PACKAGES = ("sparse_compile.benchmarks", "sparse_compile.calibration", "sparse_compile.evaluation")
TOOL_MODULES = ("sparse_compile.__main__", "sparse_compile.argtypes")


def is_tool(module: str) -> bool:
    return module in TOOL_MODULES or any(module == p or module.startswith(p + ".") for p in TOOL_PACKAGES)


def module_names() -> dict[str, Path]:
    """{dotted module name: file} of every module of the package."""
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def import_graph() -> dict[str, set[str]]:
    """{module: the package modules it imports}, from the source (module- and function-level imports alike;
    `from package import name` counts as an import of the submodule when `name` is one)."""
    names = module_names()
    graph: dict[str, set[str]] = {}
    for module, path in names.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names if alias.name in names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: the package, node.level - 1 levels up, then the module
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                for alias in node.names:
                    target = f"{base}.{alias.name}"
                    edges.add(target if target in names else base)
        graph[module] = {e for e in edges if e in names and e != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_tools_import_graph_has_no_cycle():
    graph = import_graph()
    tools = {m: {e for e in edges if is_tool(e)} for m, edges in graph.items() if is_tool(m)}
    assert len(tools) >= 20, sorted(tools)  # the walk found the tool modules
    assert find_cycle(tools) is None, f"import circle among the tools: {' -> '.join(find_cycle(tools) or [])}"
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the check itself works


def test_the_core_runs_with_the_tools_unimportable():
    """In a fresh interpreter where importing any tool raises ImportError: import the package, build a
    backend, explain and compile a tiny Llama, and get the eager logits back."""
    script = textwrap.dedent(f"""
        import sys

        class NoTools:
            def find_spec(self, name, path=None, target=None):
                blocked = {TOOL_PACKAGES + TOOL_MODULES!r}
                if any(name == b or name.startswith(b + ".") for b in blocked):
                    raise ImportError(f"{{name}} is a tool: the core must not import it")
                return None

        sys.meta_path.insert(0, NoTools())
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        import sparse_compile

        cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, attn_implementation="sdpa")
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).eval()
        ids = torch.randint(0, 64, (1, 40))
        assert callable(sparse_compile.backend("dense", inner="eager"))
        assert "attention" in str(sparse_compile.explain(model, ids, policy="dense")).lower()
        fast = sparse_compile.compile(model, "dense", inner="eager")
        with torch.no_grad():
            torch.testing.assert_close(fast(ids).logits, model(ids).logits)
        loaded = sorted(m for m in sys.modules if m.startswith("sparse_compile."))
        tools = [m for m in loaded if m.startswith({TOOL_PACKAGES!r}) or m in {TOOL_MODULES!r}]
        assert not tools, tools
        print("core ok", len(loaded), "modules")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=PACKAGE.parent)
    assert done.returncode == 0 and "core ok" in done.stdout, done.stderr[-3000:]


def test_every_method_declares_what_the_tools_need():
    """Bench cases cover each phase the method runs in and build valid Params; selection-sharing methods
    declare a select and a reuse case; knobs name Params fields and a procedure the calibrate harness runs;
    a quality knob's fields are exactly those marked `quality=` in the Params."""
    for name, method in METHODS.items():
        assert {case.phase for case in method.bench_cases} == set(method.phases), name
        for case in method.bench_cases:
            assert dataclasses.is_dataclass(case_params(method, case)), (name, case)
        if method.selection_role is not None:
            assert {case.role for case in method.bench_cases} == {"select", "reuse"}, name
        fields = {f.name for f in dataclasses.fields(method.Params)}
        for knob in method.knobs:
            assert set(knob.fields) <= fields and knob.procedure in RUNNERS and knob.phase in method.phases, knob
        declared = [k.fields for k in method.knobs if k.procedure == "quality"]
        marked = quality_knobs(method.Params)
        assert declared == ([tuple(marked)] if marked else []), (name, declared, marked)
        assert method.knobs or name == "dense", f"{name} declares nothing to calibrate"
