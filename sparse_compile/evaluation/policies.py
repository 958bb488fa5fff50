"""The policies an evaluation runs: named/TOML policies, optionally swept over parameter values.

    --policy dense --policy prism --sweep 'threshold*=0.9,0.95,0.99'

runs `dense` once (it has no parameter matching `threshold*`) and `prism` three times, with every
parameter whose name matches `threshold*` (threshold_high and threshold_low) set to each value.

A sweep is `PATTERN=V1,V2,...`. A pattern without a dot matches parameter names inside every
`params` table of the policy (phase defaults and per-layer overrides); a pattern with a dot is
matched against full dotted paths such as `prefill.min_seq_len` or `prefill.params.threshold_high`
(fnmatch wildcards in both). Values are TOML literals (0.9, 128, true, "per_kv_head"). Several
sweeps form their cartesian product. Every swept policy is re-validated, so an out-of-range
value fails with the policy's own error naming the key and the allowed range.
"""

from __future__ import annotations

import fnmatch
import itertools
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparse_compile.params import PolicyError
from sparse_compile.policy import Policy, load_policy


@dataclass(frozen=True)
class Sweep:
    """One `PATTERN=V1,V2,...` argument."""

    pattern: str
    values: tuple[Any, ...]


@dataclass(frozen=True)
class PolicyRun:
    """A policy to evaluate and the label it gets in tables and plots.

    label: the shipped name, or a TOML file's stem, plus the swept values; unique in one eval.
    base: the policy's `name` (runs of one base form one curve in the density plot).
    """

    label: str
    base: str
    policy: Policy
    assignments: tuple[tuple[str, Any], ...] = ()


def parse_value(text: str) -> Any:
    """A TOML literal (`0.9`, `128`, `true`, `"x"`); a bare word is taken as a string."""
    try:
        return tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        return text.strip()


def parse_sweep(text: str) -> Sweep:
    """`PATTERN=V1,V2,...` -> Sweep; ValueError on a malformed argument."""
    pattern, sep, values = text.partition("=")
    items = [v for v in values.split(",") if v.strip()]
    if not sep or not pattern.strip() or not items:
        raise ValueError(f"sweep {text!r} must look like PATTERN=V1,V2,... (e.g. 'threshold*=0.9,0.95')")
    return Sweep(pattern.strip(), tuple(parse_value(v) for v in items))


def leaf_paths(data: Any, prefix: str = "") -> list[str]:
    """Dotted paths of every scalar leaf of a nested dict/list (list items by index)."""
    if isinstance(data, dict):
        return [p for k, v in data.items() for p in leaf_paths(v, f"{prefix}{k}.")]
    if isinstance(data, list) and data and all(isinstance(x, dict) for x in data):
        return [p for i, v in enumerate(data) for p in leaf_paths(v, f"{prefix}{i}.")]
    return [prefix[:-1]]


def matching_paths(data: dict[str, Any], pattern: str) -> list[str]:
    """Leaf paths of `data` that `pattern` selects (see the module docstring)."""
    paths = leaf_paths(data)
    if "." in pattern:
        return [p for p in paths if fnmatch.fnmatchcase(p, pattern)]
    return [p for p in paths if ".params." in p and fnmatch.fnmatchcase(p.rsplit(".", 1)[1], pattern)]


def set_path(data: dict[str, Any], path: str, value: Any) -> None:
    node: Any = data
    parts = path.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    node[parts[-1]] = value


def format_value(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)


def expand_policies(specs: list[str | Policy], sweeps: list[Sweep]) -> list[PolicyRun]:
    """One PolicyRun per policy and sweep combination that applies to it (see the module docstring).

    Raises PolicyError for an unknown policy or an invalid swept value, ValueError when a sweep
    matches no key of any policy (a typo would otherwise silently sweep nothing).
    """
    runs: list[PolicyRun] = []
    used = [False] * len(sweeps)
    for spec in specs:
        policy = load_policy(spec)
        base = policy.name
        own = Path(spec).stem if isinstance(spec, str) and spec.endswith(".toml") else base
        data = policy.to_dict()
        applicable = []
        for i, sweep in enumerate(sweeps):
            paths = matching_paths(data, sweep.pattern)
            if paths:
                used[i] = True
                applicable.append((sweep, paths))
        if not applicable:
            runs.append(PolicyRun(own, base, policy))
            continue
        for combo in itertools.product(*(s.values for s, _ in applicable)):
            changed = policy.to_dict()
            assignments = []
            for (sweep, paths), value in zip(applicable, combo, strict=True):
                for path in paths:
                    set_path(changed, path, value)
                assignments.append((sweep.pattern, value))
            label = f"{own}[" + ",".join(f"{p}={format_value(v)}" for p, v in assignments) + "]"
            changed["description"] = f"{policy.description} (swept: {label})".strip()
            try:
                swept = Policy.from_mapping(changed, source=f"{policy.source} swept {label}")
            except PolicyError as err:
                raise PolicyError(f"sweep {label}: {err}") from err
            runs.append(PolicyRun(label, base, swept, tuple(assignments)))
    unused = [s.pattern for s, u in zip(sweeps, used, strict=True) if not u]
    if unused:
        given = ", ".join(map(str, specs))
        raise ValueError(f"sweep pattern {unused[0]!r} matches no parameter of any policy given ({given})")
    labels = [r.label for r in runs]
    duplicates = sorted({x for x in labels if labels.count(x) > 1})
    if duplicates:
        raise ValueError(f"policy {duplicates[0]!r} is given twice")
    return runs
