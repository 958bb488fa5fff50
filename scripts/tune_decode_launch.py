"""Sweeps the launch settings of the decode pieces that run once per FASA layer and step, on the GPU: the sparse
decode over 2048 selected tokens per KV head (BLOCK_N, warps, stages, splits) and the set top-k (warps, algorithm)
of the page and final stages. Each setting is checked against the PyTorch reference first, then timed as 20 calls
captured in one CUDA graph (the graph's launch cost divided by 20, as inside a model's decode graph).

    python scripts/tune_decode_launch.py --lengths 131072,32768 --out results/x.json

Prints one table per piece, fastest first; KERNEL_NOTES.md records what was chosen from it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from sparse_compile.benchmarks.timing import environment, graph_ms
from sparse_compile.kernels.sparse_decode import sparse_decode_attention, sparse_decode_reference
from sparse_compile.kernels.topk_select import topk_indices, topk_indices_reference

REPEAT = 20


def per_call_us(fn, rep_ms: float) -> float | str:
    """µs per call of fn, from a CUDA graph holding REPEAT calls (`graph_ms`: the reason as a string when the
    capture fails, e.g. a setting the compiler rejects)."""
    ms = graph_ms(lambda: [fn() for _ in range(REPEAT)], rep_ms)
    return round(1e3 * ms / REPEAT, 2) if isinstance(ms, float) else ms


def sweep_decode(L: int, B: int, rep_ms: float, H: int = 32, Hkv: int = 8, D: int = 128,
                 budget: int = 2048) -> list[dict]:
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(B, H, 1, D, device=dev, dtype=dt, generator=g)
    k = torch.randn(B, Hkv, L, D, device=dev, dtype=dt, generator=g)
    v = torch.randn(B, Hkv, L, D, device=dev, dtype=dt, generator=g)
    idx = torch.rand(B, Hkv, L, device=dev, generator=g).topk(budget, dim=-1).indices.sort(-1).values
    ref = sparse_decode_reference(q, k, v, idx).float()
    rows = [{"piece": "sparse_decode", "setting": "default", "us": per_call_us(
        lambda: sparse_decode_attention(q, k, v, idx), rep_ms)}]
    for block_n, warps, stages, early, splits in itertools.product((32, 64, 128), (2, 4, 8), (1, 2), (0, 1),
                                                                    (8, 16, 32, 64)):
        if budget // splits < block_n:
            continue
        launch = (block_n, warps, stages, early)
        try:
            out = sparse_decode_attention(q, k, v, idx, launch=launch, num_splits=splits)
        except Exception as err:
            rows.append({"piece": "sparse_decode", "setting": f"{launch} s{splits}", "us": f"failed: {err}"[:120]})
            continue
        err = float((out.float() - ref).abs().max())
        if not err < 2e-2:
            rows.append({"piece": "sparse_decode", "setting": f"{launch} s{splits}", "us": f"wrong: max err {err}"})
            continue
        rows.append({"piece": "sparse_decode", "setting": f"bn{block_n} w{warps} st{stages} ev{early} s{splits}",
                     "us": per_call_us(lambda la=launch, s=splits: sparse_decode_attention(
                         q, k, v, idx, launch=la, num_splits=s), rep_ms), "max_err": err})

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    rows.append({"piece": "sparse_decode", "setting": "sdpa_cudnn dense (reference point)",
                 "us": per_call_us(cudnn, rep_ms)})
    for r in rows:
        r.update({"L": L, "B": B})
    return rows


def sweep_topk(B: int, rep_ms: float, Hkv: int = 8) -> list[dict]:
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(1)
    rows = []
    # page stage at 128K, P = 32 (4096 pages) keeping 2x/3x/4x of 2048 tokens; final stage over the candidates;
    # then rows shaped as the 128K generate makes them (KERNEL_NOTES.md "Set top-k v3"): 4101 pages (capacity
    # 131201) of close values with the forced pages at +inf and the unfilled one at -inf, and 6272 candidates
    # (196 pages) with 68 forced keys at +inf and 32 invisible ones at -inf
    cases = [("page", 4096, 128, "randn"), ("page", 4096, 192, "randn"), ("final", 4096, 2048, "randn"),
             ("final", 6144, 2048, "randn"), ("final", 8192, 2048, "randn"),
             ("page", 4101, 196, "model"), ("final", 6272, 2048, "model")]
    for stage, N, k, shape in cases:
        x = torch.randn(B * Hkv, N, device=dev, generator=g)
        if shape == "model" and stage == "page":
            x = 300.0 + 6.0 * x
            x[:, :1], x[:, N - 4:N - 1], x[:, N - 1:] = float("inf"), float("inf"), float("-inf")
        elif shape == "model":
            x = 13.0 * x
            x[:, :68], x[:, N - 32:] = float("inf"), float("-inf")
        want = topk_indices_reference(x, k).sort(-1).values
        stage = stage if shape == "randn" else f"{stage}:model-rows"
        rows.append({"piece": f"topk:{stage}", "setting": f"torch.topk N{N} k{k}",
                     "us": per_call_us(lambda x=x, k=k: torch.topk(x, k, dim=-1, sorted=False).indices, rep_ms)})
        for algorithm, warps in itertools.product(("bisect", "radix"), (4, 8, 16, 32)):
            got = topk_indices(x, k, algorithm=algorithm, num_warps=warps).sort(-1).values
            ok = torch.equal(got, want)
            rows.append({"piece": f"topk:{stage}", "setting": f"{algorithm} w{warps} N{N} k{k}",
                         "us": per_call_us(lambda x=x, k=k, a=algorithm, w=warps: topk_indices(
                             x, k, algorithm=a, num_warps=w), rep_ms) if ok else "wrong set"})
    for r in rows:
        r.update({"B": B, "L": " ".join(r["setting"].split()[-2:])})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="131072,32768")
    parser.add_argument("--batches", default="1")
    parser.add_argument("--rep-ms", type=float, default=30.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    rows: list[dict] = []
    for B in (int(b) for b in args.batches.split(",")):
        for L in (int(n) for n in args.lengths.split(",")):
            rows += sweep_decode(L, B, args.rep_ms)
        rows += sweep_topk(B, args.rep_ms)
    env = environment("cuda")
    print(env)
    pieces = dict.fromkeys((r["piece"], r.get("L"), r["B"]) for r in rows)
    for piece, L, B in pieces:
        sel = [r for r in rows if (r["piece"], r.get("L"), r["B"]) == (piece, L, B)]
        sel.sort(key=lambda r: r["us"] if isinstance(r["us"], float) else 1e9)
        print(f"\n## {piece} L={L} B={B} (us per call, {REPEAT} calls per CUDA graph)")
        for r in sel[:15] + [r for r in sel[15:] if r["setting"].startswith(("default", "torch", "sdpa", "bisect w8"))]:
            print(f"| {r['us']} | {r['setting']} |")
    if args.out:
        args.out.write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
