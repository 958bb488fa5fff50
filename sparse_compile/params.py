"""Method parameters as frozen dataclasses whose fields carry their type, allowed range and help.

Every method declares one parameter class, e.g.::

    @dataclass(frozen=True)
    class PrismParams:
        block_size: int = param(128, help="tokens per block", choices=(64, 128))
        threshold_high: float = param(0.95, help="top-p mass of the high band", range=(0.0, 1.0))

`params_from_mapping(PrismParams, toml_table, where="prism.toml: [prefill.params]")` builds one
from a TOML table, rejecting unknown keys, wrong types and out-of-range values with a
`PolicyError` that names the file, the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any


class PolicyError(ValueError):
    """A policy (file, table or object) that cannot be used; the message names file and key."""


def show(value: Any, limit: int = 60) -> str:
    """repr(value) for an error message: shortened, and safe for ints too long to print."""
    try:
        text = repr(value)
    except ValueError:  # int with more digits than sys.get_int_max_str_digits()
        text = f"<int of about {int(value.bit_length() * 0.30103)} digits>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def param(
    default: Any,
    *,
    help: str,
    range: tuple[float | None, float | None] | None = None,
    choices: tuple[Any, ...] | None = None,
    type: type | tuple[type, ...] | None = None,
    even: bool = False,
    quality: str | None = None,
    convert: Any = None,
) -> Any:
    """A dataclass field with validation metadata.

    range: inclusive (low, high); either end may be None (unbounded).
    choices: the only allowed values.
    type: the accepted Python type(s); inferred from `default` when omitted (an int default
      accepts only ints; a float default accepts ints and floats).
    even: the value must be an even integer.
    quality: marks the method's quality knob for `calibrate --max-dppl` and says its direction:
      "higher" (a larger value is closer to exact attention, and denser) or "lower" (a smaller one
      is). The knob must be a float with a finite `range`; a method may mark several fields (they
      are set together, e.g. Prism's two band thresholds).
    convert: optional (value, key, where) -> canonical value, applied after the checks by `MethodParams`
      (e.g. `sparse_compile.layers.layer_list` for a list of layers).
    """
    if quality not in (None, "higher", "lower"):
        raise ValueError(f"param(): quality must be 'higher', 'lower' or None, got {quality!r}")
    kind = type if type is not None else builtin_type(default)
    meta = {"help": help, "range": range, "choices": choices, "type": kind, "even": even, "quality": quality,
            "convert": convert}
    return dataclasses.field(default=default, metadata=meta)


def builtin_type(value: Any) -> type | tuple[type, ...]:
    if isinstance(value, bool):
        return bool
    if isinstance(value, int):
        return int
    if isinstance(value, float):
        return (int, float)
    if isinstance(value, str):
        return str
    raise TypeError(f"param(): give type= for a default of {show(value)}")


def describe_allowed(f: dataclasses.Field) -> str:
    meta = f.metadata
    if meta.get("choices") is not None:
        return "one of " + ", ".join(repr(c) for c in meta["choices"])
    kind = meta.get("type")
    names = "/".join(t.__name__ for t in (kind if isinstance(kind, tuple) else (kind,)) if t is not None)
    parts = [names or "any"]
    if meta.get("range") is not None:
        lo, hi = meta["range"]
        parts.append(f"in [{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]")
    if meta.get("even"):
        parts.append("even")
    return " ".join(parts)


INT64_MAX = 2**63 - 1  # ints must fit the TOML integer type (and the op's JSON config)


def check_value(f: dataclasses.Field, value: Any, where: str) -> Any:
    """Return `value` (floats normalised) if it is allowed for field `f`; else raise PolicyError.

    Floats must be finite (NaN passes every `<`/`>` test, so it is rejected explicitly, as are
    +-inf); ints must fit in 64 bits; bools are never ints or floats.
    """
    meta = f.metadata
    allowed = describe_allowed(f)
    if value is None and f.default is None:
        return None
    kind = meta.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, tuple) else (kind,)
        bad_bool = isinstance(value, bool) and bool not in kinds
        if bad_bool or not isinstance(value, kinds):
            raise PolicyError(f"{where}: key '{f.name}' = {show(value)} has the wrong type; allowed: {allowed}")
        if isinstance(value, int) and not isinstance(value, bool) and not -INT64_MAX - 1 <= value <= INT64_MAX:
            raise PolicyError(
                f"{where}: key '{f.name}' = {show(value)} is out of range (not a 64-bit integer); allowed: {allowed}"
            )
        if float in kinds and not isinstance(value, bool):
            value = float(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise PolicyError(f"{where}: key '{f.name}' = {show(value)} is not a finite number; allowed: {allowed}")
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise PolicyError(f"{where}: key '{f.name}' = {show(value)} is not allowed; allowed: {allowed}")
    if meta.get("range") is not None:
        lo, hi = meta["range"]
        try:
            inside = (lo is None or value >= lo) and (hi is None or value <= hi)
        except TypeError:  # an untyped field holding something that does not compare with numbers
            inside = False
        if not inside:
            raise PolicyError(f"{where}: key '{f.name}' = {show(value)} is out of range; allowed: {allowed}")
    if meta.get("even") and (not isinstance(value, int) or value % 2 != 0):
        raise PolicyError(f"{where}: key '{f.name}' = {show(value)} must be even; allowed: {allowed}")
    return value


def params_from_mapping(cls: type, mapping: Mapping[str, Any], where: str) -> Any:
    """Build the frozen parameter dataclass `cls` from a mapping, validating every key.

    Raises PolicyError naming `where` (file and table), the key and the allowed values.
    After the per-field checks, `cls.validate(self) -> str | None` (if defined) may reject
    combinations; its message is raised with `where` prefixed.
    """
    if not isinstance(mapping, Mapping):
        raise PolicyError(f"{where}: must be a table, got {type(mapping).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted((key for key in mapping if key not in known), key=str)
    if unknown:
        raise PolicyError(
            f"{where}: unknown key '{unknown[0]}'; allowed keys: {', '.join(sorted(known)) or '(none)'}"
        )
    values = {name: check_value(known[name], value, where) for name, value in mapping.items()}
    try:
        obj = cls(**values)
    except PolicyError as err:  # checks a Params class makes while it builds itself (e.g. a nested table)
        raise PolicyError(f"{where}: {err}") from err
    validate = getattr(obj, "validate", None)
    if validate is not None:
        problem = validate()
        if problem:
            raise PolicyError(f"{where}: {problem}")
    return obj


def params_to_dict(obj: Any) -> dict[str, Any]:
    """The parameters as a plain dict (for reports, hashing and the op's JSON argument)."""
    return dataclasses.asdict(obj)


def params_help(cls: type) -> list[tuple[str, Any, str, str]]:
    """(name, default, allowed, help) for each field: what docs and `--help` print."""
    return [(f.name, f.default, describe_allowed(f), f.metadata.get("help", "")) for f in dataclasses.fields(cls)]


def canonical_json(data: Mapping[str, Any]) -> str:
    """Deterministic JSON (sorted keys, no spaces): the op's `config` string argument."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


@dataclasses.dataclass(frozen=True)
class MethodParams:
    """Base of every method's frozen parameter dataclass: the one validation loop.

    Construction (from a policy table or in code) checks each field against its `param(...)` metadata and
    stores its canonical value (`convert`); `validate()` holds a method's cross-field checks (a message
    naming the keys, or None) and is called by `params_from_mapping` when a policy loads."""

    def __post_init__(self) -> None:
        where = type(self).__name__
        for f in dataclasses.fields(self):
            value = check_value(f, getattr(self, f.name), where)
            convert = f.metadata.get("convert")
            if convert is not None:
                value = convert(value, f.name, where)
            object.__setattr__(self, f.name, value)

    def validate(self) -> str | None:
        return None
