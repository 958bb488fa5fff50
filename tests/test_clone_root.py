"""The clone's root shadows nothing: commands typed there (`python -m pytest`, `python -m sparse_compile`,
scripts) put the root first on sys.path, so a regular package there named like a module of the
dependency closure (`kernels`, the Hugging Face package transformers >= 5.25 imports) would replace it."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_in_root(code: str) -> subprocess.CompletedProcess:
    """`python -c code` with the clone's root as cwd, as `python -m ...` typed there sees sys.path."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_only_sparse_compile_is_a_regular_package_at_the_root() -> None:
    packages = sorted(p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert packages == ["sparse_compile"]


def test_installed_kernels_distribution_wins_from_the_root() -> None:
    dist = importlib.metadata.distribution("kernels")  # the test extra installs it, as transformers >= 5.25 does
    proc = run_in_root("import kernels, sys; print(kernels.__file__)")
    assert proc.returncode == 0, proc.stderr
    found = Path(proc.stdout.strip()).resolve()
    assert found.parent == Path(dist.locate_file("kernels")).resolve(), f"`import kernels` found {found}"


def test_transformers_model_imports_from_the_root() -> None:
    proc = run_in_root("from transformers import LlamaForCausalLM; import sparse_compile.kernels as k; "
                       "print(LlamaForCausalLM.__name__, k.BlockList.__name__)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["LlamaForCausalLM", "BlockList"]


@pytest.mark.parametrize("name", ["kernels", "passes", "scripts", "results", "examples", "tests"])
def test_root_folder_names_do_not_resolve_to_the_root(name: str) -> None:
    """A root folder without __init__.py is at most a namespace portion: any installed module of that name
    wins; when none is installed the name is a namespace with no code of ours in it."""
    proc = run_in_root(
        f"import importlib.util; s = importlib.util.find_spec({name!r}); "
        "print('none' if s is None else (s.origin or 'namespace'))")
    assert proc.returncode == 0, proc.stderr
    origin = proc.stdout.strip()
    assert origin in ("none", "namespace") or Path(origin).resolve().parent != ROOT / name, origin
