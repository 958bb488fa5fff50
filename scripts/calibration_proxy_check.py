"""How well does calibrate's one-pass proxy predict each layer's real perplexity cost? (CPU or GPU)

    python scripts/calibration_proxy_check.py --length 2048 --block-size 64 --value 0.95 --device cpu

One window of the licenses corpus through SmolLM2 with the dense policy: the sensitivity pass records,
per layer, Prism's output error relative to |out| ("output") and to the value vectors' size ("value")
at threshold `value`; then 30 more forwards, each with one layer's attention replaced by Prism
(SubstituteMode, no recompiles), give that layer's real dNLL. Prints both proxies, the real dNLL and
Spearman rank correlations.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from sparse_compile.calibration.quality import (
    SensitivityProbe,
    SubstituteMode,
    dense_graph_with,
    method_knob,
    sensitivity_table,
    with_knob,
)
from sparse_compile.evaluation.corpus import load_corpus, tokenize, windows
from sparse_compile.evaluation.models import load_model
from sparse_compile.evaluation.perplexity import logits_fn, window_nll
from sparse_compile.methods import METHODS


def ranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    r = [0.0] * len(xs)
    for pos, i in enumerate(order):
        r[i] = float(pos)
    return r


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = ranks(a), ranks(b)
    n = len(a)
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va = sum((x - ma) ** 2 for x in ra) ** 0.5
    vb = sum((y - mb) ** 2 for y in rb) ** 0.5
    return cov / (va * vb)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--corpus", default="licenses")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--value", type=float, default=0.95)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="JSON file for the numbers")
    args = ap.parse_args()
    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    model.to(args.device)
    ids = tokenize(tok, load_corpus(args.corpus).text)
    (start, window), = windows(ids, args.length, 3)[1:2]  # the middle of three evenly spaced windows
    knob = method_knob("prism")
    params = with_knob(METHODS["prism"].Params(block_size=args.block_size), knob, args.value)
    probe = SensitivityProbe(knob, (args.value,), params)
    with torch.no_grad():
        exact = float(window_nll(logits_fn(dense_graph_with(model, probe), args.device), window).double().mean())
    out_err = {layer: e[0] for layer, (e, _) in sensitivity_table(probe.stats, "output").items()}
    val_err = {layer: e[0] for layer, (e, _) in sensitivity_table(probe.stats, "value").items()}
    dens = {layer: d[0] for layer, (_, d) in sensitivity_table(probe.stats).items()}
    real = {}
    for layer in sorted(out_err):
        with torch.no_grad():
            fwd = logits_fn(dense_graph_with(model, SubstituteMode("prism", {layer: params})), args.device)
            real[layer] = float(window_nll(fwd, window).double().mean()) - exact
        print(f"layer {layer:2d}: density {dens[layer]:.3f} output-err {out_err[layer]:.2e} "
              f"value-err {val_err[layer]:.2e} real dNLL {real[layer]:+.2e}", flush=True)
    layers = sorted(real)
    r = [real[i] for i in layers]
    result = {"window_start": start, "length": args.length, "value": args.value, "block_size": args.block_size,
              "exact_nll": exact, "density": dens, "output_err": out_err, "value_err": val_err, "real_dnll": real,
              "spearman_output": spearman([out_err[i] for i in layers], r),
              "spearman_value": spearman([val_err[i] for i in layers], r),
              "spearman_output_per_density": spearman([out_err[i] / max(1 - dens[i], 1e-6) for i in layers],
                                                      [real[i] / max(1 - dens[i], 1e-6) for i in layers]),
              "spearman_value_per_density": spearman([val_err[i] / max(1 - dens[i], 1e-6) for i in layers],
                                                     [real[i] / max(1 - dens[i], 1e-6) for i in layers]),
              "seconds": time.perf_counter() - t0}
    print(json.dumps({k: v for k, v in result.items() if k.startswith(("spearman", "seconds", "exact"))}, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
