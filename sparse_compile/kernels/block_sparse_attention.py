"""Block-sparse prefill attention: the one engine every prefill method ends in.

Exact flash attention of each query block over a list of key blocks (FlexAttention `BlockMask`
layout, see `sparse_compile.kernels.block_mask`), with causality, a sliding window and key
padding applied inside the blocks that straddle them, GQA without expanding K/V, and permuted
keys (PBS-Attn) through `kv_order`, the original position of each key.

Reads top to bottom: the jit kernel, the launcher with its input checks, the PyTorch reference.

Semantics (query i sits at key position q_offset + i, default q_offset = Lk - Lq):
  pos(j) = j, or kv_order[b, hkv, j] when keys were permuted;
  key j is visible to query i of head h iff
      key block j // block_size is listed for query block i // block_size (all blocks when the
      lists are None)
  and (not causal  or pos(j) <= q_offset + i)
  and (window == 0 or pos(j) >  q_offset + i - window)
  and (key_valid is None or key_valid[b, j]).
  A query row with no visible key returns zeros.
With full lists this equals `sparse_compile.attention_mask.exact_attention_reference`.

Non-finite values (the same contract on the kernel and both references):
  (a) a key that row i cannot see (causal future, outside the window, key_valid False, in an unlisted
      block, past kv_len) never influences row i, whatever its K or V holds (NaN, +-inf);
  (b) a NaN/inf in q[b, h, i], or in the K or V row of a key that row i sees, makes all of row i NaN,
      whatever the softmax weight of that key (so K = +inf with q . k = -inf, a zero weight in SDPA, is NaN
      here too: NaN is never hidden);
  (c) a row with no visible key is zeros, whatever its q holds.
How the kernel keeps it at no cost to finite tiles: a pre-pass (`nonfinite_keys`, one read of K and V)
flags keys whose K/V row holds a NaN/inf and each (batch, KV head) having one; pass 1 runs every tile whose
q and K/V are finite with the plain loop; pass 2 reruns only the other tiles with a guarded loop (V of
flagged keys loaded as zeros so 0 * NaN never enters P V, flagged keys NaN to the rows that see them, q rows
with a NaN/inf computed as zeros then written NaN). Measured cost: KERNEL_NOTES.md.

Padding (key_valid): per batch row the launcher finds the valid span (first and last valid key, and whether
a hole lies between them; `valid_span`, no sync). Key chunks outside the span are never visited (the dense
range is cut to it; listed blocks wholly outside it are dropped by `drop_padding_blocks`), and chunks inside
a hole-free span skip the padding mask.

Launch configs: tile sizes by head_dim padded to BLOCK_D (every head_dim 1..256), then shrunk until the
modelled shared memory fits what the device reports (`default_config`, `fit_shared_mem`).

Dispatch: CUDA tensors run the Triton kernel; CPU tensors run the reference (`impl="triton"` runs the
kernel on CPU under TRITON_INTERPRET=1, where the key loop is a `while` because the interpreter cannot
take a run-time `range` bound with numpy >= 2.4). Performance notes per version: KERNEL_NOTES.md.
"""

from __future__ import annotations

import math
import numbers

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.errors import OutOfResources

from sparse_compile.kernels.block_mask import BlockList, _cdiv
from sparse_compile.kernels.limits import KERNEL_DTYPES, triton_interpreting

_SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128, 256)
_NEG_INIT = tl.constexpr(-1.0e30)  # finite running-max init: fully masked chunks then give p = 0, alpha = 1, no NaN


@triton.jit
def _attend_chunk(
    it, acc, l_i, m_i, bad_acc, q, q_first, q_last, q_offset, offs_m, offs_n, offs_d,
    idx_base, stride_ik, lo, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
    desc_k, desc_v, kv_row0,
    KvOrder, order_base, stride_pn, KvBlockMin, KvBlockMax, blk_base, stride_bk,
    KeyValid, valid_base, stride_vln, valid_first, valid_last, valid_contig,
    KvBad, bad_base, stride_fn, qk_scale, kv_len, window,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, KV_BLOCK: tl.constexpr, CHUNKS: tl.constexpr,
    EVEN_D: tl.constexpr, HAS_LISTS: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_KV_ORDER: tl.constexpr, HAS_KEY_VALID: tl.constexpr, IEEE_DOT: tl.constexpr, USE_TMA: tl.constexpr,
    GUARDED: tl.constexpr,
):
    """One BLOCK_N chunk of keys for one query tile: returns the updated (acc, l_i, m_i, bad_acc).
    GUARDED: the non-finite-safe variant (pass 2 of the launch, only for tiles that meet a NaN/inf)."""
    # 4. this chunk's first key
    if HAS_LISTS:
        kb = tl.load(idx_base + (it // CHUNKS) * stride_ik)
        start_n = kb * KV_BLOCK + (it % CHUNKS) * BLOCK_N
    else:
        kb = 0
        start_n = lo + it * BLOCK_N
    cols = start_n + offs_n

    # 5. S = Q K^T (keys past kv_len load as zeros and are masked below)
    k_ptrs = k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd
    if EVEN_D:
        kv_mask = cols[:, None] < kv_len
    else:
        kv_mask = (cols[:, None] < kv_len) & (offs_d[None, :] < HEAD_DIM)
    if GUARDED:  # keys whose K or V row holds a NaN/inf (the launcher's pre-pass); their V loads as zeros
        bad_rows = tl.load(KvBad + bad_base + cols[:, None] * stride_fn, mask=cols[:, None] < kv_len, other=0)
    if USE_TMA:  # bulk tensor copy; rows past kv_len belong to the next head (or are zero) and get masked
        k = desc_k.load([kv_row0 + start_n, 0])
    else:
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
    if IEEE_DOT:
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        qk = tl.dot(q, tl.trans(k))
    qk = qk * qk_scale

    # 6. does any element of this chunk need masking? (scalar test; full chunks skip it)
    need_mask = start_n + BLOCK_N > kv_len
    if HAS_KV_ORDER:
        pos = tl.load(KvOrder + order_base + cols * stride_pn, mask=cols < kv_len, other=0)
        if HAS_LISTS:
            blk = blk_base + kb * stride_bk
            pos_min = tl.load(KvBlockMin + blk)
            pos_max = tl.load(KvBlockMax + blk)
        else:
            pos_min = -1  # dense engine over permuted keys: always mask
            pos_max = q_first + 1 + window
            need_mask = need_mask | (start_n >= 0)
    else:
        pos = cols
        pos_min = start_n
        pos_max = start_n + BLOCK_N - 1
    if CAUSAL:
        need_mask = need_mask | (pos_max > q_first)
    if HAS_WINDOW:
        need_mask = need_mask | (pos_min <= q_last - window)
    if HAS_KEY_VALID:  # chunks inside the valid span of a batch row without holes need no padding mask
        need_mask = need_mask | (valid_contig == 0) | (start_n < valid_first) | (start_n + BLOCK_N - 1 > valid_last)
    if need_mask:
        vis = cols[None, :] < kv_len
        q_pos = q_offset + offs_m
        if CAUSAL:
            vis = vis & (pos[None, :] <= q_pos[:, None])
        if HAS_WINDOW:
            vis = vis & (pos[None, :] > q_pos[:, None] - window)
        if HAS_KEY_VALID:
            kvalid = tl.load(KeyValid + valid_base + cols * stride_vln, mask=cols < kv_len, other=0)
            vis = vis & (kvalid[None, :] != 0)
        if GUARDED:  # a visible non-finite key makes its rows NaN; an invisible one is -inf like any other
            bad_cols = tl.load(KvBad + bad_base + cols[None, :] * stride_fn, mask=cols[None, :] < kv_len, other=0)
            qk = qk + tl.where(bad_cols != 0, float("nan"), 0.0)
        qk = tl.where(vis, qk, float("-inf"))
    if GUARDED:  # full chunk: every row sees every key, so one flag per key (no per-element work)
        bad_acc = tl.maximum(bad_acc, tl.where(need_mask, 0, bad_rows))

    # 7. online softmax in base 2, then acc += P V
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.math.exp2(qk - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if USE_TMA:
        v = desc_v.load([kv_row0 + start_n, 0])
        if GUARDED:  # rows past kv_len are the next head's keys: zero them and the non-finite ones
            v = tl.where((cols[:, None] < kv_len) & (bad_rows == 0), v, 0.0)
    elif GUARDED:
        v = tl.load(v_ptrs, mask=kv_mask & (bad_rows == 0), other=0.0)
    else:
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    if IEEE_DOT:
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    m_i = m_new
    return acc, l_i, m_i, bad_acc


@triton.jit
def _attend_range(
    n_iter, acc, l_i, m_i, bad_acc, q, q_first, q_last, q_offset, offs_m, offs_n, offs_d,
    idx_base, stride_ik, lo, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
    desc_k, desc_v, kv_row0,
    KvOrder, order_base, stride_pn, KvBlockMin, KvBlockMax, blk_base, stride_bk,
    KeyValid, valid_base, stride_vln, valid_first, valid_last, valid_contig,
    KvBad, bad_base, stride_fn, qk_scale, kv_len, window,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, KV_BLOCK: tl.constexpr, CHUNKS: tl.constexpr,
    EVEN_D: tl.constexpr, HAS_LISTS: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_KV_ORDER: tl.constexpr, HAS_KEY_VALID: tl.constexpr, IEEE_DOT: tl.constexpr, USE_TMA: tl.constexpr,
    GUARDED: tl.constexpr, INTERPRET: tl.constexpr,
):
    """The key loop of one query tile: n_iter chunks through `_attend_chunk`."""
    if INTERPRET:  # the interpreter cannot take a run-time `range` bound with numpy >= 2.4
        it = 0
        while it < n_iter:
            acc, l_i, m_i, bad_acc = _attend_chunk(
                it, acc, l_i, m_i, bad_acc, q, q_first, q_last, q_offset, offs_m, offs_n, offs_d,
                idx_base, stride_ik, lo, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                desc_k, desc_v, kv_row0,
                KvOrder, order_base, stride_pn, KvBlockMin, KvBlockMax, blk_base, stride_bk,
                KeyValid, valid_base, stride_vln, valid_first, valid_last, valid_contig,
                KvBad, bad_base, stride_fn, qk_scale, kv_len, window,
                HEAD_DIM, BLOCK_N, KV_BLOCK, CHUNKS, EVEN_D, HAS_LISTS, CAUSAL, HAS_WINDOW,
                HAS_KV_ORDER, HAS_KEY_VALID, IEEE_DOT, USE_TMA, GUARDED,
            )
            it += 1
    else:  # a `for` loop so that the compiler software-pipelines the K/V loads
        for it in range(0, n_iter):
            acc, l_i, m_i, bad_acc = _attend_chunk(
                it, acc, l_i, m_i, bad_acc, q, q_first, q_last, q_offset, offs_m, offs_n, offs_d,
                idx_base, stride_ik, lo, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                desc_k, desc_v, kv_row0,
                KvOrder, order_base, stride_pn, KvBlockMin, KvBlockMax, blk_base, stride_bk,
                KeyValid, valid_base, stride_vln, valid_first, valid_last, valid_contig,
                KvBad, bad_base, stride_fn, qk_scale, kv_len, window,
                HEAD_DIM, BLOCK_N, KV_BLOCK, CHUNKS, EVEN_D, HAS_LISTS, CAUSAL, HAS_WINDOW,
                HAS_KV_ORDER, HAS_KEY_VALID, IEEE_DOT, USE_TMA, GUARDED,
            )
    return acc, l_i, m_i, bad_acc


@triton.jit
def _block_sparse_attn_fwd(
    Q, K, V, Out,
    desc_k, desc_v,  # TMA descriptors over K, V viewed as (B * Hkv * Lk, D) (USE_TMA), else unused
    KvNum, KvIdx,  # (B, Hm, nq) / (B, Hm, nq, max_blocks) int32 block lists (unused when HAS_LISTS=False)
    KvOrder,  # (B, Hkv, Lk) int32 original key positions (HAS_KV_ORDER)
    KvBlockMin, KvBlockMax,  # (B, Hkv, nk) int32 min / max original position per key block (HAS_KV_ORDER)
    KeyValid,  # (B, Lk) int8, 0 at padded keys (HAS_KEY_VALID)
    ValidSpan,  # (B, 3) int32: first and last valid key, 1 if every key between them is valid (HAS_KEY_VALID)
    KvBad,  # (B, Hkv, Lk) int8, 1 where the key's K or V row holds a NaN/inf (NONFINITE)
    AnyBad,  # (B * Hkv,) int32, nonzero where that (batch, KV head) has a flagged key (NONFINITE)
    TileFlag,  # (num_q_tiles * B * H,) int8: pass 1 writes 1 for the tiles it leaves to pass 2 (NONFINITE)
    qk_scale,  # softmax scale * log2(e)
    q_len, kv_len, q_offset, window,
    num_heads, num_q_tiles, group, list_head_div, num_kv_slots,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_nb, stride_nh, stride_nm,
    stride_ib, stride_ih, stride_im, stride_ik,
    stride_pb, stride_ph, stride_pn,
    stride_bb, stride_bh, stride_bk,
    stride_vlb, stride_vln, stride_sb,
    stride_fb, stride_fh, stride_fn,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KV_BLOCK: tl.constexpr,
    HAS_LISTS: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_KV_ORDER: tl.constexpr, HAS_KEY_VALID: tl.constexpr,
    REVERSE_TILES: tl.constexpr, IEEE_DOT: tl.constexpr, INTERPRET: tl.constexpr, USE_TMA: tl.constexpr,
    PHASE: tl.constexpr, PACK: tl.constexpr,
):
    """PHASE 0: no non-finite handling (one launch). With it, two launches over the same grid: PHASE 1 runs
    every tile whose q and K/V are finite with the plain loop and flags the others; PHASE 2 runs only the
    flagged tiles, with the guarded loop. Each launch holds one loop, so shared memory is one loop's.
    PACK > 1 (GQA packing, = the group size): one program owns the PACK query heads of one KV head for
    BLOCK_M // PACK query positions (row r: position start + r // PACK, head first + r % PACK), so each
    K/V chunk is loaded once for the whole group; the lists must be per KV head."""
    TILE_Q: tl.constexpr = BLOCK_M // PACK  # query positions per tile
    tl.static_assert(KV_BLOCK % TILE_Q == 0, "a query block must split into whole tiles")
    tl.static_assert(KV_BLOCK % BLOCK_N == 0, "a key block must split into whole BLOCK_N chunks")
    CHUNKS: tl.constexpr = KV_BLOCK // BLOCK_N
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D

    # 1. which (batch, head, query tile) this program owns; causal: longest tiles first
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    tile = (num_q_tiles - 1 - pid_m) if REVERSE_TILES else pid_m
    if PACK > 1:  # programs per (batch, KV head); off_h: the group's first query head
        off_b = pid_bh // (num_heads // group)
        off_hkv = pid_bh % (num_heads // group)
        off_h = off_hkv * group
    else:
        off_b = pid_bh // num_heads
        off_h = pid_bh % num_heads
        off_hkv = off_h // group
    off_hm = off_h // list_head_div
    start_m = tile * TILE_Q  # the tile's first query position
    rows = tl.arange(0, BLOCK_M)
    offs_m = start_m + rows // PACK  # each row's query position
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    flag_ptr = TileFlag + pid_bh.to(tl.int64) * num_q_tiles + pid_m
    if PHASE == 2:
        if tl.load(flag_ptr) == 0:  # pass 1 computed this tile
            return

    q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
    if PACK > 1:  # each row's head within the group
        q_base = q_base + ((rows % PACK).to(tl.int64) * stride_qh)[:, None]
    k_base = K + off_b.to(tl.int64) * stride_kb + off_hkv.to(tl.int64) * stride_kh
    v_base = V + off_b.to(tl.int64) * stride_vb + off_hkv.to(tl.int64) * stride_vh

    # 2. load the query tile once (rows past q_len are zeros and never stored)
    q_ptrs = q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    if EVEN_D:
        q = tl.load(q_ptrs, mask=offs_m[:, None] < q_len, other=0.0)
    else:
        q = tl.load(q_ptrs, mask=(offs_m[:, None] < q_len) & (offs_d[None, :] < HEAD_DIM), other=0.0)

    # 3. the key chunks to visit: listed blocks, or the causal/window range (dense engine)
    q_first = q_offset + start_m  # position of the tile's first and last query
    q_last = q_offset + tl.minimum(start_m + TILE_Q, q_len) - 1
    if HAS_LISTS:
        q_block = start_m // KV_BLOCK
        list_off = off_b.to(tl.int64) * stride_nb + off_hm.to(tl.int64) * stride_nh + q_block * stride_nm
        num_blocks = tl.load(KvNum + list_off)
        idx_base = KvIdx + (off_b.to(tl.int64) * stride_ib + off_hm.to(tl.int64) * stride_ih
                            + q_block * stride_im)
        lo = 0
        n_iter = num_blocks * CHUNKS
    else:
        idx_base = KvIdx
        lo = 0
        hi = kv_len
        if not HAS_KV_ORDER:  # positions are indices: the visible range is contiguous
            if CAUSAL:
                hi = tl.minimum(hi, q_last + 1)
            if HAS_WINDOW:
                lo = tl.maximum(0, q_first - window + 1)
                lo = (lo // BLOCK_N) * BLOCK_N
    valid_first = 0
    valid_last = kv_len - 1
    valid_contig = 1
    if HAS_KEY_VALID:  # padding: key chunks before the first / after the last valid key are never visited
        valid_first = tl.load(ValidSpan + off_b.to(tl.int64) * stride_sb)
        valid_last = tl.load(ValidSpan + off_b.to(tl.int64) * stride_sb + 1)
        valid_contig = tl.load(ValidSpan + off_b.to(tl.int64) * stride_sb + 2)
    if not HAS_LISTS:
        if HAS_KEY_VALID:
            lo = tl.maximum(lo, (valid_first // BLOCK_N) * BLOCK_N)
            hi = tl.minimum(hi, valid_last + 1)
        n_iter = tl.maximum(hi - lo + BLOCK_N - 1, 0) // BLOCK_N

    m_i = tl.full([BLOCK_M], _NEG_INIT, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    bad_acc = tl.zeros([BLOCK_N, 1], dtype=tl.int8)  # non-finite keys met in full chunks

    order_base = off_b.to(tl.int64) * stride_pb + off_hkv.to(tl.int64) * stride_ph
    blk_base = off_b.to(tl.int64) * stride_bb + off_hkv.to(tl.int64) * stride_bh
    valid_base = off_b.to(tl.int64) * stride_vlb
    bad_base = off_b.to(tl.int64) * stride_fb + off_hkv.to(tl.int64) * stride_fh
    kv_row0 = (off_b * (num_heads // group) + off_hkv) * kv_len  # first row of this head in the 2-D view
    # 4-7. the key loop. Non-finite contract: the launcher's pre-pass flagged the keys whose K/V hold a
    # NaN/inf (KvBad) and each (batch, KV head) that has one (AnyBad). Pass 1 leaves a tile whose q row or
    # K/V holds one to pass 2, whose guarded loop loads V of flagged keys as zeros, makes flagged keys NaN
    # to the rows that see them, and computes q rows holding a NaN/inf with q = 0 (so l_i > 0 iff the row
    # sees a key) before writing them as NaN.
    q_bad = offs_m < 0
    if PHASE == 2:
        q_bad = tl.min((tl.abs(q.to(tl.float32)) < float("inf")).to(tl.int32), 1) == 0
    if PHASE == 1:
        kv_slot = off_b * (num_heads // group) + off_hkv
        guarded = tl.load(AnyBad + kv_slot) != 0
        if USE_TMA:  # a tail chunk reads the next head's first rows
            guarded = guarded | (tl.load(AnyBad + tl.minimum(kv_slot + 1, num_kv_slots - 1)) != 0)
        # any NaN/inf in the q tile: x * 0 is NaN exactly for non-finite x, and a sum holding a NaN is NaN
        # (one reduction; the per-row test of pass 2 cost ~8 % more at 32K and 5 % density, KERNEL_NOTES.md)
        guarded = guarded | (tl.sum(tl.sum(q.to(tl.float32) * 0.0, 1), 0) != 0.0)
        tl.store(flag_ptr, guarded.to(tl.int8))
        if guarded:
            return
    if PHASE == 2:
        q = tl.where(q_bad[:, None], tl.zeros_like(q), q)
    acc, l_i, m_i, bad_acc = _attend_range(
        n_iter, acc, l_i, m_i, bad_acc, q, q_first, q_last, q_offset, offs_m, offs_n, offs_d,
        idx_base, stride_ik, lo, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        desc_k, desc_v, kv_row0,
        KvOrder, order_base, stride_pn, KvBlockMin, KvBlockMax, blk_base, stride_bk,
        KeyValid, valid_base, stride_vln, valid_first, valid_last, valid_contig,
        KvBad, bad_base, stride_fn, qk_scale, kv_len, window,
        HEAD_DIM, BLOCK_N, KV_BLOCK, CHUNKS, EVEN_D, HAS_LISTS, CAUSAL, HAS_WINDOW,
        HAS_KV_ORDER, HAS_KEY_VALID, IEEE_DOT, USE_TMA, PHASE == 2, INTERPRET,
    )

    # 8. normalise; rows that saw no visible key have l_i == 0 and are written as zeros; rows with a
    #    non-finite q, or that saw a non-finite key in a full chunk, are NaN (masked chunks made l_i NaN)
    if PHASE == 2:
        row_bad = q_bad | (tl.max(bad_acc) != 0)
        l_i = tl.where(row_bad & (l_i != 0.0), float("nan"), l_i)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    acc = acc / l_safe[:, None]
    o_ptrs = (Out + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
              + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od)
    if PACK > 1:
        o_ptrs = o_ptrs + ((rows % PACK).to(tl.int64) * stride_oh)[:, None]
    if EVEN_D:
        tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=offs_m[:, None] < q_len)
    else:
        o_mask = (offs_m[:, None] < q_len) & (offs_d[None, :] < HEAD_DIM)
        tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=o_mask)


@triton.jit
def _nonfinite_keys(
    K, V, Bad, AnyBad, kv_len, num_kv_heads,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_fb, stride_fh, stride_fn,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Bad[b, h, j] = 1 iff K[b, h, j, :] or V[b, h, j, :] holds a NaN or an inf (one read of K and V);
    AnyBad[b * num_kv_heads + h] (zero-initialised) becomes nonzero iff any key of (b, h) is flagged."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // num_kv_heads).to(tl.int64)
    off_h = (pid_bh % num_kv_heads).to(tl.int64)
    rows = pid_n * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < kv_len) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + off_b * stride_kb + off_h * stride_kh + rows[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=mask, other=0.0)
    v = tl.load(V + off_b * stride_vb + off_h * stride_vh + rows[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=mask, other=0.0)
    ok = (tl.abs(k.to(tl.float32)) < float("inf")) & (tl.abs(v.to(tl.float32)) < float("inf"))
    bad = tl.min(ok.to(tl.int32), 1) == 0
    tl.store(Bad + off_b * stride_fb + off_h * stride_fh + rows * stride_fn, bad.to(tl.int8), mask=rows < kv_len)
    if tl.max(bad.to(tl.int32)) != 0:
        tl.atomic_max(AnyBad + pid_bh, 1)


def valid_span(valid8: Tensor) -> Tensor:
    """(B, 3) int32 per batch row of valid8 (B, Lk) int8: the first valid key (Lk if none), the last valid key
    (-1 if none), and 1 if every key between them is valid (left/right padding) else 0. Device ops only (no
    sync): the kernel skips the key chunks outside [first, last] and the padding mask inside it when 1."""
    B, Lk = valid8.shape
    seen = valid8 != 0
    has = seen.any(dim=1)
    first = torch.where(has, seen.to(torch.int32).argmax(dim=1), Lk)
    last = torch.where(has, Lk - 1 - seen.flip(1).to(torch.int32).argmax(dim=1), -1)
    contiguous = seen.sum(dim=1) == (last - first + 1)
    return torch.stack([first, last, contiguous.to(first.dtype)], dim=1).to(torch.int32).contiguous()


def drop_padding_blocks(kv_num_blocks: Tensor, kv_indices: Tensor, span: Tensor, block_size: int
                        ) -> tuple[Tensor, Tensor]:
    """The lists without the key blocks that lie wholly outside their batch row's valid span (`valid_span`):
    (kv_num_blocks, kv_indices) of the same shapes, kept entries first in their order. Device ops only."""
    B, max_blocks = span.shape[0], kv_indices.shape[-1]
    first, last = span[:, 0].view(B, 1, 1, 1), span[:, 1].view(B, 1, 1, 1)
    start = kv_indices.to(torch.int64) * block_size
    defined = torch.arange(max_blocks, device=kv_indices.device) < kv_num_blocks[..., None]
    keep = defined & (start + block_size > first) & (start <= last)
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)
    return keep.sum(dim=-1, dtype=torch.int32), torch.gather(kv_indices, -1, order).contiguous()


def nonfinite_keys(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """(bad, any_bad): bad (B, Hkv, Lk) int8 is 1 where the key's K or V row holds a NaN or an inf;
    any_bad (B * Hkv,) int32 is nonzero where (b, h) has such a key. Triton (CUDA, or the interpreter);
    one read of K and V."""
    B, Hkv, Lk, D = k.shape
    bad = torch.empty(B, Hkv, Lk, dtype=torch.int8, device=k.device)
    any_bad = torch.zeros(B * Hkv, dtype=torch.int32, device=k.device)
    block_d = max(16, triton.next_power_of_2(D))
    block_k = max(16, 16384 // block_d)
    _nonfinite_keys[(_cdiv(Lk, block_k), B * Hkv)](
        k, v, bad, any_bad, Lk, Hkv, *k.stride(), *v.stride(), *bad.stride(),
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_K=block_k, num_warps=8,
    )
    return bad, any_bad


_CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "USE_TMA", "NONFINITE", "GQA_PACK")
_MAX_SHARED_MEM: dict[int, int] = {}  # CUDA device index -> opt-in shared memory per block, bytes


def max_shared_mem(device_index: int) -> int:
    """The shared memory one program may use on CUDA device `device_index`, in bytes (asked once per device:
    232448 on H100)."""
    if device_index not in _MAX_SHARED_MEM:
        props = triton.runtime.driver.active.utils.get_device_properties(device_index)
        _MAX_SHARED_MEM[device_index] = int(props["max_shared_mem"])
    return _MAX_SHARED_MEM[device_index]


def shared_mem_estimate(block_m: int, block_n: int, block_d: int, num_stages: int, elem_bytes: int) -> int:
    """Bytes of shared memory the kernel needs, modelled as the Q tile (a dot operand) plus `num_stages`
    buffers of one K and one V chunk: elem_bytes * BLOCK_D * (BLOCK_M + 2 * num_stages * BLOCK_N).

    The model reproduces Triton 3.6's count on H100 for D=256, 128x64, 3 stages, bf16 (262144 B);
    KERNEL_NOTES.md compares it with the compiled kernels of every default config.
    """
    return elem_bytes * block_d * (block_m + 2 * num_stages * block_n)


def fit_shared_mem(cfg: dict, block_d: int, elem_bytes: int, limit: int) -> dict:
    """`cfg` shrunk until `shared_mem_estimate` fits `limit`: halve BLOCK_N (down to 16), then drop
    num_stages (down to 1), then halve BLOCK_M (down to 16). Returns a new dict."""
    cfg = dict(cfg)

    def need() -> int:
        return shared_mem_estimate(cfg["BLOCK_M"], cfg["BLOCK_N"], block_d, cfg["num_stages"], elem_bytes)

    while need() > limit:
        if cfg["BLOCK_N"] > 16:
            cfg["BLOCK_N"] //= 2
        elif cfg["num_stages"] > 1:
            cfg["num_stages"] -= 1
        elif cfg["BLOCK_M"] > 16:
            cfg["BLOCK_M"] //= 2
            cfg["num_warps"] = min(cfg["num_warps"], 4)
        else:
            break  # 16x16 tiles, one stage: the smallest launch there is
    return cfg


def default_config(head_dim: int, block_size: int, device_type: str, capability: int = 0, *,
                   dtype: torch.dtype = torch.bfloat16, max_shared: int | None = None) -> dict:
    """Tile sizes and launch parameters (tuned on H100, see KERNEL_NOTES.md), by head_dim padded to
    BLOCK_D (a power of two >= 16), block_size and dtype.

    capability: the CUDA major compute capability. TMA loads of K/V (USE_TMA, Hopper+) are an opt-in:
    measured 3-10 % slower than masked pointer loads on H100 (KERNEL_NOTES.md, v2), so off by default.
    max_shared: the device's shared memory per program (`max_shared_mem`); the config is shrunk by
    `fit_shared_mem` until the estimate fits. NONFINITE: the non-finite contract (module docstring) is
    enforced; False only to measure its cost.
    """
    if device_type != "cuda":  # interpreter: fewer, larger programs are faster
        bm = min(block_size, 64)
        return {"BLOCK_M": bm, "BLOCK_N": min(block_size, 64), "num_warps": 4, "num_stages": 1, "USE_TMA": False,
                "NONFINITE": True, "GQA_PACK": False}
    block_d = max(16, triton.next_power_of_2(head_dim))
    if block_d <= 64:
        cfg = {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3}
    elif block_d <= 128:
        cfg = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
    else:  # 192, 256 (BLOCK_D 256): 128x64 with 3 stages needs 256 KiB; sweep in KERNEL_NOTES.md
        cfg = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}
    cfg["USE_TMA"] = False
    cfg["NONFINITE"] = True
    cfg["GQA_PACK"] = False  # opt-in until measured on the GPU (KERNEL_NOTES.md)
    cfg["BLOCK_M"] = min(cfg["BLOCK_M"], block_size)
    cfg["BLOCK_N"] = min(cfg["BLOCK_N"], block_size)
    if max_shared is not None:
        cfg = fit_shared_mem(cfg, block_d, torch.empty((), dtype=dtype).element_size(), max_shared)
    return cfg


def gqa_pack(cfg: dict, num_heads: int, num_kv_heads: int, list_heads: int, has_lists: bool) -> int:
    """The query heads one program packs (1: none). cfg["GQA_PACK"] asks for it; it applies when there is a
    group (H > Hkv) of power-of-two size dividing BLOCK_M, and the lists (if any) are per KV head."""
    group = num_heads // num_kv_heads
    ok = (bool(cfg.get("GQA_PACK")) and group > 1 and group & (group - 1) == 0 and cfg["BLOCK_M"] % group == 0
          and (not has_lists or list_heads == num_kv_heads))
    return group if ok else 1


def _is_int(x) -> bool:
    """A Python or NumPy integer; bool is not one here (window=True is a mistake, not 1)."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_scalars(block_size, causal, q_offset, window, scale, validate, impl) -> None:
    """Raise ValueError naming the argument, the value and what is allowed."""
    if not _is_int(block_size) or int(block_size) not in _SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"block_size must be an int in {_SUPPORTED_BLOCK_SIZES}, got {block_size!r} "
                         f"({type(block_size).__name__})")
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got {causal!r} ({type(causal).__name__})")
    if q_offset is not None and not _is_int(q_offset):
        raise ValueError(f"q_offset must be an int (any sign) or None, got {q_offset!r} ({type(q_offset).__name__})")
    if not _is_int(window) or window < 0:
        raise ValueError(f"window must be an int >= 0 (0: no window), got {window!r} ({type(window).__name__})")
    if scale is not None and (not isinstance(scale, numbers.Real) or isinstance(scale, bool)
                              or not math.isfinite(scale) or scale <= 0):
        raise ValueError(f"scale must be None (1/sqrt(head_dim)) or a finite float > 0, got {scale!r} "
                         f"({type(scale).__name__})")
    if not isinstance(validate, bool):
        raise ValueError(f"validate must be a bool, got {validate!r} ({type(validate).__name__})")
    if impl not in ("auto", "triton", "reference"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'reference', got {impl!r}")


def _check_inputs(q, k, v, kv_num_blocks, kv_indices, block_size, q_offset, window, key_valid, kv_order,
                  validate) -> tuple[int, int]:
    """Raise ValueError on bad tensors; returns (Hm, q_offset). Hm = 0 when there are no lists.
    Scalars are checked first, by `_check_scalars`."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, heads, L, D), got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in KERNEL_DTYPES + (torch.float64,):
        raise ValueError(f"dtype {q.dtype} not supported (float16, bfloat16, float32; float64 on CPU)")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, H, Lq, D = q.shape
    Bk, Hkv, Lk, Dk = k.shape
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v shape {tuple(v.shape)} != k shape {tuple(k.shape)}")
    if Bk != B or Dk != D:
        raise ValueError(f"k shape {tuple(k.shape)} does not match q shape {tuple(q.shape)} "
                         "in batch or head_dim")
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"num_heads {H} is not a multiple of num_kv_heads {Hkv}")
    if not 1 <= D <= 256:
        raise ValueError(f"head_dim {D} not supported (1..256; tuned for 64 and 128)")
    if key_valid is not None:
        ok = isinstance(key_valid, Tensor) and key_valid.dtype == torch.bool
        if not ok or tuple(key_valid.shape) != (B, Lk):
            raise ValueError(f"key_valid must be a bool tensor of shape (B, Lk) = {(B, Lk)}, got "
                             f"{getattr(key_valid, 'dtype', None)} {tuple(getattr(key_valid, 'shape', ()))}")
        if key_valid.device != q.device:
            raise ValueError(f"key_valid is on {key_valid.device}, q on {q.device}")
    if kv_order is not None:
        if not isinstance(kv_order, Tensor) or kv_order.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"kv_order must be an int32/int64 tensor, got "
                             f"{getattr(kv_order, 'dtype', None)}")
        if tuple(kv_order.shape) != (B, Hkv, Lk):
            raise ValueError(f"kv_order shape {tuple(kv_order.shape)}, "
                             f"expected (B, Hkv, Lk) = {(B, Hkv, Lk)}")
        if kv_order.device != q.device:
            raise ValueError(f"kv_order is on {kv_order.device}, q on {q.device}")
    if (kv_num_blocks is None) != (kv_indices is None):
        raise ValueError("pass both kv_num_blocks and kv_indices, or neither (dense engine)")
    if kv_num_blocks is None:
        return 0, Lk - Lq if q_offset is None else q_offset
    nq, nk = _cdiv(Lq, block_size), _cdiv(Lk, block_size)
    for name, t in (("kv_num_blocks", kv_num_blocks), ("kv_indices", kv_indices)):
        if not isinstance(t, Tensor) or t.dtype != torch.int32:
            raise ValueError(f"{name} must be an int32 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    if kv_num_blocks.dim() != 3 or kv_num_blocks.shape[0] != B or kv_num_blocks.shape[2] != nq \
            or kv_num_blocks.shape[1] not in (H, Hkv):
        raise ValueError(f"kv_num_blocks shape {tuple(kv_num_blocks.shape)}, expected (B, H or Hkv, nq) with "
                         f"B={B}, H={H}, Hkv={Hkv}, nq=ceil({Lq}/{block_size})={nq}")
    Hm = kv_num_blocks.shape[1]
    if kv_indices.dim() != 4 or tuple(kv_indices.shape[:3]) != (B, Hm, nq) or kv_indices.shape[3] < 1:
        raise ValueError(f"kv_indices shape {tuple(kv_indices.shape)}, expected (B, Hm, nq, max_blocks) = "
                         f"({B}, {Hm}, {nq}, >=1)")
    if validate:
        # data checks: one device sync and one sort of the lists (O(B*Hm*nq*max_blocks*log))
        max_blocks = kv_indices.shape[3]
        bad_num = (kv_num_blocks < 0) | (kv_num_blocks > min(nk, max_blocks))
        if bool(bad_num.any()):
            raise ValueError(f"kv_num_blocks out of range [0, min(nk={nk}, max_blocks={max_blocks})]: "
                             f"e.g. {int(kv_num_blocks[bad_num][0])}")
        slot = torch.arange(max_blocks, device=kv_indices.device)
        defined = slot < kv_num_blocks[..., None]
        bad_idx = defined & ((kv_indices < 0) | (kv_indices >= nk))
        if bool(bad_idx.any()):
            raise ValueError(f"kv_indices out of range [0, nk={nk}): e.g. {int(kv_indices[bad_idx][0])}")
        # undefined entries get distinct negative sentinels, then equal neighbours after a sort are duplicates
        keyed = torch.where(defined, kv_indices.long(), -1 - slot.long())
        srt = torch.sort(keyed, dim=-1).values
        if bool(((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)).any()):
            raise ValueError("kv_indices has duplicate key blocks in a row (each block may be listed once)")
    return Hm, Lk - Lq if q_offset is None else q_offset


def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_num_blocks: Tensor | None = None,
    kv_indices: Tensor | None = None,
    *,
    block_size: int = 128,
    causal: bool = True,
    q_offset: int | None = None,
    window: int = 0,
    key_valid: Tensor | None = None,
    scale: float | None = None,
    kv_order: Tensor | None = None,
    out: Tensor | None = None,
    validate: bool = True,
    impl: str = "auto",
    config: dict | None = None,
) -> Tensor:
    """Exact attention of each query block over its listed key blocks (module docstring: semantics).

    q: (B, H, Lq, D); k, v: (B, Hkv, Lk, D), H % Hkv == 0, one dtype (fp16/bf16/fp32; fp64 on CPU).
    kv_num_blocks: (B, Hm, nq) int32, kv_indices: (B, Hm, nq, max_blocks) int32, Hm in {H, Hkv},
      nq = ceil(Lq / block_size); entries past kv_num_blocks undefined; any order, no duplicates.
      Both None: every key block the causal/window structure allows (the dense engine).
    block_size: int in (16, 32, 64, 128, 256). causal: bool.
    q_offset: int (any sign) or None, key position of query 0 (default Lk - Lq).
    window: int >= 0, sliding window (0 = none).
    key_valid: (B, Lk) bool, False keys are never attended.
    kv_order: (B, Hkv, Lk) int32/int64 original positions of permuted keys; causal/window compare them.
    scale: None (1/sqrt(D)) or a finite float > 0. out: optional (B, H, Lq, D) q.dtype output buffer.
    validate: bool; check list contents (range, duplicates): one sort of the lists and a device sync;
      pass False in hot loops once the producer is trusted. Shapes/dtypes are always checked.
    Scalars are type-checked (ValueError naming the argument and what it allows): bool is not an int here
      (window=True is refused) and 16.0 is not a block size; NumPy integers/floats are accepted.
    impl: "auto" (Triton on CUDA, reference on CPU), "triton" (also on CPU under TRITON_INTERPRET=1)
      or "reference". config: optional override of {BLOCK_M, BLOCK_N, num_warps, num_stages, USE_TMA,
      NONFINITE, GQA_PACK}; NONFINITE=False drops the non-finite handling (one pass, no pre-pass: for measuring
      it); GQA_PACK=True packs the query heads of a KV head into one program (K/V loaded once per group;
      `gqa_pack` says when it applies: per-KV-head lists or none, power-of-two group dividing BLOCK_M).
    Returns (B, H, Lq, D) in q's dtype; rows with no visible key are zeros; non-finite inputs follow the
    module docstring's contract.
    """
    _check_scalars(block_size, causal, q_offset, window, scale, validate, impl)
    block_size, window = int(block_size), int(window)
    q_offset = None if q_offset is None else int(q_offset)
    Hm, q_off = _check_inputs(q, k, v, kv_num_blocks, kv_indices, block_size, q_offset, window, key_valid,
                              kv_order, validate)
    use_triton = impl == "triton" or (impl == "auto" and q.is_cuda)
    if use_triton and not (q.is_cuda or triton_interpreting()):
        raise ValueError("impl='triton' needs CUDA tensors or TRITON_INTERPRET=1")
    if use_triton and q.dtype not in KERNEL_DTYPES:
        raise ValueError(f"the Triton kernel takes float16/bfloat16/float32, got {q.dtype}")
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if out is not None and (tuple(out.shape) != (B, H, Lq, D) or out.dtype != q.dtype
                            or out.device != q.device):
        raise ValueError(f"out must be {(B, H, Lq, D)} {q.dtype} on {q.device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    user_cfg = dict(config or {})
    unknown = sorted(set(user_cfg) - set(_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"config keys {unknown} unknown, expected some of {_CONFIG_KEYS}")
    if not use_triton:
        res = block_sparse_attention_reference(
            q, k, v, kv_num_blocks, kv_indices, block_size=block_size, causal=causal, q_offset=q_off,
            window=window, key_valid=key_valid, scale=scale, kv_order=kv_order)
        if out is None:
            return res
        out.copy_(res)
        return out

    BLOCK_D = max(16, triton.next_power_of_2(D))
    if q.is_cuda:
        dev_index = q.device.index if q.device.index is not None else torch.cuda.current_device()
        cfg = default_config(D, block_size, "cuda", torch.cuda.get_device_capability(dev_index)[0],
                             dtype=q.dtype, max_shared=max_shared_mem(dev_index))
    else:
        cfg = default_config(D, block_size, "cpu", dtype=q.dtype)
    cfg.update(user_cfg)
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    dummy = torch.zeros(1, dtype=torch.int32, device=q.device)

    has_lists = kv_num_blocks is not None
    if not has_lists:
        kv_num_blocks, kv_indices = dummy.view(1, 1, 1), dummy.view(1, 1, 1, 1)
        Hm = H
    # permuted keys: original positions plus per-key-block min/max so that blocks wholly in the
    # past (or inside the window) skip masking
    if kv_order is not None:
        order32 = kv_order.to(torch.int32).contiguous()
        nk = _cdiv(Lk, block_size)
        pad = nk * block_size - Lk
        lo_pad = torch.nn.functional.pad(order32, (0, pad), value=torch.iinfo(torch.int32).max)
        hi_pad = torch.nn.functional.pad(order32, (0, pad), value=-1)
        blk_min = lo_pad.view(B, Hkv, nk, block_size).amin(-1).contiguous()
        blk_max = hi_pad.view(B, Hkv, nk, block_size).amax(-1).contiguous()
    else:
        order32, blk_min, blk_max = dummy.view(1, 1, 1), dummy.view(1, 1, 1), dummy.view(1, 1, 1)
    valid8 = key_valid.to(torch.int8) if key_valid is not None else dummy.view(1, 1)
    span = valid_span(valid8) if key_valid is not None else dummy.view(1, 1)
    if key_valid is not None and has_lists:  # padding blocks are dropped from the lists, never loaded
        kv_num_blocks, kv_indices = drop_padding_blocks(kv_num_blocks, kv_indices, span, block_size)
    # non-finite contract: one O(Lk * D) pass flags the keys whose K or V row holds a NaN/inf
    nonfinite = bool(cfg["NONFINITE"])
    kv_bad, any_bad = nonfinite_keys(k, v) if nonfinite else (dummy.view(1, 1, 1), dummy)

    def launch(cfg: dict, phase: int, tile_flag: Tensor) -> None:
        BLOCK_M, BLOCK_N = cfg["BLOCK_M"], cfg["BLOCK_N"]
        if block_size % BLOCK_M or block_size % BLOCK_N:
            raise ValueError(f"BLOCK_M={BLOCK_M} and BLOCK_N={BLOCK_N} must divide block_size={block_size}")
        # TMA (Hopper+): K/V contiguous, 16-bit, power-of-two head_dim; otherwise masked pointer loads
        use_tma = bool(cfg["USE_TMA"]) and q.is_cuda and D == BLOCK_D and q.dtype != torch.float32 \
            and k.is_contiguous() and v.is_contiguous()
        if use_tma:
            from triton.tools.tensor_descriptor import TensorDescriptor

            desc_k = TensorDescriptor(k, [B * Hkv * Lk, D], [D, 1], [BLOCK_N, D])
            desc_v = TensorDescriptor(v, [B * Hkv * Lk, D], [D, 1], [BLOCK_N, D])
        else:
            desc_k, desc_v = k, v
        num_q_tiles = _cdiv(Lq, BLOCK_M // pack)
        grid = (num_q_tiles, B * H // pack)
        _block_sparse_attn_fwd[grid](
            q, k, v, out, desc_k, desc_v,
            kv_num_blocks, kv_indices, order32, blk_min, blk_max, valid8, span, kv_bad, any_bad, tile_flag,
            scale * 1.4426950408889634,
            Lq, Lk, q_off, window,
            H, num_q_tiles, H // Hkv, 1 if Hm == H else H // Hkv, B * Hkv,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            *kv_num_blocks.stride(), *kv_indices.stride(),
            *order32.stride(), *blk_min.stride(), *valid8.stride(), span.stride(0), *kv_bad.stride(),
            HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, KV_BLOCK=block_size,
            HAS_LISTS=has_lists, CAUSAL=causal, HAS_WINDOW=window > 0,
            HAS_KV_ORDER=kv_order is not None, HAS_KEY_VALID=key_valid is not None,
            REVERSE_TILES=causal, IEEE_DOT=q.dtype == torch.float32, INTERPRET=not q.is_cuda,
            USE_TMA=use_tma, PHASE=phase, PACK=pack,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )

    # the estimate should always fit; if the compiler still needs more than the device has, shrink the
    # default config one step at a time (a config the caller set is theirs to fix)
    elem = q.element_size()
    while True:
        try:
            # one int8 per program of pass 1, written by it (no initialisation); pass 2 runs the flagged tiles
            pack = gqa_pack(cfg, H, Hkv, Hm, has_lists)
            n_programs = _cdiv(Lq, cfg["BLOCK_M"] // pack) * B * H // pack
            tile_flag = torch.empty(n_programs, dtype=torch.int8, device=q.device) if nonfinite else dummy
            for phase in (1, 2) if nonfinite else (0,):
                launch(cfg, phase, tile_flag)
            return out
        except OutOfResources:
            tiles_set = any(key in user_cfg for key in ("BLOCK_M", "BLOCK_N", "num_stages"))
            need = shared_mem_estimate(cfg["BLOCK_M"], cfg["BLOCK_N"], BLOCK_D, cfg["num_stages"], elem)
            smaller = fit_shared_mem(cfg, BLOCK_D, elem, need - 1)
            if tiles_set or smaller == cfg:
                raise
            cfg = smaller


def block_sparse_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_num_blocks: Tensor | None = None,
    kv_indices: Tensor | None = None,
    *,
    block_size: int = 128,
    causal: bool = True,
    q_offset: int | None = None,
    window: int = 0,
    key_valid: Tensor | None = None,
    scale: float | None = None,
    kv_order: Tensor | None = None,
) -> Tensor:
    """Pure-PyTorch reference of `block_sparse_attention` (same arguments), float32 math (float64 for
    float64 inputs), one query block at a time so memory stays O(B * H * block_size * Lk).

    Returns (B, H, Lq, D) in q's dtype; rows with no visible key are zeros; non-finite inputs follow the
    module docstring's contract (K/V rows holding a NaN/inf are computed as zeros, then the rows that see
    them are NaN; no nan_to_num, which would hide a NaN).
    """
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if H % Hkv:
        raise ValueError(f"num_heads {H} is not a multiple of num_kv_heads {Hkv}")
    group = H // Hkv
    q_offset = Lk - Lq if q_offset is None else q_offset
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev = q.device
    # non-finite contract: K/V rows holding a NaN/inf are computed as zeros and poison (NaN) exactly the
    # rows that see them; a q row holding one is computed as zeros, then NaN if it sees any key
    bad_key = ~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1))  # (B, Hkv, Lk)
    kk = k.to(work).masked_fill(bad_key[..., None], 0.0).repeat_interleave(group, dim=1)  # (B, H, Lk, D)
    vv = v.to(work).masked_fill(bad_key[..., None], 0.0).repeat_interleave(group, dim=1)
    bad_key = bad_key.repeat_interleave(group, dim=1)  # (B, H, Lk)
    q_bad = ~torch.isfinite(q).all(-1)  # (B, H, Lq)
    qq = q.to(work).masked_fill(q_bad[..., None], 0.0)
    # key positions per (b, h): (B, H, Lk) or (1, 1, Lk)
    if kv_order is not None:
        pos = kv_order.long().repeat_interleave(group, dim=1)
    else:
        pos = torch.arange(Lk, device=dev)[None, None]
    # block mask per query head: (B, H, nq, nk)
    if kv_num_blocks is not None:
        blocks = BlockList(kv_num_blocks, kv_indices, block_size, Lq, Lk).to_dense()
        if blocks.shape[1] != H:
            blocks = blocks.repeat_interleave(group, dim=1)
    else:
        blocks = None
    key_block = torch.arange(Lk, device=dev) // block_size
    out = torch.zeros(B, H, Lq, D, dtype=work, device=dev)
    for m in range(_cdiv(Lq, block_size)):
        rows = slice(m * block_size, min((m + 1) * block_size, Lq))
        q_pos = q_offset + torch.arange(rows.start, rows.stop, device=dev)  # (r,)
        # token visibility (B, H, r, Lk): listed blocks & causal & window & padding
        vis = torch.ones(B, H, rows.stop - rows.start, Lk, dtype=torch.bool, device=dev)
        if blocks is not None:
            vis &= blocks[:, :, m][:, :, None, :].gather(-1, key_block.expand(B, H, 1, Lk))
        if causal:
            vis &= pos[:, :, None, :] <= q_pos[:, None]
        if window > 0:
            vis &= pos[:, :, None, :] > q_pos[:, None] - window
        if key_valid is not None:
            vis &= key_valid[:, None, None, :]
        logits = torch.matmul(qq[:, :, rows], kk.transpose(-1, -2)) * scale
        logits = logits.masked_fill(~vis, float("-inf"))
        sees = vis.any(-1)  # (B, H, r); rows that see nothing are zeros (their softmax is NaN)
        probs = torch.softmax(logits, dim=-1).masked_fill(~sees[..., None], 0.0)
        poisoned = sees & (q_bad[:, :, rows] | (vis & bad_key[:, :, None, :]).any(-1))
        out[:, :, rows] = torch.matmul(probs, vv).masked_fill(poisoned[..., None], float("nan"))
    return out.to(q.dtype)
