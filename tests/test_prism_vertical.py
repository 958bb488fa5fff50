"""Prism's query-aware vertical coverage (`vertical_threshold`): `kernels.prism.vertical_blocks` equals its
definition written out in float64 over `visible_keys`, the union with the pooled selection is what Prism
attends to (also through `add_coverage`, the CUDA path's full-width lists), and bad values are refused."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples
from test_prism import _key_valid

from sparse_compile.attention_mask import AttentionMask, SiteFacts, exact_attention_reference, visible_keys
from sparse_compile.kernels.block_mask import BlockList, allowed_blocks
from sparse_compile.kernels.prism import query_valid, vertical_blocks
from sparse_compile.methods import prism
from sparse_compile.methods.prism import PrismParams
from sparse_compile.params import PolicyError, params_from_mapping

BOUNDARY = 1e-4  # fp32 (the function) vs float64 (the definition) at the top-p boundary


def _qk(B, H, Hkv, Lq, Lk, D, seed):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, Hkv, Lk, D, generator=g)
    # queries aligned with a few random keys: peaked, uneven mass over the key blocks
    pick = torch.randint(0, Lk, (B, H, Lq), generator=g)
    kk = k.repeat_interleave(H // Hkv, dim=1)
    q = 0.5 * torch.randn(B, H, Lq, D, generator=g) + 1.5 * kk.gather(2, pick[..., None].expand(-1, -1, -1, D))
    return q, k


def vertical_definition(q, k, mask, b, p, scale):
    """(B, H, nq, nk) bool, float64, one row at a time: the exact attention probabilities of the last
    min(b, Lq) non-padding queries, summed per key block; per query block the top-p of that mass over its
    allowed key blocks (rank by mass, ties to the lower block; keep while the mass before is < p; never a
    zero-mass block)."""
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    n = min(b, Lq)
    vis = visible_keys(mask, B, Lq, Lk)[:, 0]  # (B, Lq, Lk)
    kv_valid = mask.key_valid if mask.key_valid is not None else torch.ones(B, Lk, dtype=torch.bool)
    q_ok = query_valid(mask, kv_valid, Lq)
    nq, nk = -(-Lq // b), -(-Lk // b)
    allowed = allowed_blocks(Lq, Lk, b, causal=mask.causal, q_offset=mask.q_offset, window=mask.window,
                             key_valid=kv_valid)
    out = torch.zeros(B, H, nq, nk, dtype=torch.bool)
    for bi in range(B):
        for h in range(H):
            kh = k[bi, h // (H // Hkv)].double()
            mass = torch.zeros(nk, dtype=torch.float64)
            for i in range(Lq - n, Lq):
                if not q_ok[bi, i] or not vis[bi, i].any():
                    continue
                logits = (kh @ q[bi, h, i].double()) * scale
                probs = torch.softmax(logits.masked_fill(~vis[bi, i], float("-inf")), 0)
                for j in range(Lk):
                    mass[j // b] += probs[j]
            for m in range(nq):
                row = torch.where(allowed[bi, m], mass, torch.zeros_like(mass))
                if row.sum() <= 0:
                    continue
                row = row / row.sum()
                before = 0.0
                for j in sorted(range(nk), key=lambda j: (-row[j].item(), j)):
                    if before >= p or row[j] <= 0:
                        break
                    out[bi, h, m, j] = True
                    before += row[j].item()
    return out


@given(seed=st.integers(0, 2**16), Lk=st.integers(3, 40), chunk=st.sampled_from([1.0, 0.5]),
       pad=st.integers(0, 7), side=st.sampled_from(["left", "right"]), window=st.sampled_from([0, 9]),
       p=st.sampled_from([0.3, 0.8, 0.95]), b=st.sampled_from([4, 8]))
@settings(max_examples=examples(25), deadline=None)
def test_vertical_blocks_equal_the_definition(seed, Lk, chunk, pad, side, window, p, b):
    B, H, Hkv, D = 2, 4, 2, 8
    Lq = max(1, int(Lk * chunk))
    key_valid = _key_valid(B, Lk, min(pad, Lk - 1), side)
    q, k = _qk(B, H, Hkv, Lq, Lk, D, seed)
    mask = AttentionMask(q_offset=Lk - Lq, window=window, key_valid=key_valid)
    got = vertical_blocks(q, k, mask, block_size=b, threshold=p, scale=0.4)
    low = vertical_definition(q, k, mask, b, p - BOUNDARY, 0.4)
    high = vertical_definition(q, k, mask, b, p + BOUNDARY, 0.4)
    assert got.shape == high.shape and got.dtype == torch.bool
    assert (got | ~low).all(), "a block the definition keeps at p - 1e-4 is missing"
    assert (~got | high).all(), "a block the definition drops at p + 1e-4 is kept"
    # per_kv_head: the union over each KV head's group
    per_kv = vertical_blocks(q, k, mask, block_size=b, threshold=p, scale=0.4, per_kv_head=True)
    assert torch.equal(per_kv, got.view(B, Hkv, H // Hkv, *got.shape[2:]).any(2))
    # chunking the heads changes nothing
    assert torch.equal(got, vertical_blocks(q, k, mask, block_size=b, threshold=p, scale=0.4, heads_per_chunk=1))


def test_vertical_keeps_the_far_block_the_last_queries_read():
    """A key block far from the diagonal that the last queries attend to is kept for every query block that
    can see it, although no pooled estimate is involved."""
    B, H, D, b, L = 1, 2, 16, 8, 64
    g = torch.Generator().manual_seed(0)
    k = torch.randn(B, H, L, D, generator=g)
    q = 0.1 * torch.randn(B, H, L, D, generator=g)
    q[:, :, -b:] += 3.0 * k[:, :, 9:10]  # the last block's queries read key 9, in key block 1
    got = vertical_blocks(q, k, AttentionMask(), block_size=b, threshold=0.5, scale=1.0)
    assert got[0, :, 1:, 1].all() and not got[0, :, 0, 1].any()  # block 1 from query block 1 on


@pytest.mark.parametrize("gqa", ["per_head", "per_kv_head"])
@pytest.mark.parametrize("pad", [0, 5])
def test_prism_with_vertical_attends_to_the_union(gqa, pad):
    B, H, Hkv, D, b, L = 2, 4, 2, 16, 16, 117
    q, k = _qk(B, H, Hkv, L, L, D, seed=3)
    v = torch.randn(B, Hkv, L, D, generator=torch.Generator().manual_seed(4))
    mask = AttentionMask(key_valid=_key_valid(B, L, pad, "left"))
    site = SiteFacts(rotary_dim=D, head_dim=D, num_heads=H, num_kv_heads=Hkv)
    plain = PrismParams(threshold_high=0.3, threshold_low=0.3, gqa=gqa)
    with_vertical = PrismParams(threshold_high=0.3, threshold_low=0.3, gqa=gqa, vertical_threshold=0.9)
    base = prism.prism_select(q, k, mask, site, plain, block_size=b)
    union = prism.prism_select(q, k, mask, site, with_vertical, block_size=b, scale=0.25)
    extra = prism.vertical(q, k, mask, with_vertical, b, 0.25)
    assert torch.equal(union.to_dense(), base.to_dense() | extra)
    assert not torch.equal(union.to_dense(), base.to_dense()), "the coverage added nothing: a vacuous test"
    # the CUDA path's union: full-width lists, the same blocks
    added = prism.add_coverage(base, q, k, mask, with_vertical, 0.25)
    assert added.kv_indices.shape[-1] == base.num_kv_blocks
    assert torch.equal(added.to_dense(), union.to_dense())
    # attention: exact attention on the union's blocks, density counted on the union
    out, density = prism.attention(q, k, v, mask, site, with_vertical, scale=0.25, block_size=b)
    tok = union.to_dense().repeat_interleave(H // union.to_dense().shape[1], 1)
    tok = tok.repeat_interleave(b, 2).repeat_interleave(b, 3)[:, :, :L, :L]
    want = exact_attention_reference(q, k, v, AttentionMask(key_valid=mask.key_valid, dense_mask=tok), scale=0.25)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
    assert (density >= prism.selection_density(base, mask, H)).all()
    assert torch.equal(density, prism.selection_density(union, mask, H))


@pytest.mark.parametrize("value", [-0.1, 1.5, "0.9"])
def test_vertical_threshold_out_of_range_is_refused(value):
    with pytest.raises(PolicyError, match="vertical_threshold"):
        params_from_mapping(PrismParams, {"vertical_threshold": value}, "prefill.params")


def test_from_dense_width_bounds():
    mask = torch.tensor([[[[True, False, True], [False, True, False]]]])
    full = BlockList.from_dense(mask, 4, 8, 12, max_blocks=3)
    assert full.kv_indices.shape[-1] == 3 and torch.equal(full.to_dense(), mask)
    with pytest.raises(ValueError, match="max_blocks"):
        BlockList.from_dense(mask, 4, 8, 12, max_blocks=4)
