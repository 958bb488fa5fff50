"""kernels/lessismore_select.py under the Triton interpreter: one pass over K/V gives LessIsMore's selection layer,
the exact decode attention and the spec's selection, equal to the PyTorch references (float32 / float16, GQA 1
and 4, head_dim 64, 80 and 128, lengths not a tile multiple, ragged left padding, short rows, the multi-block
paths of the row kernels); every output and intermediate element is written; with tied logits the heads'
rankings are valid rankings and the union is theirs; bad inputs raise errors that name the problem; the
method's selecting layer runs it."""

from __future__ import annotations

import pytest
import torch

from sparse_compile.attention_mask import AttentionMask, SiteFacts
from sparse_compile.kernels.fasa import key_state
from sparse_compile.kernels.lessismore import (
    budget_split,
    decode_logits_reference,
    fixed_regions,
    select_from_logits,
    union_by_rank,
)
from sparse_compile.kernels.lessismore_select import (
    lessismore_select,
    lessismore_select_reference,
    select_triton,
)
from sparse_compile.methods import lessismore

TOL = {torch.float32: {"atol": 2e-5, "rtol": 2e-5}, torch.float16: {"atol": 3e-3, "rtol": 3e-3}}
SENTINEL = -7777  # poison of the int32 selection buffer


def visibility(B: int, Lk: int, pads: list[int], unwritten: int = 0) -> torch.Tensor:
    """(B, Lk) bool: left padding pads[b], and the last `unwritten` static-cache slots invisible."""
    vis = torch.ones(B, Lk, dtype=torch.bool)
    for b in range(B):
        vis[b, : pads[b]] = False
    vis[:, Lk - unwritten:] = False
    return vis


def inputs(B: int, H: int, Hkv: int, Lk: int, D: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, 1, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype)
    return q, k, v


def run_poisoned(q, k, v, visible, scale, n_sink, middle, n_recent, **kw):
    """select_triton with its outputs poisoned (NaN / SENTINEL) and every intermediate buffer poisoned."""
    B = q.shape[0]
    out = torch.full_like(q, float("nan"))
    sel = torch.full((B, n_sink + n_recent + middle), SENTINEL, dtype=torch.int32)
    run = select_triton(q, k, v, key_state(visible, n_sink, n_recent), scale, n_sink, middle, n_recent,
                        out=out, selection=sel, poison=True, **kw)
    assert run.out is out and run.selection is sel
    assert not (sel == SENTINEL).any(), "a selection slot was never written"
    return run


def as_sets(selection: torch.Tensor) -> list[set[int]]:
    return [{t for t in row.tolist() if t >= 0} for row in selection]


def check_against_reference(run, q, k, v, visible, scale, n_sink, middle, n_recent):
    """Output, logits, each head's ranking and the selection against the PyTorch references."""
    ref_out, ref_sel = lessismore_select_reference(q, k, v, visible, scale, n_sink, middle, n_recent)
    torch.testing.assert_close(run.out, ref_out, **TOL[q.dtype], equal_nan=True)
    # logits: -inf exactly outside the middle region, the float32 products elsewhere
    is_sink, is_recent = fixed_regions(visible, n_sink, n_recent)
    hidden = ~(visible & ~is_sink & ~is_recent)[:, None, :].expand_as(run.logits)
    ref_logits = decode_logits_reference(q, k, scale, visible).masked_fill(hidden, float("-inf"))
    assert torch.equal(run.logits == float("-inf"), hidden)
    torch.testing.assert_close(run.logits[~hidden], ref_logits[~hidden], atol=1e-5, rtol=1e-5)
    # each head's top k in rank order (-1 past its valid logits) = torch.topk's
    take = min(middle, k.shape[2])
    values, top = torch.topk(ref_logits, take, dim=-1, sorted=True)
    assert torch.equal(run.head_top, torch.where(values > float("-inf"), top, -1).to(torch.int32))
    # the selection: the same tokens (as sets: the spec's contract) and here, without near-ties, the same layout
    assert as_sets(run.selection) == as_sets(ref_sel)
    assert torch.equal(run.selection, ref_sel)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("H", "Hkv"), [(4, 4), (8, 2)])
@pytest.mark.parametrize(("D", "Lk"), [(64, 77), (128, 150)])
def test_equals_reference(dtype, H, Hkv, D, Lk):
    """B = 2 with ragged left padding and unwritten tail slots; Lk not a multiple of the key block or tile."""
    q, k, v = inputs(2, H, Hkv, Lk, D, dtype, seed=H * D + Lk)
    visible = visibility(2, Lk, [0, 13], unwritten=4)
    run = run_poisoned(q, k, v, visible, D ** -0.5, 3, 20, 6)
    check_against_reference(run, q, k, v, visible, D ** -0.5, 3, 20, 6)


@pytest.mark.parametrize(("tile", "block_cap", "splits"), [(4, 32, 1), (8, 64, 3), (16, 1 << 14, 2)])
def test_tiles_blocks_and_splits(tile, block_cap, splits):
    """Every tile size, the row kernels looping over several blocks (block_cap below their row length), one split
    (no combine) or several."""
    Lk, middle = 203, 12
    q, k, v = inputs(2, 4, 2, Lk, 64, torch.float32, seed=tile)
    visible = visibility(2, Lk, [5, 40])
    run = run_poisoned(q, k, v, visible, 0.125, 4, middle, 7, tile=tile, block_cap=block_cap, num_splits=splits)
    check_against_reference(run, q, k, v, visible, 0.125, 4, middle, 7)


@pytest.mark.parametrize(("Lk", "budget", "pads"), [
    (40, (2, 30, 5), [0, 25]),   # fewer middle keys than `middle` (-1 padded union)
    (24, (1, 40, 2), [3, 0]),    # middle > Lk: each head ranks at most Lk keys
    (50, (0, 10, 0), [0, 7]),    # no sink, no recent
    (50, (3, 0, 4), [0, 9]),     # no middle: the forced keys only
    (33, (2, 8, 3), [0, 33]),    # a row that sees no key: zeros and an empty selection
])
def test_short_rows_and_edge_budgets(Lk, budget, pads):
    """(head_dim 80: not a power of two.)"""
    n_sink, middle, n_recent = budget
    q, k, v = inputs(2, 4, 2, Lk, 80, torch.float32, seed=Lk + middle)
    visible = visibility(2, Lk, pads)
    run = run_poisoned(q, k, v, visible, 0.125, n_sink, middle, n_recent)
    check_against_reference(run, q, k, v, visible, 0.125, n_sink, middle, n_recent)


def test_ties_give_a_valid_ranking():
    """Small-integer q and k: the logits are exact and tie a lot. Each head's ranking must be a valid top-k
    ranking of the reference logits (distinct tokens, values non-increasing, nothing left out above the last),
    the union must be the rank-by-rank union of those rankings, and the forced keys the reference's."""
    g = torch.Generator().manual_seed(7)
    B, H, Hkv, Lk, D = 2, 8, 2, 130, 16
    n_sink, middle, n_recent = 2, 25, 5
    q = torch.randint(-1, 2, (B, H, 1, D), generator=g).float()
    k = torch.randint(-1, 2, (B, Hkv, Lk, D), generator=g).float()
    v = torch.randn(B, Hkv, Lk, D, generator=g)
    visible = visibility(B, Lk, [0, 17])
    run = run_poisoned(q, k, v, visible, 1.0, n_sink, middle, n_recent, tile=4)
    ref_out, ref_sel = lessismore_select_reference(q, k, v, visible, 1.0, n_sink, middle, n_recent)
    torch.testing.assert_close(run.out, ref_out, **TOL[torch.float32])
    is_sink, is_recent = fixed_regions(visible, n_sink, n_recent)
    logits = decode_logits_reference(q, k, 1.0, visible).masked_fill(
        ~(visible & ~is_sink & ~is_recent)[:, None, :], float("-inf"))
    assert torch.equal(run.logits, logits)  # integer products: exact
    assert logits.unique().numel() < 40  # the test means ties
    for b in range(B):
        for h in range(H):
            ranked = [t for t in run.head_top[b, h].tolist() if t >= 0]
            row = logits[b, h]
            n_valid = int((row > float("-inf")).sum())
            assert len(ranked) == len(set(ranked)) == min(middle, n_valid)
            vals = row[ranked]
            assert (vals[:-1] >= vals[1:]).all()
            if ranked:
                rest = torch.ones(Lk, dtype=torch.bool)
                rest[ranked] = False
                assert (row[rest] <= vals[-1]).all()
    valid = run.head_top >= 0
    union = union_by_rank(run.head_top.clamp(min=0), valid, Lk, middle)
    n_fixed = n_sink + n_recent
    assert torch.equal(run.selection[:, n_fixed:], union)
    assert torch.equal(run.selection[:, :n_fixed], ref_sel[:, :n_fixed])


def test_all_logits_tied():
    """Zero keys: every middle logit ties, more ties at the bound than the tie slots hold (the cap). Each head
    still ranks k distinct middle keys, and the union has `middle` distinct middle keys."""
    B, H, Hkv, Lk, D = 2, 2, 1, 70, 16
    q, _, v = inputs(B, H, Hkv, Lk, D, torch.float32, seed=2)
    k = torch.zeros(B, Hkv, Lk, D)
    visible = visibility(B, Lk, [0, 11])
    run = run_poisoned(q, k, v, visible, 0.25, 2, 15, 3, tile=4)
    _, ref_sel = lessismore_select_reference(q, k, v, visible, 0.25, 2, 15, 3)
    is_sink, is_recent = fixed_regions(visible, 2, 3)
    middle_keys = visible & ~is_sink & ~is_recent
    for b in range(B):
        for h in range(H):
            ranked = run.head_top[b, h].tolist()
            assert len(set(ranked)) == 15 and all(middle_keys[b, t] for t in ranked)
        union = run.selection[b, 5:].tolist()
        assert len(set(union)) == 15 and all(middle_keys[b, t] for t in union)
    assert torch.equal(run.selection[:, :5], ref_sel[:, :5])


def test_nonfinite_values():
    """NaN in the K/V of keys a row cannot see changes nothing; NaN in a visible key's V makes its group's heads
    NaN (as the reference) and leaves the selection alone."""
    Lk = 60
    q, k, v = inputs(2, 4, 2, Lk, 64, torch.float32, seed=3)
    visible = visibility(2, Lk, [0, 10])
    clean = run_poisoned(q, k, v, visible, 0.125, 2, 12, 4)
    k2, v2 = k.clone(), v.clone()
    k2[1, :, 3] = float("nan")  # left padding of row 1
    v2[1, :, 5] = float("inf")
    hidden = run_poisoned(q, k2, v2, visible, 0.125, 2, 12, 4)
    assert torch.equal(hidden.out, clean.out) and torch.equal(hidden.selection, clean.selection)
    v2[0, 1, 30] = float("nan")  # visible in row 0, KV head 1: query heads 2 and 3
    poisoned = run_poisoned(q, k2, v2, visible, 0.125, 2, 12, 4)
    ref_out, _ = lessismore_select_reference(q, k2, v2, visible, 0.125, 2, 12, 4)
    assert poisoned.out[0, 2:].isnan().all() and not poisoned.out[0, :2].isnan().any()
    torch.testing.assert_close(poisoned.out, ref_out, equal_nan=True)
    assert torch.equal(poisoned.selection, clean.selection)


def test_public_entry_point():
    """lessismore_select: "triton" (interpreter) == "reference" == "auto" on the CPU, given or computed state."""
    Lk = 45
    q, k, v = inputs(2, 4, 1, Lk, 64, torch.float16, seed=11)
    visible = visibility(2, Lk, [0, 6], unwritten=2)
    out_t, sel_t = lessismore_select(q, k, v, visible, 0.125, 2, 10, 3, impl="triton")
    out_s, sel_s = lessismore_select(q, k, v, visible, 0.125, 2, 10, 3, impl="triton",
                                     state=key_state(visible, 2, 3))
    out_r, sel_r = lessismore_select(q, k, v, visible, 0.125, 2, 10, 3, impl="reference")
    out_n, sel_n = lessismore_select(q, k, v, None, 0.125, 2, 10, 3, impl="reference", state=key_state(visible, 2, 3))
    assert torch.equal(out_n, out_r) and torch.equal(sel_n, sel_r)
    out_a, sel_a = lessismore_select(q, k, v, visible, 0.125, 2, 10, 3)
    torch.testing.assert_close(out_t, out_r, **TOL[torch.float16])
    assert torch.equal(out_t, out_s) and torch.equal(out_a, out_r)
    assert as_sets(sel_t) == as_sets(sel_r) == as_sets(sel_s) == as_sets(sel_a)
    out_buf = torch.empty_like(q)
    sel_buf = torch.empty(2, 15, dtype=torch.int32)
    got = lessismore_select(q, k, v, visible, 0.125, 2, 10, 3, impl="reference", out=out_buf, selection=sel_buf)
    assert got[0] is out_buf and got[1] is sel_buf and torch.equal(sel_buf, sel_r)


def _bad(**change):
    B, H, Hkv, Lk, D = 2, 4, 2, 20, 16
    args = {"q": torch.randn(B, H, 1, D), "k": torch.randn(B, Hkv, Lk, D), "v": torch.randn(B, Hkv, Lk, D),
            "visible": torch.ones(B, Lk, dtype=torch.bool), "scale": 0.25, "n_sink": 1, "middle": 6, "n_recent": 2}
    kw = {}
    for name, value in change.items():
        if name in args:
            args[name] = value(args[name]) if callable(value) else value
        else:
            kw[name] = value
    return args, kw


@pytest.mark.parametrize(("change", "match"), [
    ({"q": lambda q: q.expand(2, 4, 2, 16)}, r"q must be \(B, H, 1, D\)"),
    ({"v": lambda v: v[:, :, :10]}, "k and v must both be"),
    ({"k": lambda k: k[:1], "v": lambda v: v[:1]}, "does not fit q"),
    ({"k": lambda k: torch.randn(2, 3, 20, 16), "v": lambda v: torch.randn(2, 3, 20, 16)}, "not a multiple"),
    ({"k": lambda k: k.half()}, "must share one float dtype"),
    ({"q": lambda q: q.int(), "k": lambda k: k.int(), "v": lambda v: v.int()}, "must share one float dtype"),
    ({"visible": lambda m: m.to("meta")}, "must be on one device"),
    ({"v": lambda v: v.to("meta")}, "must be on one device"),
    ({"visible": None}, "give visible"),
    ({"visible": lambda m: m[:, :5]}, r"visible must be \(B, Lk\)"),
    ({"visible": lambda m: m.int()}, r"visible must be \(B, Lk\) = \(2, 20\) bool"),
    ({"state": torch.ones(2, 20, dtype=torch.int32)}, "state must be"),
    ({"scale": float("nan")}, "scale must be a finite float"),
    ({"middle": -1}, "middle must be an int >= 0"),
    ({"n_sink": 1.5}, "n_sink must be an int >= 0"),
    ({"impl": "cuda"}, "impl must be"),
    ({"out": torch.empty(2, 4, 1, 16, dtype=torch.float16)}, "out must be"),
    ({"selection": torch.empty(2, 8, dtype=torch.int64)}, "selection must be"),
    ({"tile": 3, "impl": "triton"}, "tile must be one of"),
    ({"num_splits": 0, "impl": "triton"}, "num_splits must be an int >= 1"),
])
def test_bad_inputs_raise(change, match):
    args, kw = _bad(**change)
    with pytest.raises(ValueError, match=match):
        lessismore_select(**args, **kw)


def test_method_select_layer_runs_the_kernels():
    """methods/lessismore.py role "select" without a SparseCache: impl "triton" (the fused kernels) == "reference"
    (dense attention + decode_logits + select_tokens); the selection is what the reuse layers read."""
    B, H, Hkv, Lk, D = 2, 8, 2, 90, 64
    q, k, v = inputs(B, H, Hkv, Lk, D, torch.float32, seed=5)
    key_valid = visibility(B, Lk, [0, 12])
    mask = AttentionMask(causal=True, q_offset=Lk - 1, key_valid=key_valid)
    params = lessismore.LessIsMoreParams(budget=32, sink=2, recent_fraction=0.25)
    got = lessismore.attention(q, k, v, mask, SiteFacts(), params, 0.125, "select", impl="triton")
    want = lessismore.attention(q, k, v, mask, SiteFacts(), params, 0.125, "select", impl="reference")
    torch.testing.assert_close(got[0], want[0], **TOL[torch.float32])
    assert torch.equal(got[1], want[1])
    assert got[2].shape == (B, 32) and as_sets(got[2]) == as_sets(want[2])
    n_sink, middle, n_recent = budget_split(32, 2, 0.25)
    logits = decode_logits_reference(q, k, 0.125, key_valid)
    assert as_sets(got[2]) == as_sets(select_from_logits(logits, key_valid, n_sink, middle, n_recent))
    with pytest.raises(ValueError, match="impl must be"):
        lessismore.attention(q, k, v, mask, SiteFacts(), params, 0.125, "select", impl="gpu")
