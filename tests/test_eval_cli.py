"""`python -m sparse_compile`: argument errors exit 2 with a message that names the problem; a tiny
end-to-end eval (random 2-layer Llama, lengths <= 400) writes JSON, markdown and plots, gives the
same numbers twice and reuses the cached eager baseline."""

from __future__ import annotations

import json
import random

import pytest
import torch

from sparse_compile.__main__ import build_parser, main
from sparse_compile.argtypes import parse_length, parse_lengths
from sparse_compile.benchmarks.harness import PARTS
from sparse_compile.evaluation.models import save_tiny_llama
from sparse_compile.methods.two_stage import kept_pages

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return str(save_tiny_llama(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> str:
    rng = random.Random(0)
    words = "the of attention sparse block query key value token layer head window sink".split()
    lines = [" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(400)]
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text("\n".join(lines))
    return str(path)


def test_parse_length():
    assert parse_length("8K") == 8192 and parse_length("8k") == 8192 and parse_length("4096") == 4096
    assert parse_lengths("2K, 4K,8192") == (2048, 4096, 8192)
    for bad in ("0", "x", "-1", "1.5K", "K"):
        with pytest.raises(Exception, match="invalid length"):
            parse_length(bad)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "required"),
        (["eval", "--lengths", "2X"], "invalid length '2X'"),
        (["eval", "--tasks", "ppl,foo"], "invalid task 'foo'"),
        (["eval", "--niah-depths", "a,b"], "invalid number list"),
        (["eval", "--windows", "0"], "must be >= 1"),
        (["eval", "--inner", "tvm"], "invalid choice"),
        (["eval", "--cache", "sparse8"], "argument --cache: unknown cache 'sparse8'; choose from static, dynamic, "
                                         "sparse[16|32|64][-pages]"),
        (["explain"], "required: model"),
    ],
)
def test_argparse_errors_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--policy", "nope"], "unknown policy 'nope'"),
        (["--sweep", "threshold"], "PATTERN=V1,V2"),
        (["--sweep", "no_such_param*=1,2"], "matches no parameter"),
        (["--niah-depths", "0,1.5"], "[0, 1]"),
        (["--lengths", "8"], "lengths must be >= 16"),
        (["--corpus", "/nonexistent/corpus.txt"], "no such file: /nonexistent/corpus.txt"),
        (["--model", "/nonexistent/model_dir"], "cannot load model '/nonexistent/model_dir'"),
        (["--lengths", "100000"], "fewer than one window of 100000"),
    ],
)
def test_eval_usage_errors_exit_2(extra, message, tiny_model, corpus_file, tmp_path, capsys):
    argv = ["eval", "--model", tiny_model, "--corpus", corpus_file, "--out", str(tmp_path / "out"),
            "--cache-dir", str(tmp_path / "cache"), "--no-progress", *extra]
    assert main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after any model-loading progress bar
    assert last.startswith("error: ") and message in last, last
    assert not (tmp_path / "out").exists()  # nothing written on a usage error


def test_eval_bf16_and_device_errors(tiny_model, corpus_file, tmp_path, capsys):
    res = run_eval_cli(tiny_model, corpus_file, tmp_path / "bf", tmp_path / "cache", "--tasks", "ppl", "--lengths",
                       "64", "--windows", "1", "--dtype", "bf16", "--device", "cpu")
    assert res["meta"]["env"]["dtype"] == "bf16" and res["meta"]["model"]["dtype"] == "bfloat16"
    assert res["runs"][0]["ppl"]["64"]["dppl"] == 0.0  # dense == eager in bf16 too
    if not torch.cuda.is_available():
        argv = ["eval", "--model", tiny_model, "--corpus", corpus_file, "--device", "cuda", "--no-progress",
                "--out", str(tmp_path / "none")]
        assert main(argv) == 2
        assert "no CUDA GPU is available" in capsys.readouterr().err


def test_bench_usage_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--what", "everything"])
    assert exit_info.value.code == 2 and "invalid part 'everything'" in capsys.readouterr().err
    for part in PARTS:  # every part parses (the GPU runs them; here only the CPU parts run)
        assert build_parser().parse_args(["bench", "--what", part]).what == (part,)
    assert main(["bench", "--what", "engine", "--device", "cpu", "--out", "unused"]) == 2
    assert "runs methods, prefill, decode only" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["bench"]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err


def test_explain_prints_the_site_report(tiny_model, capsys):
    assert main(["explain", tiny_model, "--length", "64"]) == 0
    out = capsys.readouterr().out
    assert "2/2 attention calls rewritten" in out and "prefill" in out and "dense" in out
    assert main(["explain", tiny_model, "--length", "64", "--decode"]) == 0
    out = capsys.readouterr().out
    assert "(decode): 2/2 attention calls rewritten" in out
    assert main(["explain", "/nonexistent/model_dir"]) == 2


def run_eval_cli(tiny_model: str, corpus_file: str, out, cache, *extra: str) -> dict:
    argv = ["eval", "--model", tiny_model, "--corpus", corpus_file, "--lengths", "64,128", "--windows", "2",
            "--niah-lengths", "400", "--niah-depths", "0,1", "--niah-max-new-tokens", "3",
            "--cache-dir", str(cache), "--out", str(out), "--no-progress", *extra]
    assert main(argv) == 0
    return json.loads((out / "results.json").read_text())


def test_eval_end_to_end_dense_equals_eager(tiny_model, corpus_file, tmp_path, capsys):
    md = tmp_path / "EVAL.md"
    md.write_text("# Evaluation results\n")
    res = run_eval_cli(tiny_model, corpus_file, tmp_path / "a", tmp_path / "cache", "--write-md", str(md),
                       "--section", "tiny")
    (run,) = res["runs"]
    assert run["label"] == "dense"
    for length in ("64", "128"):
        base, dense = res["baseline"]["ppl"][length], run["ppl"][length]
        assert len(dense["windows"]) == 2 and dense["windows"][0]["tokens"] == int(length) - 1
        assert dense["ppl"] == base["ppl"] and dense["dppl"] == 0.0  # exact, not approximately
        assert dense["mean_density"] == 1.0 and set(dense["layer_density"]) == {"0", "1"}
        assert all(w["ran_sites"] for w in dense["windows"])  # every window ran the rewritten graph
    assert run["compile"]["ppl"]["sites"] == 4 and run["compile"]["ppl"]["rejected"] == 0
    grid = run["niah"]["grid"]
    assert list(grid) == ["400"] and list(grid["400"]) == ["0", "1"]
    assert [s["answer"] for s in run["niah"]["samples"]] == [s["answer"] for s in res["baseline"]["niah"]["samples"]]
    assert run["niah"]["decode_mean_density"] == 1.0
    assert run["niah"]["vs_eager"] == {"compared": 2, "lost": [], "gained": []}  # dense loses no needle
    assert run["niah"]["hits"]["400"].keys() == {"0", "1"} and res["meta"]["env"]["device"] == "cpu"
    assert all(run["ppl"][L]["first_s"] > 0 and run["ppl"][L]["steady_s"] is not None for L in ("64", "128"))
    for name in ("ppl_vs_density.png", "niah.png"):
        assert (tmp_path / "a" / name).read_bytes()[:8] == PNG_MAGIC
    report = (tmp_path / "a" / "results.md").read_text()
    assert "| dense | 64 | 2 |" in report and "| eager | 128 | 2 |" in report
    assert "- Device: cpu; dtype fp32" in report and "| policy | L | depth 0 | depth 1 | lost vs eager |" in report
    assert "<!-- BEGIN tiny -->" in md.read_text() and "| dense | 128 | 2 |" in md.read_text()
    # the budget check: dense loses no needle and equals eager; it has no sparse method to check
    assert run["budget"]["verdict"] == "PASS"
    assert [(c["check"], c["status"]) for c in run["budget"]["checks"]] == [("needles", "PASS"), ("dppl", "PASS"),
                                                                           ("job", "n/a")]
    assert "| dense | **PASS** |" in report
    captured = capsys.readouterr()
    assert "| dense | 64 |" in captured.out
    # --no-progress: one status line per finished run on stderr instead of progress bars
    assert "eval: eager: " in captured.err and "eval: policy 1/1 dense: " in captured.err

    # rerun: same numbers; the eager baseline comes from the cache (its recorded timings too)
    again = run_eval_cli(tiny_model, corpus_file, tmp_path / "b", tmp_path / "cache", "--tasks", "ppl",
                         "--lengths", "128")
    assert again["runs"][0]["ppl"]["128"]["ppl"] == run["ppl"]["128"]["ppl"]
    assert again["baseline"]["ppl"]["128"] == res["baseline"]["ppl"]["128"]
    assert "niah" not in again["runs"][0] and not (tmp_path / "b" / "niah.png").exists()


def test_eval_prism_threshold_sweep_gives_a_curve(tiny_model, corpus_file, tmp_path):
    res = run_eval_cli(tiny_model, corpus_file, tmp_path / "out", tmp_path / "cache", "--tasks", "ppl",
                       "--lengths", "256", "--windows", "1", "--policy", "dense", "--policy", "prism",
                       "--sweep", "prefill.min_seq_len=0", "--sweep", "block_size=64", "--threshold-sweep", "0.3,1.0")
    labels = [r["label"] for r in res["runs"]]
    assert labels == ["dense[prefill.min_seq_len=0]",  # a dotted path matches every policy that has it
                      "prism[prefill.min_seq_len=0,block_size=64,threshold*=0.3]",
                      "prism[prefill.min_seq_len=0,block_size=64,threshold*=1.0]"]
    low, full = (r["ppl"]["256"] for r in res["runs"][1:])
    assert full["mean_density"] == 1.0 and full["ppl"] == pytest.approx(res["baseline"]["ppl"]["256"]["ppl"],
                                                                        rel=1e-5)
    assert low["mean_density"] < 1.0
    assert (tmp_path / "out" / "ppl_vs_density.png").read_bytes()[:8] == PNG_MAGIC
    # threshold 1.0 selects every block: density 1, so the budget's job check fails: it skipped nothing
    job = {c["check"]: c for c in res["runs"][2]["budget"]["checks"]}["job"]
    assert job["status"] == "FAIL" and "it skipped nothing" in job["reason"]


def test_eval_continuation_and_decode_tasks(tiny_model, corpus_file, tmp_path):
    """continuation: the last tokens of each window (dense agrees with eager on every one); decode: teacher-forced
    decode steps after a prompt, where FASA acts (dense: agreement 1 and the same PPL; FASA at an 8-token budget:
    a decode density below 1, which whole-window PPL never shows)."""
    res = run_eval_cli(tiny_model, corpus_file, tmp_path / "out", tmp_path / "cache", "--tasks",
                       "continuation,decode", "--lengths", "96", "--windows", "1", "--last", "16", "--decode-steps",
                       "4", "--policy", "dense", "--policy", "fasa", "--sweep", "decode.min_seq_len=0",
                       "--sweep", "budget=8")
    base = res["baseline"]
    dense, fasa = res["runs"]
    assert dense["ppl"]["96"]["agree_last"] == 1.0 and dense["ppl"]["96"]["last_ppl"] == base["ppl"]["96"]["last_ppl"]
    assert dense["decode"]["96"]["agreement"] == 1.0 and dense["decode"]["96"]["ppl"] == base["decode"]["96"]["ppl"]
    assert len(base["decode"]["96"]["windows"][0]["top"]) == 4
    assert 0.0 <= fasa["decode"]["96"]["agreement"] <= 1.0 and fasa["decode"]["96"]["mean_density"] < 1.0
    assert res["meta"]["notes"] == []  # decode is measured: FASA's phase is covered
    report = (tmp_path / "out" / "results.md").read_text()
    assert "PPL of the last 16" in report and "top-1 agreement with eager" in report and "| fasa[" in report


def test_eval_decode_on_a_sparse_cache(tiny_model, corpus_file, tmp_path):
    """`--cache sparse32`: the policies' decode steps run on a SparseCache made for each policy (9 pages of 32
    over a 256-token prompt + 8 steps). Dense: the same top-1 tokens and PPL as on a DynamicCache (sums over the
    cache's unwritten, masked slots differ in float order only). FASA at a 96-token budget (layer 1; layer 0 is
    dense): with every page a candidate (candidates 4 x 96 >= 264 slots) it selects as the single-stage FASA does
    on a DynamicCache; with one budget's worth of pages (candidates 1.0: 4 of the 9 pages) the page prefilter
    prunes, the run completes and keeps < 1 of the keys. Both select in two stages (the Report's SparseCache
    sites), nothing does on a DynamicCache; the eager baseline runs on a DynamicCache whatever --cache says, from
    the same cached entries."""
    assert kept_pages(96, 32, 9, sink=4, recent=8) == 4 and kept_pages(4 * 96, 32, 9, sink=4, recent=8) == 9
    common = ("--tasks", "decode", "--lengths", "256", "--windows", "2", "--decode-steps", "8", "--policy", "dense",
              "--policy", "fasa", "--sweep", "decode.min_seq_len=0", "--sweep", "budget=96", "--sweep", "recent=8")
    cache = tmp_path / "cache"
    dyn = run_eval_cli(tiny_model, corpus_file, tmp_path / "dyn", cache, *common)
    entries = sorted(cache.iterdir())
    sparse = run_eval_cli(tiny_model, corpus_file, tmp_path / "sparse", cache, *common, "--cache", "sparse32",
                          "--sweep", "candidates=4.0,1.0")
    assert sorted(cache.iterdir()) == entries  # the baseline's cache keys do not depend on --cache
    assert sparse["baseline"]["decode"] == dyn["baseline"]["decode"]
    assert sparse["baseline"]["cache"]["class"] == "DynamicCache" and sparse["meta"]["config"]["cache"] == "sparse32"

    dense_dyn, fasa_dyn = (r["decode"]["256"] for r in dyn["runs"])
    dense, fasa_all, fasa_few = (r["decode"]["256"] for r in sparse["runs"])
    assert [r["cache"] for r in dyn["runs"]] == [{"form": "dynamic", "class": "DynamicCache"}] * 2
    assert [r["cache"] for r in sparse["runs"]] == [
        {"form": "sparse32", "class": "SparseCache", "page_size": 32, "dims_copy": True}] * 3
    assert [r["top"] for r in dense["windows"]] == [r["top"] for r in dense_dyn["windows"]]
    assert dense["ppl"] == pytest.approx(dense_dyn["ppl"], rel=1e-5) and dense["agreement"] == 1.0
    assert dense["mean_density"] == 1.0

    assert not any(r["two_stage"] for r in dyn["runs"])
    assert [r["two_stage"] for r in sparse["runs"]] == [False, True, True]
    assert sparse["runs"][1]["compile"]["decode"]["two_stage_sites"] == 1  # layer 1's decode node
    assert "selects in two stages over the SparseCache's buffers" in sparse["runs"][2]["compile"]["decode"]["report"]
    assert [r["top"] for r in fasa_all["windows"]] == [r["top"] for r in fasa_dyn["windows"]]
    assert fasa_all["ppl"] == pytest.approx(fasa_dyn["ppl"], rel=1e-5)
    assert fasa_all["layer_density"] == pytest.approx(fasa_dyn["layer_density"], rel=1e-6)
    assert fasa_all["layer_density"]["1"] < 1.0 and fasa_few["layer_density"]["1"] < 1.0
    assert fasa_few["mean_density"] < 1.0 and 0.0 <= fasa_few["agreement"] <= 1.0
    assert len(fasa_few["windows"]) == 2 and all(len(w["top"]) == 8 for w in fasa_few["windows"])

    report = (tmp_path / "sparse" / "results.md").read_text()
    assert "| policy | cache | prompt |" in report and "| eager | DynamicCache | 256 |" in report
    assert f"| {sparse['runs'][2]['label']} | SparseCache P=32 | 256 |" in report
    assert "1 select in two stages over the SparseCache P=32's buffers" in report


def test_eval_niah_on_a_sparse_cache(tiny_model, corpus_file, tmp_path):
    """`--cache sparse16-pages`: NIAH's greedy answers decode on a SparseCache (pages only, no dims copy). Dense
    answers as eager does (which ran on a DynamicCache); FASA's decode node selects in two stages over the pages."""
    res = run_eval_cli(tiny_model, corpus_file, tmp_path / "out", tmp_path / "cache", "--tasks", "niah", "--cache",
                       "sparse16-pages", "--policy", "dense", "--policy", "fasa", "--sweep", "decode.min_seq_len=0",
                       "--sweep", "budget=96", "--sweep", "recent=8")
    dense, fasa = res["runs"]
    eager = [s["answer"] for s in res["baseline"]["niah"]["samples"]]
    assert [s["answer"] for s in dense["niah"]["samples"]] == eager and len(eager) == 2
    assert dense["niah"]["vs_eager"]["lost"] == [] and not dense["two_stage"]
    assert fasa["two_stage"] and fasa["compile"]["niah"]["two_stage_sites"] == 1
    assert fasa["niah"]["decode_mean_density"] < 1.0 and fasa["niah"]["vs_eager"]["compared"] == 2
    assert fasa["cache"] == {"form": "sparse16-pages", "class": "SparseCache", "page_size": 16, "dims_copy": False}
    report = (tmp_path / "out" / "results.md").read_text()
    assert "| policy | cache | L=400 |" in report and "| eager | DynamicCache |" in report
    assert f"| {fasa['label']} | SparseCache P=16 pages only |" in report
