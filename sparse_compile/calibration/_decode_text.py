"""What the decode calibrations (`calibrate fasa`, `calibrate lessismore`) share: the model and corpus
from the common flags, the model's attention sites, the decode-step positions of a window, and a
transformers attention implementation registered for the duration of a pass.

A decode step at position p is the query at p over the keys 0..p, so the queries of one prefill pass over
a window of text *are* decode steps: `decode_positions` spreads them over the window's second half.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass
class CalibrationText:
    """The loaded model, its tokenized corpus windows and its prefill attention sites (by layer)."""

    model: Any
    corpus_name: str
    windows: list[tuple[int, torch.Tensor]]
    sites: dict[int, Any]
    device: torch.device


def load_calibration_text(args: argparse.Namespace) -> CalibrationText:
    """Model (--model, --device, --dtype), corpus windows (--corpus, --length, --samples) and the sites
    `explain` finds. Raises ValueError when the model has no RoPE attention site."""
    import sparse_compile
    from sparse_compile.evaluation.corpus import default_corpus, load_corpus, tokenize, windows
    from sparse_compile.evaluation.device import resolve_device, resolve_dtype
    from sparse_compile.evaluation.models import load_model

    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    model, tokenizer = load_model(args.model, dtype=dtype)
    model = model.to(device)
    corpus = load_corpus(args.corpus or default_corpus())
    ids = tokenize(tokenizer, corpus.text)
    report = sparse_compile.explain(model, ids[None, :32].to(device), policy="dense")
    sites = {s.layer: s for s in report.sites if s.phase == "prefill"}
    if not sites:
        raise ValueError(f"no RoPE attention site found in {args.model}: nothing to calibrate")
    return CalibrationText(model, corpus.name, windows(ids, args.length, args.samples), sites, torch.device(device))


def decode_positions(length: int, queries: int) -> list[int]:
    """`queries` query positions spread evenly over the second half of a `length`-token window."""
    half = length // 2
    return sorted({half + i * (length - 1 - half) // max(queries - 1, 1) for i in range(queries)})


def recording_attention(record: Callable[[int, torch.Tensor, torch.Tensor], None]) -> Callable:
    """A transformers attention function that hands each layer's post-RoPE q (H, L, D) and k (Hkv, L, D)
    of batch row 0 to `record(layer, q, k)`, then runs exact SDPA (the model's own output)."""
    import torch.nn.functional as F

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
