"""What a fused attention node is told about its mask and its site, and the exact reference.

The graph pass never leaves an L x L mask in the graph: it recognises the mask subgraph and
hands the node this structure instead.

Semantics (positions are key indices; query i sits at position `q_offset + i`):
  key j is visible to query i of batch b  iff
      (not causal  or  j <= q_offset + i)
  and (window == 0 or  j >  q_offset + i - window)
  and (key_valid is None or key_valid[b, j])
  and (dense_mask is None or dense_mask[b, h, i, j])      # only for masks the pass could not prove
A query row with no visible key returns zeros (as SDPA's math backend does).

Non-finite values (the same contract on every path: this reference, the block-sparse reference and
its Triton kernel, see sparse_compile.kernels.block_sparse_attention):
  (a) a key that query row i cannot see never influences row i, whatever its K or V holds (NaN, inf);
  (b) a NaN/inf in q[b, h, i], or in the K or V row of a key that row i sees, makes row i NaN (all of
      it). Visibility decides, not the softmax weight: a visible key whose weight underflows to 0
      still poisons the row, so NaN is never hidden;
  (c) a row with no visible key is zeros, whatever its q holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionMask:
    """The mask of one attention call, as structure.

    causal: apply `j <= q_offset + i`.
    q_offset: position of query 0 among the keys (0 for prefill without cache, kv_len - q_len
      for chunked prefill and decode with a DynamicCache).
    window: sliding-window size (0: none); a method must never widen it.
    key_valid: (B, Lk) bool, False at padded keys; None when there is no padding.
    dense_mask: a mask the pass could not prove, broadcastable to (B, H, Lq, Lk), bool (True =
      attend) or float (added to the logits); None normally. Sparse methods fall back to exact
      attention when it is set.
    """

    causal: bool = True
    q_offset: int = 0
    window: int = 0
    key_valid: torch.Tensor | None = None
    dense_mask: torch.Tensor | None = None

    def describe(self) -> str:
        parts = []
        if self.dense_mask is not None:
            return "tensor (kept: not recognised)"
        parts.append(f"causal(q_offset={self.q_offset})" if self.causal else "full")
        if self.window:
            parts.append(f"window={self.window}")
        if self.key_valid is not None:
            parts.append("padding")
        return "+".join(parts)


@dataclass(frozen=True)
class SiteFacts:
    """Static facts about an attention site that methods may use (from the graph pass).

    rope: "rotate_half" (dim i pairs with i + rotary_dim/2) or "interleaved" (2i with 2i+1).
    rotary_dim: how many leading head dims RoPE rotates (== head_dim unless partial rotary).
    """

    layer: int = 0
    rope: str = "rotate_half"
    rotary_dim: int = 128
    head_dim: int = 128
    num_heads: int = 1
    num_kv_heads: int = 1


def visible_keys(mask: AttentionMask, batch: int, q_len: int, kv_len: int, device=None) -> torch.Tensor:
    """The boolean (B, 1, Lq, Lk) visibility of `mask` (dense_mask excluded). Reference use only."""
    i = torch.arange(q_len, device=device)[:, None] + mask.q_offset
    j = torch.arange(kv_len, device=device)[None, :]
    vis = torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
    if mask.causal:
        vis &= j <= i
    if mask.window:
        vis &= j > i - mask.window
    vis = vis[None, None].expand(batch, 1, q_len, kv_len)
    if mask.key_valid is not None:
        vis = vis & mask.key_valid[:, None, None, :].to(torch.bool)
    return vis


def exact_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, scale: float | None = None
) -> torch.Tensor:
    """Exact masked attention in float32 (float64 if given float64); GQA by head grouping.

    q: (B, H, Lq, D); k, v: (B, Hkv, Lk, D) with H % Hkv == 0. Returns (B, H, Lq, D) in q's dtype.
    Rows with no visible key are zeros. Non-finite values follow the module docstring's contract: a
    key's K/V never reach a row that cannot see it; a NaN/inf in q, or in the K/V of a visible key,
    makes the row NaN. A float dense_mask's -inf entries hide their keys (a finite value, however
    negative, leaves the key visible, as in SDPA).
    """
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if H % Hkv:
        raise ValueError(f"num_heads {H} is not a multiple of num_kv_heads {Hkv}")
    group = H // Hkv
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    # non-finite K/V rows and q rows are computed as zeros (so 0 * NaN never reaches a row that cannot see
    # them), then the rows that see them are set to NaN
    bad_key = ~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1))  # (B, Hkv, Lk)
    kk = k.to(work).masked_fill(bad_key[..., None], 0.0).repeat_interleave(group, dim=1)
    vv = v.to(work).masked_fill(bad_key[..., None], 0.0).repeat_interleave(group, dim=1)
    q_bad = ~torch.isfinite(q).all(-1)  # (B, H, Lq)
    logits = torch.matmul(q.to(work).masked_fill(q_bad[..., None], 0.0), kk.transpose(-1, -2)) * scale
    vis = visible_keys(mask, B, Lq, Lk, device=q.device)
    if mask.dense_mask is not None:
        dm = mask.dense_mask
        if dm.dtype == torch.bool:
            vis = vis & dm
        else:
            vis = vis & (dm != float("-inf"))
            logits = logits + dm.to(work)
    vis = vis.expand(B, H, Lq, Lk)
    logits = logits.masked_fill(~vis, float("-inf"))
    sees = vis.any(-1)  # (B, H, Lq); a row that sees nothing has a NaN softmax and is written as zeros
    probs = torch.softmax(logits, dim=-1).masked_fill(~sees[..., None], 0.0)
    poisoned = sees & (q_bad | (vis & bad_key.repeat_interleave(group, dim=1)[:, :, None, :]).any(-1))
    out = torch.matmul(probs, vv).masked_fill(poisoned[..., None], float("nan"))
    return out.to(q.dtype)
