"""Times each piece of the two-stage decode selection on the GPU, captured in CUDA graphs (as decode runs under
mode="reduce-overhead"), beside cuDNN's dense decode: the numbers KERNEL_NOTES.md compares with its predictions.

    python scripts/profile_decode_selection.py --lengths 32768,131072 --batches 1,4 --out results/x.json

Pieces (FASA generic rule: 64 dims per KV head, budget 2048 tokens, --factors x the budget in candidates, sink 4,
recent 64):
  key_state:torch / key_state:triton    per-key state from the mask (visible_keys + cumsums vs kernels/key_state.py)
  bounds:sum                             page bounds, one row per KV head (kernels/page_select.page_bounds)
  page_topk:torch / :triton / :radix     the kept pages per KV head (torch.topk vs kernels/topk_select.py's
                                         bisection and radix kernels; :wN another warp count)
  cand_scores                            exact partial scores of the candidates (kernels/page_select)
  final_topk:torch / :triton / :radix    2048 of the candidates per row (per KV head)
  density:torch / :triton                the selection's decode density (kernels/kept_density.py)
  sparse_decode                          attention over 2048 tokens per KV head (kernels/sparse_decode)
  sdpa_cudnn                             dense decode over every key
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from sparse_compile.attention_mask import AttentionMask, visible_keys
from sparse_compile.benchmarks.timing import environment, graph_ms
from sparse_compile.kernels.fasa import key_state
from sparse_compile.kernels.kept_density import kept_density, kept_density_reference
from sparse_compile.kernels.key_state import key_state_from_mask
from sparse_compile.kernels.page_select import candidate_scores, page_bounds
from sparse_compile.kernels.sparse_decode import sparse_decode_attention
from sparse_compile.kernels.topk_select import topk_indices
from sparse_compile.methods.two_stage import kept_pages


def pieces(L: int, B: int, P: int, H: int = 32, Hkv: int = 8, D: int = 128, n: int = 64, budget: int = 2048,
           factor: float = 4.0, rep_ms: float = 50.0) -> list[dict]:
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(B, H, 1, D, device=dev, dtype=dt, generator=g)
    k = torch.randn(B, Hkv, L, D, device=dev, dtype=dt, generator=g)
    v = torch.randn(B, Hkv, L, D, device=dev, dtype=dt, generator=g)
    NP = math.ceil(L / P)
    lo = k.view(B, Hkv, NP, P, D).amin(3) if L % P == 0 else None
    hi = k.view(B, Hkv, NP, P, D).amax(3) if L % P == 0 else None
    key_dims = k[..., :n].contiguous()
    dims = torch.arange(n, device=dev).expand(Hkv, n)
    head_dims = dims.repeat_interleave(H // Hkv, 0).contiguous()
    member = torch.ones(H, n, device=dev)
    mask = AttentionMask(causal=True, q_offset=L - 1)
    keep = kept_pages(int(factor * budget), P, NP, 4, 64)
    rows: list[dict] = []

    def add(name: str, fn) -> None:
        t = graph_ms(fn, rep_ms)
        us = round(1e3 * t, 2) if isinstance(t, float) else t
        rows.append({"L": L, "B": B, "P": P, "piece": name, "graph_us": us})

    def state_torch():
        return key_state(visible_keys(mask, B, 1, L, device=dev)[:, 0, 0, :], 4, 64)

    def state_triton():
        return key_state_from_mask(B, L, q_pos=L - 1, sink=4, recent=64, device=dev)[0]

    state = state_triton()
    assert torch.equal(state, state_torch())
    bounds = page_bounds(q, lo, hi, state, P, reduce="sum").view(B * Hkv, NP)
    pages = topk_indices(bounds, keep).view(B, Hkv, keep)
    scores, tokens = candidate_scores(q, key_dims, head_dims, member, pages, state, P, per_kv_head=True)
    scores = scores.view(B * Hkv, -1).contiguous()
    take = min(budget, scores.shape[-1])
    chosen = topk_indices(scores, take).view(B, Hkv, take)
    sets = torch.topk(scores, take, dim=-1, sorted=False).indices.sort(-1).values
    overlap = min(float((topk_indices(scores, take, algorithm=a).sort(-1).values == sets).float().mean())
                  for a in ("bisect", "radix"))

    add("key_state:torch", state_torch)
    add("key_state:triton", state_triton)
    add("bounds:sum", lambda: page_bounds(q, lo, hi, state, P, reduce="sum"))
    add("page_topk:torch", lambda: torch.topk(bounds, keep, dim=-1, sorted=False).indices)
    add("page_topk:triton", lambda: topk_indices(bounds, keep))
    add("cand_scores", lambda: candidate_scores(q, key_dims, head_dims, member, pages, state, P, per_kv_head=True))
    add("page_topk:radix", lambda: topk_indices(bounds, keep, algorithm="radix"))
    add("final_topk:torch", lambda: torch.topk(scores, take, dim=-1, sorted=False).indices)
    add("final_topk:triton", lambda: topk_indices(scores, take))
    add("final_topk:radix", lambda: topk_indices(scores, take, algorithm="radix"))
    for warps in (4, 16):
        add(f"final_topk:triton:w{warps}", lambda w=warps: topk_indices(scores, take, num_warps=w))
        add(f"final_topk:radix:w{warps}", lambda w=warps: topk_indices(scores, take, algorithm="radix", num_warps=w))
    n_vis = torch.full((B,), L, dtype=torch.int32, device=dev)
    add("density:torch", lambda: kept_density_reference(chosen, n_vis, H))
    add("density:triton", lambda: kept_density(chosen, n_vis, H))
    add("sparse_decode", lambda: sparse_decode_attention(q, k, v, chosen, scale=D ** -0.5))

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    add("sdpa_cudnn", cudnn)
    for r in rows:
        r.update({"keep_pages": keep, "candidates": scores.shape[-1], "topk_set_equal": overlap})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="32768,131072")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--pages", default="16,32")
    ap.add_argument("--factors", default="4", help="candidate tokens per KV head, multiples of the budget")
    ap.add_argument("--out", default="results/profile_decode_selection.json")
    args = ap.parse_args(argv)
    rows = []
    for L in map(int, args.lengths.split(",")):
        for B in map(int, args.batches.split(",")):
            for P in map(int, args.pages.split(",")):
                for factor in map(float, args.factors.split(",")):
                    got = pieces(L, B, P, factor=factor)
                    rows += got
                    for r in got:
                        r["factor"] = factor
                        print(f"L={L:>6} B={B} P={P:>2} x{factor:g} {r['piece']:<22} {r['graph_us']} us", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"environment": environment("cuda"), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
