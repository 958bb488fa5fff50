"""Where a decode step of `generate` spends its time under the sparse backend (CUDA, mode="reduce-overhead").

For each `POLICY@CACHE` (cache forms as `bench --what generate --cache`): compile, warm up, time generate(1) and
generate(1 + N) (the decode step = their difference / N), then profile both once with torch.profiler and print,
per kernel name, the GPU time and launches per decode step (profile of 1 + N minus profile of 1, over N), and the
host-side launch calls per step (cudaGraphLaunch: CUDA-graph replays; cudaLaunchKernel / cuLaunchKernel(Ex):
kernels launched outside any graph). Run with TORCH_LOGS=perf_hints,recompiles to see skipped CUDA graphs.

    TORCH_LOGS=perf_hints,recompiles python scripts/profile_generate_step.py --prompt 131072 --layers 4 --ops \
        --runs dense@static,fasa@sparse32-pages --out results/x.txt
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import sparse_compile
from sparse_compile.benchmarks.model import build_model, compiled_forward, make_cache, timed_generate
from sparse_compile.benchmarks.timing import environment

HOST_LAUNCHES = ("cudaGraphLaunch", "cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")


def kernel_table(prof: profile) -> tuple[dict[str, list[float]], dict[str, int]]:
    """({kernel name: [count, device us]}, {host launch call: count}) of a profile."""
    kernels: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    host: dict[str, int] = defaultdict(int)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            row = kernels[event.name[:90]]
            row[0] += 1
            row[1] += event.time_range.elapsed_us()
        elif event.name in HOST_LAUNCHES:
            host[event.name] += 1
    return kernels, host


def op_table(prof: profile) -> dict[tuple[str, str], list[float]]:
    """{(op name, input shapes): [count, self device us]} of a profile recorded with record_shapes."""
    table: dict[tuple[str, str], list[float]] = {}
    for avg in prof.key_averages(group_by_input_shape=True):
        table[(avg.key, str(avg.input_shapes)[:80])] = [avg.count, avg.self_device_time_total]
    return table


def profile_ops(run: str, model, ids: torch.Tensor, new_tokens: int, log) -> None:
    """The decode step's ops without CUDA graphs (backend="sparse", no reduce-overhead), per (op, input shapes):
    self GPU time and calls per step, so each kernel of the captured step can be traced to the op that launches
    it (inside a CUDA graph replay the profiler sees kernels but no ops)."""
    policy, _, cache_kind = run.partition("@")
    cache = make_cache(cache_kind or "static", model, ids.shape[1] + new_tokens + 1, policy)
    timed_generate(model, ids[:, :16], cache, 2)
    forward = model.forward
    model.forward = compiled_forward(f"sparse:{policy}", forward, sparse_compile.Report())
    try:
        timed_generate(model, ids, cache, 1 + new_tokens)
        tables = []
        for n in (1, 1 + new_tokens):
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
                timed_generate(model, ids, cache, n)
            tables.append(op_table(prof))
        first, whole = tables
        rows = []
        for key, (count, us) in whole.items():
            c0, u0 = first.get(key, (0, 0.0))
            if count - c0 > 0:
                rows.append(((us - u0) / new_tokens, (count - c0) / new_tokens, key))
        rows.sort(reverse=True)
        log(f"\n## {run} without CUDA graphs: ops by self GPU time per decode step")
        log("| us/step | calls/step | op | input shapes |")
        log("|---|---|---|---|")
        for us, count, (name, shapes) in rows[:60]:
            log(f"| {us:.1f} | {count:.1f} | `{name}` | `{shapes}` |")
    finally:
        model.forward = forward
        torch._dynamo.reset()


def profile_run(run: str, model, ids: torch.Tensor, new_tokens: int, reps: int, log) -> None:
    policy, _, cache_kind = run.partition("@")
    cache = make_cache(cache_kind or "static", model, ids.shape[1] + new_tokens + 1, policy)
    timed_generate(model, ids[:, :16], cache, 2)
    report = sparse_compile.Report()
    forward = model.forward
    model.forward = compiled_forward(f"sparse_ro:{policy}", forward, report)
    try:
        for _ in range(2):
            timed_generate(model, ids, cache, 1 + new_tokens)
        first = statistics.median(timed_generate(model, ids, cache, 1)[0] for _ in range(reps))
        whole = statistics.median(timed_generate(model, ids, cache, 1 + new_tokens)[0] for _ in range(reps))
        step_ms = 1e3 * (whole - first) / new_tokens
        tables = []
        for n in (1, 1 + new_tokens):
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                timed_generate(model, ids, cache, n)
            tables.append(kernel_table(prof))
        (k1, h1), (kn, hn) = tables
        log(f"\n## {run}: decode step {step_ms:.3f} ms ({1e3 / step_ms:.1f} tok/s), TTFT {1e3 * first:.1f} ms")
        log("host launch calls per decode step: " + ", ".join(
            f"{name} {(hn.get(name, 0) - h1.get(name, 0)) / new_tokens:.1f}" for name in HOST_LAUNCHES))
        rows = []
        for name, (count, us) in kn.items():
            c0, u0 = k1.get(name, (0, 0.0))
            rows.append(((us - u0) / new_tokens, (count - c0) / new_tokens, name))
        rows.sort(reverse=True)
        total = sum(r[0] for r in rows)
        log(f"GPU kernel time per decode step {total / 1e3:.3f} ms in {sum(r[1] for r in rows):.0f} kernels")
        log("| us/step | launches/step | kernel |")
        log("|---|---|---|")
        for us, count, name in rows[:45]:
            if count > 0 or us > 0.5:
                log(f"| {us:.1f} | {count:.1f} | `{name}` |")
        log("report:\n" + "\n".join(str(report).splitlines()[:40]))
    finally:
        model.forward = forward
        torch._dynamo.reset()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=131072)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--runs", default="dense@static,fasa@sparse32-pages")
    parser.add_argument("--ops", action="store_true", help="also profile each run without CUDA graphs, per op and "
                        "input shapes (which op launches which kernel)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    lines: list[str] = []

    def log(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    log(f"{environment('cuda')}\nprompt {args.prompt}, {args.layers} layers, {args.new_tokens} new tokens")
    model = build_model(args.layers, args.prompt + args.new_tokens + 1, lm_head=True)
    ids = torch.randint(0, model.config.vocab_size, (1, args.prompt), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(0))
    for run in args.runs.split(","):
        profile_run(run, model, ids, args.new_tokens, args.reps, log)
        if args.ops:
            profile_ops(run, model, ids, args.new_tokens, log)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
