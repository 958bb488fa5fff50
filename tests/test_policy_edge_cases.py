"""Bad policy input found by probing: every case is a PolicyError naming file, table and key.

NaN/inf floats, ints given as floats or bools, absurd or non-ASCII layer ranges, and wrongly
typed tables and keys; plus the compact, never-materialised layer sets.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sparse_compile.methods import METHODS
from sparse_compile.methods.prism import PrismParams
from sparse_compile.params import PolicyError, check_value, param, params_from_mapping
from sparse_compile.policy import MAX_LAYER, LayerOverride, LayerSet, Policy, load_policy, parse_layers


def write(tmp_path, text: str, name: str = "edge.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def load_error(tmp_path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    message = str(err.value)
    assert str(path) in message, message
    return message


def mapping_error(data) -> str:
    with pytest.raises(PolicyError) as err:
        Policy.from_mapping(data, source="m.toml")
    assert "m.toml" in str(err.value)
    return str(err.value)


def float_fields(phase: str = "prefill"):
    """(method, field) for every float parameter of every registered method of `phase`."""
    out = []
    for name, module in METHODS.items():
        if phase not in module.phases:
            continue
        for f in dataclasses.fields(module.Params):
            kind = f.metadata.get("type")
            kinds = kind if isinstance(kind, tuple) else (kind,)
            if float in kinds:
                out.append((name, f))
    return out


def int_fields(phase: str = "prefill"):
    out = []
    for name, module in METHODS.items():
        if phase not in module.phases:
            continue
        for f in dataclasses.fields(module.Params):
            if f.metadata.get("type") is int:
                out.append((name, f))
    return out


FLOAT_FIELDS = float_fields()
INT_FIELDS = int_fields()


def test_the_probe_covers_the_known_parameters():
    names = {f.name for _, f in FLOAT_FIELDS}
    assert {"threshold_high", "threshold_low", "temperature_high", "temperature_low"} <= names
    assert {"block_size", "high_dims", "low_dims"} <= {f.name for _, f in INT_FIELDS}


# --- 1. non-finite floats ---------------------------------------------------------------------

NON_FINITE_TOML = ["nan", "+nan", "-nan", "inf", "+inf", "-inf", "1e400"]


@pytest.mark.parametrize("literal", NON_FINITE_TOML)
@pytest.mark.parametrize("method, field", FLOAT_FIELDS, ids=lambda x: getattr(x, "name", x))
def test_non_finite_float_in_toml_is_rejected(tmp_path, method, field, literal):
    message = load_error(tmp_path, f"[prefill]\nmethod = '{method}'\n[prefill.params]\n{field.name} = {literal}\n")
    assert f"[prefill].params: key '{field.name}' = " in message
    assert "is not a finite number; allowed: int/float" in message
    if field.metadata.get("range") is not None:
        lo, hi = field.metadata["range"]
        assert f"in [{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]" in message  # allowed range


@pytest.mark.parametrize("method, field", float_fields("decode") + int_fields("decode"),
                         ids=lambda x: getattr(x, "name", x))
def test_decode_method_params_reject_nan_in_toml(tmp_path, method, field):
    message = load_error(tmp_path, f"[decode]\nmethod = '{method}'\n[decode.params]\n{field.name} = nan\n")
    assert f"[decode].params: key '{field.name}' = nan" in message


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, float("-nan")])
@pytest.mark.parametrize("method, field", FLOAT_FIELDS, ids=lambda x: getattr(x, "name", x))
def test_non_finite_float_in_mapping_is_rejected(method, field, value):
    data = {"prefill": {"method": method, "params": {field.name: value}}}
    message = mapping_error(data)
    assert f"m.toml: [prefill].params: key '{field.name}' = {value!r} is not a finite number" in message


@pytest.mark.parametrize("method, field", FLOAT_FIELDS, ids=lambda x: getattr(x, "name", x))
@pytest.mark.parametrize("where", ["prefill", "override"])
def test_nan_in_an_override_is_rejected(method, field, where):
    overrides = [{"layers": [0], "method": method, "params": {field.name: math.nan}}]
    message = mapping_error({"prefill": {"overrides": overrides}})
    assert f"[[prefill.overrides]] #0.params: key '{field.name}' = nan is not a finite number" in message


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_direct_construction_rejects_non_finite(value):
    with pytest.raises(PolicyError, match="threshold_high.*not a finite number"):
        PrismParams(threshold_high=value)


@dataclass(frozen=True)
class Unbounded:
    x: float = param(1.0, help="a float without a range")
    n: int = param(4, help="an int without a range")
    maybe: int | None = param(None, help="optional int", type=int)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_float_without_a_range_still_rejects_non_finite(value):
    with pytest.raises(PolicyError, match=r"f.toml: \[t\]: key 'x' = .* is not a finite number; allowed: int/float"):
        params_from_mapping(Unbounded, {"x": value}, "f.toml: [t]")


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_finite_floats_pass_an_unbounded_field(value):
    assert params_from_mapping(Unbounded, {"x": value}, "f.toml: [t]").x == value


def test_check_value_accepts_finite_and_normalises_ints():
    f = {f.name: f for f in dataclasses.fields(PrismParams)}["threshold_high"]
    value = check_value(f, 1, "w")
    assert value == 1.0 and type(value) is float


# --- ints must be ints ------------------------------------------------------------------------

@pytest.mark.parametrize("literal", ["64.0", "128.0", "true", "false", "'128'", "[128]", "1e9"])
@pytest.mark.parametrize("method, field", INT_FIELDS, ids=lambda x: getattr(x, "name", x))
def test_int_field_rejects_floats_bools_and_strings(tmp_path, method, field, literal):
    message = load_error(tmp_path, f"[prefill]\nmethod = '{method}'\n[prefill.params]\n{field.name} = {literal}\n")
    assert f"[prefill].params: key '{field.name}' = " in message
    assert "has the wrong type; allowed: " in message


@pytest.mark.parametrize(
    "mapping, needle",
    [
        ({"high_dims": -2}, "key 'high_dims' = -2 is out of range"),
        ({"low_dims": 0}, "key 'low_dims' = 0 is out of range"),
        ({"high_dims": 2**63}, "key 'high_dims' = 9223372036854775808 is out of range (not a 64-bit integer)"),
        ({"high_dims": 10**5000}, "key 'high_dims' = <int of about"),  # repr() of it would raise ValueError
        ({"threshold_high": 10**400}, "is out of range (not a 64-bit integer)"),  # float() of it would overflow
        ({"threshold_high": -(2**64)}, "out of range"),
        ({"high_dims": 65}, "must be even"),
        ({"block_size": 96}, "key 'block_size' = 96 is not allowed; allowed: one of 64, 128"),
        ({"block_size": True}, "key 'block_size' = True has the wrong type"),
        ({"calibrate": 1}, "key 'calibrate' = 1 has the wrong type; allowed: bool"),
        ({"gqa": 1}, "key 'gqa' = 1 has the wrong type; allowed: one of 'per_head', 'per_kv_head'"),
        ({"gqa": "per_group"}, "key 'gqa' = 'per_group' is not allowed; allowed: one of 'per_head'"),
        ({"gqa": None}, "key 'gqa' = None"),
        ({"threshold_low": "0.9"}, "key 'threshold_low' = '0.9' has the wrong type"),
        ({"threshold_low": None}, "key 'threshold_low' = None has the wrong type"),
        ({1: 2}, "unknown key '1'"),
        ({1: 2, (3,): 4, "z": 5}, "unknown key"),  # keys of mixed types still sort for the message
    ],
)
def test_prism_params_bad_values(mapping, needle):
    with pytest.raises(PolicyError) as err:
        params_from_mapping(PrismParams, mapping, "p.toml: [prefill].params")
    assert str(err.value).startswith("p.toml: [prefill].params: ")
    assert needle in str(err.value)


@pytest.mark.parametrize("table", [None, 3, "x", [("threshold_high", 0.9)]])
def test_params_from_mapping_rejects_a_non_table(table):
    with pytest.raises(PolicyError, match=r"p.toml: \[prefill\].params: must be a table"):
        params_from_mapping(PrismParams, table, "p.toml: [prefill].params")


def test_long_values_are_shortened_in_messages():
    with pytest.raises(PolicyError) as err:
        params_from_mapping(PrismParams, {"gqa": "x" * 10_000}, "p.toml: [prefill].params")
    assert len(str(err.value)) < 400


# --- 2./3. layers -----------------------------------------------------------------------------

@pytest.mark.parametrize(
    "layers, needle",
    [
        (["0-1000000000000"], "layer range '0-1000000000000' is out of range"),
        (["0-" + "9" * 5000], "is out of range"),  # int() of it would raise ValueError
        ([f"0-{MAX_LAYER + 1}"], "is out of range"),
        ([MAX_LAYER + 1], f"layer {MAX_LAYER + 1} is out of range"),
        ([2**70], "is out of range"),
        ([-1], "layer -1 is out of range"),
        (["5-2"], "layer range '5-2' is empty (a > b)"),
        (["²-³"], "entry '²-³' is not a layer or an 'a-b' range"),
        (["1-³"], "is not a layer or an 'a-b' range"),
        (["٣-٥"], "is not a layer or an 'a-b' range"),  # Arabic-Indic digits
        (["３-５"], "is not a layer or an 'a-b' range"),  # full-width digits
        (["1_000"], "is not a layer"),
        (["-1-3"], "is not a layer"),
        (["1-2-3"], "is not a layer"),
        (["1-"], "is not a layer"),
        (["-"], "is not a layer"),
        ([""], "is not a layer"),
        (["   "], "is not a layer"),
        (["3-4\n"], "is not a layer"),
        (["0x10"], "is not a layer"),
        ([True], "entry True is not a layer"),
        ([False], "entry False is not a layer"),
        ([1.0], "entry 1.0 is not a layer"),
        ([math.nan], "entry nan is not a layer"),
        ([None], "entry None is not a layer"),
        ([[0, 1]], "entry [0, 1] is not a layer"),
        ([{"a": 1}], "is not a layer"),
        ([], "key 'layers' must be a non-empty list"),
        ("0-3", "key 'layers' must be a non-empty list, got '0-3'"),
        (3, "key 'layers' must be a non-empty list, got 3"),
        ({"0": 1}, "key 'layers' must be a non-empty list"),
        ((0, 1), "key 'layers' must be a non-empty list"),
    ],
)
def test_bad_layers_name_file_table_and_key(layers, needle):
    message = mapping_error({"prefill": {"overrides": [{"layers": layers}]}})
    assert "m.toml: [[prefill.overrides]] #0: key 'layers'" in message
    assert needle in message
    assert f"{MAX_LAYER}" in message  # says what is allowed


@pytest.mark.parametrize(
    "toml_layers, needle",
    [
        ('["0-1000000000000"]', "'0-1000000000000' is out of range; allowed: ints in [0, 100000]"),
        ('["²-³"]', "entry '²-³' is not a layer or an 'a-b' range"),
        ("[true]", "entry True is not a layer"),
        ("[1.5]", "entry 1.5 is not a layer"),
        ("[9223372036854775807]", "layer 9223372036854775807 is out of range"),
    ],
)
def test_bad_layers_from_toml(tmp_path, toml_layers, needle):
    message = load_error(tmp_path, f"[[decode.overrides]]\nlayers = {toml_layers}\n")
    assert "[[decode.overrides]] #0: key 'layers'" in message
    assert needle in message


@pytest.mark.parametrize(
    "layers, expected",
    [
        ([" 2 - 4 "], ["2-4"]),
        (["\t2-4\t"], ["2-4"]),
        (["007-008"], ["7-8"]),
        (["3"], [3]),
        ([" 3 "], [3]),
        ([5, "0-3", 4, "2-2"], ["0-5"]),  # unsorted, overlapping and adjacent entries merge
        ([9, 1, 1, 3], [1, 3, 9]),
        (["0-1", "3-4"], ["0-1", "3-4"]),
        ([f"0-{MAX_LAYER}"], [f"0-{MAX_LAYER}"]),
        ([MAX_LAYER], [MAX_LAYER]),
    ],
)
def test_layers_are_canonical_ranges(layers, expected):
    policy = Policy.from_mapping({"prefill": {"overrides": [{"layers": layers}]}})
    assert policy.to_dict()["prefill"]["overrides"][0]["layers"] == expected
    same = Policy.from_mapping({"prefill": {"overrides": [{"layers": expected}]}})
    assert policy.fingerprint() == same.fingerprint()
    assert policy.prefill.overrides[0].layers == same.prefill.overrides[0].layers


def test_the_whole_layer_range_is_never_materialised():
    layers = parse_layers([f"0-{MAX_LAYER}", 5], "w")
    assert layers.ranges == ((0, MAX_LAYER),)
    assert 0 in layers and MAX_LAYER in layers and MAX_LAYER + 1 not in layers and -1 not in layers
    assert len(layers) == MAX_LAYER + 1


def test_membership_ignores_non_integers():
    layers = parse_layers([1, "3-4"], "w")
    assert "3" not in layers and None not in layers and 3.5 not in layers and [3] not in layers
    assert 3 in layers and 4 in layers and 2 not in layers
    assert True in layers and False not in layers  # bool is the int index 1, as it was for a frozenset


def test_layer_override_converts_an_int_set_and_round_trips():
    override = LayerOverride(frozenset({4, 0, 1, 2}), "dense", METHODS["dense"].Params())
    assert isinstance(override.layers, LayerSet)
    assert override.layers.to_list() == ["0-2", 4]
    assert 1 in override.layers and 3 not in override.layers


def test_to_dict_round_trips_through_from_mapping():
    data = {
        "name": "rt",
        "prefill": {
            "method": "prism",
            "min_seq_len": 128,
            "params": {"threshold_high": 0.9},
            "overrides": [
                {"layers": ["10-20", 0, 1], "method": "dense"},
                {"layers": [5], "params": {"gqa": "per_kv_head"}},
            ],
        },
    }
    policy = Policy.from_mapping(data)
    again = Policy.from_mapping(policy.to_dict())
    assert again.to_dict() == policy.to_dict()
    assert again.fingerprint() == policy.fingerprint()
    assert [policy.prefill.for_layer(i)[0] for i in (0, 1, 2, 5, 15, 21)] == ["dense", "dense", "prism", "prism",
                                                                              "dense", "prism"]
    assert policy.prefill.for_layer(5)[1].gqa == "per_kv_head"


@st.composite
def layer_specs(draw):
    items = draw(st.lists(st.one_of(
        st.integers(0, 60),
        st.tuples(st.integers(0, 60), st.integers(0, 20)).map(lambda t: f"{t[0]}-{t[0] + t[1]}"),
    ), min_size=1, max_size=8))
    return items


@given(layer_specs())
def test_layer_set_matches_the_naive_set(items):
    naive = set()
    for item in items:
        if isinstance(item, int):
            naive.add(item)
        else:
            lo, hi = map(int, item.split("-"))
            naive.update(range(lo, hi + 1))
    layers = parse_layers(items, "w")
    assert {i for i in range(-2, 100) if i in layers} == naive
    assert len(layers) == len(naive)
    assert parse_layers(layers.to_list(), "w") == layers  # the canonical form is a fixed point


# --- 4. other wrongly typed keys and tables ---------------------------------------------------

@pytest.mark.parametrize(
    "text, needle",
    [
        ("[prefill]\nmethod = 3", "[prefill]: key 'method' = 3 is not a method; allowed: " + ", ".join(METHODS)),
        ("[prefill]\nmethod = ['prism']", "[prefill]: key 'method' = ['prism'] is not a method"),
        ("[prefill]\nmethod = {x = 1}", "[prefill]: key 'method' = {'x': 1} is not a method"),
        ("[decode]\nmethod = 'prism'", "[decode]: method 'prism' does not run in the decode phase"),
        ("[prefill]\nmin_seq_len = 1e9", "[prefill]: key 'min_seq_len' = 1000000000.0 must be an int"),
        ("[prefill]\nmin_seq_len = 4096.0", "[prefill]: key 'min_seq_len' = 4096.0 must be an int"),
        ("[prefill]\nmin_seq_len = true", "[prefill]: key 'min_seq_len' = True must be an int"),
        ("[prefill]\nmin_seq_len = nan", "[prefill]: key 'min_seq_len' = nan must be an int"),
        ("[prefill]\nmin_seq_len = -9223372036854775808", "key 'min_seq_len' = -9223372036854775808 must be"),
        ("[prefill]\nparams = 3", "[prefill]: key 'params' must be a table, got int"),
        ("[prefill]\nparams = [1, 2]", "[prefill]: key 'params' must be a table, got list"),
        ("[prefill]\nparams = 'x'", "[prefill]: key 'params' must be a table, got str"),
        ("[prefill]\noverrides = 3", "[prefill]: key 'overrides' must be an array of tables"),
        ("[prefill]\noverrides = {layers = [0]}", "[prefill]: key 'overrides' must be an array of tables"),
        ("[prefill]\noverrides = [1]", "[[prefill.overrides]] #0: must be a table, got int"),
        ("[[prefill.overrides]]\nlayers = [0]\nparams = 3", "[[prefill.overrides]] #0: key 'params' must be a table"),
        ("[[prefill.overrides]]\nlayers = [0]\nparams = [1]", "[[prefill.overrides]] #0: key 'params' must be a table"),
        ("[[prefill.overrides]]\nlayers = [0]\nmethod = 3", "[[prefill.overrides]] #0: key 'method' = 3 is not a"),
        ("[[prefill.overrides]]\nlayers = [0]\nmethod = true", "#0: key 'method' = True is not a method"),
        ("[[prefill.overrides]]\nlayers = [0]\nlayer = 1", "[[prefill.overrides]] #0: unknown key 'layer'"),
        (
            "[prefill]\nmethod = 'prism'\n[[prefill.overrides]]\nlayers = [0]\n[prefill.overrides.params]\n"
            "threshold_low = nan",
            "[[prefill.overrides]] #0.params: key 'threshold_low' = nan is not a finite number",
        ),
        ("name = 3", "top level: key 'name' must be a string, got 3"),
        ("name = true", "top level: key 'name' must be a string, got True"),
        ("name = ['a']", "top level: key 'name' must be a string"),
        ("name = {a = 1}", "top level: key 'name' must be a string"),
        ("description = 1.5", "top level: key 'description' must be a string, got 1.5"),
        ("decode = [1]", "[decode] must be a table, got list"),
        ("decode = 'dense'", "[decode] must be a table, got str"),
        ("a = " + "[" * 5000 + "]" * 5000, "not valid TOML"),
    ],
)
def test_wrong_types_name_file_table_and_key(tmp_path, text, needle):
    assert needle in load_error(tmp_path, text)


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"prefill": {"min_seq_len": 2**64}}, "[prefill]: key 'min_seq_len' = 18446744073709551616 must be an int"),
        ({"prefill": {"min_seq_len": 10**5000}}, "[prefill]: key 'min_seq_len' = <int of about"),
        ({"prefill": {"min_seq_len": None}}, "[prefill]: key 'min_seq_len' = None must be an int"),
        ({"prefill": {"params": None}}, "[prefill]: key 'params' must be a table, got NoneType"),
        ({"prefill": {"overrides": [{"layers": [0], "params": None}]}}, "#0: key 'params' must be a table"),
        ({"prefill": {"overrides": ({"layers": [0]},)}}, "[prefill]: key 'overrides' must be an array"),
        ({"prefill": {"method": None}}, "[prefill]: key 'method' = None is not a method"),
        ({"name": None}, "top level: key 'name' must be a string, got None"),
        ({"name": b"x"}, "top level: key 'name' must be a string, got b'x'"),
        ({1: 2}, "top level: unknown key '1'"),
        ({"prefill": {1: 2}}, "[prefill]: unknown key '1'"),
        ({"prefill": None}, "[prefill] must be a table, got NoneType"),
    ],
)
def test_wrong_types_in_a_mapping(data, needle):
    assert needle in mapping_error(data)


@pytest.mark.parametrize("data", [[], [("name", "x")], "name = 'x'", 3, None])
def test_a_policy_that_is_not_a_mapping(data):
    with pytest.raises(PolicyError, match=r"m.toml: a policy must be a table"):
        Policy.from_mapping(data, source="m.toml")


def test_unreadable_policy_files(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"name = '\xe9'\n")
    with pytest.raises(PolicyError, match="latin1.toml: cannot read the policy file"):
        load_policy(path)
    (tmp_path / "dir.toml").mkdir()
    with pytest.raises(PolicyError, match="does not exist"):
        load_policy(tmp_path / "dir.toml")
