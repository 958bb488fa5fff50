"""FASA (`fasa`): chunk pairing, the Triton scores (interpreter) == the PyTorch reference, all chunks ==
exact q.k, top-k == torch.topk, attention == exact attention over the selected keys, budget >= cache ==
dense, params/policy validation, and greedy generation through the compiled model (DynamicCache and
StaticCache, left-padded batch) == an independent loop reference of the spec, token for token."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cache_keyword import CACHE_ARG
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples
from test_backend import peaked_llama
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

import sparse_compile
from sparse_compile.attention_mask import AttentionMask, SiteFacts, exact_attention_reference, visible_keys
from sparse_compile.kernels.fasa import (
    chunk_dims,
    chunk_tables,
    default_chunks,
    fasa_scores,
    fasa_scores_reference,
    key_state,
    select_tokens,
)
from sparse_compile.methods import dense, fasa
from sparse_compile.ops import CallShape
from sparse_compile.params import PolicyError, params_from_mapping


def test_chunk_pairs():
    assert chunk_dims(3, "rotate_half", 64, 64) == (3, 35)
    assert chunk_dims(3, "interleaved", 64, 64) == (6, 7)
    assert chunk_dims(3, "adjacent", 64, 64) == (6, 7)
    # partial rotary (R = 32 of D = 64): chunks 16.. are pass-through pairs
    assert chunk_dims(15, "rotate_half", 32, 64) == (15, 31)
    assert chunk_dims(16, "rotate_half", 32, 64) == (32, 33)
    assert chunk_dims(31, "rotate_half", 32, 64) == (62, 63)
    every = {d for c in range(32) for d in chunk_dims(c, "rotate_half", 32, 64)}
    assert every == set(range(64))
    assert default_chunks(64, 64, 8) == tuple(range(24, 32))
    with pytest.raises(ValueError, match="chunk 32 out of range"):
        chunk_dims(32, "rotate_half", 64, 64)


def site_for(H, Hkv, D, layer=1, rotary=None, rope="rotate_half"):
    return SiteFacts(layer=layer, rope=rope, rotary_dim=rotary or D, head_dim=D, num_heads=H, num_kv_heads=Hkv)


def random_chunks(H, D, count, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(tuple(torch.randperm(D // 2, generator=g)[:count].tolist()) for _ in range(H))


@st.composite
def score_problems(draw):
    Hkv = draw(st.sampled_from([1, 2]))
    H = Hkv * draw(st.sampled_from([1, 3, 4]))
    D = draw(st.sampled_from([64, 80, 128]))
    B = draw(st.integers(1, 2))
    Lk = draw(st.integers(2, 150))
    count = draw(st.sampled_from([1, 4, D // 2]))
    per = draw(st.sampled_from(["head", "kv", "one"]))
    pad = draw(st.integers(0, Lk // 2))
    window = draw(st.sampled_from([0, 0, 17]))
    q_offset = draw(st.integers(Lk // 2, Lk - 1))
    sink, recent = draw(st.integers(0, 3)), draw(st.integers(0, 5))
    per_kv_head = draw(st.booleans())
    dtype = draw(st.sampled_from([torch.float32, torch.float16]))
    seed = draw(st.integers(0, 2**16))
    return B, H, Hkv, D, Lk, count, per, pad, window, q_offset, sink, recent, per_kv_head, dtype, seed


@settings(max_examples=examples(12), deadline=None)
@given(score_problems())
def test_triton_scores_equal_the_reference(problem):
    """The Triton scores (interpreter) == the full-width reference: GQA, per-head / per-KV-head / shared
    chunk lists, summed groups, causal offset, window, left padding through the state vector, forced keys
    through both the state vector and the kernel's own arithmetic."""
    B, H, Hkv, D, Lk, count, per, pad, window, q_offset, sink, recent, per_kv_head, dtype, seed = problem
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, 1, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype)
    n = {"head": H, "kv": Hkv, "one": 1}[per]
    dims, member = chunk_tables(random_chunks(n, D, count, seed), H, Hkv, D, D, "rotate_half", "cpu")
    key_valid = None
    if pad:
        key_valid = torch.ones(B, Lk, dtype=torch.bool)
        key_valid[-1, :pad] = False
    mask = AttentionMask(causal=True, q_offset=q_offset, window=window, key_valid=key_valid)
    state = key_state(visible_keys(mask, B, 1, Lk)[:, 0, 0], sink, recent)
    ref = fasa_scores_reference(q, k, dims, member, state, per_kv_head=per_kv_head)
    got = fasa_scores(q, k, dims, member, per_kv_head=per_kv_head, causal=True, q_offset=q_offset, window=window,
                      state=state if pad else None, sink=sink, recent=recent)
    assert got.shape == ref.shape == (B, Hkv if per_kv_head else H, Lk)
    assert torch.equal(torch.isinf(got) & (got > 0), torch.isinf(ref) & (ref > 0))  # forced keys
    assert torch.equal(torch.isinf(got) & (got < 0), torch.isinf(ref) & (ref < 0))  # invisible keys
    finite = torch.isfinite(ref)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got[finite], ref[finite], atol=tol * (1 + float(ref[finite].abs().max())), rtol=tol)


def test_scores_read_only_the_dominant_segments():
    """chunk_tables lists exactly the 16-dim segments holding a dominant dim of the group; NaN in every other
    dim of K leaves the Triton scores unchanged (those dims are never loaded)."""
    H, Hkv, D, Lk = 4, 2, 128, 40
    chunks = ((60, 61), (63,), (3,), (3, 20))  # rotate-half pairs: (60, 124) (61, 125) (63, 127) (3, 67) (20, 84)
    segs, member = chunk_tables(chunks, H, Hkv, D, D, "rotate_half", "cpu")
    assert segs.tolist() == [[48, 112, -1, -1], [0, 16, 64, 80]]
    assert member[0].nonzero().flatten().tolist() == [60, 61, 124, 125]
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, H, 1, D, generator=g), torch.randn(1, Hkv, Lk, D, generator=g)
    clean = fasa_scores(q, k, segs, member, per_kv_head=False)
    poisoned = k.clone()
    for hkv in range(Hkv):
        keep = torch.zeros(D, dtype=torch.bool)
        for start in segs[hkv].tolist():
            if start >= 0:
                keep[start:start + 16] = True
        poisoned[0, hkv, :, ~keep] = float("nan")
    torch.testing.assert_close(fasa_scores(q, poisoned, segs, member, per_kv_head=False), clean)


@pytest.mark.parametrize("per_kv_head", [False, True])
def test_all_chunks_dominant_gives_exact_qk(per_kv_head):
    B, H, Hkv, D, Lk = 2, 6, 2, 96, 70
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(B, H, 1, D, generator=g), torch.randn(B, Hkv, Lk, D, generator=g)
    dims, member = chunk_tables((tuple(range(D // 2)),), H, Hkv, D, D, "rotate_half", "cpu")
    exact = torch.einsum("bhd,bhnd->bhn", q[:, :, 0].double(), k.double().repeat_interleave(H // Hkv, 1))
    if per_kv_head:
        exact = exact.view(B, Hkv, H // Hkv, Lk).sum(2)
    state = torch.ones(B, Lk, dtype=torch.int8)
    ref = fasa_scores_reference(q, k, dims, member, state, per_kv_head=per_kv_head)
    got = fasa_scores(q, k, dims, member, per_kv_head=per_kv_head)
    torch.testing.assert_close(ref.double(), exact, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.double(), exact, atol=1e-4, rtol=1e-5)


@settings(max_examples=examples(10), deadline=None)
@given(B=st.integers(1, 2), S=st.integers(1, 3), Lk=st.integers(1, 60), slots=st.integers(1, 60),
       n_hidden=st.integers(0, 20), seed=st.integers(0, 999))
def test_select_tokens_is_torch_topk(B, S, Lk, slots, n_hidden, seed):
    """The selected set == torch.topk's on untied scores; -inf scores (invisible keys) become -1; counts cut
    each row after its first `counts` slots."""
    slots = min(slots, Lk)
    g = torch.Generator().manual_seed(seed)
    scores = torch.randperm(B * S * Lk, generator=g).float().view(B, S, Lk)  # distinct: no ties
    hidden = torch.rand(B, S, Lk, generator=g).argsort(-1) < n_hidden
    scores = scores.masked_fill(hidden, float("-inf"))
    idx = select_tokens(scores, slots)  # unsorted: compare sets
    want = torch.topk(scores, slots, dim=-1)
    want_idx = torch.where(want.values == float("-inf"), -1, want.indices)
    assert torch.equal(idx.sort(-1).values, want_idx.sort(-1).values)
    counts = torch.randint(0, slots + 1, (B, S), generator=g)
    cut = select_tokens(scores, slots, counts)  # sorted: the first `counts` of torch.topk's order
    slot = torch.arange(slots)
    assert torch.equal(cut, torch.where(slot < counts[..., None], want_idx, -1))


def selected_mask(idx: torch.Tensor, H: int, Lk: int) -> torch.Tensor:
    """(B, S, N) indices -> (B, H, 1, Lk) bool, by a loop."""
    B, S, N = idx.shape
    out = torch.zeros(B, H, 1, Lk, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for j in idx[b, h // (H // S)].tolist():
                if j >= 0:
                    out[b, h, 0, j] = True
    return out


@settings(max_examples=examples(10), deadline=None)
@given(B=st.integers(1, 2), Hkv=st.sampled_from([1, 3]), G=st.sampled_from([1, 3]), D=st.sampled_from([64, 96]),
       Lk=st.integers(20, 120), budget=st.sampled_from([4, 9, 0.3]), sink=st.integers(0, 2), recent=st.integers(0, 3),
       pad=st.integers(0, 9), gqa=st.sampled_from(fasa.GQA_MODES), seed=st.integers(0, 999))
def test_attention_is_exact_over_the_selection(B, Hkv, G, D, Lk, budget, sink, recent, pad, gqa, seed):
    """fasa.attention == exact attention over the keys it selected; the selection is the visible keys with
    the top partial scores (forced sink/recent first), budget-many; density = kept / visible."""
    H = Hkv * G
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, 1, D, generator=g), torch.randn(B, Hkv, Lk, D, generator=g),
               torch.randn(B, Hkv, Lk, D, generator=g))
    key_valid = None
    if pad:
        key_valid = torch.ones(B, Lk, dtype=torch.bool)
        key_valid[-1, :pad] = False
    mask = AttentionMask(causal=True, q_offset=Lk - 1, key_valid=key_valid)
    params = fasa.FasaParams(budget=budget, sink=sink, recent=recent, gqa=gqa,
                             chunks=((), random_chunks(H, D, 5, seed)))
    site = site_for(H, Hkv, D)
    out, density = fasa.attention(q, k, v, mask, site, params, 0.2)
    sel = fasa.fasa_select(q, k, v, mask, site, params, 0.2)
    chosen = selected_mask(sel.indices, H, Lk)
    vis = visible_keys(mask, B, 1, Lk)
    assert not (chosen & ~vis).any()
    want = exact_attention_reference(q.double(), k.double(), v.double(),
                                     AttentionMask(causal=False, dense_mask=chosen), scale=0.2)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)
    n_vis = vis[:, 0, 0].sum(-1)
    kept = chosen[:, :, 0].sum(-1)
    cap = torch.ceil(budget * n_vis) if budget < 1 else torch.full_like(n_vis, int(budget))
    expected = torch.minimum(cap.long().clamp(min=sink + recent), n_vis)
    assert torch.equal(kept, expected[:, None].expand(B, H))
    torch.testing.assert_close(density, kept.float() / n_vis[:, None].float())
    # forced keys are in, and each unchosen visible key scores no higher than every chosen unforced one
    state = key_state(vis[:, 0, 0], sink, recent)
    dims, member = chunk_tables(params.chunks[1], H, Hkv, D, D, "rotate_half", "cpu")
    scores = fasa_scores_reference(q, k, dims, member, state, per_kv_head=gqa == "per_kv_head")
    scores = scores.repeat_interleave(H // scores.shape[1], dim=1)
    assert not ((state[:, None] == 2) & ~chosen[:, :, 0]).any()
    for b in range(B):
        for h in range(H):
            inside = scores[b, h][chosen[b, h, 0]]
            outside = scores[b, h][vis[b, 0, 0] & ~chosen[b, h, 0]]
            if len(outside) and len(inside):
                assert float(outside.max()) <= float(inside.min())


def test_budget_covering_the_visible_keys_is_dense():
    """Budget >= the visible keys (but < the cache: left padding) through the FASA path == exact attention;
    budget >= the cache is declared unsupported (the node then runs dense)."""
    B, H, Hkv, D, Lk = 2, 4, 2, 64, 50
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(B, H, 1, D, generator=g), torch.randn(B, Hkv, Lk, D, generator=g),
               torch.randn(B, Hkv, Lk, D, generator=g))
    key_valid = torch.ones(B, Lk, dtype=torch.bool)
    key_valid[:, :8] = False
    mask = AttentionMask(causal=True, q_offset=Lk - 1, key_valid=key_valid)
    for gqa in fasa.GQA_MODES:
        params = fasa.FasaParams(budget=42, gqa=gqa)
        out, density = fasa.attention(q, k, v, mask, site_for(H, Hkv, D), params, 0.125)
        want = exact_attention_reference(q.double(), k.double(), v.double(), mask, scale=0.125)
        torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)
        assert bool((density == 1).all())
    call = CallShape(B, H, Hkv, 1, Lk, D, torch.float32, "cpu")
    assert "covers the cache length 50" in fasa.unsupported(call, site_for(H, Hkv, D), fasa.FasaParams(budget=50))
    assert fasa.unsupported(call, site_for(H, Hkv, D), fasa.FasaParams(budget=49)) is None


def test_unsupported_and_params():
    call = CallShape(1, 9, 3, 1, 4096, 64, torch.float32, "cpu")
    site = site_for(9, 3, 64)
    p = fasa.FasaParams()
    assert fasa.unsupported(call, site, p) is None
    assert "q_len 7" in fasa.unsupported(CallShape(1, 9, 3, 7, 4096, 64, torch.float32, "cpu"), site, p)
    assert "layer 0 is in dense_layers" in fasa.unsupported(call, site_for(9, 3, 64, layer=0), p)
    assert "head_dim 512" in fasa.unsupported(CallShape(1, 9, 3, 1, 4096, 512, torch.float16, "cuda"),
                                              site_for(9, 3, 512), p)
    wrong = fasa.FasaParams(chunks=[[], [[1, 2]] * 4], mismatch="dense")
    assert "name 4 heads" in fasa.unsupported(call, site, wrong)
    assert "no calibrated chunks for layer 5" in fasa.unsupported(call, site_for(9, 3, 64, layer=5), wrong)
    assert fasa.unsupported(call, site, fasa.FasaParams(chunks=[[], [[1, 2]] * 4])) is None  # mismatch = "rule"
    assert "chunk of layer 1 is >= head_dim / 2" in fasa.unsupported(
        call, site, fasa.FasaParams(chunks=[[], [[40]]], mismatch="dense"))
    # the speed gate: 1 x 3 KV heads x 4096 keys x 2 x 64 dims x 4 bytes = 6 MiB of K+V (bf16 on CUDA: 3 MiB)
    assert fasa.cache_mib(call) == 6.0
    assert fasa.unsupported(call, site, fasa.FasaParams(min_cache_mib=6)) is None
    assert "K+V of this layer 6.0 MiB < min_cache_mib 6.5" in fasa.unsupported(
        call, site, fasa.FasaParams(min_cache_mib=6.5))
    assert "3.0 MiB < min_cache_mib 4" in fasa.unsupported(
        CallShape(1, 9, 3, 1, 4096, 64, torch.bfloat16, "cuda"), site, fasa.FasaParams(min_cache_mib=4))
    where = "t.toml: [decode.params]"
    assert params_from_mapping(fasa.FasaParams, {"chunks": [[[1, 2], [3, 4]]]}, where).chunks == (((1, 2), (3, 4)),)
    for bad, needle in [({"budget": 0}, "must be > 0"), ({"budget": 2.5}, "whole number"),
                        ({"chunks": [[[1, 1]]]}, "repeats a chunk"), ({"chunks": [[[1], [2, 3]]]}, "different chunk"),
                        ({"chunks": [[[]]]}, "non-empty list"), ({"chunks": [[["a"]]]}, "not a chunk index"),
                        ({"chunks": [3]}, "layer 0 must be a list"), ({"gqa": "x"}, "gqa"),
                        ({"dense_layers": ["x"]}, "dense_layers"), ({"budgets": 3}, "unknown key 'budgets'"),
                        ({"min_cache_mib": -1}, "min_cache_mib")]:
        with pytest.raises(PolicyError, match=needle):
            params_from_mapping(fasa.FasaParams, bad, where)
    policy = sparse_compile.load_policy("fasa")
    assert policy.decode.method == "fasa" and policy.prefill.method == "dense"


# --- generation through the compiled model == a loop reference of the spec ---------------------------


def fasa_reference_factory(params: dict, head_dim: int):
    """An eager attention written from the spec with loops (rotate-half pairs c, c + D/2; per query head
    scores over its chunks' dims, forced first-sink / last-recent visible keys, top budget, exact softmax)."""
    chunks, budget, sink, recent = params["chunks"], params["budget"], params["sink"], params["recent"]

    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        B, H, Lq, D = query.shape
        Hkv, Lk = key.shape[1], key.shape[2]
        kk = key.repeat_interleave(H // Hkv, dim=1)
        vv = value.repeat_interleave(H // Hkv, dim=1)
        slots = min(Lk, max(budget, sink + recent))
        if Lq > 1 or module.layer_idx in params["dense_layers"] or slots >= Lk:
            out = F.scaled_dot_product_attention(query, kk, vv, attn_mask=attention_mask, scale=scaling,
                                                 is_causal=attention_mask is None and Lq > 1)
            return out.transpose(1, 2).contiguous(), None
        visible = attention_mask[:, 0, 0, :] if attention_mask is not None else torch.ones(B, Lk, dtype=torch.bool)
        out = torch.zeros(B, H, 1, D)
        for b in range(B):
            seen = visible[b].nonzero().flatten().tolist()
            forced = set(seen[:sink]) | set(seen[len(seen) - recent:] if recent else [])
            for h in range(H):
                dims = [d for c in chunks[module.layer_idx][h] for d in (c, c + D // 2)]
                score = {t: float(sum(query[b, h, 0, d] * kk[b, h, t, d] for d in dims)) for t in seen}
                ranked = sorted(seen, key=lambda t, score=score, forced=forced: (t not in forced, -score[t]))
                keep = torch.tensor(ranked[:slots])
                w = torch.softmax(query[b, h, 0] @ kk[b, h, keep].T * scaling, dim=-1)
                out[b, h, 0] = w @ vv[b, h, keep]
        return out.to(query.dtype).transpose(1, 2).contiguous(), None

    return attend


def generate(model, ids, mask, cache, forward_backend=None, **extra):
    kwargs = {"attention_mask": mask, "max_new_tokens": 5, "do_sample": False, "output_logits": True,
              "return_dict_in_generate": True, **extra}
    if cache:
        kwargs["cache_implementation"] = cache
    forward = model.forward
    if forward_backend is not None:
        model.forward = torch.compile(forward, backend=forward_backend)
    try:
        with torch.no_grad():
            return model.generate(ids, **kwargs)
    finally:
        model.forward = forward


@pytest.mark.parametrize("cache", [None, "static"], ids=["dynamic", "static"])
def test_compiled_generation_equals_the_loop_reference(cache):
    """Greedy generation, left-padded batch of 2, through torch.compile(backend=sparse) with a FASA policy ==
    the loop reference, token for token and logits of every step; sparse decode differs from dense."""
    model = peaked_llama(3)
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    chunks = [[], [[7, 2]] * 4, [[0, 5], [1, 6], [3, 4], [7, 5]]]
    params = {"budget": 10, "sink": 1, "recent": 2, "dense_layers": [0], "chunks": chunks}
    policy = {"name": "fasa-test", "decode": {"method": "fasa", "min_seq_len": 0, "params": params}}
    AttentionInterface.register("fasa_reference", fasa_reference_factory(params, 16))
    ALL_MASK_ATTENTION_FUNCTIONS.register("fasa_reference", sdpa_mask)
    dense_run = generate(model, ids, mask, cache)
    model.set_attn_implementation("fasa_reference")
    try:
        ref = generate(model, ids, mask, cache)
    finally:
        model.set_attn_implementation("sdpa")
    report = sparse_compile.Report()
    got = generate(model, ids, mask, cache, sparse_compile.backend(policy, inner="eager", report=report))
    assert got.sequences.tolist() == ref.sequences.tolist()
    for a, b in zip(got.logits, ref.logits, strict=True):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4)
    assert max(float((a - b).abs().max()) for a, b in zip(got.logits[1:], dense_run.logits[1:], strict=True)) > 1e-3
    density = report.layer_density("decode")
    assert density[0] == 1.0 and 0 < density[1] < 1 and 0 < density[2] < 1, density


def test_a_budget_one_below_the_cache_drops_one_key():
    """budget = cache - 1 runs FASA: close to the dense method, not equal to it."""
    B, H, Hkv, D, Lk = 1, 4, 2, 64, 30
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, 1, D, generator=g), torch.randn(B, Hkv, Lk, D, generator=g),
               torch.randn(B, Hkv, Lk, D, generator=g))
    mask = AttentionMask(causal=True, q_offset=Lk - 1)
    out, _ = fasa.attention(q, k, v, mask, site_for(H, Hkv, D), fasa.FasaParams(budget=Lk - 1, gqa="per_kv_head"),
                            0.125)
    ref, _ = dense.attention(q, k, v, mask, site_for(H, Hkv, D), dense.Params(), 0.125)
    assert not torch.allclose(out, ref, atol=1e-6)  # one key dropped per head
    assert float((out - ref).abs().max()) < 0.5


def test_calibration_ranks_a_planted_chunk_first_and_writes_a_valid_policy():
    """OverlapStats on synthetic post-RoPE q/k where rotate-half chunk 3 (dims 3 and 11) carries the scores:
    chunk 3 ranks first for every head, the adjacent pairing does not find it, and the kept set's recall
    beats the rule's; the written policy text loads and round-trips the chunks."""
    import argparse

    from sparse_compile.calibration.decode_attention import OverlapStats, chunks_policy_text, text_policy

    g = torch.Generator().manual_seed(0)
    H, Hkv, L, D = 2, 1, 256, 16
    q, k = 0.1 * torch.randn(H, L, D, generator=g), 0.1 * torch.randn(Hkv, L, D, generator=g)
    q[:, :, [3, 11]] += 3.0 * torch.randn(H, 1, 2, generator=g)
    k[:, :, [3, 11]] += 3.0 * torch.randn(Hkv, L, 2, generator=g)
    stats = OverlapStats(16, list(range(128, 256, 8)), ("rotate_half", "adjacent"), {0: D}, keep=2)
    stats.final = True
    stats.add(0, q, k)
    ranking = stats.ranking("rotate_half", 0)
    assert ranking[:, 0].tolist() == [3, 3]
    assert 3 not in stats.ranking("adjacent", 0)[:, :1].tolist()
    assert stats.recalls["calibrated"][0] > 0.9 > stats.recalls["rule"][0]
    chunks = [ranking.tolist()]
    args = argparse.Namespace(budget=0.25, min_seq_len=0, gqa="per_head", sink=4, recent=64)
    policy = text_policy(chunks_policy_text("tiny", chunks, args, "test", 2))
    assert policy.decode.params.chunks[0] == tuple(map(tuple, chunks[0])) and policy.decode.params.n_chunks == 2
    assert (policy.decode.params.sink, policy.decode.params.recent) == (4, 64)


@pytest.mark.slow
def test_smollm2_generation_equals_the_loop_reference():
    """SmolLM2-135M-Instruct (real weights, its first 6 layers to keep the CPU test short), 64 tokens of license
    text, the shipped policy's calibrated chunks (n_chunks = 8), budget 24: greedy generation through the
    compiled model == the loop reference token for token, and differs from dense decode."""
    from sparse_compile.evaluation.corpus import load_corpus, tokenize
    from sparse_compile.evaluation.models import ModelLoadError, load_model

    try:
        model, tokenizer = load_model("smollm2")
    except ModelLoadError as err:
        pytest.skip(str(err))
    model.model.layers = model.model.layers[:6]
    model.config.num_hidden_layers = 6
    ids = tokenize(tokenizer, load_corpus("licenses").text)[None, 1000:1064]
    mask = torch.ones_like(ids)
    shipped = sparse_compile.load_policy("fasa-smollm2").decode.params
    chunks = [[list(h[: shipped.n_chunks]) for h in layer] for layer in shipped.chunks[:6]]
    params = {"budget": 24, "sink": 0, "recent": 0, "dense_layers": [0], "chunks": chunks}
    policy = {"name": "fasa-smollm2", "decode": {"method": "fasa", "min_seq_len": 0, "params": params}}
    AttentionInterface.register("fasa_reference_smollm2", fasa_reference_factory(params, 64))
    ALL_MASK_ATTENTION_FUNCTIONS.register("fasa_reference_smollm2", sdpa_mask)
    dense_run = generate(model, ids, mask, None, max_new_tokens=8)
    model.set_attn_implementation("fasa_reference_smollm2")
    try:
        ref = generate(model, ids, mask, None, max_new_tokens=8)
    finally:
        model.set_attn_implementation("sdpa")
    got = generate(model, ids, mask, None, sparse_compile.backend(policy, inner="eager"), max_new_tokens=8)
    assert got.sequences.tolist() == ref.sequences.tolist()
    for a, b in zip(got.logits, ref.logits, strict=True):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)
    assert max(float((a - b).abs().max()) for a, b in zip(got.logits[1:], dense_run.logits[1:], strict=True)) > 1e-3


def test_report_cuts_long_parameter_values():
    """The Report prints FASA's per-layer chunk tables cut to a readable size, saying how long they are."""
    from sparse_compile.report import short_value

    chunks = sparse_compile.load_policy("fasa-smollm2").decode.params.chunks
    text = short_value(chunks)
    assert len(text) < 120 and text.endswith(f"({len(chunks)} entries, {len(str(chunks))} characters)")
    assert short_value((0, 1)) == "(0, 1)" and short_value("per_head") == "per_head"


def test_calibrate_fasa_end_to_end(tmp_path, capsys):
    """`calibrate fasa` on a tiny random model writes a policy that loads, with a full chunk ranking per
    layer and head (a permutation of the head's chunks) and the recall summary in its header; the written
    policy ran the NIAH grid against eager (FASA answering from 0 cached tokens on), and its header and the
    report say what eager found and the policy lost; --no-niah skips the check."""
    import json

    from sparse_compile.__main__ import main
    from sparse_compile.evaluation.models import save_tiny_llama

    model = save_tiny_llama(tmp_path / "model", layers=2)
    corpus = tmp_path / "text.txt"
    corpus.write_text(" ".join(f"token{i % 97} attends to key{i % 13}." for i in range(400)))
    out, report = tmp_path / "fasa.toml", tmp_path / "fasa.json"
    argv = ["calibrate", "fasa", "--model", str(model), "--corpus", str(corpus), "--length", "160", "--samples", "1",
            "--queries", "4", "--top-n", "16", "--device", "cpu", "--no-progress", "--min-seq-len", "0",
            "--niah-lengths", "400", "--cache-dir", str(tmp_path / "cache"), "--report", str(report),
            "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    params = sparse_compile.load_policy(str(out)).decode.params
    assert len(params.chunks) == 2 and params.n_chunks == 2  # head_dim 16: 8 chunks, the quarter kept
    for layer in params.chunks:
        assert len(layer) == 4 and all(sorted(head) == list(range(8)) for head in layer)
    text = out.read_text()
    assert "recall of the kept chunks" in text
    needles = json.loads(report.read_text())["needles"]
    assert needles["samples"] == 5 and needles["lengths"] == [400] and needles["lost"] == 0
    assert needles["tried"] == [{"label": "n_chunks 2, budget 0.25", "lost": 0}] and needles["safer_tried"] == 0
    line = f"# Needles: eager finds {needles['eager_found']} of 5 (NIAH at 400 tokens); the policy loses 0."
    assert line in text and line[2:] in capsys.readouterr().out
    assert main(argv[:-2] + ["--top-n", "100"]) == 2
    assert "--top-n 100 must be at most half of --length 160" in capsys.readouterr().err
    skipped = tmp_path / "skipped.toml"
    assert main(argv[:-2] + ["--no-niah", "--out", str(skipped)]) == 0, capsys.readouterr().err
    assert "Needles" not in skipped.read_text() and json.loads(report.read_text())["needles"] is None
    assert sparse_compile.load_policy(str(skipped)).decode.params == params


def test_report_notes_calibrated_chunks_that_do_not_fit():
    """The shipped policy's chunks are SmolLM2's (30 layers x 9 heads): on another model each FASA layer
    runs the model-agnostic rule, and the Report says so per layer at compile time; the dense layer gets
    no note. With mismatch = "dense" the same layers fall back instead (a fallback, not a note)."""
    from test_backend import tiny_llama
    from transformers import DynamicCache

    model = tiny_llama(3)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.randint(0, 100, (1, 40)), **{CACHE_ARG: cache}, use_cache=True)
    step = {"input_ids": torch.randint(0, 100, (1, 1)), CACHE_ARG: cache, "use_cache": True}
    policy = sparse_compile.load_policy("fasa-smollm2").to_dict()
    policy["decode"]["min_seq_len"] = 0  # a 41-token cache: FASA must run for the note to matter
    report = sparse_compile.explain(model, policy=policy, **step)
    decode = {s.layer: s for s in report.sites if s.phase == "decode"}
    assert set(decode) == {0, 1, 2} and decode[0].note == ""
    for layer in (1, 2):
        assert "the model-agnostic chunk rule runs instead" in decode[layer].note
        assert "name 9 heads; the site has 4 query heads and 2 KV heads" in decode[layer].note
    assert "runs its method, with a note:" in str(report)
    policy["decode"]["params"]["mismatch"] = "dense"
    report = sparse_compile.explain(model, policy=policy, **step)
    assert all(s.note == "" for s in report.sites)
    assert all("name 9 heads" in s.fallback for s in report.sites if s.phase == "decode" and s.layer > 0)
