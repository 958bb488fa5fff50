"""block_sparse_attention: the Triton kernel (under TRITON_INTERPRET=1) equals its PyTorch reference,
dense attention with the equivalent token mask, and SDPA / exact_attention_reference on full lists.

Outputs are poisoned with NaN (via `out=`) so unwritten rows fail; NaN never passes.
"""

import importlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import triton
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples
from triton.runtime.errors import OutOfResources

from sparse_compile.attention_mask import AttentionMask, exact_attention_reference
from sparse_compile.kernels import BlockList, block_sparse_attention, block_sparse_attention_reference
from sparse_compile.kernels.block_sparse_attention import (
    default_config,
    fit_shared_mem,
    max_shared_mem,
    shared_mem_estimate,
)

bsa_module = importlib.import_module("sparse_compile.kernels.block_sparse_attention")

TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3)}  # (atol, rtol); bf16 is tested on GPU


def _close(out, ref, dtype):
    assert not out.isnan().any(), "NaN in output (unwritten rows or a bad softmax)"
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)


def _run(q, k, v, *args, **kw):
    """The Triton kernel on CPU (interpreter) with a NaN-poisoned output buffer."""
    out = torch.full_like(q, float("nan"))
    res = block_sparse_attention(q, k, v, *args, out=out, impl="triton", **kw)
    assert res is out
    return out


def _run_raw(q, k, v, *args, **kw):
    """The Triton kernel (interpreter) into a NaN-poisoned buffer, without the no-NaN check of `_close`."""
    out = torch.full_like(q, float("nan"))
    assert block_sparse_attention(q, k, v, *args, out=out, impl="triton", **kw) is out
    return out


def _segment_permutation(B: int, Hkv: int, Lk: int, bs: int, g: torch.Generator) -> torch.Tensor:
    """PBS-Attn-like kv_order (B, Hkv, Lk): keys permuted inside segments of 2 blocks, original positions kept."""
    kv_order = torch.arange(Lk).repeat(B, Hkv, 1)
    for s0 in range(0, Lk - 2 * bs + 1, 2 * bs):
        kv_order[..., s0:s0 + 2 * bs] = s0 + torch.argsort(torch.rand(B, Hkv, 2 * bs, generator=g), dim=-1)
    return kv_order


def _shuffle_rows(bl: BlockList, g: torch.Generator) -> torch.Tensor:
    """The same lists with each row's defined entries in random order (and junk past the count)."""
    slot = torch.arange(bl.kv_indices.shape[-1])
    defined = slot < bl.kv_num_blocks[..., None]
    key = torch.rand(bl.kv_indices.shape, generator=g) + (~defined).float()  # undefined entries last
    shuffled = torch.gather(bl.kv_indices, -1, torch.argsort(key, dim=-1))
    return torch.where(defined, shuffled, torch.full_like(shuffled, -7)).contiguous()


def _token_mask(bl_dense, H, Lq, Lk, bs, causal, q_offset, window, key_valid, kv_order):
    """(B, H, Lq, Lk) bool: the token mask that block lists + structure stand for."""
    B, Hm = bl_dense.shape[:2]
    blocks = bl_dense.repeat_interleave(H // Hm, dim=1)
    tok = blocks.repeat_interleave(bs, dim=2).repeat_interleave(bs, dim=3)[:, :, :Lq, :Lk]
    pos = torch.arange(Lk)[None, None] if kv_order is None else kv_order.repeat_interleave(
        H // kv_order.shape[1], dim=1)
    qpos = q_offset + torch.arange(Lq)
    if causal:
        tok = tok & (pos[:, :, None, :] <= qpos[:, None])
    if window:
        tok = tok & (pos[:, :, None, :] > qpos[:, None] - window)
    if key_valid is not None:
        tok = tok & key_valid[:, None, None, :]
    return tok


@given(
    B=st.integers(1, 2), Hkv=st.integers(1, 2), group=st.sampled_from([1, 2, 3]),
    Lq=st.integers(1, 120), dk=st.integers(-40, 80), D=st.sampled_from([16, 32, 48]),
    bs=st.sampled_from([16, 32]), split_m=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float16]),
    causal=st.booleans(), per_kv=st.booleans(), p=st.sampled_from([0.0, 0.3, 0.7, 1.0]),
    permuted=st.booleans(), window=st.sampled_from([0, 0, 24]), padded=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_kernel_equals_reference_and_token_masked_attention(
    B, Hkv, group, Lq, dk, D, bs, split_m, dtype, causal, per_kv, p, permuted, window, padded, seed
):
    g = torch.Generator().manual_seed(seed)
    H, Lk = Hkv * group, max(1, Lq + dk)
    q = torch.randn(B, H, Lq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype)
    nq, nk = math.ceil(Lq / bs), math.ceil(Lk / bs)
    dense_blocks = torch.rand(B, Hkv if per_kv else H, nq, nk, generator=g) < p  # p = 0: every row empty
    bl = BlockList.from_dense(dense_blocks, bs, Lq, Lk)
    kv_order = _segment_permutation(B, Hkv, Lk, bs, g) if permuted else None
    key_valid = torch.rand(B, Lk, generator=g) < 0.8 if padded else None
    kw = dict(block_size=bs, causal=causal, window=window, key_valid=key_valid, kv_order=kv_order)
    config = {"BLOCK_M": bs // 2, "BLOCK_N": bs // 2} if split_m else None
    out = _run(q, k, v, bl.kv_num_blocks, _shuffle_rows(bl, g), config=config, **kw)
    ref = block_sparse_attention_reference(q, k, v, bl.kv_num_blocks, bl.kv_indices, **kw)
    _close(out, ref, dtype)
    # the same function as dense attention under the equivalent token mask
    tok = _token_mask(dense_blocks, H, Lq, Lk, bs, causal, Lk - Lq, window, key_valid, kv_order)
    dense = exact_attention_reference(q, k, v, AttentionMask(causal=False, dense_mask=tok))
    _close(out, dense, dtype)


@given(
    Lq=st.integers(1, 150), extra=st.integers(0, 60), Hkv=st.integers(1, 2), group=st.sampled_from([1, 4]),
    bs=st.sampled_from([16, 32, 64]), dtype=st.sampled_from([torch.float32, torch.float16]),
    window=st.sampled_from([0, 40]), padded=st.booleans(), lists=st.booleans(), seed=st.integers(0, 2**16),
)
def test_full_lists_and_dense_engine_equal_exact_attention(Lq, extra, Hkv, group, bs, dtype, window, padded,
                                                           lists, seed):
    g = torch.Generator().manual_seed(seed)
    B, H, D, Lk = 2, Hkv * group, 32, Lq + extra
    q = torch.randn(B, H, Lq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype)
    key_valid = torch.rand(B, Lk, generator=g) < 0.7 if padded else None
    mask = AttentionMask(causal=True, q_offset=Lk - Lq, window=window, key_valid=key_valid)
    args = ()
    if lists:
        bl = BlockList.causal_full(B, Hkv, Lq, Lk, bs, device=q.device)
        args = (bl.kv_num_blocks, bl.kv_indices)
    out = _run(q, k, v, *args, block_size=bs, window=window, key_valid=key_valid)
    _close(out, exact_attention_reference(q, k, v, mask), dtype)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_full_lists_equal_sdpa(causal, dtype):
    g = torch.Generator().manual_seed(1)
    B, H, Hkv, L, D, bs = 1, 4, 2, 100, 64, 32
    q = torch.randn(B, H, L, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
    nq = math.ceil(L / bs)
    blocks = torch.ones(B, H, nq, nq, dtype=torch.bool)
    if causal:
        blocks = blocks.tril()
    bl = BlockList.from_dense(blocks, bs, L, L)
    out = _run(q, k, v, bl.kv_num_blocks, bl.kv_indices, block_size=bs, causal=causal, scale=0.1)
    ref = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(2, 1),
                                         v.float().repeat_interleave(2, 1), is_causal=causal, scale=0.1)
    _close(out, ref, dtype)


def test_empty_rows_are_zeros_and_q_offset():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g) for _ in range(3))
    num = torch.tensor([[[0, 1, 0]]], dtype=torch.int32).expand(1, 2, 3).contiguous()
    idx = torch.tensor([[[[0], [0], [2]]]], dtype=torch.int32).expand(1, 2, 3, 1).contiguous()
    out = _run(q, k, v, num, idx, block_size=16)
    assert torch.equal(out[:, :, :16], torch.zeros_like(out[:, :, :16]))
    assert torch.equal(out[:, :, 32:], torch.zeros_like(out[:, :, 32:]))
    # q_offset < 0: queries before every key see nothing (zeros), the rest see a causal prefix
    out = _run(q, k, v, block_size=16, q_offset=-5)
    ref = exact_attention_reference(q, k, v, AttentionMask(causal=True, q_offset=-5))
    assert torch.equal(out[:, :, :5], torch.zeros_like(out[:, :, :5]))
    _close(out, ref, torch.float32)


def test_cpu_auto_uses_reference():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 50, 16, generator=g, dtype=torch.float64) for _ in range(3))
    bl = BlockList.causal_full(1, 2, 50, 50, 16)
    out = block_sparse_attention(q, k, v, bl.kv_num_blocks, bl.kv_indices, block_size=16)
    assert out.dtype == torch.float64
    ref = exact_attention_reference(q, k, v, AttentionMask(causal=True))
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)


def _inputs():
    q, k, v = torch.randn(1, 4, 64, 16), torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16)
    bl = BlockList.causal_full(1, 4, 64, 64, 16)
    return q, k, v, bl.kv_num_blocks, bl.kv_indices


@pytest.mark.parametrize("mutate, match", [
    (lambda a: {**a, "q": a["q"].half()}, "share a dtype"),
    (lambda a: {**a, "k": torch.randn(1, 3, 64, 16), "v": torch.randn(1, 3, 64, 16)}, "multiple of"),
    (lambda a: {**a, "q": torch.randn(4, 64, 16)}, "4-D"),
    (lambda a: {**a, "v": torch.randn(1, 2, 63, 16)}, "v shape"),
    (lambda a: {**a, "kv_num_blocks": a["kv_num_blocks"].long()}, "int32"),
    (lambda a: {**a, "kv_indices": None}, "both"),
    (lambda a: {**a, "kv_num_blocks": a["kv_num_blocks"][:, :3]}, "kv_num_blocks shape"),
    (lambda a: {**a, "kv_indices": a["kv_indices"][:, :2]}, "kv_indices shape"),
    (lambda a: {**a, "kv_num_blocks": a["kv_num_blocks"] + 1}, "kv_num_blocks out of range"),
    (lambda a: {**a, "kv_indices": a["kv_indices"] + 1}, "kv_indices out of range"),
    (lambda a: {**a, "kv_indices": torch.zeros_like(a["kv_indices"])}, "duplicate"),
    (lambda a: {**a, "block_size": 48}, "block_size"),
    (lambda a: {**a, "window": -1}, "window"),
    (lambda a: {**a, "key_valid": torch.ones(1, 64)}, "key_valid"),
    (lambda a: {**a, "kv_order": torch.zeros(1, 4, 64, dtype=torch.long)}, "kv_order shape"),
    (lambda a: {**a, "kv_order": torch.zeros(1, 2, 64)}, "kv_order must be"),
    (lambda a: {**a, "impl": "cuda"}, "impl"),
])
def test_bad_inputs_raise_value_error(mutate, match):
    q, k, v, num, idx = _inputs()
    args = mutate({"q": q, "k": k, "v": v, "kv_num_blocks": num, "kv_indices": idx, "block_size": 16})
    with pytest.raises(ValueError, match=match):
        block_sparse_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("kv_num_blocks"),
                               args.pop("kv_indices"), **args)


def test_validate_false_skips_content_checks():
    """The duplicate check reads the lists' contents (a sort and a sync): validate=True raises on a
    duplicate, validate=False does not look. Lists with entries past kv_num_blocks that repeat are legal
    either way, and the kernel then computes exactly the listed blocks."""
    q, k, v, num, idx = _inputs()
    dup = torch.zeros_like(idx)  # every row lists block 0 over and over
    with pytest.raises(ValueError, match="duplicate"):
        block_sparse_attention(q, k, v, num, dup, block_size=16, validate=True)
    one = num.clamp(max=1)  # only the first entry defined: block 0 once, the repeats past it undefined
    out = block_sparse_attention(q, k, v, one, dup, block_size=16, validate=False)
    ref = block_sparse_attention_reference(q, k, v, one, dup, block_size=16)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# ---- every head_dim that occurs in real models (32 .. 256), GQA, each mask kind; CPU interpreter

_HEAD_DIM_CASES = {
    # case: (dtype, block_size, B, H, Hkv, Lq, Lk, window, left_pad, lists)
    "causal": (torch.float16, 32, 1, 4, 1, 75, 75, 0, None, False),
    "window": (torch.float32, 16, 1, 2, 1, 72, 72, 29, None, False),
    "padding": (torch.float16, 32, 2, 2, 1, 64, 64, 0, (0, 23), True),
    "chunk": (torch.float32, 32, 1, 2, 1, 40, 130, 0, None, True),
}


@pytest.mark.parametrize("case", list(_HEAD_DIM_CASES))
@pytest.mark.parametrize("D", [64, 80, 96, 128, 192, 256])
def test_head_dims_up_to_256(D, case):
    dtype, bs, B, H, Hkv, Lq, Lk, window, left_pad, lists = _HEAD_DIM_CASES[case]
    g = torch.Generator().manual_seed(D * 7 + len(case))
    q = torch.randn(B, H, Lq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype)
    key_valid = None
    if left_pad is not None:  # left padding: batch row b starts at key left_pad[b]
        key_valid = torch.arange(Lk)[None, :] >= torch.tensor(left_pad)[:, None]
    kw = dict(block_size=bs, window=window, key_valid=key_valid)
    if lists:  # random per-KV-head lists (the first block always listed), compared with the reference
        nq, nk = math.ceil(Lq / bs), math.ceil(Lk / bs)
        dense_blocks = torch.rand(B, Hkv, nq, nk, generator=g) < 0.6
        dense_blocks[..., 0] = True
        bl = BlockList.from_dense(dense_blocks, bs, Lq, Lk)
        out = _run(q, k, v, bl.kv_num_blocks, _shuffle_rows(bl, g), **kw)
        ref = block_sparse_attention_reference(q, k, v, bl.kv_num_blocks, bl.kv_indices, **kw)
        tok = _token_mask(dense_blocks, H, Lq, Lk, bs, True, Lk - Lq, window, key_valid, None)
        dense = exact_attention_reference(q, k, v, AttentionMask(causal=False, dense_mask=tok))
        _close(ref, dense, dtype)
    else:
        out = _run(q, k, v, **kw)
        ref = exact_attention_reference(q, k, v, AttentionMask(causal=True, q_offset=Lk - Lq, window=window,
                                                               key_valid=key_valid))
    _close(out, ref, dtype)
    assert out.abs().amax() > 0.05, "a nonzero output was expected"
    if left_pad is not None:  # queries before the first valid key see nothing: zeros
        assert torch.equal(out[1, :, :23], torch.zeros_like(out[1, :, :23]))


# ---- launch configs: the device's shared memory decides (H100, A100, consumer Ampere/Ada, tiny)

_H100_SMEM = 232448


def test_shared_mem_estimate_reproduces_the_h100_failure():
    # Triton 3.6 on H100: D=256, 128x64 tiles, 3 stages, bf16 -> "Required: 262144, Hardware limit: 232448"
    assert shared_mem_estimate(128, 64, 256, 3, 2) == 262144
    cfg = default_config(256, 128, "cuda", 9, dtype=torch.bfloat16, max_shared=_H100_SMEM)
    assert shared_mem_estimate(cfg["BLOCK_M"], cfg["BLOCK_N"], 256, cfg["num_stages"], 2) <= _H100_SMEM


@pytest.mark.parametrize("D", [32, 64, 80, 96, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_h100_configs_up_to_d128_unchanged(D, dtype):
    cfg = default_config(D, 128, "cuda", 9, dtype=dtype, max_shared=_H100_SMEM)
    tiles = (128, 128) if D <= 64 else (128, 64)
    assert (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_warps"], cfg["num_stages"]) == (*tiles, 8, 3)
    assert cfg["USE_TMA"] is False and cfg["NONFINITE"] is True


@pytest.mark.parametrize("limit", [_H100_SMEM, 166912, 101376, 49152])
def test_default_configs_fit_the_device(limit):
    for D in (1, 32, 48, 64, 80, 96, 128, 160, 192, 256):
        block_d = max(16, triton.next_power_of_2(D))
        for bs in (16, 32, 64, 128, 256):
            for dtype in (torch.float16, torch.bfloat16, torch.float32):
                cfg = default_config(D, bs, "cuda", 9, dtype=dtype, max_shared=limit)
                elem = torch.empty((), dtype=dtype).element_size()
                need = shared_mem_estimate(cfg["BLOCK_M"], cfg["BLOCK_N"], block_d, cfg["num_stages"], elem)
                assert need <= limit, (D, bs, dtype, cfg, need)
                assert bs % cfg["BLOCK_M"] == 0 and bs % cfg["BLOCK_N"] == 0, (D, bs, cfg)
                assert cfg["BLOCK_M"] >= 16 and cfg["BLOCK_N"] >= 16 and cfg["num_stages"] >= 1


def test_fit_shared_mem_order_n_then_stages_then_m():
    cfg = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
    est = lambda c: shared_mem_estimate(c["BLOCK_M"], c["BLOCK_N"], 256, c["num_stages"], 2)
    steps = []
    while True:
        nxt = fit_shared_mem(cfg, 256, 2, est(cfg) - 1)
        if nxt == cfg:
            break
        steps.append((nxt["BLOCK_M"], nxt["BLOCK_N"], nxt["num_stages"]))
        cfg = nxt
    assert steps == [(128, 32, 3), (128, 16, 3), (128, 16, 2), (128, 16, 1), (64, 16, 1), (32, 16, 1), (16, 16, 1)]
    assert cfg["num_warps"] == 4


def test_max_shared_mem_asks_each_device_once(monkeypatch):
    asked = []

    class Utils:
        @staticmethod
        def get_device_properties(index):
            asked.append(index)
            return {"max_shared_mem": 1000 + index}

    class Driver:
        active = type("Active", (), {"utils": Utils})

    monkeypatch.setattr(triton.runtime, "driver", Driver)
    monkeypatch.setattr(bsa_module, "_MAX_SHARED_MEM", {})
    assert [max_shared_mem(0), max_shared_mem(1), max_shared_mem(0), max_shared_mem(1)] == [1000, 1001, 1000, 1001]
    assert asked == [0, 1]


class _SmallSharedMemory:
    """Stands in for the jit kernel: launches needing BLOCK_N > 16 fail as on a device with too little
    shared memory (Triton raises OutOfResources at launch)."""

    def __init__(self, kernel):
        self.kernel, self.tried = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.tried.append(kw["BLOCK_N"])
            if kw["BLOCK_N"] > 16:
                raise OutOfResources(kw["BLOCK_N"] * 1000, 16000, "shared memory")
            return self.kernel[grid](*args, **kw)
        return launch


def test_out_of_resources_shrinks_the_default_config(monkeypatch):
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 70, 32, generator=g) for _ in range(3))
    fake = _SmallSharedMemory(bsa_module._block_sparse_attn_fwd)
    monkeypatch.setattr(bsa_module, "_block_sparse_attn_fwd", fake)
    out = _run(q, k, v, block_size=64)
    assert fake.tried == [64, 32, 16, 16]  # pass 1 fails at 64 and 32; both passes run at 16
    _close(out, exact_attention_reference(q, k, v, AttentionMask(causal=True)), torch.float32)
    with pytest.raises(OutOfResources):  # a config the caller chose is not changed behind their back
        _run(q, k, v, block_size=64, config={"BLOCK_N": 32})


# ---- scalar arguments: the type is part of the contract (bool is not an int, 16.0 is not a block size)

@pytest.mark.parametrize("name, value, allowed", [
    ("scale", "0.25", r"scale must be None \(1/sqrt\(head_dim\)\) or a finite float > 0"),
    ("scale", True, r"scale must be None .* or a finite float > 0"),
    ("scale", float("nan"), r"scale must be .* finite float > 0"),
    ("scale", -0.5, r"scale must be .* finite float > 0"),
    ("scale", torch.tensor(0.25), r"scale must be .* finite float > 0"),
    ("window", True, r"window must be an int >= 0 \(0: no window\), got True \(bool\)"),
    ("window", 8.0, r"window must be an int >= 0"),
    ("block_size", 16.0, r"block_size must be an int in \(16, 32, 64, 128, 256\), got 16.0 \(float\)"),
    ("block_size", True, r"block_size must be an int in"),
    ("block_size", "16", r"block_size must be an int in"),
    ("q_offset", 1.5, r"q_offset must be an int \(any sign\) or None, got 1.5 \(float\)"),
    ("q_offset", False, r"q_offset must be an int"),
    ("causal", 1, r"causal must be a bool, got 1 \(int\)"),
    ("causal", "yes", r"causal must be a bool"),
    ("validate", None, r"validate must be a bool"),
])
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_scalar_arguments_are_type_checked(name, value, allowed, impl):
    q, k, v, num, idx = _inputs()
    kw = {"block_size": 16, name: value}
    with pytest.raises(ValueError, match=allowed):
        block_sparse_attention(q, k, v, num, idx, impl=impl, **kw)


def test_numpy_integers_and_floats_are_accepted():
    q, k, v, num, idx = _inputs()
    out = block_sparse_attention(q, k, v, num, idx, block_size=np.int64(16), window=np.int32(20),
                                 q_offset=np.int16(0), scale=np.float32(0.3), impl="triton")
    ref = block_sparse_attention(q, k, v, num, idx, block_size=16, window=20, q_offset=0, scale=0.3,
                                 impl="reference")
    _close(out, ref, torch.float32)


def test_unknown_config_key_raises():
    q, k, v, num, idx = _inputs()
    with pytest.raises(ValueError, match=r"config keys \['BLOCK_K'\] unknown"):
        block_sparse_attention(q, k, v, num, idx, block_size=16, impl="triton", config={"BLOCK_K": 32})


def test_valid_span_first_last_and_holes():
    from sparse_compile.kernels.block_sparse_attention import valid_span

    valid = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0], [0, 1, 0, 1, 1, 0]],
                         dtype=torch.int8)
    assert valid_span(valid).tolist() == [[2, 4, 1], [0, 5, 1], [6, -1, 0], [1, 4, 0]]


@settings(max_examples=examples(5))
@given(starts=st.lists(st.integers(0, 100), min_size=2, max_size=2), right=st.integers(0, 40),
       lists=st.booleans(), window=st.sampled_from([0, 50]), dtype=st.sampled_from([torch.float32, torch.float16]),
       hole=st.booleans(), seed=st.integers(0, 2**16))
def test_padding_span_is_skipped_and_exact(starts, right, lists, window, dtype, hole, seed):
    """Left padding (per row, up to the whole row), right padding and optionally one hole: the engine skips
    key chunks outside each row's valid span and unmasks the chunks inside it; the output equals the exact
    reference, and NaN in every padded key's K and V changes nothing."""
    g = torch.Generator().manual_seed(seed)
    B, H, Hkv, D, L, bs = len(starts), 4, 2, 32, 100, 32
    pos = torch.arange(L)[None]
    key_valid = (pos >= torch.tensor(starts)[:, None]) & (pos < L - right)
    if hole:
        key_valid[0, 50:60] = False
    q = torch.randn(B, H, L, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
    args = ()
    if lists:
        bl = BlockList.causal_full(B, Hkv, L, L, bs, device=q.device)
        args = (bl.kv_num_blocks, bl.kv_indices)
    ref = exact_attention_reference(q, k, v, AttentionMask(causal=True, q_offset=0, window=window,
                                                           key_valid=key_valid))
    out = _run(q, k, v, *args, block_size=bs, window=window, key_valid=key_valid)
    _close(out, ref, dtype)
    pad = ~key_valid[:, None, :, None].expand(B, Hkv, L, D)
    k2, v2 = k.masked_fill(pad, float("nan")), v.masked_fill(pad, float("inf"))
    torch.testing.assert_close(_run(q, k2, v2, *args, block_size=bs, window=window, key_valid=key_valid), out,
                               atol=0, rtol=0)


def test_drop_padding_blocks_keeps_order_and_counts():
    from sparse_compile.kernels.block_sparse_attention import drop_padding_blocks

    span = torch.tensor([[70, 199, 1], [0, 63, 1]], dtype=torch.int32)  # row 0: blocks 1-3 of 64; row 1: block 0
    num = torch.tensor([[[4]], [[3]]], dtype=torch.int32)
    idx = torch.tensor([[[[3, 0, 1, 2, 9]]], [[[2, 0, 1, -5, -5]]]], dtype=torch.int32)
    new_num, new_idx = drop_padding_blocks(num, idx, span, 64)
    assert new_num.tolist() == [[[3]], [[1]]]
    assert new_idx[0, 0, 0, :3].tolist() == [3, 1, 2] and new_idx[1, 0, 0, :1].tolist() == [0]


@settings(max_examples=examples(6))
@given(group=st.sampled_from([2, 4]), Lq=st.integers(1, 100), dk=st.integers(0, 60), lists=st.booleans(),
       p=st.sampled_from([0.4, 1.0]), window=st.sampled_from([0, 24]), padded=st.booleans(),
       permuted=st.booleans(), poison=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float16]),
       seed=st.integers(0, 2**16))
def test_gqa_packing_equals_per_head_programs(group, Lq, dk, lists, p, window, padded, permuted, poison, dtype,
                                              seed):
    """GQA_PACK (one program for the query heads of a KV head): the same output as one program per head and
    as the reference, for per-KV-head lists or the dense engine, chunked prefill (Lq < Lk), window, padding,
    permuted keys and a NaN planted in one key (rows that see it NaN, the others unchanged)."""
    g = torch.Generator().manual_seed(seed)
    B, Hkv, D, bs = 2, 2, 32, 32
    H, Lk = Hkv * group, Lq + dk
    q = torch.randn(B, H, Lq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype)
    if poison:
        k[1, 0, int(torch.randint(0, Lk, (1,), generator=g)), 3] = float("nan")
    args = ()
    if lists:
        dense_blocks = torch.rand(B, Hkv, math.ceil(Lq / bs), math.ceil(Lk / bs), generator=g) < p
        bl = BlockList.from_dense(dense_blocks, bs, Lq, Lk)
        args = (bl.kv_num_blocks, bl.kv_indices)
    kv_order = _segment_permutation(B, Hkv, Lk, bs, g) if permuted else None
    key_valid = torch.rand(B, Lk, generator=g) < 0.8 if padded else None
    kw = dict(block_size=bs, window=window, key_valid=key_valid, kv_order=kv_order)
    per_head = _run_raw(q, k, v, *args, config={"GQA_PACK": False}, **kw)
    packed = _run_raw(q, k, v, *args, config={"GQA_PACK": True}, **kw)
    ref = block_sparse_attention_reference(q, k, v, *args, **kw)
    assert torch.equal(torch.isnan(packed), torch.isnan(ref)) and torch.equal(torch.isnan(per_head), torch.isnan(ref))
    finite = ~torch.isnan(ref)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(packed[finite].float(), ref[finite].float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(packed[finite].float(), per_head[finite].float(), atol=atol, rtol=rtol)


def test_gqa_pack_applies_only_where_it_can():
    from sparse_compile.kernels.block_sparse_attention import gqa_pack

    on = {"GQA_PACK": True, "BLOCK_M": 64}
    assert gqa_pack(on, 32, 8, 8, True) == 4 and gqa_pack(on, 32, 8, 0, False) == 4
    assert gqa_pack(on, 32, 8, 32, True) == 1  # per-head lists
    assert gqa_pack(on, 9, 3, 3, True) == 1  # group 3: not a power of two
    assert gqa_pack(on, 8, 8, 8, True) == 1  # no group
    assert gqa_pack({"GQA_PACK": False, "BLOCK_M": 64}, 32, 8, 8, True) == 1
