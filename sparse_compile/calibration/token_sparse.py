"""Choose Token Sparse Attention's sparse layers by representation drift on real text and write a policy.

    python -m sparse_compile calibrate token_sparse --model smollm2 --out token_sparse-smollm2.toml

Per decoder layer, drift = mean over tokens of ||h_out - h_in|| / ||h_in||: how much the layer changes
the residual stream, relative to its input (the authors' criterion, shared/specs/token_sparse.md). It
is measured with forward hooks on the model's decoder layers (the model runs its own, dense, attention)
over evenly spaced windows of the corpus, averaged over windows, normalised across layers to [0, 1];
the layers at or below the `--quantile` of the drifts (the median by default, the authors' delta = 0.5)
are written as the policy's `layers`. Deterministic: fixed windows, no sampling.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch

METHOD = "token_sparse"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `calibrate token_sparse` (the common ones are added by sparse_compile.calibration)."""
    from sparse_compile.__main__ import parse_lengths, positive_int

    parser.add_argument("--lengths", type=parse_lengths, default=(4096,),
                        help="window lengths in tokens (default 4K; e.g. 4K,8K)")
    parser.add_argument("--windows", type=positive_int, default=2, help="windows per length (default 2)")
    parser.add_argument("--quantile", type=float, default=0.5,
                        help="layers whose normalised drift is at or below this quantile are sparse (default 0.5)")
    parser.add_argument("--base", default=METHOD,
                        help="policy whose other settings are kept (default: the shipped token_sparse policy)")
    parser.add_argument("--name", help="name of the written policy (default: token_sparse-<model>)")
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads")


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
    from tqdm.auto import tqdm

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


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"cannot write the non-finite value {value} to TOML")
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise ValueError(f"cannot write {type(value).__name__} to TOML")


def table_lines(header: str, table: dict[str, Any], array: bool = False) -> list[str]:
    """`[header]` (or `[[header]]`) with the table's scalars and lists, then its sub-tables; None values
    are left out (they mean "the default")."""
    lines = [f"[[{header}]]" if array else f"[{header}]"]
    subtables = []
    for key, value in table.items():
        if value is None:
            continue
        if isinstance(value, dict):
            subtables.append((key, value))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            subtables.extend((key, v, True) for v in value)  # type: ignore[misc]
        elif not (isinstance(value, list) and not value and key == "overrides"):
            lines.append(f"{key} = {toml_value(value)}")
    for item in subtables:
        key, value, *is_array = item
        lines += [""] + table_lines(f"{header}.{key}", value, bool(is_array))
    return lines


def policy_toml(policy: Any, comment: str) -> str:
    """A policy (sparse_compile.policy.Policy) as TOML text that loads back to the same policy."""
    data = policy.to_dict()
    lines = [f"# {line}" if line else "#" for line in comment.splitlines()]
    lines += [f"name = {toml_value(policy.name)}", f"description = {toml_value(policy.description)}", ""]
    for phase in ("prefill", "decode"):
        lines += table_lines(phase, data[phase]) + [""]
    return "\n".join(lines).rstrip() + "\n"


def run(args: argparse.Namespace) -> int:
    """`calibrate token_sparse`: measure drift, print it, write the policy when --out is given."""
    import dataclasses

    from sparse_compile.evaluation.corpus import default_corpus, load_corpus, tokenize, windows
    from sparse_compile.evaluation.device import resolve_device, resolve_dtype
    from sparse_compile.evaluation.models import load_model
    from sparse_compile.policy import LayerSet, load_policy, parse_toml, replace_phase

    if not 0.0 <= args.quantile <= 1.0 or math.isnan(args.quantile):
        raise ValueError(f"--quantile must be in [0, 1], got {args.quantile}")
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_policy(args.base)
    if base.prefill.method != METHOD:
        raise ValueError(f"--base {args.base!r}: its prefill method is {base.prefill.method!r}, not {METHOD!r}")
    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    corpus = load_corpus(args.corpus or default_corpus())
    model, tokenizer = load_model(args.model, dtype=dtype)
    model.to(device)
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
    layers = LayerSet.of(chosen).to_list()
    print(f"sparse layers: {layers}")
    if not args.out:
        return 0
    params = dataclasses.replace(base.prefill.params, layers=tuple(layers))
    name = args.name or f"{METHOD}-{Path(str(args.model)).stem}"
    description = (f"Token Sparse prefill on layers {layers} of {args.model} (representation drift at or below its "
                   f"{args.quantile} quantile); dropped_mass {params.dropped_mass}; dense decode.")
    policy = dataclasses.replace(replace_phase(base, "prefill", params=params), name=name, description=description)
    command = (f"python -m sparse_compile calibrate {METHOD} --model {args.model} --corpus {corpus.name} "
               f"--lengths {','.join(str(n) for n in args.lengths)} --windows {args.windows} "
               f"--quantile {args.quantile}")
    comment = (f"Token Sparse Attention on {args.model}: sparse layers = representation drift at or below its "
               f"{args.quantile} quantile.\nWritten by: {command}\nDrift per layer: "
               + ", ".join(f"{d:.3f}" for d in drift.tolist()))
    text = policy_toml(policy, comment)
    if parse_toml(text, str(args.out)).to_dict() != policy.to_dict():  # what we write loads back unchanged
        raise ValueError("internal error: the written policy does not load back to the calibrated one")
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")
    return 0
