"""Policies: shipped ones load, files validate, and every error names file, key and what is allowed."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

import sparse_compile
from sparse_compile.params import PolicyError, param, params_from_mapping
from sparse_compile.policy import Policy, load_policy, replace_phase


def write(tmp_path, text: str):
    path = tmp_path / "my.toml"
    path.write_text(text)
    return path


def test_shipped_dense_loads_by_name_and_default():
    policy = load_policy("dense")
    assert policy.name == "dense"
    assert policy.prefill.method == "dense" and policy.decode.method == "dense"
    assert load_policy(None) == policy
    assert "dense" in sparse_compile.shipped_policies()


def test_every_shipped_policy_validates():
    for name in sparse_compile.shipped_policies():
        assert load_policy(name).name == name


def test_policy_object_passes_through():
    policy = Policy()
    assert load_policy(policy) is policy


def test_file_with_overrides(tmp_path):
    path = write(tmp_path, """
name = "mine"
[prefill]
method = "dense"
min_seq_len = 1024
[[prefill.overrides]]
layers = [0, "3-5"]
method = "dense"
""")
    policy = load_policy(path)
    assert policy.name == "mine" and policy.prefill.min_seq_len == 1024
    layers = policy.prefill.overrides[0].layers
    assert [i for i in range(8) if i in layers] == [0, 3, 4, 5]
    assert policy.to_dict()["prefill"]["overrides"][0]["layers"] == [0, "3-5"]
    assert policy.prefill.for_layer(4)[0] == "dense"
    assert policy.source == str(path)


@pytest.mark.parametrize(
    "text, needle",
    [
        ("[prefill]\nmethod = 'nope'", "key 'method' = 'nope' is not a method; allowed: dense"),
        ("[prefill]\nmethd = 'dense'", "unknown key 'methd'; allowed keys: method, min_seq_len, params, overrides"),
        ("colour = 1", "top level: unknown key 'colour'"),
        ("[prefill]\nmin_seq_len = -1", "[prefill]: key 'min_seq_len' = -1 must be an int in [0, 2**63 - 1]"),
        ("[prefill]\nmin_seq_len = 'long'", "key 'min_seq_len' = 'long' must be an int in [0"),
        ("[prefill.params]\nfoo = 1", "[prefill].params: unknown key 'foo'"),
        ("[[prefill.overrides]]\nmethod = 'dense'", "missing key 'layers'"),
        ("[[prefill.overrides]]\nlayers = ['5-2']", "#0: key 'layers': layer range '5-2' is empty (a > b)"),
        ("[[prefill.overrides]]\nlayers = [-1]", "#0: key 'layers': layer -1 is out of range; allowed: ints in [0, 1"),
        ("[[prefill.overrides]]\nlayers = []", "key 'layers' must be a non-empty list"),
        ("prefill = 3", "[prefill] must be a table"),
        ("name = 3", "key 'name' must be a string"),
        ("[prefill\n", "not valid TOML"),
    ],
)
def test_policy_errors_name_file_and_key(tmp_path, text, needle):
    path = write(tmp_path, text)
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    assert str(path) in str(err.value)
    assert needle in str(err.value)


def test_unknown_policy_name_and_missing_file(tmp_path):
    with pytest.raises(PolicyError, match="unknown policy 'nonsense'.*dense"):
        load_policy("nonsense")
    with pytest.raises(PolicyError, match="does not exist"):
        load_policy(tmp_path / "absent.toml")
    with pytest.raises(PolicyError, match="must be a name, a path"):
        load_policy(3.5)


@dataclass(frozen=True)
class Example:
    p: float = param(0.5, help="a probability", range=(0.0, 1.0))
    n: int = param(4, help="a count", range=(1, None), even=True)
    mode: str = param("a", help="a mode", choices=("a", "b"))
    flag: bool = param(True, help="a flag")
    maybe: int | None = param(None, help="optional", type=int, range=(0, 8))

    def validate(self) -> str | None:
        return "p must be > 0 when mode is 'b'" if self.mode == "b" and self.p == 0 else None


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_range_checks_follow_the_declared_range(value):
    if 0.0 <= value <= 1.0:
        assert params_from_mapping(Example, {"p": value}, "x.toml: [t]").p == value
    else:
        allowed = r"allowed: int/float in \[0.0, 1.0\]"
        with pytest.raises(PolicyError, match=r"x.toml: \[t\]: key 'p' = .* out of range; " + allowed):
            params_from_mapping(Example, {"p": value}, "x.toml: [t]")


@pytest.mark.parametrize(
    "mapping, needle",
    [
        ({"n": 3}, "must be even"),
        ({"n": 0}, "out of range"),
        ({"n": 2.0}, "wrong type; allowed: int"),
        ({"mode": "c"}, "allowed: one of 'a', 'b'"),
        ({"flag": 1}, "wrong type; allowed: bool"),
        ({"p": True}, "wrong type"),
        ({"maybe": 9}, "out of range"),
        ({"mode": "b", "p": 0.0}, "p must be > 0 when mode is 'b'"),
        ({"q": 1}, "unknown key 'q'; allowed keys: flag, maybe, mode, n, p"),
    ],
)
def test_param_errors(mapping, needle):
    with pytest.raises(PolicyError, match="f.toml") as err:
        params_from_mapping(Example, mapping, "f.toml: [prefill.params]")
    assert needle in str(err.value)


def test_fingerprint_changes_with_what_runs_not_with_name():
    a = load_policy("dense")
    b = replace_phase(a, "prefill", min_seq_len=7)
    assert a.fingerprint() != b.fingerprint()
    renamed = Policy.from_mapping({"name": "other"})
    assert renamed.fingerprint() == a.fingerprint()


def test_example_policy_files_validate():
    from pathlib import Path

    files = sorted((Path(__file__).parent.parent / "examples").glob("*.toml"))
    assert files, "examples/ ships at least one policy file"
    for path in files:
        policy = load_policy(path)
        assert policy.prefill.method in ("dense", "prism"), path.name
    first_dense = load_policy(files[0].parent / "prism_dense_first_layers.toml")
    assert first_dense.prefill.for_layer(0)[0] == "dense" and first_dense.prefill.for_layer(8)[0] == "prism"


# --- shipped policies say what they are ----------------------------------------------------------


def test_name_only_policies_hold_no_model_calibration():
    """A shipped policy named after a method (`method` or `method-lossy`) holds its generic rule: no per-model
    layer lists or chunk tables (those files carry the model's name, e.g. fasa-smollm2)."""
    from sparse_compile.methods import METHODS
    from sparse_compile.policy import LOSSY_SUFFIX

    for name in sparse_compile.shipped_policies():
        policy = sparse_compile.load_policy(name)
        params = [p for phase in (policy.prefill, policy.decode) for p in [phase.params, *(
            o.params for o in phase.overrides)]]
        if name in METHODS or name.removesuffix(LOSSY_SUFFIX) in METHODS:
            assert not any(phase.overrides for phase in (policy.prefill, policy.decode)), name
            for p in params:
                assert not getattr(p, "chunks", ()), f"{name} carries calibrated chunks"
                assert getattr(p, "layers", None) is None, f"{name} carries a layer list"
        else:
            assert name == "dense" or name.split("-")[0] in METHODS, name


def test_lossy_name_only_policies_say_so():
    """A name-only policy measured to lose what eager finds carries a warning and says so in its name and
    description (`<method>-lossy`); the others carry no warning. Asking for the old name is an error naming
    the new name, why, and a safe choice."""
    from sparse_compile.methods import METHODS
    from sparse_compile.policy import LOSSY_SUFFIX, RENAMED_LOSSY, generic_policy_name

    shipped = sparse_compile.shipped_policies()
    lossy = {n for n in shipped if n.endswith(LOSSY_SUFFIX)}
    assert lossy == {"pbs-lossy", "lessismore-lossy", "token_sparse-lossy"}
    for name in shipped:
        policy = sparse_compile.load_policy(name)
        if name in lossy:
            assert policy.warning and policy.description.startswith("Lossy"), name
        elif name in METHODS:
            assert not policy.warning, f"{name} carries a warning but is not named {name}{LOSSY_SUFFIX}"
    for old, advice in RENAMED_LOSSY.items():
        assert old not in shipped
        new = old + LOSSY_SUFFIX
        with pytest.raises(PolicyError) as err:
            load_policy(old)
        message = str(err.value)
        assert f"policy {old!r} was renamed {new!r}" in message
        assert sparse_compile.load_policy(new).warning in message and advice in message
        with pytest.raises(PolicyError, match=f"renamed {new!r}"):
            sparse_compile.backend(old)
        assert generic_policy_name(old) == new
    assert generic_policy_name("prism") == "prism" and generic_policy_name("fasa") == "fasa"
    assert generic_policy_name("no_such_method") is None


def test_policy_warning_reaches_the_user():
    """A policy measured to lose quality says so: a UserWarning when the backend is made, and the first
    line of the Report after its name."""
    import warnings

    pbs = sparse_compile.load_policy("pbs-lossy")
    assert "needle" in pbs.warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chosen = sparse_compile.backend("pbs-lossy")
    assert any("pbs-lossy" in str(w.message) and "needle" in str(w.message) for w in caught)
    chosen.report.policy, chosen.report.warning = "pbs-lossy", pbs.warning
    assert str(chosen.report).splitlines()[1] == f"WARNING: {pbs.warning}"
    assert sparse_compile.load_policy("prism").warning == ""
    with pytest.raises(sparse_compile.PolicyError, match="'warning' must be a string"):
        sparse_compile.load_policy({"name": "x", "warning": 3})
