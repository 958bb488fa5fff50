"""The needle check of `calibrate`: eval's NIAH grid, eager vs the policy a procedure is about to write.

Every procedure runs it on its result unless `--no-niah`: the NIAH grid (`sparse_compile.evaluation`'s
RULER-style retrieval by greedy decoding, so prefill and decode methods both answer) at `--niah-lengths`
(default: the procedure's calibration lengths) with `--niah-samples` per cell (default 3 on CUDA, 1 on
the CPU) runs on the eager model (cached like `eval`'s baseline, `--cache-dir`) and through the policy.
A needle eager finds and the policy loses fails the check; the procedure then tries its safer candidates
in order, at most `--needle-probes` of them, and keeps the first that loses none:

    quality            the next denser allocations of its path (quality.py, re-verified on held-out windows)
    chunks             more chunks per head, then a larger budget, alternately (FASA)
    selection_layers   one more selection layer at a time (LessIsMore)
    drift_layers       the lower-drift half of the sparse layers, then half of that (Token Sparse)

When none keeps every needle the procedure still writes one (the one that lost fewest; quality: the last
tried), to `<out>.unverified.toml`, says so in its header and on stderr, and exits with status 1, like a
failed held-out verification.

    add_needle_arguments(parser, ...)   --niah-lengths, --niah-samples, --needle-probes, --no-niah, cache flags
    needle_evaluator(args, ...)         eval's Evaluator for the grid (None with --no-niah)
    policy_niah(ev, policy, baseline)   the grid through one policy, with the samples it lost against eager
    needle_search(first, steps, lost_by)     the search over candidates (pure: `lost_by` does the runs)
    check_candidates(ev, candidates, k)      the search with real runs: a NeedleCheck
    write_checked(text, out, check)     write the policy (or `<out>.unverified.toml`); the exit status
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sparse_compile.argtypes import parse_lengths, positive_int
from sparse_compile.calibration.text import write_policy
from sparse_compile.evaluation.cache import DEFAULT_CACHE_DIR
from sparse_compile.evaluation.corpus import default_corpus
from sparse_compile.evaluation.runner import EvalConfig, compile_with_policy, prepare
from sparse_compile.policy import Policy
from sparse_compile.report import Report


def add_needle_arguments(parser: argparse.ArgumentParser, lengths_flag: str, safer: str,
                         first: str = "the calibrated policy", skipped: str = "") -> None:
    """The needle check's flags and the eager baseline's cache flags. lengths_flag: the procedure's flag whose
    value is the grid's default lengths; safer: what a lost needle moves to ("denser allocations"); first: the
    policy checked first; skipped: what `--no-niah`'s help adds (e.g. what the policy is verified on instead)."""
    parser.add_argument("--niah-lengths", type=parse_lengths, metavar="N,...",
                        help=f"needle check: prompt lengths of the NIAH grid (default: {lengths_flag})")
    parser.add_argument("--niah-samples", type=positive_int, metavar="K",
                        help="needle check: samples per (length, depth) cell (default: 3 on CUDA, 1 on the CPU)")
    parser.add_argument("--needle-probes", type=int, default=3, metavar="K",
                        help=f"needle check: {safer} tried when {first} loses a needle eager finds "
                             "(default 3; 0: none, a lost needle fails the calibration)")
    parser.add_argument("--no-niah", action="store_true", help="skip the needle check" + skipped)
    parser.add_argument("--cache-dir", default=None, help="where eager baselines are cached (default: eval's)")
    parser.add_argument("--no-cache", action="store_true", help="recompute the eager baseline, cache nothing")


def needle_probes(args: argparse.Namespace) -> int:
    """`--needle-probes`, checked: an int >= 0 (ValueError otherwise)."""
    probes = getattr(args, "needle_probes", 3)
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 0:
        raise ValueError(f"--needle-probes {probes!r}: give an int >= 0")
    return probes


def cache_dir(args: argparse.Namespace) -> str | None:
    """Where the eager baseline is cached: `--cache-dir`, eval's folder by default, None with `--no-cache`."""
    return None if getattr(args, "no_cache", False) else (getattr(args, "cache_dir", None) or str(DEFAULT_CACHE_DIR))


def niah_fields(args: argparse.Namespace, lengths: tuple[int, ...]) -> dict[str, Any]:
    """EvalConfig fields of the grid: `--niah-lengths` (default `lengths`) and `--niah-samples` when given."""
    return {"niah_lengths": getattr(args, "niah_lengths", None) or tuple(lengths),
            **({"niah_samples": args.niah_samples} if getattr(args, "niah_samples", None) else {})}


def needle_evaluator(args: argparse.Namespace, model: Any, tokenizer: Any, lengths: tuple[int, ...]) -> Any:
    """eval's Evaluator holding the NIAH grid of the needle check (haystack: `--corpus`) on the loaded model, or
    None with `--no-niah`. Made before the calibration's work, so a bad grid (e.g. a length too short for a
    needle prompt) fails first."""
    if getattr(args, "no_niah", False):
        return None
    needle_probes(args)
    fields = niah_fields(args, lengths)
    config = EvalConfig(model=str(args.model), policies=("dense",), corpus=args.corpus or default_corpus(),
                        lengths=fields["niah_lengths"], tasks=("niah",), cache_dir=cache_dir(args),
                        progress=not args.no_progress, device=args.device, dtype=args.dtype, **fields)
    ev, _ = prepare(config, model, tokenizer)
    return ev


def policy_niah(ev: Any, policy: Policy, baseline: dict[str, Any], inner: str = "eager") -> dict[str, Any]:
    """The NIAH grid through `policy` (compiled with the sparse backend): eval's result with `vs_eager` (the
    samples it lost and gained against the eager `baseline`)."""
    report = Report()
    compiled = compile_with_policy(ev.model, policy, report, inner)
    result = ev.policy_niah(compiled, report, baseline, policy)
    torch._dynamo.reset()
    return result


def needle_search(first: int, steps: Sequence[int], lost_by: Callable[[int], int], keep: str = "last"
                  ) -> tuple[int, int, int]:
    """(index, needles lost, steps tried): `first` if `lost_by(first)` is 0, else the first of `steps` whose
    `lost_by` is 0. When none is (its loss > 0 then says the check failed): the last one tried (keep "last"),
    or the one that lost fewest, the later of equals (keep "fewest")."""
    index, lost, tried = first, lost_by(first), 0
    losses = {first: lost}
    for step in steps:
        if lost == 0:
            break
        index, lost, tried = step, lost_by(step), tried + 1
        losses[step] = lost
    if lost and keep == "fewest":
        index = min(reversed(list(losses)), key=losses.__getitem__)
        lost = losses[index]
    return index, lost, tried


def needle_line(found: int, total_samples: int, lost: int, tried: int, lengths: tuple[int, ...],
                step: str = "denser allocation") -> str:
    """The header line of the check: how many needles eager finds, how many the policy loses."""
    return (f"Needles: eager finds {found} of {total_samples} (NIAH at {', '.join(map(str, lengths))} tokens); "
            f"the policy loses {lost}" + (f" (after {tried} {step}{'s' * (tried != 1)})" if tried else "") + ".")


def needle_entry(baseline: dict[str, Any], lost_samples: list[dict[str, Any]], lengths: tuple[int, ...],
                 **tried: Any) -> dict[str, Any]:
    """The report JSON's `needles`: eager's finds, the samples, what the policy lost, the grid's lengths;
    `tried` (e.g. denser_tried=2) goes after `lost`."""
    return {"eager_found": sum(r["score"] >= 1.0 for r in baseline["samples"]), "samples": len(baseline["samples"]),
            "lost": len(lost_samples), **tried, "lost_samples": lost_samples, "lengths": list(lengths)}


@dataclass(frozen=True)
class Candidate:
    """One policy the check may write: the calibrated one first, then the safer ones in order."""

    label: str  # what it sets, e.g. "n_chunks 16, budget 0.25"
    policy: Policy


@dataclass
class NeedleCheck:
    """The outcome of `check_candidates`: which candidate is written and what the grid found."""

    candidates: list[Candidate]
    chosen: int  # index into candidates
    tried: int  # safer candidates tried after the first
    losses: dict[int, int]  # needles lost by each candidate run, in the order tried
    entry: dict[str, Any] = field(default_factory=dict)  # the report JSON's `needles`

    @property
    def lost(self) -> int:
        return self.losses[self.chosen]

    def ok(self) -> bool:
        return self.lost == 0

    def header(self) -> list[str]:
        """The written policy's header lines: the needle line, the candidates tried, a failure said loudly."""
        lines = [needle_line(self.entry["eager_found"], self.entry["samples"], self.lost, self.tried,
                             tuple(self.entry["lengths"]), "safer candidate")]
        if self.tried:
            lines.append("Needle search: " + "; ".join(f"{self.candidates[i].label} loses {n}"
                                                       for i, n in self.losses.items()) + ".")
        if not self.ok():
            lines.append(f"NEEDLE CHECK FAILED: every candidate tried loses a needle eager finds; this one "
                         f"({self.candidates[self.chosen].label}) loses fewest. Do not ship it as it is.")
        return lines


def search_candidates(count: int, probes: int, lost_by: Callable[[int], int]) -> tuple[int, int, dict[int, int]]:
    """(chosen index, safer candidates tried, {index: needles lost}) over candidates 0..count-1: candidate 0
    first, then up to `probes` safer ones in order, stopping at the first that loses none (`needle_search`,
    keeping the one that lost fewest when none does)."""
    losses: dict[int, int] = {}

    def run(i: int) -> int:
        losses[i] = lost_by(i)
        return losses[i]

    index, _, tried = needle_search(0, range(1, min(count, probes + 1)), run, keep="fewest")
    return index, tried, losses


def check_candidates(ev: Any, candidates: list[Candidate], probes: int, inner: str = "eager") -> NeedleCheck:
    """The needle check over `candidates` (calibrated first, then safer ones) on `ev`'s grid; prints its line."""
    baseline = ev.baseline_niah()
    lost_samples: dict[int, list[dict[str, Any]]] = {}

    def lost_by(i: int) -> int:
        lost_samples[i] = policy_niah(ev, candidates[i].policy, baseline, inner)["vs_eager"]["lost"]
        return len(lost_samples[i])

    chosen, tried, losses = search_candidates(len(candidates), probes, lost_by)
    entry = needle_entry(baseline, lost_samples[chosen], ev.config.needle_lengths(), safer_tried=tried,
                         chosen=candidates[chosen].label,
                         tried=[{"label": candidates[i].label, "lost": n} for i, n in losses.items()])
    check = NeedleCheck(candidates, chosen, tried, losses, entry)
    for line in check.header()[:2]:
        print(line)
    return check


def write_checked(text: str, out: str | Path | None, check: NeedleCheck | None) -> int:
    """Write the policy `text` to `out` (None: print it), or to `<out>.unverified.toml` when the needle check
    failed, saying so on stderr; the exit status (1: the check failed)."""
    if check is None or check.ok():
        write_policy(text, out)
        return 0
    target = Path(out).with_suffix(".unverified.toml") if out else None
    write_policy(text, target)
    runs = "; ".join(f"{check.candidates[i].label}: {n}" for i, n in check.losses.items())
    print(f"error: needle check FAILED: the policy loses {check.lost} needle(s) eager finds, also after "
          f"{check.tried} safer candidate(s) (needles lost: {runs}); "
          + (f"the policy went to {target}, not {out}" if out else "the policy printed above is not safe to use"),
          file=sys.stderr)
    return 1


__all__ = ["Candidate", "NeedleCheck", "add_needle_arguments", "cache_dir", "check_candidates", "needle_entry",
           "needle_evaluator", "needle_line", "needle_probes", "needle_search", "niah_fields", "policy_niah",
           "search_candidates", "write_checked"]
