"""How much of an exact decode selection does the page prefilter keep? SmolLM2 on CPU (DECODE_NOTES.md).

    python scripts/two_stage_recall.py --length 8192 --budget 512 --factor 4 --layers 2 8 14 20 26 --queries 8

One window of `--length` tokens of the corpus (the middle one of three evenly spaced windows: the shipped
SmolLM2 FASA policy was calibrated on the first and last 4096 tokens) runs through SmolLM2-135M-Instruct
once; the post-RoPE q/k of `--layers` are recorded (the layers after the last one are not run). K goes into
a SparseCache (`--policy`, by default the shipped calibration "fasa-smollm2": 16 of 32 chunks per query
head), one prefill write per layer, and the query at each of `--queries` positions among the last 256 of the
window selects over the keys up to it, as a decode step would:
  FASA (budget tokens per query head): exact = fasa_scores_reference + select_tokens over every key;
    two-stage = fasa_two_stage with factor x budget candidate tokens per KV head (bound over each head's
    dominant dims or over all dims; the group's pages by the union of its heads' rankings, or by the max);
  LessIsMore (budget tokens shared by all heads, sink 4, recent 25%, union of middle tokens by rank):
    exact = every page a candidate; two-stage = factor x budget candidates.
Recall of a query head = attention mass (full softmax over the visible keys) of exact ∩ two-stage / mass of
exact; reported as the mean over layers, positions and query heads, with the mean masses of the exact and
two-stage sets and of the oracle (the top-budget keys by attention weight).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from sparse_compile.cache import SparseCache
from sparse_compile.calibration.text import attention_implementation, recording_attention
from sparse_compile.evaluation.corpus import load_corpus, tokenize, windows
from sparse_compile.evaluation.models import load_model
from sparse_compile.kernels.fasa import fasa_scores_reference, key_state, select_tokens
from sparse_compile.kernels.lessismore import budget_split
from sparse_compile.methods.two_stage import fasa_two_stage, lessismore_two_stage


def mass_of(probs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """probs (S, L), idx (S, k) with -1 = none -> (S,) attention mass of each row's indexed keys."""
    take = idx.clamp(min=0)
    return (probs.gather(1, take) * (idx >= 0)).sum(1)


def overlap_mass(probs: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(S,) mass of the keys in both a and b (each (S, k), -1 padded)."""
    L = probs.shape[1]
    hit_a = torch.zeros(probs.shape, dtype=torch.bool).scatter_(1, torch.where(a < 0, L - 1, a), a >= 0)
    hit_b = torch.zeros(probs.shape, dtype=torch.bool).scatter_(1, torch.where(b < 0, L - 1, b), b >= 0)
    return (probs * (hit_a & hit_b)).sum(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=8192, help="window length in tokens")
    parser.add_argument("--budget", type=int, default=512, help="selected tokens (per head for FASA)")
    parser.add_argument("--factor", type=int, default=4, help="candidates = factor x budget tokens")
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 8, 14, 20, 26], help="layers measured")
    parser.add_argument("--queries", type=int, default=8, help="decode positions per layer (last 256 tokens)")
    parser.add_argument("--pages", type=int, nargs="+", default=[16, 32, 64], help="page sizes")
    parser.add_argument("--corpus", default="licenses", help="corpus name or text file")
    parser.add_argument("--policy", default="fasa-smollm2", help="FASA policy whose dims the cache keeps")
    parser.add_argument("--qk-file", default=None, help="cache of the recorded q/k: loaded if it exists (same "
                        "--length/--layers/--corpus), else written after the prefill")
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.time()
    model, tokenizer = load_model("smollm2")
    ids = tokenize(tokenizer, load_corpus(args.corpus).text)
    _, window = windows(ids, args.length, 3)[1]
    qk: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    class Recorded(Exception):
        """Every wanted layer is recorded: the layers after the last one need not run."""

    def record(layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        if layer in args.layers:
            qk[layer] = (q[:, -256:].clone(), k.clone())  # q (H, 256, D), k (Hkv, L, D)
        if len(qk) == len(set(args.layers)):
            raise Recorded

    if args.qk_file and Path(args.qk_file).exists():
        qk = torch.load(args.qk_file)
    else:
        with attention_implementation(model, "two_stage_recall", recording_attention(record)), torch.no_grad():
            try:
                model.model(window[None])
            except Recorded:
                pass
        if args.qk_file:
            torch.save(qk, args.qk_file)
    print(f"q/k of {len(args.layers)} layers over {args.length} tokens ready (model load + prefill, or --qk-file): "
          f"{time.time() - start:.0f} s")
    L = args.length
    positions = [L - 1 - i * (255 // max(args.queries - 1, 1)) for i in range(args.queries)]
    budget, cand = args.budget, args.factor * args.budget
    n_sink, middle, n_recent = budget_split(budget, 4, 0.25)
    rows: dict[str, list[float]] = {}

    def add(name: str, values: torch.Tensor) -> None:
        rows.setdefault(name, []).extend(values.flatten().tolist())

    for P in args.pages:
        cache = SparseCache(model, max_cache_len=L, policy=args.policy, page_size=P)
        for layer in args.layers:
            q_all, k = qk[layer]
            cache.update(k[None], torch.zeros_like(k[None]), layer)
            sl = cache.sparse_layer(layer)
            H, D = q_all.shape[0], q_all.shape[2]
            G = H // k.shape[0]
            member_full = torch.zeros(H, D).scatter_reduce_(1, sl.dims.repeat_interleave(G, 0), sl.member, "amax")
            for p in positions:
                q = q_all[:, p - (L - 256)][None, :, None, :]  # (1, H, 1, D)
                visible = (torch.arange(L) <= p)[None]
                state = key_state(visible, 0, 0)
                logits = torch.einsum("hd,hnd->hn", q[0, :, 0], k.repeat_interleave(G, 0)) / math.sqrt(D)
                probs = torch.softmax(logits.masked_fill(~visible, -math.inf), -1)  # (H, L)
                oracle = probs.topk(budget, -1).indices
                exact = select_tokens(fasa_scores_reference(q, k[None], None, member_full, state,
                                                            per_kv_head=False), budget)[0]
                add(f"P={P} oracle mass", mass_of(probs, oracle))
                add(f"P={P} fasa exact mass", mass_of(probs, exact))
                for bound in ("dominant", "full"):
                    for group in ("union", "max"):
                        two = fasa_two_stage(q, sl.key_dims, sl.dims, sl.member, sl.page_min, sl.page_max, state,
                                             budget, cand, P, bound_dims=bound, group=group)[0]
                        tag = f"{bound} dims, group {group}"
                        add(f"P={P} fasa two-stage mass ({tag})", mass_of(probs, two))
                        add(f"P={P} fasa recall ({tag})", overlap_mass(probs, two, exact) / mass_of(probs, exact))
                lim = {}
                for name, c in (("exact", L), ("two", cand)):
                    sel = lessismore_two_stage(q, k[None], sl.page_min, sl.page_max, visible, 1 / math.sqrt(D),
                                               n_sink, middle, n_recent, c, P)[0].long()
                    lim[name] = sel[None].expand(H, -1)
                add(f"P={P} lessismore exact mass", mass_of(probs, lim["exact"]))
                add(f"P={P} lessismore two-stage mass", mass_of(probs, lim["two"]))
                add(f"P={P} lessismore recall", overlap_mass(probs, lim["two"], lim["exact"])
                    / mass_of(probs, lim["exact"]))
        print(f"P={P}: cache extra / K+V = {cache.extra_bytes() / cache.kv_bytes():.3f} over the recorded layers "
              f"(dims per KV head: {sorted({cache.sparse_layer(i).dims.shape[1] for i in args.layers})})")
    print(f"SmolLM2-135M, {args.corpus}, L={L}, budget {budget}, candidates {cand}, layers {args.layers}, "
          f"{len(positions)} positions; mean over layers x positions x 9 query heads")
    for name, values in rows.items():
        print(f"  {name:56s} {sum(values) / len(values):.4f}  (min {min(values):.3f})")
    print(f"total {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
