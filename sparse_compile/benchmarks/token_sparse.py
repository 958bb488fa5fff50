"""Token Sparse Attention on the GPU: stage times, end to end, stacked, and a correctness check (CUDA only).

For each length: dense SDPA (flash, cuDNN; K/V expanded to H heads as repeat_kv feeds it), then
token_sparse at each dropped_mass with its stages timed apart (select = scoring + smoothing + coverage
+ index building with its one host sync; gather; attend on the compressed sequence; scatter) and end to
end, the torch-op gather/scatter references beside the fused kernels, and the block methods alone vs
stacked under token_sparse (`inner`). Inputs: `structured_qkv` of the methods benchmark (sinks, a local
window, vertical keys after RoPE), B=1. Medians of `triton.testing.do_bench`.

Correctness (lengths <= 32K): the end-to-end output against float32 attention computed from the same
selection with torch ops (gather by torch.gather in fp32, memory-efficient SDPA in fp32, scatter by
torch.gather), and the Triton scores against the PyTorch scores.

    python -m sparse_compile.benchmarks.token_sparse --out /tmp/ts        # 8K, 32K, 128K
    python -m sparse_compile.benchmarks.token_sparse --out /tmp/ts --lengths 32768,131072 --taus '' \
        --fixed-kept 0.5,0.3 --inners prism                                # fixed kept fractions
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch

from sparse_compile.attention_mask import AttentionMask, SiteFacts
from sparse_compile.benchmarks.methods import environment, rel_err, structured_qkv, time_ms
from sparse_compile.kernels.token_sparse import gather_qkv, gather_qkv_reference, scatter_rows, scatter_rows_reference
from sparse_compile.methods import METHODS
from sparse_compile.methods import token_sparse as ts


def check_selection_path(q, k, v, mask, site, params, scale, out) -> dict:
    """rel_err of `out` vs fp32 attention over the same kept tokens, and of the Triton vs torch scores."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from sparse_compile.kernels.token_sparse import token_scores

    sel = ts.token_select(q, k, v, mask, site, params, scale)
    qc, kc, vc = gather_qkv_reference(q.float(), k.float(), v.float(), sel.idx)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        oc = torch.nn.functional.scaled_dot_product_attention(qc, kc, vc, is_causal=True, scale=scale)
    ref = scatter_rows_reference(oc, sel.inv)
    tri = token_scores(q, k, key_valid=None, scale=scale, recent=params.recent, impl="triton")
    torch_scores = token_scores(q, k, key_valid=None, scale=scale, recent=params.recent, impl="reference")
    return {"rel_err_vs_fp32": rel_err(out, ref), "scores_rel_err": rel_err(tri, torch_scores),
            "dropped_rows_zero": bool((out[~sel.keep_mask()] == 0).all())}


def bench_length(L: int, taus: tuple[float, ...], inners: tuple[str, ...], *, heads: int, kv_heads: int,
                 head_dim: int, rep_ms: float, generator: torch.Generator, check: bool,
                 fixed_kept: tuple[float, ...] = ()) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, H, Hkv, D = 1, heads, kv_heads, head_dim
    q, k, v = structured_qkv(B, H, Hkv, L, L, D, dtype=torch.bfloat16, device="cuda", generator=generator)
    mask = AttentionMask(causal=True)
    site = SiteFacts(layer=0, rope="rotate_half", rotary_dim=D, head_dim=D, num_heads=H, num_kv_heads=Hkv)
    scale = 1.0 / math.sqrt(D)
    rows: list[dict] = []

    def row(impl: str, fn, **extra) -> dict:
        r = {"L": L, "impl": impl, **extra}
        try:
            r["ms"] = time_ms(fn, rep_ms, "cuda")
        except Exception as err:  # record and go on (e.g. a backend unavailable for a shape)
            r["ms"], r["error"] = None, f"{type(err).__name__}: {err}"[:300]
        rows.append(r)
        print(json.dumps(r), flush=True)
        return r

    kx, vx = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
    for impl, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
        def sdpa(backend=backend, kx=kx, vx=vx):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, kx, vx, is_causal=True, scale=scale)
        row(impl, sdpa)
    del kx, vx, sdpa

    for tau in taus:
        params = ts.TokenSparseParams(dropped_mass=tau)
        out, density = ts.attention(q, k, v, mask, site, params, scale)
        sel = ts.token_select(q, k, v, mask, site, params, scale)
        kept = float(density[..., 1].mean())
        tag = f"token_sparse tau={tau}"
        extra = {"kept": kept, "Lc": max(sel.kept_host)}
        if check:
            extra.update(check_selection_path(q, k, v, mask, site, params, scale, out))
        row(tag, lambda params=params: ts.attention(q, k, v, mask, site, params, scale), **extra)
        row(f"{tag} :select", lambda params=params: ts.token_select(q, k, v, mask, site, params, scale))
        row(f"{tag} :gather", lambda sel=sel: gather_qkv(q, k, v, sel.idx))
        row(f"{tag} :gather (torch.gather)", lambda sel=sel: gather_qkv(q, k, v, sel.idx, impl="reference"))
        qc, kc, vc = gather_qkv(q, k, v, sel.idx)
        row(f"{tag} :attend", lambda qc=qc, kc=kc, vc=vc, sel=sel, params=params:
            ts.attend_compressed(qc, kc, vc, sel, site, params, scale))
        oc, _ = ts.attend_compressed(qc, kc, vc, sel, site, params, scale)
        row(f"{tag} :scatter", lambda oc=oc, sel=sel: scatter_rows(oc, sel.inv))
        row(f"{tag} :scatter (torch.gather)", lambda oc=oc, sel=sel: scatter_rows(oc, sel.inv, impl="reference"))
        del out, sel, qc, kc, vc, oc
        torch.cuda.empty_cache()

    for frac in fixed_kept:
        # dropped_mass 1.0 drops every prefix token the floor allows: min_keep + recent tokens are kept
        params = ts.TokenSparseParams(dropped_mass=1.0, min_keep=max(0, int(frac * L) - 128))
        sel = ts.token_select(q, k, v, mask, site, params, scale)
        kept = float(sel.kept_fraction().mean())
        row(f"token_sparse kept={frac}", lambda params=params: ts.attention(q, k, v, mask, site, params, scale),
            kept=kept, Lc=max(sel.kept_host))
        qc, kc, vc = gather_qkv(q, k, v, sel.idx)
        row(f"token_sparse kept={frac} :attend", lambda qc=qc, kc=kc, vc=vc, sel=sel, params=params:
            ts.attend_compressed(qc, kc, vc, sel, site, params, scale))
        del sel, qc, kc, vc
        for inner in inners:
            stacked = dataclasses.replace(params, inner=inner, inner_params=METHODS[inner].Params())
            _, d_stacked = ts.attention(q, k, v, mask, site, stacked, scale)
            row(f"token_sparse kept={frac} + {inner}", lambda stacked=stacked: ts.attention(q, k, v, mask, site,
                                                                                            stacked, scale),
                kept=kept, density=float(d_stacked[..., 0].mean()))
        torch.cuda.empty_cache()

    for inner in inners:
        method = METHODS[inner]
        inner_params = method.Params()
        _, d_alone = method.attention(q, k, v, mask, site, inner_params, scale)
        row(inner, lambda method=method, p=inner_params: method.attention(q, k, v, mask, site, p, scale),
            density=float(d_alone.mean()))
        if not taus:
            continue
        params = ts.TokenSparseParams(dropped_mass=taus[0], inner=inner)
        _, d_stacked = ts.attention(q, k, v, mask, site, params, scale)
        kept = float(ts.token_select(q, k, v, mask, site, params, scale).kept_fraction().mean())
        row(f"token_sparse tau={taus[0]} + {inner}", lambda params=params: ts.attention(q, k, v, mask, site, params,
                                                                                           scale),
            kept=kept, density=float(d_stacked[..., 0].mean()))
        torch.cuda.empty_cache()

    ref = {r["impl"]: r["ms"] for r in rows if r.get("ms")}
    dense_flops = 4 * B * H * D * L * (L + 1) / 2
    for r in rows:
        if r.get("ms"):
            r["tflops_dense_eq"] = dense_flops / (r["ms"] / 1e3) / 1e12
            for base in ("sdpa_flash", "sdpa_cudnn"):
                if ref.get(base):
                    r[f"pct_of_{base}"] = 100 * r["ms"] / ref[base]
    return rows


def markdown(result: dict) -> str:
    env, st = result["env"], result["settings"]
    lines = [f"{env.get('gpu')}, torch {env['torch']}, triton {env.get('triton')}, CUDA {env.get('cuda')}, "
             f"cuDNN {env.get('cudnn')}, {env['date']}; B=1, H={st['heads']}, Hkv={st['kv_heads']}, "
             f"D={st['head_dim']}, bf16, structured q/k; min_keep 1024, recent 128, smooth 7", "",
             "| L | impl | ms | % of flash | % of cuDNN | kept | density | Lc | check |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        def f(key, spec, r=r):
            return "–" if r.get(key) is None else format(r[key], spec)
        check = ""
        if "rel_err_vs_fp32" in r:
            check = (f"rel_err vs fp32 {r['rel_err_vs_fp32']:.1e}; scores {r['scores_rel_err']:.1e}; dropped rows "
                     f"zero: {r['dropped_rows_zero']}")
        check = r.get("error", check)
        lines.append(f"| {r['L'] // 1024}K | {r['impl']} | {f('ms', '.3f')} | {f('pct_of_sdpa_flash', '.1f')} | "
                     f"{f('pct_of_sdpa_cudnn', '.1f')} | {f('kept', '.3f')} | {f('density', '.3f')} | {f('Lc', 'd')} | "
                     f"{check} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for token_sparse.json / token_sparse.md")
    ap.add_argument("--lengths", default="8192,32768,131072", help="comma-separated sequence lengths")
    ap.add_argument("--taus", default="0.005,0.05", help="comma-separated dropped_mass values")
    ap.add_argument("--inners", default="prism,pbs", help="block methods timed alone and stacked ('' for none)")
    ap.add_argument("--fixed-kept", default="",
                    help="kept fractions timed at a fixed budget (dropped_mass 1.0, min_keep = fraction * L - 128), "
                         "alone and stacked on each --inners method, e.g. 0.5,0.3,0.1")
    ap.add_argument("--rep-ms", type=float, default=50.0, help="do_bench repetition time per row")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    lengths = tuple(int(x) for x in args.lengths.split(","))
    taus = tuple(float(x) for x in args.taus.split(",") if x)
    fixed = tuple(float(x) for x in args.fixed_kept.split(",") if x)
    inners = tuple(x for x in args.inners.split(",") if x)
    g = torch.Generator(device="cuda").manual_seed(0)
    t0 = time.perf_counter()
    rows: list[dict] = []
    for L in lengths:
        rows += bench_length(L, taus, inners, heads=32, kv_heads=8, head_dim=128, rep_ms=args.rep_ms, generator=g,
                             check=L <= 32768, fixed_kept=fixed)
        torch.cuda.empty_cache()
    result = {"env": environment("cuda"), "settings": {"heads": 32, "kv_heads": 8, "head_dim": 128, "taus": taus,
                                                       "inners": inners, "rep_ms": args.rep_ms},
              "rows": rows, "wall_s": time.perf_counter() - t0}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "token_sparse.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (args.out / "token_sparse.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
