"""Which SDPA call is fastest for one decode query with GQA (and with a (B,1,1,Lk) key mask)?

    python -m sparse_compile.benchmarks.decode_paths

Variants (B=1, H=32, Hkv=8, D=128, bf16, medians of triton.testing.do_bench):
  enable_gqa        SDPA(q (B,H,1,D), k, v, enable_gqa=True)
  grouped           SDPA(q viewed as (B,Hkv,H/Hkv,D), k, v): query heads as queries of their KV head
  expanded          SDPA on K/V expanded to H heads (what repeat_kv feeds eager)
  ..._mask          the same with a boolean (B,1,1,Lk) key mask (padding)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ORDER = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
         SDPBackend.MATH]


def run_length(L: int, B: int = 1, H: int = 32, Hkv: int = 8, D: int = 128) -> None:
    import triton

    if True:
        q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        mask = torch.rand(B, 1, 1, L, device="cuda") > 0.1
        ref = None
        variants = {
            "enable_gqa": lambda m: F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True),
            "grouped": lambda m: F.scaled_dot_product_attention(q.view(B, Hkv, H // Hkv, D), k, v,
                                                                attn_mask=m).view(B, H, 1, D),
            "expanded": lambda m: F.scaled_dot_product_attention(q, k.repeat_interleave(H // Hkv, 1),
                                                                 v.repeat_interleave(H // Hkv, 1), attn_mask=m),
        }
        for name, fn in variants.items():
            for m, suffix in ((None, ""), (mask, "_mask")):
                with sdpa_kernel(ORDER, set_priority=True):
                    out = fn(m)
                    ms = triton.testing.do_bench(lambda fn=fn, m=m: fn(m), rep=100)
                if m is None:
                    ref = out if ref is None else ref
                err = float((out.float() - ref.float()).abs().max()) if m is None else float("nan")
                print(f"L={L} {name + suffix:16s} {ms * 1000:8.1f} us   max|diff| vs enable_gqa {err:.2e}", flush=True)


def main() -> None:
    for L in (32768, 131072):
        run_length(L)


if __name__ == "__main__":
    main()
