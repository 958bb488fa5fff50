"""Host (Python + launch) time per call of block_sparse_attention at a small problem: calls without syncs."""
import time
import torch
from sparse_compile.kernels.block_sparse_attention import block_sparse_attention
from sparse_compile.benchmarks.engine import random_causal_block_mask, _lists_full_width
import cProfile, pstats

g = torch.Generator(device="cuda").manual_seed(0)
L, H, Hkv, D = 8192, 32, 8, 128
q = torch.randn(1, H, L, D, device="cuda", dtype=torch.bfloat16, generator=g)
k = torch.randn(1, Hkv, L, D, device="cuda", dtype=torch.bfloat16, generator=g)
v = torch.randn_like(k)
num, idx = _lists_full_width(random_causal_block_mask(1, H, L // 128, 0.05, g, "cuda"))
for cfg in (None, {"NONFINITE": False}):
    f = lambda: block_sparse_attention(q, k, v, num, idx, block_size=128, validate=False, config=cfg)
    for _ in range(5):
        f()
    torch.cuda.synchronize()
    n = 200
    t0 = time.perf_counter()
    for _ in range(n):
        f()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    print(f"config {cfg}: host {1e6 * (t1 - t0) / n:.1f} us/call, wall {1e6 * (t2 - t0) / n:.1f} us/call")
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(50):
        f()
    pr.disable()
    torch.cuda.synchronize()
    pstats.Stats(pr).sort_stats("tottime").print_stats(12)
