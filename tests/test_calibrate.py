"""`python -m sparse_compile calibrate`: dispatch to method modules, common flags, the quality-knob metadata,
the generic --max-dppl search (allocation path, probe steps, direction check) and, on a tiny random
Llama, the command end to end: it writes a policy that loads, and held-out verification fails loudly."""

from __future__ import annotations

import argparse
import random
import re

import pytest

from sparse_compile.__main__ import main
from sparse_compile.calibration import (
    COMMON_OPTIONS,
    add_common_arguments,
    available,
    calibratable,
    calibration_parser,
    wants_generic,
)
from sparse_compile.calibration.quality import (
    Knob,
    allocate,
    allocation_path,
    check_direction,
    interleave,
    ladder,
    method_knob,
    next_probe,
    uniform_candidates,
)
from sparse_compile.evaluation.models import save_tiny_llama
from sparse_compile.params import param
from sparse_compile.policy import load_policy


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return str(save_tiny_llama(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> str:
    rng = random.Random(1)
    words = "the of attention sparse block query key value token layer head window sink".split()
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(300)))
    return str(path)


@pytest.fixture(scope="module")
def base_policy(tmp_path_factory) -> str:
    """Prism at 64-token blocks from length 0: a 256-token window has 4 blocks, so selection can skip some."""
    path = tmp_path_factory.mktemp("policy") / "base.toml"
    path.write_text('name = "base"\n[prefill]\nmethod = "prism"\nmin_seq_len = 0\n[prefill.params]\nblock_size = 64\n')
    return str(path)


def test_unknown_method_lists_the_choices(capsys):
    assert main(["calibrate", "no_such_method"]) == 2
    err = capsys.readouterr().err
    assert "cannot calibrate 'no_such_method'" in err and "prism" in err and "pbs" in err
    assert set(available()) == set(calibratable()) >= {"prism", "pbs", "fasa", "lessismore", "token_sparse"}


def test_every_procedure_gets_the_common_flags():
    for method, knobs in calibratable().items():
        flags = calibration_parser(method)._option_string_actions
        assert all(option in flags for option in COMMON_OPTIONS), method
        if any(k.procedure == "quality" for k in knobs):
            assert "--max-dppl" in calibration_parser(method, generic=True)._option_string_actions, method
    generic = calibration_parser("prism")._option_string_actions
    assert "--max-dppl" in generic and all(option in generic for option in COMMON_OPTIONS)
    assert wants_generic("prism", ["--max-dppl", "1"]) and not wants_generic("prism", ["--out", "x.toml"])


def test_common_flags_keep_what_a_module_declared():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="mine.toml")
    add_common_arguments(parser)  # no conflict with the module's own --out
    args = parser.parse_args([])
    assert args.out == "mine.toml" and args.model == "smollm2" and args.dtype == "fp32" and args.device is None


def test_quality_knobs_are_declared_with_a_direction():
    prism, pbs = method_knob("prism"), method_knob("pbs")
    assert prism.fields == ("threshold_high", "threshold_low") and prism.direction == "higher"
    assert pbs.fields == ("threshold",) and (pbs.low, pbs.high) == (0.0, 1.0)
    assert ladder(prism) == (0.998, 0.995, 0.99, 0.98, 0.97, 0.95, 0.9, 0.8)  # densest first
    assert ladder(Knob("x", ("a",), "lower", 0.0, 1.0), (0.5, 0.1)) == (0.1, 0.5)
    with pytest.raises(ValueError, match="outside the knob's range"):
        ladder(prism, (1.5,))
    with pytest.raises(ValueError, match="quality must be"):
        param(0.5, help="x", quality="sideways")
    with pytest.raises(ValueError, match="declares no quality knob"):
        method_knob("dense")


TABLE = {  # layer: (error per candidate, density per candidate), candidates densest first
    0: ([1e-4, 1e-3, 1e-2], [0.8, 0.6, 0.4]),
    1: ([1e-6, 1e-5, 1e-4], [0.5, 0.3, 0.2]),  # cheap to sparsify
    2: ([1e-2, 1e-1, 1.0], [0.9, 0.8, 0.7]),  # expensive: stays dense until the multiplier is small
}


def test_allocation_path_runs_from_sparsest_to_dense():
    path = allocation_path(TABLE)
    assert path[0].choice == (2, 2, 2) and path[-1].choice == (-1, -1, -1)
    densities = [a.predicted_density for a in path]
    errors = [a.predicted_error for a in path]
    assert densities == sorted(densities) and errors == sorted(errors, reverse=True)
    assert len({a.choice for a in path}) == len(path)
    mid = allocate(TABLE, 1e3)  # layer 1 sparse, layer 2 dense
    assert mid.choice[1] >= 0 and mid.choice[2] == -1


def test_next_probe_stays_inside_the_bracket():
    path = allocation_path(TABLE)
    first = next_probe(path, [], budget=1.0)
    assert first is not None and 0 <= first < len(path) - 1
    # over budget there: the next probe is denser (a later index); under budget: sparser
    assert next_probe(path, [(first, 5.0)], budget=1.0) > first
    if first > 0:
        assert next_probe(path, [(first, 0.1)], budget=1.0) < first
    everything = [(i, 0.1 if i >= first else 5.0) for i in range(len(path))]
    assert next_probe(path, everything, budget=1.0) is None


def test_uniform_candidates_are_sparser_than_the_winner_densest_first():
    found = uniform_candidates(TABLE, density=0.6)
    assert [a.choice for a in found] == [(1, 1, 1), (2, 2, 2)]  # mean densities 0.5667, 0.4333 (0.7333 is not)
    assert [round(a.predicted_density, 4) for a in found] == [0.5667, 0.4333]
    assert found[0].predicted_error == pytest.approx(sum(TABLE[layer][0][1] for layer in TABLE))
    assert uniform_candidates(TABLE, density=0.4) == []


def test_windows_interleave():
    assert interleave(2, 2) == ["h", "c", "h", "c"]
    assert interleave(3, 1) == ["c", "c", "h", "c"]
    assert interleave(2, 3).count("h") == 3 and len(interleave(2, 3)) == 5


def test_wrong_direction_is_caught():
    values = (0.2, 0.5, 0.8)
    rising = {0: ([0.0, 0.0, 0.0], [0.4, 0.6, 0.9]), 1: ([0.0] * 3, [0.5, 0.7, 0.95])}
    with pytest.raises(ValueError, match="direction looks wrong"):
        check_direction(Knob("prism", ("threshold_high",), "lower", 0.0, 1.0), values, rising)
    check_direction(Knob("prism", ("threshold_high",), "higher", 0.0, 1.0), values[::-1],
                    {k: (e, d[::-1]) for k, (e, d) in rising.items()})


def cli(tiny_model, corpus_file, tmp_path, *extra: str) -> list[str]:
    return ["calibrate", "prism", "--model", tiny_model, "--corpus", corpus_file, "--lengths", "256",
            "--windows", "1", "--holdout-windows", "1", "--device", "cpu", "--no-progress",
            "--cache-dir", str(tmp_path / "cache"), "--niah-lengths", "400", *extra]


def test_calibrate_end_to_end_writes_a_policy_that_loads(tiny_model, corpus_file, base_policy, tmp_path, capsys):
    out = tmp_path / "tuned.toml"
    argv = cli(tiny_model, corpus_file, tmp_path, "--base", base_policy, "--max-dppl", "50", "--values", "0.9,0.3",
               "--max-probes", "2", "--out", str(out))
    assert main(argv) == 0, capsys.readouterr().err
    policy = load_policy(str(out))
    text = out.read_text()
    assert policy.name == "tuned" and policy.prefill.method == "prism" and policy.prefill.min_seq_len == 0
    assert policy.prefill.params.block_size == 64  # the base policy's other settings are kept
    assert "fingerprint" in text and "Held-out:" in text and "Calibration windows" in text
    for layer in (0, 1):
        method, params = policy.prefill.for_layer(layer)
        assert method == "dense" or params.threshold_high == params.threshold_low in (0.9, 0.3)
    assert "wrote" in capsys.readouterr().err


def test_heldout_verification_fails_loudly(tiny_model, corpus_file, tmp_path, capsys):
    """--verify with budget 0: exit 1 and a FAILED message exactly when the measured held-out dPPL is > 0
    (random weights: a sparse policy may also lower the PPL by chance, so several policies are tried)."""
    failures = 0
    for i, extra in enumerate(("threshold_high = 0.05\nthreshold_low = 0.05\nforce_recent = false\n",
                               "threshold_high = 0.05\nthreshold_low = 0.05\nforce_sink = false\n",
                               "threshold_high = 0.3\nthreshold_low = 0.3\n")):
        sparse = tmp_path / f"sparse{i}.toml"
        sparse.write_text('[prefill]\nmethod = "prism"\nmin_seq_len = 0\n[prefill.params]\nblock_size = 64\n' + extra)
        status = main(cli(tiny_model, corpus_file, tmp_path, "--max-dppl", "0", "--verify", str(sparse)))
        last = capsys.readouterr().err.strip().splitlines()[-1]
        measured = float(re.search(r"dPPL ([-+0-9.]+)%", last).group(1))
        assert status == (1 if measured > 0 else 0), last
        assert ("held-out verification FAILED" in last) == (status == 1)
        failures += status
    assert failures >= 1  # at least one policy costs perplexity here, and it was caught
    exact = tmp_path / "exact.toml"
    exact.write_text('[prefill]\nmethod = "dense"\n')
    assert main(cli(tiny_model, corpus_file, tmp_path, "--max-dppl", "0", "--verify", str(exact))) == 0
    assert "dPPL +0.000%" in capsys.readouterr().err


def test_calibrate_usage_errors(tiny_model, corpus_file, tmp_path, capsys):
    assert main(cli(tiny_model, corpus_file, tmp_path, "--max-dppl", "-1", "--out", str(tmp_path / "x.toml"))) == 2
    assert "--max-dppl -1" in capsys.readouterr().err
    assert main(cli(tiny_model, corpus_file, tmp_path, "--max-dppl", "1", "--out", str(tmp_path / "x.txt"))) == 2
    assert "must end in .toml" in capsys.readouterr().err
    assert main(cli(tiny_model, corpus_file, tmp_path, "--max-dppl", "1", "--base", "dense",
                    "--out", str(tmp_path / "x.toml"))) == 2
    assert "not 'prism'" in capsys.readouterr().err


def test_sensitivity_length_and_uniform_probes_end_to_end(tiny_model, corpus_file, base_policy, tmp_path, capsys):
    """--sensitivity-length measures step 1 on shorter windows (the report's per-layer table comes from them);
    --uniform-probes adds uniform allocations to the path as measured probes; the winner is the sparsest
    measured probe within the budget, and the policy loads."""
    import json

    out, report = tmp_path / "short.toml", tmp_path / "report.json"
    argv = cli(tiny_model, corpus_file, tmp_path, "--base", base_policy, "--max-dppl", "1000", "--values",
               "0.9,0.3", "--max-probes", "1", "--uniform-probes", "2", "--sensitivity-length", "192",
               "--report", str(report), "--out", str(out))
    assert main(argv) == 0, capsys.readouterr().err
    details = json.loads(report.read_text())
    n_layers = len(details["sensitivity"])
    uniform = [i for i, alloc in enumerate(details["path"])
               if len(set(alloc["choice"])) == 1 and alloc["choice"][0] >= 0 and i in {p[0] for p in details["probes"]}]
    assert uniform, details["probes"]  # at least one uniform value was measured
    measured = {int(i): r for i, r in details["probe_results"].items()}
    feasible = [i for i, d in details["probes"] if d <= 1000]
    mean = {i: sum(measured[i]["density"].values()) / len(measured[i]["density"]) for i in feasible}
    assert details["chosen"] == min(feasible, key=lambda i: mean[i])
    assert "sensitivity at 192" in out.read_text()
    policy = load_policy(str(out))
    chosen = details["path"][details["chosen"]]["choice"]
    for layer in range(n_layers):
        method, params = policy.prefill.for_layer(layer)
        assert (method == "dense") == (chosen[layer] < 0)


def test_the_policy_writer_round_trips_every_shipped_policy():
    """calibrate writes every policy through one writer (calibration.text.policy_toml): each shipped policy
    written and parsed back is the same policy, description and warning included."""
    from sparse_compile.calibration.text import policy_toml
    from sparse_compile.policy import parse_toml, shipped_policies

    for name in shipped_policies():
        policy = load_policy(name)
        back = parse_toml(policy_toml(policy, "a comment\n\nover lines"), f"{name}.toml")
        assert back.to_dict() == policy.to_dict(), name
        assert (back.description, back.warning) == (policy.description, policy.warning), name


def test_a_lost_needle_moves_to_the_next_denser_allocation():
    """The needle check steps along the path, least dense first, until an allocation loses no needle; with none
    left it returns the last one tried and its loss (the calibration then fails)."""
    from sparse_compile.calibration.needles import needle_search
    from sparse_compile.calibration.quality import Allocation, denser_steps

    path = [Allocation((0, 0), 1.0, 0.3), Allocation((0, 1), 0.5, 0.5), Allocation((1, 0), 0.6, 0.45),
            Allocation((-1, 1), 0.2, 0.7), Allocation((-1, -1), 0.0, 1.0)]
    assert denser_steps(path, 0, 3) == [2, 1, 3]
    assert denser_steps(path, 3, 5) == [4] and denser_steps(path, 4, 5) == [] and denser_steps(path, 0, 0) == []
    loss = {0: 2, 2: 1, 1: 0, 3: 0, 4: 0}
    seen = []

    def lost_by(i):
        seen.append(i)
        return loss[i]

    assert needle_search(0, denser_steps(path, 0, 3), lost_by) == (1, 0, 2) and seen == [0, 2, 1]
    assert needle_search(1, denser_steps(path, 1, 3), loss.get) == (1, 0, 0)  # the winner keeps every needle
    assert needle_search(0, [2], loss.get) == (2, 1, 1)  # out of steps: still loses one


def test_calibrate_writes_the_needle_check(tiny_model, corpus_file, base_policy, tmp_path, capsys):
    import json

    out, report = tmp_path / "needles.toml", tmp_path / "needles.json"
    argv = cli(tiny_model, corpus_file, tmp_path, "--base", base_policy, "--max-dppl", "1000", "--values", "0.9",
               "--max-probes", "1", "--uniform-probes", "0", "--niah-lengths", "420", "--report", str(report),
               "--out", str(out))
    assert main(argv) == 0, capsys.readouterr().err
    needles = json.loads(report.read_text())["needles"]
    assert needles["samples"] == 5 and needles["lengths"] == [420] and needles["lost"] == 0
    line = f"Needles: eager finds {needles['eager_found']} of 5 (NIAH at 420 tokens); the policy loses 0"
    assert line in out.read_text()
