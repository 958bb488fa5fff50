"""Prism's query-aware sampled coverage (`sampled_threshold`, `sampled_queries`): `kernels.prism.sampled_blocks`
equals its definition written out in float64 over `visible_keys`, with every query sampled it is the top-p of the
exact block mass, the union with the pooled selection is what Prism attends to, and bad values are refused."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples
from test_prism import _key_valid
from test_prism_vertical import BOUNDARY, _qk

from sparse_compile.attention_mask import AttentionMask, SiteFacts, exact_attention_reference, visible_keys
from sparse_compile.kernels.block_mask import allowed_blocks
from sparse_compile.kernels.prism import local_blocks, query_valid, sample_positions, sampled_blocks
from sparse_compile.methods import prism
from sparse_compile.methods.prism import PrismParams
from sparse_compile.params import PolicyError, params_from_mapping


def sampled_definition(q, k, mask, b, s, p, scale):
    """(B, H, nq, nk) bool, float64, one query at a time: for query block m, its samples j = 0..s-1 sit at
    m*b + b-1 - (j*(b-1))//(s-1) (s = 1: the last query only); in a partial last block sample 0 is the last
    query and the samples at or past it are skipped. Each non-padding sample with a visible key adds its exact
    probabilities, summed per key block, to the block's mass; the block keeps the top-p of that mass over its
    allowed key blocks (rank by mass, ties to the lower block; keep while the mass before is < p; never a
    zero-mass block)."""
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
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
            for m in range(nq):
                first = min(m * b + b - 1, Lq - 1)
                mass = torch.zeros(nk, dtype=torch.float64)
                for j in range(s):
                    i = first if j == 0 else m * b + b - 1 - (j * (b - 1)) // (s - 1)
                    if (j > 0 and i >= first) or not q_ok[bi, i] or not vis[bi, i].any():
                        continue
                    probs = torch.softmax(((kh @ q[bi, h, i].double()) * scale).masked_fill(~vis[bi, i], -torch.inf), 0)
                    for t in range(Lk):
                        mass[t // b] += probs[t]
                row = torch.where(allowed[bi, m], mass, torch.zeros_like(mass))
                if row.sum() <= 0:
                    continue
                row = row / row.sum()
                before = 0.0
                for t in sorted(range(nk), key=lambda t: (-row[t].item(), t)):
                    if before >= p or row[t] <= 0:
                        break
                    out[bi, h, m, t] = True
                    before += row[t].item()
    return out


@pytest.mark.parametrize("Lq,b,s", [(16, 8, 2), (13, 8, 2), (13, 8, 3), (9, 8, 8), (5, 4, 1), (30, 8, 5)])
def test_sample_positions(Lq, b, s):
    pos, used = sample_positions(Lq, b, s)
    for m in range(-(-Lq // b)):
        last = min(m * b + b - 1, Lq - 1)
        spaced = [m * b + b - 1 - (j * (b - 1)) // (s - 1) for j in range(1, s)]
        want = sorted({last} | {i for i in spaced if i < last})
        got = sorted(pos[m][used[m]].tolist())
        assert got == want
        assert all(m * b <= i < min((m + 1) * b, Lq) for i in got)
        if s > 1 and m * b + b <= Lq:  # a whole block: its first and last queries are both samples
            assert got[0] == m * b and got[-1] == m * b + b - 1


@given(seed=st.integers(0, 2**16), Lk=st.integers(3, 40), chunk=st.sampled_from([1.0, 0.5]),
       pad=st.integers(0, 7), side=st.sampled_from(["left", "right"]), window=st.sampled_from([0, 9]),
       p=st.sampled_from([0.3, 0.8, 0.95]), b=st.sampled_from([4, 8]), s=st.sampled_from([1, 2, 3, 8]))
@settings(max_examples=examples(25), deadline=None)
def test_sampled_blocks_equal_the_definition(seed, Lk, chunk, pad, side, window, p, b, s):
    B, H, Hkv, D = 2, 4, 2, 8
    s = min(s, b)
    Lq = max(1, int(Lk * chunk))
    key_valid = _key_valid(B, Lk, min(pad, Lk - 1), side)
    q, k = _qk(B, H, Hkv, Lq, Lk, D, seed)
    mask = AttentionMask(q_offset=Lk - Lq, window=window, key_valid=key_valid)
    got = sampled_blocks(q, k, mask, block_size=b, samples=s, threshold=p, scale=0.4)
    low = sampled_definition(q, k, mask, b, s, p - BOUNDARY, 0.4)
    high = sampled_definition(q, k, mask, b, s, p + BOUNDARY, 0.4)
    assert got.shape == high.shape and got.dtype == torch.bool
    assert (got | ~low).all(), "a block the definition keeps at p - 1e-4 is missing"
    assert (~got | high).all(), "a block the definition drops at p + 1e-4 is kept"
    per_kv = sampled_blocks(q, k, mask, block_size=b, samples=s, threshold=p, scale=0.4, per_kv_head=True)
    assert torch.equal(per_kv, got.view(B, Hkv, H // Hkv, *got.shape[2:]).any(2))
    # chunking the query blocks (one at a time) changes nothing
    one = sampled_blocks(q, k, mask, block_size=b, samples=s, threshold=p, scale=0.4, chunk_bytes=1)
    assert torch.equal(got, one)


def test_every_query_sampled_is_the_exact_block_mass():
    """samples = block_size: the mass is the exact attention of every query of the block (the oracle)."""
    B, H, D, b, L = 1, 2, 16, 8, 40
    q, k = _qk(B, H, H, L, L, D, seed=5)
    mask = AttentionMask()
    probs = torch.softmax((q.double() @ k.double().transpose(-1, -2) * 0.3).masked_fill(
        ~visible_keys(mask, B, L, L), -torch.inf), -1)  # (B, H, L, L)
    nb = -(-L // b)
    mass = torch.nn.functional.pad(probs, (0, nb * b - L, 0, nb * b - L)).view(B, H, nb, b, nb, b).sum((3, 5))
    mass = mass / mass.sum(-1, keepdim=True)
    got = sampled_blocks(q, k, mask, block_size=b, samples=b, threshold=0.9, scale=0.3)
    for m in range(nb):
        for h in range(H):
            order = sorted(range(m + 1), key=lambda t: (-mass[0, h, m, t].item(), t))
            cum = torch.cumsum(mass[0, h, m, order], 0)
            n_keep = int((cum < 0.9 - 1e-9).sum()) + 1
            assert set(got[0, h, m].nonzero().flatten().tolist()) == set(order[:n_keep])


def test_sampled_keeps_a_far_block_only_where_its_queries_read_it():
    """Query-aware per block (unlike the vertical coverage): a far key block read by one query block's queries is
    kept there and not in the other query blocks, whose queries do not read it."""
    B, H, D, b, L = 1, 2, 16, 8, 64
    g = torch.Generator().manual_seed(0)
    k = torch.randn(B, H, L, D, generator=g)
    q = 0.1 * torch.randn(B, H, L, D, generator=g) + 3.0 * k  # each query reads its own key
    q[:, :, 40:48] = 3.0 * k[:, :, 9:10]  # but query block 5 reads key 9, in key block 1
    got = sampled_blocks(q, k, AttentionMask(), block_size=b, samples=4, threshold=0.5, scale=1.0)
    assert got[0, :, 5, 1].all()
    assert not got[0, :, 6:, 1].any() and not got[0, :, 2:5, 1].any()
    assert got[0, :, torch.arange(8), torch.arange(8)][:, [0, 1, 2, 3, 4, 6, 7]].all()


@pytest.mark.parametrize("gqa", ["per_head", "per_kv_head"])
@pytest.mark.parametrize("pad", [0, 5])
def test_prism_with_sampled_attends_to_the_union(gqa, pad):
    B, H, Hkv, D, b, L = 2, 4, 2, 16, 16, 117
    q, k = _qk(B, H, Hkv, L, L, D, seed=3)
    v = torch.randn(B, Hkv, L, D, generator=torch.Generator().manual_seed(4))
    mask = AttentionMask(key_valid=_key_valid(B, L, pad, "left"))
    site = SiteFacts(rotary_dim=D, head_dim=D, num_heads=H, num_kv_heads=Hkv)
    plain = PrismParams(threshold_high=0.3, threshold_low=0.3, gqa=gqa)
    with_sampled = PrismParams(threshold_high=0.3, threshold_low=0.3, gqa=gqa, sampled_threshold=0.9,
                               sampled_queries=4)
    base = prism.prism_select(q, k, mask, site, plain, block_size=b)
    union = prism.prism_select(q, k, mask, site, with_sampled, block_size=b, scale=0.25)
    extra = prism.sampled(q, k, mask, with_sampled, b, 0.25)
    assert torch.equal(union.to_dense(), base.to_dense() | extra)
    assert not torch.equal(union.to_dense(), base.to_dense()), "the coverage added nothing: a vacuous test"
    added = prism.add_coverage(base, q, k, mask, with_sampled, 0.25)  # the CUDA path's union
    assert added.kv_indices.shape[-1] == base.num_kv_blocks
    assert torch.equal(added.to_dense(), union.to_dense())
    out, density = prism.attention(q, k, v, mask, site, with_sampled, scale=0.25, block_size=b)
    tok = union.to_dense().repeat_interleave(H // union.to_dense().shape[1], 1)
    tok = tok.repeat_interleave(b, 2).repeat_interleave(b, 3)[:, :, :L, :L]
    want = exact_attention_reference(q, k, v, AttentionMask(key_valid=mask.key_valid, dense_mask=tok), scale=0.25)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
    assert torch.equal(density, prism.selection_density(union, mask, H))


@pytest.mark.parametrize("key,value", [("sampled_threshold", -0.1), ("sampled_threshold", 1.5),
                                       ("sampled_queries", 0), ("sampled_queries", 129), ("sampled_queries", 2.5)])
def test_sampled_values_out_of_range_are_refused(key, value):
    with pytest.raises(PolicyError, match=key):
        params_from_mapping(PrismParams, {key: value}, "prefill.params")


def test_more_samples_than_a_block_is_refused():
    with pytest.raises(PolicyError, match="sampled_queries = 100 exceeds block_size = 64"):
        params_from_mapping(PrismParams, {"block_size": 64, "sampled_queries": 100, "sampled_threshold": 0.9},
                            "prefill.params")


def local_definition(mask, B, Lq, Lk, b, window):
    """(B, nq, nk) bool, one position at a time: key block n is kept for query block m iff some key position j
    with first(m) - window <= j < first(m) (first(m) = q_offset + m*b, j >= 0) lies in block n and the block is
    allowed for m."""
    kv_valid = mask.key_valid if mask.key_valid is not None else torch.ones(B, Lk, dtype=torch.bool)
    allowed = allowed_blocks(Lq, Lk, b, causal=mask.causal, q_offset=mask.q_offset, window=mask.window,
                             key_valid=kv_valid)
    nq, nk = -(-Lq // b), -(-Lk // b)
    out = torch.zeros(B, nq, nk, dtype=torch.bool)
    for m in range(nq):
        first = mask.q_offset + m * b
        for j in range(max(0, first - window), first):
            out[:, m, j // b] = True
    return out & allowed


@given(Lk=st.integers(1, 60), chunk=st.sampled_from([1.0, 0.5]), pad=st.integers(0, 9),
       window=st.sampled_from([0, 13]), b=st.sampled_from([4, 8]), local=st.integers(0, 20))
@settings(max_examples=examples(40), deadline=None)
def test_local_blocks_equal_the_definition(Lk, chunk, pad, window, b, local):
    B, Lq = 2, max(1, int(Lk * chunk))
    mask = AttentionMask(q_offset=Lk - Lq, window=window, key_valid=_key_valid(B, Lk, min(pad, Lk - 1), "left"))
    allowed = allowed_blocks(Lq, Lk, b, causal=True, q_offset=mask.q_offset, window=window,
                             key_valid=mask.key_valid).expand(B, -1, -1)
    got = local_blocks(mask, allowed, Lq, b, local)
    assert torch.equal(got, local_definition(mask, B, Lq, Lk, b, local))


@pytest.mark.parametrize("gqa", ["per_head", "per_kv_head"])
def test_prism_with_local_window_attends_to_the_previous_blocks(gqa):
    """local_window = b keeps each query block's previous key block (where it is allowed) on top of the rest."""
    B, H, Hkv, D, b, L = 2, 4, 2, 16, 16, 117
    q, k = _qk(B, H, Hkv, L, L, D, seed=7)
    mask = AttentionMask(key_valid=_key_valid(B, L, 5, "left"))
    site = SiteFacts(rotary_dim=D, head_dim=D, num_heads=H, num_kv_heads=Hkv)
    plain = PrismParams(threshold_high=0.1, threshold_low=0.1, gqa=gqa, sampled_threshold=0.5, sampled_queries=2)
    with_local = PrismParams(threshold_high=0.1, threshold_low=0.1, gqa=gqa, sampled_threshold=0.5,
                             sampled_queries=2, local_window=b)
    base = prism.prism_select(q, k, mask, site, plain, block_size=b, scale=0.25).to_dense()
    union = prism.prism_select(q, k, mask, site, with_local, block_size=b, scale=0.25).to_dense()
    near = local_definition(mask, B, L, L, b, b)[:, None]
    assert torch.equal(union, base | near)
    assert not torch.equal(union, base), "the local window added nothing: a vacuous test"
    assert near[:, 0, torch.arange(1, near.shape[2]), torch.arange(near.shape[2] - 1)].all()


def test_local_window_out_of_range_is_refused():
    with pytest.raises(PolicyError, match="local_window"):
        params_from_mapping(PrismParams, {"local_window": -1}, "prefill.params")
