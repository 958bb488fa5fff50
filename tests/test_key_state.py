"""kernels/key_state.py under the Triton interpreter: the per-key decode state built from the mask's structure
(causal position, sliding window, padding) equals attention_mask.visible_keys + kernels.fasa.key_state, with the
visible count, over several key blocks; bad arguments raise errors that name the problem."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples

from sparse_compile.kernels.key_state import BLOCK, key_state_from_mask, key_state_from_mask_reference


@given(
    B=st.integers(1, 3),
    L=st.integers(1, 3 * BLOCK + 7),
    behind=st.integers(0, 300),
    window=st.sampled_from([0, 1, 50, 2000]),
    padding=st.sampled_from(["none", "left", "random"]),
    sink=st.integers(0, 8),
    recent=st.integers(0, 80),
    seed=st.integers(0, 10_000),
)
@settings(max_examples=examples(15), deadline=None)
def test_state_equals_reference(B, L, behind, window, padding, sink, recent, seed):
    gen = torch.Generator().manual_seed(seed)
    q_pos = max(0, L - 1 - behind)  # a static cache: slots past the query are not written yet
    key_valid = None
    if padding == "left":
        pads = torch.randint(0, L, (B,), generator=gen)
        key_valid = torch.arange(L)[None, :] >= pads[:, None]
    elif padding == "random":
        key_valid = torch.rand(B, L, generator=gen) < 0.7
    kwargs = dict(q_pos=q_pos, window=window, key_valid=key_valid, sink=sink, recent=recent)
    state, n_visible = key_state_from_mask(B, L, impl="triton", **kwargs)
    ref_state, ref_n = key_state_from_mask_reference(B, L, **kwargs)
    assert state.dtype == torch.int8 and n_visible.dtype == torch.int32
    assert torch.equal(state, ref_state)
    assert torch.equal(n_visible, ref_n)


def test_forced_keys_are_the_first_and_last_visible():
    key_valid = torch.tensor([[False, False, True, True, True, True, True, False]])
    state, n = key_state_from_mask(1, 8, q_pos=6, key_valid=key_valid, sink=1, recent=2, impl="triton")
    assert state[0].tolist() == [0, 0, 2, 1, 1, 2, 2, 0] and n.tolist() == [5]


@pytest.mark.parametrize("bad, message", [
    (lambda: key_state_from_mask(2, 8, q_pos=7, key_valid=torch.ones(2, 9, dtype=torch.bool)), "key_valid must be"),
    (lambda: key_state_from_mask(1, 8, q_pos=7, sink=-1), "must be >= 0"),
    (lambda: key_state_from_mask(1, 8, q_pos=7, impl="cuda"), "impl"),
])
def test_bad_arguments_name_the_problem(bad, message):
    with pytest.raises(ValueError, match=message):
        bad()


def test_shared_key_state_op_equals_the_reference_and_the_node_checks_it():
    """`sparse_compile::key_state` (the node the pass shares across a decode step's layers) equals the reference
    with the StaticCache's host offset added; the attention node rejects a key state that does not fit its keys."""
    import sparse_compile.ops  # noqa: F401 - registers the ops
    from sparse_compile.ops import bind_key_state

    gen = torch.Generator().manual_seed(3)
    key_valid = torch.rand(2, 300, generator=gen) < 0.8
    state, n_visible = torch.ops.sparse_compile.key_state(key_valid, True, 100, 0, 4, 16,
                                                          q_offset_tensor=torch.tensor(150))
    ref_state, ref_n = key_state_from_mask_reference(2, 300, q_pos=250, key_valid=key_valid, sink=4, recent=16)
    assert torch.equal(state, ref_state) and torch.equal(n_visible, ref_n.to(torch.int32))

    q, k = torch.zeros(2, 4, 1, 8), torch.zeros(2, 2, 300, 8)
    assert bind_key_state(q, k, state, n_visible).state is state
    with pytest.raises(ValueError, match="key_state and n_visible come together"):
        bind_key_state(q, k, state, None)
    with pytest.raises(ValueError, match=r"key_state must be \(B, Lk\) = \(2, 300\) int8"):
        bind_key_state(q, k, state[:, :299], n_visible)
    with pytest.raises(ValueError, match="n_visible must be"):
        bind_key_state(q, k, state, n_visible.long())
