"""Where the engine's fixed per-call cost goes at low density: CUDA-graph replays (no host overhead) of the
same lists with the non-finite contract on (default) and off, the contract's pre-pass alone, and
FlexAttention on the same BlockMask (B=1, H=32, Hkv=8, D=128, bf16, causal). Prints a markdown table (µs).

    python scripts/engine_fixed_costs.py
"""

from __future__ import annotations

import math

import torch
from torch.nn.attention.flex_attention import flex_attention

from sparse_compile.benchmarks.decode_bench import graph_ms
from sparse_compile.benchmarks.engine import _lists_full_width, random_causal_block_mask
from sparse_compile.benchmarks.methods import flex_block_mask
from sparse_compile.kernels.block_mask import BlockList
from sparse_compile.kernels.block_sparse_attention import block_sparse_attention, nonfinite_keys

H, HKV, D, BLOCK = 32, 8, 128, 128


def row(L: int, density: float, flex, g: torch.Generator) -> str:
    q = torch.randn(1, H, L, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, HKV, L, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn_like(k)
    n = math.ceil(L / BLOCK)
    mask = random_causal_block_mask(1, H, n, density, g, "cuda")
    num, idx = _lists_full_width(mask)
    bm = flex_block_mask(BlockList(num, idx, BLOCK, L, L), H)  # the same blocks, diagonal ones causal

    def ours(config=None):
        return lambda: block_sparse_attention(q, k, v, num, idx, block_size=BLOCK, validate=False, config=config)
    times = [graph_ms(ours(), 100), graph_ms(ours({"NONFINITE": False}), 100),
             graph_ms(lambda: nonfinite_keys(k, v), 100),
             graph_ms(lambda: flex(q, k, v, block_mask=bm, enable_gqa=True), 100)]
    return f"| {L // 1024}K | {density} | " + " | ".join(f"{1e3 * t:.1f}" for t in times) + " |"


def main() -> None:
    flex = torch.compile(flex_attention, dynamic=False)
    g = torch.Generator(device="cuda").manual_seed(0)
    print("| L | density | ours (contract on) µs | ours (NONFINITE off) µs | pre-pass alone µs | Flex µs |")
    print("|---|---|---|---|---|---|")
    for L, density in ((8192, 0.05), (8192, 0.1), (32768, 0.05), (32768, 0.1)):
        print(row(L, density, flex, g), flush=True)


if __name__ == "__main__":
    main()
