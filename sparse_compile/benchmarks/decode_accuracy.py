"""Decode-method accuracy (FASA, LessIsMore) on a real model, measured where they act: decode steps.

    python -m sparse_compile.benchmarks.decode_accuracy [--lengths 4096 8192] [--windows 2] [--steps 64]
        [--methods fasa lessismore] [--budgets 0.25 0.1 256] [--device cpu|cuda]

For each window of real text (corpus windows, deterministic): the first `length` tokens are the prompt
(prefilled once, eagerly: FASA leaves prefill dense), then the next `steps` real tokens are fed one at a
time as decode steps (teacher forcing: every configuration sees the same tokens). Each method runs through
a transformers attention implementation that calls the method's own `attention` (and `unsupported`, for
the dense fallbacks) on each decode call, exactly what the compiled node runs (tests/test_fasa.py and
tests/test_lessismore.py hold the compiled `generate` to loop references of the specs), without recompiling
per configuration. LessIsMore's selection passes from its selection layer to the following layers through
the attention function's own state object, reset at every forward (the compiled graph passes it as a
tensor edge). Per config:
  agreement   fraction of steps whose argmax equals the dense model's argmax at the same step
  ppl         perplexity of the real continuation tokens (decode-only: prefill PPL would not see FASA)
  d_ppl_%     (ppl / dense ppl - 1) * 100
  density     mean kept / visible keys over the FASA layers (the Report's run-time record)
Configurations: FASA: budgets (fractions of the cache and token counts) x chunk sources ("calibrated": the
shipped policy's chunks; "rule": the model-agnostic rule) x gqa modes, and sink/recent variants (the
variants at the first budget only). LessIsMore (each of `--lessismore-policies`: its layers, sink, recent_fraction):
each budget in tokens, a fraction f < 1 becoming round(f * prompt length) tokens (FASA's fraction is of
the growing cache: at most steps/length more tokens).
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
    """(steps, vocab) logits of feeding `tokens` (on the model's device) one at a time after a prefilled cache."""
    out = []
    for i in range(tokens.shape[0]):
        pos = torch.tensor([[prompt_len + i]], device=tokens.device)
        logits = forward(input_ids=tokens[i].view(1, 1), past_key_values=cache, use_cache=True,
                         position_ids=pos, cache_position=pos[0]).logits
        out.append(logits[0, -1].float())
    return torch.stack(out)


def exact(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any,
          scaling: float | None) -> torch.Tensor:
    """SDPA over the repeated K/V groups: (B, H, Lq, D)."""
    group = query.shape[1] // key.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(group, 1), value.repeat_interleave(group, 1), attn_mask=attention_mask,
        scale=scaling, is_causal=attention_mask is None and query.shape[2] > 1)


def site_and_call(module: Any, query: torch.Tensor, key: torch.Tensor) -> tuple[Any, Any]:
    from sparse_compile.attention_mask import SiteFacts
    from sparse_compile.ops import CallShape

    B, H, Lq, D = query.shape
    Hkv, Lk = key.shape[1], key.shape[2]
    site = SiteFacts(layer=int(module.layer_idx), rope="rotate_half", rotary_dim=D, head_dim=D, num_heads=H,
                     num_kv_heads=Hkv)
    return site, CallShape(B, H, Hkv, Lq, Lk, D, query.dtype, query.device.type)


def fasa_attention_factory(params: Any, densities: list[float], num_layers: int):
    """A transformers attention function: FASA (the method's own `attention`) on decode calls it accepts,
    SDPA otherwise; appends each FASA call's mean density to `densities`."""
    from sparse_compile.attention_mask import AttentionMask
    from sparse_compile.methods import fasa

    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        site, call = site_and_call(module, query, key)
        if call.q_len == 1 and attention_mask is None and fasa.unsupported(call, site, params) is None:
            out, density = fasa.attention(query, key, value, AttentionMask(causal=True, q_offset=call.kv_len - 1),
                                          site, params, scaling)
            densities.append(float(density.mean()))
        else:
            out = exact(query, key, value, attention_mask, scaling)
        return out.transpose(1, 2).contiguous(), None

    return attend


def lessismore_attention_factory(params: Any, densities: list[float], num_layers: int):
    """A transformers attention function: LessIsMore decode (the method's own `attention` per layer role),
    SDPA for prefill, exact layers and calls it does not accept. `state` holds the latest selection of the
    current forward (cleared when the layer index goes back, i.e. at the next forward)."""
    from sparse_compile.attention_mask import AttentionMask
    from sparse_compile.methods import lessismore

    state: dict[str, Any] = {"layer": -1, "selection": None}

    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        site, call = site_and_call(module, query, key)
        if site.layer <= state["layer"]:
            state["selection"] = None
        state["layer"] = site.layer
        role = lessismore.selection_role(site.layer, num_layers, params)
        if role == "reuse" and state["selection"] is None:
            role = "exact"
        if role == "exact" or call.q_len != 1 or attention_mask is not None or \
                lessismore.unsupported(call, site, params) is not None:
            state["selection"] = None if role == "select" else state["selection"]
            return exact(query, key, value, attention_mask, scaling).transpose(1, 2).contiguous(), None
        mask = AttentionMask(causal=True, q_offset=call.kv_len - 1)
        out, density, made = lessismore.attention(query, key, value, mask, site, params, scaling, role=role,
                                                  selection=state["selection"])
        if role == "select":
            state["selection"] = made
        else:
            densities.append(float(density.mean()))
        return out.transpose(1, 2).contiguous(), None

    return attend


FACTORIES = {"fasa": fasa_attention_factory, "lessismore": lessismore_attention_factory}


def configurations(args: argparse.Namespace, length: int) -> list[tuple[str, str, dict[str, Any]]]:
    """(name, method, params mapping) for one prompt length."""
    from sparse_compile.params import params_to_dict
    from sparse_compile.policy import load_policy

    configs: list[tuple[str, str, dict[str, Any]]] = []
    if "fasa" in args.methods:
        shipped = load_policy("fasa")
        calibrated = [list(map(list, layer)) for layer in shipped.decode.params.chunks]  # full rankings
        n_chunks = shipped.decode.params.n_chunks
        base = {"chunks": calibrated, "n_chunks": n_chunks}
        for budget in args.budgets:
            for gqa in args.fasa_gqa:
                configs.append((f"fasa budget={budget} calibrated {gqa}", "fasa",
                                {"budget": budget, **base, "gqa": gqa}))
            if budget == args.budgets[0] and not args.no_variants:
                configs += [
                    (f"fasa budget={budget} calibrated per_kv_head", "fasa", {"budget": budget, **base,
                                                                              "gqa": "per_kv_head"}),
                ] * ("per_kv_head" not in args.fasa_gqa) + [
                    (f"fasa budget={budget} rule per_head", "fasa", {"budget": budget, "chunks": []}),
                    (f"fasa budget={budget} calibrated per_head sink=4 recent=64", "fasa",
                     {"budget": budget, **base, "sink": 4, "recent": 64}),
                ]
    if "lessismore" in args.methods:
        for name in args.lessismore_policies:
            params = dict(params_to_dict(load_policy(name).decode.params))
            for budget in args.budgets:
                tokens = int(round(budget * length)) if budget < 1 else int(budget)
                configs.append((f"{name} budget={budget} ({tokens} tokens)", "lessismore",
                                {**params, "budget": tokens}))
    return [c for c in configs if not args.only or c[0] in args.only]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm.auto import tqdm
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    from sparse_compile.evaluation.corpus import default_corpus, load_corpus, tokenize, windows
    from sparse_compile.evaluation.models import load_model
    from sparse_compile.methods import METHODS
    from sparse_compile.params import params_from_mapping

    torch.manual_seed(0)
    model, tokenizer = load_model(args.model)
    model.to(args.device)
    num_layers = model.config.num_hidden_layers
    corpus = load_corpus(args.corpus or default_corpus())
    ids = tokenize(tokenizer, corpus.text)
    name = "sparse_compile_decode_accuracy"
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
    rows: list[dict[str, Any]] = []
    for length in args.lengths:
        configs = configurations(args, length)
        for start, window in windows(ids, length + args.steps, args.windows):
            window = window.to(args.device)
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
            for config, method, raw in tqdm(configs, desc=f"{length} tokens @ {start}", disable=args.no_progress):
                params = params_from_mapping(METHODS[method].Params, raw, f"decode_accuracy config {config!r}")
                densities: list[float] = []
                AttentionInterface.register(name, FACTORIES[method](params, densities, num_layers))
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
    return {"model": args.model, "corpus": corpus.name, "steps": args.steps, "device": args.device, "rows": rows}


def table(result: dict[str, Any]) -> str:
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for r in result["rows"]:
        groups.setdefault((r["length"], r["config"]), []).append(r)
    dense = {length: sum(r["ppl"] for r in rs) / len(rs) for (length, c), rs in groups.items() if c == "dense"}
    lines = ["| prompt | configuration | windows | agreement | continuation PPL | ΔPPL % | density (sparse layers) |",
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
    parser.add_argument("--methods", nargs="+", choices=sorted(FACTORIES), default=sorted(FACTORIES),
                        help="decode methods to run")
    parser.add_argument("--lessismore-policies", nargs="+", default=["lessismore"],
                        help="LessIsMore policies (their layers, sink, recent_fraction) run at each budget")
    parser.add_argument("--no-variants", action="store_true", help="FASA: no gqa/rule/sink variants")
    parser.add_argument("--fasa-gqa", nargs="+", choices=("per_head", "per_kv_head"), default=["per_head"],
                        help="FASA's gqa modes at every budget (default per_head; the variants add per_kv_head "
                             "at the first budget)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda; fp32 either way")
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
