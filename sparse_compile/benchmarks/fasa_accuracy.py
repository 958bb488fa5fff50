"""FASA accuracy on a real model, measured where FASA acts: decode steps (CPU, SmolLM2 by default).

    python -m sparse_compile.benchmarks.fasa_accuracy [--lengths 4096 8192] [--windows 2] [--steps 64]

For each window of real text (corpus windows, deterministic): the first `length` tokens are the prompt
(prefilled once, eagerly: FASA leaves prefill dense), then the next `steps` real tokens are fed one at a
time as decode steps (teacher forcing: every configuration sees the same tokens). FASA runs through a
transformers attention implementation that calls `METHODS["fasa"].attention` (and `unsupported`, for the
dense fallbacks) on each decode call, exactly what the compiled node runs on CPU (tests/test_fasa.py holds the
compiled `generate` to a loop reference of the spec), without recompiling per configuration. Per config:
  agreement   fraction of steps whose argmax equals the dense model's argmax at the same step
  ppl         perplexity of the real continuation tokens (decode-only: prefill PPL would not see FASA)
  d_ppl_%     (ppl / dense ppl - 1) * 100
  density     mean kept / visible keys over the FASA layers (the Report's run-time record)
Configurations: budgets (fractions and token counts) x chunk sources ("calibrated": the shipped policy's
chunks; "rule": the model-agnostic rule) x gqa modes, and sink/recent variants.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path
from typing import Any

import torch


def decode_logits(model: Any, forward: Any, cache: Any, tokens: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """(steps, vocab) logits of feeding `tokens` one at a time after a prefilled cache."""
    out = []
    for i, tok in enumerate(tokens.tolist()):
        pos = torch.tensor([[prompt_len + i]])
        logits = forward(input_ids=torch.tensor([[tok]]), past_key_values=cache, use_cache=True,
                         position_ids=pos, cache_position=pos[0]).logits
        out.append(logits[0, -1].float())
    return torch.stack(out)


def fasa_attention_factory(params: Any, densities: list[float]):
    """A transformers attention function: FASA (the method's own `attention`) on decode calls it accepts,
    SDPA otherwise; appends each FASA call's mean density to `densities`."""
    import torch.nn.functional as F

    from sparse_compile.attention_mask import AttentionMask, SiteFacts
    from sparse_compile.methods import fasa
    from sparse_compile.ops import CallShape

    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        B, H, Lq, D = query.shape
        Hkv, Lk = key.shape[1], key.shape[2]
        site = SiteFacts(layer=int(module.layer_idx), rope="rotate_half", rotary_dim=D, head_dim=D, num_heads=H,
                         num_kv_heads=Hkv)
        call = CallShape(B, H, Hkv, Lq, Lk, D, query.dtype, query.device.type)
        if Lq == 1 and attention_mask is None and fasa.unsupported(call, site, params) is None:
            out, density = fasa.attention(query, key, value, AttentionMask(causal=True, q_offset=Lk - 1), site, params,
                                          scaling)
            densities.append(float(density.mean()))
        else:
            group = H // Hkv
            out = F.scaled_dot_product_attention(query, key.repeat_interleave(group, 1),
                                                 value.repeat_interleave(group, 1), attn_mask=attention_mask,
                                                 scale=scaling, is_causal=attention_mask is None and Lq > 1)
        return out.transpose(1, 2).contiguous(), None

    return attend


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm.auto import tqdm
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    from sparse_compile.evaluation.corpus import default_corpus, load_corpus, tokenize, windows
    from sparse_compile.evaluation.models import load_model
    from sparse_compile.methods import fasa
    from sparse_compile.params import params_from_mapping
    from sparse_compile.policy import load_policy

    torch.manual_seed(0)
    model, tokenizer = load_model(args.model)
    corpus = load_corpus(args.corpus or default_corpus())
    ids = tokenize(tokenizer, corpus.text)
    shipped = load_policy("fasa")
    calibrated = [list(map(list, layer)) for layer in shipped.decode.params.chunks]  # full rankings
    n_chunks = shipped.decode.params.n_chunks
    configs: list[tuple[str, dict[str, Any]]] = []
    for budget in args.budgets:
        configs.append((f"budget={budget} calibrated per_head", {"budget": budget, "chunks": calibrated,
                                                                 "n_chunks": n_chunks}))
        if budget == args.budgets[0]:
            configs += [
                (f"budget={budget} calibrated per_kv_head", {"budget": budget, "chunks": calibrated,
                                                              "n_chunks": n_chunks, "gqa": "per_kv_head"}),
                (f"budget={budget} rule per_head", {"budget": budget, "chunks": []}),
                (f"budget={budget} calibrated per_head n_chunks={2 * n_chunks}",
                 {"budget": budget, "chunks": calibrated, "n_chunks": 2 * n_chunks}),
                (f"budget={budget} calibrated per_head sink=4 recent=64",
                 {"budget": budget, "chunks": calibrated, "n_chunks": n_chunks, "sink": 4, "recent": 64}),
                (f"budget={budget} calibrated per_head n_chunks={2 * n_chunks} sink=4 recent=64",
                 {"budget": budget, "chunks": calibrated, "n_chunks": 2 * n_chunks, "sink": 4, "recent": 64}),
            ]
    configs = [(n, p) for n, p in configs if not args.only or n in args.only]
    name = "sparse_compile_fasa_accuracy"
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
    rows: list[dict[str, Any]] = []
    for length in args.lengths:
        for start, window in windows(ids, length + args.steps, args.windows):
            prompt, cont = window[:length], window[length:]
            model.set_attn_implementation("sdpa")
            with torch.no_grad():
                pre = model(prompt[None], use_cache=True)
                dense_logits = decode_logits(model, model.forward, copy.deepcopy(pre.past_key_values), cont[:-1],
                                             length)
            dense_next = torch.cat([pre.logits[0, -1:].float(), dense_logits])  # predicts cont[0..]
            rows.append({"length": length, "start": start, "config": "dense", "agreement": 1.0,
                         "ppl": math.exp(float(torch.nn.functional.cross_entropy(dense_next, cont))), "density": 1.0})
            print(json.dumps(rows[-1]), flush=True)
            for config, raw in tqdm(configs, desc=f"{length} tokens @ {start}", disable=args.no_progress):
                params = params_from_mapping(fasa.FasaParams, raw, f"fasa_accuracy config {config!r}")
                densities: list[float] = []
                AttentionInterface.register(name, fasa_attention_factory(params, densities))
                model.set_attn_implementation(name)
                try:
                    with torch.no_grad():
                        logits = decode_logits(model, model.forward, copy.deepcopy(pre.past_key_values), cont[:-1],
                                               length)
                finally:
                    model.set_attn_implementation("sdpa")
                nxt = torch.cat([pre.logits[0, -1:].float(), logits])
                agree = float((logits.argmax(-1) == dense_logits.argmax(-1)).float().mean())
                rows.append({"length": length, "start": start, "config": config, "agreement": agree,
                             "ppl": math.exp(float(torch.nn.functional.cross_entropy(nxt, cont))),
                             "density": sum(densities) / max(len(densities), 1)})
                print(json.dumps(rows[-1]), flush=True)
    return {"model": args.model, "corpus": corpus.name, "steps": args.steps, "rows": rows}


def table(result: dict[str, Any]) -> str:
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for r in result["rows"]:
        groups.setdefault((r["length"], r["config"]), []).append(r)
    dense = {length: sum(r["ppl"] for r in rs) / len(rs) for (length, c), rs in groups.items() if c == "dense"}
    lines = ["| prompt | configuration | windows | agreement | continuation PPL | ΔPPL % | density (layers 1+) |",
             "|---|---|---|---|---|---|---|"]
    for (length, config), rs in groups.items():
        ppl = sum(r["ppl"] for r in rs) / len(rs)
        agree = sum(r["agreement"] for r in rs) / len(rs)
        dens = sum(r["density"] for r in rs) / len(rs)
        lines.append(f"| {length} | {config} | {len(rs)} | {agree:.3f} | {ppl:.3f} | "
                     f"{(ppl / dense[length] - 1) * 100:+.2f} | {dens:.3f} |")
    return "\n".join(lines)


def parse_budget(text: str) -> float | int:
    value = float(text)
    return int(value) if value >= 1 else value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="model (default smollm2)")
    parser.add_argument("--corpus", default=None, help="corpus name or text file (default: jargon, else licenses)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192], help="prompt lengths")
    parser.add_argument("--windows", type=int, default=2, help="text windows per length")
    parser.add_argument("--steps", type=int, default=64, help="decode steps (continuation tokens) per window")
    parser.add_argument("--budgets", type=parse_budget, nargs="+", default=[0.25, 0.1, 256], help="budgets")
    parser.add_argument("--only", nargs="*", default=[], help="only the configurations of these names")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    result = run(args)
    print(table(result))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
