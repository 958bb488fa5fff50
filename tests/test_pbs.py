"""PBS-Attn (`pbs`): permutation invariance, exactness at threshold 1.0, causality on original positions,
the Triton engine equal to its reference on permuted keys, fallbacks, and a compiled model."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples
from test_backend import tiny_llama

import sparse_compile
from sparse_compile.attention_mask import AttentionMask, SiteFacts, exact_attention_reference, visible_keys
from sparse_compile.kernels.block_sparse_attention import block_sparse_attention
from sparse_compile.kernels.pbs import ORDER_HIDDEN, key_scores, key_scores_triton, segment_permutation
from sparse_compile.methods import pbs
from sparse_compile.ops import CallShape
from sparse_compile.params import PolicyError, params_from_mapping


@st.composite
def problems(draw):
    """A PBS call: GQA, chunked prefill (Lq <= Lk), left padding, lengths off the block/segment grid."""
    block = draw(st.sampled_from([16, 32]))
    segment = block * draw(st.sampled_from([1, 2]))
    Hkv = draw(st.sampled_from([1, 2]))
    H = Hkv * draw(st.sampled_from([1, 2]))
    D = draw(st.sampled_from([16, 24]))
    B = draw(st.integers(1, 2))
    Lq = draw(st.integers(segment + 1, segment + 70))
    Lk = Lq + draw(st.sampled_from([0, 0, 13]))
    pad = draw(st.integers(0, Lk // 3))
    key_valid = None
    if pad:
        key_valid = torch.ones(B, Lk, dtype=torch.bool)
        key_valid[-1, :pad] = False  # the last row is left-padded
    mask = AttentionMask(causal=True, q_offset=Lk - Lq, key_valid=key_valid)
    seed = draw(st.integers(0, 2**16))
    gqa = draw(st.sampled_from(pbs.GQA_MODES))
    return B, H, Hkv, Lq, Lk, D, mask, block, segment, gqa, seed


def tensors(B, H, Hkv, Lq, Lk, D, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=g, dtype=dtype)
    # a few loud keys, as in real attention (vertical lines), so selection has something to find
    k = torch.randn(B, Hkv, Lk, D, generator=g, dtype=dtype)
    k[:, :, torch.randperm(Lk, generator=g)[:4]] *= 4
    v = torch.randn(B, Hkv, Lk, D, generator=g, dtype=dtype)
    return q, k, v


def mapped_back_mask(sel: pbs.Selection, mask: AttentionMask, H: int, Lq: int, Lk: int) -> torch.Tensor:
    """(B, H, Lq, Lk) bool in the ORIGINAL key order: key j is visible to query i iff it is causally
    visible and valid, and the permuted block holding j is selected for i's query block. Built from the
    selection with an independent loop over slots, then compared through exact attention."""
    B, Hs = sel.kv_order.shape[:2]
    b = sel.block_size
    out = torch.zeros(B, Hs, Lq, Lk, dtype=torch.bool)
    dense = torch.zeros(B, Hs, -(-Lq // b), -(-Lk // b), dtype=torch.bool)
    for bi in range(B):
        for h in range(Hs):
            for m in range(dense.shape[2]):
                n_blocks = int(sel.kv_num_blocks[bi, h, m])
                dense[bi, h, m, sel.kv_indices[bi, h, m, :n_blocks].long()] = True
    for slot in range(Lk):
        orig = sel.kv_order[:, :, slot].long()  # (B, Hs)
        for bi in range(B):
            for h in range(Hs):
                if int(orig[bi, h]) >= ORDER_HIDDEN:
                    continue
                rows = dense[bi, h, torch.arange(Lq) // b, slot // b]  # (Lq,)
                out[bi, h, :, int(orig[bi, h])] |= rows
    vis = visible_keys(mask, B, Lq, Lk)  # (B, 1, Lq, Lk): causal on positions, padding
    return out.repeat_interleave(H // Hs, dim=1) & vis


@settings(max_examples=examples(8), deadline=None)
@given(problems(), st.sampled_from([0.3, 0.7, 1.0]))
def test_pbs_equals_exact_attention_over_the_mapped_back_mask(problem, threshold):
    """Permutation invariance: attention over the permuted K/V with the permuted block mask equals exact
    attention over the original K/V with that mask mapped back through kv_order; at threshold 1.0 the
    mapped-back mask is the full causal mask (exact attention)."""
    B, H, Hkv, Lq, Lk, D, mask, block, segment, gqa, seed = problem
    q, k, v = tensors(B, H, Hkv, Lq, Lk, D, seed)
    params = pbs.PbsParams(block_size=block, segment_size=segment, threshold=threshold, gqa=gqa)
    out, density = pbs.attention(q, k, v, mask, SiteFacts(), params, 0.3)
    sel = pbs.pbs_select(q, k, v, mask, SiteFacts(), params, 0.3)
    back = mapped_back_mask(sel, mask, H, Lq, Lk)
    ref = exact_attention_reference(q.double(), k.double(), v.double(),
                                    AttentionMask(causal=False, dense_mask=back), scale=0.3)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    assert density.shape == (B, H) and bool(((density > 0) & (density <= 1)).all())
    if threshold == 1.0:
        assert torch.equal(back, visible_keys(mask, B, Lq, Lk).expand(B, H, Lq, Lk))
        exact = exact_attention_reference(q.double(), k.double(), v.double(), mask, scale=0.3)
        torch.testing.assert_close(out.double(), exact, atol=2e-5, rtol=2e-5)
        assert bool((density == 1).all())


def test_permutation_stays_inside_segments_and_hides_padding():
    B, Hs, Lk, s = 2, 3, 90, 32
    scores = torch.rand(B, Hs, Lk, generator=torch.Generator().manual_seed(0))
    key_valid = torch.ones(B, Lk, dtype=torch.bool)
    key_valid[1, :20] = False
    perm, kv_order = segment_permutation(scores.masked_fill(~key_valid[:, None], 0.0), key_valid, s)
    assert torch.equal(perm.sort(-1).values, torch.arange(Lk).expand(B, Hs, Lk))  # a permutation
    assert torch.equal(perm // s, torch.arange(Lk).expand(B, Hs, Lk) // s)  # never leaves its segment
    assert torch.equal(perm[..., 64:], torch.arange(64, Lk).expand(B, Hs, Lk - 64))  # partial segment in place
    hidden = kv_order == ORDER_HIDDEN
    assert torch.equal(hidden, ~torch.gather(key_valid[:, None].expand(B, Hs, Lk), 2, perm))
    seg = torch.gather(scores, 2, perm)[0, 0, :64].view(2, 32)
    assert bool((seg[:, :-1] >= seg[:, 1:]).all())  # descending by score inside each segment


def test_a_future_key_never_reaches_a_query():
    """Poison the V of every key after position p: rows up to p are unchanged (a permutation that let
    the engine check causality on permuted slots instead of original positions would fail here)."""
    q, k, v = tensors(1, 2, 1, 100, 100, 16, seed=3)
    params = pbs.PbsParams(block_size=16, segment_size=32, threshold=0.5)
    mask = AttentionMask(causal=True, q_offset=0)
    out, _ = pbs.attention(q, k, v, mask, SiteFacts(), params, 0.25)
    for p in (31, 47, 70):
        v2 = v.clone()
        v2[:, :, p + 1:] = 1e4
        out2, _ = pbs.attention(q, k, v2, mask, SiteFacts(), params, 0.25)
        torch.testing.assert_close(out2[:, :, : p + 1], out[:, :, : p + 1], atol=0, rtol=0)
        assert not torch.allclose(out2[:, :, p + 1:], out[:, :, p + 1:])


@settings(max_examples=examples(6), deadline=None)
@given(B=st.integers(1, 2), Hkv=st.sampled_from([1, 2]), G=st.sampled_from([1, 3]), D=st.sampled_from([16, 40]),
       Lq=st.sampled_from([20, 75, 140]), extra=st.sampled_from([0, 9]), pad=st.integers(0, 12),
       per_kv_head=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float16]), seed=st.integers(0, 99))
def test_triton_key_scores_equal_the_reference(B, Hkv, G, D, Lq, extra, pad, per_kv_head, dtype, seed):
    """Step 1's kernels (interpreter) == `key_scores` on drawn shapes: GQA, chunked prefill, padding,
    fewer and more than 128 scoring queries, head dims off the power-of-two grid, fp32 and fp16."""
    Lk = Lq + extra
    q, k, _ = tensors(B, Hkv * G, Hkv, Lq, Lk, D, seed, dtype=dtype)
    key_valid = torch.ones(B, Lk, dtype=torch.bool)
    key_valid[-1, :pad] = False
    kw = dict(q_offset=extra, scale=0.3, per_kv_head=per_kv_head)
    ref = key_scores(q.float(), k.float(), key_valid=key_valid, **kw)
    got = key_scores_triton(q, k, key_valid=key_valid if pad else None, **kw)
    assert got.shape == ref.shape and not torch.isnan(got).any()
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got, ref, atol=tol * float(ref.abs().max()), rtol=tol)


@pytest.mark.parametrize("gqa", pbs.GQA_MODES)
def test_triton_engine_on_permuted_keys_equals_its_reference(gqa):
    """CPU path == Triton path (interpreter, fp32) on PBS's permuted K/V, kv_order and lists."""
    q, k, v = tensors(2, 4, 2, 75, 88, 16, seed=5)
    key_valid = torch.ones(2, 88, dtype=torch.bool)
    key_valid[0, :9] = False
    mask = AttentionMask(causal=True, q_offset=13, key_valid=key_valid)
    sel = pbs.pbs_select(q, k, v, mask, SiteFacts(), pbs.PbsParams(block_size=16, segment_size=32, threshold=0.6,
                                                                   gqa=gqa), 0.3)
    kw = dict(block_size=16, causal=True, q_offset=13, window=0, key_valid=None, scale=0.3, kv_order=sel.kv_order)
    ref = block_sparse_attention(q, sel.k_perm, sel.v_perm, sel.kv_num_blocks, sel.kv_indices, impl="reference", **kw)
    tri = block_sparse_attention(q, sel.k_perm, sel.v_perm, sel.kv_num_blocks, sel.kv_indices, impl="triton", **kw)
    torch.testing.assert_close(tri, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("call, needle", [
    (CallShape(1, 4, 2, 300, 300, 64, torch.float32, "cpu", window=128), "sliding window 128"),
    (CallShape(1, 4, 2, 300, 300, 64, torch.float32, "cpu", causal=False), "not causal"),
    (CallShape(1, 4, 2, 256, 256, 64, torch.float32, "cpu"), "q_len 256 <= segment_size 256"),
    (CallShape(1, 4, 2, 300, 300, 512, torch.float32, "cpu"), "head_dim 512"),
    (CallShape(1, 4, 2, 300, 300, 64, torch.float64, "cuda"), "dtype torch.float64 on CUDA"),
])
def test_unsupported_calls_name_the_reason(call, needle):
    assert needle in pbs.unsupported(call, SiteFacts(), pbs.PbsParams())
    assert pbs.unsupported(CallShape(1, 4, 2, 300, 300, 64, torch.float32, "cpu"), SiteFacts(), pbs.PbsParams()) \
        is None


def test_policy_validation():
    policy = sparse_compile.load_policy("pbs-lossy")
    assert policy.prefill.method == "pbs" and policy.prefill.params == pbs.PbsParams()
    with pytest.raises(PolicyError, match="segment_size = 40 must be a multiple of block_size = 16"):
        params_from_mapping(pbs.PbsParams, {"block_size": 16, "segment_size": 40}, "t.toml: [prefill.params]")
    with pytest.raises(PolicyError, match="threshold"):
        params_from_mapping(pbs.PbsParams, {"threshold": float("nan")}, "t.toml: [prefill.params]")


def test_compiled_model_with_pbs():
    """threshold 1.0 through torch.compile equals eager; a lower threshold runs sparse (density < 1) with
    finite logits, and a prompt within one segment falls back with the reason in the report."""
    model = tiny_llama(2)
    ids = torch.randint(0, 128, (2, 150), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :20] = 0
    base = {"name": "pbs-test", "prefill": {"method": "pbs", "min_seq_len": 0,
                                             "params": {"block_size": 16, "segment_size": 32}}}
    exact = {**base, "prefill": {**base["prefill"], "params": {**base["prefill"]["params"], "threshold": 1.0}}}
    sparse = {**base, "prefill": {**base["prefill"], "params": {**base["prefill"]["params"], "threshold": 0.3}}}
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        fast = sparse_compile.compile(model, exact, inner="eager")
        out = fast(ids, attention_mask=mask).logits
        torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], atol=1e-4, rtol=1e-4)
        assert fast.sparse_report.layer_density("prefill") == {0: 1.0, 1: 1.0}
        fast = sparse_compile.compile(model, sparse, inner="eager")
        out = fast(ids, attention_mask=mask).logits
        assert torch.isfinite(out).all() and fast.sparse_report.mean_density("prefill") < 1.0
        report = sparse_compile.explain(model, ids[:, :30], policy=sparse)
        assert all("q_len 30 <= segment_size 32" in s.fallback for s in report.sites), str(report)
