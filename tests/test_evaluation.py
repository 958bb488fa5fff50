"""Evaluation building blocks: NIAH samples, policy sweeps, the baseline cache, markdown sections,
and the methods benchmark's CPU path (synthetic structured q/k, Flex block masks)."""

from __future__ import annotations

import json

import pytest
import torch

from sparse_compile.benchmarks import methods as mbench
from sparse_compile.benchmarks.harness import BenchSettings, run_benchmarks
from sparse_compile.benchmarks.timing import BenchmarkUnavailable, flex_block_mask, structured_qkv
from sparse_compile.evaluation import needle
from sparse_compile.evaluation.cache import ResultCache
from sparse_compile.evaluation.output import update_markdown_section
from sparse_compile.evaluation.policies import expand_policies, parse_sweep
from sparse_compile.kernels.block_mask import BlockList
from sparse_compile.methods import METHODS
from sparse_compile.params import PolicyError


class CharTokenizer:
    """One token per character (ord), enough to test sample layout."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


HAYSTACK = torch.tensor([ord(c) for c in ("lorem ipsum dolor sit amet " * 200)])


@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_needle_sample_layout(depth):
    tok = CharTokenizer()
    s = needle.make_sample(tok, HAYSTACK, 1000, depth, index=2, seed=5)
    text = tok.decode(s.input_ids)
    needle_text = needle.NEEDLE.format(key=s.key, value=s.value)
    assert len(s.input_ids) == 1000
    assert text.startswith(needle.PREFIX)
    assert text.endswith(needle.QUESTION.format(key=s.key))
    assert text[s.needle_start:].startswith(needle_text)
    hay = 1000 - len(needle.PREFIX) - len(needle_text) - len(needle.QUESTION.format(key=s.key))
    assert s.needle_start - len(needle.PREFIX) == round(depth * hay)
    assert len(s.value) == 7 and s.value.isdigit() and s.key in needle.KEYS
    assert s == needle.make_sample(tok, HAYSTACK, 1000, depth, index=2, seed=5)  # deterministic
    assert needle.make_sample(tok, HAYSTACK, 1000, depth, index=3, seed=5) != s


def test_needle_errors_and_grid():
    tok = CharTokenizer()
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        needle.make_sample(tok, HAYSTACK, 1000, 1.5)
    with pytest.raises(ValueError, match="shorter than the prompt"):
        needle.make_sample(tok, HAYSTACK, 100, 0.5)
    with pytest.raises(ValueError, match="fewer than"):
        needle.make_sample(tok, HAYSTACK[:50], 1000, 0.5)
    grid = needle.make_grid(tok, HAYSTACK, (600, 800), (0.0, 1.0), samples=2)
    assert [(s.length, s.depth, s.index) for s in grid] == [
        (L, d, i) for L in (600, 800) for d in (0.0, 1.0) for i in range(2)
    ]


def test_needle_score_is_string_match():
    assert needle.score(" 1234567.", "1234567") == 1.0
    assert needle.score(" 123456.", "1234567") == 0.0
    assert needle.score("", "1234567") == 0.0


def test_parse_sweep():
    s = parse_sweep("threshold*=0.9, 0.95,1")
    assert s.pattern == "threshold*" and s.values == (0.9, 0.95, 1)
    assert parse_sweep("prefill.params.gqa=per_kv_head").values == ("per_kv_head",)
    assert parse_sweep("calibrate=true,false").values == (True, False)
    for bad in ("threshold", "=1", "x="):
        with pytest.raises(ValueError, match="PATTERN=V1"):
            parse_sweep(bad)


def test_sweep_that_matches_nothing_is_an_error():
    with pytest.raises(ValueError, match="matches no parameter"):
        expand_policies(["dense"], [parse_sweep("threshold*=0.9")])
    runs = expand_policies(["dense"], [])
    assert [r.label for r in runs] == ["dense"]
    with pytest.raises(ValueError, match="given twice"):
        expand_policies(["dense", "dense"], [])


def test_threshold_sweep_sets_both_bands_and_keeps_dense_once():
    runs = expand_policies(["dense", "prism"], [parse_sweep("threshold*=0.9,0.99")])
    assert [r.label for r in runs] == ["dense", "prism[threshold*=0.9]", "prism[threshold*=0.99]"]
    for run, value in zip(runs[1:], (0.9, 0.99), strict=True):
        assert run.base == "prism"
        assert run.policy.prefill.params.threshold_high == value
        assert run.policy.prefill.params.threshold_low == value
    assert runs[1].policy.fingerprint() != runs[2].policy.fingerprint()
    dotted = expand_policies(["prism"], [parse_sweep("prefill.min_seq_len=0,128")])
    assert [r.policy.prefill.min_seq_len for r in dotted] == [0, 128]
    with pytest.raises(PolicyError, match="threshold_high"):
        expand_policies(["prism"], [parse_sweep("threshold_high=1.5")])


def test_result_cache_roundtrip(tmp_path):
    cache = ResultCache(tmp_path)
    key = {"kind": "ppl_window", "model": "abc", "ids": "123"}
    assert cache.get(key) is None
    cache.put(key, {"nll_sum": 1.25, "tokens": 3})
    assert cache.get(key) == {"nll_sum": 1.25, "tokens": 3}
    assert cache.get({**key, "ids": "124"}) is None
    disabled = ResultCache(None)
    disabled.put(key, 1)
    assert disabled.get(key) is None


def test_update_markdown_section_replaces_in_place(tmp_path):
    path = tmp_path / "EVAL.md"
    path.write_text("# Title\n\nintro\n")
    update_markdown_section(path, "a", "first")
    update_markdown_section(path, "b", "second")
    update_markdown_section(path, "a", "first, again")
    text = path.read_text()
    assert text.startswith("# Title\n\nintro\n")
    assert text.count("<!-- BEGIN a -->") == 1 and "first, again" in text and "first\n" not in text
    assert text.index("first, again") < text.index("second")


def test_structured_qk_has_sinks_locality_and_verticals():
    g = torch.Generator().manual_seed(0)
    q, k, _ = structured_qkv(1, 2, 1, 1024, 1024, 64, dtype=torch.float32, device="cpu", generator=g)
    scores = (q[0, 0] @ k[0, 0].T) / 8.0  # (L, L)
    i = torch.arange(1024)
    near = scores[i[64:], i[64:] - 1].mean()
    far = scores[i[512:], i[512:] - 500].mean()
    sink = scores[512:, 0].mean()
    assert near > far + 3.0 and sink > far + 3.0


def test_flex_block_mask_selects_the_same_blocks():
    from torch.nn.attention.flex_attention import BlockMask  # noqa: F401  (Flex is in torch)

    g = torch.Generator().manual_seed(0)
    dense = torch.rand(1, 2, 6, 6, generator=g) < 0.5
    dense |= torch.eye(6, dtype=torch.bool)
    blocks = BlockList.from_dense(dense.tril(), 128, 768, 768)
    bm = flex_block_mask(blocks, heads=4)
    assert torch.equal(bm.to_dense().bool(), blocks.to_dense().repeat_interleave(2, dim=1))


def test_methods_benchmark_times_every_declared_case_on_cpu():
    """Every registered method's every declared bench case gets a row in its phase (LessIsMore's select and
    reuse included), none fails, densities are fractions, and the cases that must be sparse at 1024 tokens
    are: FASA's 256-token budget keeps a quarter, Prism at p = 0.9 keeps fewer blocks than at 0.95."""
    result = mbench.run_methods_benchmark(
        prefill_lengths=(1024,), decode_lengths=(1024,), heads=2, kv_heads=1, head_dim=32, dtype=torch.float32,
        rep_ms=1.0, with_flex=False, device="cpu", methods=(*METHODS, "not_a_method"), log=lambda s: None,
    )
    rows = {(r["phase"], r["impl"]): r for r in result["rows"]}
    expected = {(case.phase, mbench.case_name(name, case)) for name, m in METHODS.items() for case in m.bench_cases}
    assert expected <= set(rows) and ("decode", "lessismore:reuse") in expected
    for key in expected:
        assert "error" not in rows[key] and rows[key]["ms"] > 0 and 0.0 < rows[key]["density"] <= 1.0, key
    assert rows[("decode", "fasa")]["density"] == pytest.approx(0.25, abs=0.01)
    assert rows[("prefill", "prism:p0.9")]["density"] < rows[("prefill", "prism")]["density"] < 1.0
    assert rows[("prefill", "prism:select")]["density"] == rows[("prefill", "prism")]["density"]
    assert result["skipped"] == {"not_a_method": "not registered in sparse_compile.methods.METHODS"}
    table = mbench.markdown_table(result)
    assert "| decode | 1K | lessismore:reuse |" in table and "skipped not_a_method" in table


def test_bench_harness_cpu_path_writes_each_part(tmp_path):
    """`bench --what prefill,decode --device cpu`: the harness writes each part's JSON and markdown and the
    combined bench.md, with the chosen methods' rows in their phases."""
    written, failed = run_benchmarks(tmp_path / "out", what=("prefill", "decode"), settings=BenchSettings(
        prefill_lengths=(256,), decode_lengths=(256,), methods=("dense", "lessismore"), heads=2, kv_heads=1,
        head_dim=32, rep_ms=1.0, with_flex=False, device="cpu"), log=lambda s: None)
    assert failed == 0 and {p.name for p in written} >= {"bench_prefill.json", "bench_decode.md", "bench.md"}
    text = (tmp_path / "out" / "bench.md").read_text()
    assert "| prefill | 256 | dense |" in text and "| decode | 256 | lessismore:reuse |" in text
    assert f"torch {torch.__version__}" in text and "transformers " in text  # the machine line beside the numbers
    assert json.loads((tmp_path / "out" / "bench_decode.json").read_text())["env"]["device"] == "cpu"
    assert "lessismore" not in (tmp_path / "out" / "bench_prefill.md").read_text()  # a decode-only method


def test_bench_fails_fast_without_cuda(tmp_path):
    assert not torch.cuda.is_available(), "this test checks the CPU-only failure path"
    with pytest.raises(BenchmarkUnavailable, match="needs a CUDA GPU"):
        run_benchmarks(tmp_path / "out")
    assert not (tmp_path / "out").exists()  # failed before writing anything


def test_device_and_dtype_resolution():
    from sparse_compile.evaluation.device import default_device, dtype_name, resolve_device, resolve_dtype

    assert resolve_device("cpu") == torch.device("cpu") and str(resolve_device(None)) == default_device()
    assert resolve_dtype(None) is torch.float32 and resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype("float16") is torch.float16 and dtype_name(torch.bfloat16) == "bf16"
    for bad in ("tpu", "cuda:x", "cpu:1"):
        with pytest.raises(ValueError, match="choose cpu or cuda"):
            resolve_device(bad)
    with pytest.raises(ValueError, match="choose fp32, bf16, fp16"):
        resolve_dtype("int8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU is available"):
            resolve_device("cuda")


def test_eval_config_resolves_device_and_niah_samples():
    from sparse_compile.evaluation.runner import EvalConfig

    cpu = EvalConfig(device="cpu")
    assert cpu.device == "cpu" and cpu.dtype == "fp32" and cpu.niah_samples == 1
    assert EvalConfig(device="cpu", dtype="bfloat16", niah_samples=4).dtype == "bf16"
    assert EvalConfig(device="cpu", niah_samples=4).niah_samples == 4
    if torch.cuda.is_available():
        assert EvalConfig(device="cuda").niah_samples == 3


def niah_row(length, depth, index, score, answer="x"):
    return {"length": length, "depth": depth, "index": index, "key": "k", "value": "1234567", "answer": answer,
            "score": score, "seconds": 1.0 + index}


def test_niah_hits_timing_and_comparison_with_eager():
    from sparse_compile.evaluation.runner import compare_niah, summarize_niah

    eager = [niah_row(64, 0.0, i, s) for i, s in enumerate((1.0, 1.0, 0.0))] + [niah_row(64, 1.0, 0, 1.0)]
    policy = [niah_row(64, 0.0, i, s) for i, s in enumerate((1.0, 0.0, 1.0))] + [niah_row(64, 1.0, 0, 1.0)]
    summary = summarize_niah(policy)
    assert summary["hits"] == {"64": {"0": [2, 3], "1": [1, 1]}}
    assert summary["timing"]["64"] == {"first_s": 1.0, "steady_s": pytest.approx((2.0 + 3.0 + 1.0) / 3)}
    vs = compare_niah(eager, policy)
    assert vs["compared"] == 4
    assert [(x["depth"], x["index"]) for x in vs["lost"]] == [(0.0, 1)]
    assert [(x["depth"], x["index"]) for x in vs["gained"]] == [(0.0, 2)]
    assert compare_niah(eager, eager) == {"compared": 4, "lost": [], "gained": []}


def test_baseline_cache_key_separates_device_and_dtype(tmp_path):
    from types import SimpleNamespace

    from sparse_compile.evaluation.runner import EvalConfig, Evaluator

    def key(dtype):
        ev = Evaluator(EvalConfig(device="cpu", dtype=dtype), SimpleNamespace(), None, torch.zeros(1), "fp",
                       ResultCache(tmp_path), None)
        return ev.cache_key("ppl_window", torch.arange(5))

    fp32, bf16 = key("fp32"), key("bf16")
    assert "device" not in fp32 and "dtype" not in fp32  # the CPU fp32 reference keeps its keys
    assert bf16["dtype"] == "bf16" and {k: v for k, v in bf16.items() if k != "dtype"} == fp32


def test_eval_names_methods_that_its_tasks_do_not_measure():
    """A method acts in the phases its Method declares: FASA's decode is invisible to ppl/continuation."""
    from sparse_compile.evaluation.runner import unmeasured_phases

    fasa, prism = expand_policies(["fasa", "prism"], [])
    assert unmeasured_phases(fasa, ("ppl", "continuation")) == [
        "fasa: fasa acts in decode, which --tasks ppl,continuation does not run (add decode or niah)"]
    assert unmeasured_phases(fasa, ("ppl", "decode")) == [] and unmeasured_phases(prism, ("ppl",)) == []
