"""The block-list format every prefill method hands to the block-sparse engine.

Layout (FlexAttention `BlockMask` style, key side only):

    kv_num_blocks  (B, Hm, nq)            int32   how many key blocks query block m attends to
    kv_indices     (B, Hm, nq, max_blocks) int32  the key-block indices; only the first
                                                  kv_num_blocks[b, h, m] entries of a row are
                                                  defined, the rest are undefined (any value)

  nq = ceil(q_len / block_size) query blocks, nk = ceil(kv_len / block_size) key blocks.
  Query block m holds queries [m * block_size, (m + 1) * block_size) and key block n holds keys
  [n * block_size, (n + 1) * block_size) (the last block of each axis may be partial).
  Hm, the head axis of the lists, is either H (one list per query head) or Hkv (one list per KV
  head, shared by the group of query heads that reads that KV head).
  Defined entries of a row are distinct, lie in [0, nk) and may come in any order.

The dense equivalent (what `to_dense` rebuilds) is a (B, Hm, nq, nk) bool block mask:

    dense[b, h, m, n] = n in kv_indices[b, h, m, :kv_num_blocks[b, h, m]]

Design priorities: one format for every estimator and for the kernel; lists instead of a dense
mask so that the kernel's work is proportional to the selected blocks; causal/window/padding
structure is *not* part of the lists (the kernel applies it inside straddling blocks), so a
list may safely name blocks that are only partly visible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class MaskStructure(Protocol):
    """The structure of an attention mask, as kernels read it (sparse_compile.attention_mask.AttentionMask
    is one): query i sits at key position q_offset + i; key j is visible iff (not causal or
    j <= q_offset + i) and (window == 0 or j > q_offset + i - window) and key_valid[b, j]."""

    causal: bool
    q_offset: int
    window: int
    key_valid: Tensor | None


def allowed_blocks(
    q_len: int,
    kv_len: int,
    block_size: int,
    *,
    causal: bool = True,
    q_offset: int | None = None,
    window: int = 0,
    key_valid: Tensor | None = None,
    device=None,
) -> Tensor:
    """(B, nq, nk) bool: key block n holds at least one valid key visible to some query of block m.

    The one definition of "allowed" (BlockList.density, every method's density, the Report).
    Query i sits at key position q_offset + i (default kv_len - q_len). The queries of block m sit
    at p0 = q_offset + m*b .. p1 = q_offset + min((m+1)b, Lq) - 1; together they see keys in
    (p0 - window, p1] (causal; window 0 = none) that are valid (key_valid (B, Lk) bool; None = all,
    then B = 1).
    """
    q_offset = kv_len - q_len if q_offset is None else q_offset
    if key_valid is None:
        key_valid = torch.ones(1, kv_len, dtype=torch.bool, device=device)
    B, Lk = key_valid.shape
    dev = key_valid.device
    nq, nk = _cdiv(q_len, block_size), _cdiv(Lk, block_size)
    m = torch.arange(nq, device=dev)
    n = torch.arange(nk, device=dev)
    p0 = (q_offset + m * block_size)[:, None]
    p1 = (q_offset + torch.clamp((m + 1) * block_size, max=q_len) - 1)[:, None]
    lo = (n * block_size)[None, :].expand(nq, nk)
    hi = (torch.clamp((n + 1) * block_size, max=Lk) - 1)[None, :].expand(nq, nk)
    if causal:
        hi = torch.minimum(hi, p1)
    if window > 0:
        lo = torch.maximum(lo, p0 - window + 1)
    lo_c, hi_c = lo.clamp(0, Lk), (hi + 1).clamp(0, Lk)
    cum = torch.nn.functional.pad(key_valid.to(torch.int64).cumsum(-1), (1, 0))  # (B, Lk + 1)
    count = cum[:, hi_c.reshape(-1)] - cum[:, lo_c.reshape(-1)]
    return ((count > 0) & (hi_c > lo_c).reshape(1, -1)).reshape(B, nq, nk)


def causal_block_mask(
    q_len: int, kv_len: int, block_size: int, q_offset: int | None = None, window: int = 0, device=None
) -> Tensor:
    """(nq, nk) bool: `allowed_blocks` without padding (causal, optional window)."""
    return allowed_blocks(q_len, kv_len, block_size, q_offset=q_offset, window=window, device=device)[0]


@dataclass(frozen=True)
class BlockList:
    """Per query block, the list of key blocks to attend to (see the module docstring).

    kv_num_blocks: (B, Hm, nq) int32, the number of defined entries in each row of kv_indices.
    kv_indices: (B, Hm, nq, max_blocks) int32, key-block indices; entries at positions
        >= kv_num_blocks[b, h, m] are undefined. Defined entries are distinct, in [0, nk), any order.
    block_size: tokens per query block and per key block.
    q_len: number of queries (nq = ceil(q_len / block_size)).
    kv_len: number of keys (nk = ceil(kv_len / block_size)).
    """

    kv_num_blocks: Tensor
    kv_indices: Tensor
    block_size: int
    q_len: int
    kv_len: int

    @property
    def num_q_blocks(self) -> int:
        return _cdiv(self.q_len, self.block_size)

    @property
    def num_kv_blocks(self) -> int:
        return _cdiv(self.kv_len, self.block_size)

    def __repr__(self) -> str:
        return (
            f"BlockList(kv_num_blocks={tuple(self.kv_num_blocks.shape)}, "
            f"kv_indices={tuple(self.kv_indices.shape)}, block_size={self.block_size}, "
            f"q_len={self.q_len}, kv_len={self.kv_len})"
        )

    def to_dense(self) -> Tensor:
        """(B, Hm, nq, nk) bool block mask: True where a key block is listed for a query block."""
        B, Hm, nq, max_blocks = self.kv_indices.shape
        nk = self.num_kv_blocks
        slot = torch.arange(max_blocks, device=self.kv_indices.device)
        defined = slot < self.kv_num_blocks[..., None]
        # undefined entries go to a spare column nk, dropped at the end
        spare = torch.full_like(self.kv_indices, nk, dtype=torch.long)
        cols = torch.where(defined, self.kv_indices.long(), spare)
        dense = torch.zeros(B, Hm, nq, nk + 1, dtype=torch.bool, device=self.kv_indices.device)
        dense.scatter_(-1, cols, True)
        return dense[..., :nk]

    def density(
        self, causal: bool = True, q_offset: int | None = None, window: int = 0, key_valid: Tensor | None = None
    ) -> Tensor:
        """(B, Hm) float32: selected allowed blocks / allowed blocks (`allowed_blocks`: causal with the
        query offset, window and padding; every block when causal is False and there is no window or
        padding). Listed blocks outside the allowed set do not count; a head with no allowed block
        gets density 0."""
        dense = self.to_dense()
        allowed = allowed_blocks(self.q_len, self.kv_len, self.block_size, causal=causal, q_offset=q_offset,
                                 window=window, key_valid=key_valid, device=dense.device)[:, None]  # (B|1, 1, nq, nk)
        selected = (dense & allowed).sum(dim=(-1, -2)).float()
        return selected / allowed.sum(dim=(-1, -2)).clamp_min(1).float()

    @classmethod
    def from_dense(cls, block_mask: Tensor, block_size: int, q_len: int, kv_len: int,
                   max_blocks: int | None = None) -> BlockList:
        """Lists from a (B, Hm, nq, nk) bool block mask; indices come out ascending.

        max_blocks: the lists' width; None = the largest row count (at least 1), which synchronises with the
        device once; pass nk (or any bound >= every row's count) to build them without a sync.
        """
        if block_mask.dim() != 4 or block_mask.dtype != torch.bool:
            raise ValueError(f"block_mask must be a 4-D bool tensor (B, Hm, nq, nk), got {block_mask.dtype} "
                             f"{tuple(block_mask.shape)}")
        nq, nk = _cdiv(q_len, block_size), _cdiv(kv_len, block_size)
        if tuple(block_mask.shape[-2:]) != (nq, nk):
            raise ValueError(f"block_mask has (nq, nk) = {tuple(block_mask.shape[-2:])}, "
                             f"expected ({nq}, {nk}) for q_len={q_len}, kv_len={kv_len}, "
                             f"block_size={block_size}")
        kv_num_blocks = block_mask.sum(-1, dtype=torch.int32)
        # stable sort puts selected blocks first, in ascending order
        order = torch.sort(block_mask.to(torch.int8), dim=-1, descending=True, stable=True).indices
        if max_blocks is None:
            max_blocks = max(1, int(kv_num_blocks.max().item())) if kv_num_blocks.numel() else 1
        elif not 1 <= max_blocks <= nk:
            raise ValueError(f"max_blocks must be in [1, nk = {nk}], got {max_blocks}")
        kv_indices = order[..., :max_blocks].to(torch.int32).contiguous()
        return cls(kv_num_blocks.contiguous(), kv_indices, block_size, q_len, kv_len)

    @classmethod
    def causal_full(
        cls,
        B: int,
        Hm: int,
        q_len: int,
        kv_len: int,
        block_size: int,
        q_offset: int | None = None,
        device=None,
    ) -> BlockList:
        """Every key block the causal mask allows (query i at key position q_offset + i,
        default q_offset = kv_len - q_len). Lists are contiguous, max_blocks = nk."""
        allowed = causal_block_mask(q_len, kv_len, block_size, q_offset, device=device)
        nq, nk = allowed.shape
        kv_num_blocks = allowed.sum(-1, dtype=torch.int32)  # allowed blocks of a row are a prefix
        kv_indices = torch.arange(max(nk, 1), dtype=torch.int32, device=device).expand(B, Hm, nq, max(nk, 1))
        kv_num_blocks = kv_num_blocks.expand(B, Hm, nq).contiguous()
        return cls(kv_num_blocks, kv_indices.contiguous(), block_size, q_len, kv_len)
