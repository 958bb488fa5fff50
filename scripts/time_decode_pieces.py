"""GPU time of each kernel of one FASA decode layer on a SparseCache (pages only, P = 32, per KV head, 3x candidates,
2048 slots), measured the way the model's profile measures it (torch.profiler kernel durations), with the L2 cache
warm (the same call repeated: what `tune_decode_launch.py` sees) and cold (a 256 MB write between calls: what a
layer sees inside a model step, after the MLP weights went through L2). The cache is shaped as `bench --what
generate` makes it (capacity = prompt + new tokens + 1), so the page top-k row has as many pages as in the model.

    python scripts/time_decode_pieces.py --prompt 131072 --out results/x.json

Prints per kernel: µs per call warm and cold, and the SM clock nvidia-smi reported around each run.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from sparse_compile.benchmarks.timing import environment
from sparse_compile.kernels.key_state import key_state_from_mask
from sparse_compile.kernels.sparse_decode import sparse_decode_attention
from sparse_compile.methods.two_stage import fasa_two_stage

CALLS = 20


def sm_clock() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.max.sm,power.draw", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError) as err:
        return f"nvidia-smi failed: {err}"


def kernel_us(fn, flush: torch.Tensor | None) -> dict[str, float]:
    """{kernel name: µs per call} over CALLS calls of fn (each after a write of `flush` when given)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(CALLS):
            if flush is not None:
                flush.fill_(1.0)
            fn()
        torch.cuda.synchronize()
    table: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            table[event.name[:60]] += event.time_range.elapsed_us() / CALLS
    return dict(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompt", type=int, default=131072)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    dev, dt = "cuda", torch.bfloat16
    B, H, Hkv, D, P, slots = 1, 32, 8, 128, 32, 2048
    capacity = args.prompt + args.new_tokens + 1
    length = args.prompt + 1  # the first decode step
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(B, H, 1, D, device=dev, dtype=dt, generator=g)
    k = torch.randn(B, Hkv, capacity, D, device=dev, dtype=dt, generator=g)
    v = torch.randn(B, Hkv, capacity, D, device=dev, dtype=dt, generator=g)
    k[:, :, length:] = 0
    n_pages = -(-capacity // P)
    kp = torch.nn.functional.pad(k[:, :, :length].float(), (0, 0, 0, n_pages * P - length), value=float("nan"))
    kp = kp.view(B, Hkv, n_pages, P, D)
    page_min = torch.where(kp.isnan(), float("inf"), kp).amin(3).to(dt)
    page_max = torch.where(kp.isnan(), float("-inf"), kp).amax(3).to(dt)
    del kp
    key_valid = torch.zeros(B, capacity, dtype=torch.bool, device=dev)
    key_valid[:, :length] = True
    member = (torch.rand(H, D, device=dev, generator=g) < 0.5).float()
    dims = torch.arange(D, device=dev).expand(Hkv, D)
    candidates = 3 * slots
    density = torch.empty(B, H, dtype=torch.float32, device=dev)

    def select():
        state, n_visible = key_state_from_mask(B, capacity, q_pos=length - 1, causal=False, key_valid=key_valid,
                                               sink=4, recent=64, device=dev)
        return fasa_two_stage(q, k, dims, member, page_min, page_max, state, slots, candidates, P, sink=4, recent=64,
                              per_kv_head=True, all_dims=True, density_out=density, n_visible=n_visible)

    def layer():
        return sparse_decode_attention(q, k, v, select(), scale=1 / math.sqrt(D))

    idx = select()  # the selection the decode variants below attend over
    variants = {"default": None, "early_v": (128, 4, 1, 1), "64x3": (64, 4, 3, 0), "64x3_early_v": (64, 4, 3, 1)}
    flush = torch.empty(64 * 2**20, dtype=torch.float32, device=dev)  # 256 MB, > L2
    rows = []
    for temp, buf in (("warm", None), ("cold", flush)):
        before = sm_clock()
        table = kernel_us(layer, buf)
        for name, launch in variants.items():
            table[f"sparse_decode[{name}] alone"] = sum(
                us for kname, us in kernel_us(lambda launch=launch: sparse_decode_attention(
                    q, k, v, idx, scale=1 / math.sqrt(D), launch=launch), buf).items()
                if "fill" not in kname.lower() and "elementwise" not in kname)
        rows.append({"temp": temp, "clock_before": before, "clock_after": sm_clock(),
                     "kernels": {name: round(us, 2) for name, us in sorted(table.items(), key=lambda kv: -kv[1])}})
    result = {"environment": environment(), "prompt": args.prompt, "capacity": capacity, "pages": n_pages,
              "candidates": candidates, "slots": slots, "rows": rows}
    for row in rows:
        print(f"## {row['temp']} L2 (clock before / after: {row['clock_before']} / {row['clock_after']})")
        for name, us in row["kernels"].items():
            if "fill" in name.lower() and row["temp"] == "cold" and us > 50:
                name += " (the L2 flush, not the layer)"
            print(f"{us:9.2f}  {name}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
