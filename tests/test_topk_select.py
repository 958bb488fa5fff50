"""kernels/topk_select.py under the Triton interpreter: the set top-k equals torch.topk's set (untied rows),
with -inf dropped, per-row counts, ties at the threshold taken by lowest index, NaN ranked above +inf, every
slot written, and bad inputs raise errors that name the problem."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples

from sparse_compile.kernels.topk_select import MAX_N, topk_indices, topk_indices_reference


def as_sets(idx: torch.Tensor, x: torch.Tensor) -> list[tuple[set[int], int]]:
    """Per row: the chosen indices of finite values, and how many slots hold an index (the -inf values tie, so
    which of them fill the slots is arbitrary)."""
    rows = idx.reshape(-1, idx.shape[-1]) if idx.numel() else idx.new_empty(x[..., 0].numel(), 0)
    values = x.reshape(rows.shape[0], -1)
    out = []
    for row, val in zip(rows, values, strict=True):
        chosen = row[row >= 0]
        out.append(({int(i) for i in chosen if torch.isfinite(val[i])}, chosen.numel()))
    return out


@given(
    rows=st.integers(1, 4),
    N=st.integers(1, 3000),
    frac=st.floats(0.0, 1.0),
    neg_inf=st.floats(0.0, 0.9),
    counts=st.booleans(),
    drop=st.booleans(),
    algorithm=st.sampled_from(["bisect", "radix"]),
    seed=st.integers(0, 10_000),
)
@settings(max_examples=examples(20), deadline=None)
def test_set_equals_torch_topk(rows, N, frac, neg_inf, counts, drop, algorithm, seed):
    gen = torch.Generator().manual_seed(seed)
    k = min(N, int(frac * N))
    x = torch.randn(rows, 2, N, generator=gen)  # continuous: no ties
    x[torch.rand(rows, 2, N, generator=gen) < neg_inf] = float("-inf")
    row_k = torch.randint(0, k + 3, (rows, 2), generator=gen) if counts else None
    got = topk_indices(x, k, row_k=row_k, drop_neg_inf=drop, impl="triton", algorithm=algorithm)
    ref = topk_indices_reference(x, k, row_k=row_k, drop_neg_inf=drop)
    assert got.shape == ref.shape == (rows, 2, k) and got.dtype == torch.int64
    assert as_sets(got, x) == as_sets(ref, x)
    if k:  # each row's chosen indices are distinct and in ascending order, the -1 slots last
        for row in got.reshape(-1, k):
            chosen = row[row >= 0]
            if not drop:
                assert torch.equal(chosen, row[: chosen.numel()])
            assert torch.equal(chosen, chosen.sort().values) and chosen.unique().numel() == chosen.numel()


@pytest.mark.parametrize("algorithm", ["bisect", "radix"])
def test_ties_take_the_lowest_indices_and_nan_ranks_first(algorithm):
    x = torch.tensor([[1.0, 3.0, 2.0, 3.0, 3.0, 0.0, 3.0],
                      [0.0, float("nan"), -0.0, float("inf"), -1.0, 0.0, 0.5]])
    got = topk_indices(x, 3, impl="triton", algorithm=algorithm)
    assert got[0].tolist() == [1, 3, 4]  # four 3.0s: the three lowest indices
    assert got[1].tolist() == [1, 3, 6]  # NaN > +inf > 0.5
    got = topk_indices(x, 5, impl="triton", algorithm=algorithm)
    assert got[1].tolist() == [0, 1, 3, 5, 6]  # +0.0 ranks above -0.0: the two +0.0s at 0 and 5


@pytest.mark.parametrize("algorithm", ["bisect", "radix"])
def test_longest_rows_with_ties_at_the_threshold(algorithm):
    """Rows of MAX_N values drawn from few levels: counts reach MAX_N and the k-th value is tied hundreds of
    times (the lowest indices of the tie are taken)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(-3, 4, (2, MAX_N), generator=gen).float()
    x[1] = 2.0  # one level: every count is MAX_N until the last step
    for k in (1, 5000, MAX_N - 1, MAX_N):
        got = topk_indices(x, k, impl="triton", algorithm=algorithm)
        for row in range(2):
            kth = x[row].sort(descending=True).values[k - 1]
            above = (x[row] > kth).nonzero().flatten()
            ties = (x[row] == kth).nonzero().flatten()[: k - above.numel()]
            assert torch.equal(got[row], torch.cat([above, ties]).sort().values)


@pytest.mark.parametrize("algorithm", ["bisect", "radix"])
def test_every_slot_is_written(algorithm):
    x = torch.randn(3, 500)
    x[1, 10:] = float("-inf")
    row_k = torch.tensor([64, 64, 7])
    for _ in range(2):  # the launcher allocates with torch.empty: poison what it may reuse
        torch.full((3, 64), 12345, dtype=torch.int64)
        got = topk_indices(x, 64, row_k=row_k, impl="triton", algorithm=algorithm)
    assert ((got >= -1) & (got < 500)).all()
    assert (got[1] >= 0).sum() == 10 and (got[2] >= 0).sum() == 7 and (got[2, 7:] == -1).all()


@pytest.mark.parametrize("bad, message", [
    (lambda: topk_indices(torch.randn(2, 8).half(), 2, impl="triton"), "float32"),
    (lambda: topk_indices(torch.randn(2, 8).double(), 2, impl="triton"), "float32 rows"),
    (lambda: topk_indices(torch.randn(2, 8), 9, impl="triton"), "k = 9"),
    (lambda: topk_indices(torch.randn(2, 8), 2, row_k=torch.ones(3, dtype=torch.int64)), "row_k must be shaped"),
    (lambda: topk_indices(torch.randn(2, 8), 2, row_k=torch.ones(2)), "integer"),
    (lambda: topk_indices(torch.randn(2, 8), 2, impl="fast"), "impl"),
    (lambda: topk_indices(torch.randn(2, 8), 2, algorithm="sort"), "algorithm"),
])
def test_bad_inputs_name_the_problem(bad, message):
    with pytest.raises(ValueError, match=message):
        bad()


@pytest.mark.parametrize("algorithm", ["bisect", "radix"])
@pytest.mark.parametrize("group", [1, 4])
def test_tokens_are_written_instead_of_indices(algorithm, group):
    gen = torch.Generator().manual_seed(group)
    x = torch.randn(2, 2 * group, 300, generator=gen)
    x[0, 0, :100] = float("-inf")
    tokens = torch.randint(0, 10_000, (2, 2, 300), generator=gen)
    tokens[1, 1, ::7] = -1  # a padding candidate stays -1
    got = topk_indices(x, 120, tokens=tokens, impl="triton", algorithm=algorithm)
    ref = topk_indices_reference(x, 120, tokens=tokens)
    idx = topk_indices(x, 120, impl="triton", algorithm=algorithm)
    mapped = tokens.repeat_interleave(group, dim=1).gather(-1, idx.clamp(min=0))
    assert torch.equal(got, torch.where(idx < 0, -1, mapped))
    assert [sorted(r.tolist()) for r in got.view(-1, 120)] == [sorted(r.tolist()) for r in ref.view(-1, 120)]



@given(
    B=st.integers(1, 3),
    S=st.sampled_from([1, 2, 4]),
    heads_per_row=st.sampled_from([1, 3, 4]),
    N=st.integers(1, 300),
    frac=st.floats(0.0, 1.0),
    neg_inf=st.floats(0.0, 0.9),
    counts=st.booleans(),
    use_tokens=st.booleans(),
    algorithm=st.sampled_from(["bisect", "radix"]),
    seed=st.integers(0, 10_000),
)
@settings(max_examples=examples(12), deadline=None)
def test_fused_density_equals_kept_density_of_the_result(B, S, heads_per_row, N, frac, neg_inf, counts, use_tokens,
                                                         algorithm, seed):
    """The density the top-k writes in its own launch is kernels.kept_density of the indices it returns: filled
    slots (index >= 0, -1 tokens included) over the batch row's visible keys, for each query head of the row."""
    from sparse_compile.kernels.kept_density import kept_density_reference

    gen = torch.Generator().manual_seed(seed)
    k = min(N, int(frac * N))
    x = torch.randn(B, S, N, generator=gen)
    x[torch.rand(B, S, N, generator=gen) < neg_inf] = float("-inf")
    row_k = torch.randint(0, k + 3, (B, S), generator=gen) if counts else None
    tokens = None
    if use_tokens:  # candidates' token ids per score row, some -1 (a candidate past the cache)
        tokens = torch.randint(-1, 5 * N, (B * S, N), generator=gen)
    n_visible = torch.randint(0, 2 * N, (B,), generator=gen, dtype=torch.int32)
    H = S * heads_per_row
    for impl in ("triton", "reference"):
        density = torch.full((B, H), float("nan"))
        idx = topk_indices(x, k, row_k=row_k, tokens=tokens, impl=impl, algorithm=algorithm,
                           density_out=density, n_visible=n_visible)
        assert torch.equal(density, kept_density_reference(idx, n_visible, H)), impl


def test_fused_density_bad_inputs_name_the_problem():
    x = torch.randn(2, 4, 16)
    with pytest.raises(ValueError, match="both or neither"):
        topk_indices(x, 4, impl="triton", density_out=torch.empty(2, 8))
    with pytest.raises(ValueError, match="batch rows"):
        topk_indices(x, 4, impl="triton", density_out=torch.empty(3, 8), n_visible=torch.ones(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="density_out must be"):
        topk_indices(x, 4, impl="triton", density_out=torch.empty(2, 6), n_visible=torch.ones(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="n_visible must be"):
        topk_indices(x, 4, impl="triton", density_out=torch.empty(2, 8), n_visible=torch.ones(2))


def test_fused_density_with_an_empty_batch_returns_empty():
    x = torch.randn(0, 4, 16)
    for impl in ("triton", "reference"):
        idx = topk_indices(x, 3, impl=impl, density_out=torch.empty(0, 8),
                           n_visible=torch.empty(0, dtype=torch.int32))
        assert idx.shape == (0, 4, 3)


@given(
    N=st.integers(1, 600),
    n_pos=st.integers(0, 40),
    n_neg=st.integers(0, 40),
    n_nan=st.integers(0, 3),
    spread=st.sampled_from([1e-4, 1e-2, 1.0, 100.0]),
    frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 10_000),
)
@settings(max_examples=examples(25), deadline=None)
def test_rows_of_close_values_with_forced_and_invisible_entries(N, n_pos, n_neg, n_nan, spread, frac, seed):
    """Rows shaped like the decode selection's: values close together (page bounds, sums of many positive terms),
    +inf (forced pages / keys), -inf (invisible ones) and NaN, at every k: the search starts from the finite range
    when the k-th value is finite, from +inf's code when it is not (k within the +inf/NaN entries), or at -inf's.
    The chosen indices are exactly the k largest by (NaN > +inf > finite > -inf), ties by lowest index."""
    gen = torch.Generator().manual_seed(seed)
    x = 300.0 + spread * torch.randn(N, generator=gen)
    slots = torch.randperm(N, generator=gen)
    x[slots[:n_pos]] = float("inf")
    x[slots[n_pos:n_pos + n_neg]] = float("-inf")
    x[slots[n_pos + n_neg:n_pos + n_neg + n_nan]] = float("nan")
    k = min(N, int(frac * N))
    got = topk_indices(x[None], k, drop_neg_inf=False, impl="triton")[0]

    def rank(i: int) -> tuple:
        v = float(x[i])
        return (0, 0.0, i) if v != v else ((1, 0.0, i) if v == float("inf") else (2, -v, i))

    want = sorted(sorted(range(N), key=rank)[:k])
    assert got.tolist() == want
