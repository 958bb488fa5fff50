"""The non-finite contract of attention, on every path (sparse_compile.attention_mask docstring):

(a) a key a query row cannot see (causal future, outside the window, key_valid False, in an unlisted
    block) never influences that row, whatever its K or V holds;
(b) a NaN/inf in q, or in the K/V of a key the row sees, makes the whole row NaN;
(c) a row with no visible key is zeros.

Paths: `exact_attention_reference`, `block_sparse_attention_reference` and the Triton kernel (fp32,
under the interpreter). The oracle for the rows that must stay finite is float64 attention written
out here, on the same inputs with every non-finite value replaced by a random finite one: by (a)
nothing a row cannot see may change its output.
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sparse_compile.attention_mask import AttentionMask, exact_attention_reference
from sparse_compile.kernels import BlockList, block_sparse_attention, block_sparse_attention_reference

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy on NaN/inf

NAN, INF = float("nan"), float("inf")
ATOL = {torch.float32: 3e-5, torch.float64: 1e-10}


def visibility(B, H, Lq, Lk, *, causal=True, q_offset=None, window=0, key_valid=None, blocks=None, bs=16):
    """(B, H, Lq, Lk) bool, written out independently of the code under test. blocks: (B, H, nq, nk) bool."""
    q_offset = Lk - Lq if q_offset is None else q_offset
    i = q_offset + torch.arange(Lq)[:, None]
    j = torch.arange(Lk)[None, :]
    vis = torch.ones(B, H, Lq, Lk, dtype=torch.bool)
    if causal:
        vis &= j <= i
    if window:
        vis &= j > i - window
    if key_valid is not None:
        vis &= key_valid[:, None, None, :]
    if blocks is not None:
        vis &= blocks.repeat_interleave(bs, 2).repeat_interleave(bs, 3)[:, :, :Lq, :Lk]
    return vis


def oracle(q, k, v, vis, scale):
    """float64 attention of finite inputs under the token mask `vis`; rows that see nothing are zeros."""
    group = q.shape[1] // k.shape[1]
    kk = k.double().repeat_interleave(group, 1)
    vv = v.double().repeat_interleave(group, 1)
    logits = (q.double() @ kk.transpose(-1, -2) * scale).masked_fill(~vis, -INF)
    sees = vis.any(-1, keepdim=True)
    probs = torch.where(sees, torch.softmax(logits, -1), torch.zeros_like(logits))
    return probs @ vv


def check_contract(out, q, k, v, vis, scale, g):
    """Assert (a), (b), (c) on `out` (B, H, Lq, D)."""
    group = q.shape[1] // k.shape[1]
    bad_key = ~(k.isfinite().all(-1) & v.isfinite().all(-1)).repeat_interleave(group, 1)  # (B, H, Lk)
    bad_q = ~q.isfinite().all(-1)
    sees = vis.any(-1)
    poisoned = sees & (bad_q | (vis & bad_key[:, :, None, :]).any(-1))
    assert out[poisoned].isnan().all(), "(b): a row that sees a non-finite value must be NaN"
    assert torch.equal(out[~sees], torch.zeros_like(out[~sees])), "(c): a row that sees nothing must be zeros"
    # (a): every other row equals attention on inputs whose non-finite values are replaced by anything finite
    finite = [torch.where(t.isfinite(), t, torch.randn(t.shape, generator=g, dtype=t.dtype) * 3) for t in (q, k, v)]
    want = oracle(*finite, vis, scale)
    keep = ~poisoned
    assert out[keep].isfinite().all(), "(a): a row that sees only finite values must be finite"
    torch.testing.assert_close(out[keep].double(), want[keep], atol=ATOL[out.dtype], rtol=ATOL[out.dtype])
    return poisoned


def run_all(q, k, v, vis, *, lists=None, kernel=True, **kw):
    """Every path on the same inputs: {name: output}. kw: block_size, causal, q_offset, window, key_valid, scale."""
    args = () if lists is None else (lists.kv_num_blocks, lists.kv_indices)
    outs = {"exact": exact_attention_reference(q, k, v, AttentionMask(causal=False, dense_mask=vis),
                                               scale=kw.get("scale")),
            "block_reference": block_sparse_attention_reference(q, k, v, *args, **kw)}
    if kernel and q.dtype == torch.float32:
        out = torch.full_like(q, 7.0)  # poisoned with a finite value: NaN must come from the kernel
        block_sparse_attention(q, k, v, *args, out=out, impl="triton", **kw)
        outs["triton"] = out
    return outs


def _qkv(B, H, Hkv, Lq, Lk, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, Lq, D, generator=g, dtype=dtype), torch.randn(B, Hkv, Lk, D, generator=g, dtype=dtype),
            torch.randn(B, Hkv, Lk, D, generator=g, dtype=dtype), g)


@pytest.mark.parametrize("tensor, value", [("k", NAN), ("k", -INF), ("v", NAN), ("v", INF)])
def test_reported_case_causal_nan_at_key_50(tensor, value):
    """v[..., 50, :] = nan with causal attention: rows 0..49 are untouched, rows 50.. are NaN."""
    q, k, v, g = _qkv(1, 2, 1, 100, 100, 32)
    clean = exact_attention_reference(q, k, v, AttentionMask(causal=True))
    {"k": k, "v": v}[tensor][..., 50, :] = value
    vis = visibility(1, 2, 100, 100)
    for name, out in run_all(q, k, v, vis, block_size=32).items():
        assert out[..., 50:, :].isnan().all(), name
        torch.testing.assert_close(out[..., :50, :], clean[..., :50, :], atol=3e-5, rtol=3e-5, msg=name)
        check_contract(out, q, k, v, vis, 1 / math.sqrt(32), g)


@pytest.mark.parametrize("kind", ["causal", "window", "padding", "unlisted", "chunk"])
@pytest.mark.parametrize("tensor", ["k", "v"])
def test_invisible_non_finite_keys_never_leak(kind, tensor):
    """Non-finite K/V at keys that some rows of a tile see and others do not (inside one BLOCK_N chunk)."""
    B, H, Hkv, bs, D = 2, 2, 1, 32, 16
    Lq, Lk = (40, 72) if kind == "chunk" else (64, 64)
    q, k, v, g = _qkv(B, H, Hkv, Lq, Lk, D, seed=1)
    kw = {"block_size": bs, "causal": kind != "unlisted"}
    lists, blocks = None, None
    if kind == "window":
        kw["window"] = 20
    if kind == "padding":
        kw["key_valid"] = torch.ones(B, Lk, dtype=torch.bool)
        kw["key_valid"][0, 3:9] = False
        kw["key_valid"][1, 40:41] = False
    if kind == "unlisted":  # full attention over listed blocks only: key block 0 is unlisted for query block 1
        blocks = torch.ones(B, H, 2, 2, dtype=torch.bool)
        blocks[:, :, 1, 0] = False
        lists = BlockList.from_dense(blocks, bs, Lq, Lk)
    vis = visibility(B, H, Lq, Lk, causal=kw["causal"], window=kw.get("window", 0), key_valid=kw.get("key_valid"),
                     blocks=blocks, bs=bs)
    bad = {"causal": [30, 47, 47], "window": [2, 10, 33], "padding": [3, 8, 40], "unlisted": [17, 30, 50],
           "chunk": [40, 71, 40]}[kind]
    t = {"k": k, "v": v}[tensor]
    for j, key in enumerate(bad):
        t[j % B, 0, key, j % D] = [NAN, INF, -INF][j % 3]
    outs = run_all(q, k, v, vis, lists=lists, **kw)
    assert set(outs) == {"exact", "block_reference", "triton"}
    for name, out in outs.items():
        poisoned = check_contract(out, q, k, v, vis, 1 / math.sqrt(D), g)
        assert 0 < int(poisoned.sum()) < poisoned.numel(), f"{name}: the case must have rows of both kinds"


def test_visible_infinite_key_poisons_even_at_zero_weight():
    """K = +inf in one dim with q < 0 there gives the logit -inf (weight 0): SDPA would drop the key;
    the contract makes every row that sees it NaN, in full chunks as in masked ones (V = inf: NaN, not inf)."""
    q, k, v, g = _qkv(1, 2, 1, 64, 64, 16, seed=2)
    q[..., 0] = -q[..., 0].abs() - 0.1
    k[0, 0, 5, :] = 0.0
    k[0, 0, 5, 0] = INF  # q . k = -inf for every row
    v[0, 0, 20, 3] = INF
    vis = visibility(1, 2, 64, 64)
    for name, out in run_all(q, k, v, vis, block_size=32, causal=True).items():
        assert out[..., :5, :].isfinite().all(), name
        assert out[..., 5:, :].isnan().all(), name


@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_non_finite_query_rows(value):
    """A non-finite q poisons its own row only; a row that sees no key stays zeros whatever its q."""
    q, k, v, g = _qkv(1, 2, 1, 48, 48, 16, seed=3)
    q[0, 0, 10, 2] = value
    q[0, 1, :, 0] = value  # every row of head 1 ...
    key_valid = torch.ones(1, 48, dtype=torch.bool)
    key_valid[0, :4] = False  # ... and rows 0..3 see no valid key (left padding)
    vis = visibility(1, 2, 48, 48, key_valid=key_valid)
    for name, out in run_all(q, k, v, vis, block_size=16, key_valid=key_valid).items():
        check_contract(out, q, k, v, vis, 0.25, g)
        assert torch.equal(out[0, :, :4], torch.zeros_like(out[0, :, :4])), name
        assert out[0, 0, 10].isnan().all() and out[0, 0, 11:].isfinite().all(), name
        assert out[0, 1, 4:].isnan().all(), name


def test_float_mask_minus_inf_hides_a_key_finite_minimum_does_not():
    q, k, v, g = _qkv(1, 1, 1, 8, 8, 16, seed=4)
    v[0, 0, 6] = NAN
    dm = torch.zeros(1, 1, 8, 8)
    dm[..., 6] = -INF
    out = exact_attention_reference(q, k, v, AttentionMask(causal=False, dense_mask=dm))
    check_contract(out, q, k, v, dm != -INF, 0.25, g)
    assert out.isfinite().all()
    dm[..., 6] = torch.finfo(torch.float32).min  # visible with weight ~0: still poisons, as in SDPA
    assert exact_attention_reference(q, k, v, AttentionMask(causal=False, dense_mask=dm)).isnan().all()


@given(
    B=st.integers(1, 2), Hkv=st.integers(1, 2), group=st.sampled_from([1, 2]), Lq=st.integers(1, 70),
    dk=st.integers(-20, 40), D=st.sampled_from([16, 24]), bs=st.sampled_from([16, 32]),
    dtype=st.sampled_from([torch.float32, torch.float64]), causal=st.booleans(), window=st.sampled_from([0, 0, 13]),
    padded=st.booleans(), listed=st.booleans(),
    poison=st.lists(st.tuples(st.sampled_from("qkv"), st.integers(0, 10**6), st.integers(0, 10**6),
                              st.sampled_from([NAN, INF, -INF])), min_size=1, max_size=6),
    seed=st.integers(0, 2**16),
)
def test_contract_on_drawn_shapes_masks_and_poison(B, Hkv, group, Lq, dk, D, bs, dtype, causal, window, padded,
                                                   listed, poison, seed):
    H, Lk = Hkv * group, max(1, Lq + dk)
    q, k, v, g = _qkv(B, H, Hkv, Lq, Lk, D, dtype=dtype, seed=seed)
    for name, where, dim, value in poison:  # anywhere: masked and unmasked positions alike
        t = {"q": q, "k": k, "v": v}[name]
        flat = t.view(-1, D)
        flat[where % flat.shape[0], dim % D] = value
    key_valid = torch.rand(B, Lk, generator=g) < 0.8 if padded else None
    lists, blocks = None, None
    if listed:
        nq, nk = math.ceil(Lq / bs), math.ceil(Lk / bs)
        blocks = torch.rand(B, H, nq, nk, generator=g) < 0.6
        lists = BlockList.from_dense(blocks, bs, Lq, Lk)
    kw = {"block_size": bs, "causal": causal, "window": window, "key_valid": key_valid, "scale": 0.3}
    vis = visibility(B, H, Lq, Lk, causal=causal, window=window, key_valid=key_valid, blocks=blocks, bs=bs)
    outs = run_all(q, k, v, vis, lists=lists, **kw)
    assert ("triton" in outs) == (dtype == torch.float32)
    for out in outs.values():
        check_contract(out, q, k, v, vis, 0.3, g)


def test_prepass_flags_exactly_the_non_finite_keys():
    """The kernel's pre-pass: per-key flags and the per-(batch, KV head) switch to the guarded loop."""
    from sparse_compile.kernels.block_sparse_attention import nonfinite_keys

    _, k, v, g = _qkv(2, 3, 3, 1, 300, 80, seed=5)
    k[0, 1, 7, 79] = NAN
    v[1, 2, 299, 0] = -INF
    v[1, 2, 150, 40] = INF
    bad, any_bad = nonfinite_keys(k, v)
    want = ~(k.isfinite().all(-1) & v.isfinite().all(-1))
    assert torch.equal(bad.bool(), want) and int(bad.sum()) == 3
    assert (any_bad != 0).tolist() == [False, True, False, False, False, True]
