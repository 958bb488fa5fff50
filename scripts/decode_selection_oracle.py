"""How many decode steps a token budget can keep exact when the selection itself is exact: each decode step of
every layer but the first `--dense-layers` attends over `--budget` tokens (sink + recent forced, the rest chosen
from that layer's *own exact* attention probabilities), with one token set shared by all heads of the layer
(LessIsMore's rank-by-rank union), one per KV head (the group's probabilities summed, as FASA per KV head), or one
per query head. Top-1 agreement and the PPL of teacher-forced steps against eager, on eval's decode windows.

This separates a method's estimate from its set structure: whatever LessIsMore's selection layers do, its reusing
layers cannot beat the `shared` row at the same budget (they use a set picked by another layer's query).

    python scripts/decode_selection_oracle.py --rules shared,per_kv_head --budget 2048 --out results/x.txt
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from sparse_compile.evaluation.corpus import load_corpus, tokenize, windows
from sparse_compile.evaluation.models import load_model
from sparse_compile.evaluation.perplexity import decode_scores
from sparse_compile.kernels.lessismore import union_by_rank


def select_tokens(probs: torch.Tensor, rule: str, budget: int, sink: int, recent: int, group: int) -> torch.Tensor:
    """Kept-token mask (H, Lk) bool for one decode query. probs: (H, Lk) exact attention probabilities."""
    H, Lk = probs.shape
    fixed = torch.zeros(Lk, dtype=torch.bool)
    fixed[:sink] = True
    fixed[max(0, Lk - recent):] = True
    middle = budget - int(fixed.sum())
    scores = probs.masked_fill(fixed, -1.0)
    keep = fixed.expand(H, Lk).clone()
    if rule == "shared":
        ranking = torch.topk(scores, middle, dim=-1).indices  # (H, middle) each head's ranking
        tokens = union_by_rank(ranking[None], torch.ones_like(ranking, dtype=torch.bool)[None], Lk, middle)[0]
        keep[:, tokens[tokens >= 0].long()] = True
    elif rule == "per_kv_head":
        grouped = scores.view(H // group, group, Lk).sum(1)
        idx = torch.topk(grouped, middle, dim=-1).indices.repeat_interleave(group, 0)
        keep.scatter_(1, idx, True)
    elif rule == "per_head":
        keep.scatter_(1, torch.topk(scores, middle, dim=-1).indices, True)
    else:
        raise ValueError(f"unknown rule {rule!r}")
    return keep


def make_attention(rule: str, budget: int, sink: int, recent: int, dense_layers: int, kept: list[float]):
    def attend(module, query, key, value, attention_mask, scaling=None, **kw):
        B, H, Lq, D = query.shape
        Lk = key.shape[2]
        if Lq != 1 or module.layer_idx < dense_layers or Lk <= budget:
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kw)
        group = H // key.shape[1]
        scale = D ** -0.5 if scaling is None else scaling
        k = key[0].repeat_interleave(group, 0).float()
        v = value[0].repeat_interleave(group, 0).float()
        logits = (query[0, :, 0].float()[:, None] @ k.transpose(1, 2))[:, 0] * scale  # (H, Lk)
        keep = select_tokens(torch.softmax(logits, -1), rule, budget, sink, recent, group)
        kept.append(keep.float().mean().item())
        out = torch.softmax(logits.masked_fill(~keep, float("-inf")), -1)[:, None] @ v  # (H, 1, D)
        return out.to(query.dtype)[None].transpose(1, 2).contiguous(), None

    return attend


def against_eager(model, wins: list, length: int, eager: list, attend) -> tuple[float, int, float]:
    """(top-1 agreement, misses, dPPL %) of the teacher-forced steps of `wins` (eval's decode windows of `length` +
    steps tokens) with `attend` as the model's attention function, against `eager` (decode_scores per window)."""
    previous = model.config._attn_implementation
    AttentionInterface.register("decode_probe", attend)
    model.set_attn_implementation("decode_probe")
    try:
        runs = [decode_scores(model, model.config, ids, length) for _, ids in wins]
    finally:
        model.set_attn_implementation(previous)
    nll = torch.cat([n for n, _ in runs]).double()
    eager_nll = torch.cat([n for n, _ in eager]).double()
    same = sum(int((t == e).sum()) for (_, t), (_, e) in zip(runs, eager, strict=True))
    total = sum(t.numel() for _, t in runs)
    return same / total, total - same, 100 * (math.exp(nll.mean() - eager_nll.mean()) - 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--corpus", default="jargon")
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--rules", default="shared,per_kv_head,per_head")
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--recent", type=int, default=512, help="forced recent tokens (LessIsMore: 25%% of the budget)")
    ap.add_argument("--dense-layers", type=int, default=2, help="the first layers stay exact")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    model, tok = load_model(args.model)
    wins = windows(tokenize(tok, load_corpus(args.corpus).text), args.length + args.steps, args.windows)
    eager = [decode_scores(model, model.config, ids, args.length) for _, ids in wins]
    eager_nll = torch.cat([n for n, _ in eager]).double()
    lines = [f"# {args.model}, {args.corpus}, {args.windows} windows of {args.length} + {args.steps} teacher-forced "
             f"steps; budget {args.budget} (sink {args.sink}, recent {args.recent}), layers < {args.dense_layers} "
             f"exact; eager PPL of the steps {math.exp(eager_nll.mean()):.4f}",
             "rule agreement misses dPPL% kept_fraction"]
    print(lines[0], flush=True)
    for rule in args.rules.split(","):
        kept: list[float] = []
        attend = make_attention(rule, args.budget, args.sink, args.recent, args.dense_layers, kept)
        agreement, misses, dppl = against_eager(model, wins, args.length, eager, attend)
        lines.append(f"{rule} {agreement:.4f} {misses} {dppl:+.3f} {sum(kept) / max(len(kept), 1):.3f}")
        print(lines[-1], flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
