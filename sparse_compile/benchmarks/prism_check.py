"""GPU self-check and timing of Prism's Triton block estimation (CUDA only).

1. Correctness: the Triton selection (`prism_select_triton`) against the float64 reference
   (`select_blocks_reference`) on random and structured inputs (topic segments, left/right padding,
   chunked prefill, sliding windows, GQA in both modes, fp16/bf16/fp32, head_dim 64/128). The
   kernel computes in fp32 (band logits on tensor cores: tl.dot input precision tf32x3 by default,
   also checked: ieee and tf32), so a block may differ only where the reference itself flips between
   thresholds p - eps and p + eps, eps = max(1e-4, expm1(2 * Delta)) with Delta the bound on the
   logit error of the precision (`boundary_eps`, PRISM_NOTES.md); at p = 1 the lists must equal
   the allowed blocks exactly.
2. Timing (medians of `triton.testing.do_bench`): the estimation alone at 32K and 128K
   (B=1, H=32, Hkv=8, D=128, bf16, block 128, p=0.95), per kernel (torch.profiler) and in total,
   next to dense SDPA (cuDNN and flash) and Prism attention end to end. Estimation GFLOP/s counts
   the band logits: 2 * B * H * nq * nk * (high_dims + low_dims).

    python -m sparse_compile.benchmarks.prism_check                 # check + timing
    python -m sparse_compile.benchmarks.prism_check --no-timing     # check only
    python -m sparse_compile.benchmarks.prism_check --out prism_gpu.json
    python -m sparse_compile.benchmarks.prism_check --tune          # + a sweep of launch configs
Exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from sparse_compile.attention_mask import AttentionMask, SiteFacts
from sparse_compile.benchmarks.decode_bench import capture
from sparse_compile.kernels.block_mask import BlockList
from sparse_compile.kernels.prism import estimation_flops, prism_select_triton
from sparse_compile.methods import prism
from sparse_compile.methods.prism import PrismParams, select_blocks_reference, selection_kwargs

BOUNDARY = 1e-4  # fp32 softmax / log-sum-exp / accumulation: the floor of the boundary tolerance
# relative error bound of one product q_i * k_i in tl.dot, per input precision: ieee exact (fp32
# accumulation is in BOUNDARY), tf32x3 drops the lo * lo term of the 3-pass split (~2^-22 each,
# bounded by 2^-21), tf32 rounds both operands to 10 mantissa bits (2 * 2^-11)
PRODUCT_REL_ERROR = {"ieee": 0.0, "tf32x3": 2.0**-21, "tf32": 2.0**-10}
PRECISIONS = ("tf32x3", "tf32", "ieee")


def structured_qk(B, H, Hkv, Lq, Lk, D, dtype, seed, strength=1.5, key_valid=None, device="cuda"):
    """q (B, H, Lq, D), k (B, Hkv, Lk, D): keys carry a topic vector per 64-token segment, each query
    segment copies the topic of a random earlier key segment; padding is one large constant vector."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    seg = 64
    n_seg = -(-Lk // seg)
    topics = torch.randn(B, Hkv, n_seg, D, generator=g)
    k = torch.randn(B, Hkv, Lk, D, generator=g) + strength * topics.repeat_interleave(seg, 2)[:, :, :Lk]
    q_pos = torch.arange(Lq) + (Lk - Lq)
    src = (torch.rand(B, H, n_seg, generator=g) * (torch.arange(n_seg) + 1)).long()
    q_topic = torch.gather(topics.repeat_interleave(H // Hkv, 1), 2, src[..., None].expand(-1, -1, -1, D))
    q = torch.randn(B, H, Lq, D, generator=g) + strength * q_topic[:, :, q_pos // seg]
    if key_valid is not None:
        junk = 4.0 * torch.randn(D, generator=g)
        kv = key_valid.cpu()
        k = torch.where(kv[:, None, :, None], k, junk)
        q = torch.where(kv[:, None, q_pos, None], q, junk)
    return q.to(device=device, dtype=dtype), k.to(device=device, dtype=dtype)


def boundary_eps(q, k, mask, kw, precision: str) -> float:
    """Half-width of the threshold band the kernel's selection must lie in (see the module doc).

    A logit error |dz| <= Delta moves every probability by a factor in [exp(-2 Delta), exp(2 Delta)],
    so the mass of any set of blocks by at most expm1(2 Delta). Delta = PRODUCT_REL_ERROR[precision]
    * max over (b, h, m, n) and both bands of sum_i |q_i k_i| / scale, from the float64 pooled
    blocks and temperatures of the reference. q: (B, H, Lq, D), k: (B, Hkv, Lk, D)."""
    rel = PRODUCT_REL_ERROR[precision]
    if rel == 0.0:
        return BOUNDARY
    b = kw["block_size"]
    kv_valid = prism.key_valid_or_ones(mask, q.shape[0], k.shape[2], q.device)
    qb = prism.pool_blocks(q, prism.query_valid(mask, kv_valid, q.shape[2]), b, torch.float64)
    kb = prism.pool_blocks(k, kv_valid, b, torch.float64).repeat_interleave(q.shape[1] // k.shape[1], 1)
    delta = 0.0
    for idx, temp in ((kw["high_idx"], kw["temperature_high"]), (kw["low_idx"], kw["temperature_low"])):
        idx = idx.to(q.device)
        t = prism.band_temperature(qb, kb, idx) if temp is None else torch.tensor(temp, dtype=torch.float64)
        scale = idx.numel() ** 0.5 * torch.clamp(t, min=prism.MIN_TEMPERATURE)
        bound = torch.matmul(qb[..., idx].abs(), kb[..., idx].abs().transpose(-1, -2)) / scale
        delta = max(delta, rel * float(bound.max()))
    return max(BOUNDARY, math.expm1(2.0 * delta))


def check_case(name, q, k, mask, site, params, block_size, precision="tf32x3") -> dict:
    """One comparison; returns a result row with `ok`."""
    kw = selection_kwargs(site, params, block_size=block_size)
    n, idx = prism_select_triton(q, k, mask=mask, precision=precision, **kw)
    got = BlockList(n, idx, block_size, q.shape[2], k.shape[2]).to_dense()
    ph, pl = kw["threshold_high"], kw["threshold_low"]
    eps = boundary_eps(q, k, mask, kw, precision)
    lo = select_blocks_reference(q, k, mask=mask, **{**kw, "threshold_high": ph - eps,
                                                     "threshold_low": pl - eps})
    hi = select_blocks_reference(q, k, mask=mask, **{**kw, "threshold_high": ph + eps,
                                                     "threshold_low": pl + eps})
    exact = select_blocks_reference(q, k, mask=mask, **kw)
    missing = int((lo & ~got).sum())
    extra = int((got & ~hi).sum())
    row = {"case": name, "precision": precision, "eps": eps, "selected": int(got.sum()),
           "reference": int(exact.sum()), "differ_exact": int((got ^ exact).sum()), "missing": missing,
           "extra": extra, "ok": missing == 0 and extra == 0}
    if max(ph, pl) >= 1.0:
        row["ok"] = row["ok"] and bool(torch.equal(got, exact))
    return row


def run_checks(device="cuda", precisions=PRECISIONS) -> list[dict]:
    rows = []
    seed = 0
    for D, dtype, (B, H, Hkv), L, chunk, pad, window, gqa, p, strength, rope in [
        (128, torch.bfloat16, (1, 8, 2), 4096, 1.0, 0, 0, "per_head", 0.95, 1.5, "rotate_half"),
        (128, torch.float16, (2, 8, 2), 3000, 1.0, 700, 0, "per_kv_head", 0.9, 1.5, "rotate_half"),
        (64, torch.float32, (2, 9, 3), 2500, 0.3, 300, 0, "per_head", 0.95, 0.5, "interleaved"),
        (128, torch.bfloat16, (1, 4, 4), 8192, 1.0, 0, 1024, "per_head", 0.8, 3.0, "rotate_half"),
        (64, torch.bfloat16, (1, 8, 8), 5000, 0.5, 0, 0, "per_head", 1.0, 1.5, "rotate_half"),
        (128, torch.float16, (1, 8, 2), 2048, 1.0, 0, 0, "per_head", 0.95, 0.0, "rotate_half"),  # random
    ]:
        for block_size in (128, 64):
            seed += 1
            Lq = max(1, int(L * chunk))
            key_valid = None
            if pad:
                key_valid = torch.ones(B, L, dtype=torch.bool, device=device)
                key_valid[-1, :pad] = False  # left padding in the last row
                if B > 1:
                    key_valid[0, L - pad // 2:] = False  # right padding in the first
            q, k = structured_qk(B, H, Hkv, Lq, L, D, dtype, seed, strength, key_valid, device)
            mask = AttentionMask(q_offset=L - Lq, window=window, key_valid=key_valid)
            site = SiteFacts(rope=rope, rotary_dim=D, head_dim=D, num_heads=H, num_kv_heads=Hkv)
            params = PrismParams(threshold_high=p, threshold_low=p, gqa=gqa, block_size=block_size)
            name = (f"D={D} {str(dtype)[6:]} B={B} H={H}/{Hkv} L={L} Lq={Lq} pad={pad} win={window} "
                    f"{gqa} p={p} s={strength} {rope} b={block_size}")
            for precision in precisions:
                rows.append(check_case(name, q, k, mask, site, params, block_size, precision))
                print(("ok  " if rows[-1]["ok"] else "FAIL") + f"  {precision:6s} {name}: " +
                      ", ".join(f"{key}={rows[-1][key]}" for key in ("selected", "differ_exact", "missing", "extra"))
                      + f", eps={rows[-1]['eps']:.1e}")
    return rows


def kernel_times(fn, iters=10) -> dict[str, float]:
    """Mean CUDA time per call (ms) of each kernel launched by fn, via torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    for evt in prof.key_averages():
        if evt.device_type == torch.autograd.DeviceType.CUDA or getattr(evt, "self_device_time_total", 0):
            t = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0)
            if t:
                out[evt.key[:60]] = t / 1000.0 / iters
    return out


def same_lists(a, b) -> bool:
    """Two BlockLists select the same blocks (entries past each row's count are undefined)."""
    return bool(torch.equal(a.to_dense(), b.to_dense()))


def time_length(L: int, device="cuda") -> list[dict]:
    """Timing rows (per_head and per_kv_head) at one length L (B=1, H=32, Hkv=8, D=128, bf16)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    B, H, Hkv, D = 1, 32, 8, 128
    q, k = structured_qk(B, H, Hkv, L, L, D, torch.bfloat16, seed=L, device=device)
    v = torch.randn_like(k)
    mask = AttentionMask()
    site = SiteFacts(rotary_dim=D, head_dim=D, num_heads=H, num_kv_heads=Hkv)
    kk, vv = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
    dense = {}
    for backend, name in ((SDPBackend.CUDNN_ATTENTION, "sdpa_cudnn_ms"), (SDPBackend.FLASH_ATTENTION, "sdpa_flash_ms")):
        try:
            with sdpa_kernel([backend]):
                dense[name] = do_bench(lambda: F.scaled_dot_product_attention(q, kk, vv, is_causal=True),
                                       warmup=3, rep=30)
        except RuntimeError as exc:  # backend unavailable
            dense[name] = float("nan")
            print(f"{name}: {exc}")
    rows = []
    for gqa in ("per_head", "per_kv_head"):
        params = PrismParams(gqa=gqa)
        kw = selection_kwargs(site, params)

        def est(kw=kw):
            return prism_select_triton(q, k, mask=mask, **kw)

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        est()
        torch.cuda.synchronize()
        extra_gib = (torch.cuda.max_memory_allocated() - base) / 2**30
        t_est = do_bench(est, warmup=5, rep=50)
        blocks = prism.prism_select(q, k, mask, site, params)
        density = float(prism.selection_density(blocks, mask, H).mean())
        t_attn = do_bench(lambda params=params: prism.attention(q, k, v, mask, site, params), warmup=3, rep=30)
        flops = estimation_flops(B, H, L, L, params.block_size, int(kw["high_idx"].numel()),
                                 int(kw["low_idx"].numel()))
        by_precision = {}
        if gqa == "per_head":
            for precision in PRECISIONS:
                by_precision[precision] = do_bench(
                    lambda kw=kw, precision=precision: prism_select_triton(q, k, mask=mask, precision=precision, **kw),
                    warmup=5, rep=50)
            print(f"L={L} {gqa}: estimation by precision: " +
                  ", ".join(f"{key} {ms:.3f} ms" for key, ms in by_precision.items()))
        # the method's selection and attention captured in CUDA graphs: replay equals eager, and its time
        graph, captured = capture(lambda params=params: prism.prism_select(q, k, mask, site, params))
        graph.replay()
        torch.cuda.synchronize()
        if not same_lists(captured, blocks):
            raise AssertionError(f"L={L} {gqa}: the captured selection's replay differs from the eager lists")
        t_est_graph = do_bench(graph.replay, warmup=5, rep=50)
        attn_graph, attn_out = capture(lambda params=params: prism.attention(q, k, v, mask, site, params)[0])
        attn_graph.replay()
        torch.cuda.synchronize()
        err = float((attn_out.float() - prism.attention(q, k, v, mask, site, params)[0].float()).abs().max())
        if err != 0.0:
            raise AssertionError(f"L={L} {gqa}: captured attention differs from eager by {err}")
        t_attn_graph = do_bench(attn_graph.replay, warmup=3, rep=30)
        del graph, attn_graph
        row = {"L": L, "gqa": gqa, "estimation_ms": t_est, "estimation_graph_ms": t_est_graph,
               "prism_attention_graph_ms": t_attn_graph,
               "estimation_by_precision_ms": by_precision, "estimation_gflops": flops / t_est / 1e6,
               "estimation_extra_gib": extra_gib, "density": density, "prism_attention_ms": t_attn,
               **dense, "kernels_ms": kernel_times(est)}
        rows.append(row)
        print(f"L={L} {gqa}: estimation {t_est:.3f} ms (CUDA-graph replay {t_est_graph:.3f} ms; "
              f"{row['estimation_gflops']:.0f} GFLOP/s, "
              f"+{extra_gib:.2f} GiB), density {density:.3f}, prism attention {t_attn:.2f} ms (replay "
              f"{t_attn_graph:.2f}), "
              f"SDPA cuDNN {dense['sdpa_cudnn_ms']:.2f} / flash {dense['sdpa_flash_ms']:.2f} ms")
        for name, ms in sorted(row["kernels_ms"].items(), key=lambda kv: -kv[1])[:6]:
            print(f"    {ms:8.3f} ms  {name}")
    return rows


TUNE_CONFIGS = [  # one kernel's knobs at a time, the others at DEFAULT_TUNING
    {"pool_elems": 8192, "pool_warps": 4}, {"pool_elems": 32768, "pool_warps": 8},
    {"pool_elems": 16384, "pool_warps": 16},
    {"scores_qb": 128, "scores_kb": 64, "scores_warps": 8}, {"scores_qb": 64, "scores_kb": 32},
    {"select_warps": 1}, {"select_warps": 4}, {"select_elems": 2048}, {"select_elems": 2048, "select_warps": 4},
    {"select_elems": 512, "select_warps": 1}, {"select_min_pad": 1024}, {"select_min_pad": 16},
]


def run_tuning(lengths=(32768, 131072), device="cuda") -> list[dict]:
    """Estimation time (per_head, bf16, B=1, H=32, Hkv=8, D=128) and per-kernel times for each
    config of TUNE_CONFIGS; `same` says whether the lists equal those of the default config."""
    from triton.testing import do_bench

    B, H, Hkv, D = 1, 32, 8, 128
    rows = []
    for L in lengths:
        q, k = structured_qk(B, H, Hkv, L, L, D, torch.bfloat16, seed=L, device=device)
        mask = AttentionMask()
        kw = selection_kwargs(SiteFacts(rotary_dim=D, head_dim=D, num_heads=H, num_kv_heads=Hkv), PrismParams())
        base_n, base_idx = prism_select_triton(q, k, mask=mask, **kw)
        base = BlockList(base_n, base_idx, 128, L, L).to_dense()
        for cfg in [{}] + TUNE_CONFIGS:
            try:
                def est(q=q, k=k, mask=mask, kw=kw, cfg=cfg):
                    return prism_select_triton(q, k, mask=mask, tuning=cfg, **kw)

                n, idx = est()
                same = bool(torch.equal(BlockList(n, idx, 128, L, L).to_dense(), base))
                ms = do_bench(est, warmup=3, rep=30)
                kernels = kernel_times(est, 5)
                kernels = {name: t for name, t in kernels.items() if "_prism_" in name}
            except Exception as exc:  # a config that does not compile or fit
                ms, same, kernels = float("nan"), False, {"error": str(exc)[:200]}
            rows.append({"L": L, "config": cfg, "estimation_ms": ms, "same": same, "kernels_ms": kernels})
            print(f"tune L={L} {cfg}: {ms:.3f} ms same={same} " +
                  " ".join(f"{name.split('_prism_')[-1][:8]}={t:.3f}" for name, t in kernels.items()
                           if isinstance(t, float)))
        torch.cuda.empty_cache()
    return rows


def run_timing(lengths=(32768, 131072), device="cuda") -> list[dict]:
    rows = []
    for L in lengths:
        rows += time_length(L, device)
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-timing", action="store_true", help="run the correctness checks only")
    parser.add_argument("--no-check", action="store_true", help="run the timing only")
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072], help="timed sequence lengths")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--tune", action="store_true", help="also sweep TUNE_CONFIGS at the longest length")
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS,
                        help="dot input precisions the correctness checks run")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("prism_check needs a CUDA device", file=sys.stderr)
        return 2
    import triton

    result = {"date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
              "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "command": "python -m sparse_compile.benchmarks.prism_check " + " ".join(argv or sys.argv[1:])}
    failed = False
    if not args.no_check:
        result["checks"] = run_checks(precisions=tuple(args.precisions))
        failed = not all(row["ok"] for row in result["checks"])
    if not args.no_timing:
        result["timing"] = run_timing(tuple(args.lengths))
    if args.tune:
        result["tuning"] = run_tuning((max(args.lengths),))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1))
    print("FAILED" if failed else "all checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
