"""PBS-Attn estimation: query-aware key permutation inside causal segments, block selection on the
permuted order (arXiv 2510.21270; spec in shared/specs/pbs_attn.md, notes in PBS_NOTES.md).

Attention is invariant to permuting keys together with values. Sorting the keys of each segment by
their importance to the last queries clusters the important ones into few blocks, so the same
attention mass is covered by fewer key blocks. The attention itself is the shared block-sparse
engine (`block_sparse_attention` with `kv_order`, which checks causality on the original positions).

Version 1 of these steps is plain PyTorch on every device (torch.sort / gather / matmul on CUDA);
nothing of size L x L is built (the key scores are (last 128 queries) x L, the block scores
(L/b) x (L/b)). Steps, b = block_size, s = segment_size (a multiple of b):

  1. `key_scores`: per key, the mean over the last min(128, Lq) queries of softmax(q k^T * scale) over
     the keys each query sees (causal on positions, valid keys); per query head, or summed over the
     group for per-KV-head permutations.
  2. `segment_permutation`: inside each complete segment of s keys, keys sorted by score, descending
     (stable: ties keep their order); a trailing partial segment stays in place. Returns `perm`
     (permuted slot -> original key) and `kv_order` = perm, with padded keys set to ORDER_HIDDEN so
     the engine's causal check (position <= query position) hides them from every query.
  3. `select_blocks`: a key block of the permuted order is *allowed* for query block m when it holds a
     key whose original position is visible to some query of the block (the block's minimum
     kv_order <= the block's last query position). Allowed blocks of the query block's own segments
     (the diagonal segments) are always kept; the allowed blocks of earlier segments are scored by
     pooled attention (mean of the valid queries of block m . mean of the valid keys of block n *
     scale, softmax over those blocks; per-KV-head: the group's probabilities averaged) and kept
     while the mass ranked before them is < threshold (threshold 1.0 keeps every allowed block:
     exact attention); the block holding the first valid key is always kept (force_first_block).
  4. `block_lists`: the kept blocks as kv_num_blocks / kv_indices (full width nk, no host sync).

This file imports nothing above `sparse_compile.kernels`.
"""

from __future__ import annotations

import torch
from sparse_compile.kernels.block_mask import _cdiv
from torch import Tensor

ORDER_HIDDEN = 2**30  # kv_order of a padded key: after every query position, so never visible
LAST_QUERIES = 128  # queries whose attention ranks the keys (the authors' choice)


def key_scores(q: Tensor, k: Tensor, *, q_offset: int, key_valid: Tensor, scale: float, per_kv_head: bool,
               last_queries: int = LAST_QUERIES) -> Tensor:
    """Step 1. q: (B, H, Lq, D), k: (B, Hkv, Lk, D), key_valid: (B, Lk) bool.

    Returns (B, Hs, Lk) float32, Hs = Hkv (scores summed over each group) if per_kv_head else H.
    A key no scoring query sees (future or padded) scores 0.
    """
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = H // Hkv
    n = min(last_queries, Lq)
    # the group's queries against their KV head (no K expansion), in the input dtype; softmax in fp32
    q_last = q[:, :, Lq - n:].reshape(B, Hkv, G, n, D) * scale  # scaled here: n x D, not n x Lk
    logits = torch.matmul(q_last, k[:, :, None].transpose(-1, -2))  # (B, Hkv, G, n, Lk)
    pos = q_offset + torch.arange(Lq - n, Lq, device=q.device)
    visible = (torch.arange(Lk, device=q.device)[None, :] <= pos[:, None])[None] & key_valid[:, None, :]  # (B, n, Lk)
    logits = logits.masked_fill(~visible[:, None, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    probs = probs.masked_fill(~visible.any(-1)[:, None, None, :, None], 0.0)
    per_query_head = probs.mean(3)  # (B, Hkv, G, Lk)
    if per_kv_head:
        return per_query_head.sum(2)
    return per_query_head.reshape(B, H, Lk)


def segment_permutation(scores: Tensor, key_valid: Tensor, segment_size: int) -> tuple[Tensor, Tensor]:
    """Step 2. scores: (B, Hs, Lk); key_valid: (B, Lk) bool.

    Returns perm (B, Hs, Lk) int64 (permuted slot -> original key index) and kv_order (B, Hs, Lk)
    int32 (the original position of each permuted key, ORDER_HIDDEN for padded keys).
    """
    B, Hs, Lk = scores.shape
    perm = torch.arange(Lk, device=scores.device).expand(B, Hs, Lk).clone()
    n_full = Lk // segment_size
    if n_full:
        span = n_full * segment_size
        seg = scores[..., :span].reshape(B, Hs, n_full, segment_size)
        inside = torch.sort(seg, dim=-1, descending=True, stable=True).indices  # (B, Hs, n_full, s)
        start = (torch.arange(n_full, device=scores.device) * segment_size)[:, None]
        perm[..., :span] = (inside + start).reshape(B, Hs, span)
    valid = torch.gather(key_valid[:, None, :].expand(B, Hs, Lk), 2, perm)
    kv_order = torch.where(valid, perm, torch.full_like(perm, ORDER_HIDDEN)).to(torch.int32)
    return perm, kv_order


def pool_valid(x: Tensor, valid: Tensor, block_size: int) -> Tensor:
    """Mean over the valid rows of each block. x: (B, Hx, L, D) -> (B, Hx, ceil(L / b), D) float32;
    valid: (B, Hx, L) or (B, 1, L) bool. A block with no valid row pools to zeros. The weighted sum is a
    batched matmul, so x is read once in its own dtype (no float32 copy)."""
    B, Hx, L, D = x.shape
    n = _cdiv(L, block_size)
    pad = n * block_size - L
    w = torch.nn.functional.pad(valid, (0, pad)).to(x.dtype).view(valid.shape[0], valid.shape[1], n, 1, block_size)
    xs = torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x
    sums = torch.matmul(w, xs.view(B, Hx, n, block_size, D)).squeeze(-2).float()  # (B, Hx, n, D)
    counts = w.float().sum(-1).clamp_min(1.0)  # (B, 1|Hx, n, 1)
    return sums / counts


def select_blocks(q: Tensor, k_perm: Tensor, kv_order: Tensor, *, q_offset: int, query_valid: Tensor,
                  block_size: int, segment_size: int, threshold: float, force_first_block: bool,
                  scale: float) -> tuple[Tensor, Tensor]:
    """Step 3. q: (B, H, Lq, D); k_perm: (B, Hs, Lk, D) permuted keys; kv_order: (B, Hs, Lk) int32;
    query_valid: (B, Lq) bool. Hs = H (per head) or Hkv (per KV head: the group shares the selection).

    Returns (selected, allowed), both (B, Hs, nq, nk) bool; selected is within allowed.
    """
    B, H, Lq, D = q.shape
    Hs, Lk = k_perm.shape[1], k_perm.shape[2]
    b, s, dev = block_size, segment_size, q.device
    nq, nk = _cdiv(Lq, b), _cdiv(Lk, b)
    m = torch.arange(nq, device=dev)
    p0 = q_offset + m * b  # (nq,) first and last query position of each query block
    p1 = q_offset + torch.clamp((m + 1) * b, max=Lq) - 1
    order = torch.nn.functional.pad(kv_order, (0, nk * b - Lk), value=ORDER_HIDDEN).view(B, Hs, nk, b)
    block_min = order.amin(-1)  # (B, Hs, nk): earliest original position in each permuted block
    allowed = block_min[:, :, None, :] <= p1[None, None, :, None]  # (B, Hs, nq, nk)
    seg_k = torch.arange(nk, device=dev) * b // s  # key blocks never straddle segments (s % b == 0)
    diagonal = (seg_k[None, :] >= (p0 // s)[:, None]) & (seg_k[None, :] <= (p1 // s)[:, None])  # (nq, nk)
    earlier = seg_k[None, :] < (p0 // s)[:, None]
    off = allowed & earlier[None, None]
    selected = allowed & diagonal[None, None]
    if threshold >= 1.0:
        selected |= off
    else:
        qb = pool_valid(q, query_valid[:, None, :], b)  # (B, H, nq, D)
        kb = pool_valid(k_perm, kv_order < ORDER_HIDDEN, b)  # (B, Hs, nk, D)
        G = H // Hs
        logits = torch.matmul(qb.view(B, Hs, G * nq, D), kb.transpose(-1, -2)).view(B, Hs, G, nq, nk) * scale
        logits = logits.masked_fill(~off[:, :, None], float("-inf"))
        probs = torch.softmax(logits, dim=-1).masked_fill(~off[:, :, None].any(-1, keepdim=True), 0.0).mean(2)
        ranked = torch.sort(probs, dim=-1, descending=True, stable=True)
        before = torch.cumsum(ranked.values, dim=-1) - ranked.values  # mass ranked before each block
        keep = torch.zeros_like(off).scatter(-1, ranked.indices, before < threshold)
        selected |= keep & off
    if force_first_block:
        first = kv_order.argmin(-1)  # (B, Hs): the slot of the earliest (first valid) key
        is_first = torch.arange(nk, device=dev)[None, None, :] == (first // b)[..., None]  # (B, Hs, nk)
        selected |= allowed & is_first[:, :, None, :]
    return selected, allowed


def block_lists(selected: Tensor) -> tuple[Tensor, Tensor]:
    """Step 4. selected: (B, Hs, nq, nk) bool -> kv_num_blocks (B, Hs, nq) int32, kv_indices
    (B, Hs, nq, nk) int32 (ascending block indices first; full width, so no host sync)."""
    kv_num_blocks = selected.sum(-1, dtype=torch.int32)
    kv_indices = torch.sort(selected.to(torch.int8), dim=-1, descending=True, stable=True).indices
    return kv_num_blocks.contiguous(), kv_indices.to(torch.int32).contiguous()


def selection_density(selected: Tensor, allowed: Tensor) -> Tensor:
    """(B, Hs) float32: kept allowed blocks / allowed blocks (0 where nothing is allowed)."""
    kept = (selected & allowed).sum(dim=(-1, -2)).float()
    return kept / allowed.sum(dim=(-1, -2)).clamp_min(1).float()
