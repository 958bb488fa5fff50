"""`run_eval`: perplexity, continuation, needle retrieval and decode agreement of a model under policies.

Tasks (`EvalConfig.tasks`, `eval --tasks`):
  ppl           whole-window perplexity at each length (prefill methods act on every window)
  continuation  the last `last` predictions of the same windows: their PPL and top-1 agreement with eager
  niah          RULER-style needle retrieval by greedy decoding (prefill and decode methods)
  decode        a prompt of each length prefilled, then `decode_steps` real tokens fed as decode steps:
                top-1 agreement with eager per step, the continuation PPL and the decode density (where
                decode methods such as FASA and LessIsMore act; prefill PPL never sees them)

`EvalConfig.cache` (`eval --cache`) is the KV cache the policies' decode and niah runs use, one per window /
sample with room for the prompt and its steps: "dynamic" (a DynamicCache, the default), "static" (a
StaticCache), or "sparse[16|32|64][-pages]" (a `sparse_compile.SparseCache` made for the run's policy, whose
page summaries let FASA and LessIsMore select in two stages). The eager baseline always runs on a
DynamicCache. Each run records its `cache` and whether any site selected in two stages (`two_stage`).

Every policy's results end with `budget`: PASS/FAIL against the quality budget of a shipped default (no
needle eager finds lost, ΔPPL <= 1%, and it still does its job; `sparse_compile.evaluation.budget`).

    from sparse_compile.evaluation import EvalConfig, run_eval, write_outputs
    results = run_eval(EvalConfig(policies=("dense", "prism"), lengths=(2048, 4096)))
    write_outputs(results, Path("results/eval"))

The baseline is the eager model (no torch.compile), cached per model fingerprint, exact input
ids, device and dtype; every policy runs through `torch.compile(model, backend="sparse")` (eager
inner compiler by default). dPPL is relative to the baseline; densities come from the backend's
Report. `device` (cpu, cuda; default cuda when available) and `dtype` (fp32 default, bf16, fp16)
say where the model runs: CPU fp32 is the reference, CUDA runs the methods' Triton paths.

Timing: the first call at each length includes dynamo's (re)compile, so every table reports the
first call apart from the steady state (the mean of the later calls at that length).
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import sparse_compile
from sparse_compile.cache import build_cache, cache_form
from sparse_compile.evaluation import needle as niah
from sparse_compile.evaluation.budget import budget_check
from sparse_compile.evaluation.cache import DEFAULT_CACHE_DIR, ResultCache, ids_digest
from sparse_compile.evaluation.corpus import DEFAULT_CORPUS, Corpus, load_corpus, tokenize, windows
from sparse_compile.evaluation.device import (
    device_description,
    dtype_name,
    resolve_device,
    resolve_dtype,
    synchronize,
)
from sparse_compile.evaluation.models import DEFAULT_MODEL, describe_model, load_model, model_fingerprint
from sparse_compile.evaluation.perplexity import decode_scores, logits_fn, nll_summary, perplexity, window_scores
from sparse_compile.evaluation.policies import PolicyRun, Sweep, expand_policies
from sparse_compile.methods import METHODS
from sparse_compile.policy import Policy
from sparse_compile.report import Report

TASKS = ("ppl", "continuation", "niah", "decode")
WINDOW_TASKS = ("ppl", "continuation")  # tasks scored on the same forward of each window
BASELINE = "eager"
BASELINE_CACHE = "dynamic"  # the eager baseline's decode and niah runs: a DynamicCache, whatever `cache` says
CACHE_CLASSES = {"dynamic": "DynamicCache", "static": "StaticCache", "sparse": "SparseCache"}


@dataclass(frozen=True)
class EvalConfig:
    """Everything that decides an evaluation's numbers (recorded in the results)."""

    model: str = DEFAULT_MODEL
    policies: tuple[str, ...] = ("dense",)
    sweeps: tuple[Sweep, ...] = ()
    corpus: str = DEFAULT_CORPUS
    lengths: tuple[int, ...] = (2048, 4096, 8192)
    tokens_per_length: int = 16384
    windows: int | None = None
    tasks: tuple[str, ...] = ("ppl", "niah")
    last: int = 128  # continuation: scored tokens at the end of each window
    decode_steps: int = 64  # decode: teacher-forced steps after each prompt
    niah_lengths: tuple[int, ...] | None = None
    niah_depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    niah_samples: int | None = None  # None: 3 per cell on CUDA, 1 on the CPU
    niah_max_new_tokens: int = 12
    seed: int = 0
    inner: str = "eager"
    cache_dir: str | None = str(DEFAULT_CACHE_DIR)
    progress: bool = True
    device: str | None = None  # None: cuda when available, else cpu (resolved at construction)
    dtype: str = "fp32"
    cache: str = "dynamic"  # the policies' decode/niah KV cache: dynamic, static, sparse[16|32|64][-pages]

    def __post_init__(self) -> None:
        # resolved here, so that the recorded config says where the numbers came from
        object.__setattr__(self, "device", str(resolve_device(self.device)))
        object.__setattr__(self, "dtype", dtype_name(resolve_dtype(self.dtype)))
        if self.niah_samples is None:
            object.__setattr__(self, "niah_samples", 3 if self.device.startswith("cuda") else 1)
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise ValueError(f"tasks must be a non-empty subset of {', '.join(TASKS)}; got {', '.join(self.tasks)}")
        if not self.policies:
            raise ValueError("give at least one policy")
        bad = [n for n in (*self.lengths, *(self.niah_lengths or ())) if n < 16]
        if bad or not self.lengths:
            raise ValueError(f"lengths must be >= 16 tokens; got {bad or 'none'}")
        if any(not 0.0 <= d <= 1.0 for d in self.niah_depths) or not self.niah_depths:
            raise ValueError(f"NIAH depths must lie in [0, 1]; got {self.niah_depths}")
        if "continuation" in self.tasks and any(n <= self.last for n in self.lengths):
            raise ValueError(f"continuation scores the last {self.last} tokens: every length must exceed it")
        for name in ("tokens_per_length", "niah_samples", "niah_max_new_tokens", "last", "decode_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.windows is not None and self.windows < 1:
            raise ValueError(f"windows must be >= 1, got {self.windows}")
        cache_form(self.cache)  # ValueError naming the forms

    def window_count(self, length: int) -> int:
        """Windows per length: `windows` if set, else tokens_per_length // length (at least 1)."""
        return self.windows if self.windows is not None else max(1, self.tokens_per_length // length)

    def needle_lengths(self) -> tuple[int, ...]:
        return self.niah_lengths if self.niah_lengths is not None else self.lengths

    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    def torch_dtype(self) -> torch.dtype:
        return resolve_dtype(self.dtype)


def first_and_steady(seconds: list[float]) -> dict[str, float | None]:
    """{"first_s": the first call, "steady_s": mean of the later calls (None with one call)}.

    The first call at a new length includes dynamo's (re)compile; the later ones are what a user
    pays once the model is warm.
    """
    if not seconds:
        return {"first_s": None, "steady_s": None}
    rest = seconds[1:]
    return {"first_s": seconds[0], "steady_s": sum(rest) / len(rest) if rest else None}


def compile_with_policy(model: Any, policy: Any, report: Report, inner: str = "eager") -> Any:
    """`torch.compile(model, backend="sparse")` with `policy`, filling `report`.

    Dynamo's caches are reset first, so a graph compiled for an earlier policy is never reused.
    """
    torch._dynamo.reset()
    return torch.compile(model, backend="sparse", options={"policy": policy, "inner": inner, "report": report})


def source_revision() -> str:
    """The first 10 hex digits of the commit the package's checkout is at (its .git/HEAD), or "unknown"."""
    head = Path(sparse_compile.__file__).resolve().parent.parent / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        return (head.parent / ref[5:]).read_text().strip()[:10] if ref.startswith("ref: ") else ref[:10]
    except OSError:
        return "unknown"


def environment(argv: list[str] | None = None, device: torch.device | None = None,
                dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Command, machine, device, dtype, versions and date: what EVAL.md must state next to the numbers."""
    import transformers

    return {
        "command": "python -m sparse_compile " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sparse_compile_revision": source_revision(),
        **device_description(device if device is not None else torch.device("cpu")),
        "dtype": dtype_name(dtype if dtype is not None else torch.float32),
    }


def mean_layer_density(records: list[dict[int, float]]) -> dict[str, float]:
    """Per-layer mean over calls of `Report.layer_density` dicts (keys as strings, for JSON)."""
    layers = sorted({layer for r in records for layer in r})
    return {str(layer): sum(r[layer] for r in records if layer in r) / sum(layer in r for r in records)
            for layer in layers}


def cache_record(kind: str) -> dict[str, Any]:
    """What results record of a cache form: {"form", "class"} (+ "page_size", "dims_copy" for a SparseCache)."""
    cls, page_size, dims_copy = cache_form(kind)
    record: dict[str, Any] = {"form": kind, "class": CACHE_CLASSES[cls]}
    if cls == "sparse":
        record.update(page_size=page_size, dims_copy=dims_copy)
    return record


def overall(per_layer: dict[str, float]) -> float | None:
    return sum(per_layer.values()) / len(per_layer) if per_layer else None


@dataclass
class Evaluator:
    """Holds what one evaluation shares across runs: model, tokens, cache, progress settings."""

    config: EvalConfig
    model: Any
    tokenizer: Any
    corpus_ids: torch.Tensor
    fingerprint: str
    cache: ResultCache
    corpus: Corpus
    samples: list[niah.NeedleSample] = field(default_factory=list)

    def cache_key(self, kind: str, ids: Any, **extra: Any) -> dict[str, Any]:
        """The eager baseline's cache key: model, torch, exact ids, and the device and dtype when they are
        not the CPU fp32 reference (so reference entries keep their keys)."""
        key = {"kind": kind, "model": self.fingerprint, "torch": torch.__version__, "ids": ids_digest(ids), **extra}
        device = self.config.torch_device()
        if device.type != "cpu":
            key["device"] = device_description(device).get("gpu", device.type)
        if self.config.dtype != "fp32":
            key["dtype"] = self.config.dtype
        return key

    def bar(self, items: list, desc: str) -> Any:
        return tqdm(items, desc=desc, disable=not self.config.progress, leave=False, dynamic_ncols=True)

    # -- perplexity -------------------------------------------------------------------------
    def ppl_windows(self, length: int) -> list[tuple[int, torch.Tensor]]:
        return windows(self.corpus_ids, length, self.config.window_count(length))

    def wants(self, task: str) -> bool:
        return task in self.config.tasks

    def window_row(self, forward: Any, ids: torch.Tensor) -> tuple[dict[str, Any], list[int]]:
        """({nll_sum, tokens, last_nll_sum, last_tokens}, argmax of the last predictions) of one window."""
        last = self.config.last if self.wants("continuation") else 1
        nll, top = window_scores(forward, ids, last)
        row = nll_summary(nll)
        if self.wants("continuation"):
            tail = nll_summary(nll[-last:])
            row.update(last_nll_sum=tail["nll_sum"], last_tokens=tail["tokens"])
        return row, top.tolist()

    def baseline_ppl(self, length: int) -> dict[str, Any]:
        """The eager model's windows at `length` (cached one by one): PPL and, for continuation, the last
        predictions' NLL and argmax."""
        forward = logits_fn(self.model, self.config.torch_device())
        rows = []
        last = self.config.last if self.wants("continuation") else None
        for start, ids in self.bar(self.ppl_windows(length), f"ppl {BASELINE} L={length}"):
            key = self.cache_key("ppl_window", ids, **({} if last is None else {"last": last}))
            row = self.cache.get(key)
            if row is None:
                t0 = time.perf_counter()
                row, top = self.window_row(forward, ids)
                row.update(seconds=time.perf_counter() - t0, **({} if last is None else {"top": top}))
                self.cache.put(key, row)
            rows.append({"start": start, **row})
        return {"ppl": perplexity(rows), "windows": rows, **self.continuation(rows)}

    def continuation(self, rows: list[dict[str, Any]], base: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """{"last_ppl", "agree_last"} over window rows (agreement against the baseline's rows), or {}."""
        if not self.wants("continuation"):
            return {}
        out = {"last_ppl": perplexity([{"nll_sum": r["last_nll_sum"], "tokens": r["last_tokens"]} for r in rows])}
        if base is not None:
            same = sum(a == b for r, ref in zip(rows, base, strict=True) for a, b in zip(r["top"], ref["top"],
                                                                                        strict=True))
            out["agree_last"] = same / sum(len(r["top"]) for r in rows)
        return out

    def policy_ppl(self, compiled: Any, report: Report, length: int, base: list[dict[str, Any]]) -> dict[str, Any]:
        """The compiled model's windows at `length`, with the per-layer prefill density of each window."""
        forward = logits_fn(compiled, self.config.torch_device())
        rows, densities = [], []
        t_all = time.perf_counter()
        for start, ids in self.bar(self.ppl_windows(length), f"ppl L={length}"):
            t0 = time.perf_counter()
            calls = sum(report.calls.values())
            row, top = self.window_row(forward, ids)
            ran_sites = sum(report.calls.values()) > calls  # False: no rewritten graph ran (eager fallback)
            density = report.layer_density("prefill") if ran_sites else {}
            densities.append(density)
            rows.append({"start": start, **row, "top": top, "seconds": time.perf_counter() - t0,
                         "ran_sites": ran_sites, "mean_density": overall({str(k): v for k, v in density.items()})})
        per_layer = mean_layer_density(densities)
        return {"ppl": perplexity(rows), "windows": rows, "layer_density": per_layer,
                "mean_density": overall(per_layer), "wall_s": time.perf_counter() - t_all,
                **self.continuation(rows, base), **first_and_steady([r["seconds"] for r in rows])}

    # -- decode steps -----------------------------------------------------------------------
    def decode_windows(self, length: int) -> list[tuple[int, torch.Tensor]]:
        """Windows of length + decode_steps tokens: the prompt, then the tokens fed as decode steps."""
        return windows(self.corpus_ids, length + self.config.decode_steps, self.config.window_count(length))

    def run_cache(self, policy: Policy | None, max_cache_len: int) -> Any:
        """A new cache of `config.cache` form for one window / sample of a policy run (None: a DynamicCache, made
        by the caller). policy: the run's policy (a SparseCache keeps what its decode methods read)."""
        if cache_form(self.config.cache)[0] == "dynamic":
            return None
        if policy is None:
            raise ValueError(f"a {self.config.cache!r} cache needs the policy the model is compiled with")
        return build_cache(self.config.cache, self.model.config, max_cache_len, policy)

    def decode_window(self, model: Any, ids: torch.Tensor, length: int, after_step: Callable[[], None] | None = None,
                      cache: Any = None) -> dict[str, Any]:
        """One window's teacher-forced decode (`decode_scores`) on `cache` (None: a DynamicCache)."""
        t0 = time.perf_counter()
        nll, top = decode_scores(model, self.model.config, ids.to(self.config.torch_device()), length, after_step,
                                 cache)
        return {**nll_summary(nll), "top": top.tolist(), "seconds": time.perf_counter() - t0}

    def baseline_decode(self, length: int) -> dict[str, Any]:
        """The eager model's decode steps after each prompt of `length` (cached per window)."""
        rows = []
        for start, ids in self.bar(self.decode_windows(length), f"decode {BASELINE} L={length}"):
            key = self.cache_key("decode_window", ids, prompt=length)
            row = self.cache.get(key)
            if row is None:
                row = self.decode_window(self.model, ids, length)
                self.cache.put(key, row)
            rows.append({"start": start, **row})
        return {"ppl": perplexity(rows), "windows": rows}

    def policy_decode(self, compiled: Any, report: Report, length: int, base: list[dict[str, Any]],
                      policy: Policy | None = None) -> dict[str, Any]:
        """Decode steps through `compiled` (compiled with `policy`), each window on a new `config.cache`: top-1
        agreement with eager, continuation PPL, decode density."""
        rows, densities = [], []
        t_all = time.perf_counter()
        for start, ids in self.bar(self.decode_windows(length), f"decode L={length}"):
            cache = self.run_cache(policy, ids.numel())  # the prompt and the steps fed (ids[:-1]), + 1
            rows.append({"start": start, **self.decode_window(
                compiled, ids, length, lambda: densities.append(report.layer_density("decode")), cache)})
        same = sum(a == b for r, ref in zip(rows, base, strict=True) for a, b in zip(r["top"], ref["top"],
                                                                                    strict=True))
        per_layer = mean_layer_density([d for d in densities if d])
        return {"ppl": perplexity(rows), "agreement": same / sum(len(r["top"]) for r in rows), "windows": rows,
                "layer_density": per_layer, "mean_density": overall(per_layer),
                "wall_s": time.perf_counter() - t_all}

    # -- needle in a haystack ---------------------------------------------------------------
    def answer(self, model: Any, sample: niah.NeedleSample, after_prefill: Callable[[], None] | None = None,
               cache: Any = None) -> dict[str, Any]:
        """The greedy answer to one sample on `cache` (None: a DynamicCache) and its score."""
        device = self.config.torch_device()
        ids = torch.tensor(sample.input_ids, dtype=torch.long, device=device)
        eos = niah.eos_token_ids(self.tokenizer, self.model.config)
        synchronize(device)
        t0 = time.perf_counter()
        new = niah.greedy_generate(model, self.model.config, ids, self.config.niah_max_new_tokens, eos, after_prefill,
                                   cache)
        synchronize(device)
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        return {"length": sample.length, "depth": sample.depth, "index": sample.index, "key": sample.key,
                "value": sample.value, "answer": text, "score": niah.score(text, sample.value),
                "seconds": time.perf_counter() - t0}

    def baseline_niah(self) -> dict[str, Any]:
        rows = []
        for sample in self.bar(self.samples, f"niah {BASELINE}"):
            key = self.cache_key("niah", sample.input_ids, max_new_tokens=self.config.niah_max_new_tokens,
                                 value=sample.value)
            row = self.cache.get(key)
            if row is None:
                row = self.answer(self.model, sample)
                self.cache.put(key, row)
            rows.append(row)
        return summarize_niah(rows)

    def policy_niah(self, compiled: Any, report: Report, baseline: dict[str, Any] | None = None,
                    policy: Policy | None = None) -> dict[str, Any]:
        """The NIAH grid through `compiled` (compiled with `policy`), each sample on a new `config.cache`; with the
        eager `baseline`, the samples it lost and gained."""
        rows, prefill, decode = [], [], []
        t_all = time.perf_counter()
        for sample in self.bar(self.samples, "niah"):
            cache = self.run_cache(policy, sample.length + self.config.niah_max_new_tokens)
            row = self.answer(compiled, sample, lambda: prefill.append(report.layer_density("prefill")), cache)
            decode.append(report.layer_density("decode"))
            rows.append(row)
        result = summarize_niah(rows)
        per_layer = mean_layer_density(prefill)
        result.update({"layer_density": per_layer, "mean_density": overall(per_layer),
                       "decode_layer_density": mean_layer_density([d for d in decode if d]),
                       "wall_s": time.perf_counter() - t_all})
        result["decode_mean_density"] = overall(result["decode_layer_density"])
        if baseline is not None:
            result["vs_eager"] = compare_niah(baseline["samples"], rows)
        return result

    # -- one policy -------------------------------------------------------------------------
    def run_policy(self, run: PolicyRun, baseline: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = {"label": run.label, "base": run.base, "policy": run.policy.to_dict(),
                                  "warning": run.policy.warning, "fingerprint": run.policy.fingerprint(),
                                  "sweep": {p: v for p, v in run.assignments}, "compile": {},
                                  "cache": cache_record(self.config.cache)}
        t0 = time.perf_counter()
        wanted = {"ppl": any(self.wants(t) for t in WINDOW_TASKS), "decode": self.wants("decode")}
        decode = partial(self.policy_decode, policy=run.policy)
        for task, measure in (("ppl", self.policy_ppl), ("decode", decode)):
            if not wanted[task]:
                continue
            report = Report()
            compiled = compile_with_policy(self.model, run.policy, report, self.config.inner)
            result[task] = {}
            for length in self.config.lengths:
                ref = baseline[task][str(length)]
                row = measure(compiled, report, length, ref["windows"])
                row["dppl"] = row["ppl"] - ref["ppl"]
                row["dppl_pct"] = 100.0 * (row["ppl"] - ref["ppl"]) / ref["ppl"]
                if "last_ppl" in row:
                    row["last_dppl_pct"] = 100.0 * (row["last_ppl"] - ref["last_ppl"]) / ref["last_ppl"]
                result[task][str(length)] = row
            result["compile"][task] = site_summary(report)
        if "niah" in self.config.tasks:
            report = Report()
            compiled = compile_with_policy(self.model, run.policy, report, self.config.inner)
            result["niah"] = self.policy_niah(compiled, report, baseline["niah"], run.policy)
            result["compile"]["niah"] = site_summary(report)
        result["two_stage"] = any(info["two_stage_sites"] for info in result["compile"].values())
        torch._dynamo.reset()
        result["wall_s"] = time.perf_counter() - t0
        return result


def site_summary(report: Report) -> dict[str, Any]:
    """How many attention sites were rewritten / left alone, how many of them select in two stages over a
    SparseCache's buffers (the node takes its page summaries), and the report's table."""
    return {"sites": len(report.sites), "rejected": len(report.rejected),
            "two_stage_sites": sum(bool(s.cache_buffers) for s in report.sites), "report": str(report)}


def summarize_niah(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean score per (length, depth) cell, per length, and overall; hits per cell ([found, samples]);
    first-call and steady-state seconds per length (the first sample of a length compiles)."""
    grid: dict[str, dict[str, float]] = {}
    hits: dict[str, dict[str, list[int]]] = {}
    timing: dict[str, dict[str, float | None]] = {}
    for length in sorted({r["length"] for r in rows}):
        cells, counts = {}, {}
        for depth in sorted({r["depth"] for r in rows if r["length"] == length}):
            scores = [r["score"] for r in rows if r["length"] == length and r["depth"] == depth]
            cells[f"{depth:g}"] = sum(scores) / len(scores)
            counts[f"{depth:g}"] = [sum(1 for x in scores if x >= 1.0), len(scores)]
        grid[str(length)], hits[str(length)] = cells, counts
        timing[str(length)] = first_and_steady([r["seconds"] for r in rows if r["length"] == length])
    by_length = {L: sum(c.values()) / len(c) for L, c in grid.items()}
    return {"samples": rows, "grid": grid, "hits": hits, "by_length": by_length, "timing": timing,
            "score": sum(r["score"] for r in rows) / len(rows) if rows else None}


def sample_id(row: dict[str, Any]) -> tuple[int, float, int]:
    return row["length"], row["depth"], row["index"]


def compare_niah(eager: list[dict[str, Any]], policy: list[dict[str, Any]]) -> dict[str, Any]:
    """Sample-by-sample comparison with the eager model: `lost` (eager found the needle, the policy did
    not) and `gained` (the reverse), each a list of {length, depth, index, value, answer, eager_answer}.
    A sparse policy should lose none."""
    by_id = {sample_id(r): r for r in eager}
    lost, gained = [], []
    for row in policy:
        ref = by_id.get(sample_id(row))
        if ref is None or ref["score"] == row["score"]:
            continue
        entry = {"length": row["length"], "depth": row["depth"], "index": row["index"], "value": row["value"],
                 "answer": row["answer"], "eager_answer": ref["answer"]}
        (lost if ref["score"] > row["score"] else gained).append(entry)
    return {"compared": sum(sample_id(r) in by_id for r in policy), "lost": lost, "gained": gained}


def unmeasured_phases(run: PolicyRun, tasks: tuple[str, ...]) -> list[str]:
    """Lines naming the methods of `run`'s policy that no task measures: a method acts in the phases its
    Method declares, and ppl/continuation run prefill only (decode needs `decode` or `niah`)."""
    measured = {"prefill"} | ({"decode"} if {"decode", "niah"} & set(tasks) else set())
    lines = []
    for phase in ("prefill", "decode"):
        policy = run.policy.phase(phase)
        for method in {policy.method, *(o.method for o in policy.overrides)} - {"dense"}:
            if phase not in measured and phase in METHODS[method].phases:
                lines.append(f"{run.label}: {method} acts in {phase}, which --tasks {','.join(tasks)} does not "
                             "run (add decode or niah)")
    return lines


def prepare(config: EvalConfig, model: Any = None, tokenizer: Any = None) -> tuple[Evaluator, list[PolicyRun]]:
    """Everything that can fail on bad input, before any model run: policies and sweeps, the model,
    the corpus (long enough for every window) and the NIAH samples. Raises PolicyError, ValueError,
    CorpusError or ModelLoadError with a message naming what is wrong."""
    runs = expand_policies(list(config.policies), list(config.sweeps))
    corpus = load_corpus(config.corpus)
    if model is None or tokenizer is None:
        model, tokenizer = load_model(config.model, config.torch_dtype())
    model.to(device=config.torch_device(), dtype=config.torch_dtype()).eval()
    ids = tokenize(tokenizer, corpus.text)
    ev = Evaluator(config, model, tokenizer, ids, model_fingerprint(model), ResultCache(config.cache_dir), corpus)
    for length in config.lengths if any(t in config.tasks for t in WINDOW_TASKS) else ():
        ev.ppl_windows(length)
    for length in config.lengths if "decode" in config.tasks else ():
        ev.decode_windows(length)
    if "niah" in config.tasks:
        ev.samples = niah.make_grid(tokenizer, ids, config.needle_lengths(), config.niah_depths,
                                    config.niah_samples, config.seed)
    return ev, runs


def quiet_status(config: EvalConfig, line: str) -> None:
    """With progress bars off (--no-progress), one line on stderr per finished baseline and policy run, so a long
    evaluation still shows that it advances (and how fast)."""
    if not config.progress:
        print(f"eval: {line}", file=sys.stderr, flush=True)


def execute(ev: Evaluator, runs: list[PolicyRun], argv: list[str] | None = None) -> dict[str, Any]:
    """The eager baseline (cached), then every policy run; returns the results dict."""
    config = ev.config
    env = environment(argv, config.torch_device(), config.torch_dtype())
    meta = {"env": env, "config": {**asdict(config), "sweeps": [asdict(s) for s in config.sweeps]},
            "model": {**describe_model(config.model, ev.model), "fingerprint": ev.fingerprint[:16]},
            "corpus": {**ev.corpus.describe(), "tokens": int(ev.corpus_ids.numel())}}
    baseline: dict[str, Any] = {"label": BASELINE, "cache": cache_record(BASELINE_CACHE)}
    t0 = time.perf_counter()
    if any(t in config.tasks for t in WINDOW_TASKS):
        baseline["ppl"] = {str(length): ev.baseline_ppl(length) for length in config.lengths}
        for row in baseline["ppl"].values():
            row.update(first_and_steady([w["seconds"] for w in row["windows"]]))
    if "niah" in config.tasks:
        baseline["niah"] = ev.baseline_niah()
    if "decode" in config.tasks:
        baseline["decode"] = {str(length): ev.baseline_decode(length) for length in config.lengths}
    baseline["wall_s"] = time.perf_counter() - t0
    quiet_status(config, f"{BASELINE}: {baseline['wall_s']:.1f} s")
    results = []
    for i, run in enumerate(tqdm(runs, desc="policies", disable=not config.progress)):
        results.append(ev.run_policy(run, baseline))
        quiet_status(config, f"policy {i + 1}/{len(runs)} {results[-1]['label']}: {results[-1]['wall_s']:.1f} s")
    for result in results:
        result["budget"] = budget_check(result, meta["config"])
    meta["notes"] = [line for run in runs for line in unmeasured_phases(run, config.tasks)]
    return {"meta": meta, "baseline": baseline, "runs": results}


def run_eval(
    config: EvalConfig, model: Any = None, tokenizer: Any = None, argv: list[str] | None = None
) -> dict[str, Any]:
    """Evaluate `config.policies` (swept by `config.sweeps`) against the eager baseline.

    model/tokenizer: pass them to skip loading `config.model`. Returns the results dict that
    `write_outputs` renders (JSON-serialisable). Deterministic: same config, same numbers.
    """
    ev, runs = prepare(config, model, tokenizer)
    return execute(ev, runs, argv)
