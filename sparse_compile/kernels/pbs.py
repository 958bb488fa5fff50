"""PBS-Attn estimation: query-aware key permutation inside causal segments, block selection on the
permuted order (arXiv 2510.21270; spec in shared/specs/pbs_attn.md, notes in PBS_NOTES.md).

Attention is invariant to permuting keys together with values. Sorting the keys of each segment by
their importance to the last queries clusters the important ones into few blocks, so the same
attention mass is covered by fewer key blocks. The attention itself is the shared block-sparse
engine (`block_sparse_attention` with `kv_order`, which checks causality on the original positions).

Step 1 has a Triton version (`key_scores_triton`: two launches that never materialise the
(last 128 queries) x L probabilities); `key_scores` is its reference and the CPU path. Steps 2-4
are PyTorch ops on every device (torch.sort / gather / matmul on CUDA). Nothing of size L x L is
built (block scores are (L/b) x (L/b)). Steps, b = block_size, s = segment_size (a multiple of b):

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
import triton
import triton.language as tl
from torch import Tensor

from sparse_compile.kernels.block_mask import _cdiv

ORDER_HIDDEN = 2**30  # kv_order of a padded key: after every query position, so never visible
LAST_QUERIES = 128  # queries whose attention ranks the keys (the authors' choice)


# ---------------------------------------------------------------------------------------------
# Step 1 in Triton: each scoring row's log-sum-exp, then each key's summed probability
# ---------------------------------------------------------------------------------------------


@triton.jit
def _scoring_rows(Q, b, hkv, rows, offs_d, n_rows, Lq, stride_qb, stride_qh, stride_qr, stride_qd,
                  G: tl.constexpr, N_LAST: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Load scoring rows r = g * N_LAST + i of KV head hkv: query head hkv * G + g, query Lq - N_LAST + i."""
    g = rows // N_LAST
    i = rows % N_LAST
    ptr = (Q + b * stride_qb + (hkv * G + g)[:, None] * stride_qh + (Lq - N_LAST + i)[:, None] * stride_qr
           + offs_d[None, :] * stride_qd)
    return tl.load(ptr, mask=(rows < n_rows)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)


@triton.jit
def _visible(K_ok_ptr, b, offs_n, LK, pos, stride_vb, HAS_VALID: tl.constexpr):
    """(rows, keys) visibility: key j <= the row's position, inside [0, LK), valid."""
    ok = (offs_n[None, :] <= pos[:, None]) & (offs_n < LK)[None, :]
    if HAS_VALID:
        valid = tl.load(K_ok_ptr + b * stride_vb + offs_n, mask=offs_n < LK, other=0)
        ok = ok & (valid != 0)[None, :]
    return ok


@triton.jit
def _pbs_row_lse_kernel(
    Q, K, VALID, LSE,
    n_rows, Lq, LK, H_KV, first_pos, qk_scale,
    stride_qb, stride_qh, stride_qr, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_lb, stride_lh,
    G: tl.constexpr, N_LAST: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, HAS_VALID: tl.constexpr,
):
    """Grid (cdiv(G * N_LAST, BLOCK_R), B * Hkv): log2-sum-exp2 of each scoring row over the keys it sees
    (+inf for a row that sees none, so its probabilities come out 0)."""
    b = tl.program_id(1) // H_KV
    hkv = tl.program_id(1) % H_KV
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    q = _scoring_rows(Q, b, hkv, rows, offs_d, n_rows, Lq, stride_qb, stride_qh, stride_qr, stride_qd,
                      G, N_LAST, HEAD_DIM)
    pos = first_pos + rows % N_LAST
    m_i = tl.full([BLOCK_R], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    start = 0
    while start < LK:  # a while loop: the interpreter cannot take a run-time range bound
        offs_n = start + tl.arange(0, BLOCK_N)
        k = tl.load(K + b * stride_kb + hkv * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=(offs_n < LK)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k)).to(tl.float32) * qk_scale  # log2 domain
        s = tl.where(_visible(VALID, b, offs_n, LK, pos, stride_vb, HAS_VALID), s, -1.0e30)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.where(s > -1.0e29, tl.exp2(s - m_new[:, None]), 0.0), 1)
        m_i = m_new
        start += BLOCK_N
    lse = tl.where(l_i > 0, m_i + tl.log2(tl.maximum(l_i, 1e-30)), float("inf"))
    tl.store(LSE + b * stride_lb + hkv * stride_lh + rows, lse, mask=rows < n_rows)


@triton.jit
def _pbs_key_scores_kernel(
    Q, K, VALID, LSE, OUT,
    Lq, LK, H_KV, first_pos, qk_scale,
    stride_qb, stride_qh, stride_qr, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_lb, stride_lh, stride_ob, stride_oh,
    G: tl.constexpr, N_LAST: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, HAS_VALID: tl.constexpr,
):
    """Grid (cdiv(LK, BLOCK_N), B * Hkv * G): for one query head, each key's mean probability over the
    head's N_LAST scoring rows: sum_i exp2(s_ij - lse_i) / N_LAST."""
    pid_bh = tl.program_id(1)
    g = pid_bh % G
    hkv = (pid_bh // G) % H_KV
    b = pid_bh // (G * H_KV)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = tl.load(K + b * stride_kb + hkv * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=(offs_n < LK)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    i0 = 0
    while i0 < N_LAST:
        rows = g * N_LAST + i0 + tl.arange(0, BLOCK_R)
        row_ok = (i0 + tl.arange(0, BLOCK_R)) < N_LAST
        q = _scoring_rows(Q, b, hkv, rows, offs_d, G * N_LAST, Lq, stride_qb, stride_qh, stride_qr, stride_qd,
                          G, N_LAST, HEAD_DIM)
        lse = tl.load(LSE + b * stride_lb + hkv * stride_lh + rows, mask=row_ok, other=float("inf"))
        s = tl.dot(q, tl.trans(k)).to(tl.float32) * qk_scale
        ok = _visible(VALID, b, offs_n, LK, first_pos + rows % N_LAST, stride_vb, HAS_VALID) & row_ok[:, None]
        acc += tl.sum(tl.where(ok, tl.exp2(s - lse[:, None]), 0.0), 0)
        i0 += BLOCK_R
    tl.store(OUT + b * stride_ob + (hkv * G + g) * stride_oh + offs_n, acc / N_LAST, mask=offs_n < LK)


def key_scores_triton(q: Tensor, k: Tensor, *, q_offset: int, key_valid: Tensor | None, scale: float,
                      per_kv_head: bool, last_queries: int = LAST_QUERIES) -> Tensor:
    """Step 1 with the Triton kernels: the arguments and result of `key_scores` (its reference).

    q: (B, H, Lq, D), k: (B, Hkv, Lk, D) fp16/bf16/fp32 (CUDA, or CPU under TRITON_INTERPRET=1);
    key_valid: (B, Lk) bool or None. Returns (B, Hs, Lk) float32.
    """
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q (B, H, Lq, D) and k (B, Hkv, Lk, D) do not fit: {tuple(q.shape)}, {tuple(k.shape)}")
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if Hkv == 0 or H % Hkv or Lq == 0 or Lk == 0 or D > 256:
        raise ValueError(f"unsupported shapes q {tuple(q.shape)}, k {tuple(k.shape)} (H % Hkv, empty, D <= 256)")
    if key_valid is not None and (tuple(key_valid.shape) != (B, Lk) or key_valid.dtype != torch.bool):
        raise ValueError(f"key_valid must be a (B, Lk) bool tensor, got {key_valid.dtype} {tuple(key_valid.shape)}")
    G = H // Hkv
    n = min(last_queries, Lq)
    BLOCK_D = max(16, triton.next_power_of_2(D))
    BLOCK_R, BLOCK_N = (64, 64) if BLOCK_D <= 128 else (32, 32)
    valid = key_valid.to(torch.int8).contiguous() if key_valid is not None else q.new_empty((1, 1), dtype=torch.int8)
    lse = torch.empty(B, Hkv, G * n, dtype=torch.float32, device=q.device)
    out = torch.empty(B, H, Lk, dtype=torch.float32, device=q.device)
    qk_scale = scale * 1.4426950408889634  # log2(e): exp2 in the kernels
    common = dict(G=G, N_LAST=n, HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_R=BLOCK_R, BLOCK_N=BLOCK_N,
                  HAS_VALID=key_valid is not None, num_warps=4)
    first_pos = q_offset + Lq - n
    _pbs_row_lse_kernel[(triton.cdiv(G * n, BLOCK_R), B * Hkv)](
        q, k, valid, lse, G * n, Lq, Lk, Hkv, first_pos, qk_scale, *q.stride(), *k.stride(), valid.stride(0),
        lse.stride(0), lse.stride(1), **common)
    _pbs_key_scores_kernel[(triton.cdiv(Lk, BLOCK_N), B * Hkv * G)](
        q, k, valid, lse, out, Lq, Lk, Hkv, first_pos, qk_scale, *q.stride(), *k.stride(), valid.stride(0),
        lse.stride(0), lse.stride(1), out.stride(0), out.stride(1), **common)
    return out.view(B, Hkv, G, Lk).sum(2) if per_kv_head else out


# ---------------------------------------------------------------------------------------------
# Steps 1-4 in PyTorch (step 1: the reference of the kernels above)
# ---------------------------------------------------------------------------------------------


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
