"""kernels/sampled_mass.py under the Triton interpreter: the block mass of Prism's sampled coverage equals its
PyTorch reference (and the reference a float64 definition over `visible_keys`) for Lq == Lk and Lq < Lk, partial
blocks, GQA groups 1/2/3/4/8, head_dim 64/96/128, block_size 64/128, 1/4/8/32 samples, float32/float16, causal with
and without a window, non-causal, left-padded keys at B = 2, strided q/k and heads split over several programs;
every entry of a NaN-poisoned output is written; `sampled_blocks` gives the same masks with the kernel's mass; bad
inputs name the problem."""

import pytest
import torch

from sparse_compile.attention_mask import AttentionMask, visible_keys
from sparse_compile.kernels import prism as prism_kernels
from sparse_compile.kernels.prism import query_valid, sample_positions, sampled_blocks
from sparse_compile.kernels.sampled_mass import (
    sampled_block_mass,
    sampled_block_mass_reference,
    sampled_mass_unsupported,
)


def _inputs(B, Hkv, G, Lq, Lk, D, b, s, dtype, window, pad, causal=True, strided=False, seed=0):
    """q, k (peaked: each query near a random key), positions, weights (`sampled_blocks`'s take) and the kwargs."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, Hkv, Lk, D, generator=g)
    pick = torch.randint(0, Lk, (B, Hkv * G, Lq), generator=g)
    kk = k.repeat_interleave(G, dim=1).gather(2, pick[..., None].expand(-1, -1, -1, D))
    q = 0.5 * torch.randn(B, Hkv * G, Lq, D, generator=g) + kk
    if strided:  # (B, L, H, D) storage, as after a transpose
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
        k = k.transpose(1, 2).contiguous().transpose(1, 2)
    q, k = q.to(dtype), k.to(dtype)
    key_valid = None
    if pad:
        key_valid = torch.ones(B, Lk, dtype=torch.bool)
        key_valid[-1, :pad] = False  # left padding in the last batch row
    mask = AttentionMask(causal=causal, q_offset=Lk - Lq, window=window, key_valid=key_valid)
    kv = key_valid if key_valid is not None else torch.ones(B, Lk, dtype=torch.bool)
    pos, used = sample_positions(Lq, b, s)
    weights = (used[None] & query_valid(mask, kv, Lq)[:, pos]).to(torch.float32)
    kw = dict(block_size=b, scale=D ** -0.5, q_offset=Lk - Lq, causal=causal, window=window, key_valid=key_valid)
    return q, k, pos, weights, mask, kw


def mass_definition(q, k, mask, pos, weights, b, scale):
    """(B, H, nq, nk) float64: per sample, the softmax over its visible keys (zeros when none), summed per key block,
    weighted and summed over the block's samples."""
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    nk = -(-Lk // b)
    vis = visible_keys(mask, B, Lq, Lk)[:, 0]  # (B, Lq, Lk)
    kh = k.double().repeat_interleave(H // Hkv, dim=1)
    logits = (q.double() @ kh.transpose(-1, -2) * scale).masked_fill(~vis[:, None], -torch.inf)
    probs = torch.nan_to_num(torch.softmax(logits, -1), nan=0.0)  # (B, H, Lq, Lk)
    per_key_block = torch.nn.functional.pad(probs, (0, nk * b - Lk)).view(B, H, Lq, nk, b).sum(-1)
    rows = per_key_block[:, :, pos]  # (B, H, nq, s, nk)
    return (rows * weights.double()[:, None, :, :, None]).sum(3)


CASES = [  # B, Hkv, G, Lq, Lk, D, b, s, dtype, window, pad, causal
    (1, 1, 1, 256, 256, 64, 64, 4, torch.float32, 0, 0, True),
    (2, 2, 4, 300, 600, 128, 128, 32, torch.float16, 0, 100, True),
    (2, 2, 3, 256, 256, 96, 64, 4, torch.float16, 100, 50, True),
    (2, 1, 8, 200, 500, 64, 64, 1, torch.float32, 0, 70, True),
    (1, 2, 2, 300, 300, 128, 128, 1, torch.float16, 0, 0, True),
    (2, 1, 2, 450, 450, 64, 128, 32, torch.float32, 200, 30, True),
    (1, 1, 1, 256, 520, 128, 64, 32, torch.float32, 130, 0, True),
    (2, 2, 1, 330, 330, 64, 64, 32, torch.float16, 0, 40, True),
    (2, 1, 4, 260, 260, 64, 64, 4, torch.float32, 0, 90, True),
    (1, 2, 2, 256, 300, 64, 64, 4, torch.float32, 0, 0, False),
    (2, 1, 2, 200, 200, 128, 64, 4, torch.float16, 50, 20, False),
]


@pytest.mark.parametrize("B,Hkv,G,Lq,Lk,D,b,s,dtype,window,pad,causal", CASES)
def test_kernel_equals_the_reference(B, Hkv, G, Lq, Lk, D, b, s, dtype, window, pad, causal):
    q, k, pos, weights, mask, kw = _inputs(B, Hkv, G, Lq, Lk, D, b, s, dtype, window, pad, causal,
                                           strided=(Lq + G) % 2 == 1)
    nq, nk = -(-Lq // b), -(-Lk // b)
    out = torch.full((B, Hkv * G, nq, nk), float("nan"))  # unwritten entries stay NaN and fail
    got = sampled_block_mass(q, k, pos, weights, out=out, **kw)
    assert got is out and got.dtype == torch.float32
    want = sampled_block_mass_reference(q, k, pos, weights, **kw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(want.double(), mass_definition(q, k, mask, pos, weights, b, kw["scale"]),
                               rtol=1e-5, atol=1e-5)
    # each live sample's probabilities sum to 1 over the key blocks: a block's total is its weight (a live sample
    # always sees its own key here, unless it is padding, whose weight is 0)
    torch.testing.assert_close(got.sum(-1), weights.sum(-1)[:, None].expand(B, Hkv * G, nq), rtol=1e-5, atol=1e-4)
    # the reference a query block at a time is the same
    one = sampled_block_mass_reference(q, k, pos, weights, chunk_bytes=1, **kw)
    torch.testing.assert_close(one, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("G,s,max_rows", [(3, 8, 16), (8, 32, 16), (4, 4, 32)])
def test_heads_split_over_programs(G, s, max_rows):
    """Fewer rows per program than the group's heads x samples: the heads go to several programs (the last one
    partly empty for G = 3; one head of 32 samples per program for max_rows = 16)."""
    q, k, pos, weights, _, kw = _inputs(2, 1, G, 200, 200, 64, 64, s, torch.float32, 0, 30)
    out = torch.full((2, G, 4, 4), float("nan"))
    got = sampled_block_mass(q, k, pos, weights, max_rows=max_rows, out=out, **kw)
    torch.testing.assert_close(got, sampled_block_mass_reference(q, k, pos, weights, **kw), rtol=1e-5, atol=1e-5)


def test_weights_and_samples_without_visible_keys():
    """Arbitrary weights, also on padding queries: a sample with no visible key adds 0 (the reference's
    nan_to_num), a weight scales its sample's mass, and a query block whose samples all weigh 0 is all zeros."""
    B, G, L, b, s = 2, 2, 256, 64, 4
    q, k, pos, _, _, kw = _inputs(B, 1, G, L, L, 64, b, s, torch.float32, 0, 100)
    weights = torch.rand(B, 4, s, generator=torch.Generator().manual_seed(1)) + 0.5
    weights[0, 2] = 0.0
    got = sampled_block_mass(q, k, pos, weights, out=torch.full((B, G, 4, 4), float("nan")), **kw)
    torch.testing.assert_close(got, sampled_block_mass_reference(q, k, pos, weights, **kw), rtol=1e-5, atol=1e-5)
    assert (got[1, :, 0] == 0).all(), "query block 0 of row 1 is padding: no visible key"
    assert (got[0, :, 2] == 0).all()
    # block 1 of row 1: queries 64..127, of which 64..99 are padding (only its samples at 106 and 127 see keys)
    live = pos[1] >= 100
    torch.testing.assert_close(got[1, :, 1].sum(-1), weights[1, 1, live].sum().expand(G), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pad,window", [(0, 0), (30, 0), (0, 70)])
def test_sampled_blocks_with_the_kernel_mass(monkeypatch, pad, window):
    """`sampled_blocks` with the Triton mass (its CUDA path's arguments, run here through the interpreter) keeps
    the same blocks as on the CPU."""
    B, H, Hkv, L, b = 2, 4, 2, 300, 64
    q, k, _, _, mask, _ = _inputs(B, Hkv, H // Hkv, L, L, 64, b, 4, torch.float32, window, pad)
    kw = dict(block_size=b, samples=8, threshold=0.9, scale=0.125)
    want = sampled_blocks(q, k, mask, **kw)
    calls = []

    def kernel(q, k, pos, take, *, chunk_bytes, **rest):
        calls.append(rest)
        assert sampled_mass_unsupported(q, k, rest["block_size"]) is None
        return sampled_block_mass(q, k, pos, take, **rest)

    monkeypatch.setattr(prism_kernels, "sampled_block_mass_reference", kernel)
    got = sampled_blocks(q, k, mask, **kw)
    assert calls and torch.equal(got, want)


def _good():
    q, k, pos, weights, _, kw = _inputs(1, 2, 2, 100, 130, 64, 64, 4, torch.float32, 0, 0)
    kw["key_valid"] = torch.ones(1, 130, dtype=torch.bool)
    return dict(q=q, k=k, positions=pos, weights=weights, **kw)


@pytest.mark.parametrize("change,needle", [
    (lambda a: a.update(q=a["q"][0]), "4-D"),
    (lambda a: a.update(q=a["q"].double(), k=a["k"].double()), "dtype"),
    (lambda a: a.update(k=a["k"].half()), "dtype"),
    (lambda a: a.update(k=a["k"][..., :32]), "head_dim"),
    (lambda a: a.update(q=a["q"][:, :3]), "multiple"),
    (lambda a: a.update(q=torch.zeros(1, 4, 100, 512), k=torch.zeros(1, 2, 130, 512)), "head_dim 512"),
    (lambda a: a.update(block_size=32), "block_size"),
    (lambda a: a.update(positions=a["positions"][:1]), "positions"),
    (lambda a: a.update(positions=a["positions"].float()), "positions"),
    (lambda a: a.update(positions=torch.zeros(2, 65, dtype=torch.long)), "positions"),
    (lambda a: a.update(weights=a["weights"].double()), "weights"),
    (lambda a: a.update(weights=a["weights"][:, :, :2]), "weights"),
    (lambda a: a.update(key_valid=a["key_valid"].int()), "key_valid"),
    (lambda a: a.update(key_valid=a["key_valid"][:, :100]), "key_valid"),
    (lambda a: a.update(q_offset=-1), "q_offset"),
    (lambda a: a.update(window=-1), "window"),
    (lambda a: a.update(max_rows=24), "max_rows"),
    (lambda a: a.update(out=torch.zeros(1, 4, 2, 2)), "out"),
    (lambda a: a.update(out=torch.zeros(1, 4, 2, 3, dtype=torch.float64)), "out"),
])
def test_bad_inputs_name_the_problem(change, needle):
    args = _good()
    sampled_block_mass(**args)  # the unchanged arguments are fine
    change(args)
    with pytest.raises(ValueError, match=needle):
        sampled_block_mass(**args)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    args = _good()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "CUDA" in sampled_mass_unsupported(args["q"], args["k"], 64)
    with pytest.raises(ValueError, match="CUDA"):
        sampled_block_mass(**args)
