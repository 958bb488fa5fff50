"""kernels/page_summary.py under the Triton interpreter: the one-launch page min/max merge equals its PyTorch
definition (scatter_reduce_ of the valid new keys) for decode steps, chunks and whole prefills from any slot, with
padding, pages past the cache's end and every dtype the cache holds; bad inputs name the problem."""

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples

from sparse_compile.kernels.page_summary import update_page_summaries, update_page_summaries_reference


def _summaries(B, Hkv, NP, D, dtype, gen):
    lo = torch.randn(B, Hkv, NP, D, generator=gen).to(dtype)
    hi = lo + torch.rand(B, Hkv, NP, D, generator=gen).to(dtype)
    empty = torch.rand(B, Hkv, NP, 1, generator=gen) < 0.3  # unwritten pages: +inf / -inf
    return lo.masked_fill(empty, float("inf")), hi.masked_fill(empty, float("-inf"))


@given(L=st.integers(1, 90), P=st.sampled_from([4, 8, 16]), first=st.integers(0, 89), n=st.integers(1, 40),
       heads=st.sampled_from([1, 3]), D=st.sampled_from([8, 12]), pad=st.floats(0.0, 0.5),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), seed=st.integers(0, 999))
@example(L=16, P=4, first=3, n=2, heads=1, D=8, pad=0.0, dtype=torch.float32, seed=0)  # 2 keys, 2 pages
@example(L=16, P=4, first=1, n=8, heads=1, D=8, pad=0.0, dtype=torch.float32, seed=0)  # 8 keys, 3 pages
@settings(max_examples=examples(30), deadline=None)
def test_update_equals_the_definition(L, P, first, n, heads, D, pad, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    first = min(first, L - 1)
    n = min(n, L - first)
    B, NP = 2, -(-L // P)
    lo, hi = _summaries(B, heads, NP, D, dtype, gen)
    k = torch.randn(B, heads, n, D, generator=gen).to(dtype)
    key_valid = torch.rand(B, L, generator=gen) >= pad
    pos = torch.arange(first, first + n)
    want_lo, want_hi = lo.clone(), hi.clone()
    update_page_summaries_reference(want_lo, want_hi, key_valid, pos, k, P)
    update_page_summaries(lo, hi, key_valid, pos, k, P)
    assert torch.equal(lo, want_lo) and torch.equal(hi, want_hi)


def test_a_decode_step_changes_only_its_page():
    gen = torch.Generator().manual_seed(0)
    lo, hi = _summaries(1, 2, 5, 8, torch.float32, gen)
    before_lo, before_hi = lo.clone(), hi.clone()
    k = 10.0 * torch.ones(1, 2, 1, 8)  # above every stored max
    update_page_summaries(lo, hi, torch.ones(1, 40, dtype=torch.bool), torch.tensor([17]), k, 8)  # page 2
    assert torch.equal(hi[:, :, 2], k[:, :, 0])
    assert torch.equal(lo[:, :, 2], torch.minimum(before_lo[:, :, 2], k[:, :, 0]))
    others = [0, 1, 3, 4]
    assert torch.equal(hi[:, :, others], before_hi[:, :, others])
    assert torch.equal(lo[:, :, others], before_lo[:, :, others])
    # a padded slot leaves its page alone
    update_page_summaries(lo, hi, torch.zeros(1, 40, dtype=torch.bool), torch.tensor([25]), -k, 8)
    assert torch.equal(lo[:, :, 3], before_lo[:, :, 3])


@pytest.mark.parametrize("change,needle", [
    (dict(page_max=torch.zeros(2, 3, 5, 8)), "do not fit"),
    (dict(k=torch.zeros(2, 3, 1, 8, dtype=torch.float16)), "differ"),
    (dict(key_valid=torch.ones(2, 16)), "bool"),
    (dict(pos=torch.arange(2)), "new slots"),
    (dict(page_size=6), "power of two"),
])
def test_bad_inputs_name_the_problem(change, needle):
    args = dict(page_min=torch.zeros(2, 3, 4, 8), page_max=torch.zeros(2, 3, 4, 8),
                key_valid=torch.ones(2, 16, dtype=torch.bool), pos=torch.arange(1), k=torch.zeros(2, 3, 1, 8),
                page_size=4)
    args.update(change)
    with pytest.raises(ValueError, match=needle):
        update_page_summaries(**args)
