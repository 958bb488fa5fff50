"""Does a decode selection survive being reused for a few steps? FASA's selection (the policy's own rule, PyTorch
form) made at one decode step and reused for the next `refresh - 1` steps of the same layer, each reuse step
attending to the stored tokens plus every token written since the selection: top-1 agreement and the PPL of
teacher-forced steps against eager, on eval's decode windows (SmolLM2, jargon, 8K prompts).

A refresh interval r would cut the selection's cost (page bounds, two top-k, candidate scores, ~70-80% of a FASA
layer on an H100: BENCHMARKS.md) to 1/r of the steps; this probe measures only what it costs in quality.

    python scripts/decode_refresh_probe.py --refresh 1,2,4,8 --out results/x.txt
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from decode_selection_oracle import against_eager
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from sparse_compile.attention_mask import AttentionMask, SiteFacts
from sparse_compile.evaluation.corpus import load_corpus, tokenize, windows
from sparse_compile.evaluation.models import load_model
from sparse_compile.evaluation.perplexity import decode_scores
from sparse_compile.kernels.sparse_decode import sparse_decode_reference
from sparse_compile.methods.fasa import fasa_select, unsupported
from sparse_compile.ops import call_shape
from sparse_compile.policy import load_policy


def make_attention(policy, refresh: int, kept: list[float], state: dict[int, tuple[torch.Tensor, int, int]]):
    """A transformers attention function: eager attention for prefill and the layers FASA does not run, else FASA's
    selection, made every `refresh` steps per layer (state: layer -> (indices (B, S, slots), length at the
    selection, steps since)) and extended by the tokens written since."""

    def attend(module, query, key, value, attention_mask, scaling=None, **kw):
        B, H, Lq, D = query.shape
        Hkv, Lk = key.shape[1], key.shape[2]
        layer = module.layer_idx
        if Lq != 1:
            state.pop(layer, None)  # a new window's prefill
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kw)
        method, params = policy.decode.for_layer(layer)
        site = SiteFacts(layer=layer, rope="rotate_half", rotary_dim=D, head_dim=D, num_heads=H, num_kv_heads=Hkv)
        if method != "fasa" or Lk < policy.decode.min_seq_len or unsupported(call_shape(query, key), site, params):
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kw)
        scale = D ** -0.5 if scaling is None else scaling
        held = state.get(layer)
        if held is None or held[2] + 1 >= refresh:
            mask = AttentionMask(causal=True, q_offset=Lk - 1)
            idx = fasa_select(query, key, value, mask, site, params, scale).indices  # (B, S, slots)
            state[layer] = (idx, Lk, 0)
        else:
            idx, length, since = held
            state[layer] = (idx, length, since + 1)
            new = torch.arange(length, Lk).expand(B, idx.shape[1], Lk - length)
            idx = torch.cat([idx, new], dim=-1)  # the stored selection + every token written since
        kept.append(float((idx >= 0).sum(-1).float().mean()) / Lk)
        out = sparse_decode_reference(query, key, value, idx, scale=scale)  # (B, H, 1, D)
        return out.transpose(1, 2).contiguous(), None

    return attend


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--corpus", default="jargon")
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--policy", default="fasa")
    ap.add_argument("--refresh", default="1,2,4,8", help="comma-separated refresh intervals (1: every step)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    torch.manual_seed(0)
    model, tok = load_model(args.model)
    policy = load_policy(args.policy)
    wins = windows(tokenize(tok, load_corpus(args.corpus).text), args.length + args.steps, args.windows)
    eager = [decode_scores(model, model.config, ids, args.length) for _, ids in wins]
    eager_nll = torch.cat([n for n, _ in eager]).double()
    lines = [f"# {args.model}, {args.corpus}, {args.windows} windows of {args.length} + {args.steps} teacher-forced "
             f"steps; policy {policy.name}; eager PPL of the steps {math.exp(eager_nll.mean()):.4f}",
             "refresh agreement misses dPPL% kept_fraction"]
    print(lines[0], flush=True)
    for refresh in (int(r) for r in args.refresh.split(",")):
        kept: list[float] = []
        agreement, misses, dppl = against_eager(model, wins, args.length, eager,
                                                make_attention(policy, refresh, kept, {}))
        lines.append(f"{refresh} {agreement:.4f} {misses} {dppl:+.3f} {sum(kept) / max(len(kept), 1):.3f}")
        print(lines[-1], flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
