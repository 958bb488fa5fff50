"""Policies: which attention method runs where, loaded from TOML into frozen dataclasses.

A policy file::

    name = "prism"
    description = "Prism block-sparse prefill above 4K tokens; dense decode."

    [prefill]
    method = "prism"          # a registered method: see sparse_compile.methods.METHODS
    min_seq_len = 4096        # key length below which this phase stays dense (checked at run time)
    [prefill.params]          # the method's parameters (unknown keys are errors)
    threshold_high = 0.95

    [[prefill.overrides]]     # per-layer exceptions, first match wins
    layers = [0, "2-3"]       # layer indices and inclusive ranges, each in [0, 100000]
    method = "dense"

    [decode]
    method = "dense"

Shipped policies live in `sparse_compile/policies/<name>.toml` and load by name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from sparse_compile.layers import MAX_LAYER, LayerSet, parse_layers  # noqa: F401 - re-exported
from sparse_compile.methods import METHODS
from sparse_compile.params import (
    INT64_MAX,
    PolicyError,
    canonical_json,
    params_from_mapping,
    params_to_dict,
    show,
)

PHASES = ("prefill", "decode")
TOP_LEVEL_KEYS = ("name", "description", "warning", "prefill", "decode")
PHASE_KEYS = ("method", "min_seq_len", "params", "overrides")
OVERRIDE_KEYS = ("layers", "method", "params")


@dataclass(frozen=True)
class LayerOverride:
    """Layers `layers` run `method` with `params` instead of the phase's default.

    `layers` is a LayerSet; an iterable of ints given here is converted to one.
    """

    layers: LayerSet
    method: str
    params: Any

    def __post_init__(self) -> None:
        if not isinstance(self.layers, LayerSet):
            object.__setattr__(self, "layers", LayerSet.of(self.layers))


@dataclass(frozen=True)
class PhasePolicy:
    """What runs in one phase (prefill: q_len > 1; decode: q_len == 1)."""

    method: str = "dense"
    params: Any = None
    min_seq_len: int = 0
    overrides: tuple[LayerOverride, ...] = ()

    def for_layer(self, layer: int) -> tuple[str, Any]:
        """(method, params) for one layer: the first matching override, else the phase default."""
        for override in self.overrides:
            if layer in override.layers:
                return override.method, override.params
        return self.method, self.params


@dataclass(frozen=True)
class Policy:
    """A validated policy. Build with `load_policy` (file or shipped name) or `Policy.from_mapping`."""

    name: str = "dense"
    prefill: PhasePolicy = PhasePolicy()
    decode: PhasePolicy = PhasePolicy()
    description: str = ""
    source: str = "<default>"
    warning: str = ""  # what the policy is measured to lose (shown by the Report and `explain`), or ""

    def phase(self, phase: str) -> PhasePolicy:
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        return self.prefill if phase == "prefill" else self.decode

    def to_dict(self) -> dict[str, Any]:
        def phase_dict(p: PhasePolicy) -> dict[str, Any]:
            return {
                "method": p.method,
                "min_seq_len": p.min_seq_len,
                "params": params_to_dict(p.params),
                "overrides": [
                    {"layers": o.layers.to_list(), "method": o.method, "params": params_to_dict(o.params)}
                    for o in p.overrides
                ],
            }

        return {"name": self.name, "prefill": phase_dict(self.prefill), "decode": phase_dict(self.decode)}

    def fingerprint(self) -> str:
        """A short hash of everything that changes what runs (not the name or description)."""
        data = self.to_dict()
        data.pop("name")
        return hashlib.sha256(canonical_json(data).encode()).hexdigest()[:12]

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "<mapping>") -> Policy:
        """Validate a parsed TOML document (or any mapping of the same shape)."""
        if not isinstance(data, Mapping):
            raise PolicyError(f"{source}: a policy must be a table (mapping), got {type(data).__name__}")
        check_keys(data, TOP_LEVEL_KEYS, f"{source}: top level")
        name = data.get("name", Path(source).stem if source.endswith(".toml") else "custom")
        if not isinstance(name, str):
            raise PolicyError(f"{source}: top level: key 'name' must be a string, got {show(name)}")
        description = data.get("description", "")
        if not isinstance(description, str):
            raise PolicyError(f"{source}: top level: key 'description' must be a string, got {show(description)}")
        warning = data.get("warning", "")
        if not isinstance(warning, str):
            raise PolicyError(f"{source}: top level: key 'warning' must be a string, got {show(warning)}")
        phases = {}
        for phase in PHASES:
            table = data.get(phase, {})
            if not isinstance(table, Mapping):
                raise PolicyError(f"{source}: [{phase}] must be a table, got {type(table).__name__}")
            phases[phase] = phase_from_mapping(table, phase, source)
        return cls(name=name, description=description, source=source, warning=warning, **phases)


def check_keys(table: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for key in table:
        if key not in allowed:
            raise PolicyError(f"{where}: unknown key {str(key)!r}; allowed keys: {', '.join(allowed)}")


def method_params(method: str, table: Any, phase: str, where: str) -> Any:
    if not isinstance(method, str) or method not in METHODS:
        raise PolicyError(f"{where}: key 'method' = {show(method)} is not a method; allowed: {', '.join(METHODS)}")
    module = METHODS[method]
    if phase not in module.phases:
        raise PolicyError(
            f"{where}: method '{method}' does not run in the {phase} phase; it supports: {', '.join(module.phases)}"
        )
    if not isinstance(table, Mapping):
        raise PolicyError(f"{where}: key 'params' must be a table, got {type(table).__name__}")
    return params_from_mapping(module.Params, table, f"{where}.params")


def phase_from_mapping(table: Mapping[str, Any], phase: str, source: str) -> PhasePolicy:
    where = f"{source}: [{phase}]"
    check_keys(table, PHASE_KEYS, where)
    method = table.get("method", "dense")
    params = method_params(method, table.get("params", {}), phase, where)
    min_seq_len = table.get("min_seq_len", 0)
    if not isinstance(min_seq_len, int) or isinstance(min_seq_len, bool) or not 0 <= min_seq_len <= INT64_MAX:
        raise PolicyError(f"{where}: key 'min_seq_len' = {show(min_seq_len)} must be an int in [0, 2**63 - 1]")
    overrides = []
    raw_overrides = table.get("overrides", [])
    if not isinstance(raw_overrides, list):
        raise PolicyError(f"{where}: key 'overrides' must be an array of tables ([[{phase}.overrides]])")
    for i, item in enumerate(raw_overrides):
        owhere = f"{source}: [[{phase}.overrides]] #{i}"
        if not isinstance(item, Mapping):
            raise PolicyError(f"{owhere}: must be a table, got {type(item).__name__}")
        check_keys(item, OVERRIDE_KEYS, owhere)
        if "layers" not in item:
            raise PolicyError(f"{owhere}: missing key 'layers'")
        o_method = item.get("method", method)
        o_params = method_params(o_method, item.get("params", {}), phase, owhere)
        overrides.append(LayerOverride(parse_layers(item["layers"], owhere), o_method, o_params))
    return PhasePolicy(method=method, params=params, min_seq_len=min_seq_len, overrides=tuple(overrides))


LOSSY_SUFFIX = "-lossy"

# Name-only policies measured to lose what eager finds on a model they were not fitted to (EVAL.md, "Safe
# generic defaults"): shipped as `<method>-lossy`, so that the name a user types says so. The old name is
# an error that points to the new one and to a safe choice (`load_policy`).
RENAMED_LOSSY = {
    "pbs": "Use 'prism' (block-sparse prefill, within the budget) or calibrate per model (`calibrate pbs`)",
    "lessismore": "Use 'fasa' (sparse decode, within the budget) or calibrate per model (`calibrate lessismore`)",
    "token_sparse": "Use 'prism' (block-sparse prefill, within the budget) or calibrate per model "
                    "(`calibrate token_sparse`, e.g. token_sparse-smollm2)",
}


def shipped_policies() -> list[str]:
    """Names of the policies shipped inside the package."""
    folder = resources.files("sparse_compile") / "policies"
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def generic_policy_name(method: str) -> str | None:
    """The shipped name-only policy of `method` (its generic rule, no model's calibration): `method` itself,
    or `method-lossy` when that rule is measured to lose quality; None when neither is shipped."""
    shipped = shipped_policies()
    for name in (method, method + LOSSY_SUFFIX):
        if name in shipped:
            return name
    return None


def renamed_policy_error(name: str) -> PolicyError:
    """The error for a policy name that was renamed `<name>-lossy`: the new name, why, and what to use."""
    new = name + LOSSY_SUFFIX
    resource = resources.files("sparse_compile") / "policies" / f"{new}.toml"
    why = parse_toml(resource.read_text(), f"{new}.toml").warning
    return PolicyError(f"policy {name!r} was renamed {new!r}: it {why}. {RENAMED_LOSSY[name]}; "
                       f"or ask for {new!r} to run it as it is")


def load_policy(policy: str | Path | Policy | Mapping[str, Any] | None = None) -> Policy:
    """A Policy from a shipped name ("dense", "prism", ...), a TOML path, a mapping or a Policy.

    None means the shipped "dense" policy. Raises PolicyError naming the file and key on bad input.
    """
    if policy is None:
        policy = "dense"
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, Mapping):
        return Policy.from_mapping(policy)
    if not isinstance(policy, (str, Path)):
        raise PolicyError(f"policy must be a name, a path, a mapping or a Policy, got {type(policy).__name__}")
    text = str(policy)
    if text in shipped_policies():
        resource = resources.files("sparse_compile") / "policies" / f"{text}.toml"
        return parse_toml(resource.read_text(), f"{text}.toml")
    path = Path(text)
    if text in RENAMED_LOSSY:  # like a shipped name, it wins over a file of that name
        raise renamed_policy_error(text)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise PolicyError(f"policy file {text!r} does not exist")
        try:
            content = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise PolicyError(f"{path}: cannot read the policy file: {err}") from err
        return parse_toml(content, str(path))
    raise PolicyError(
        f"unknown policy {text!r}: not a shipped policy ({', '.join(shipped_policies())}) nor a .toml file"
    )


def parse_toml(text: str, source: str) -> Policy:
    try:
        data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, RecursionError) as err:  # RecursionError: absurdly nested arrays
        raise PolicyError(f"{source}: not valid TOML: {err}") from err
    return Policy.from_mapping(data, source)


def replace_phase(policy: Policy, phase: str, **changes: Any) -> Policy:
    """A copy of `policy` with fields of one phase replaced (e.g. a threshold sweep)."""
    new_phase = dataclasses.replace(policy.phase(phase), **changes)
    return dataclasses.replace(policy, **{phase: new_phase})
