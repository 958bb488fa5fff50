"""The budget check `eval` prints per policy (issue 35), on synthetic eval results: PASS, and each FAIL reason."""

from __future__ import annotations

import copy

import pytest

from sparse_compile.evaluation.budget import FAIL, NA, PASS, budget_check, budget_table
from sparse_compile.evaluation.output import markdown

CONFIG = {"lengths": [4096, 8192], "niah_lengths": [4096, 8192], "tasks": ["ppl", "niah"], "last": 128,
          "niah_depths": [0.5], "niah_samples": 1, "decode_steps": 64}


def phase(method="dense", min_seq_len=0, overrides=()):
    return {"method": method, "min_seq_len": min_seq_len, "params": {}, "overrides": list(overrides)}


def sample(length, depth, score):
    return {"length": length, "depth": depth, "index": 0, "value": "1234567", "answer": "1234567" if score else "12",
            "score": score, "seconds": 1.0}


def ppl_row(dppl_pct, density, **extra):
    return {"dppl_pct": dppl_pct, "mean_density": density, "windows": [], **extra}


def prism_run():
    """A prefill policy within the budget: two needles found as eager found them, +0.3%, density 0.49 at 8K."""
    return {
        "label": "prism", "warning": "",
        "policy": {"name": "prism", "prefill": phase("prism", 4096), "decode": phase()},
        "ppl": {"2048": ppl_row(0.0, 1.0), "4096": ppl_row(0.1, 0.6), "8192": ppl_row(0.3, 0.49)},
        "niah": {"samples": [sample(4096, 0.5, 1.0), sample(8192, 0.5, 1.0), sample(8192, 1.0, 0.0)],
                 "mean_density": 0.55, "decode_mean_density": None,
                 "vs_eager": {"compared": 3, "lost": [], "gained": []}},
    }


def fasa_run():
    """A decode policy within the budget: decode-step PPL +0.05%, kept fraction 0.275."""
    return {
        "label": "fasa", "warning": "",
        "policy": {"name": "fasa", "prefill": phase(), "decode": phase("fasa", 1024)},
        "decode": {"8192": {"dppl_pct": 0.05, "agreement": 1.0, "mean_density": 0.275, "windows": []}},
    }


def checks(run, config=CONFIG):
    out = budget_check(run, config)
    return out["verdict"], {c["check"]: (c["status"], c["reason"]) for c in out["checks"]}


def test_policies_within_the_budget_pass():
    verdict, got = checks(prism_run())
    assert verdict == PASS
    assert got["needles"] == (PASS, "0 of the 2 needles eager finds lost")
    assert got["dppl"] == (PASS, "+0.00% (whole window L=2048), +0.10% (whole window L=4096), +0.30% (whole window "
                                 "L=8192) <= 1%")
    # the 2K window is below min_seq_len: density 1 there is not a failure
    assert got["job"] == (PASS, "prefill block density 0.490 <= 0.75 at L=8192 (prism)")
    verdict, got = checks(fasa_run(), {**CONFIG, "tasks": ["decode"]})
    assert verdict == PASS
    assert got["needles"][0] == NA and got["dppl"][0] == PASS
    assert got["job"] == (PASS, "decode kept fraction 0.275 <= 0.5 at L=8192 (fasa)")


def test_dense_has_no_job_to_check():
    run = prism_run()
    run["policy"] = {"name": "dense", "prefill": phase(), "decode": phase()}
    verdict, got = checks(run)
    assert verdict == PASS and got["job"] == (NA, "no sparse method: exact attention")


def test_a_lost_needle_fails():
    run = prism_run()
    run["niah"]["samples"][1]["score"] = 0.0
    run["niah"]["vs_eager"]["lost"] = [{"length": 8192, "depth": 0.5, "index": 0, "value": "1234567",
                                        "answer": "12", "eager_answer": "1234567"}]
    verdict, got = checks(run)
    assert verdict == FAIL
    assert got["needles"] == (FAIL, "lost 1 of the 2 needles eager finds (L=8192 depth 0.5)")


def test_dppl_over_one_percent_fails():
    run = prism_run()
    run["ppl"]["8192"]["dppl_pct"] = 1.26
    verdict, got = checks(run)
    assert verdict == FAIL and got["dppl"] == (FAIL, "+1.26% (whole window L=8192) > 1%")
    run["ppl"]["8192"]["dppl_pct"] = float("nan")  # NaN never passes
    assert checks(run)[1]["dppl"][0] == FAIL
    decode = fasa_run()
    decode["decode"]["8192"]["dppl_pct"] = 4.59
    assert checks(decode)[1]["dppl"] == (FAIL, "+4.59% (decode steps L=8192) > 1%")


def test_token_sparse_is_judged_on_continuation():
    run = prism_run()
    run["policy"]["prefill"] = phase("dense", 0, [{"layers": [3], "method": "token_sparse", "params": {}}])
    for row in run["ppl"].values():
        row["dppl_pct"] = 200.0  # whole window x3: by design, not the figure it is judged by
        row["last_dppl_pct"] = 0.5
    run["ppl"]["2048"]["mean_density"] = 0.9  # no min_seq_len: every length counts
    verdict, got = checks(run)
    assert got["dppl"][0] == PASS and "+0.50% (continuation" in got["dppl"][1]
    run["ppl"]["4096"]["last_dppl_pct"] = 2.6
    assert checks(run)[1]["dppl"] == (FAIL, "+2.60% (continuation L=4096) > 1%")
    for row in run["ppl"].values():
        del row["last_dppl_pct"]
    status, reason = checks(run)[1]["dppl"]
    assert status == FAIL and "add --tasks continuation" in reason


def test_too_dense_fails():
    run = prism_run()
    run["ppl"]["8192"]["mean_density"] = 0.80
    verdict, got = checks(run)
    assert verdict == FAIL
    assert got["job"] == (FAIL, "prefill block density 0.800 > 0.75 at L=8192 (prism)")
    decode = fasa_run()
    decode["decode"]["8192"]["mean_density"] = 0.6
    assert checks(decode)[1]["job"] == (FAIL, "decode kept fraction 0.600 > 0.5 at L=8192 (fasa)")


def test_a_method_that_did_not_run_fails():
    run = prism_run()
    run["ppl"]["4096"]["mean_density"] = 1.0  # >= min_seq_len, yet nothing skipped
    verdict, got = checks(run)
    assert verdict == FAIL
    assert got["job"] == (FAIL, "prefill (prism): density not < 1 at ppl L=4096 (1.000): it skipped nothing "
                                "(the method did not run, or kept everything)")
    run["ppl"]["4096"]["mean_density"] = None  # no rewritten graph ran
    assert "ppl L=4096 (none)" in checks(run)[1]["job"][1]


def test_lengths_below_min_seq_len_fail_the_job_check():
    run = prism_run()
    run["ppl"] = {"2048": ppl_row(0.0, 1.0)}
    config = {**CONFIG, "lengths": [2048], "niah_lengths": [2048, 4096]}
    verdict, got = checks(run, config)
    assert verdict == FAIL
    assert got["job"] == (FAIL, "prefill (prism): not measured at a length >= min_seq_len 4096 (run ppl or niah "
                                "there)")
    # niah alone, every length >= min_seq_len: its density is the evidence
    del run["ppl"]
    verdict, got = checks(run, {**CONFIG, "tasks": ["niah"]})
    assert got["job"] == (PASS, "prefill block density 0.550 <= 0.75 at L=8192 (prism)")


@pytest.mark.parametrize("warning", ["", "loses needles"])
def test_budget_reaches_markdown_and_json(warning):
    run = prism_run()
    run["warning"] = warning
    failing = copy.deepcopy(run)
    failing["label"] = "prism[threshold*=0.95]"
    failing["ppl"]["8192"]["dppl_pct"] = 8.0
    for r in (run, failing):
        r["budget"] = budget_check(r, CONFIG)
    results = {"runs": [run, failing], "meta": {"config": CONFIG}}
    table = budget_table(results)
    assert table[2].startswith("| prism | **PASS** | PASS: 0 of the 2 needles")
    assert table[3].startswith("| prism[threshold*=0.95] | **FAIL** |") and "FAIL: +8.00%" in table[3]
    assert any(line.startswith("- WARNING prism: loses needles") for line in table) == bool(warning)
    assert run["budget"]["warning"] == warning


def test_eval_markdown_has_the_budget_section():
    run = prism_run()
    run.update(compile={}, ppl={})
    run["budget"] = budget_check(run, CONFIG)
    results = {"meta": {"model": {"name": "m"}, "corpus": {"name": "c"}, "config": {**CONFIG, "tasks": []},
                        "env": {"command": "x", "machine": "m", "cpus": 2, "torch_threads": 2, "python": "3",
                                "torch": "t", "transformers": "t", "sparse_compile_revision": "r", "date": "d"}},
               "baseline": {"label": "eager"}, "runs": [run]}
    results["meta"]["model"].update({"class": "C", "layers": 1, "heads": 1, "kv_heads": 1, "parameters": 1e6,
                                     "dtype": "fp32", "fingerprint": "f"})
    results["meta"]["corpus"].update({"source": "s", "tokens": 1, "sha256": "h"})
    text = markdown(results)
    assert "Budget of a shipped default (no needle eager finds lost; ΔPPL <= 1%" in text
    assert "| prism | **PASS** |" in text
