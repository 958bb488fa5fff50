"""benchmarks/model.py's decode timing on the CPU: `StepMarks` marks every generate() step without changing what
is generated, and the decode time it gives excludes the prefill."""

from __future__ import annotations

import torch
from test_sparse_cache import tiny_llama
from transformers import StaticCache

from sparse_compile.benchmarks.model import StepMarks, timed_generate


def test_step_marks_time_the_decode_steps_and_change_nothing():
    model = tiny_llama(2)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    cache = StaticCache(config=model.config, max_cache_len=32)
    _, plain = timed_generate(model, ids, cache, 6)
    marks = StepMarks(ids.device)
    seconds, marked = timed_generate(model, ids, cache, 6, marks)
    assert torch.equal(plain, marked)  # the criterion never stops generation early
    assert len(marks.marks) == 6  # one mark per new token: after the prefill's, then after each decode step
    assert all(b >= a for a, b in zip(marks.marks, marks.marks[1:], strict=False))
    assert 0.0 < marks.decode_seconds() < seconds  # the prefill (before the first mark) is not in it
    assert StepMarks(ids.device).decode_seconds() == 0.0
