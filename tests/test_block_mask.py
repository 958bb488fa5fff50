"""BlockList: the block-list format's round trips, causal_full, density and repr."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sparse_compile.kernels import BlockList
from sparse_compile.kernels.block_mask import causal_block_mask


def _brute_causal_blocks(q_len, kv_len, bs, q_offset):
    """Token-level causal visibility pooled to blocks (any visible pair -> block allowed)."""
    i = torch.arange(q_len)[:, None] + q_offset
    j = torch.arange(kv_len)[None, :]
    vis = (j <= i).float()
    nq, nk = -(-q_len // bs), -(-kv_len // bs)
    pad = torch.zeros(nq * bs, nk * bs)
    pad[:q_len, :kv_len] = vis
    return pad.view(nq, bs, nk, bs).amax(dim=(1, 3)) > 0


@given(
    B=st.integers(1, 2), Hm=st.integers(1, 3), q_len=st.integers(1, 200), kv_len=st.integers(1, 200),
    bs=st.sampled_from([16, 32, 64]), p=st.floats(0.0, 1.0), seed=st.integers(0, 2**16),
)
def test_from_dense_to_dense_round_trip(B, Hm, q_len, kv_len, bs, p, seed):
    g = torch.Generator().manual_seed(seed)
    nq, nk = -(-q_len // bs), -(-kv_len // bs)
    dense = torch.rand(B, Hm, nq, nk, generator=g) < p
    bl = BlockList.from_dense(dense, bs, q_len, kv_len)
    assert bl.kv_num_blocks.dtype == torch.int32 and bl.kv_indices.dtype == torch.int32
    assert tuple(bl.kv_num_blocks.shape) == (B, Hm, nq)
    assert bl.kv_indices.shape[:3] == (B, Hm, nq) and bl.kv_indices.shape[3] >= 1
    assert torch.equal(bl.to_dense(), dense)
    # undefined entries may hold anything: scribbling on them changes nothing
    slot = torch.arange(bl.kv_indices.shape[-1])
    junk = torch.where(slot < bl.kv_num_blocks[..., None], bl.kv_indices, torch.full_like(bl.kv_indices, 10**6))
    assert torch.equal(BlockList(bl.kv_num_blocks, junk, bs, q_len, kv_len).to_dense(), dense)


@given(q_len=st.integers(1, 300), extra=st.integers(0, 200), bs=st.sampled_from([16, 32, 128]),
       shift=st.integers(-40, 40))
def test_causal_full_matches_token_causality(q_len, extra, bs, shift):
    kv_len = q_len + extra
    q_offset = kv_len - q_len + shift
    expect = _brute_causal_blocks(q_len, kv_len, bs, q_offset)
    assert torch.equal(causal_block_mask(q_len, kv_len, bs, q_offset), expect)
    bl = BlockList.causal_full(2, 3, q_len, kv_len, bs, q_offset)
    assert torch.equal(bl.to_dense(), expect.expand(2, 3, *expect.shape))
    dens = bl.density(causal=True, q_offset=q_offset)
    assert dens.shape == (2, 3) and dens.dtype == torch.float32
    if expect.any():
        assert torch.allclose(dens, torch.ones(2, 3))


def test_density_counts_selected_over_causal():
    # 4 x 4 blocks, square, causal: 10 allowed blocks; select the diagonal (4) plus one block above it
    dense = torch.eye(4, dtype=torch.bool)
    dense[0, 3] = True  # not allowed by causality: not counted
    bl = BlockList.from_dense(dense[None, None], 32, 128, 128)
    assert torch.allclose(bl.density(), torch.tensor([[0.4]]))
    assert torch.allclose(bl.density(causal=False), torch.tensor([[5 / 16]]))
    empty = BlockList.from_dense(torch.zeros(1, 2, 4, 4, dtype=torch.bool), 32, 128, 128)
    assert torch.equal(empty.density(), torch.zeros(1, 2))


def test_repr_is_shapes_only():
    bl = BlockList.causal_full(1, 2, 300, 300, 128)
    r = repr(bl)
    assert "kv_num_blocks=(1, 2, 3)" in r and "kv_indices=(1, 2, 3, 3)" in r and "tensor" not in r


def test_from_dense_rejects_bad_masks():
    with pytest.raises(ValueError, match="bool"):
        BlockList.from_dense(torch.ones(1, 1, 2, 2), 16, 32, 32)
    with pytest.raises(ValueError, match="expected"):
        BlockList.from_dense(torch.ones(1, 1, 2, 3, dtype=torch.bool), 16, 32, 32)
