"""Token Sparse Attention on SmolLM2: the continuation perplexity the whole-window PPL hides (CPU or GPU).

A token dropped in a layer gets a zero attention output there, so its own next-token prediction degrades
by design, while the always-kept recent tokens (the end of the prompt a continuation starts from) barely
move (shared/specs/token_sparse.md). So per window this reports, against the eager model:
  ppl_last     PPL of the last `--last` predicted tokens (a continuation PPL; what the method is judged by)
  agree_last   fraction of those positions whose greedy (argmax) token equals the eager model's
  ppl          whole-window PPL (labelled as such: it counts the dropped tokens' own predictions)
  density      mean over all layers of the node density in the Report (dense layers 1.0): for token_sparse
               alone the kept fraction, stacked the kept fraction x the inner block density (the issue's
               "total work"), for a block method its block density
Every configuration runs through `sparse_compile.compile(model, policy, inner="eager")` on the same windows.

    python -m sparse_compile.benchmarks.token_sparse_ppl --lengths 4K,8K --windows 1 --out ts_ppl.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import sparse_compile
from sparse_compile.evaluation.corpus import default_corpus, load_corpus, tokenize, windows
from sparse_compile.evaluation.models import DEFAULT_MODEL, load_model
from sparse_compile.policy import load_policy


def configurations(taus: tuple[float, ...], stacked_taus: tuple[float, ...], prism_thresholds: tuple[float, ...],
                   layers: list | None = None) -> dict[str, Any]:
    """{label: policy mapping}: token_sparse alone (on `layers`, default the shipped policy's), Prism alone,
    and Prism everywhere with token_sparse + Prism on those layers."""
    shipped = load_policy("token_sparse").prefill.params
    layers = list(shipped.layers) if layers is None else layers
    base = {k: getattr(shipped, k) for k in ("min_keep", "recent", "smooth")}
    out: dict[str, Any] = {}
    for tau in taus:
        out[f"token_sparse tau={tau}"] = {"name": "ts", "prefill": {"method": "token_sparse", "params": {
            **base, "dropped_mass": tau, "layers": layers}}}
    for p in prism_thresholds:
        prism = {"threshold_high": p, "threshold_low": p}
        out[f"prism {p}"] = {"name": "prism", "prefill": {"method": "prism", "params": prism}}
        for tau in stacked_taus:
            out[f"prism {p} + token_sparse tau={tau} on its layers"] = {"name": "stacked", "prefill": {
                "method": "prism", "params": prism, "overrides": [{"layers": layers, "method": "token_sparse",
                                                                   "params": {**base, "dropped_mass": tau,
                                                                              "inner": "prism",
                                                                              "inner_params": prism}}]}}
    return out


def scores(logits: torch.Tensor, ids: torch.Tensor, last: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token NLL (L-1,), argmax of the last `last` predictions (last,))."""
    nll = F.cross_entropy(logits[0, :-1].float(), ids[1:], reduction="none")
    return nll, logits[0, -last - 1:-1].argmax(-1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm.auto import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    model = model.to(args.device)
    corpus = load_corpus(args.corpus or default_corpus())
    ids_all = tokenize(tokenizer, corpus.text)
    configs = configurations(args.taus, args.stacked_taus, args.prism_thresholds,
                             None if args.layers is None else [x.strip() for x in args.layers.split(",")])
    if args.only:
        configs = {label: policy for label, policy in configs.items() if label in args.only}
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for length in args.lengths:
        for start, ids in windows(ids_all, length, args.windows):
            ids = ids.to(args.device)
            with torch.no_grad():
                ref_nll, ref_top = scores(model(ids[None]).logits, ids, args.last)
            rows.append({"config": "eager", "length": length, "start": start, "nll_sum": float(ref_nll.sum()),
                         "nll_last": float(ref_nll[-args.last:].sum()), "tokens": ref_nll.numel(),
                         "agree_last": 1.0, "density": 1.0})
            print(json.dumps(rows[-1]), flush=True)
            for label, policy in tqdm(configs.items(), desc=f"{length} @ {start}", disable=args.no_progress):
                fast = sparse_compile.compile(model, policy, inner="eager")
                with torch.no_grad():
                    nll, top = scores(fast(ids[None]).logits, ids, args.last)
                report = fast.sparse_report
                rows.append({"config": label, "length": length, "start": start, "nll_sum": float(nll.sum()),
                             "nll_last": float(nll[-args.last:].sum()), "tokens": nll.numel(),
                             "agree_last": float((top == ref_top).float().mean()),
                             "density": report.mean_density("prefill"),
                             "layer_density": {str(k): v for k, v in report.layer_density("prefill").items()},
                             "fallbacks": {str(k): v for k, v in report.fallbacks("prefill").items()}})
                print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("layer_density", "fallbacks")}),
                      flush=True)
                torch._dynamo.reset()
    return {"model": args.model, "corpus": corpus.name, "last": args.last, "windows": args.windows,
            "rows": rows, "wall_s": time.perf_counter() - t0, "torch": torch.__version__, "device": args.device}


def summary(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (config, length): PPLs over the windows, agreement and density means, deltas vs eager."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in result["rows"]:
        groups.setdefault((r["config"], r["length"]), []).append(r)
    out = []
    for (config, length), rs in groups.items():
        last = result["last"] * len(rs)
        out.append({"config": config, "length": length,
                    "ppl": math.exp(sum(r["nll_sum"] for r in rs) / sum(r["tokens"] for r in rs)),
                    "ppl_last": math.exp(sum(r["nll_last"] for r in rs) / last),
                    "agree_last": sum(r["agree_last"] for r in rs) / len(rs),
                    "density": sum(r["density"] for r in rs) / len(rs)})
    eager = {r["length"]: r for r in out if r["config"] == "eager"}
    for r in out:
        e = eager[r["length"]]
        r["dppl_pct"] = 100 * (r["ppl"] / e["ppl"] - 1)
        r["dppl_last_pct"] = 100 * (r["ppl_last"] / e["ppl_last"] - 1)
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [f"SmolLM2-135M-Instruct (GGUF), corpus {result['corpus']}, {result['windows']} window(s) per length, "
             f"{result.get('device', 'cpu')} fp32, torch {result['torch']}; last = the last {result['last']} "
             "predicted tokens", "",
             "| L | config | mean density (all layers) | PPL last | ΔPPL last | greedy agree last | whole-window PPL "
             "| ΔPPL whole |", "|---|---|---|---|---|---|---|---|"]
    for r in summary(result):
        lines.append(f"| {r['length'] // 1024}K | {r['config']} | {r['density']:.3f} | {r['ppl_last']:.2f} | "
                     f"{r['dppl_last_pct']:+.2f}% | {r['agree_last']:.3f} | {r['ppl']:.2f} | {r['dppl_pct']:+.2f}% |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from sparse_compile.__main__ import parse_floats, parse_lengths, positive_int

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help="model (default smollm2)")
    ap.add_argument("--corpus", default=None, help="named corpus or text file (default: eval's default)")
    ap.add_argument("--lengths", type=parse_lengths, default=(4096, 8192), help="window lengths (4K,8K)")
    ap.add_argument("--windows", type=positive_int, default=1, help="windows per length (1)")
    ap.add_argument("--last", type=positive_int, default=128, help="continuation tokens scored (128)")
    ap.add_argument("--taus", type=parse_floats, default=(0.005, 0.02, 0.05), help="dropped_mass values, alone")
    ap.add_argument("--stacked-taus", type=parse_floats, default=(0.005, 0.02), help="dropped_mass values, stacked")
    ap.add_argument("--prism-thresholds", type=parse_floats, default=(0.95, 0.9), help="Prism top-p values")
    ap.add_argument("--only", action="append", metavar="LABEL",
                    help="run only the configurations with this label (repeatable), e.g. 'prism 0.95'")
    ap.add_argument("--layers", help="token_sparse layers, e.g. 15-29 (default: the shipped policy's)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (fp32 either way; cuda runs the Triton kernels)")
    ap.add_argument("--threads", type=positive_int, help="torch CPU threads")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--out", type=Path, help="JSON results file (a .md table is written beside it)")
    args = ap.parse_args(argv)
    result = run(args)
    table = markdown(result)
    print(table)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
