"""`python -m sparse_compile bench`: one harness over every benchmark part, one JSON + markdown per part.

    run_benchmarks(out_dir, what=("engine", "methods"), settings=BenchSettings(...))

Parts (`--what`, comma-separated):
  engine              block-sparse engine vs FlexAttention vs SDPA flash/cuDNN on random causal block masks
                      (`engine.run_engine_benchmark`; `--config` / `--alt-config` time other launch configs)
  engine-tiles        the engine under several tile configs at 32K (`engine.sweep_configs`)
  engine-dense-tiles  the dense causal engine's tile configs beside SDPA, at each prefill length
  engine-padding      a left-padded B=4 batch against the unpadded one, at each prefill length
  engine-gqa          per-head vs per-KV-head lists (with and without GQA_PACK), at each prefill length
                      and `--gqa-q-lens` (chunked prefill)
  methods             every registered method's declared bench cases (`Method.bench_cases`), both phases,
                      against SDPA and Flex on the same selection (`methods.run_methods_benchmark`)
  prefill, decode     the same, one phase only
  model-prefill       long-context prefill of a Llama-3-8B-shaped model: eager / compile / sparse
  generate            TTFT and decode tokens/s of that model's generate() per variant
  check               GPU correctness of the kernels and methods (`check.py`); a failing row: exit 1
Writes bench_<part>.json and .md under out_dir, bench.md with every part, and with md_file the
"bench <parts>" section of that file. CUDA only, except methods/prefill/decode with device="cpu" (tests).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from sparse_compile.benchmarks import check, engine, model
from sparse_compile.benchmarks.methods import DECODE_LENGTHS, PREFILL_LENGTHS, markdown_table, run_methods_benchmark
from sparse_compile.benchmarks.timing import BenchmarkUnavailable, check_cuda, environment
from sparse_compile.evaluation.output import update_markdown_section

PARTS = ("engine", "engine-tiles", "engine-dense-tiles", "engine-padding", "engine-gqa", "methods", "prefill",
         "decode", "model-prefill", "generate", "check")
CPU_PARTS = ("methods", "prefill", "decode")


@dataclass(frozen=True)
class BenchSettings:
    """Every setting of a bench run (recorded in each part's JSON); defaults are the CLI's."""

    prefill_lengths: tuple[int, ...] = PREFILL_LENGTHS
    decode_lengths: tuple[int, ...] = DECODE_LENGTHS
    densities: tuple[float, ...] = (1.0, 0.3, 0.1, 0.05)
    methods: tuple[str, ...] | None = None  # None: every registered method
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    rep_ms: float = 100.0
    with_flex: bool = True
    with_sdpa: bool = True
    config: dict | None = None  # engine launch config override
    alt_config: dict | None = None  # a second engine launch config timed beside it
    gqa_q_lens: tuple[int, ...] | None = None
    layers: int | None = None  # model parts: decoder layers (default 2 for model-prefill, 4 for generate)
    variants: tuple[str, ...] | None = None  # model parts: what to time (default: every variant)
    batch: int = 1
    left_pad: float = 0.0
    warmup: int = 2
    reps: int | None = None  # model parts: timed calls (default 5 for model-prefill, 3 for generate)
    prompt: int = 32768
    new_tokens: int = 128
    caches: tuple[str, ...] = ("static",)  # generate: static, dynamic, sparse (SparseCache)
    device: str = "cuda"


def rows_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of flat rows (the union of their keys as columns, floats to 4 significant digits)."""
    if not rows:
        return "(no rows)\n"
    cols = list(dict.fromkeys(k for r in rows for k in r if not isinstance(r[k], (list, dict))))

    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else ("–" if value is None else str(value))

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def engine_plot_rows(result: dict[str, Any]) -> list[dict]:
    """The engine benchmark's rows in `plot_bench`'s form (impl per density, SDPA once per length)."""
    rows: list[dict] = []
    for r in result.get("rows", []):
        pct = f"{100 * r['density_target']:.0f}%"
        rows.append({"phase": "prefill", "length": r["L"], "impl": f"engine {pct}", "ms": r.get("ours")})
        if r.get("flex") is not None:
            rows.append({"phase": "prefill", "length": r["L"], "impl": f"flex {pct}", "ms": r["flex"]})
    seen = set()
    for r in result.get("rows", []):
        for impl in ("sdpa_flash", "sdpa_cudnn"):
            if r.get(impl) is not None and (r["L"], impl) not in seen:
                seen.add((r["L"], impl))
                rows.append({"phase": "prefill", "length": r["L"], "impl": impl, "ms": r[impl]})
    return [r for r in rows if r["ms"] is not None and not math.isnan(r["ms"])]


def plot_if_possible(result: dict[str, Any], path: Path, log: Callable[[str], None]) -> list[Path]:
    """[path] after drawing `plot_bench`, or [] when matplotlib is missing (GPU images may lack it)."""
    try:
        from sparse_compile.evaluation.plots import plot_bench  # matplotlib: the eval extra
    except ImportError as err:
        log(f"no plot {path.name}: {err} (pip install matplotlib)")
        return []
    png = plot_bench(result, path)
    return [png] if png else []


def run_part(part: str, s: BenchSettings, log: Callable[[str], None]) -> tuple[dict[str, Any], str]:
    """(result, markdown) of one part."""
    if part == "engine":
        result = engine.run_engine_benchmark(lengths=s.prefill_lengths, densities=s.densities, heads=s.heads,
                                             kv_heads=s.kv_heads, head_dim=s.head_dim, rep_ms=s.rep_ms,
                                             with_flex=s.with_flex, with_sdpa=s.with_sdpa, config=s.config,
                                             alt_config=s.alt_config)
        return result, engine.markdown_table(result)
    if part in ("methods", "prefill", "decode"):
        result = run_methods_benchmark(
            s.prefill_lengths if part != "decode" else (), s.decode_lengths if part != "prefill" else (),
            s.methods, s.heads, s.kv_heads, s.head_dim, rep_ms=s.rep_ms, with_flex=s.with_flex, device=s.device,
            log=log, batch=s.batch)
        return result, markdown_table(result)
    if part == "check":
        results = check.run_checks(log)
        bad = check.failures(results)
        return {"checks": results, "failures": bad}, "".join(f"{name}:\n\n{rows_table(rows)}\n"
                                                            for name, rows in results.items())
    rows: list[dict[str, Any]]
    if part == "engine-tiles":
        rows = engine.sweep_configs(rep_ms=s.rep_ms)
    elif part == "engine-dense-tiles":
        rows = [r for L in s.prefill_lengths for r in engine.dense_sweep(L, s.rep_ms, s.head_dim)]
    elif part == "engine-padding":
        rows = [r for L in s.prefill_lengths for r in engine.padding_benchmark(L, rep_ms=s.rep_ms)]
    elif part == "engine-gqa":
        rows = [r for L in s.prefill_lengths for ql in (s.gqa_q_lens or (None,))
                for r in engine.gqa_benchmark(L, s.densities, rep_ms=s.rep_ms, q_len=ql)]
    elif part == "model-prefill":
        rows = model.run_prefill(s.prefill_lengths, s.batch, s.left_pad, s.layers or 2,
                                 s.variants or model.PREFILL_VARIANTS, s.warmup, s.reps or 5, log)
        return {"rows": rows}, model.prefill_markdown(rows)
    elif part == "generate":
        rows = model.run_generate(s.prompt, s.new_tokens, s.layers or 4, s.reps or 3,
                                  s.variants or model.GENERATE_VARIANTS, log, s.caches)
        return {"rows": rows}, model.generate_markdown(rows, s.prompt, s.new_tokens)
    else:
        raise ValueError(f"unknown bench part {part!r}: choose from {', '.join(PARTS)}")
    return {"rows": rows}, rows_table(rows)


def machine(device: str) -> dict[str, Any]:
    """What a benchmark number needs beside it: `timing.environment` (torch, date, GPU, triton, CUDA, cuDNN) plus
    the transformers and sparse_compile versions."""
    import transformers

    from sparse_compile.evaluation.runner import source_revision

    return {**environment(device), "transformers": transformers.__version__, "sparse_compile": source_revision()}


def run_benchmarks(out_dir: Path, *, what: tuple[str, ...] = ("engine", "methods"),
                   settings: BenchSettings | None = None, md_file: Path | None = None, command: str = "",
                   log: Callable[[str], None] = print) -> tuple[list[Path], int]:
    """Run the parts in `what` and write their JSON, markdown and PNG under out_dir; returns (paths written,
    number of failed check rows). BenchmarkUnavailable before any work when CUDA is missing (or a part
    other than methods/prefill/decode is asked for on the CPU); ValueError for an unknown part."""
    s = settings or BenchSettings()
    unknown = [p for p in what if p not in PARTS]
    if unknown or not what:
        raise ValueError(f"--what {','.join(what)!r}: choose from {', '.join(PARTS)}")
    if s.device == "cuda":
        check_cuda()
    elif any(p not in CPU_PARTS for p in what):
        raise BenchmarkUnavailable(f"on device {s.device!r} bench runs {', '.join(CPU_PARTS)} only (CPU references)")
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    failed = 0
    env = machine(s.device)
    sections = [f"Command: `{command}`", "", "Machine: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    for part in what:
        t0 = time.perf_counter()
        result, table = run_part(part, s, log)
        result.setdefault("env", env)
        result.update(wall_s=time.perf_counter() - t0, settings=asdict(s), command=command)
        failed += len(result.get("failures", ()))
        stem = out_dir / f"bench_{part}"
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str) + "\n")
        stem.with_suffix(".md").write_text(table)
        written += [stem.with_suffix(".json"), stem.with_suffix(".md")]
        if part == "engine":
            written += plot_if_possible({"rows": engine_plot_rows(result)}, stem.with_suffix(".png"), log)
        elif part in CPU_PARTS:
            written += plot_if_possible(result, stem.with_suffix(".png"), log)
        sections += [f"#### {part}", "", table, ""]
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    (out_dir / "bench.md").write_text("\n".join(sections))
    written.append(out_dir / "bench.md")
    if md_file is not None:
        update_markdown_section(md_file, f"bench {','.join(what)}", "\n".join(sections))
        written.append(md_file)
    return written, failed
