"""Needle-in-a-haystack retrieval, generated locally in the style of RULER's `niah_single`.

A sample of `length` tokens (exactly) is

    PREFIX + haystack[: a] + NEEDLE + haystack[a :] + QUESTION

where the haystack is a slice of the corpus tokens starting at a seeded random offset, the needle
is "One of the special magic numbers for {key} is: {value}." with a seeded key word and a 7-digit
value, and `depth` = a / (haystack tokens) places it (0: right after the prefix, 1: right before
the question). The model answers by greedy decoding through a KV cache (prefill, then decode
steps), so prefill and decode methods are both exercised. Score: 1 when the value appears in
the decoded answer (RULER's string match), else 0.

Every choice is a function of (seed, length, depth, index): the same samples on every run.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

PREFIX = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize them. "
    "I will quiz you about the numbers afterwards.\n"
)
NEEDLE = "\nOne of the special magic numbers for {key} is: {value}.\n"
QUESTION = (
    "\nWhat is the special magic number for {key} mentioned in the provided text? "
    "The special magic number for {key} mentioned in the provided text is"
)
KEYS = (
    "apple", "river", "piano", "falcon", "lantern", "meadow", "copper", "harbor", "violet", "glacier",
    "thunder", "orchard", "saddle", "compass", "marble", "willow", "beacon", "canyon", "ember", "quartz",
    "tulip", "anchor", "prairie", "zephyr", "cobalt", "juniper", "basalt", "heron", "mosaic", "summit",
)


@dataclass(frozen=True)
class NeedleSample:
    """One retrieval prompt: `input_ids` (exactly `length` tokens) hides `value` under `key`."""

    length: int
    depth: float
    index: int
    key: str
    value: str
    needle_start: int
    input_ids: tuple[int, ...]


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def make_sample(
    tokenizer: Any, haystack: torch.Tensor, length: int, depth: float, index: int = 0, seed: int = 0
) -> NeedleSample:
    """The sample for (length, depth, index) under `seed`; haystack: (N,) corpus token ids."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"needle depth must be in [0, 1], got {depth}")
    rng = random.Random(f"niah:{seed}:{length}:{depth!r}:{index}")
    key = rng.choice(KEYS)
    value = str(rng.randint(1_000_000, 9_999_999))
    prefix, needle = encode(tokenizer, PREFIX), encode(tokenizer, NEEDLE.format(key=key, value=value))
    question = encode(tokenizer, QUESTION.format(key=key))
    n_hay = length - len(prefix) - len(needle) - len(question)
    if n_hay < 0:
        raise ValueError(f"NIAH length {length} is shorter than the prompt without haystack ({length - n_hay})")
    if haystack.numel() < n_hay:
        raise ValueError(f"the corpus has {haystack.numel()} tokens, fewer than the {n_hay} haystack tokens needed")
    start = rng.randint(0, haystack.numel() - n_hay)
    hay = haystack[start:start + n_hay].tolist()
    cut = round(depth * n_hay)
    ids = prefix + hay[:cut] + needle + hay[cut:] + question
    assert len(ids) == length, f"NIAH sample has {len(ids)} tokens, expected {length}"
    return NeedleSample(length, depth, index, key, value, len(prefix) + cut, tuple(ids))


def make_grid(
    tokenizer: Any, haystack: torch.Tensor, lengths: tuple[int, ...], depths: tuple[float, ...],
    samples: int = 1, seed: int = 0,
) -> list[NeedleSample]:
    """Every (length, depth, index) sample, lengths outermost."""
    return [
        make_sample(tokenizer, haystack, length, depth, i, seed)
        for length in lengths for depth in depths for i in range(samples)
    ]


def greedy_generate(
    model: Any, config: Any, input_ids: torch.Tensor, max_new_tokens: int, eos_ids: set[int],
    after_prefill: Callable[[], None] | None = None, cache: Any = None,
) -> list[int]:
    """Greedy decoding through a KV cache: one prefill call, then one call per new token.

    model: an HF causal LM or its compiled module; input_ids: (L,) int64 on the model's device. cache: an empty
    transformers Cache with room for L + max_new_tokens - 1 tokens (a StaticCache, a sparse_compile.SparseCache),
    or None: a new DynamicCache. Returns the new token ids (stops after an EOS id). `after_prefill` runs right
    after the prefill call (to read densities).
    """
    from transformers import DynamicCache

    from sparse_compile.cache import cache_kwargs, returned_cache

    cache = DynamicCache(config=config) if cache is None else cache
    out_ids: list[int] = []
    with torch.no_grad():
        out = model(input_ids=input_ids[None], **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
        if after_prefill is not None:
            after_prefill()
        for step in range(max_new_tokens):
            token = int(out.logits[0, -1].argmax())
            out_ids.append(token)
            if token in eos_ids or step == max_new_tokens - 1:
                break
            out = model(input_ids=torch.tensor([[token]], device=input_ids.device),
                        **cache_kwargs(model, returned_cache(out)), use_cache=True)
    return out_ids


def score(answer: str, value: str) -> float:
    """RULER's string match: 1.0 when the needle's value occurs in the answer, else 0.0."""
    return 1.0 if value.lower() in answer.lower() else 0.0


def eos_token_ids(tokenizer: Any, config: Any) -> set[int]:
    """EOS ids from the tokenizer and the model's generation/config (any may be a list or None)."""
    ids: set[int] = set()
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids
