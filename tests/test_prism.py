"""Prism: band layout, parameters, reference selection properties, Triton selection == reference
(under TRITON_INTERPRET=1), and attention (threshold 1 == dense; sparse == exact attention on the
selected blocks).

Kernel vs reference: the kernel computes in fp32, the reference in float64, so a block whose
top-p decision sits on the boundary may differ. The kernel's selection must lie between the
reference's at thresholds p - 1e-4 and p + 1e-4 (selection grows with the threshold).
"""

import tomllib
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples

from sparse_compile.attention_mask import AttentionMask, SiteFacts, exact_attention_reference, visible_keys
from sparse_compile.kernels.block_mask import BlockList, causal_block_mask
from sparse_compile.kernels.prism import prism_select_triton
from sparse_compile.methods import prism
from sparse_compile.methods.prism import (
    PrismParams,
    allowed_blocks,
    band_dims,
    key_valid_or_ones,
    select_blocks_reference,
    selection_kwargs,
)
from sparse_compile.params import PolicyError, params_from_mapping

POLICY = Path(prism.__file__).resolve().parent.parent / "policies" / "prism.toml"
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3)}
BOUNDARY = 1e-4


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _site(D: int, R: int | None = None, rope: str = "rotate_half") -> SiteFacts:
    return SiteFacts(rope=rope, rotary_dim=D if R is None else R, head_dim=D)


def _key_valid(B: int, Lk: int, pad: int, side: str) -> torch.Tensor | None:
    """(B, Lk) bool with `pad` padded keys in the last batch row (left or right), or None."""
    if pad == 0:
        return None
    kv = torch.ones(B, Lk, dtype=torch.bool)
    if side == "left":
        kv[-1, :pad] = False
    else:
        kv[-1, Lk - pad:] = False
    return kv


def _reference(q, k, mask, kw, **over) -> torch.Tensor:
    return select_blocks_reference(q, k, mask=mask, **{**kw, **over})


def _kernel(q, k, mask, kw, tuning=None) -> torch.Tensor:
    n, idx = prism_select_triton(q, k, mask=mask, tuning=tuning, **kw)
    assert n.dtype == torch.int32 and idx.dtype == torch.int32
    return BlockList(n, idx, kw["block_size"], q.shape[2], k.shape[2]).to_dense()


def _allowed(mask, B, Lq, Lk, b) -> torch.Tensor:
    kv_valid = key_valid_or_ones(mask, B, Lk, "cpu")
    return allowed_blocks(Lq, Lk, b, causal=mask.causal, q_offset=mask.q_offset, window=mask.window,
                          key_valid=kv_valid)[:, None]  # (B, 1, nq, nk)


def _forced_present(sel, mask, Lq, Lk, b) -> None:
    """The sink (first valid key's block) and each query block's own blocks are selected where allowed."""
    B = sel.shape[0]
    kv = key_valid_or_ones(mask, B, Lk, "cpu")
    allowed = _allowed(mask, B, Lq, Lk, b)
    sink = prism.sink_block(kv, b)
    for bi in range(B):
        if allowed[bi, 0, :, sink[bi]].any():
            assert sel[bi, :, allowed[bi, 0, :, sink[bi]], sink[bi]].all(), "sink block missing"
    recent = prism.recent_blocks(mask, allowed[:, 0], Lq, b)[:, None]
    assert (sel | ~recent).all(), "a recent (diagonal) block is missing"
    assert (~sel | allowed).all(), "a block with no visible valid key was selected"


def _rand_qk(B, H, Hkv, Lq, Lk, D, dtype, seed, strength=1.5, key_valid=None):
    """Post-RoPE-like q (B, H, Lq, D), k (B, Hkv, Lk, D) with block structure: keys carry a topic
    vector per segment of 4 tokens; each query segment takes the topic of a random earlier key
    segment, so pooled scores are peaked (strength sets how much). Padding tokens (key_valid
    False) are one large constant vector, which must not leak into the pooling."""
    g = torch.Generator().manual_seed(seed)
    G = H // Hkv
    n_seg = -(-Lk // 4)
    topics = torch.randn(B, Hkv, n_seg, D, generator=g)
    k = torch.randn(B, Hkv, Lk, D, generator=g) + strength * topics.repeat_interleave(4, dim=2)[:, :, :Lk]
    q_pos = torch.arange(Lq) + (Lk - Lq)
    src = (torch.rand(B, H, n_seg, generator=g) * (torch.arange(n_seg) + 1)).long()  # earlier segment
    q_topic = torch.gather(topics.repeat_interleave(G, dim=1), 2, src[..., None].expand(-1, -1, -1, D))
    q = torch.randn(B, H, Lq, D, generator=g) + strength * q_topic[:, :, q_pos // 4]
    if key_valid is not None:
        junk = 4.0 * torch.randn(D, generator=g)
        k = torch.where(key_valid[:, None, :, None], k, junk)
        q = torch.where(key_valid[:, None, q_pos, None], q, junk)
    return q.to(dtype), k.to(dtype)


# ---------------------------------------------------------------------------------------------
# bands
# ---------------------------------------------------------------------------------------------


def test_band_dims_rotate_half_matches_spec():
    # D = 128: high = [0, 32) + [64, 96); low = [16, 64) + [80, 128)   (spec step 2)
    high, low = band_dims(_site(128), PrismParams())
    assert high.tolist() == list(range(0, 32)) + list(range(64, 96))
    assert low.tolist() == list(range(16, 64)) + list(range(80, 128))
    # D = 64 scales to 32 / 48 (the authors' SmolLM2 setting)
    high, low = band_dims(_site(64), PrismParams())
    assert high.tolist() == list(range(0, 16)) + list(range(32, 48))
    assert low.tolist() == list(range(8, 32)) + list(range(40, 64))


def test_band_dims_interleaved_pairs_adjacent_dims():
    high, low = band_dims(_site(16, rope="interleaved"), PrismParams(high_dims=4, low_dims=6))
    assert high.tolist() == [0, 1, 2, 3]  # frequency pairs 0, 1 = dims (0,1), (2,3)
    assert low.tolist() == [10, 11, 12, 13, 14, 15]  # the three slowest pairs
    rh_high, rh_low = band_dims(_site(16), PrismParams(high_dims=4, low_dims=6))
    assert rh_high.tolist() == [0, 1, 8, 9] and rh_low.tolist() == [5, 6, 7, 13, 14, 15]
    assert high.tolist() != rh_high.tolist() and low.tolist() != rh_low.tolist()


def test_band_dims_partial_rotary_pass_through_is_low_band():
    # D = 16, R = 8: dims 8..15 do not rotate (zero frequency): the low band takes them first
    high, low = band_dims(_site(16, R=8), PrismParams(high_dims=4, low_dims=12))
    assert high.tolist() == [0, 1, 4, 5]
    assert low.tolist() == [2, 3, 6, 7] + list(range(8, 16))
    high, low = band_dims(_site(16, R=8, rope="interleaved"), PrismParams(high_dims=4, low_dims=6))
    assert high.tolist() == [0, 1, 2, 3]
    assert low.tolist() == [10, 11, 12, 13, 14, 15]  # only pass-through dims
    # defaults: high = R / 2, low = 3 D / 4
    high, low = band_dims(_site(256, R=64), PrismParams())
    assert high.numel() == 32 and low.tolist() == list(range(64, 256))


def test_selection_follows_the_layout():
    """Interleaved data scored with the interleaved site == the same data in rotate-half order scored
    with the rotate-half site (and != when the layout is ignored)."""
    D, b = 16, 4
    q, k = _rand_qk(1, 2, 2, 40, 40, D, torch.float32, seed=3)
    q[..., :2] *= 6  # make the highest-frequency pair dominate the high band
    k[..., :2] *= 6
    # rotate-half dim f <-> interleaved dim 2f, rotate-half dim f + D/2 <-> interleaved 2f + 1
    to_interleaved = torch.tensor([f for pair in zip(range(D // 2), range(D // 2, D), strict=True) for f in pair])
    qi, ki = q[..., to_interleaved], k[..., to_interleaved]
    params = PrismParams(threshold_high=0.6, threshold_low=0.6, force_sink=False, force_recent=False)
    mask = AttentionMask()
    kw_rh = selection_kwargs(_site(D), params, block_size=b)
    kw_il = selection_kwargs(_site(D, rope="interleaved"), params, block_size=b)
    want = _reference(q, k, mask, kw_rh)
    assert torch.equal(_reference(qi, ki, mask, kw_il), want)
    assert not torch.equal(_reference(qi, ki, mask, kw_rh), want)


def test_band_dims_errors():
    with pytest.raises(ValueError, match="high_dims = 24 must be even, >= 2 and <= rotary_dim = 16"):
        band_dims(_site(32, R=16), PrismParams(high_dims=24))
    with pytest.raises(ValueError, match="low_dims = 40"):
        band_dims(_site(32), PrismParams(low_dims=40))
    with pytest.raises(ValueError, match="rope layout"):
        band_dims(SiteFacts(rope="mrope", rotary_dim=16, head_dim=16), PrismParams())


# ---------------------------------------------------------------------------------------------
# parameters
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "table, message",
    [
        ({"blocksize": 128}, "unknown key 'blocksize'"),
        ({"block_size": 96}, "key 'block_size' = 96 is not allowed; allowed: one of 64, 128"),
        ({"high_dims": 33}, "key 'high_dims' = 33 must be even"),
        ({"high_dims": 0}, "key 'high_dims' = 0 is out of range"),
        ({"low_dims": "96"}, "key 'low_dims' = '96' has the wrong type"),
        ({"low_dims": 95}, "key 'low_dims' = 95 must be even"),
        ({"threshold_high": 1.5}, "key 'threshold_high' = 1.5 is out of range; allowed: int/float in \\[0.0, 1.0\\]"),
        ({"threshold_low": -0.1}, "key 'threshold_low' = -0.1 is out of range"),
        ({"calibrate": "yes"}, "key 'calibrate' = 'yes' has the wrong type"),
        ({"calibrate": False, "temperature_high": 0.0}, "key 'temperature_high' = 0.0 is out of range"),
        ({"calibrate": False, "temperature_low": True}, "key 'temperature_low' = True has the wrong type"),
        ({"force_sink": 1}, "key 'force_sink' = 1 has the wrong type"),
        ({"force_recent": "no"}, "key 'force_recent' = 'no' has the wrong type"),
        ({"gqa": "per_group"}, "key 'gqa' = 'per_group' is not allowed; allowed: one of 'per_head', 'per_kv_head'"),
        ({"min_seq_len": 4096}, "unknown key 'min_seq_len'"),  # the policy's phase-level key is the one gate
        ({"temperature_high": 2.0}, "only used when 'calibrate' = false"),
        (
            {"threshold_high": 0.0, "threshold_low": 0, "force_sink": False, "force_recent": False},
            "selects no block",
        ),
    ],
)
def test_params_validation_errors(table, message):
    with pytest.raises(PolicyError, match=f"my.toml: \\[prefill.params\\]: .*{message}"):
        params_from_mapping(PrismParams, table, "my.toml: [prefill.params]")


def test_params_defaults_direct_construction_and_policy_file():
    p = params_from_mapping(PrismParams, {"threshold_high": 1, "gqa": "per_kv_head"}, "t")
    assert p.threshold_high == 1.0 and isinstance(p.threshold_high, float) and p.block_size == 128
    with pytest.raises(PolicyError, match="block_size"):
        PrismParams(block_size=32)
    doc = tomllib.loads(POLICY.read_text())
    assert doc["prefill"]["method"] == "prism" and doc["decode"]["method"] == "dense"
    shipped = params_from_mapping(PrismParams, doc["prefill"].get("params", {}), str(POLICY))
    assert shipped.validate() is None
    from sparse_compile.methods import METHODS

    if "prism" in METHODS:  # registered by the lead's methods/__init__.py
        from sparse_compile.policy import load_policy

        assert load_policy("prism").prefill.method == "prism"


# ---------------------------------------------------------------------------------------------
# reference selection: structure
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("Lq, Lk, b, window, causal", [(13, 29, 4, 0, True), (29, 29, 8, 0, True),
                                                        (7, 30, 4, 9, True), (16, 33, 8, 0, False),
                                                        (1, 17, 4, 5, True)])
@pytest.mark.parametrize("pad_side", ["none", "left", "right"])
def test_allowed_blocks_equal_token_visibility(Lq, Lk, b, window, causal, pad_side):
    """allowed[m, n] <=> some query of block m sees some valid key of block n (token-level mask)."""
    B = 2
    mask = AttentionMask(causal=causal, q_offset=Lk - Lq, window=window,
                         key_valid=_key_valid(B, Lk, 6, pad_side) if pad_side != "none" else None)
    vis = visible_keys(mask, B, Lq, Lk)[:, 0]  # (B, Lq, Lk)
    nq, nk = -(-Lq // b), -(-Lk // b)
    padded = torch.zeros(B, nq * b, nk * b, dtype=torch.bool)
    padded[:, :Lq, :Lk] = vis
    want = padded.view(B, nq, b, nk, b).any(4).any(2)
    got = allowed_blocks(Lq, Lk, b, causal=causal, q_offset=Lk - Lq, window=window,
                         key_valid=key_valid_or_ones(mask, B, Lk, "cpu"))
    assert torch.equal(got, want)
    if causal and mask.key_valid is None:
        assert torch.equal(got[0], causal_block_mask(Lq, Lk, b, Lk - Lq, window))


@given(seed=st.integers(0, 2**16), Lk=st.integers(9, 60), chunk=st.sampled_from([1.0, 0.6]),
       pad=st.integers(0, 12), side=st.sampled_from(["left", "right"]), window=st.sampled_from([0, 11]),
       gqa=st.sampled_from(["per_head", "per_kv_head"]))
def test_reference_properties(seed, Lk, chunk, pad, side, window, gqa):
    """Density grows with the threshold (nested selections); forced blocks always present; padded
    keys never selected; threshold 1 selects every allowed block; per_kv_head = union of the group."""
    B, H, Hkv, D, b = 2, 4, 2, 16, 4
    Lq = max(2, int(Lk * chunk))
    key_valid = _key_valid(B, Lk, min(pad, Lk - 1), side)
    q, k = _rand_qk(B, H, Hkv, Lq, Lk, D, torch.float32, seed, key_valid=key_valid)
    mask = AttentionMask(q_offset=Lk - Lq, window=window, key_valid=key_valid)
    site = _site(D)
    prev = None
    for p in (0.0, 0.3, 0.8, 0.95, 1.0):
        params = PrismParams(threshold_high=p, threshold_low=p, gqa=gqa)
        kw = selection_kwargs(site, params, block_size=b)
        sel = _reference(q, k, mask, kw)
        _forced_present(sel, mask, Lq, Lk, b)
        if prev is not None:
            assert (sel | ~prev).all(), f"selection at p={p} does not contain the smaller threshold's"
        prev = sel
        blocks = BlockList.from_dense(sel, b, Lq, Lk)
        density = prism.selection_density(blocks, mask, H)
        assert density.shape == (B, H) and ((density > 0) & (density <= 1)).all()
    assert torch.equal(prev, _allowed(mask, B, Lq, Lk, b).expand_as(prev))
    # per_kv_head lists are the union over each group of the per_head lists
    kw = selection_kwargs(site, PrismParams(threshold_high=0.5, threshold_low=0.7), block_size=b)
    per_head = _reference(q, k, mask, kw)
    per_kv = _reference(q, k, mask, {**kw, "per_kv_head": True})
    assert torch.equal(per_kv, per_head.view(B, Hkv, H // Hkv, *per_head.shape[2:]).any(2))


def test_padding_only_blocks_and_sink_with_left_padding():
    """Left padding: the sink is the first valid key's block; padding-only query blocks keep only
    forced blocks; fully padded key blocks are never selected."""
    B, H, D, b, Lk = 2, 2, 16, 4, 32
    q, k = _rand_qk(B, H, H, Lk, Lk, D, torch.float32, seed=5)
    kv = torch.ones(B, Lk, dtype=torch.bool)
    kv[1, :10] = False  # batch 1: keys 0..9 padded; first valid key 10 is in block 2
    mask = AttentionMask(key_valid=kv)
    kw = selection_kwargs(_site(D), PrismParams(threshold_high=0.9, threshold_low=0.9), block_size=b)
    for sel in (_reference(q, k, mask, kw), _kernel(q, k, mask, kw)):
        assert not sel[1, :, :, :2].any()  # blocks 0, 1: padding only
        assert sel[1, :, 2:, 2].all()  # the sink of batch 1
        assert not sel[1, :, :2].any()  # query blocks 0, 1 see no valid key at all
        assert sel[0, :, :, 0].all()
    # a padded query block with some valid keys in view keeps only forced blocks
    kv2 = torch.ones(B, Lk, dtype=torch.bool)
    kv2[1, 20:] = False  # right padding: query blocks 5..7 are padding
    mask2 = AttentionMask(key_valid=kv2)
    for sel in (_reference(q, k, mask2, kw), _kernel(q, k, mask2, kw)):
        forced = prism.recent_blocks(mask2, _allowed(mask2, B, Lk, Lk, b)[:, 0], Lk, b)[1] | (
            torch.arange(8) == 0)
        assert (~sel[1, :, 5:] | forced[None, 5:]).all()


# ---------------------------------------------------------------------------------------------
# Triton selection == reference
# ---------------------------------------------------------------------------------------------


@given(
    seed=st.integers(0, 2**16),
    shape=st.sampled_from([(1, 2, 1), (2, 2, 2), (1, 4, 2), (2, 1, 1)]),  # (B, H, Hkv)
    D=st.sampled_from([16, 24, 32]),
    rope=st.sampled_from(["rotate_half", "interleaved", "partial"]),
    b=st.sampled_from([4, 8, 16]),
    Lk=st.integers(1, 90),
    chunk=st.sampled_from([1.0, 1.0, 0.5, 0.1]),
    p=st.tuples(st.sampled_from([0.3, 0.8, 0.95, 1.0]), st.sampled_from([0.5, 0.9, 1.0])),
    calibrate=st.booleans(),
    pad=st.tuples(st.integers(0, 20), st.sampled_from(["left", "right"])),
    window=st.sampled_from([0, 0, 13]),
    causal=st.sampled_from([True, True, False]),
    gqa=st.sampled_from(["per_head", "per_kv_head"]),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    strength=st.sampled_from([0.5, 1.5, 3.0]),
    min_pad=st.sampled_from([2, 64]),
)
@settings(max_examples=examples(40))
def test_kernel_matches_reference(seed, shape, D, rope, b, Lk, chunk, p, calibrate, pad, window, causal, gqa,
                                  dtype, strength, min_pad):
    B, H, Hkv = shape
    Lq = max(1, int(Lk * chunk))
    key_valid = _key_valid(B, Lk, min(pad[0], Lk - 1), pad[1])
    q, k = _rand_qk(B, H, Hkv, Lq, Lk, D, dtype, seed, strength=strength, key_valid=key_valid)
    site = _site(D, R=D // 2 if rope == "partial" else D, rope="rotate_half" if rope == "partial" else rope)
    params = PrismParams(threshold_high=p[0], threshold_low=p[1], calibrate=calibrate, gqa=gqa,
                         temperature_high=1.0 if calibrate else 0.5, temperature_low=1.0 if calibrate else 2.0)
    mask = AttentionMask(causal=causal, q_offset=Lk - Lq, window=window, key_valid=key_valid)
    kw = selection_kwargs(site, params, block_size=b)
    got = _kernel(q, k, mask, kw, tuning={"select_min_pad": min_pad})  # 2: one select launch per causal bucket
    low = _reference(q, k, mask, kw, threshold_high=p[0] - BOUNDARY, threshold_low=p[1] - BOUNDARY)
    high = _reference(q, k, mask, kw, threshold_high=p[0] + BOUNDARY, threshold_low=p[1] + BOUNDARY)
    assert got.shape == low.shape
    assert (got | ~low).all(), "the kernel dropped a block the reference keeps"
    assert (~got | high).all(), "the kernel kept a block the reference drops"
    _forced_present(got, mask, Lq, Lk, b)


def test_kernel_exact_on_structured_rows_and_full_threshold():
    """Exact equality where no boundary is close: identical key blocks (ties broken by index) and
    threshold 1 (every allowed block)."""
    B, H, D, b, L = 1, 2, 16, 4, 48
    q, k = _rand_qk(B, H, H, L, L, D, torch.float32, seed=11)
    k[:, :, 16:40] = k[:, :, 8:12].repeat(1, 1, 6, 1)  # key blocks 2..9 pool identically: ties
    mask = AttentionMask()
    kw = selection_kwargs(_site(D), PrismParams(threshold_high=0.5, threshold_low=0.5, force_sink=False,
                                                force_recent=False), block_size=b)
    assert torch.equal(_kernel(q, k, mask, kw), _reference(q, k, mask, kw))
    kw = selection_kwargs(_site(D), PrismParams(threshold_high=1.0, threshold_low=1.0), block_size=b)
    assert torch.equal(_kernel(q, k, mask, kw), _allowed(mask, B, L, L, b).expand(B, H, -1, -1))


def test_launcher_input_errors():
    q, k = _rand_qk(1, 2, 1, 8, 8, 16, torch.float32, seed=0)
    kw = selection_kwargs(_site(16), PrismParams(), block_size=4)
    mask = AttentionMask()
    with pytest.raises(ValueError, match="dtype must be one of float16/bfloat16/float32"):
        prism_select_triton(q.double(), k.double(), mask=mask, **kw)
    with pytest.raises(ValueError, match="dtype"):
        prism_select_triton(q, k.half(), mask=mask, **kw)
    with pytest.raises(ValueError, match="4-D"):
        prism_select_triton(q[0], k, mask=mask, **kw)
    with pytest.raises(ValueError, match="num_heads 2 is not a multiple of num_kv_heads 3"):
        prism_select_triton(q, k.expand(1, 3, 8, 16), mask=mask, **kw)
    with pytest.raises(ValueError, match="batch/head_dim"):
        prism_select_triton(q, k[..., :8], mask=mask, **kw)
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        prism_select_triton(q, k, mask=mask, **{**kw, "block_size": 6})
    with pytest.raises(ValueError, match="key_valid must be a \\(B, Lk\\)"):
        prism_select_triton(q, k, mask=AttentionMask(key_valid=torch.ones(1, 7, dtype=torch.bool)), **kw)
    with pytest.raises(ValueError, match="dense_mask"):
        prism_select_triton(q, k, mask=AttentionMask(dense_mask=torch.ones(1, 1, 8, 8, dtype=torch.bool)), **kw)
    with pytest.raises(ValueError, match="precision must be 'auto' or one of"):
        prism_select_triton(q, k, mask=mask, precision="fp8", **kw)
    with pytest.raises(ValueError, match="unknown tuning keys \\['rows'\\]"):
        prism_select_triton(q, k, mask=mask, tuning={"rows": 2}, **kw)
    with pytest.raises(ValueError, match="high_idx holds dims outside"):
        prism_select_triton(q, k, mask=mask, **{**kw, "high_idx": torch.tensor([0, 16])})


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------


def _token_mask(sel, H, Lq, Lk, b):
    tok = sel.repeat_interleave(H // sel.shape[1], 1).repeat_interleave(b, 2).repeat_interleave(b, 3)
    return tok[:, :, :Lq, :Lk]


@given(seed=st.integers(0, 2**16), Lk=st.integers(2, 70), chunk=st.sampled_from([1.0, 0.4]),
       pad=st.integers(0, 9), window=st.sampled_from([0, 21]), gqa=st.sampled_from(["per_head", "per_kv_head"]),
       dtype=st.sampled_from([torch.float32, torch.float16]))
def test_attention_full_threshold_equals_dense_and_sparse_equals_masked(seed, Lk, chunk, pad, window, gqa, dtype):
    B, H, Hkv, D, b = 2, 4, 2, 16, 16
    Lq = max(2, int(Lk * chunk)) if Lk > 1 else 1
    q, k = _rand_qk(B, H, Hkv, Lq, Lk, D, dtype, seed)
    v = torch.randn(B, Hkv, Lk, D, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    mask = AttentionMask(q_offset=Lk - Lq, window=window, key_valid=_key_valid(B, Lk, min(pad, Lk - 1), "left"))
    site = SiteFacts(rotary_dim=D, head_dim=D, num_heads=H, num_kv_heads=Hkv)
    atol, rtol = TOL[dtype]
    full = PrismParams(threshold_high=1.0, threshold_low=1.0, gqa=gqa)
    out, density = prism.attention(q, k, v, mask, site, full, block_size=b)
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), exact_attention_reference(q, k, v, mask).float(), atol=atol, rtol=rtol)
    assert density.shape == (B, H) and torch.allclose(density, torch.ones(B, H))
    # sparse: exact attention restricted to the selected blocks, with the method's density
    sparse = PrismParams(threshold_high=0.4, threshold_low=0.4, gqa=gqa)
    out, density = prism.attention(q, k, v, mask, site, sparse, scale=0.3, block_size=b)
    blocks = prism.prism_select(q, k, mask, site, sparse, block_size=b)
    dense_mask = _token_mask(blocks.to_dense(), H, Lq, Lk, b)
    want = exact_attention_reference(q, k, v, AttentionMask(mask.causal, mask.q_offset, window, mask.key_valid,
                                                             dense_mask), scale=0.3)
    torch.testing.assert_close(out.float(), want.float(), atol=atol, rtol=rtol)
    assert torch.equal(density, prism.selection_density(blocks, mask, H))
    if gqa == "per_kv_head":
        assert torch.equal(density[:, 0], density[:, 1])


def test_attention_dense_fallbacks():
    B, H, D = 1, 2, 16
    q, k = _rand_qk(B, H, H, 8, 40, D, torch.float32, seed=2)
    v = torch.randn_like(k)
    site = _site(D)
    params = PrismParams(threshold_high=0.1, threshold_low=0.1)
    cases = [(q[:, :, -1:], AttentionMask(q_offset=39)),  # decode
             (q, AttentionMask(q_offset=32, dense_mask=torch.ones(1, 1, 8, 40, dtype=torch.bool)))]
    for qq, mask in cases:
        out, density = prism.attention(qq, k, v, mask, site, params)
        torch.testing.assert_close(out, exact_attention_reference(qq, k, v, mask), atol=2e-5, rtol=2e-5)
        assert torch.equal(density, torch.ones(B, H))
    # no length gate inside the method (the policy's phase-level min_seq_len is the one gate): 40 keys run sparse
    _, density = prism.attention(q, k, v, AttentionMask(q_offset=32), site, params, block_size=16)
    assert (density < 1).all()


# ---------------------------------------------------------------------------------------------
# band tables: the host constants the CUDA path copies (capturable) hold the bands' dims and membership
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("D,R,rope", [(64, 64, "rotate_half"), (96, 64, "interleaved"), (128, 128, "rotate_half")])
def test_band_tables_from_host_dims(D, R, rope):
    from sparse_compile.kernels.prism import band_tables

    high, low = band_dims(_site(D, R, rope), PrismParams())
    tables = band_tables(high, low, D, torch.device("cpu"))
    expect_band = torch.zeros(D, dtype=torch.int32)
    expect_band[high] |= 1
    expect_band[low] |= 2
    assert all(t.dtype == torch.int32 for t in tables)
    assert torch.equal(tables[0], high.to(torch.int32)) and torch.equal(tables[1], low.to(torch.int32))
    assert torch.equal(tables[2], expect_band)
    assert bool((tables[2] & 1).sum() == high.numel()) and bool(((tables[2] & 2) != 0).sum() == low.numel())
    # memoised per dims: a captured graph's copy keeps reading the same (page-locked) memory
    again = band_tables(high.clone(), low.clone(), D, torch.device("cpu"))
    assert all(a is b for a, b in zip(tables, again, strict=True))
