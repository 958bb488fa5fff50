"""argparse types shared by the CLI (`sparse_compile.__main__`) and the tool harnesses (bench, eval,
calibrate): each parses one flag's text or raises `argparse.ArgumentTypeError` naming the bad value.

Tools level: it imports nothing of the package, so the CLI and every harness can import it without a circle.
"""

from __future__ import annotations

import argparse
import json


def parse_length(text: str) -> int:
    """'8K' / '8k' -> 8192, '4096' -> 4096."""
    value = text.strip()
    factor = 1024 if value[-1:] in ("k", "K") else 1
    digits = value[:-1] if factor > 1 else value
    if not digits.isdigit() or int(digits) <= 0:
        raise argparse.ArgumentTypeError(f"invalid length {text!r}: use a positive integer or e.g. 8K")
    return int(digits) * factor


def parse_lengths(text: str) -> tuple[int, ...]:
    """'2K,4K,8192' -> (2048, 4096, 8192); '' -> () is an error (give at least one)."""
    items = [t for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("give at least one length")
    return tuple(parse_length(t) for t in items)


def parse_floats(text: str) -> tuple[float, ...]:
    """'0,0.5,1' -> (0.0, 0.5, 1.0)."""
    try:
        values = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"invalid number list {text!r}: {err}") from err
    if not values:
        raise argparse.ArgumentTypeError("give at least one number")
    return values


def parse_names(text: str) -> tuple[str, ...]:
    """'a, b,c' -> ('a', 'b', 'c')."""
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    if not names:
        raise argparse.ArgumentTypeError("give at least one name")
    return names


def positive_int(text: str) -> int:
    """'3' -> 3; 0, negatives and non-integers are errors."""
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from err
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def choices_of(allowed: tuple[str, ...], what: str):
    """An argparse type for a comma list drawn from `allowed` ('ppl,niah' -> ('ppl', 'niah'))."""

    def parse(text: str) -> tuple[str, ...]:
        items = tuple(t.strip() for t in text.split(",") if t.strip())
        bad = [t for t in items if t not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"invalid {what} {bad[0] if bad else text!r}: choose from "
                                             f"{', '.join(allowed)}")
        return items

    return parse


def json_dict(text: str) -> dict:
    """'{"BLOCK_M": 128}' -> {"BLOCK_M": 128}."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"invalid JSON {text!r}: {err}") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"give a JSON object, got {text!r}")
    return value
