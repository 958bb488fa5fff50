"""The ways in (backend object, sparse_compile.compile, options=, mode=), eager validation, the method
registry, the layering of kernels/, and the fallback reasons the Report records per site and per call."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from test_backend import tiny_llama

import sparse_compile
from sparse_compile.method import Method
from sparse_compile.methods import METHODS, registry
from sparse_compile.ops import (
    BELOW_MIN_SEQ_LEN,
    FALLBACKS,
    RAN,
    UNPROVEN_MASK,
    UNSUPPORTED,
    CallShape,
    fallback_reason,
    parse_config,
)
from sparse_compile.params import PolicyError

ROOT = Path(__file__).resolve().parents[1]
KERNEL_MODULES = sorted(p.stem for p in (ROOT / "sparse_compile" / "kernels").glob("*.py") if p.stem != "__init__")


def prism_policy(min_seq_len: int, block_size: int = 64) -> sparse_compile.Policy:
    return sparse_compile.load_policy({"name": "p", "prefill": {
        "method": "prism", "min_seq_len": min_seq_len, "params": {"block_size": block_size}}})


# --- eager validation: errors before any tracing ------------------------------------------------


@pytest.mark.parametrize("kwargs, needle", [
    ({"policy": {"prefill": {"methd": "prism"}}}, "unknown key 'methd'"),
    ({"policy": "nonsense"}, "unknown policy 'nonsense'"),
    ({"mode": "fast"}, "mode 'fast' is not an Inductor mode"),
    ({"mode": 3}, "is not an Inductor mode"),
    ({"inner": "tvm"}, "option 'inner' = 'tvm'"),
    ({"inner": "eager", "mode": "reduce-overhead"}, "do not apply with inner='eager'"),
    ({"inductor": ["x"]}, "option 'inductor' must be a dict"),
    ({"report": "yes"}, "option 'report' must be a sparse_compile.Report"),
    ({"debug": 1}, "option 'debug' must be True or False"),
])
def test_backend_object_validates_before_tracing(kwargs, needle):
    with pytest.raises(PolicyError, match=needle):
        sparse_compile.backend(**kwargs)


def test_compile_helper_raises_policy_error_at_the_call():
    model = tiny_llama(1)
    with pytest.raises(PolicyError, match="unknown key 'threshold'"):
        sparse_compile.compile(model, {"prefill": {"method": "prism", "params": {"threshold": 0.9}}})
    with pytest.raises(PolicyError, match="'options' is set by sparse_compile"):
        sparse_compile.compile(model, "dense", options={})


# --- mode= reaches Inductor ------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["torch_mode", "backend_object", "options_key", "compile_helper"])
def test_mode_reaches_the_inner_inductor_compile(how):
    """Every documented form hands Inductor the mode's config patches (spied, not run: CUDA graphs need a
    GPU); an extra Inductor patch rides along."""
    from torch._inductor import list_mode_options

    model = tiny_llama(1)
    seen = []

    def spy(gm, example_inputs, config_patches=None, **kwargs):
        seen.append(dict(config_patches or {}))
        return gm.forward

    compiled = {
        "torch_mode": lambda: torch.compile(model, backend="sparse", mode="max-autotune-no-cudagraphs"),
        "backend_object": lambda: torch.compile(
            model, backend=sparse_compile.backend(inductor={"debug": False}), mode="max-autotune-no-cudagraphs"),
        "options_key": lambda: torch.compile(model, backend="sparse",
                                             options={"mode": "max-autotune-no-cudagraphs"}),
        "compile_helper": lambda: sparse_compile.compile(model, "dense", mode="max-autotune-no-cudagraphs"),
    }[how]()
    with mock.patch("torch._inductor.compile_fx.compile_fx", spy), torch.no_grad():
        out = compiled(torch.randint(0, 128, (1, 8))).logits
    assert torch.isfinite(out).all()
    assert seen, "the inner Inductor compile was not called"
    expected = list_mode_options("max-autotune-no-cudagraphs")
    assert all(patches.items() >= expected.items() for patches in seen), seen
    if how == "backend_object":
        assert all(patches.get("debug") is False for patches in seen)


def test_mode_given_twice_must_agree():
    model = tiny_llama(1)
    compiled = torch.compile(model, backend=sparse_compile.backend(mode="max-autotune"), mode="reduce-overhead")
    with pytest.raises(Exception, match="contradicts"), torch.no_grad():
        compiled(torch.randint(0, 128, (1, 8)))


# --- the method registry and the layering --------------------------------------------------------------


def test_registry_finds_every_method_module_and_nothing_else():
    files = sorted(p.stem for p in (ROOT / "sparse_compile" / "methods").glob("*.py") if not p.stem.startswith("_"))
    declared = [f for f in files
                if "\nMETHOD = Method(" in (ROOT / "sparse_compile" / "methods" / f"{f}.py").read_text()]
    assert sorted(registry()) == sorted(METHODS) == sorted(declared)
    assert {"dense", "prism"} <= set(METHODS)
    for name, method in METHODS.items():
        assert isinstance(method, Method) and method.name == name
        assert set(method.phases) <= {"prefill", "decode"} and set(method.capturable_phases) <= set(method.phases)
        method.Params()  # every method has usable defaults


def test_method_rejects_unknown_phases():
    with pytest.raises(ValueError, match="phases"):
        Method("m", ("prefil",), object, lambda *a: None)


@pytest.mark.parametrize("module", KERNEL_MODULES)
def test_kernel_modules_import_nothing_above_them(module):
    """Statically (every import in the file) and at run time (a fresh interpreter imports the module and
    no sparse_compile.methods / passes / ops module gets loaded)."""
    tree = ast.parse((ROOT / "sparse_compile" / "kernels" / f"{module}.py").read_text())
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        for name in names:
            if name.startswith("sparse_compile"):
                assert name.startswith("sparse_compile.kernels"), f"kernels/{module}.py imports {name}"
    code = (f"import sys; import sparse_compile.kernels.{module}; "
            "bad = [m for m in sys.modules if m.startswith(('sparse_compile.methods', 'sparse_compile.passes', "
            "'sparse_compile.ops'))]; print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/",
                          env={"TRITON_INTERPRET": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stdout + done.stderr


# --- the fallback decision and its reasons ---------------------------------------------------------


def test_fallback_reason_is_one_decision():
    from sparse_compile.attention_mask import SiteFacts
    from sparse_compile.ops import node_config

    facts = SiteFacts(layer=0, rotary_dim=16, head_dim=16, num_heads=4, num_kv_heads=2)
    prism = parse_config(node_config("prism", METHODS["prism"].Params(), 128, facts))
    dense = parse_config(node_config("dense", METHODS["dense"].Params(), 128, facts))
    call = CallShape(1, 4, 2, 200, 200, 16, torch.float32, "cpu")
    assert fallback_reason(prism, call, False) == (RAN, "")
    assert fallback_reason(dense, call, True) == (RAN, "")  # exact attention needs no fallback
    assert fallback_reason(prism, call, True) == (UNPROVEN_MASK, FALLBACKS[UNPROVEN_MASK])
    short = CallShape(1, 4, 2, 100, 100, 16, torch.float32, "cpu")
    assert fallback_reason(prism, short, False) == (BELOW_MIN_SEQ_LEN, "key length 100 < min_seq_len 128")
    wide = CallShape(1, 4, 2, 200, 200, 512, torch.float32, "cpu")
    code, message = fallback_reason(prism, wide, False)
    assert code != RAN and "head_dim 512" in message


def test_report_gives_the_length_gate_per_call_and_at_compile_time():
    model = tiny_llama(2)
    ids = torch.randint(0, 128, (1, 80))
    explained = sparse_compile.explain(model, ids, policy=prism_policy(100))
    assert [s.fallback for s in explained.sites] == ["key length 80 < min_seq_len 100"] * 2
    assert "key length 80 < min_seq_len 100" in str(explained)
    # the first length compiles a static graph (decided at compile time); the next ones a graph with a
    # symbolic length, where the gate is decided per call; the report follows the latest call
    compiled = sparse_compile.compile(model, prism_policy(100), inner="eager")
    with torch.no_grad():
        for length, expect_fallback in ((80, True), (130, False), (90, True)):
            x = torch.randint(0, 128, (1, length))
            torch.testing.assert_close(compiled(x).logits, model(x).logits, atol=1e-4, rtol=1e-4)
            fallbacks = compiled.sparse_report.fallbacks("prefill")
            if expect_fallback:
                assert set(fallbacks) == {0, 1} and all("min_seq_len 100" in v for v in fallbacks.values()), fallbacks
            else:
                assert fallbacks == {}, fallbacks


def test_gradients_enabled_warns_and_leaves_the_graph():
    model = tiny_llama(1)
    report = sparse_compile.Report()
    compiled = torch.compile(model, backend="sparse", options={"inner": "eager", "report": report})
    with pytest.warns(UserWarning, match="gradients are enabled"):
        compiled(torch.randint(0, 128, (1, 8)))
    assert report.sites == [] and report.rejected and "gradients" in report.rejected[0].reason


def test_use_cache_false_runs_prism_and_explain_says_which_call_it_traced():
    model = tiny_llama(2)
    ids = torch.randint(0, 128, (1, 130))
    report = sparse_compile.explain(model, ids, use_cache=False, policy=prism_policy(0))
    assert [(s.method, s.mask, s.fallback) for s in report.sites] == [("prism", "causal(q_offset=0)", "")] * 2
    assert report.rejected == [] and any("use_cache=False" in n for n in report.notes)
    usual = sparse_compile.explain(model, ids, policy=prism_policy(0))
    assert [(s.method, s.fallback) for s in usual.sites] == [("prism", "")] * 2 and usual.notes == []


# --- the op's own argument checks ------------------------------------------------------------------


def node_args(Lq=6, Lk=6, Dq=16, Dk=16, window=0, scale=0.25, method="prism"):
    from sparse_compile.attention_mask import SiteFacts
    from sparse_compile.ops import node_config

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, Lq, Dq, generator=g)
    k, v = torch.randn(1, 2, Lk, Dk, generator=g), torch.randn(1, 2, Lk, Dk, generator=g)
    facts = SiteFacts(layer=0, rotary_dim=16, head_dim=16, num_heads=4, num_kv_heads=2)
    config = node_config(method, METHODS[method].Params(), 0, facts)
    return (q, k, v, None, None, scale, True, 0, window, config)


@pytest.mark.parametrize("changes, needle", [
    ({"Dq": 8}, "q head_dim 8 != k head_dim 16"),
    ({"window": -1}, "window must be >= 0"),
    ({"scale": float("nan")}, "scale must be a finite float > 0"),
    ({"scale": 0.0}, "scale must be a finite float > 0"),
])
def test_op_rejects_inputs_that_do_not_fit(changes, needle):
    with pytest.raises(ValueError, match=needle):
        torch.ops.sparse_compile.attention(*node_args(**changes))


@pytest.mark.parametrize("method", ["dense", "prism"])
def test_op_on_empty_sequences_returns_empty(method):
    out, density, fallback = torch.ops.sparse_compile.attention(*node_args(Lq=0, Lk=0, method=method))
    assert out.shape == (1, 4, 0, 16) and density.shape == (1, 4)
    assert int(fallback) == (RAN if method == "dense" else UNSUPPORTED)  # prism: empty sequences


def test_public_names_survive_submodule_imports():
    """Importing any submodule never replaces a public name of the package (the lazy namespace binds
    submodules under their own names: no public function shares a submodule's name)."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(sparse_compile.__path__):
        importlib.import_module(f"sparse_compile.{info.name}")
        assert info.name not in sparse_compile.__all__, f"sparse_compile.{info.name} shadows a public name"
    assert callable(sparse_compile.explain) and callable(sparse_compile.compile) and callable(sparse_compile.backend)
