"""The quality budget a shipped policy must meet (issue 35), checked on one policy's eval results.

A policy passes when every check that its tasks measured passes:
  needles   no needle eager finds is lost (when the niah task ran)
  dppl      ΔPPL <= 1%: whole-window PPL (ppl task) for methods that compute every token's output; the
            continuation figure (the last `--last` tokens, continuation task) for Token Sparse, whose dropped
            tokens differ by design; the PPL of the teacher-forced steps (decode task) for decode methods
  job       it still does its job, at lengths >= its phase's `min_seq_len`: the density it reports is < 1 (the
            method really ran) and, at the longest such length, prefill block density <= 0.75 and decode kept
            fraction <= 0.5
Each check is PASS or FAIL with its reason, or "n/a" (not measured, or nothing to check: the job of a policy
without a sparse method). `budget_check(run, config)` takes one entry of `results["runs"]` and the results'
`meta["config"]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MAX_DPPL_PCT = 1.0
MAX_PREFILL_DENSITY = 0.75
MAX_DECODE_DENSITY = 0.5
PASS, FAIL, NA = "PASS", "FAIL", "n/a"
CHECKS = ("needles", "dppl", "job")
SUMMARY = (f"no needle eager finds lost; ΔPPL <= {MAX_DPPL_PCT:g}% (whole window; continuation for token_sparse; "
           f"decode steps for decode methods); prefill density <= {MAX_PREFILL_DENSITY:g}, decode kept fraction <= "
           f"{MAX_DECODE_DENSITY:g}, density < 1 at lengths >= min_seq_len")


@dataclass(frozen=True)
class Check:
    name: str  # one of CHECKS
    status: str  # PASS, FAIL or NA
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"check": self.name, "status": self.status, "reason": self.reason}

    def cell(self) -> str:
        return f"{self.status}: {self.reason}"


def sparse_methods(policy: dict[str, Any], phase: str) -> set[str]:
    """The non-dense methods a policy (`Policy.to_dict()`) runs in `phase`, overrides included."""
    table = policy[phase]
    return {table["method"], *(o["method"] for o in table.get("overrides", []))} - {"dense"}


def needles_check(run: dict[str, Any]) -> Check:
    niah = run.get("niah")
    if niah is None or "vs_eager" not in niah:
        return Check("needles", NA, "niah did not run")
    vs = niah["vs_eager"]
    found = sum(1 for s in niah["samples"] if s["score"] >= 1.0)
    eager_found = found + len(vs["lost"]) - len(vs["gained"])
    if vs["lost"]:
        where = ", ".join(f"L={x['length']} depth {x['depth']:g}" for x in vs["lost"][:3])
        more = f", +{len(vs['lost']) - 3} more" if len(vs["lost"]) > 3 else ""
        lost = len(vs["lost"])
        return Check("needles", FAIL, f"lost {lost} of the {eager_found} needles eager finds ({where}{more})")
    return Check("needles", PASS, f"0 of the {eager_found} needles eager finds lost")


def dppl_check(run: dict[str, Any]) -> Check:
    figures: list[tuple[str, float]] = []  # (what, dPPL %)
    problems: list[str] = []
    token_sparse = "token_sparse" in sparse_methods(run["policy"], "prefill")
    for length, row in run.get("ppl", {}).items():
        if not token_sparse:
            figures.append((f"whole window L={length}", row["dppl_pct"]))
        elif "last_dppl_pct" in row:
            figures.append((f"continuation L={length}", row["last_dppl_pct"]))
        else:
            problems.append(f"token_sparse is judged on continuation PPL, which did not run at L={length} "
                            "(add --tasks continuation)")
    for length, row in run.get("decode", {}).items():
        figures.append((f"decode steps L={length}", row["dppl_pct"]))
    if not figures and not problems:
        return Check("dppl", NA, "no ppl, continuation or decode task ran")
    over = [(what, v) for what, v in figures if not v <= MAX_DPPL_PCT]  # NaN fails
    if over or problems:
        text = [f"{v:+.2f}% ({what}) > {MAX_DPPL_PCT:g}%" for what, v in over]
        return Check("dppl", FAIL, "; ".join(text + problems))
    return Check("dppl", PASS, ", ".join(f"{v:+.2f}% ({what})" for what, v in figures) + f" <= {MAX_DPPL_PCT:g}%")


def density_rows(run: dict[str, Any], config: dict[str, Any], phase: str, min_seq_len: int
                 ) -> list[tuple[str, int, float | None]]:
    """(source, length, mean density) of `phase` at each evaluated length >= min_seq_len: the ppl (prefill) or
    decode (decode) task per length, else the niah task when all of its lengths reach min_seq_len."""
    task = "ppl" if phase == "prefill" else "decode"
    rows = [(task, int(length), row["mean_density"]) for length, row in run.get(task, {}).items()
            if int(length) >= min_seq_len]
    if rows or "niah" not in run:
        return rows
    lengths = config.get("niah_lengths") or config.get("lengths") or ()
    if lengths and min(lengths) >= min_seq_len:
        key = "mean_density" if phase == "prefill" else "decode_mean_density"
        return [("niah", max(lengths), run["niah"].get(key))]
    return []


def job_check(run: dict[str, Any], config: dict[str, Any]) -> Check:
    reasons: list[str] = []
    failed = False
    for phase, limit, what in (("prefill", MAX_PREFILL_DENSITY, "block density"),
                               ("decode", MAX_DECODE_DENSITY, "kept fraction")):
        methods = sparse_methods(run["policy"], phase)
        if not methods:
            continue
        min_seq_len = run["policy"][phase]["min_seq_len"]
        names = "/".join(sorted(methods))
        rows = density_rows(run, config, phase, min_seq_len)
        if not rows:
            measured = "ppl or niah" if phase == "prefill" else "decode or niah"
            failed = True
            reasons.append(f"{phase} ({names}): not measured at a length >= min_seq_len {min_seq_len} "
                           f"(run {measured} there)")
            continue
        idle = [f"{source} L={length} ({'none' if d is None else format(d, '.3f')})" for source, length, d in rows
                if d is None or not d < 1.0]
        if idle:
            failed = True
            reasons.append(f"{phase} ({names}): density not < 1 at {', '.join(idle)}: it skipped nothing (the method "
                           "did not run, or kept everything)")
            continue
        source, length, density = max(rows, key=lambda r: r[1])
        if not density <= limit:
            failed = True
            reasons.append(f"{phase} {what} {density:.3f} > {limit:g} at L={length} ({names})")
        else:
            reasons.append(f"{phase} {what} {density:.3f} <= {limit:g} at L={length} ({names})")
    if not reasons:
        return Check("job", NA, "no sparse method: exact attention")
    return Check("job", FAIL if failed else PASS, "; ".join(reasons))


def budget_check(run: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """{"verdict": PASS or FAIL, "checks": [{"check", "status", "reason"}], "warning"} for one policy run: FAIL
    when any check fails, PASS otherwise (a check that did not run is n/a, not a pass of what it measures)."""
    checks = [needles_check(run), dppl_check(run), job_check(run, config)]
    verdict = FAIL if any(c.status == FAIL for c in checks) else PASS
    return {"verdict": verdict, "checks": [c.to_dict() for c in checks], "warning": run.get("warning", "")}


def budget_table(results: dict[str, Any]) -> list[str]:
    """One row per policy: the verdict and each check's status and reason; then the policies' warnings."""
    lines = ["| policy | budget | needles | ΔPPL | does its job |", "|---|---|---|---|---|"]
    warnings = []
    for run in results["runs"]:
        budget = run.get("budget") or budget_check(run, results["meta"]["config"])
        cells = {c["check"]: f"{c['status']}: {c['reason']}" for c in budget["checks"]}
        lines.append(f"| {run['label']} | **{budget['verdict']}** | "
                     + " | ".join(cells[name] for name in CHECKS) + " |")
        if budget.get("warning"):
            warnings.append(f"- WARNING {run['label']}: {budget['warning']}")
    return lines + ([""] + warnings if warnings else [])
