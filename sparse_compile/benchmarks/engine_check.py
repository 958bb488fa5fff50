"""GPU check of the block-sparse engine for every head_dim, plus a timing table against dense SDPA (CUDA only).

Accuracy: `block_sparse_attention` (default launch config) against the float32 reference
(`block_sparse_attention_reference` on float32 copies of the inputs) for D in {64, 80, 96, 128, 192, 256}
x GQA group {1, 4, 8} (H = 8) x bf16/fp16 x {causal, window, left padding, q_len < kv_len}, a few thousand
tokens; outputs are poisoned with NaN first. Pass: no NaN and |ours - ref| <= tol * (1 + |ref|) everywhere
(tol 2e-2 bf16, 3e-3 fp16). Non-finite contract on the GPU: NaN/inf planted in q/K/V, the NaN pattern and
the finite values must match the reference. Launch configs: the chosen tiles, the shared-memory estimate
and what Triton compiled (shared bytes, registers, spills).

Timing: B=1, H=32, Hkv=8, bf16, causal, D in {128, 256}, L in {8K, 32K}: ours (non-finite handling on and
off: its cost), SDPA flash and SDPA cuDNN (K/V expanded to 32 heads outside the timing), medians of
`triton.testing.do_bench`. TFLOP/s = 4 * B * H * D * L * (L + 1) / 2 / time (the causal query-key pairs,
one multiply-add each in QK^T and in PV).

    python -m sparse_compile.benchmarks.engine_check                  # accuracy, configs, timing
    python -m sparse_compile.benchmarks.engine_check --sweep          # + tile sweep for BLOCK_D = 256 at 8K
    python -m sparse_compile.benchmarks.engine_check --json out.json  # raw results
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import importlib
import json
import math
import sys

import torch

from sparse_compile.kernels.block_sparse_attention import (
    block_sparse_attention,
    block_sparse_attention_reference,
    default_config,
    max_shared_mem,
    shared_mem_estimate,
)

_bsa = importlib.import_module("sparse_compile.kernels.block_sparse_attention")

HEAD_DIMS = (64, 80, 96, 128, 192, 256)
GROUPS = (1, 4, 8)
TOL = {torch.bfloat16: 2e-2, torch.float16: 3e-3}
CASES = {  # name: (B, Lq, Lk, window, left padding per batch row)
    "causal": (1, 3000, 3000, 0, None),
    "window": (1, 3000, 3000, 700, None),
    "left-pad": (2, 2500, 2500, 0, (0, 700)),
    "q<kv": (1, 800, 3000, 0, None),
}


def _env() -> dict:
    import triton

    props = torch.cuda.get_device_properties(0)
    return {"gpu": props.name, "sms": props.multi_processor_count, "max_shared_mem": max_shared_mem(0),
            "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python -m sparse_compile.benchmarks.engine_check " + " ".join(sys.argv[1:])}


def _kernel_cache() -> dict:
    return _bsa._block_sparse_attn_fwd.device_caches[torch.cuda.current_device()][0]


def _compiled_since(before: set) -> list:
    """Compiled main kernels that appeared in the jit cache since `before` (its keys)."""
    return [kern for key, kern in _kernel_cache().items() if key not in before]


def _inputs(B, H, Hkv, Lq, Lk, D, dtype, g, left_pad=None):
    dev = "cuda"
    q = torch.randn(B, H, Lq, D, device=dev, dtype=dtype, generator=g)
    k = torch.randn(B, Hkv, Lk, D, device=dev, dtype=dtype, generator=g)
    v = torch.randn(B, Hkv, Lk, D, device=dev, dtype=dtype, generator=g)
    key_valid = None
    if left_pad is not None:
        key_valid = torch.arange(Lk, device=dev)[None, :] >= torch.tensor(left_pad, device=dev)[:, None]
    return q, k, v, key_valid


def check_accuracy(head_dims=HEAD_DIMS, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Every (D, dtype, GQA group, case): max abs error against the float32 reference. Also returns, per
    (D, dtype), the launch config, its shared-memory estimate and the compiled kernels' resources."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    H, smem = 8, max_shared_mem(torch.cuda.current_device())
    rows, configs = [], []
    for D in head_dims:
        for dtype in (torch.bfloat16, torch.float16):
            cfg = default_config(D, 128, "cuda", torch.cuda.get_device_capability()[0], dtype=dtype,
                                 max_shared=smem)
            block_d = max(16, 1 << (D - 1).bit_length())
            before = set(_kernel_cache())
            for group in GROUPS:
                for case, (B, Lq, Lk, window, left_pad) in CASES.items():
                    q, k, v, key_valid = _inputs(B, H, H // group, Lq, Lk, D, dtype, g, left_pad)
                    out = torch.full_like(q, float("nan"))
                    block_sparse_attention(q, k, v, window=window, key_valid=key_valid, out=out)
                    ref = block_sparse_attention_reference(q.float(), k.float(), v.float(), window=window,
                                                           key_valid=key_valid)
                    err = (out.float() - ref).abs()
                    tol = TOL[dtype]
                    ok = bool(not out.isnan().any() and (err <= tol * (1 + ref.abs())).all())
                    row = {"D": D, "dtype": str(dtype)[6:], "group": group, "case": case,
                           "max_abs_err": err.max().item(),
                           "max_abs_ref": ref.abs().max().item(),
                           "rel_err": ((out.float() - ref).norm() / ref.norm()).item(), "ok": ok}
                    rows.append(row)
                    print(f"acc D={D:<3} {row['dtype']:<8} gqa={group} {case:<8} max_abs_err={row['max_abs_err']:.2e} "
                          f"rel={row['rel_err']:.2e} {'OK' if ok else 'FAIL'}", flush=True)
            kernels = _compiled_since(before)
            elem = torch.empty((), dtype=dtype).element_size()
            configs.append({"D": D, "dtype": str(dtype)[6:], **{k_: cfg[k_] for k_ in
                                                                 ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")},
                            "estimate": shared_mem_estimate(cfg["BLOCK_M"], cfg["BLOCK_N"], block_d,
                                                            cfg["num_stages"], elem),
                            "compiled_shared": sorted({kern.metadata.shared for kern in kernels}),
                            "regs": sorted({getattr(kern, "n_regs", -1) for kern in kernels}),
                            "spills": sorted({getattr(kern, "n_spills", -1) for kern in kernels}), "limit": smem})
            print(f"cfg {configs[-1]}", flush=True)
    return rows, configs


def check_nonfinite(seed: int = 1) -> list[dict]:
    """NaN/inf planted in q, K, V (visible and invisible to various rows); ours vs the reference: same NaN
    rows, same finite values. Default config and the TMA variant (D = 128, 256)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    rows = []
    for D, case, tma in ((128, "causal", False), (128, "causal", True), (128, "left-pad", False),
                         (256, "causal", False), (256, "left-pad", False), (256, "window", True), (80, "q<kv", False)):
        B, Lq, Lk, window, left_pad = CASES[case]
        q, k, v, key_valid = _inputs(B, 8, 2, Lq, Lk, D, torch.bfloat16, g, left_pad)
        vals = torch.tensor([float("nan"), float("inf"), -float("inf")], device="cuda", dtype=q.dtype)
        for t, n, lo, hi in ((k, 20, Lk - Lk // 10, Lk), (v, 20, Lk - Lk // 10, Lk), (q, 30, 0, Lq)):
            # K/V: keys in the last 10 % (future to most rows, visible to the last ones); q: any row
            b, h = (torch.randint(0, s_, (n,), device="cuda", generator=g) for s_ in t.shape[:2])
            j = torch.randint(lo, hi, (n,), device="cuda", generator=g)
            t[b, h, j, torch.randint(0, D, (n,), device="cuda", generator=g)] = vals[j % 3]
        if key_valid is not None:  # and padded keys, never visible
            k[1, :, : left_pad[1] : 7, 0] = float("nan")
            v[1, :, 3 : left_pad[1] : 11, 1] = float("inf")
        out = torch.full_like(q, 7.0)
        block_sparse_attention(q, k, v, window=window, key_valid=key_valid, out=out, config={"USE_TMA": tma})
        ref = block_sparse_attention_reference(q.float(), k.float(), v.float(), window=window, key_valid=key_valid)
        same_nan = torch.equal(out.isnan(), ref.isnan())
        fin = ~ref.isnan()
        err = (out.float()[fin] - ref[fin]).abs()
        ok = same_nan and bool((err <= TOL[torch.bfloat16] * (1 + ref[fin].abs())).all())
        row = {"D": D, "case": case, "tma": tma, "nan_rows": int(ref.isnan().all(-1).sum()),
               "rows": ref.shape[0] * ref.shape[1] * ref.shape[2], "same_nan": same_nan,
               "max_abs_err_finite": err.max().item() if err.numel() else 0.0, "ok": ok}
        rows.append(row)
        print(f"nonfinite {row}", flush=True)
    return rows


def _bench(fn, rep_ms: float) -> float:
    import triton

    return float(triton.testing.do_bench(fn, warmup=max(10.0, rep_ms / 4), rep=rep_ms, return_mode="median"))


def _causal_tflop(B, H, D, L) -> float:
    return 4 * B * H * D * L * (L + 1) / 2 / 1e12


def _time_one(D: int, L: int, rep_ms: float, g: torch.Generator) -> dict:
    """One timing row (see time_engine)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, H, Hkv = 1, 32, 8
    q, k, v, _ = _inputs(B, H, Hkv, L, L, D, torch.bfloat16, g)
    all_valid = torch.ones(B, L, dtype=torch.bool, device="cuda")
    kx, vx = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
    off = {"NONFINITE": False}

    def sdpa(backend):
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, kx, vx, is_causal=True)

    variants = {
        "ours": lambda: block_sparse_attention(q, k, v, validate=False),
        "ours_no_nonfinite": lambda: block_sparse_attention(q, k, v, validate=False, config=off),
        "ours_key_valid": lambda: block_sparse_attention(q, k, v, key_valid=all_valid, validate=False),
        "ours_key_valid_no_nonfinite": lambda: block_sparse_attention(q, k, v, key_valid=all_valid, validate=False,
                                                                      config=off),
        "prepass": lambda: _bsa.nonfinite_keys(k, v),
        "sdpa_flash": lambda: sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa_cudnn": lambda: sdpa(SDPBackend.CUDNN_ATTENTION),
    }
    row = {"D": D, "L": L, "tflop": _causal_tflop(B, H, D, L)}
    # ours: on, off, on, off (the spread between the two timings of one variant is the noise)
    order = ["ours", "ours_no_nonfinite", "ours_key_valid", "ours_key_valid_no_nonfinite"] * 2
    for name in order + ["prepass", "sdpa_flash", "sdpa_cudnn"]:
        try:
            row.setdefault(name + "_runs", []).append(_bench(variants[name], rep_ms))
        except Exception as e:  # a backend may not take this head_dim
            print(f"time D={D} L={L} {name} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
            row[name + "_runs"].append(float("nan"))
    for name in variants:
        runs = row[name + "_runs"]
        row[name] = sum(runs) / len(runs)
    if L <= 8192:  # the timed function is the right one
        ref = (variants["sdpa_flash"]() if not math.isnan(row["sdpa_flash"]) else variants["sdpa_cudnn"]()).float()
        row["ours_vs_sdpa_rel_err"] = ((variants["ours"]().float() - ref).norm() / ref.norm()).item()
        # finite inputs take the plain loop: bit-identical to the kernel without the non-finite handling
        row["on_off_bitwise_equal"] = torch.equal(variants["ours"](), variants["ours_no_nonfinite"]())
    print(f"time {row}", flush=True)
    return row


def time_engine(head_dims=(128, 256), lengths=(8192, 32768), rep_ms: float = 200.0, seed: int = 2) -> list[dict]:
    """ms and TFLOP/s: ours (non-finite handling on / off, and with an all-True key_valid, the always-masked
    path), the non-finite pre-pass alone, SDPA flash, SDPA cuDNN. B=1, H=32, Hkv=8, bf16, causal."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    rows = []
    for D in head_dims:
        for L in lengths:
            rows.append(_time_one(D, L, rep_ms, g))
            torch.cuda.empty_cache()
    return rows


def sweep_d256(head_dims=(256, 192), L: int = 8192, rep_ms: float = 100.0, seed: int = 3) -> list[dict]:
    """Tile candidates for BLOCK_D = 256 (bf16, causal, B=1, H=32, Hkv=8): ms, TFLOP/s, compiled resources."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    cands = [(128, 64, 8, 2), (128, 32, 8, 3), (128, 32, 8, 2), (64, 64, 4, 2), (64, 32, 4, 3), (64, 64, 8, 2),
             (128, 64, 8, 1)]
    rows = []
    for D in head_dims:
        q, k, v, _ = _inputs(1, 32, 8, L, L, D, torch.bfloat16, g)
        for bm, bn, warps, stages in cands:
            cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}
            before = set(_kernel_cache())
            try:
                t = _bench(functools.partial(block_sparse_attention, q, k, v, validate=False, config=cfg), rep_ms)
            except Exception as e:
                print(f"sweep D={D} {cfg} failed: {type(e).__name__}: {str(e)[:160]}", flush=True)
                t = float("nan")
            kern = _compiled_since(before)
            row = {"D": D, "L": L, **cfg, "ms": t, "tflops": _causal_tflop(1, 32, D, L) / (t / 1e3),
                   "estimate": shared_mem_estimate(bm, bn, 256, stages, 2),
                   "compiled_shared": [x.metadata.shared for x in kern],
                   "regs": [getattr(x, "n_regs", None) for x in kern],
                   "spills": [getattr(x, "n_spills", None) for x in kern]}
            print(f"sweep {row}", flush=True)
            rows.append(row)
        del q, k, v
    return rows


def _noise(r: dict) -> float:
    """Largest relative spread (%) between the two timings of one of our variants."""
    names = ("ours", "ours_no_nonfinite", "ours_key_valid", "ours_key_valid_no_nonfinite")
    return max(100 * abs(r[n + "_runs"][0] - r[n + "_runs"][1]) / r[n] for n in names)


def _markdown(res: dict) -> str:
    env = res["env"]
    lines = [f"GPU {env['gpu']} ({env['max_shared_mem']} B shared memory per program), torch {env['torch']}, "
             f"triton {env['triton']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, {env['date']}",
             f"Command: `{env['command']}`", ""]
    if res.get("accuracy"):
        lines += ["Max abs error vs the float32 reference (worst over GQA groups 1/4/8); PASS: every group and "
                  "case within tolerance", "", "| D | dtype | causal | window | left-pad | q<kv | pass |",
                  "|---|---|---|---|---|---|---|"]
        for D in sorted({r["D"] for r in res["accuracy"]}):
            for dt in ("bfloat16", "float16"):
                sel = [r for r in res["accuracy"] if r["D"] == D and r["dtype"] == dt]
                cells = [f"{max(r['max_abs_err'] for r in sel if r['case'] == c):.1e}" for c in CASES]
                verdict = "PASS" if all(r["ok"] for r in sel) else "FAIL"
                lines.append(f"| {D} | {dt} | " + " | ".join(cells) + f" | {verdict} |")
        lines += ["", "| D | dtype | BLOCK_M x BLOCK_N, warps, stages | estimate B | compiled shared B | regs "
                  "| spills |",
                  "|---|---|---|---|---|---|---|"]
        for c in res["configs"]:
            lines.append(f"| {c['D']} | {c['dtype']} | {c['BLOCK_M']}x{c['BLOCK_N']}, {c['num_warps']}, "
                         f"{c['num_stages']} | "
                         f"{c['estimate']} | {c['compiled_shared']} | {c['regs']} | {c['spills']} |")
    if res.get("nonfinite"):
        lines += ["", "| non-finite: D | case | TMA | NaN rows / rows | same NaN rows as reference "
                  "| max err (finite) | ok |",
                  "|---|---|---|---|---|---|---|"]
        for r in res["nonfinite"]:
            lines.append(f"| {r['D']} | {r['case']} | {r['tma']} | {r['nan_rows']}/{r['rows']} | {r['same_nan']} | "
                         f"{r['max_abs_err_finite']:.1e} | {r['ok']} |")
    if res.get("timing"):
        lines += ["", "TFLOP/s = 4 * B * H * D * L * (L + 1) / 2 / time (B=1, H=32, Hkv=8, bf16, causal)", "",
                  "ours: mean of two timings, interleaved on/off; noise = the larger spread of two timings of one "
                  "variant", "",
                  "| D | L | ours ms (TFLOP/s) | ours, non-finite off | cost | ours key_valid | key_valid, off | cost "
                  "| noise | pre-pass ms | SDPA flash ms (TFLOP/s) | SDPA cuDNN ms (TFLOP/s) | ours/cuDNN |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["timing"]:
            def c(name, r=r):
                t = r[name]
                return "n/a" if math.isnan(t) else f"{t:.3f} ({r['tflop'] / (t / 1e3):.0f})"
            lines.append(
                f"| {r['D']} | {r['L'] // 1024}K | {c('ours')} | {c('ours_no_nonfinite')} | "
                f"{100 * (r['ours'] / r['ours_no_nonfinite'] - 1):+.1f}% | {c('ours_key_valid')} | "
                f"{c('ours_key_valid_no_nonfinite')} | "
                f"{100 * (r['ours_key_valid'] / r['ours_key_valid_no_nonfinite'] - 1):+.1f}% | {_noise(r):.1f}% | "
                f"{r['prepass']:.3f} | "
                f"{c('sdpa_flash')} | {c('sdpa_cudnn')} | {r['ours'] / r['sdpa_cudnn']:.2f} |")
    if res.get("sweep"):
        lines += ["", "| sweep D | L | BLOCK_M x BLOCK_N, warps, stages | ms | TFLOP/s | estimate B | compiled B "
                  "| regs | spills |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in res["sweep"]:
            lines.append(f"| {r['D']} | {r['L'] // 1024}K | {r['BLOCK_M']}x{r['BLOCK_N']}, {r['num_warps']}, "
                         f"{r['num_stages']} | {r['ms']:.3f} | {r['tflops']:.0f} | {r['estimate']} | "
                         f"{r['compiled_shared']} | {r['regs']} | {r['spills']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-accuracy", action="store_true", help="skip the accuracy and config tables")
    ap.add_argument("--no-nonfinite", action="store_true", help="skip the non-finite contract check")
    ap.add_argument("--no-timing", action="store_true", help="skip the timing table")
    ap.add_argument("--sweep", action="store_true", help="also sweep tile configs for BLOCK_D = 256 at 8K")
    ap.add_argument("--head-dims", type=int, nargs="+", default=list(HEAD_DIMS), help="head dims of the accuracy table")
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768], help="timing lengths")
    ap.add_argument("--rep-ms", type=float, default=200.0, help="do_bench rep time per timed function (ms)")
    ap.add_argument("--json", default=None, help="write the raw results here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("engine_check needs CUDA", file=sys.stderr)
        return 2
    res = {"env": _env()}
    print(res["env"], flush=True)
    sections = [("accuracy", not args.no_accuracy, lambda: check_accuracy(tuple(args.head_dims))),
                ("nonfinite", not args.no_nonfinite, check_nonfinite),
                ("sweep", args.sweep, sweep_d256),
                ("timing", not args.no_timing, lambda: time_engine(lengths=tuple(args.lengths), rep_ms=args.rep_ms))]
    failed = []
    for name, wanted, run in sections:
        if not wanted:
            continue
        try:  # one section's crash must not lose the others' tables
            got = run()
        except Exception as e:
            print(f"section {name} crashed: {type(e).__name__}: {e}", flush=True)
            failed.append(name)
            continue
        if name == "accuracy":
            res["accuracy"], res["configs"] = got
        else:
            res[name] = got
    print(_markdown(res), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    bad = [r for r in res.get("accuracy", []) + res.get("nonfinite", []) if not r["ok"]]
    return 1 if bad or failed else 0


if __name__ == "__main__":
    sys.exit(main())
