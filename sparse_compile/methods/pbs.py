"""PBS-Attn: permuted block-sparse prefill (arXiv 2510.21270; shared/specs/pbs_attn.md, PBS_NOTES.md).

Keys are sorted inside causal segments by how much the last queries attend to them, so the important
keys of a segment share few blocks; blocks of earlier segments are then chosen by pooled attention
mass on the permuted order, the query's own segments are always computed, and the shared block-sparse
engine attends over the permuted K/V with causality checked on the original positions (`kv_order`).
Queries are not permuted, so the output is already in the original order.

Padding: padded keys get kv_order = ORDER_HIDDEN, so the engine's causal check hides them from every
query (no per-head key validity needed). GQA: `gqa = "per_head"` (the authors': K/V expanded to the
query heads, one permutation per head) or "per_kv_head" (scores summed over the group, one permuted
K/V and one block list per KV head). Falls back to exact attention (with the reason in the Report) for
a sliding window, a non-causal mask, q_len <= segment_size (as the authors), head_dim > 256.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sparse_compile.attention_mask import AttentionMask, SiteFacts
from sparse_compile.kernels.block_sparse_attention import block_sparse_attention
from sparse_compile.kernels.limits import KERNEL_DTYPES, MAX_HEAD_DIM
from sparse_compile.kernels.pbs import (
    block_lists,
    key_scores,
    key_scores_triton,
    segment_permutation,
    select_blocks,
    selection_density,
)
from sparse_compile.method import GQA_MODES, BenchCase, Knob, Method
from sparse_compile.params import MethodParams, param


@dataclass(frozen=True)
class PbsParams(MethodParams):
    """PBS-Attn's parameters (policy table `[prefill.params]`)."""

    block_size: int = param(128, choices=(16, 32, 64, 128),
                            help="tokens per query/key block (64 or 128 on GPUs; 16/32 for small tests)")
    segment_size: int = param(256, range=(16, 1 << 20),
                              help="keys are permuted inside segments of this many tokens (a multiple of block_size)")
    threshold: float = param(0.9, range=(0.0, 1.0), quality="higher",
                             help="attention mass of earlier-segment blocks to keep (1.0: every block, exact)")
    force_first_block: bool = param(True, help="always keep the block holding the first valid key")
    gqa: str = param("per_head", choices=GQA_MODES,
                     help="per_head: one permutation per query head (the authors'); per_kv_head: one per KV "
                          "head from the group's summed scores, so K/V are permuted once per group")

    def validate(self) -> str | None:
        if self.segment_size % self.block_size:
            return f"segment_size = {self.segment_size} must be a multiple of block_size = {self.block_size}"
        return None


Params = PbsParams


def unsupported(call: Any, site: SiteFacts, params: PbsParams) -> str | None:
    """Why PBS-Attn cannot run this call (the node then runs exact attention), or None."""
    if not call.causal:
        return "the mask is not causal (PBS permutes inside causal segments)"
    if call.window:
        return f"sliding window {call.window} (PBS permutes inside plain causal segments)"
    if call.q_len <= params.segment_size:
        return f"q_len {call.q_len} <= segment_size {params.segment_size} (dense, as the authors)"
    if call.head_dim > MAX_HEAD_DIM:
        return f"head_dim {call.head_dim} > {MAX_HEAD_DIM}"
    if call.device_type == "cuda" and call.dtype not in KERNEL_DTYPES:
        return f"dtype {call.dtype} on CUDA (float16, bfloat16 or float32)"
    return None


@dataclass(frozen=True)
class Selection:
    """What PBS computed for one call: the permuted K/V and their positions, and the block lists.

    k_perm, v_perm: (B, Hs, Lk, D); kv_order: (B, Hs, Lk) int32 original positions (ORDER_HIDDEN for
    padding); kv_num_blocks (B, Hs, nq) / kv_indices (B, Hs, nq, nk) int32; density (B, Hs) float32.
    Hs = H (per_head) or Hkv (per_kv_head)."""

    k_perm: Tensor
    v_perm: Tensor
    kv_order: Tensor
    kv_num_blocks: Tensor
    kv_indices: Tensor
    density: Tensor
    block_size: int


def permute_keys(x: Tensor, perm: Tensor) -> Tensor:
    """x: (B, Hkv, Lk, D), perm: (B, Hs, Lk) with Hs = Hkv or a multiple (per query head) ->
    (B, Hs, Lk, D) gathered in one copy (the per-head case gathers from a broadcast view, no expansion)."""
    B, Hkv, Lk, D = x.shape
    Hs = perm.shape[1]
    G = Hs // Hkv
    source = x[:, :, None].expand(B, Hkv, G, Lk, D)
    index = perm.view(B, Hkv, G, Lk, 1).expand(B, Hkv, G, Lk, D)
    return torch.gather(source, 3, index).view(B, Hs, Lk, D)


def pbs_select(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, site: SiteFacts, params: PbsParams,
               scale: float | None = None) -> Selection:
    """Steps 1-4 of kernels/pbs.py for one call. q: (B, H, Lq, D); k, v: (B, Hkv, Lk, D)."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    per_kv_head = params.gqa == "per_kv_head"
    key_valid = (torch.ones(B, Lk, dtype=torch.bool, device=q.device) if mask.key_valid is None
                 else mask.key_valid.to(torch.bool))
    if q.is_cuda:  # the Triton kernels (two launches, no 128 x Lk probabilities in memory)
        scores = key_scores_triton(q, k, q_offset=mask.q_offset, key_valid=mask.key_valid, scale=scale,
                                   per_kv_head=per_kv_head)
    else:
        scores = key_scores(q, k, q_offset=mask.q_offset, key_valid=key_valid, scale=scale, per_kv_head=per_kv_head)
    perm, kv_order = segment_permutation(scores, key_valid, params.segment_size)
    k_perm, v_perm = permute_keys(k, perm), permute_keys(v, perm)
    pos = mask.q_offset + torch.arange(Lq, device=q.device)
    query_valid = key_valid[:, pos.clamp(0, Lk - 1)] | (pos >= Lk)[None]  # padded query iff its key is padded
    selected, allowed = select_blocks(
        q, k_perm, kv_order, q_offset=mask.q_offset, query_valid=query_valid, block_size=params.block_size,
        segment_size=params.segment_size, threshold=params.threshold, force_first_block=params.force_first_block,
        scale=scale)
    kv_num_blocks, kv_indices = block_lists(selected)
    return Selection(k_perm, v_perm, kv_order, kv_num_blocks, kv_indices, selection_density(selected, allowed),
                     params.block_size)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, site: SiteFacts, params: PbsParams,
              scale: float | None = None) -> tuple[Tensor, Tensor]:
    """PBS-Attn prefill. q: (B, H, Lq, D); k, v: (B, Hkv, Lk, D) post-RoPE. Returns (out (B, H, Lq, D) in
    q's dtype, density (B, H) float32 = kept / allowed blocks of the permuted order). Called by the node
    only for calls `unsupported` accepts (causal, no window, q_len > segment_size)."""
    sel = pbs_select(q, k, v, mask, site, params, scale)
    out = block_sparse_attention(
        q, sel.k_perm, sel.v_perm, sel.kv_num_blocks, sel.kv_indices, block_size=sel.block_size, causal=True,
        q_offset=mask.q_offset, window=0, key_valid=None, scale=scale, kv_order=sel.kv_order,
        validate=not q.is_cuda)
    H = q.shape[1]
    return out, sel.density.repeat_interleave(H // sel.density.shape[1], dim=1)


METHOD = Method(
    name="pbs",
    phases=("prefill",),
    Params=PbsParams,
    attention=attention,
    unsupported=unsupported,
    select=pbs_select,
    capturable_phases=("prefill",),  # torch ops + the engine, full-width lists: no host sync on CUDA
    summary="query-aware key permutation inside causal segments -> permuted block-sparse (PBS-Attn)",
    bench_cases=(BenchCase("prefill"),),
    knobs=(Knob(("threshold",), "quality", "prefill"),),
)
