"""Benchmark of the block-sparse prefill engine against FlexAttention and dense SDPA (CUDA only).

One run times, for each length L and block density: our `block_sparse_attention`, FlexAttention
(`torch.compile(flex_attention)` with `BlockMask.from_kv_blocks` built from the same lists:
off-diagonal blocks full, diagonal blocks partial with a causal mask_mod), and dense SDPA with
the flash and the cuDNN backends (dense rows are the same at every density). Medians of
`triton.testing.do_bench`. Masks: random causal 128x128 block masks that always keep the diagonal
and the first key block, one per query head.

TFLOP/s counts the work of the computed blocks: 4 * B * H * D * (visible query-key pairs in the
selected blocks), where an off-diagonal block has block^2 pairs and a diagonal block
block * (block + 1) / 2; dense SDPA counts L * (L + 1) / 2 pairs per head.

    python -m sparse_compile bench --what engine                      # 8K, 32K, 128K; 100/30/10/5 %
    python -m sparse_compile bench --what engine-tiles,engine-padding,engine-gqa,engine-dense-tiles
"""

from __future__ import annotations

import math

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from sparse_compile.benchmarks.timing import causal_mod, do_bench, environment, graph_ms, lists_full_width
from sparse_compile.kernels.block_mask import BlockList
from sparse_compile.kernels.block_sparse_attention import (
    block_sparse_attention,
    default_config,
)
from sparse_compile.methods.dense import FAST_BACKENDS, left_padded_causal_attention

BLOCK = 128


def random_causal_block_mask(B: int, H: int, n: int, density: float, generator: torch.Generator,
                             device) -> torch.Tensor:
    """(B, H, n, n) bool: causal blocks kept with a probability chosen so that the expected
    density over the causal blocks is `density`; the diagonal and the first key block always kept."""
    allowed = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    forced = torch.eye(n, dtype=torch.bool, device=device)
    forced[:, 0] = True
    n_allowed, n_forced = int(allowed.sum()), int(forced.sum())
    p = 1.0 if n_allowed == n_forced else (density * n_allowed - n_forced) / (n_allowed - n_forced)
    p = min(max(p, 0.0), 1.0)
    draw = torch.rand(B, H, n, n, generator=generator, device=device) < p
    return (draw & allowed) | forced


def visible_pairs(mask: torch.Tensor, block: int) -> float:
    """Visible query-key pairs in the selected blocks of a square causal block mask (all heads)."""
    n = mask.shape[-1]
    diag = mask.diagonal(dim1=-2, dim2=-1).sum().item()
    total = mask.sum().item()
    return (total - diag) * block * block + diag * block * (block + 1) / 2 if n else 0.0


def run_engine_benchmark(
    lengths: tuple[int, ...] = (8192, 32768, 131072),
    densities: tuple[float, ...] = (1.0, 0.3, 0.1, 0.05),
    heads: int = 32,
    kv_heads: int = 8,
    head_dim: int = 128,
    dtype: torch.dtype = torch.bfloat16,
    rep_ms: float = 200.0,
    with_flex: bool = True,
    with_sdpa: bool = True,
    config: dict | None = None,
    alt_config: dict | None = None,
    seed: int = 0,
) -> dict:
    """Time ours / FlexAttention / SDPA flash / SDPA cuDNN; returns {"env", "rows"} (times in ms)."""
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(seed)
    flex = torch.compile(flex_attention, dynamic=False)
    rows = []
    for L in lengths:
        rows += _bench_length(L, densities, heads, kv_heads, head_dim, dtype, rep_ms, with_flex, with_sdpa,
                              config, alt_config, flex, BlockMask, SDPBackend, sdpa_kernel, g)
        torch.cuda.empty_cache()
    cap = torch.cuda.get_device_capability()[0]
    return {"env": environment("cuda"), "config": config or default_config(head_dim, BLOCK, "cuda", cap),
            "alt_config": alt_config, "rows": rows}


def padding_benchmark(L: int = 32768, B: int = 4, pad: float = 0.2, heads: int = 32, kv_heads: int = 8,
                      head_dim: int = 128, rep_ms: float = 200.0, seed: int = 0) -> list[dict]:
    """Left-padded batch through the engine (rows 1..B-1 lose their first `pad` of keys and queries) against
    the same batch unpadded: the dense engine (no lists) and full causal lists, and per-row cuDNN causal on
    the unpadded parts (what the dense method runs for left padding). Times in ms."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, heads, L, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, kv_heads, L, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn_like(k)
    starts = [0] + [int(pad * L)] * (B - 1)
    key_valid = torch.arange(L, device="cuda")[None, :] >= torch.tensor(starts, device="cuda")[:, None]
    bl = BlockList.causal_full(B, kv_heads, L, L, BLOCK, device="cuda")
    lists = (bl.kv_num_blocks, bl.kv_indices)

    def engine(valid, with_lists):
        return lambda: block_sparse_attention(q, k, v, *(lists if with_lists else ()), block_size=BLOCK,
                                              key_valid=valid, validate=False)

    def per_row_cudnn():  # the dense method's path for left padding
        with sdpa_kernel(FAST_BACKENDS, set_priority=True):
            return left_padded_causal_attention(q, k, v, starts, head_dim ** -0.5)

    want = per_row_cudnn().float()
    valid_rows = key_valid[:, None, :, None]
    for with_lists in (False, True):
        err = float(((engine(key_valid, with_lists)().float() - want).abs() * valid_rows).amax())
        print(f"L={L} left-padded engine ({'lists' if with_lists else 'dense'}) vs per-row cuDNN: max|diff| "
              f"{err:.2e}", flush=True)
        if not err < 3e-2:
            raise AssertionError(f"padded engine output differs from per-row cuDNN: {err}")
    rows = []
    for name, fn in (("engine dense, unpadded", engine(None, False)),
                     ("engine dense, left-padded", engine(key_valid, False)),
                     ("engine full lists, unpadded", engine(None, True)),
                     ("engine full lists, left-padded", engine(key_valid, True)),
                     ("per-row cuDNN causal, left-padded", per_row_cudnn)):
        rows.append({"L": L, "B": B, "pad": pad, "variant": name, "ms": do_bench(fn, rep_ms)})
        print(f"L={L} B={B} pad={pad:.0%} {name:36s} {rows[-1]['ms']:8.3f} ms", flush=True)
    return rows


def gqa_benchmark(L: int = 32768, densities: tuple[float, ...] = (1.0, 0.3, 0.1), heads: int = 32,
                  kv_heads: int = 8, head_dim: int = 128, rep_ms: float = 200.0, seed: int = 0,
                  q_len: int | None = None) -> list[dict]:
    """Per-head lists against per-KV-head lists at the same causal block density, the latter with one program
    per query head and with GQA_PACK (one program per KV head's group: K/V loaded once per group); the
    packed output is checked against the unpacked one. B=1, bf16. q_len < L: a chunked-prefill step (the
    last q_len queries over L keys). Times in ms."""
    q_len = L if q_len is None else q_len
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, heads, q_len, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, kv_heads, L, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn_like(k)
    n, nq = math.ceil(L / BLOCK), math.ceil(q_len / BLOCK)
    rows = []
    for density in densities:
        per_head = lists_full_width(random_causal_block_mask(1, heads, n, density, g, "cuda")[:, :, n - nq:])
        per_kv = lists_full_width(random_causal_block_mask(1, kv_heads, n, density, g, "cuda")[:, :, n - nq:])

        def run(lists, pack):
            return lambda: block_sparse_attention(q, k, v, *lists, block_size=BLOCK, q_offset=L - q_len,
                                                  validate=False, config={"GQA_PACK": pack})
        err = float((run(per_kv, True)().float() - run(per_kv, False)().float()).abs().max())
        if not err < 2e-2:
            raise AssertionError(f"GQA_PACK output differs from per-head programs: {err}")
        for name, lists, pack in (("per-head lists", per_head, False), ("per-KV-head lists", per_kv, False),
                                  ("per-KV-head lists, GQA_PACK", per_kv, True)):
            rows.append({"L": L, "q_len": q_len, "density": density, "variant": name,
                         "ms": do_bench(run(lists, pack), rep_ms)})
            print(f"L={L} q_len={q_len} density={density:.2f} {name:30s} {rows[-1]['ms']:8.3f} ms (packed vs "
                  f"unpacked max|diff| {err:.1e})", flush=True)
    return rows


def _bench_length(L, densities, H, Hkv, D, dtype, rep_ms, with_flex, with_sdpa, config, alt_config, flex,
                  BlockMask, SDPBackend, sdpa_kernel, g) -> list[dict]:
    """All rows of one sequence length (SDPA rows are density-independent and timed once)."""
    dev, B = "cuda", 1
    q = torch.randn(B, H, L, D, device=dev, dtype=dtype, generator=g)
    k = torch.randn(B, Hkv, L, D, device=dev, dtype=dtype, generator=g)
    v = torch.randn(B, Hkv, L, D, device=dev, dtype=dtype, generator=g)
    n = math.ceil(L / BLOCK)
    dense_pairs = B * H * L * (L + 1) / 2
    dense_times = {}
    if with_sdpa:  # SDPA gets K/V expanded to H heads (what repeat_kv feeds it in HF models)
        kx, vx = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
        for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION),
                              ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
            def run_sdpa(backend=backend):
                with sdpa_kernel(backend):
                    return torch.nn.functional.scaled_dot_product_attention(q, kx, vx, is_causal=True)
            try:
                dense_times[name] = do_bench(run_sdpa, rep_ms)
            except Exception as e:  # a backend may be unavailable
                print(f"L={L} {name} failed: {type(e).__name__}: {e}", flush=True)
                dense_times[name] = float("nan")
        del kx, vx
    rows = []
    for dens in densities:
        mask = random_causal_block_mask(B, H, n, dens, g, dev)
        num, idx = lists_full_width(mask)
        actual = mask.sum().item() / (B * H * n * (n + 1) / 2)
        tflop = 4 * D * visible_pairs(mask, BLOCK) / 1e12
        row = {"L": L, "density_target": dens, "density": actual, "tflop": tflop,
               "dense_tflop": 4 * D * dense_pairs / 1e12, **dense_times}

        def run_ours(num=num, idx=idx):
            return block_sparse_attention(q, k, v, num, idx, block_size=BLOCK, causal=True,
                                          validate=False, config=config)
        row["ours"] = do_bench(run_ours, rep_ms)
        row["ours_graph"] = graph_ms(run_ours, rep_ms)
        if alt_config is not None:  # a second kernel config on the same inputs (version comparison)
            def run_alt(num=num, idx=idx):
                return block_sparse_attention(q, k, v, num, idx, block_size=BLOCK, validate=False,
                                              config=alt_config)
            row["ours_alt"] = do_bench(run_alt, rep_ms)
            if L <= 32768:
                row["ours_vs_alt_rel_err"] = ((run_ours().float() - run_alt().float()).norm()
                                              / run_alt().float().norm()).item()
        if with_flex:
            diag = torch.eye(n, dtype=torch.bool, device=dev).expand_as(mask)
            f_num, f_idx = lists_full_width(mask & ~diag)
            p_num = torch.ones(B, H, n, dtype=torch.int32, device=dev)
            p_idx = torch.arange(n, dtype=torch.int32, device=dev)[:, None].expand(B, H, n, n).contiguous()
            bm = BlockMask.from_kv_blocks(p_num, p_idx, f_num, f_idx, BLOCK_SIZE=BLOCK,
                                          mask_mod=causal_mod, seq_lengths=(L, L), compute_q_blocks=False)

            def run_flex(bm=bm):
                return flex(q, k, v, block_mask=bm, enable_gqa=True)
            try:
                row["flex"] = do_bench(run_flex, rep_ms)
                row["flex_graph"] = graph_ms(run_flex, rep_ms)
                if L <= 32768:  # same mask, same function: outputs must agree
                    o1, o2 = run_ours().float(), run_flex().float()
                    row["ours_vs_flex_rel_err"] = ((o1 - o2).norm() / o2.norm()).item()
            except Exception as e:
                print(f"L={L} flex failed: {type(e).__name__}: {e}", flush=True)
                row["flex"] = float("nan")
            del bm, f_num, f_idx, p_num, p_idx
        row["ours_tflops"] = tflop / (row["ours"] / 1e3)
        if "flex" in row:
            row["flex_tflops"] = tflop / (row["flex"] / 1e3)
        rows.append(row)
        print(_fmt_row(row), flush=True)
    return rows


def _fmt_row(r: dict) -> str:
    def ms(x):
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"
    ratio_f = r["ours"] / r["flex"] if r.get("flex") else float("nan")
    ratio_c = r["ours"] / r["sdpa_cudnn"] if r.get("sdpa_cudnn") else float("nan")
    flex_tflops = r.get("flex_tflops", float("nan"))
    alt = f" | {ms(r['ours_alt'])}" if "ours_alt" in r else ""
    graphs = ""
    if "ours_graph" in r:
        ratio_g = r["ours_graph"] / r["flex_graph"] if r.get("flex_graph") else float("nan")
        graphs = f" | {ms(r['ours_graph'])} | {ms(r.get('flex_graph'))} | {ratio_g:.2f}"
    return (f"| {r['L'] // 1024}K | {100 * r['density_target']:.0f}% ({100 * r['density']:.1f}%) | "
            f"{ms(r['ours'])} | {ms(r.get('flex'))} | {ms(r.get('sdpa_flash'))} | "
            f"{ms(r.get('sdpa_cudnn'))} | {ratio_f:.2f} | {ratio_c:.2f} | {r['ours_tflops']:.0f} | "
            f"{flex_tflops:.0f}{graphs}{alt} |")


def markdown_table(result: dict) -> str:
    env = result["env"]
    head = (f"GPU {env['gpu']}, torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
            f"cuDNN {env['cudnn']}, {env['date']}\n\nCommand: `{env['command']}`\n\n"
            f"Kernel config: `{result['config']}`\n\n"
            "| L | density target (actual) | ours ms | Flex ms | SDPA flash ms | SDPA cuDNN ms | ours/Flex | "
            "ours/cuDNN | ours TFLOP/s | Flex TFLOP/s |")
    cols = 10
    if any("ours_graph" in r for r in result["rows"]):  # CUDA-graph replays: no host launch overhead
        head += " ours graph ms | Flex graph ms | graph ours/Flex |"
        cols += 3
    if result.get("alt_config"):
        head = head.replace("Kernel config:", f"Alt config (last column): `{result['alt_config']}`; kernel config:")
        head += " ours (alt config) ms |"
        cols += 1
    head += "\n|" + "---|" * cols + "\n"
    return head + "\n".join(_fmt_row(r) for r in result["rows"]) + "\n"


def sweep_configs(L: int = 32768, densities=(1.0, 0.1), rep_ms: float = 100.0) -> list[dict]:
    """Time our kernel under several tile configs (B=1, H=32, Hkv=8, D=128, bf16, causal)."""
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(1)
    B, H, Hkv, D = 1, 32, 8, 128
    q = torch.randn(B, H, L, D, device=dev, dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, Hkv, L, D, device=dev, dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, Hkv, L, D, device=dev, dtype=torch.bfloat16, generator=g)
    n = L // BLOCK
    configs = [
        {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3, "USE_TMA": True},
        {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3, "USE_TMA": False},
        {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2, "USE_TMA": True},
        {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2, "USE_TMA": True},
        {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 4, "USE_TMA": True},
    ]
    out = []
    for dens in densities:
        mask = random_causal_block_mask(B, H, n, dens, g, dev)
        num, idx = lists_full_width(mask)
        tflop = 4 * D * visible_pairs(mask, BLOCK) / 1e12
        for cfg in configs:
            def run(cfg=cfg, num=num, idx=idx):
                return block_sparse_attention(q, k, v, num, idx, validate=False, config=cfg)
            try:
                t = do_bench(run, rep_ms)
            except Exception as e:
                print(f"sweep {cfg} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                t = float("nan")
            out.append({"L": L, "density": dens, **cfg, "ms": t, "tflops": tflop / (t / 1e3)})
            print(f"sweep L={L} dens={dens} {cfg} {t:.3f} ms {tflop / (t / 1e3):.0f} TFLOP/s", flush=True)
        # dense engine (no lists) at 100%
        if dens == 1.0:
            for cfg in configs[:2]:
                def run_dense(cfg=cfg):
                    return block_sparse_attention(q, k, v, validate=False, config=cfg)
                t = do_bench(run_dense, rep_ms)
                print(f"sweep L={L} dense-engine {cfg} {t:.3f} ms {tflop / (t / 1e3):.0f} TFLOP/s",
                      flush=True)
                out.append({"L": L, "density": "dense-engine", **cfg, "ms": t})
    return out


def dense_sweep(L: int, rep_ms: float = 100.0, head_dim: int = 128) -> list[dict]:
    """The dense causal engine (no lists) under a few tile configs beside SDPA cuDNN and flash on the same
    inputs (B=1, H=32, Hkv=8, bf16); output checked against cuDNN. TFLOP/s = 4 * H * D * L(L+1)/2 / time.
    (The v6 variants, a loop without mask code for the unmasked chunks and Triton's automatic warp
    specialisation, were timed with it and removed: KERNEL_NOTES.md.)"""
    g = torch.Generator(device="cuda").manual_seed(2)
    H, Hkv, D = 32, 8, head_dim
    q = torch.randn(1, H, L, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, Hkv, L, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn_like(k)
    ke, ve = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
    flop = 4 * H * D * L * (L + 1) / 2
    rows = []

    def sdpa(backend):
        def fn():
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, ke, ve, is_causal=True)
        return fn
    ref = sdpa(SDPBackend.CUDNN_ATTENTION)()
    for name, fn in (("SDPA cuDNN", sdpa(SDPBackend.CUDNN_ATTENTION)),
                     ("SDPA flash", sdpa(SDPBackend.FLASH_ATTENTION))):
        t = do_bench(fn, rep_ms)
        rows.append({"L": L, "variant": name, "ms": t, "tflops": flop / t / 1e9})
    cudnn = rows[0]["ms"]
    base = default_config(D, BLOCK, "cuda", torch.cuda.get_device_capability()[0])
    variants = [("default", {})] + [(str(tiles), tiles) for tiles in (
        {"BLOCK_N": 128, "num_stages": 2}, {"num_stages": 4}, {"num_stages": 2}, {"BLOCK_M": 64, "num_warps": 4},
        {"BLOCK_M": 64, "num_warps": 4, "num_stages": 4}, {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4,
                                                           "num_stages": 2})]
    for name, over in variants:
        cfg = {**base, **over}

        def run(cfg=cfg):
            return block_sparse_attention(q, k, v, validate=False, config=cfg)
        try:
            err = float((run().float() - ref.float()).abs().max())
            t = do_bench(run, rep_ms)
        except Exception as e:  # a variant the compiler rejects is a result too
            print(f"dense L={L} {name}: {type(e).__name__}: {str(e)[:160]}", flush=True)
            rows.append({"L": L, "variant": name, "error": f"{type(e).__name__}: {str(e)[:160]}"})
            continue
        rows.append({"L": L, "variant": name, "config": cfg, "ms": t, "tflops": flop / t / 1e9,
                     "vs_cudnn": t / cudnn, "max_abs_diff": err})
    for r in rows:
        if "ms" in r:
            print(f"dense L={L} {r['variant']:60s} {r['ms']:9.3f} ms {r['tflops']:5.0f} TFLOP/s "
                  f"{r.get('vs_cudnn', float('nan')):.3f}x cuDNN  diff {r.get('max_abs_diff', 0):.1e}", flush=True)
    return rows
