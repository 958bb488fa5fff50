"""What Prism's block selection misses on a real model, per layer: block density, the attention mass the selected
blocks miss, and the relative L2 error of the attention output, for Prism's pooled selection, Prism united with the
query-aware vertical coverage, and the oracle (the top-p of each query block's true block mass).

Captures the post-RoPE q/k/v of every layer on one eval window (the model runs with a registered attention function
that records its inputs and calls SDPA), then scores each rule per head on the CPU in float32.

    python scripts/prism_coverage.py --length 8192 --window 1 --layers 3,9,15,21 --out results/x.txt
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from sparse_compile.attention_mask import AttentionMask, SiteFacts
from sparse_compile.evaluation.corpus import load_corpus, tokenize, windows
from sparse_compile.evaluation.models import load_model
from sparse_compile.kernels.prism import top_p_blocks
from sparse_compile.methods.prism import PrismParams, prism_select_reference


def capture_qkv(model, ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """{layer: (q (1, H, L, D), k, v (1, Hkv, L, D))} of one forward pass over ids (1, L)."""
    store = {}

    def record(module, query, key, value, attention_mask, **kw):
        store[module.layer_idx] = (query.clone(), key.clone(), value.clone())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)

    AttentionInterface.register("record_qkv", record)
    previous = model.config._attn_implementation
    model.set_attn_implementation("record_qkv")
    try:
        with torch.no_grad():
            model(ids)
    finally:
        model.set_attn_implementation(previous)
    return store


def block_mass_and_error(q, k, v, block_mask, b, scale):
    """Per head (q (L, D), k, v (L, D), block_mask (nq, nk)): (mean missed mass, relative L2 output error)."""
    L = q.shape[0]
    missed, err, ref_norm = 0.0, 0.0, 0.0
    for s in range(0, L, 1024):
        e = min(L, s + 1024)
        logits = (q[s:e] @ k.T) * scale
        i = torch.arange(s, e)[:, None]
        visible = torch.arange(L)[None] <= i
        probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), -1)
        tokens = block_mask[i[:, 0] // b].repeat_interleave(b, 1)[:, :L] & visible
        missed += (probs * ~tokens).sum().item()
        exact = probs @ v
        sparse = torch.softmax(logits.masked_fill(~tokens, float("-inf")), -1) @ v
        err += (sparse - exact).pow(2).sum().item()
        ref_norm += exact.pow(2).sum().item()
    return missed / L, (err / ref_norm) ** 0.5


def oracle(q, k, b, p, scale):
    """(nq, nk): each query block's top-p of its true mean block mass, plus the sink and diagonal blocks."""
    L = q.shape[0]
    n = -(-L // b)
    mass = torch.zeros(n, n)
    for s in range(0, L, 1024):
        e = min(L, s + 1024)
        logits = (q[s:e] @ k.T) * scale
        logits.masked_fill_(torch.arange(L)[None] > torch.arange(s, e)[:, None], float("-inf"))
        probs = torch.nn.functional.pad(torch.softmax(logits, -1), (0, n * b - L)).view(e - s, n, b).sum(-1)
        mass.index_add_(0, torch.arange(s, e) // b, probs)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    keep = top_p_blocks(mass / mass.sum(-1, keepdim=True), causal, p)
    keep[:, 0] = True
    keep[torch.arange(n), torch.arange(n)] = True
    return keep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--corpus", default="jargon")
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--window", type=int, default=1, help="which of eval's 3 windows")
    ap.add_argument("--layers", default="3,9,15,21")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--rules", default="prism:0.98,prism:0.99,prism+v:0.98:0.9,prism+v:0.97:0.8,oracle:0.95,"
                                       "oracle:0.98", help="kind:p[:vertical], comma-separated")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    model, tok = load_model(args.model)
    ids = windows(tokenize(tok, load_corpus(args.corpus).text), args.length, 3)[args.window][1][None]
    store = capture_qkv(model, ids)
    b = args.block_size
    cfg = model.config
    lines = [f"# {args.model}, {args.corpus} window {args.window} of 3, L = {args.length}, block {b}",
             "layer rule density missed_mass rel_l2_error (means over heads)"]
    for layer in [int(x) for x in args.layers.split(",")]:
        q, k, v = (t.float() for t in store[layer])
        H, Hkv, D = q.shape[1], k.shape[1], q.shape[-1]
        site = SiteFacts(layer, "rotate_half", int(D * getattr(cfg, "partial_rotary_factor", 1.0)), D, H, Hkv)
        scale = D ** -0.5
        for rule in args.rules.split(","):
            kind, *values = rule.split(":")
            if kind == "oracle":
                masks = [oracle(q[0, h], k[0, h // (H // Hkv)], b, float(values[0]), scale) for h in range(H)]
            else:
                p, vertical = float(values[0]), float(values[1]) if kind == "prism+v" else 0.0
                params = PrismParams(block_size=b, threshold_high=p, threshold_low=p, vertical_threshold=vertical)
                dense = prism_select_reference(q, k, AttentionMask(), site, params, dtype=torch.float32,
                                               scale=scale).to_dense()[0]
                masks = list(dense)
            n = masks[0].shape[0]
            causal_pairs = n * (n + 1) / 2
            rows = [(m.tril().sum().item() / causal_pairs,
                     *block_mass_and_error(q[0, h], k[0, h // (H // Hkv)], v[0, h // (H // Hkv)], m, b, scale))
                    for h, m in enumerate(masks)]
            mean = [sum(r[i] for r in rows) / len(rows) for i in range(3)]
            lines.append(f"{layer} {rule} {mean[0]:.3f} {mean[1]:.4f} {mean[2]:.4f}")
            print(lines[-1], flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
