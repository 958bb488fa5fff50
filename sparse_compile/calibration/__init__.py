"""Calibration: tune a method's parameters on real text and write a policy (`python -m sparse_compile calibrate`).

    python -m sparse_compile calibrate prism --max-dppl 0.5 --lengths 4K,8K --out prism-tuned.toml
    python -m sparse_compile calibrate fasa --out fasa-smollm2.toml          # a method's own calibration

Two kinds of calibration, found by looking (no list to edit):

* A method-specific calibration is a module `sparse_compile/calibration/<method>.py` (named after the
  registered method) that defines::

      def add_arguments(parser: argparse.ArgumentParser) -> None   # its own flags
      def run(args: argparse.Namespace) -> int                       # exit status; ValueError on bad input

  `calibrate <method> ...` builds a parser with the module's flags plus the common ones it did not
  declare itself (`add_common_arguments`: --model, --corpus, --out, --device, --dtype, --no-progress)
  and calls `run`.
* Any registered method whose Params declare a quality knob (`param(..., quality="higher")`, see
  `sparse_compile.params`) gets the generic per-layer search `calibrate <method> --max-dppl X`
  (`sparse_compile.calibration.quality`); with `--max-dppl` this runs even for a method that also
  has its own module.

    calibration_modules()      {method name: module name} of the method-specific modules (not imported)
    calibration_parser(m)      the argparse parser of `calibrate m`
    run_calibration(m, argv)   parse argv for method m and run it (ValueError on bad input)
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from types import ModuleType

from sparse_compile.evaluation.device import DTYPES, default_device

GENERIC_MODULES = frozenset({"quality"})  # modules of this package that are not a method's calibration
COMMON_OPTIONS = ("--model", "--corpus", "--out", "--device", "--dtype", "--no-progress")


def calibration_modules() -> dict[str, str]:
    """{method name: full module name} of every `sparse_compile/calibration/<method>.py` (not imported)."""
    return {
        info.name: f"{__name__}.{info.name}"
        for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name)
        if not info.name.startswith("_") and info.name not in GENERIC_MODULES
    }


def load_calibration_module(method: str) -> ModuleType | None:
    """The method-specific calibration module of `method`, or None when it has none.

    Raises ValueError when the module exists but lacks `add_arguments` / `run`.
    """
    name = calibration_modules().get(method)
    if name is None:
        return None
    module = importlib.import_module(name)
    missing = [f for f in ("add_arguments", "run") if not callable(getattr(module, f, None))]
    if missing:
        raise ValueError(f"{name} is not a calibration module: it lacks {', '.join(missing)}()")
    return module


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every calibration accepts; those `parser` already has are left as the module declared them."""
    from sparse_compile.evaluation.corpus import CORPORA, DEFAULT_CORPUS
    from sparse_compile.evaluation.models import DEFAULT_MODEL

    have = set(parser._option_string_actions)  # the flags a method's add_arguments() already declared
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


def generic_methods() -> dict[str, str]:
    """{method name: knob parameter} of registered methods whose Params declare a quality knob."""
    from sparse_compile.calibration.quality import quality_knobs
    from sparse_compile.methods import METHODS

    found = {}
    for name, method in METHODS.items():
        knobs = quality_knobs(method.Params)
        if knobs:
            found[name] = ",".join(knobs)
    return found


def available() -> list[str]:
    """Method names `calibrate` accepts: method-specific modules, then methods with a quality knob."""
    return sorted(set(calibration_modules()) | set(generic_methods()))


def wants_generic(method: str, argv: list[str]) -> bool:
    """`--max-dppl` given for a method with a quality knob: the generic search, even when the method also
    has its own calibration module (which then runs without --max-dppl)."""
    return any(a == "--max-dppl" or a.startswith("--max-dppl=") for a in argv) and method in generic_methods()


def calibration_parser(method: str, prog: str = "python -m sparse_compile calibrate",
                       generic: bool = False) -> argparse.ArgumentParser:
    """The parser of `calibrate <method>` (generic: the --max-dppl search's, even when the method has its
    own module); ValueError for a method that cannot be calibrated."""
    module = None if generic else load_calibration_module(method)
    if module is not None:
        parser = argparse.ArgumentParser(prog=f"{prog} {method}",
                                         description=(module.__doc__ or "").strip().split("\n\n")[0] or None)
        module.add_arguments(parser)
        add_common_arguments(parser)
        return parser
    generic = generic_methods()
    if method not in generic:
        raise ValueError(f"cannot calibrate {method!r}: choose one of {', '.join(available()) or '(none)'} "
                         "(a method needs sparse_compile/calibration/<method>.py or a quality knob in its Params)")
    from sparse_compile.calibration import quality

    parser = argparse.ArgumentParser(prog=f"{prog} {method}", description=quality.description(method))
    quality.add_quality_arguments(parser)
    add_common_arguments(parser)
    return parser


def run_calibration(method: str, argv: list[str], prog: str = "python -m sparse_compile calibrate") -> int:
    """Parse `argv` with `calibration_parser(method)` and run it; returns the exit status.

    ValueError for an unknown method or bad input found by the calibration; argparse exits 2 itself
    on a bad flag.
    """
    generic = wants_generic(method, argv)
    parser = calibration_parser(method, prog, generic)
    args = parser.parse_args(argv)
    args.method = method
    args.command_argv = ["calibrate", method, *argv]  # what the written policy records as its command
    module = None if generic else load_calibration_module(method)
    if module is not None:
        return int(module.run(args))
    from sparse_compile.calibration import quality

    return int(quality.run_quality(args))
