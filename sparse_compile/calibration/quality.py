"""The generic calibration: per-layer values of a method's quality knob under a perplexity budget.

    python -m sparse_compile calibrate prism --max-dppl 0.5 --lengths 8K --out prism-smollm2.toml

A method declares its knob in its Params: `param(..., quality="higher")` (a larger value is closer
to exact attention) or `quality="lower"`. Every field so marked is set to the same value per layer.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any


def quality_knobs(params_cls: type) -> list[str]:
    """Names of the fields of a method's Params marked `quality=` (its quality knob), in field order."""
    if not dataclasses.is_dataclass(params_cls):
        return []
    return [f.name for f in dataclasses.fields(params_cls) if f.metadata.get("quality")]


def description(method: str) -> str:
    return (f"Search per-layer values of {method}'s quality knob that minimise mean attention density subject "
            "to a perplexity budget on calibration windows, verify on held-out windows, write a policy.")


def add_quality_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the generic search (the common ones come from `add_common_arguments`)."""
    from sparse_compile.__main__ import parse_lengths, positive_int

    parser.add_argument("--max-dppl", type=float, required=True, metavar="PCT",
                        help="perplexity budget: relative PPL increase over the eager model, in percent (e.g. 0.5)")
    parser.add_argument("--lengths", type=parse_lengths, default=(8192,), help="window lengths (default 8K)")
    parser.add_argument("--windows", type=positive_int, default=2, help="calibration windows per length (2)")
    parser.add_argument("--holdout-windows", type=positive_int, default=2,
                        help="held-out verification windows per length, at other text positions (2)")
    parser.add_argument("--base", help="policy whose other settings are kept (default: the shipped policy named "
                        "after the method, else one built from the method's defaults)")
    parser.add_argument("--name", help="name of the written policy (default: <method>-<model>)")
    parser.add_argument("--inner", choices=("eager", "inductor"), default="eager",
                        help="inner compiler of the sparse backend (default eager)")
    parser.add_argument("--cache-dir", default=None, help="where eager baselines are cached (default: eval's)")
    parser.add_argument("--no-cache", action="store_true", help="recompute the eager baseline, cache nothing")
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads")


def run_quality(args: argparse.Namespace) -> int:
    """Run the generic search for `args.method` (see the module docstring)."""
    raise ValueError(f"calibrate {args.method} --max-dppl: the generic search is not implemented yet")


__all__: list[Any] = ["add_quality_arguments", "description", "quality_knobs", "run_quality"]
