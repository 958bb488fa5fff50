"""Host time (Python + Triton launches) per call of block_sparse_attention on a small problem (8K, 5 %
density, where the GPU work is ~0.2 ms): calls without syncs, with the non-finite contract on and off,
and a cProfile of the launcher.

    python scripts/engine_host_overhead.py
"""

from __future__ import annotations

import cProfile
import pstats
import time

import torch

from sparse_compile.benchmarks.engine import _lists_full_width, random_causal_block_mask
from sparse_compile.kernels.block_sparse_attention import block_sparse_attention


def main() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    L, H, Hkv, D = 8192, 32, 8, 128
    q = torch.randn(1, H, L, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, Hkv, L, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn_like(k)
    num, idx = _lists_full_width(random_causal_block_mask(1, H, L // 128, 0.05, g, "cuda"))
    for cfg in (None, {"NONFINITE": False}):
        def call(cfg=cfg):
            return block_sparse_attention(q, k, v, num, idx, block_size=128, validate=False, config=cfg)
        for _ in range(5):
            call()
        torch.cuda.synchronize()
        n = 200
        t0 = time.perf_counter()
        for _ in range(n):
            call()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        print(f"config {cfg}: host {1e6 * (t1 - t0) / n:.1f} us/call, wall {1e6 * (t2 - t0) / n:.1f} us/call")
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(50):
            call()
        profile.disable()
        torch.cuda.synchronize()
        pstats.Stats(profile).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
