"""kernels/page_select.py under the Triton interpreter: the page-bound and candidate-scoring kernels equal
their PyTorch references (float32 / float16, GQA, padding, unwritten pages, forced keys, every reduce mode),
the bound holds for every visible key, bad inputs raise errors that name the problem, and FASA's two-stage
selection through the kernels equals the PyTorch path's."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples

from sparse_compile.kernels.fasa import key_state
from sparse_compile.kernels.page_select import (
    candidate_scores,
    candidate_scores_reference,
    page_bounds,
    page_bounds_reference,
)
from sparse_compile.methods.two_stage import fasa_two_stage


def summaries(k: torch.Tensor, valid: torch.Tensor, P: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Page min / max of k (B, Hkv, L, D) over the valid keys (B, L): +inf / -inf where a page has none."""
    B, Hkv, L, D = k.shape
    NP = math.ceil(L / P)
    ok = valid[:, None, :, None]
    lo = torch.nn.functional.pad(torch.where(ok, k, math.inf), (0, 0, 0, NP * P - L), value=math.inf)
    hi = torch.nn.functional.pad(torch.where(ok, k, -math.inf), (0, 0, 0, NP * P - L), value=-math.inf)
    return lo.view(B, Hkv, NP, P, D).amin(3), hi.view(B, Hkv, NP, P, D).amax(3)


def visibility(B: int, L: int, pads: list[int], unwritten: int) -> torch.Tensor:
    vis = torch.ones(B, L, dtype=torch.bool)
    for b in range(B):
        vis[b, : pads[b]] = False
    vis[:, L - unwritten:] = False
    return vis


def tol(dtype: torch.dtype) -> dict:
    return {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-3}


@given(
    L=st.integers(1, 160),
    P=st.sampled_from([16, 32, 64]),
    heads=st.sampled_from([(4, 4), (4, 2), (6, 2), (8, 1)]),
    D=st.sampled_from([16, 32, 64]),
    reduce=st.sampled_from(["none", "sum", "max"]),
    masked=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    pads=st.lists(st.integers(0, 20), min_size=2, max_size=2),
    unwritten=st.integers(0, 20),
    sink=st.integers(0, 3),
    recent=st.integers(0, 3),
    seed=st.integers(0, 1000),
)
@settings(max_examples=examples(20), deadline=None)
def test_page_bounds_equal_reference(L, P, heads, D, reduce, masked, dtype, pads, unwritten, sink, recent, seed):
    gen = torch.Generator().manual_seed(seed)
    H, Hkv = heads
    B = 2
    q = torch.randn(B, H, 1, D, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, L, D, generator=gen).to(dtype)
    visible = visibility(B, L, [min(p, L) for p in pads], min(unwritten, L))
    lo, hi = summaries(k, visible, P)
    state = key_state(visible, sink, recent)
    q_mask = (torch.rand(H, D, generator=gen) < 0.5).float() if masked else None
    got = page_bounds(q, lo, hi, state, P, q_mask=q_mask, reduce=reduce)
    ref = page_bounds_reference(q, lo, hi, state, P, q_mask=q_mask, reduce=reduce)
    assert got.shape == ref.shape == (B, H if reduce == "none" else Hkv, math.ceil(L / P))
    assert torch.equal(torch.isinf(got), torch.isinf(ref)) and torch.equal(got.sign()[torch.isinf(got)],
                                                                           ref.sign()[torch.isinf(ref)])
    finite = torch.isfinite(ref)
    torch.testing.assert_close(got[finite], ref[finite], **tol(dtype))
    if reduce == "none" and not masked and dtype == torch.float32:  # the bound holds for every visible key
        exact = torch.einsum("bhd,bhnd->bhn", q[:, :, 0].double(), k.double().repeat_interleave(H // Hkv, 1))
        page_of = torch.arange(L) // P
        bound = got.double().gather(2, page_of.expand(B, H, L))
        ok = visible[:, None, :].expand(B, H, L)
        assert (exact[ok] <= bound[ok] + 1e-4).all()


@given(
    L=st.integers(1, 160),
    P=st.sampled_from([16, 32, 64]),
    heads=st.sampled_from([(4, 4), (4, 2), (6, 2), (8, 1)]),
    n=st.integers(1, 40),
    per_kv_head=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    kept=st.integers(1, 6),
    pads=st.lists(st.integers(0, 20), min_size=2, max_size=2),
    sink=st.integers(0, 3),
    recent=st.integers(0, 3),
    seed=st.integers(0, 1000),
)
@settings(max_examples=examples(20), deadline=None)
def test_candidate_scores_equal_reference(L, P, heads, n, per_kv_head, dtype, kept, pads, sink, recent, seed):
    gen = torch.Generator().manual_seed(seed)
    H, Hkv = heads
    B, D = 2, 64
    q = torch.randn(B, H, 1, D, generator=gen).to(dtype)
    key_dims = torch.randn(B, Hkv, L, n, generator=gen).to(dtype)
    head_dims = torch.randint(0, D, (H, n), generator=gen)
    member = (torch.rand(H, n, generator=gen) < 0.6).float()
    NP = math.ceil(L / P)
    pages = torch.randint(-1, NP, (B, Hkv, kept), generator=gen)  # -1: no page in that slot
    visible = visibility(B, L, [min(p, L) for p in pads], 0)
    state = key_state(visible, sink, recent)
    scores, tokens = candidate_scores(q, key_dims, head_dims, member, pages, state, P, per_kv_head=per_kv_head)
    ref_scores, ref_tokens = candidate_scores_reference(q, key_dims, head_dims, member, pages, state, P,
                                                        per_kv_head=per_kv_head)
    assert scores.shape == ref_scores.shape == (B, Hkv if per_kv_head else H, kept * P)
    assert torch.equal(tokens, ref_tokens)
    assert torch.equal(torch.isinf(scores), torch.isinf(ref_scores))
    assert torch.equal(scores[torch.isinf(scores)], ref_scores[torch.isinf(ref_scores)])
    finite = torch.isfinite(ref_scores)
    torch.testing.assert_close(scores[finite], ref_scores[finite], **tol(dtype))


@pytest.mark.parametrize("per_kv_head,group", [(True, "union"), (False, "union"), (False, "max")])
@pytest.mark.parametrize("P", [16, 32])
def test_fasa_two_stage_triton_equals_pytorch(per_kv_head, group, P):
    """The whole selection through the kernels == through PyTorch (float32: no near-ties at this size), with
    a quarter of the pages as candidates, padding, forced keys and a fraction budget's per-row counts."""
    gen = torch.Generator().manual_seed(P + per_kv_head)
    B, H, Hkv, D, L, n = 2, 8, 2, 32, 300, 12
    q = torch.randn(B, H, 1, D, generator=gen)
    k = torch.randn(B, Hkv, L, D, generator=gen)
    dims = torch.stack([torch.randperm(D, generator=gen)[:n] for _ in range(Hkv)])
    member = (torch.rand(H, n, generator=gen) < 0.7).float()
    key_dims = k.gather(3, dims[None, :, None, :].expand(B, Hkv, L, n))
    visible = visibility(B, L, [0, 37], 11)
    state = key_state(visible, 4, 8)
    lo, hi = summaries(k, visible, P)
    S = Hkv if per_kv_head else H
    counts = torch.tensor([[40] * S, [33] * S])
    args = (q, key_dims, dims, member, lo, hi, state, 48, 96, P)
    kw = {"sink": 4, "recent": 8, "per_kv_head": per_kv_head, "group": group, "counts": counts}
    got = fasa_two_stage(*args, **kw, impl="triton")
    ref = fasa_two_stage(*args, **kw, impl="reference")
    assert got.shape == ref.shape == (B, S, 48)
    assert torch.equal(got.sort(-1).values, ref.sort(-1).values)
    assert ((got >= 0).sum(-1) == counts).all()


def test_bad_inputs_name_the_problem():
    q = torch.randn(1, 4, 1, 16)
    lo = torch.zeros(1, 2, 2, 16)
    state = torch.ones(1, 20, dtype=torch.int8)
    with pytest.raises(ValueError, match="page_size"):
        page_bounds(q, lo, lo, state, 24)
    with pytest.raises(ValueError, match="pages do not cover"):
        page_bounds(q, lo, lo, torch.ones(1, 40, dtype=torch.int8), 16)
    with pytest.raises(ValueError, match="state must be"):
        page_bounds(q, lo, lo, state.bool(), 16)
    with pytest.raises(ValueError, match="reduce"):
        page_bounds(q, lo, lo, state, 16, reduce="mean")
    with pytest.raises(ValueError, match="q_mask"):
        page_bounds(q, lo, lo, state, 16, q_mask=torch.ones(4, 8))
    kd = torch.zeros(1, 2, 20, 5)
    with pytest.raises(ValueError, match="pages must be"):
        candidate_scores(q, kd, torch.zeros(4, 5, dtype=torch.int64), torch.ones(4, 5),
                         torch.zeros(1, 2, 3, dtype=torch.int32), state, 16, per_kv_head=False)
    with pytest.raises(ValueError, match="head_dims"):
        candidate_scores(q, kd, torch.zeros(4, 6, dtype=torch.int64), torch.ones(4, 5),
                         torch.zeros(1, 2, 3, dtype=torch.int64), state, 16, per_kv_head=False)
