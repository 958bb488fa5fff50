"""Which SDPA call is fastest for one decode query with GQA (and with a (B,1,1,Lk) key mask)?

    python -m sparse_compile.benchmarks.decode_paths

Variants (B=1, H=32, Hkv=8, D=128, bf16, medians of triton.testing.do_bench):
  enable_gqa        SDPA(q (B,H,1,D), k, v, enable_gqa=True)
  grouped           SDPA(q viewed as (B,Hkv,H/Hkv,D), k, v): query heads as queries of their KV head
  expanded          SDPA on K/V expanded to H heads (what repeat_kv feeds eager)
  ..._mask          the same with a boolean (B,1,1,Lk) key mask (padding)
  sparse_decode_all_mask   kernels/sparse_decode.py over every key (indices = arange(Lk), one set for all
                   heads) with key_valid: the candidate for dense CUDA decode with a key mask, since it
                   skips invalid keys on load (non-finite contract); also a NaN planted in a masked key's V
                   (SDPA: the row turns NaN; the kernel: unchanged)
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


def sparse_decode_all(L: int, B: int, H: int = 32, Hkv: int = 8, D: int = 128) -> None:
    """SDPA enable_gqa with a key mask vs the sparse decode kernel over every key with key_valid."""
    import triton

    from sparse_compile.kernels.sparse_decode import sparse_decode_attention

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.bfloat16, generator=g)
    valid = torch.ones(B, L, dtype=torch.bool, device="cuda")
    valid[:, -64:] = False  # StaticCache: slots after the current position
    if B > 1:
        valid[1, : L // 4] = False  # row 1 left-padded
    idx = torch.arange(L, device="cuda", dtype=torch.int32).view(1, 1, L).expand(B, 1, L)

    def sdpa():
        with sdpa_kernel(ORDER, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :], enable_gqa=True)

    def kernel():
        return sparse_decode_attention(q, k, v, idx, key_valid=valid)

    ref, out = sdpa(), kernel()
    times = {name: triton.testing.do_bench(fn, rep=200, return_mode="median") for name, fn in
             (("sdpa_mask", sdpa), ("sparse_decode_all_mask", kernel))}
    v[0, 0, L - 1, 0] = float("nan")  # a masked slot
    nan_rows = {name: int(torch.isnan(fn().float()).any(dim=-1).sum()) for name, fn in
                (("sdpa_mask", sdpa), ("sparse_decode_all_mask", kernel))}
    ratio = times["sparse_decode_all_mask"] / times["sdpa_mask"]
    print(f"L={L} B={B} sdpa_mask {times['sdpa_mask'] * 1000:8.1f} us  sparse_decode_all_mask "
          f"{times['sparse_decode_all_mask'] * 1000:8.1f} us  ratio {ratio:.3f}"
          f"  max|diff| {float((out.float() - ref.float()).abs().max()):.2e}  rows NaN after a NaN in a masked "
          f"V: {nan_rows}", flush=True)


def main() -> None:
    for L in (32768, 131072):
        run_length(L)
    for L in (32768, 131072):
        for B in (1, 4):
            sparse_decode_all(L, B)


if __name__ == "__main__":
    main()
