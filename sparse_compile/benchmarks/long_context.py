"""Long-context prefill of a transformers model: eager vs plain torch.compile vs backend="sparse".

The model is a random-weight Llama-3-8B-shaped `LlamaModel` (hidden 4096, 32/8 heads, MLP 14336,
bf16; 2 layers by default; no LM head, so the numbers are about attention + MLP). Each variant is
compiled with `dynamic=False` (one graph per length, as a fixed-length server would), timed with
CUDA events (median of `--reps` after `--warmup` calls) and its peak memory is read from
`torch.cuda.max_memory_allocated` over one call.

    python -m sparse_compile.benchmarks.long_context --lengths 8192 32768 131072
    python -m sparse_compile.benchmarks.long_context --lengths 8192 32768 --batch 4 --left-pad 0.2
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch


def build_model(layers: int, max_len: int, lm_head: bool = False) -> torch.nn.Module:
    """Random-weight Llama-3-8B-shaped model on CUDA, bf16: `LlamaModel`, or `LlamaForCausalLM` with lm_head."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

    cfg = LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=max_len, rope_theta=500000.0,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = (LlamaForCausalLM if lm_head else LlamaModel)(cfg).to(torch.bfloat16).eval()
    return model


def time_call(fn, warmup: int, reps: int) -> tuple[float, float]:
    """(median ms, peak GiB) of fn()."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    return statistics.median(times), peak


def run(lengths: list[int], batch: int, left_pad: float, layers: int, variants: list[str], warmup: int,
        reps: int) -> list[dict[str, Any]]:
    import sparse_compile

    model = build_model(layers, max(lengths) + 16)
    results = []
    for L in lengths:
        ids = torch.randint(0, 32000, (batch, L), device="cuda")
        mask = None
        if left_pad > 0:
            mask = torch.ones(batch, L, dtype=torch.long, device="cuda")
            for b in range(1, batch):  # row 0 unpadded, the others padded on the left
                mask[b, : int(L * left_pad)] = 0
        kwargs = {"attention_mask": mask} if mask is not None else {}
        for variant in variants:
            torch._dynamo.reset()
            gc.collect()
            torch.cuda.empty_cache()
            report = sparse_compile.Report()
            if variant == "eager":
                fn = model
            elif variant == "compile":
                fn = torch.compile(model, dynamic=False)
            elif variant == "sparse-dense":
                fn = torch.compile(model, backend="sparse", dynamic=False,
                                   options={"policy": "dense", "report": report})
            else:
                raise ValueError(f"unknown variant {variant!r}")
            t0 = time.perf_counter()
            try:
                with torch.no_grad():
                    fn(ids, **kwargs)  # compile
                    torch.cuda.synchronize()
                    compile_s = time.perf_counter() - t0
                    ms, peak = time_call(lambda fn=fn, ids=ids, kw=kwargs: fn(ids, **kw), warmup, reps)
                row = {"L": L, "batch": batch, "left_pad": left_pad, "variant": variant, "ms": round(ms, 3),
                       "peak_gib": round(peak, 2), "first_call_s": round(compile_s, 1)}
                if variant == "sparse-dense":
                    row["sites"] = len(report.sites)
                    row["masks"] = sorted({s.mask for s in report.sites})
            except torch.OutOfMemoryError as err:
                row = {"L": L, "batch": batch, "left_pad": left_pad, "variant": variant, "error": f"OOM: {err}"[:200]}
            print(json.dumps(row), flush=True)
            results.append(row)
            del fn
    return results


def environment() -> dict[str, str]:
    import transformers
    import triton

    return {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
    }


def markdown(results: list[dict[str, Any]]) -> str:
    lines = ["| L | B | left pad | variant | ms | peak GiB | vs eager | vs plain compile |",
             "|---|---|---|---|---|---|---|---|"]
    by = {(r["L"], r["batch"], r["left_pad"], r["variant"]): r for r in results}
    for r in results:
        if "error" in r:
            lines.append(f"| {r['L']} | {r['batch']} | {r['left_pad']} | {r['variant']} | {r['error'][:40]} | | | |")
            continue
        key = (r["L"], r["batch"], r["left_pad"])
        eager, comp = by.get(key + ("eager",)), by.get(key + ("compile",))
        ve = f"{r['ms'] / eager['ms']:.2f}x" if eager and "ms" in eager else ""
        vc = f"{r['ms'] / comp['ms']:.2f}x" if comp and "ms" in comp else ""
        lines.append(f"| {r['L']} | {r['batch']} | {r['left_pad']} | {r['variant']} | {r['ms']} | {r['peak_gib']} | "
                     f"{ve} | {vc} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072], help="prompt lengths")
    parser.add_argument("--batch", type=int, default=1, help="batch size")
    parser.add_argument("--left-pad", type=float, default=0.0,
                        help="fraction of each row but the first that is left padding (0: no attention_mask)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the model")
    parser.add_argument("--variants", nargs="+", default=["eager", "compile", "sparse-dense"],
                        choices=["eager", "compile", "sparse-dense"], help="what to time")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls after compilation")
    parser.add_argument("--reps", type=int, default=5, help="timed calls (median reported)")
    parser.add_argument("--out", type=Path, default=Path("results"), help="folder for the JSON result")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("long_context benchmark needs a CUDA GPU")
    env = environment()
    results = run(args.lengths, args.batch, args.left_pad, args.layers, args.variants, args.warmup, args.reps)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d_%H%M", time.gmtime())
    path = args.out / f"long_context_b{args.batch}_{stamp}.json"
    path.write_text(json.dumps({"environment": env, "results": results}, indent=1))
    print(json.dumps(env))
    print(markdown(results))


if __name__ == "__main__":
    main()
