"""What the calibration procedures share: the model and corpus windows from the common flags, the model's
attention sites, decode-step positions, a transformers attention implementation that records q/k, one pass
over the windows, and the policy TOML they write.

A decode step at position p is the query at p over the keys 0..p, so the queries of one prefill pass over
a window of text *are* decode steps: `decode_positions` spreads them over the window's second half.
"""

from __future__ import annotations

import argparse
import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import sparse_compile
from sparse_compile.argtypes import positive_int
from sparse_compile.evaluation.corpus import default_corpus, load_corpus, tokenize, windows
from sparse_compile.evaluation.device import resolve_device, resolve_dtype
from sparse_compile.evaluation.models import load_model


@dataclass
class CalibrationText:
    """The loaded model (and its tokenizer), its tokenized corpus windows and its prefill attention sites
    (by layer)."""

    model: Any
    corpus_name: str
    windows: list[tuple[int, torch.Tensor]]
    sites: dict[int, Any]
    device: torch.device
    tokenizer: Any = None


def load_calibration_text(args: argparse.Namespace) -> CalibrationText:
    """Model (--model, --device, --dtype), corpus windows (--corpus, --length, --samples) and the sites
    `explain` finds. Raises ValueError when the model has no RoPE attention site."""

    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    model, tokenizer = load_model(args.model, dtype=dtype)
    model = model.to(device)
    corpus = load_corpus(args.corpus or default_corpus())
    ids = tokenize(tokenizer, corpus.text)
    report = sparse_compile.explain(model, ids[None, :32].to(device), policy="dense")
    sites = {s.layer: s for s in report.sites if s.phase == "prefill"}
    if not sites:
        raise ValueError(f"no RoPE attention site found in {args.model}: nothing to calibrate")
    return CalibrationText(model, corpus.name, windows(ids, args.length, args.samples), sites, torch.device(device),
                           tokenizer)


def decode_positions(length: int, queries: int) -> list[int]:
    """`queries` query positions spread evenly over the second half of a `length`-token window."""
    half = length // 2
    return sorted({half + i * (length - 1 - half) // max(queries - 1, 1) for i in range(queries)})


def recording_attention(record: Callable[[int, torch.Tensor, torch.Tensor], None]) -> Callable:
    """A transformers attention function that hands each layer's post-RoPE q (H, L, D) and k (Hkv, L, D)
    of batch row 0 to `record(layer, q, k)`, then runs exact SDPA (the model's own output)."""
    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        record(int(module.layer_idx), query[0], key[0])
        group = query.shape[1] // key.shape[1]
        out = F.scaled_dot_product_attention(query, key.repeat_interleave(group, 1), value.repeat_interleave(group, 1),
                                             attn_mask=attention_mask, scale=scaling,
                                             is_causal=attention_mask is None and query.shape[2] > 1)
        return out.transpose(1, 2).contiguous(), None

    return attend


@contextlib.contextmanager
def attention_implementation(model: Any, name: str, attend: Callable) -> Iterator[None]:
    """Run the model with `attend` as its attention function (registered under `name`, with the SDPA
    mask builder) inside the block; the previous implementation is restored after it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(name, attend)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def write_policy(text: str, out: str | Path | None) -> None:
    """Write the calibrated policy's TOML to `out` (and say so), or print it when no file was given."""
    if out:
        Path(out).write_text(text)
        print(f"wrote {out}")
    else:
        print(text)


def record_windows(source: CalibrationText, name: str, record: Callable[[int, torch.Tensor, torch.Tensor], None],
                   progress: bool, before_window: Callable[[int], None] | None = None,
                   after_window: Callable[[int], None] | None = None) -> None:
    """One exact forward of the decoder per window with `record(layer, q, k)` seeing every layer's post-RoPE q/k
    (registered as attention implementation `name`); `before_window(i)` / `after_window(i)` run around window i."""
    with attention_implementation(source.model, name, recording_attention(record)):
        for i, (_, window) in enumerate(tqdm(source.windows, desc=f"{name} (windows)", disable=not progress)):
            if before_window is not None:
                before_window(i)
            with torch.no_grad():
                source.model.model(window[None].to(source.device))
            if after_window is not None:
                after_window(i)


def add_window_arguments(parser: argparse.ArgumentParser, queries: int) -> None:
    """--length, --samples, --queries: the text windows and the decode steps per window a procedure reads."""
    parser.add_argument("--length", type=positive_int, default=4096, help="tokens per text window (default 4096)")
    parser.add_argument("--samples", type=positive_int, default=2, help="text windows, evenly spaced over the corpus")
    parser.add_argument("--queries", type=positive_int, default=queries,
                        help=f"decode steps per window: query positions evenly spaced over its second half "
                             f"(default {queries})")


def check_budget(budget: float) -> None:
    """A budget is a whole number of tokens >= 1 or a fraction in (0, 1); ValueError otherwise."""
    if budget <= 0 or (budget >= 1 and budget != int(budget)):
        raise ValueError(f"--budget must be a whole number of tokens >= 1 or a fraction in (0, 1), got {budget}")


def check_at_least_one(args: argparse.Namespace, names: tuple[str, ...]) -> None:
    """ValueError naming the first flag of `names` whose value is < 1."""
    for name in names:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")


def toml_value(value: Any) -> str:
    """A TOML literal of a bool, number, string or list of them (ValueError for anything else)."""
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
    """`[header]` (or `[[header]]`) with the table's scalars and lists, then its sub-tables; None values and
    empty sub-tables are left out (they mean "the default")."""
    lines = [f"[[{header}]]" if array else f"[{header}]"]
    subtables = []
    for key, value in table.items():
        if value is None:
            continue
        if isinstance(value, dict):
            if value:  # an empty sub-table means the defaults: left out
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
    lines += [f"name = {toml_value(policy.name)}", f"description = {toml_value(policy.description)}"]
    lines += [f"warning = {toml_value(policy.warning)}"] if policy.warning else []
    lines += [""]
    for phase in ("prefill", "decode"):
        lines += table_lines(phase, data[phase]) + [""]
    return "\n".join(lines).rstrip() + "\n"
