"""Perplexity of a causal LM over fixed token windows: one forward per window, float32, no grad.

A window of L tokens scores its L - 1 next-token predictions (every token but the first, each
with all earlier tokens of the window as context). PPL over a set of windows is
exp(sum of NLL / number of scored tokens).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def logits_fn(model: Any, device: torch.device | str | None = None) -> LogitsFn:
    """input_ids (B, L) -> logits (B, L, V) of an HF causal LM (eager or compiled).

    The call is the plain `model(input_ids)` a user makes (with the model's default `use_cache`),
    so the graph the backend sees is the one a user's prefill produces. device: where the model
    lives (the ids are moved there); None leaves them where they are.
    """

    def run(input_ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=input_ids if device is None else input_ids.to(device)).logits

    return run


def window_nll(forward: LogitsFn, ids: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood of one window.

    ids: (L,) int64. Returns (L - 1,) float32: -log p(ids[t + 1] | ids[:t + 1]).
    """
    if ids.dim() != 1 or ids.numel() < 2:
        raise ValueError(f"a window must be a 1-D tensor of >= 2 token ids, got shape {tuple(ids.shape)}")
    with torch.no_grad():
        logits = forward(ids[None])  # (1, L, V)
        return F.cross_entropy(logits[0, :-1].float(), ids[1:].to(logits.device), reduction="none")


def nll_summary(nll: torch.Tensor) -> dict[str, Any]:
    """The numbers kept per window: NLL sum (float64 accumulation of the float32 terms) and count."""
    return {"nll_sum": float(nll.double().sum().cpu()), "tokens": int(nll.numel())}


def perplexity(windows: list[dict[str, Any]]) -> float:
    """exp(total NLL / total scored tokens) over window summaries from `nll_summary`."""
    tokens = sum(w["tokens"] for w in windows)
    if tokens == 0:
        raise ValueError("no scored tokens")
    return math.exp(sum(w["nll_sum"] for w in windows) / tokens)
