"""kernels/sampled_mass.py on CUDA against its PyTorch reference (bf16/fp16/fp32, D 64-256, GQA 2-8, block 64/128,
1-128 samples, window, left padding at B = 2): max abs error and NaN left in a poisoned output; the kernel's register
and spill counts; `kernels.prism.sampled_blocks` on CUDA against the CPU (differing blocks).

    python scripts/check_sampled_mass_gpu.py
"""

from __future__ import annotations

import torch

from sparse_compile.attention_mask import AttentionMask
from sparse_compile.kernels import sampled_mass
from sparse_compile.kernels.prism import sample_positions, sampled_blocks

DEV = "cuda"
CASES = [  # B, Hkv, G, Lq, Lk, D, block, samples, dtype, window, left padding of the last row
    (2, 2, 4, 1000, 1500, 128, 128, 32, torch.bfloat16, 0, 100),
    (1, 8, 4, 4096, 4096, 128, 128, 32, torch.bfloat16, 0, 0),
    (2, 2, 3, 700, 700, 96, 64, 4, torch.float16, 200, 50),
    (1, 2, 8, 600, 900, 64, 64, 1, torch.float32, 0, 0),
    (1, 1, 2, 500, 500, 256, 128, 32, torch.bfloat16, 0, 10),
    (1, 1, 2, 500, 500, 256, 128, 16, torch.float32, 300, 0),
    (1, 2, 4, 2048, 2048, 128, 128, 128, torch.bfloat16, 0, 0),
    (1, 2, 4, 2048, 2048, 128, 64, 64, torch.float16, 0, 0),
]


def check_case(B, Hkv, G, Lq, Lk, D, block, samples, dtype, window, pad) -> None:
    g = torch.Generator(device=DEV).manual_seed(0)
    k = torch.randn(B, Hkv, Lk, D, device=DEV, generator=g)
    idx = torch.randint(0, Lk, (Lq,), device=DEV, generator=g)  # queries near keys: peaked attention
    q = 0.5 * torch.randn(B, Hkv * G, Lq, D, device=DEV, generator=g) + k.repeat_interleave(G, 1)[:, :, idx]
    q, k = q.to(dtype), k.to(dtype)
    kv = torch.ones(B, Lk, dtype=torch.bool, device=DEV)
    kv[-1, :pad] = False
    pos, used = sample_positions(Lq, block, samples, DEV)
    w = used[None].expand(B, -1, -1).float().contiguous()
    kw = dict(block_size=block, scale=D ** -0.5, q_offset=Lk - Lq, causal=True, window=window, key_valid=kv)
    out = torch.full((B, Hkv * G, -(-Lq // block), -(-Lk // block)), float("nan"), device=DEV)
    got = sampled_mass.sampled_block_mass(q, k, pos, w, out=out, **kw)
    want = sampled_mass.sampled_block_mass_reference(q, k, pos, w, **kw)
    print(B, Hkv, G, Lq, Lk, D, block, samples, dtype, window, pad,
          f"maxerr {(got - want).abs().max().item():.2e}", "nan", got.isnan().any().item(), flush=True)


def main() -> None:
    for case in CASES:
        check_case(*case)
    try:
        for kernel in sampled_mass._sampled_mass_kernel.device_caches[0][0].values():
            print("regs", kernel.n_regs, "spills", kernel.n_spills, "shared", kernel.metadata.shared)
    except (AttributeError, IndexError, KeyError) as err:  # Triton's cache layout is not a public API
        print("no cache info", err)
    q = torch.randn(2, 8, 1500, 64, device=DEV)
    k = torch.randn(2, 2, 1500, 64, device=DEV)
    kv = torch.ones(2, 1500, dtype=torch.bool, device=DEV)
    kv[1, :77] = False
    for p in (0.5, 0.9):
        a = sampled_blocks(q, k, AttentionMask(key_valid=kv), block_size=64, samples=8, threshold=p, scale=0.125)
        c = sampled_blocks(q.cpu(), k.cpu(), AttentionMask(key_valid=kv.cpu()), block_size=64, samples=8,
                           threshold=p, scale=0.125)
        print("sampled_blocks cuda vs cpu: differing blocks", (a.cpu() != c).sum().item(), "of", a.numel(),
              "kept", a.sum().item())


if __name__ == "__main__":
    main()
