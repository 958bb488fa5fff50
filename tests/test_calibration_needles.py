"""The needle check every `calibrate` procedure ends with (sparse_compile/calibration/needles.py): the search
over safer candidates (stubbed needle runs: a tiny random model finds no needle to lose), each procedure's
ladder of safer candidates, and how a failed check is written and reported. The real NIAH runs of each
procedure are in test_calibrate.py (quality), test_fasa.py (chunks), test_lessismore.py (selection_layers)
and test_token_sparse.py (drift_layers)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import pytest
import torch

from sparse_compile.calibration import calibratable, calibration_parser
from sparse_compile.calibration.decode_attention import chunk_candidates, selection_candidates
from sparse_compile.calibration.drift import fewer_layers
from sparse_compile.calibration.needles import (
    Candidate,
    check_candidates,
    needle_probes,
    search_candidates,
    write_checked,
)
from sparse_compile.policy import load_policy, replace_phase


def losing(losses: dict[int, int], seen: list[int]) -> Any:
    def lost_by(i: int) -> int:
        seen.append(i)
        return losses[i]

    return lost_by


def test_the_search_stops_at_the_first_safer_candidate_that_keeps_every_needle():
    seen: list[int] = []
    assert search_candidates(5, 3, losing({0: 2, 1: 1, 2: 0, 3: 0, 4: 0}, seen)) == (2, 2, {0: 2, 1: 1, 2: 0})
    assert seen == [0, 1, 2]  # candidates 3 and 4 never ran
    seen.clear()
    assert search_candidates(5, 3, losing({0: 0, 1: 0}, seen)) == (0, 0, {0: 0}) and seen == [0]


def test_the_search_fails_when_no_safer_candidate_keeps_every_needle():
    """Out of probes or of candidates: the one that lost fewest is kept (the later of equals), its loss > 0."""
    seen: list[int] = []
    assert search_candidates(5, 2, losing({0: 3, 1: 1, 2: 2}, seen)) == (1, 2, {0: 3, 1: 1, 2: 2}) and seen == [0, 1, 2]
    assert search_candidates(3, 9, losing({0: 2, 1: 1, 2: 1}, [])) == (2, 2, {0: 2, 1: 1, 2: 1})
    assert search_candidates(5, 0, losing({0: 2}, [])) == (0, 0, {0: 2})  # --needle-probes 0: no safer one
    with pytest.raises(ValueError, match="--needle-probes -1"):
        needle_probes(argparse.Namespace(needle_probes=-1))


def test_fasa_candidates_raise_chunks_and_budget_alternately():
    assert chunk_candidates(2, 0.25, 8, 6) == [(2, 0.25), (4, 0.25), (4, 0.5), (8, 0.5), (8, 0.75), (8, 0.875)]
    assert chunk_candidates(8, 2048, 32, 4) == [(8, 2048), (16, 2048), (16, 4096), (32, 4096)]
    assert chunk_candidates(32, 2048, 32, 3) == [(32, 2048), (32, 4096), (32, 8192)]  # every chunk: budget only
    assert chunk_candidates(4, 0.25, 8, 1) == [(4, 0.25)]


def test_lessismore_candidates_add_one_selection_layer_each():
    coverage = torch.rand(5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    found = selection_candidates(coverage, {0}, 2, 9)
    assert [len(layers) for layers, _ in found] == [2, 3, 4]  # at most the 4 non-dense layers
    assert all(layers[0] == 1 and 0 not in layers for layers, _ in found)
    assert found[-1][0] == [1, 2, 3, 4] and len(selection_candidates(coverage, {0}, 2, 2)) == 2


def test_token_sparse_candidates_keep_the_lower_drift_half():
    drift = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.8, 0.2], dtype=torch.float64)
    assert fewer_layers([1, 2, 3, 5], drift, 9) == [[1, 2, 3, 5], [1, 5], [1]]
    assert fewer_layers([1, 2, 3, 5], drift, 2) == [[1, 2, 3, 5], [1, 5]]


def test_every_procedure_has_the_needle_flags():
    for method in calibratable():
        flags = calibration_parser(method)._option_string_actions
        for flag in ("--niah-lengths", "--niah-samples", "--needle-probes", "--no-niah", "--cache-dir", "--no-cache"):
            assert flag in flags, (method, flag)


class StubEvaluator:
    """What check_candidates reads of eval's Evaluator, with needle runs decided by `lost_by(policy)`."""

    def __init__(self, lost_by: Any) -> None:
        self.model = torch.nn.Linear(2, 2)  # compiled lazily by the check, never called
        self.config = argparse.Namespace(needle_lengths=lambda: (400,))
        self.lost_by = lost_by
        self.samples = [{"length": 400, "depth": d, "index": 0, "score": float(d < 1)} for d in (0, 0.5, 1)]

    def baseline_niah(self) -> dict[str, Any]:
        return {"samples": self.samples}

    def policy_niah(self, compiled: Any, report: Any, baseline: dict[str, Any], policy: Any) -> dict[str, Any]:
        assert baseline["samples"] is self.samples and compiled is not None
        return {"vs_eager": {"lost": self.samples[:self.lost_by(policy)]}}


def token_sparse_candidates(drift: torch.Tensor, layers: list[int]) -> list[Candidate]:
    base = load_policy("token_sparse-lossy")
    return [Candidate(f"layers {found}", replace_phase(base, "prefill", params=dataclasses.replace(
        base.prefill.params, layers=tuple(found)))) for found in fewer_layers(layers, drift, 4)]


def test_a_lost_needle_writes_the_first_safer_candidate(tmp_path, capsys):
    """Layer 3 loses needles when sparse: the check moves from layers [1, 2, 3, 5] to [1, 5] and writes it with
    the search in its header."""
    drift = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.8, 0.2], dtype=torch.float64)
    candidates = token_sparse_candidates(drift, [1, 2, 3, 5])
    ev = StubEvaluator(lambda policy: 2 if policy.prefill.params.runs_on(3) else 0)
    check = check_candidates(ev, candidates, 3)
    assert check.ok() and check.chosen == 1 and check.tried == 1 and check.losses == {0: 2, 1: 0}
    tried = [{"label": "layers [1, 2, 3, 5]", "lost": 2}, {"label": "layers [1, 5]", "lost": 0}]
    assert check.entry == {"eager_found": 2, "samples": 3, "lost": 0, "safer_tried": 1, "chosen": "layers [1, 5]",
                           "tried": tried, "lost_samples": [], "lengths": [400]}
    header = check.header()
    assert header == ["Needles: eager finds 2 of 3 (NIAH at 400 tokens); the policy loses 0 (after 1 safer candidate).",
                      "Needle search: layers [1, 2, 3, 5] loses 2; layers [1, 5] loses 0."]
    assert header[0] in capsys.readouterr().out
    out = tmp_path / "p.toml"
    assert write_checked("# " + "\n# ".join(header) + "\n", out, check) == 0
    assert out.read_text().startswith("# Needles:") and not (tmp_path / "p.unverified.toml").exists()


def test_a_check_no_candidate_passes_fails_loudly(tmp_path, capsys):
    """Every candidate loses a needle: the one losing fewest is written to <out>.unverified.toml with the failure
    in its header, stderr says FAILED and the exit status is 1."""
    drift = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.8, 0.2], dtype=torch.float64)
    candidates = token_sparse_candidates(drift, [1, 2, 3, 5])
    ev = StubEvaluator(lambda policy: 2 if policy.prefill.params.runs_on(3) else 1)  # [1, 5] and [1] lose 1
    check = check_candidates(ev, candidates, 3)
    assert not check.ok() and check.chosen == 2 and check.lost == 1 and check.losses == {0: 2, 1: 1, 2: 1}
    assert check.entry["lost_samples"] == ev.samples[:1] and check.entry["chosen"] == "layers [1]"
    assert check.header()[-1].startswith("NEEDLE CHECK FAILED: every candidate tried loses a needle eager finds")
    out = tmp_path / "p.toml"
    assert write_checked("\n".join(check.header()), out, check) == 1
    err = capsys.readouterr().err
    assert "error: needle check FAILED: the policy loses 1 needle(s) eager finds, also after 2 safer" in err
    assert f"went to {tmp_path / 'p.unverified.toml'}, not {out}" in err
    assert not out.exists() and "NEEDLE CHECK FAILED" in (tmp_path / "p.unverified.toml").read_text()
