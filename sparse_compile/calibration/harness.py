"""`python -m sparse_compile calibrate METHOD`: one harness over the calibration procedures, driven by what the
method declares (`Method.knobs`: the Params fields to tune, the procedure, the phase it measures).

    python -m sparse_compile calibrate prism --max-dppl 0.5 --lengths 4K,8K --out prism-tuned.toml
    python -m sparse_compile calibrate fasa --out fasa-smollm2.toml

Procedures (a method names one per knob; adding a method adds a declaration, not a module):
  quality            per-layer values of the fields marked `param(..., quality=...)` under a perplexity budget
                     (`--max-dppl`; quality.py)
  chunks             per-head RoPE-frequency chunks from decode attention on real text (decode_attention.py)
  selection_layers   the layers whose decode token sets cover the others' attention best (decode_attention.py)
  drift_layers       the layers whose hidden states drift least (drift.py)
`calibrate METHOD` runs the method's first non-quality knob's procedure, or its quality knob's; `--max-dppl`
picks the quality knob. Every procedure gets the common flags (`add_common_arguments`) and ends with the needle
check (needles.py: eval's NIAH grid, eager vs the policy; a lost needle moves to the procedure's safer
candidates, and a policy that still loses one is written as `<out>.unverified.toml`, exit status 1).

    calibratable()             {method: its knobs} of the registered methods that declare any
    calibration_parser(m)      the argparse parser of `calibrate m`
    run_calibration(m, argv)   parse argv for method m and run it (ValueError on bad input)
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from sparse_compile.calibration import decode_attention, drift, quality
from sparse_compile.evaluation.corpus import CORPORA, DEFAULT_CORPUS
from sparse_compile.evaluation.device import DTYPES, default_device
from sparse_compile.evaluation.models import DEFAULT_MODEL
from sparse_compile.method import PROCEDURES, Knob
from sparse_compile.methods import METHODS

COMMON_OPTIONS = ("--model", "--corpus", "--out", "--device", "--dtype", "--no-progress")


@dataclass(frozen=True)
class Procedure:
    """How the harness runs one `Knob.procedure`: its flags, its run (exit status), its one-line description."""

    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str


RUNNERS = {
    "quality": Procedure(quality.add_quality_arguments, quality.run_quality,
                         "Search per-layer values of the method's quality knob that minimise mean attention density "
                         "subject to a perplexity budget on calibration windows, verify on held-out windows, write "
                         "a policy."),
    "chunks": Procedure(decode_attention.add_chunks_arguments, decode_attention.run_chunks,
                        "Rank each head's RoPE frequency chunks by how well they predict the top keys at decode "
                        "steps over real text, and write the dominant ones into a policy."),
    "selection_layers": Procedure(decode_attention.add_selection_arguments, decode_attention.run_selection_layers,
                                  "Choose the selection layers whose decode token sets hold most of the following "
                                  "layers' attention, and write them into a policy."),
    "drift_layers": Procedure(drift.add_drift_arguments, drift.run_drift_layers,
                              "Choose the method's layers by representation drift on real text (the layers that "
                              "change the residual stream least) and write them into a policy."),
}
assert set(RUNNERS) == set(PROCEDURES), "every declared procedure has a runner"


def calibratable() -> dict[str, tuple[Knob, ...]]:
    """{method name: its knobs} of the registered methods that declare any."""
    return {name: method.knobs for name, method in METHODS.items() if method.knobs}


def available() -> list[str]:
    """Method names `calibrate` accepts."""
    return sorted(calibratable())


def wants_generic(method: str, argv: list[str]) -> bool:
    """`--max-dppl` given for a method with a quality knob: the quality procedure, even when the method also
    declares another knob."""
    knobs = calibratable().get(method, ())
    return any(a == "--max-dppl" or a.startswith("--max-dppl=") for a in argv) and any(
        k.procedure == "quality" for k in knobs)


def chosen_knob(method: str, generic: bool = False) -> Knob:
    """The knob `calibrate method` tunes: the quality knob when `generic`, else the first other knob (or the
    quality knob when it has no other); ValueError for a method that declares none."""
    knobs = calibratable().get(method)
    if not knobs:
        raise ValueError(f"cannot calibrate {method!r}: choose one of {', '.join(available()) or '(none)'} "
                         "(a method declares what calibrate tunes in its METHOD's knobs)")
    quality_knobs = [k for k in knobs if k.procedure == "quality"]
    others = [k for k in knobs if k.procedure != "quality"]
    return quality_knobs[0] if generic or not others else others[0]


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every calibration accepts; those `parser` already has are left as the procedure declared them."""
    have = set(parser._option_string_actions)  # the flags a procedure's add_arguments() already declared
    specs: list[tuple[str, dict]] = [
        ("--model", {"default": DEFAULT_MODEL,
                     "help": f"'{DEFAULT_MODEL}' (default), a .gguf file, or a local Hugging Face model dir"}),
        ("--corpus", {"default": None,
                      "help": f"named corpus ({', '.join(CORPORA)}) or a UTF-8 text file; default {DEFAULT_CORPUS} "
                              "when installed, else licenses"}),
        ("--out", {"default": None, "help": "the policy TOML to write"}),
        ("--device", {"default": None, "help": f"cpu or cuda (default: {default_device()} here, cuda when available)"}),
        ("--dtype", {"default": "fp32", "choices": tuple(DTYPES), "help": "model dtype (default fp32)"}),
        ("--no-progress", {"action": "store_true", "help": "no progress bars"}),
    ]
    for flag, kwargs in specs:
        if flag not in have:
            parser.add_argument(flag, **kwargs)


def calibration_parser(method: str, prog: str = "python -m sparse_compile calibrate",
                       generic: bool = False) -> argparse.ArgumentParser:
    """The parser of `calibrate <method>` (generic: the quality knob's, --max-dppl); ValueError for a method
    that declares no knob."""
    knob = chosen_knob(method, generic)
    runner = RUNNERS[knob.procedure]
    parser = argparse.ArgumentParser(prog=f"{prog} {method}", description=f"{method} ({', '.join(knob.fields)}): "
                                     f"{runner.description}")
    runner.add_arguments(parser)
    add_common_arguments(parser)
    return parser


def run_calibration(method: str, argv: list[str], prog: str = "python -m sparse_compile calibrate") -> int:
    """Parse `argv` with `calibration_parser(method)` and run the knob's procedure; returns the exit status.

    ValueError for an unknown method or bad input found by the calibration; argparse exits 2 itself
    on a bad flag.
    """
    generic = wants_generic(method, argv)
    knob = chosen_knob(method, generic)
    args = calibration_parser(method, prog, generic).parse_args(argv)
    args.method, args.knob = method, knob
    args.command_argv = ["calibrate", method, *argv]  # what the written policy records as its command
    return int(RUNNERS[knob.procedure].run(args))
