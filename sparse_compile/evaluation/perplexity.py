"""Perplexity of a causal LM over fixed token windows: one forward per window, float32, no grad.

A window of L tokens scores its L - 1 next-token predictions (every token but the first, each
with all earlier tokens of the window as context). PPL over a set of windows is
exp(sum of NLL / number of scored tokens).

Two views that whole-window PPL hides (`eval --tasks continuation,decode`):
  continuation  the last `last` predictions of the same forward: their NLL and their argmax (compared
                with the eager model's: top-1 agreement). A method that drops tokens degrades their own
                predictions by design; a continuation starts from the always-kept end of the prompt.
  decode        a prompt of L tokens prefilled through a KV cache (a DynamicCache unless one is given), then
                the next real tokens fed one
                at a time (teacher forcing: every policy sees the same tokens): NLL and argmax of each
                step's prediction. Decode methods act only here.
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


def window_scores(forward: LogitsFn, ids: torch.Tensor, last: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token NLL (L - 1,) float32, argmax of the last `last` predictions (last,) int64) of one window."""
    if ids.dim() != 1 or ids.numel() < last + 1:
        raise ValueError(f"a window must be a 1-D tensor of > {last} token ids, got shape {tuple(ids.shape)}")
    with torch.no_grad():
        logits = forward(ids[None])  # (1, L, V)
        nll = F.cross_entropy(logits[0, :-1].float(), ids[1:].to(logits.device), reduction="none")
        return nll, logits[0, -last - 1:-1].argmax(-1)


def decode_scores(model: Any, config: Any, ids: torch.Tensor, prompt_len: int,
                  after_step: Callable[[], None] | None = None, cache: Any = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced decode: prefill ids[:prompt_len] into `cache` (an empty transformers Cache with room for
    len(ids) - 1 tokens, e.g. a StaticCache or a sparse_compile.SparseCache; None: a new DynamicCache), then
    feed ids[prompt_len:-1] one token per call. Returns (NLL (S,) float32, argmax (S,) int64) of the
    S = len(ids) - prompt_len predictions of ids[prompt_len:]. `after_step` runs after every decode call (to read
    the Report's densities)."""
    from transformers import DynamicCache

    from sparse_compile.cache import cache_kwargs, returned_cache

    cache = DynamicCache(config=config) if cache is None else cache
    with torch.no_grad():
        out = model(input_ids=ids[None, :prompt_len], **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
        logits = [out.logits[0, -1].float()]
        for t in range(prompt_len, ids.numel() - 1):
            out = model(input_ids=ids[None, t:t + 1], **cache_kwargs(model, returned_cache(out)), use_cache=True)
            logits.append(out.logits[0, -1].float())
            if after_step is not None:
                after_step()
        steps = torch.stack(logits)  # (S, V)
        return F.cross_entropy(steps, ids[prompt_len:].to(steps.device), reduction="none"), steps.argmax(-1)
