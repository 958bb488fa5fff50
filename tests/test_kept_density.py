"""kernels/kept_density.py under the Triton interpreter: the one-launch decode density equals its PyTorch
definition (filled slots / visible keys, repeated over a KV head's query heads) for per-head and per-KV-head
selections, groups that are not powers of two, empty rows and rows with no visible key; bad inputs name the
problem."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples

from sparse_compile.kernels.kept_density import kept_density, kept_density_reference


@given(B=st.integers(1, 3), S=st.sampled_from([1, 2, 3]), group=st.sampled_from([1, 3, 4]),
       slots=st.integers(1, 70), fill=st.floats(0.0, 1.0), none_visible=st.booleans(), seed=st.integers(0, 999))
@settings(max_examples=examples(25), deadline=None)
def test_kept_density_equals_the_definition(B, S, group, slots, fill, none_visible, seed):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 500, (B, S, slots), generator=gen)
    idx[torch.rand(B, S, slots, generator=gen) > fill] = -1
    n_vis = torch.randint(0, 300, (B,), generator=gen, dtype=torch.int32)
    if none_visible:  # a batch row with no visible key (all padding): density = kept / 1
        n_vis[0] = 0
    got = kept_density(idx, n_vis, S * group, impl="triton")
    want = kept_density_reference(idx, n_vis, S * group)
    assert got.shape == (B, S * group) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for b in range(B):  # the definition, written out
        for h in range(S * group):
            row = idx[b, h // group]
            assert got[b, h].item() == pytest.approx(int((row >= 0).sum()) / max(int(n_vis[b]), 1), rel=1e-6)


@pytest.mark.parametrize("args,match", [
    ((torch.zeros(1, 2, 4), torch.ones(1, dtype=torch.int32), 2), "integer"),
    ((torch.zeros(1, 2, 4, dtype=torch.long), torch.ones(2, dtype=torch.int32), 2), "n_visible"),
    ((torch.zeros(1, 2, 4, dtype=torch.long), torch.ones(1, dtype=torch.int32), 3), "multiple"),
])
def test_bad_inputs_name_the_problem(args, match):
    with pytest.raises(ValueError, match=match):
        kept_density(*args)
