"""The shared sparse decode kernel (kernels/sparse_decode.py): Triton (interpreter) == PyTorch reference ==
a float64 oracle built independently (dense masked attention over the listed keys), over drawn shapes,
index-set layouts (per head / per KV head / shared), counts or -1 padding, left padding, splits."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples
from torch.utils._python_dispatch import TorchDispatchMode

from sparse_compile.attention_mask import AttentionMask, exact_attention_reference
from sparse_compile.kernels.sparse_decode import sparse_decode_attention, sparse_decode_reference

TOL = {torch.float32: 2e-5, torch.float16: 3e-3}


def oracle(q, k, v, indices, counts, key_valid, scale):
    """float64 masked exact attention over the set of counted keys (distinct indices), via the project's
    exact reference with a (B, H, 1, Lk) boolean mask."""
    B, H, _, D = q.shape
    Lk = k.shape[2]
    G, N = indices.shape[1:]
    vis = torch.zeros(B, H, 1, Lk, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            g = h // (H // G)
            n_listed = N if counts is None else int(counts[b, g])
            for n in range(min(n_listed, N)):
                j = int(indices[b, g, n])
                if 0 <= j < Lk and (key_valid is None or bool(key_valid[b, j])):
                    vis[b, h, 0, j] = True
    return exact_attention_reference(q.double(), k.double(), v.double(),
                                     AttentionMask(causal=False, dense_mask=vis), scale=scale)


@st.composite
def problems(draw):
    Hkv = draw(st.sampled_from([1, 2]))
    group = draw(st.sampled_from([1, 4, 8]))
    H = Hkv * group
    G = draw(st.sampled_from(sorted({H, Hkv, 1})))
    D = draw(st.sampled_from([64, 80, 96, 128, 256]))
    B = draw(st.integers(1, 2))
    Lk = draw(st.integers(1, 200))
    N = draw(st.integers(1, 70))
    use_counts = draw(st.booleans())
    pad = draw(st.integers(0, Lk // 2))
    splits = draw(st.sampled_from([None, 1, 3]))
    dtype = draw(st.sampled_from([torch.float32, torch.float16]))
    seed = draw(st.integers(0, 2**16))
    return B, H, Hkv, G, D, Lk, N, use_counts, pad, splits, dtype, seed


def make(B, H, Hkv, G, D, Lk, N, use_counts, pad, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, 1, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype)
    # distinct indices per set, some out of range (Lk + 3), listed in any order
    idx = torch.stack([torch.stack([torch.randperm(Lk + 5, generator=g)[:N] for _ in range(G)]) for _ in range(B)])
    idx = torch.where(idx < Lk + 3, idx, -1)  # -1 sentinels
    idx = idx.to(torch.int32 if seed % 2 else torch.int64)
    counts = torch.randint(0, N + 1, (B, G), generator=g) if use_counts else None
    key_valid = None
    if pad:
        key_valid = torch.ones(B, Lk, dtype=torch.bool)
        key_valid[-1, :pad] = False
    return q, k, v, idx, counts, key_valid


@settings(max_examples=examples(14), deadline=None)
@given(problems())
def test_kernel_equals_reference_and_oracle(problem):
    B, H, Hkv, G, D, Lk, N, use_counts, pad, splits, dtype, seed = problem
    q, k, v, idx, counts, key_valid = make(B, H, Hkv, G, D, Lk, N, use_counts, pad, dtype, seed)
    scale = 0.7 / D**0.5
    want = oracle(q, k, v, idx, counts, key_valid, scale)
    ref = sparse_decode_reference(q, k, v, idx, counts, scale=scale, key_valid=key_valid)
    out = torch.full_like(q, float("nan"))  # poisoned: an unwritten element fails
    got = sparse_decode_attention(q, k, v, idx, counts, scale=scale, key_valid=key_valid, impl="triton",
                                  num_splits=splits, out=out)
    assert got.data_ptr() == out.data_ptr() and got.dtype == dtype
    assert not torch.isnan(got).any() and not torch.isnan(ref).any()
    torch.testing.assert_close(ref.double(), want, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(got.double(), want, atol=TOL[dtype], rtol=TOL[dtype])


def test_gqa_layouts_agree_when_the_sets_agree():
    """Per-head sets that repeat the KV head's set, per-KV-head sets and (for Hkv = 1) a shared set give
    the same output; the per-head kernel path and the grouped one are different programs."""
    B, H, Hkv, D, Lk, N = 2, 8, 2, 64, 90, 40
    q, k, v, idx, _, _ = make(B, H, Hkv, Hkv, D, Lk, N, False, 0, torch.float32, 7)
    per_head = idx.repeat_interleave(H // Hkv, dim=1)
    a = sparse_decode_attention(q, k, v, idx, impl="triton", num_splits=2)
    b = sparse_decode_attention(q, k, v, per_head, impl="triton", num_splits=1)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    shared = idx[:, :1]
    c = sparse_decode_attention(q, k, v, shared, impl="triton")
    d = sparse_decode_attention(q, k, v, shared.expand(B, Hkv, N).contiguous(), impl="triton")
    torch.testing.assert_close(c, d, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("early_v", [False, True])
def test_launch_override_and_early_v_gather_give_the_same_output(early_v):
    """The launch override (benchmarks sweep it) with V gathered right after K, or after the scores, equals the
    reference: the order of the two gathers changes only when the loads are issued."""
    B, H, Hkv, D, Lk, N = 2, 8, 2, 64, 90, 40
    q, k, v, idx, counts, key_valid = make(B, H, Hkv, Hkv, D, Lk, N, True, 30, torch.float32, 11)
    want = sparse_decode_reference(q, k, v, idx, counts, key_valid=key_valid)
    got = sparse_decode_attention(q, k, v, idx, counts, key_valid=key_valid, impl="triton", num_splits=2,
                                  launch=(16, 4, 1, early_v))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_every_key_listed_equals_dense_decode():
    B, H, Hkv, D, Lk = 1, 4, 1, 128, 77
    q, k, v, _, _, _ = make(B, H, Hkv, 1, D, Lk, 1, False, 0, torch.float32, 3)
    idx = torch.arange(Lk, dtype=torch.int32).flip(0).view(1, 1, Lk)
    got = sparse_decode_attention(q, k, v, idx, impl="triton", num_splits=3)
    dense = exact_attention_reference(q.double(), k.double(), v.double(), AttentionMask(causal=False))
    torch.testing.assert_close(got.double(), dense, atol=2e-5, rtol=2e-5)


def test_empty_sets_give_zeros_and_nonfinite_contract():
    """No counted slot: zeros (even for a NaN q). A NaN/inf in an unlisted (or padded) key never reaches the
    output; one in a listed key's K or V makes its heads NaN, and only those."""
    B, H, Hkv, D, Lk, N = 1, 4, 2, 64, 60, 20
    q, k, v, idx, _, _ = make(B, H, Hkv, H, D, Lk, N, False, 0, torch.float32, 11)
    idx = torch.stack([torch.randperm(40, generator=torch.Generator().manual_seed(h))[:N] for h in range(H)])[None]
    idx = idx.to(torch.int32)
    counts = torch.tensor([[0, N, N, N]])
    q[0, 0] = float("nan")  # head 0 sees nothing: zeros anyway
    k[0, :, 50] = float("nan")  # never listed (indices < 40)
    v[0, :, 55] = float("inf")
    key_valid = torch.ones(B, Lk, dtype=torch.bool)
    key_valid[0, idx[0, 1, 0]] = False  # a listed but padded key of head 1 (KV head 0)...
    v[0, 0, idx[0, 1, 0]] = float("nan")  # ...holding NaN: ignored
    for splits in (1, 2):
        got = sparse_decode_attention(q, k, v, idx, counts, key_valid=key_valid, impl="triton", num_splits=splits)
        ref = sparse_decode_reference(q, k, v, idx, counts, key_valid=key_valid)
        assert torch.equal(got[0, 0], torch.zeros_like(got[0, 0]))
        assert not torch.isnan(got[0, 1:]).any()
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)
    # head 3 (KV head 1) lists key idx[0, 3, 5]; poison its V row on KV head 1: head 3 NaN, others not
    v[0, 1, idx[0, 3, 5]] = float("inf")
    for splits in (1, 3):
        got = sparse_decode_attention(q, k, v, idx, counts, key_valid=key_valid, impl="triton", num_splits=splits)
        ref = sparse_decode_reference(q, k, v, idx, counts, key_valid=key_valid)
        assert torch.isnan(got[0, 3]).all() and torch.isnan(ref[0, 3]).all()
        assert not torch.isnan(got[0, :2]).any() and not torch.isnan(ref[0, :2]).any()
        if not bool((idx[0, 2] == idx[0, 3, 5]).any()):
            assert not torch.isnan(got[0, 2]).any()


def test_bad_inputs_name_the_argument():
    q = torch.randn(1, 4, 1, 64)
    k = v = torch.randn(1, 2, 10, 64)
    idx = torch.zeros(1, 2, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match="q must be"):
        sparse_decode_attention(torch.randn(1, 4, 2, 64), k, v, idx)
    with pytest.raises(ValueError, match="G = 3"):
        sparse_decode_attention(q, k, v, torch.zeros(1, 3, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="int32 or int64"):
        sparse_decode_attention(q, k, v, idx.float())
    with pytest.raises(ValueError, match="counts must be"):
        sparse_decode_attention(q, k, v, idx, torch.zeros(1, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="key_valid must be"):
        sparse_decode_attention(q, k, v, idx, key_valid=torch.ones(1, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_splits"):
        sparse_decode_attention(q, k, v, idx, impl="triton", num_splits=0)
    with pytest.raises(ValueError, match="scale"):
        sparse_decode_attention(q, k, v, idx, scale=float("nan"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("splits", [1, 3])
def test_indices_none_is_every_key_with_validity(dtype, splits):
    """indices=None (the contiguous every-key path the dense method's masked decode runs) == the same keys
    listed explicitly == the float64 masked reference; a NaN in an invalid key's V changes nothing."""
    B, H, Hkv, D, Lk = 2, 8, 2, 80, 150
    q, k, v, _, _, _ = make(B, H, Hkv, 1, D, Lk, 1, False, 0, dtype, 11)
    key_valid = torch.rand(B, Lk, generator=torch.Generator().manual_seed(5)) > 0.3
    listed = torch.arange(Lk, dtype=torch.int32).view(1, 1, Lk).expand(B, 1, Lk)
    want = oracle(q, k, v, listed, None, key_valid, 0.2)
    got = sparse_decode_attention(q, k, v, None, scale=0.2, key_valid=key_valid, impl="triton", num_splits=splits)
    torch.testing.assert_close(got.double(), want, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(sparse_decode_reference(q, k, v, None, scale=0.2, key_valid=key_valid).double(),
                               want, atol=TOL[dtype], rtol=TOL[dtype])
    v[:, :, ~key_valid[0]] = float("nan")  # invalid keys of row 0 (of row 1 too where they coincide)
    hit = (~key_valid[0] & key_valid[1]).any()
    again = sparse_decode_attention(q, k, v, None, scale=0.2, key_valid=key_valid, impl="triton", num_splits=splits)
    assert torch.equal(again[0], got[0])
    assert bool(torch.isnan(again[1]).all()) == bool(hit)


def test_every_key_path_builds_no_index_list():
    """indices=None on the kernel path dispatches no tensor op that writes memory (no arange of the Lk key ids: the
    kernel reads no index; one launch per dense decode layer in a captured step), only empty allocations."""
    q, k, v, _, _, _ = make(1, 4, 2, 1, 64, 300, 1, False, 0, torch.float32, 3)
    seen: list[str] = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with Ops():
        sparse_decode_attention(q, k, v, None, impl="triton", num_splits=1)
    # copy_ / set_: the Triton interpreter moving the kernel's arguments to and from host buffers
    assert "arange" not in seen and set(seen) - {"copy_", "set_"} <= {"empty", "new_empty", "expand", "view"}, seen
    seen.clear()
    with Ops():  # the reference path does list every key
        sparse_decode_attention(q, k, v, None, impl="reference")
    assert "arange" in seen


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["k", "v"])
@pytest.mark.parametrize("dim", [0, 63])
def test_one_nonfinite_element_of_a_counted_key_poisons_exactly_its_heads(value, where, dim):
    """One NaN/+inf/-inf element (any dim) in a counted key's K or V row: the heads whose sets count the key
    are NaN on the kernel and the reference, the other heads equal the reference."""
    B, H, Hkv, D, Lk, N = 1, 4, 1, 64, 50, 12
    q, k, v, _, _, _ = make(B, H, Hkv, H, D, Lk, N, False, 0, torch.float32, 5)
    idx = torch.tensor([[list(range(0, 12)), list(range(10, 22)), list(range(30, 42)), list(range(38, 50))]],
                       dtype=torch.int32)
    (k if where == "k" else v)[0, 0, 11, dim] = value  # counted by heads 0 and 1
    for splits in (1, 2):
        got = sparse_decode_attention(q, k, v, idx, impl="triton", num_splits=splits)
        ref = sparse_decode_reference(q, k, v, idx)
        assert torch.isnan(got[0, :2]).all() and torch.isnan(ref[0, :2]).all()
        torch.testing.assert_close(got[0, 2:], ref[0, 2:], atol=2e-5, rtol=2e-5)
        assert torch.isfinite(got[0, 2:]).all()
