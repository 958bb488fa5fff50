"""End-to-end generation: time to first token and decode tokens/s with a StaticCache.

The model is a random-weight Llama-3-8B-shaped `LlamaForCausalLM` (hidden 4096, 32/8 heads, MLP
14336, vocab 32000, bf16; 4 layers by default). Each variant replaces `model.forward` and runs
`model.generate(..., cache_implementation="static")`-style greedy decoding on one StaticCache of
prompt + new tokens (reset between runs, so every run sees the same shapes and addresses):

  eager            the model as it is
  compile_ro       torch.compile(forward, mode="reduce-overhead")           (Inductor + CUDA graphs)
  sparse_ro        torch.compile(forward, backend="sparse", mode="reduce-overhead")   (dense policy)
  compile, sparse  the same without CUDA graphs (mode="default")
  sparse_ro:P, sparse:P   the sparse variants with policy P (a shipped name or a TOML file), e.g.
                   sparse_ro:lessismore, sparse_ro:fasa (decode methods: their selection runs in the graph)

TTFT = median time of generate(max_new_tokens=1) (prefill + one token); decode tokens/s =
new_tokens / (median time of generate(max_new_tokens=1 + new_tokens) - TTFT). Warm-up runs
(compilation, CUDA-graph recording) are not timed. transformers' own auto-compile is disabled.

    python -m sparse_compile.benchmarks.generate --prompt 32768 --new-tokens 128
    python -m sparse_compile.benchmarks.generate --variants compile_ro,sparse_ro,sparse_ro:lessismore,sparse_ro:fasa
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import sparse_compile
from sparse_compile.benchmarks.long_context import build_model

VARIANTS = ("eager", "compile_ro", "sparse_ro", "compile", "sparse")


def compiled_forward(variant: str, forward: Callable, report: Any) -> Callable:
    """The variant's forward; CUDA-graph variants mark a new step per call (generate reads each call's
    logits before the next one, as torch.compiler.cudagraph_mark_step_begin requires)."""
    variant, _, policy = variant.partition(":")
    if policy and variant not in ("sparse", "sparse_ro"):
        raise ValueError(f"variant {variant!r} takes no policy (only sparse and sparse_ro do)")
    policy = policy or None
    if variant == "eager":
        return forward
    if variant == "compile_ro":
        compiled = torch.compile(forward, mode="reduce-overhead")
    elif variant == "sparse_ro":
        compiled = torch.compile(forward, backend=sparse_compile.backend(policy, report=report),
                                 mode="reduce-overhead")
    elif variant == "compile":
        return torch.compile(forward)
    elif variant == "sparse":
        return torch.compile(forward, backend=sparse_compile.backend(policy, report=report))
    else:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS} (sparse ones may add :POLICY)")

    def step(*args: Any, **kwargs: Any) -> Any:
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args, **kwargs)

    return step


def timed_generate(model: Any, ids: torch.Tensor, cache: Any, new_tokens: int) -> tuple[float, torch.Tensor]:
    """(seconds, tokens) of one greedy generate() on `cache` (reset first)."""
    cache.reset()
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, past_key_values=cache, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, disable_compile=True, attention_mask=torch.ones_like(ids))
    torch.cuda.synchronize()
    return time.perf_counter() - start, out


def run_variant(model: Any, variant: str, ids: torch.Tensor, new_tokens: int, reps: int) -> dict[str, Any]:
    from transformers import StaticCache

    forward = model.forward
    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + new_tokens + 1)
    timed_generate(model, ids[:, :16], cache, 2)  # eager: the cache allocates its tensors outside any graph
    report = sparse_compile.Report()
    model.forward = compiled_forward(variant, forward, report)
    try:
        t0 = time.perf_counter()
        for _ in range(2):  # compile, record CUDA graphs (prefill, decode)
            timed_generate(model, ids, cache, 1 + new_tokens)
        warm_s = time.perf_counter() - t0
        ttft = statistics.median(timed_generate(model, ids, cache, 1)[0] for _ in range(reps))
        totals, tokens = [], None
        for _ in range(reps):
            seconds, tokens = timed_generate(model, ids, cache, 1 + new_tokens)
            totals.append(seconds)
        total = statistics.median(totals)
        if report.graphs:
            print(report)
        return {"variant": variant, "ttft_ms": 1000 * ttft, "total_ms": 1000 * total,
                "decode_tok_s": new_tokens / max(total - ttft, 1e-9), "warmup_s": warm_s,
                "tokens": tokens[0, ids.shape[1]:].tolist()}
    finally:
        model.forward = forward
        torch._dynamo.reset()


def environment() -> dict[str, str]:
    import transformers
    import triton

    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def markdown(rows: list[dict[str, Any]], env: dict[str, str], command: str, prompt: int, new_tokens: int) -> str:
    base = {r["variant"]: r for r in rows}
    ref = base.get("compile_ro")
    lines = [f"`{command}`", "", ", ".join(f"{k} {v}" for k, v in env.items()), "",
             f"prompt {prompt} tokens, {new_tokens} new tokens, B=1, StaticCache", "",
             "| variant | TTFT ms | decode tok/s | decode vs compile_ro | tokens equal eager |",
             "|---|---|---|---|---|"]
    eager_tokens = base["eager"]["tokens"] if "eager" in base else None
    for r in rows:
        vs = f"{r['decode_tok_s'] / ref['decode_tok_s']:.3f}x" if ref else "-"
        same = "-" if eager_tokens is None else ("yes" if r["tokens"] == eager_tokens else "no")
        lines.append(f"| {r['variant']} | {r['ttft_ms']:.1f} | {r['decode_tok_s']:.1f} | {vs} | {same} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=int, default=32768, help="prompt tokens (default 32768)")
    parser.add_argument("--new-tokens", type=int, default=128, help="decoded tokens (default 128)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    parser.add_argument("--reps", type=int, default=3, help="timed runs per measurement (median)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--out", default="results/generate.json", help="JSON output")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: this benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    model = build_model(args.layers, args.prompt + args.new_tokens + 1, lm_head=True)
    ids = torch.randint(0, model.config.vocab_size, (1, args.prompt), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(0))
    rows = []
    for variant in args.variants.split(","):
        rows.append(run_variant(model, variant.strip(), ids, args.new_tokens, args.reps))
        r = rows[-1]
        print(f"{variant}: TTFT {r['ttft_ms']:.1f} ms, decode {r['decode_tok_s']:.1f} tok/s "
              f"(warm-up {r['warmup_s']:.1f} s)", flush=True)
    env = environment()
    command = "python -m sparse_compile.benchmarks.generate " + " ".join(argv if argv is not None else sys.argv[1:])
    print(markdown(rows, env, command, args.prompt, args.new_tokens))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"env": env, "command": command, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
