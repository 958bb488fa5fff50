"""The dense method computes exact attention from the mask's structure (every path)."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from sparse_compile.attention_mask import AttentionMask, SiteFacts, exact_attention_reference, visible_keys
from sparse_compile.methods import dense


@st.composite
def problems(draw):
    B = draw(st.integers(1, 3))
    Hkv = draw(st.sampled_from([1, 2]))
    H = Hkv * draw(st.sampled_from([1, 2, 3]))
    D = draw(st.sampled_from([8, 16, 24]))
    Lk = draw(st.integers(1, 40))
    Lq = draw(st.integers(1, Lk))
    causal = draw(st.booleans())
    q_offset = draw(st.sampled_from([0, Lk - Lq]))
    window = draw(st.sampled_from([0, 1, 5, 64])) if causal else 0
    key_valid = None
    if draw(st.booleans()):
        key_valid = torch.rand(B, Lk, generator=torch.Generator().manual_seed(draw(st.integers(0, 99)))) > 0.3
    seed = draw(st.integers(0, 2**16))
    return B, H, Hkv, Lq, Lk, D, AttentionMask(causal, q_offset, window, key_valid), seed


@given(problems())
def test_cpu_dense_equals_float64_reference(problem):
    B, H, Hkv, Lq, Lk, D, mask, seed = problem
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, n, D, generator=g) for h, n in ((H, Lq), (Hkv, Lk), (Hkv, Lk)))
    out, density = dense.attention(q, k, v, mask, SiteFacts(), dense.Params(), scale=0.3)
    ref = exact_attention_reference(q.double(), k.double(), v.double(), mask, scale=0.3)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    assert density.shape == (B, H) and bool((density == 1).all())


@given(st.lists(st.integers(0, 12), min_size=1, max_size=4), st.integers(0, 1000))
def test_left_padded_fast_path_equals_reference(starts, seed):
    L, H, Hkv, D = 12, 4, 2, 8
    B = len(starts)
    key_valid = torch.arange(L)[None, :] >= torch.tensor(starts)[:, None]
    assert dense.left_padding_starts(key_valid) == starts
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(B, H, L, D, generator=g), torch.randn(B, Hkv, L, D, generator=g), torch.randn(
        B, Hkv, L, D, generator=g)
    out = dense.left_padded_causal_attention(q, k, v, starts, scale=0.35)
    ref = exact_attention_reference(q, k, v, AttentionMask(True, 0, 0, key_valid), scale=0.35)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_left_padding_starts_rejects_other_patterns():
    key_valid = torch.ones(2, 6, dtype=torch.bool)
    key_valid[0, 4] = False  # a hole, not left padding
    assert dense.left_padding_starts(key_valid) is None
    key_valid = torch.ones(1, 6, dtype=torch.bool)
    key_valid[0, 5] = False  # right padding
    assert dense.left_padding_starts(key_valid) is None


def test_unrecognised_float_mask_is_added_to_logits():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 2, 5, 8, generator=g), torch.randn(1, 2, 5, 8, generator=g), torch.randn(
        1, 2, 5, 8, generator=g)
    bias = torch.randn(1, 1, 5, 5, generator=g)
    mask = AttentionMask(causal=False, dense_mask=bias)
    out, _ = dense.attention(q, k, v, mask, SiteFacts(), scale=0.5)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=0.5)
    torch.testing.assert_close(out, ref)



@given(problems(), st.sampled_from([float("nan"), float("inf"), -float("inf")]), st.sampled_from(["k", "v"]),
       st.data())
def test_cpu_dense_nonfinite_key_reaches_only_rows_that_see_it(problem, value, where, data):
    """The non-finite contract through the dense method (the node's fallback for every method): a NaN/inf
    in one key's K or V makes exactly the rows that see that key NaN; every other row equals the float64
    reference of the same inputs."""
    B, H, Hkv, Lq, Lk, D, mask, seed = problem
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, n, D, generator=g) for h, n in ((H, Lq), (Hkv, Lk), (Hkv, Lk)))
    j = data.draw(st.integers(0, Lk - 1), label="poisoned key")
    (k if where == "k" else v)[:, :, j, 0] = value
    out, _ = dense.attention(q, k, v, mask, SiteFacts(), dense.Params(), scale=0.3)
    ref = exact_attention_reference(q.double(), k.double(), v.double(), mask, scale=0.3)
    sees = visible_keys(mask, B, Lq, Lk)[:, 0, :, j]  # (B, Lq)
    nan_rows = torch.isnan(out).any(-1)  # (B, H, Lq)
    assert torch.equal(nan_rows, sees[:, None, :].expand_as(nan_rows)), (nan_rows, sees)
    torch.testing.assert_close(out[~nan_rows].double(), ref[~nan_rows], atol=1e-5, rtol=1e-5)


@given(problems(), st.sampled_from([float("nan"), float("inf")]), st.sampled_from(["k", "v"]), st.data())
def test_masked_decode_kernel_ignores_masked_keys(problem, value, where, data):
    """CUDA decode with masked keys runs `masked_decode_attention` (the sparse decode kernel over every
    key, here under the Triton interpreter): it equals the float64 reference, and a NaN/inf planted in a
    key the query cannot see leaves the row unchanged, while one in a key it sees makes the row NaN."""
    B, H, Hkv, _, Lk, D, mask, seed = problem
    mask = AttentionMask(mask.causal, Lk - 1 - data.draw(st.integers(0, Lk - 1), label="tail") if mask.causal
                         else 0, mask.window, mask.key_valid)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, n, D, generator=g) for h, n in ((H, 1), (Hkv, Lk), (Hkv, Lk)))
    key_valid = dense.decode_key_mask(mask, B, Lk, q.device).reshape(B, Lk)
    ref = exact_attention_reference(q.double(), k.double(), v.double(), mask, scale=0.3)
    out = dense.masked_decode_attention(q, k, v, key_valid, scale=0.3)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    j = data.draw(st.integers(0, Lk - 1), label="poisoned key")
    (k if where == "k" else v)[:, :, j, :] = value
    out = dense.masked_decode_attention(q, k, v, key_valid, scale=0.3)
    nan_rows = torch.isnan(out).any(-1)[..., 0]  # (B, H)
    assert torch.equal(nan_rows, key_valid[:, j, None].expand(B, H))
    torch.testing.assert_close(out[~nan_rows].double(), ref[~nan_rows], atol=1e-5, rtol=1e-5)


@given(st.integers(1, 9), st.integers(0, 7), st.integers(0, 12), st.booleans(), st.integers(0, 3))
def test_visible_prefix_drops_only_invisible_keys(q_len, q_offset, tail, padded, window):
    """A StaticCache prefill's keys past q_offset + q_len (empty slots) are invisible to every row: cutting
    them gives the same attention, rows with no visible key included; non-causal masks are left whole."""
    from sparse_compile.attention_mask import AttentionMask, exact_attention_reference
    from sparse_compile.methods.dense import visible_prefix

    g = torch.Generator().manual_seed(q_len * 100 + q_offset * 10 + tail)
    B, H, Hkv, D = 2, 4, 2, 8
    Lk = q_offset + q_len + tail
    q = torch.randn(B, H, q_len, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, Hkv, Lk, D, generator=g, dtype=torch.float64) for _ in range(2))
    key_valid = None
    if padded:
        key_valid = torch.ones(B, Lk, dtype=torch.bool)
        key_valid[1, : min(2, Lk)] = False
    mask = AttentionMask(causal=True, q_offset=q_offset, window=window, key_valid=key_valid)
    kk, vv, cut = visible_prefix(k, v, mask, q_len)
    assert kk.shape[2] == min(Lk, q_offset + q_len) and cut.q_offset == q_offset and cut.window == window
    torch.testing.assert_close(exact_attention_reference(q, kk, vv, cut, 0.3),
                               exact_attention_reference(q, k, v, mask, 0.3), rtol=0, atol=1e-12)
    whole = AttentionMask(causal=False, key_valid=key_valid)
    assert visible_prefix(k, v, whole, q_len)[0] is k
