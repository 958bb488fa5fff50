"""The drift_layers procedure (`Knob.procedure`): choose a method's sparse layers by representation drift on
real text and write a policy (Token Sparse Attention declares it for its `layers`).

    python -m sparse_compile calibrate token_sparse --model smollm2 --out token_sparse-smollm2.toml

Per decoder layer, drift = mean over tokens of ||h_out - h_in|| / ||h_in||: how much the layer changes
the residual stream, relative to its input (the authors' criterion, shared/specs/token_sparse.md). It
is measured with forward hooks on the model's decoder layers (the model runs its own, dense, attention)
over evenly spaced windows of the corpus, averaged over windows, normalised across layers to [0, 1];
the layers at or below the `--quantile` of the drifts (the median by default, the authors' delta = 0.5)
are written as the policy's `layers`. Deterministic: fixed windows, no sampling.

With `--out`, the policy then runs eval's NIAH grid against the eager model (needles.py; `--niah-lengths`,
default `--lengths`; `--no-niah` skips it): a needle eager finds and the policy loses moves to fewer sparse
layers, the lower-drift half of them, then half of that (`fewer_layers`, at most `--needle-probes` steps),
the first that loses none being written; when none does, the one losing fewest goes to
`<out>.unverified.toml`, exit status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sparse_compile.argtypes import parse_lengths, positive_int
from sparse_compile.calibration.needles import (
    Candidate,
    add_needle_arguments,
    check_candidates,
    needle_evaluator,
    needle_probes,
    write_checked,
)
from sparse_compile.calibration.text import policy_toml
from sparse_compile.evaluation.corpus import default_corpus, load_corpus, tokenize, windows
from sparse_compile.evaluation.device import resolve_device, resolve_dtype
from sparse_compile.evaluation.models import load_model
from sparse_compile.policy import LayerSet, generic_policy_name, load_policy, parse_toml, replace_phase


def add_drift_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the drift_layers procedure (the common ones are added by the harness)."""
    parser.add_argument("--lengths", type=parse_lengths, default=(4096,),
                        help="window lengths in tokens (default 4K; e.g. 4K,8K)")
    parser.add_argument("--windows", type=positive_int, default=2, help="windows per length (default 2)")
    parser.add_argument("--quantile", type=float, default=0.5,
                        help="layers whose normalised drift is at or below this quantile are sparse (default 0.5)")
    parser.add_argument("--base", default=None,
                        help="policy whose other settings are kept (default: the method's shipped name-only "
                             "policy, e.g. token_sparse-lossy)")
    parser.add_argument("--name", help="name of the written policy (default: <method>-<model>)")
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads")
    add_needle_arguments(parser, "--lengths", "fewer sparse layers (the lower-drift half, then half of that)")


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of a transformers causal LM (`model.model.layers` and the usual variants)."""
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "layers"):
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList) and len(obj):
            return obj
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (looked for model.layers, ...)")


def layer_drift(model: torch.nn.Module, windows: list[torch.Tensor], progress: bool = True) -> torch.Tensor:
    """(num_layers,) float64: the mean over windows of each layer's mean relative residual update.

    windows: (L,) int64 token ids each. Forward hooks read each decoder layer's input and output hidden
    states (first positional argument or `hidden_states` keyword; first element of a tuple output)."""
    layers = decoder_layers(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    current: dict[int, float] = {}

    def hook(index: int):
        def read(module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, (tuple, list)) else output
            ratio = (h_out.double() - h_in.double()).norm(dim=-1) / h_in.double().norm(dim=-1).clamp_min(1e-12)
            current[index] = float(ratio.mean())
        return read

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for ids in tqdm(windows, desc="drift", disable=not progress, leave=False, dynamic_ncols=True):
                current.clear()
                model(ids[None].to(device))
                if len(current) != len(layers):
                    raise ValueError(f"hooks saw {len(current)} of {len(layers)} decoder layers")
                sums += torch.tensor([current[i] for i in range(len(layers))], dtype=torch.float64)
    finally:
        for handle in handles:
            handle.remove()
    return sums / len(windows)


def sparse_layers(drift: torch.Tensor, quantile: float) -> list[int]:
    """Layers whose drift, normalised to [0, 1] across layers, is at or below its `quantile`."""
    span = float(drift.max() - drift.min())
    normalised = (drift - drift.min()) / (span if span > 0 else 1.0)
    cut = float(torch.quantile(normalised, quantile))
    return [i for i, value in enumerate(normalised.tolist()) if value <= cut]


def fewer_layers(layers: list[int], drift: torch.Tensor, count: int) -> list[list[int]]:
    """Up to `count` layer lists for the needle check, `layers` first, then each the lower-drift half (rounded
    up) of the one before, down to one layer; every list sorted."""
    ranked = sorted(layers, key=lambda i: (float(drift[i]), i))
    found = [sorted(layers)]
    while len(found) < count and len(found[-1]) > 1:
        ranked = ranked[:(len(ranked) + 1) // 2]
        found.append(sorted(ranked))
    return found


def run_drift_layers(args: argparse.Namespace) -> int:
    """The drift_layers procedure: measure drift, print it, write the policy when --out is given."""
    method = args.method
    if not 0.0 <= args.quantile <= 1.0 or math.isnan(args.quantile):
        raise ValueError(f"--quantile must be in [0, 1], got {args.quantile}")
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_policy(args.base or generic_policy_name(method) or method)
    if base.prefill.method != method:
        raise ValueError(f"--base {args.base!r}: its prefill method is {base.prefill.method!r}, not {method!r}")
    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    corpus = load_corpus(args.corpus or default_corpus())
    model, tokenizer = load_model(args.model, dtype=dtype)
    model.to(device)
    ev = needle_evaluator(args, model, tokenizer, tuple(args.lengths)) if args.out else None  # checks the grid now
    ids = tokenize(tokenizer, corpus.text)
    chunks = [w for length in args.lengths for _, w in windows(ids, length, args.windows)]
    drift = layer_drift(model, chunks, progress=not args.no_progress)
    chosen = sparse_layers(drift, args.quantile)
    span = float(drift.max() - drift.min()) or 1.0
    print(f"representation drift per layer ({corpus.name}, lengths {list(args.lengths)}, {args.windows} window(s) "
          f"each; normalised to [0, 1]; * = sparse at quantile {args.quantile}):")
    for i, d in enumerate(drift.tolist()):
        print(f"  layer {i:3d}  drift {d:.4f}  normalised {(d - float(drift.min())) / span:.3f}"
              f"{'  *' if i in chosen else ''}")
    print(f"sparse layers: {LayerSet.of(chosen).to_list()}")
    if not args.out:
        return 0
    name = args.name or f"{method}-{Path(str(args.model)).stem}"

    def policy_of(sparse: list[int]) -> Any:
        layers = LayerSet.of(sparse).to_list()
        params = dataclasses.replace(base.prefill.params, **{args.knob.fields[0]: tuple(layers)})
        why = (f"representation drift at or below its {args.quantile} quantile" if sparse == sorted(chosen) else
               f"the {len(sparse)} lowest-drift of the {len(chosen)} layers at or below its {args.quantile} drift "
               "quantile: fewer for the needle check")
        description = f"{method} prefill on layers {layers} of {args.model} ({why}); dense decode."
        # a measured warning of the base policy describes the base's settings, not the calibrated ones
        return dataclasses.replace(replace_phase(base, "prefill", params=params), name=name,
                                   description=description, warning="")

    options = fewer_layers(chosen, drift, 1 if ev is None else needle_probes(args) + 1)
    candidates = [Candidate(f"layers {LayerSet.of(sparse).to_list()}", policy_of(sparse)) for sparse in options]
    check = None if ev is None else check_candidates(ev, candidates, needle_probes(args))
    policy = candidates[check.chosen if check else 0].policy
    command = (f"python -m sparse_compile calibrate {method} --model {args.model} --corpus {corpus.name} "
               f"--lengths {','.join(str(n) for n in args.lengths)} --windows {args.windows} "
               f"--quantile {args.quantile}")
    comment = [f"{method} on {args.model}: sparse layers = representation drift at or below its "
               f"{args.quantile} quantile.", f"Written by: {command}",
               "Drift per layer: " + ", ".join(f"{d:.3f}" for d in drift.tolist()), *(check.header() if check else ())]
    text = policy_toml(policy, "\n".join(comment))
    if parse_toml(text, str(args.out)).to_dict() != policy.to_dict():  # what we write loads back unchanged
        raise ValueError("internal error: the written policy does not load back to the calibrated one")
    return write_checked(text, args.out, check)
