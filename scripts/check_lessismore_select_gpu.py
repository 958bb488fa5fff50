"""kernels/lessismore_select.py on CUDA against its PyTorch reference (bf16/fp16, GQA 4, D 128, B 1-2 with left
padding): the output's max relative error and the share of the reference selection the kernel's selection holds.

    python scripts/check_lessismore_select_gpu.py
"""

from __future__ import annotations

import torch

from sparse_compile.kernels.lessismore import budget_split
from sparse_compile.kernels.lessismore_select import lessismore_select, lessismore_select_reference


def main() -> int:
    failed = 0
    g = torch.Generator(device="cuda").manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        for B, L, pad in ((1, 8192, 0), (2, 32768, 3000), (1, 131072, 0)):
            q = torch.randn(B, 32, 1, 128, device="cuda", dtype=dtype, generator=g)
            k = torch.randn(B, 8, L, 128, device="cuda", dtype=dtype, generator=g)
            v = torch.randn(B, 8, L, 128, device="cuda", dtype=dtype, generator=g)
            visible = torch.ones(B, L, dtype=torch.bool, device="cuda")
            visible[-1, :pad] = False
            s, m, r = budget_split(2048, 4, 0.25)
            out, sel = lessismore_select(q, k, v, visible, 128 ** -0.5, s, m, r, impl="triton")
            ref_out, ref_sel = lessismore_select_reference(q, k, v, visible, 128 ** -0.5, s, m, r)
            err = float((out.float() - ref_out.float()).norm() / ref_out.float().norm())
            held = min(float(torch.isin(ref_sel[b][ref_sel[b] >= 0], sel[b]).float().mean()) for b in range(B))
            ok = err < 2e-2 and held >= 0.99
            failed += not ok
            print(f"{str(dtype)[6:]:>8} B={B} L={L:>6} pad={pad:>4} rel_err={err:.2e} held={held:.4f} "
                  f"{'ok' if ok else 'FAIL'}", flush=True)
    print(f"lessismore_select: {failed} failed")
    return int(failed > 0)


if __name__ == "__main__":
    raise SystemExit(main())
