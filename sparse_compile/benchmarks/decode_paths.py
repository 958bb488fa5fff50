"""Which SDPA call is fastest for one decode query with GQA (and with a (B,1,1,Lk) key mask)?

    python -m sparse_compile.benchmarks.decode_paths

Variants (B=1, H=32, Hkv=8, D=128, bf16, medians of triton.testing.do_bench):
  enable_gqa        SDPA(q (B,H,1,D), k, v, enable_gqa=True)
  grouped           SDPA(q viewed as (B,Hkv,H/Hkv,D), k, v): query heads as queries of their KV head
  expanded          SDPA on K/V expanded to H heads (what repeat_kv feeds eager)
  ..._mask          the same with a boolean (B,1,1,Lk) key mask (padding)
  sparse_decode_all_mask   kernels/sparse_decode.py over every key (indices=None, one set for all heads)
                   with key_valid, both timed as CUDA-graph replays: what the dense method's CUDA decode with
                   masked keys runs, since it skips them on load (non-finite contract); also a NaN planted
                   in a masked key's V (SDPA: the row turns NaN; the kernel: unchanged)
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


def graph_time(fn) -> float:
    """Median ms of one replay of `fn` captured in a CUDA graph (decode_bench's `graph_ms`: what decode under
    reduce-overhead runs, no host launch cost); raises when the capture fails."""
    from sparse_compile.benchmarks.decode_bench import graph_ms

    ms = graph_ms(fn, rep_ms=200.0)
    if isinstance(ms, str):
        raise RuntimeError(ms)
    return ms


def masked_decode_inputs(L: int, B: int, H: int, Hkv: int, D: int) -> tuple[torch.Tensor, ...]:
    """q (B, H, 1, D), k, v (B, Hkv, L, D) bf16 and valid (B, L): the last 64 slots masked (a StaticCache's
    empty tail) and, for B > 1, row 1 left-padded by a quarter."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.bfloat16, generator=g)
    valid = torch.ones(B, L, dtype=torch.bool, device="cuda")
    valid[:, -64:] = False
    if B > 1:
        valid[1, : L // 4] = False
    return q, k, v, valid


def sparse_decode_all(L: int, B: int, H: int = 32, Hkv: int = 8, D: int = 128) -> None:
    """SDPA enable_gqa with a key mask vs the sparse decode kernel over every key with key_valid."""
    from sparse_compile.kernels.sparse_decode import sparse_decode_attention

    q, k, v, valid = masked_decode_inputs(L, B, H, Hkv, D)

    def sdpa():
        with sdpa_kernel(ORDER, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :], enable_gqa=True)

    def kernel():
        return sparse_decode_attention(q, k, v, None, key_valid=valid)

    ref, out = sdpa(), kernel()
    times = {name: graph_time(fn) for name, fn in (("sdpa_mask", sdpa), ("sparse_decode_all_mask", kernel))}
    v[0, 0, L - 1, 0] = float("nan")  # a masked slot
    nan_rows = {name: int(torch.isnan(fn().float()).any(dim=-1).sum()) for name, fn in
                (("sdpa_mask", sdpa), ("sparse_decode_all_mask", kernel))}
    ratio = times["sparse_decode_all_mask"] / times["sdpa_mask"]
    print(f"L={L} B={B} sdpa_mask {times['sdpa_mask'] * 1000:8.1f} us  sparse_decode_all_mask "
          f"{times['sparse_decode_all_mask'] * 1000:8.1f} us  ratio {ratio:.3f}"
          f"  max|diff| {float((out.float() - ref.float()).abs().max()):.2e}  rows NaN after a NaN in a masked "
          f"V: {nan_rows}", flush=True)


def every_key_sweep(L: int, B: int, H: int = 32, Hkv: int = 8, D: int = 128) -> None:
    """Launch configs of the every-key path (indices=None) against SDPA with the same key mask."""
    import triton

    from sparse_compile.kernels.sparse_decode import sparse_decode_attention

    q, k, v, valid = masked_decode_inputs(L, B, H, Hkv, D)
    with sdpa_kernel(ORDER, set_priority=True):
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :], enable_gqa=True)
        t_sdpa = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=valid[:, None, None, :], enable_gqa=True), rep=200, return_mode="median")
    rows = []
    for launch in [None] + [(n, w, s) for n in (32, 64, 128) for w in (4, 8) for s in (2, 3, 4)]:
        for mult in (1, 2, 4):
            def fn(launch=launch, mult=mult):
                splits = None
                if mult > 1:
                    sm = torch.cuda.get_device_properties(0).multi_processor_count
                    splits = max(1, mult * 2 * sm // (B * Hkv))
                return sparse_decode_attention(q, k, v, None, key_valid=valid, launch=launch, num_splits=splits)
            try:
                err = float((fn().float() - ref.float()).abs().max())
                t = triton.testing.do_bench(fn, rep=100, return_mode="median")
            except Exception as exc:  # a config that does not fit: say so and go on
                print(f"L={L} B={B} launch={launch} x{mult}: {type(exc).__name__}", flush=True)
                continue
            rows.append((t, launch, mult, err))
    rows.sort(key=lambda r: r[0])
    print(f"L={L} B={B} sdpa_mask {t_sdpa * 1000:.1f} us; every-key configs, fastest first:")
    for t, launch, mult, err in rows[:6] + [r for r in rows if r[1] is None and r[2] == 1]:
        print(f"   launch={launch} splits x{mult}: {t * 1000:8.1f} us  ratio {t / t_sdpa:.3f}  max|diff| {err:.1e}",
              flush=True)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="only the every-key launch-config sweep")
    args = parser.parse_args()
    if args.sweep:
        for L in (32768, 131072):
            for B in (1, 4):
                every_key_sweep(L, B)
        return
    for L in (32768, 131072):
        run_length(L)
    for L in (32768, 131072):
        for B in (1, 4):
            sparse_decode_all(L, B)


if __name__ == "__main__":
    main()
