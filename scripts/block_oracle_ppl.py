"""The best a block selector can do: whole-window perplexity when every head keeps, per query block, the top-p of its
*true* attention mass over key blocks (plus the sink block and the diagonal), at block size b.

No estimate can beat this rule at its own density by much (it drops only the blocks the exact attention weights
least), so its (density, dPPL) curve says what block density a prefill method could reach on a model at a given
perplexity budget, and which layers hold the density that cannot be cut. Runs the model with a registered
attention function (transformers' AttentionInterface) that computes each layer's exact attention probabilities,
picks the oracle blocks, and attends over them; CPU float32, all heads of a layer at once.

    python scripts/block_oracle_ppl.py --p 0.9,0.95,0.97 --out results/x.txt
    python scripts/block_oracle_ppl.py --p 0.95 --layers 12-29      # oracle in layers 12-29 only, exact elsewhere
    python scripts/block_oracle_ppl.py --p 0.97 --niah 8192:1.0:2   # a NIAH sample's answer (eval's grid, seed 0)
                                                                      # with the oracle prefill, dense decode
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from sparse_compile.evaluation import needle as niah
from sparse_compile.evaluation.corpus import load_corpus, tokenize, windows
from sparse_compile.evaluation.models import load_model
from sparse_compile.evaluation.perplexity import logits_fn, window_nll
from sparse_compile.kernels.prism import sample_positions, top_p_blocks


def sample_rows(L: int, block: int, samples: int) -> torch.Tensor:
    """Query positions whose attention estimates their block's mass: Prism's sampled coverage's
    (`kernels.prism.sample_positions`), or every query (samples = 0: the oracle)."""
    if samples <= 0 or samples >= block:
        return torch.arange(L)
    pos, used = sample_positions(L, block, samples)
    return pos[used].unique()


def oracle_block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int, p: float,
                           scale: float, samples: int = 0,
                           extra: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention over each head's oracle blocks: the top-p of the block mass of its queries' exact
    attention (samples > 0: of `sample_rows` only, an estimate a method could afford).

    q: (H, L, D); k, v: (H, L, D) (already expanded to the query heads); extra: (H, nq, nk) bool blocks kept on top
    (Prism's pooled bands: `--bands`) or None. Returns (out (H, L, D), density (H,) = kept causal block pairs /
    causal block pairs)."""
    H, L, _ = q.shape
    n = -(-L // block)
    causal_tokens = torch.ones(L, L, dtype=torch.bool).tril()
    logits = (q @ k.transpose(1, 2)) * scale
    logits.masked_fill_(~causal_tokens, float("-inf"))
    rows = sample_rows(L, block, samples)
    probs = torch.softmax(logits[:, rows], -1)
    padded = torch.nn.functional.pad(probs, (0, n * block - L)).view(H, rows.numel(), n, block).sum(-1)
    mass = torch.zeros(H, n, n).index_add_(1, rows // block, padded)  # (H, nq, nk)
    del padded, probs
    causal_blocks = torch.ones(n, n, dtype=torch.bool).tril().expand(H, n, n)
    keep = top_p_blocks(mass / mass.sum(-1, keepdim=True), causal_blocks, p)
    keep[:, :, 0] = True
    keep[:, torch.arange(n), torch.arange(n)] = True
    if extra is not None:
        keep |= extra & causal_blocks
    density = keep.sum((1, 2)).float() / (n * (n + 1) / 2)
    tokens = keep.repeat_interleave(block, 1)[:, :L].repeat_interleave(block, 2)[:, :, :L] & causal_tokens
    out = torch.softmax(logits.masked_fill_(~tokens, float("-inf")), -1) @ v
    return out, density


def prism_bands(query: torch.Tensor, key: torch.Tensor, block: int, threshold: float) -> torch.Tensor:
    """Prism's pooled two-band selection (calibrated temperatures, both bands at `threshold`, rotate-half RoPE over
    the whole head dim, sink and diagonal forced): (B, H, nq, nk) bool for query (B, H, L, D), key (B, Hkv, L, D)."""
    from sparse_compile.attention_mask import AttentionMask, SiteFacts
    from sparse_compile.kernels.prism import select_blocks_reference
    from sparse_compile.methods.prism import PrismParams, band_dims

    D = query.shape[-1]
    site = SiteFacts(rotary_dim=D, head_dim=D, num_heads=query.shape[1], num_kv_heads=key.shape[1])
    high, low = band_dims(site, PrismParams(block_size=block))
    return select_blocks_reference(query.float(), key.float(), high, low, AttentionMask(), block_size=block,
                                   threshold_high=threshold, threshold_low=threshold, temperature_high=None,
                                   temperature_low=None, dtype=torch.float32)


def make_attention(p: float, block: int, layers: set[int] | None, densities: dict[int, list[float]],
                   samples: int = 0, bands: float = 0.0):
    """An AttentionInterface function: the oracle rule in `layers` (None: every layer), SDPA elsewhere; appends each
    oracle layer's mean head density to densities[layer]."""

    def attend(module, query, key, value, attention_mask, scaling=None, **kw):
        layer = module.layer_idx
        if (layers is not None and layer not in layers) or query.shape[2] < 2 * block:
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kw)
        B, H, L, D = query.shape
        group = H // key.shape[1]
        scale = D ** -0.5 if scaling is None else scaling
        outs = []
        extra = prism_bands(query, key, block, bands) if bands > 0 else None
        for b in range(B):
            k = key[b].repeat_interleave(group, 0).float()
            v = value[b].repeat_interleave(group, 0).float()
            out, density = oracle_block_attention(query[b].float(), k, v, block, p, scale, samples,
                                                  None if extra is None else extra[b])
            outs.append(out.to(query.dtype))
            densities.setdefault(layer, []).append(density.mean().item())
        return torch.stack(outs).transpose(1, 2).contiguous(), None

    return attend


def parse_layers(text: str | None) -> set[int] | None:
    if not text:
        return None
    out: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--corpus", default="jargon")
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--p", default="0.95", help="comma-separated top-p values of the true block mass")
    ap.add_argument("--layers", help="layers that run the oracle (e.g. 12-29 or 3,5,9); default every layer; "
                                     "the others run exact attention (density 1)")
    ap.add_argument("--samples", type=int, default=0, help="estimate each query block's mass from this many of its "
                                                             "queries (0: all of them, the oracle)")
    ap.add_argument("--bands", type=float, default=0.0, help="also keep Prism's pooled two-band selection at this "
                                                             "top-p (0: off)")
    ap.add_argument("--niah", help="instead of perplexity: NIAH samples LENGTH:DEPTH:INDEX,... of `eval`'s grid "
                                   "(seed 0, the corpus as haystack), answered greedily with the oracle prefill and "
                                   "exact decode")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.niah:
        return niah_answers(args)

    model, tok = load_model(args.model)
    num_layers = model.config.num_hidden_layers
    wins = windows(tokenize(tok, load_corpus(args.corpus).text), args.length, args.windows)
    forward = logits_fn(model)
    eager = [window_nll(forward, ids).double() for _, ids in wins]
    eager_ppl = math.exp(sum(n.sum() for n in eager) / sum(n.numel() for n in eager))
    layers = parse_layers(args.layers)
    lines = [f"# {args.model}, {args.corpus}, {args.windows} windows of {args.length} (starts "
             f"{[s for s, _ in wins]}), block {args.block_size}, oracle layers {args.layers or 'all'}, "
             f"samples per block {args.samples or 'all'}, Prism bands {args.bands or 'off'}; eager PPL {eager_ppl:.5f}",
             "p  density(mean over all layers, exact layers = 1)  PPL  dPPL%  per-window dPPL%  per-layer density"]
    print(lines[0], flush=True)
    previous = model.config._attn_implementation
    for p in (float(x) for x in args.p.split(",")):
        densities: dict[int, list[float]] = {}
        AttentionInterface.register("block_oracle", make_attention(p, args.block_size, layers, densities,
                                                                                args.samples, args.bands))
        model.set_attn_implementation("block_oracle")
        try:
            nlls = [window_nll(forward, ids).double() for _, ids in wins]
        finally:
            model.set_attn_implementation(previous)
        ppl = math.exp(sum(n.sum() for n in nlls) / sum(n.numel() for n in nlls))
        per_window = [100 * (math.exp(a.mean()) / math.exp(e.mean()) - 1) for a, e in zip(nlls, eager, strict=True)]
        per_layer = [sum(densities[i]) / len(densities[i]) if i in densities else 1.0 for i in range(num_layers)]
        mean_density = sum(per_layer) / num_layers
        lines.append(f"{p} {mean_density:.4f} {ppl:.5f} {100 * (ppl / eager_ppl - 1):+.3f} "
                     f"{' '.join(f'{x:+.3f}' for x in per_window)}  {' '.join(f'{x:.3f}' for x in per_layer)}")
        print(lines[-1], flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


def niah_answers(args: argparse.Namespace) -> None:
    """Eager's and the oracle's answers to the given NIAH samples (the prefill runs the oracle rule, decode steps
    are exact: `make_attention` hands queries shorter than two blocks to SDPA)."""
    model, tok = load_model(args.model)
    ids = tokenize(tok, load_corpus(args.corpus).text)
    eos = niah.eos_token_ids(tok, model.config)
    previous = model.config._attn_implementation
    lines = [f"# {args.model}, {args.corpus} haystack, block {args.block_size}, oracle layers {args.layers or 'all'}, "
             f"samples per block {args.samples or 'all'}, Prism bands {args.bands or 'off'}; NIAH samples {args.niah}"]
    for spec in args.niah.split(","):
        length, depth, index = spec.split(":")
        sample = niah.make_sample(tok, ids, int(length), float(depth), int(index), seed=0)
        prompt = torch.tensor(sample.input_ids)
        answer = tok.decode(niah.greedy_generate(model, model.config, prompt, 12, eos), skip_special_tokens=True)
        lines.append(f"{spec} value {sample.value} needle at {sample.needle_start}: eager {answer!r}")
        print(lines[-1], flush=True)
        for p in (float(x) for x in args.p.split(",")):
            densities: dict[int, list[float]] = {}
            AttentionInterface.register("block_oracle", make_attention(p, args.block_size, parse_layers(args.layers),
                                                                       densities, args.samples, args.bands))
            model.set_attn_implementation("block_oracle")
            try:
                new = niah.greedy_generate(model, model.config, prompt, 12, eos)
                answer = tok.decode(new, skip_special_tokens=True)
            finally:
                model.set_attn_implementation(previous)
            mean = sum(sum(d) / len(d) for d in densities.values()) / model.config.num_hidden_layers
            lines.append(f"{spec} p {p}: {answer!r} (hit {niah.score(answer, sample.value):.0f}, density {mean:.3f})")
            print(lines[-1], flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
