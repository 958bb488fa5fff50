"""The decode density of a token selection in one launch (`kept_density`).

A decode method that keeps up to `slots` tokens per score row reports, per query head, the fraction of the visible
keys it attends to: kept / visible. In PyTorch that is seven launches per layer and step (`>= 0`, a sum, two
casts, a clamp, a division and the copy that repeats a KV head's value for its query heads), ~12 µs of a
captured FASA decode step on an H100 (BENCHMARKS.md "Where the generate gap goes"). Here one program per score row
counts its filled slots and writes the density of the query heads that share the row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def store_row_density(DST, kept, n_visible, GROUP: tl.constexpr, BLOCK_G: tl.constexpr):
    """kept / max(n_visible, 1) into DST[0:GROUP]: the density of the GROUP query heads sharing one score row
    (also called by kernels/topk_select.py, whose top-k writes the density of the set it selects)."""
    density = kept / tl.maximum(n_visible.to(tl.float32), 1.0)
    heads = tl.arange(0, BLOCK_G)
    tl.store(DST + heads, tl.full([BLOCK_G], 0.0, tl.float32) + density, mask=heads < GROUP)


@triton.jit
def _kept_density_kernel(IDX, NVIS, OUT, SLOTS, stride_ib, stride_is, stride_ob,
                         GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    row = tl.program_id(1).to(tl.int64)
    slot = tl.arange(0, BLOCK_K)
    idx = tl.load(IDX + b * stride_ib + row * stride_is + slot, mask=slot < SLOTS, other=-1)
    kept = tl.sum((idx >= 0).to(tl.float32), axis=0)
    store_row_density(OUT + b * stride_ob + row * GROUP, kept, tl.load(NVIS + b), GROUP, BLOCK_G)


def kept_density(indices: Tensor, n_visible: Tensor, num_heads: int, impl: str = "auto") -> Tensor:
    """Per query head, the fraction of the visible keys a selection keeps.

    indices: (B, S, slots) int token indices, -1 in unfilled slots (S = H: one row per query head; S = Hkv: one per
    KV head, shared by its H / S query heads); n_visible: (B,) int visible keys per batch row; num_heads: H.
    Returns (B, H) float32 = (filled slots of the head's row) / max(n_visible, 1). impl: "auto" (one Triton launch
    on CUDA, the reference elsewhere), "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "reference"."""
    if impl not in ("auto", "triton", "reference"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'reference', got {impl!r}")
    B, S, slots = indices.shape
    if indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise ValueError(f"indices must be an integer tensor, got {indices.dtype}")
    if tuple(n_visible.shape) != (B,) or n_visible.dtype.is_floating_point:
        raise ValueError(f"n_visible must be (B={B},) int, got {tuple(n_visible.shape)} {n_visible.dtype}")
    if n_visible.device != indices.device:
        raise ValueError(f"n_visible is on {n_visible.device}, indices on {indices.device}")
    if S == 0 or num_heads % S:
        raise ValueError(f"num_heads {num_heads} must be a positive multiple of the {S} score rows")
    if impl == "triton" or (impl == "auto" and indices.is_cuda):
        return _launch(indices, n_visible, num_heads)
    return kept_density_reference(indices, n_visible, num_heads)


def _launch(indices: Tensor, n_visible: Tensor, num_heads: int) -> Tensor:
    """The Triton path of `kept_density` (CUDA, or CPU tensors under TRITON_INTERPRET=1)."""
    B, S, slots = indices.shape
    out = torch.empty(B, num_heads, dtype=torch.float32, device=indices.device)
    if B == 0:
        return out
    idx = indices if indices.stride(-1) == 1 else indices.contiguous()
    block_k = triton.next_power_of_2(max(slots, 1))
    _kept_density_kernel[(B, S)](idx, n_visible.contiguous(), out, slots, idx.stride(0), idx.stride(1),
                                 out.stride(0), GROUP=num_heads // S,
                                 BLOCK_G=triton.next_power_of_2(num_heads // S), BLOCK_K=block_k, num_warps=4)
    return out


def kept_density_reference(indices: Tensor, n_visible: Tensor, num_heads: int) -> Tensor:
    """`kept_density` in PyTorch: the definition."""
    kept = (indices >= 0).sum(-1).float()  # (B, S)
    density = kept / n_visible.clamp(min=1).float()[:, None]
    return density.repeat_interleave(num_heads // indices.shape[1], dim=1).contiguous()
