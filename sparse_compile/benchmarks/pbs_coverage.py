"""PBS-Attn's core claim on a real model: fewer key blocks cover the same attention mass once keys are
permuted inside segments.

SmolLM2-135M-Instruct reads `--length` tokens of the license corpus; forward hooks recompute each
layer's post-RoPE q/k. Per layer and query head, from the exact causal attention P (float32):
  block mass     M[m, n] = sum of P over query block m x key block n (b = --block-size)
  minimal cover  per query block m, the fewest key blocks (largest mass first) whose mass reaches
                 c * (row mass); density = covered blocks / causally allowed blocks
once on the original key order and once on PBS's order (keys sorted inside segments of
--segment-size by their attention from the last 128 queries: kernels/pbs.py, steps 1-2). Both orders
are covered by the same rule, so the ratio isolates the permutation. CPU only; ~1-6 minutes.

    python -m sparse_compile.benchmarks.pbs_coverage --length 8192 --coverage 0.9 0.95
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from sparse_compile.kernels.pbs import key_scores, segment_permutation


def capture_qk(model, ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (q (1, H, L, D), k (1, Hkv, L, D))} post-RoPE float32, recomputed in forward hooks."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cfg = model.config
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    D = cfg.hidden_size // H
    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(layer: int):
        def fn(module, args, kwargs):
            x = kwargs.get("hidden_states", args[0] if args else None)
            cos, sin = kwargs["position_embeddings"]
            B, L, _ = x.shape
            q = module.q_proj(x).view(B, L, H, D).transpose(1, 2)
            k = module.k_proj(x).view(B, L, Hkv, D).transpose(1, 2)
            out[layer] = apply_rotary_pos_emb(q, k, cos, sin)

        return fn

    handles = [layer.self_attn.register_forward_pre_hook(hook(i), with_kwargs=True)
               for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return out


def cover_density(block_mass: torch.Tensor, allowed: torch.Tensor, coverage: float) -> float:
    """block_mass, allowed: (Hq, nq, nk). Mean over heads and query blocks of the minimal fraction of the
    allowed blocks whose mass reaches `coverage` of the row's mass."""
    ranked = torch.sort(block_mass.masked_fill(~allowed, 0.0), dim=-1, descending=True).values
    before = torch.cumsum(ranked, -1) - ranked
    needed = (before < coverage * ranked.sum(-1, keepdim=True)).sum(-1).clamp_min(1).float()
    return float((needed / allowed.sum(-1).clamp_min(1)).mean())


def layer_densities(q: torch.Tensor, k: torch.Tensor, block: int, segment: int, coverages: list[float]
                    ) -> tuple[list[float], list[float]]:
    """(densities on the original order, on the permuted order) per coverage, for one layer."""
    _, H, L, D = q.shape
    G = H // k.shape[1]
    scale = 1.0 / math.sqrt(D)
    key_valid = torch.ones(1, L, dtype=torch.bool)
    scores = key_scores(q, k, q_offset=0, key_valid=key_valid, scale=scale, per_kv_head=False)
    perm, _ = segment_permutation(scores, key_valid, segment)  # (1, H, L)
    n = -(-L // block)
    pad = n * block - L
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    plain, permuted = [], []
    masses = {"plain": [], "perm": []}
    allowed = {"plain": [], "perm": []}
    for h in range(H):
        logits = (q[0, h] @ k[0, h // G].T) * scale
        p = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)  # (L, L)
        for name, order in (("plain", torch.arange(L)), ("perm", perm[0, h])):
            pk = torch.nn.functional.pad(p[:, order], (0, pad, 0, pad))
            vis = torch.nn.functional.pad(causal[:, order], (0, pad, 0, pad))
            masses[name].append(pk.view(n, block, n, block).sum((1, 3)))
            allowed[name].append(vis.view(n, block, n, block).any(3).any(1))
    for c in coverages:
        plain.append(cover_density(torch.stack(masses["plain"]), torch.stack(allowed["plain"]), c))
        permuted.append(cover_density(torch.stack(masses["perm"]), torch.stack(allowed["perm"]), c))
    return plain, permuted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=8192, help="tokens (default 8192)")
    parser.add_argument("--coverage", type=float, nargs="+", default=[0.9, 0.95], help="attention mass to cover")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--segment-size", type=int, default=256)
    parser.add_argument("--layers", default="all", help="'all' or comma-separated layer indices")
    args = parser.parse_args(argv)
    from sparse_compile.evaluation.corpus import load_corpus
    from sparse_compile.evaluation.models import load_model

    start = time.time()
    model, tokenizer = load_model("smollm2")
    text = load_corpus("licenses").text
    ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.length]
    qk = capture_qk(model, ids)
    layers = sorted(qk) if args.layers == "all" else [int(x) for x in args.layers.split(",")]
    print(f"SmolLM2-135M-Instruct, licenses, L={ids.shape[1]}, block {args.block_size}, segment "
          f"{args.segment_size}; density = minimal covering blocks / causal blocks, mean over heads and query blocks")
    print("| layer | " + " | ".join(f"c={c}: plain | c={c}: permuted | ratio" for c in args.coverage) + " |")
    print("|---|" + "---|---|---|" * len(args.coverage))
    totals = [[0.0, 0.0] for _ in args.coverage]
    for layer in layers:
        q, k = qk[layer]
        plain, permuted = layer_densities(q, k, args.block_size, args.segment_size, args.coverage)
        cells = []
        for i, (a, b) in enumerate(zip(plain, permuted, strict=True)):
            totals[i][0] += a / len(layers)
            totals[i][1] += b / len(layers)
            cells.append(f"{a:.3f} | {b:.3f} | {b / a:.2f}")
        print(f"| {layer} | " + " | ".join(cells) + " |", flush=True)
    print("| mean | " + " | ".join(f"{a:.3f} | {b:.3f} | {b / a:.2f}" for a, b in totals) + " |")
    print(f"({time.time() - start:.0f} s, torch {torch.__version__})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
