"""LessIsMore's selection layer with one read of K and V: exact decode attention that leaves behind what the
selection needs, then the selection itself without torch.topk (shared/specs/lessismore.md; the PyTorch form of
the selection is kernels/lessismore.py).

    lessismore_select(q, k, v, visible, scale, n_sink, middle, n_recent, *, state=None, impl="auto",
                      num_splits=None, tile=None, out=None, selection=None, launch=None) -> (out, selection)

      q:        (B, H, 1, D)   float16 / bfloat16 / float32 (float64 on the reference path)
      k, v:     (B, Hkv, Lk, D) same dtype, un-expanded (H % Hkv == 0: a GQA group reads K/V once)
      visible:  (B, Lk) bool, the keys the query sees (causality, left padding, unwritten static-cache slots), or
                None when `state` is given
      state:    optional (B, Lk) int8 = kernels.fasa.key_state(visible, n_sink, n_recent) (or, from the mask's
                structure, kernels.key_state.key_state_from_mask): 0 invisible, 1 middle region, 2 forced (the first
                n_sink / last n_recent visible keys); computed from `visible` if None
      returns   out (B, H, 1, D) in q's dtype: softmax(scale * q.k) v over the visible keys (exact attention;
                  the non-finite contract of kernels/sparse_decode.py);
                selection (B, n_sink + n_recent + middle) int32, the spec's selection shared by all heads:
                  [the forced keys by position | the rank-by-rank union of the heads' top `middle` middle-region
                  keys, in union order], -1 padded. Equal, as a set per row, to
                  `select_from_logits(decode_logits_reference(q, k, scale, visible), visible, n_sink, middle,
                  n_recent)` (kernels/lessismore.py), ties aside: equal logits may be ranked either way.

Design: one pass over K/V, then work on 1/8 of the logits or less, and no torch.topk (the PyTorch path runs
three: per head over all keys, over the union's order keys, over the forced keys).

1. `_attention_logits_kernel`: split-K flash decode, grid (splits, Hkv, B); a program takes the G = H / Hkv query
   heads of one KV head over one split of the keys. Per tile of BLOCK_N keys it loads the keys' state and K, computes
   the G heads' logits with one dot, runs the online softmax and P V, and writes
     logits (B, H, Lk) float32: scale * q.k on middle-region keys, -inf elsewhere;
     tile maxima (B, H, Lk / TILE) int32: the largest logit code of every TILE consecutive keys;
     the forced keys (state 2): compacted with one atomic per tile that holds one (KV head 0's programs only).
   Logits compare as order-preserving int32 codes (`topk_select.order_code`; NaN above +inf, as torch.topk ranks
   it). Splits merge in kernels/sparse_decode.py's `_combine_kernel`.
2. A head's top k = min(middle, Lk) without ranking its Lk keys. Let L be the k-th largest tile maximum of the head.
   The k tiles with the largest maxima each hold a logit >= L, so the head's k-th largest logit T >= L; fewer than k
   tiles have a maximum > L, so fewer than TILE * k logits are > L. The logits > L plus k of those == L therefore
   hold the head's top k. `_bound_kernel` (a program per head row) finds L by bisection over the 32-bit codes of
   the Lk / TILE maxima (in registers); `_take_kernel` reads only the tiles whose maximum is >= L (a tile of 8
   float32 is one 32-byte sector: about k tiles of a row, not Lk keys) and packs their logits with their token,
   code << 32 | (2^31 - 1 - token), into a candidate buffer of (TILE + 1) * k slots per head row.
3. `_rank_kernel` (a program per head row): bisection over the candidates' codes gives T and the number of ties at
   T to keep; the k kept are compacted, sorted (tl.sort of the packed int64: logit descending, token ascending)
   and the sorted position is the head's rank r. Each (r, h) writes its token at position r * H + h of the
   rank-major sequence the spec's union walks, and atomically keeps, per token, its earliest position in a
   (B, Lk) table (2^31 - 1 - position, atomic max; 0: no head chose it).
4. `_levels_kernel` counts per rank level the entries that are their token's earliest position (the union's
   first occurrences); `_union_kernel` gives each first occurrence the slot = first occurrences before it (the
   level counts before its level + a prefix sum inside its tile), writes the tokens of slots < middle, -1 after
   the union, and the forced keys sorted by position.
Every launch has a shape-only grid and no host synchronisation, so the selection layer captures in a CUDA graph.

Cost (B = 1, H = 32, Hkv = 8, D = 128, bf16, 128K keys, budget 2048: k = 1536, TILE = 8; H100, 3.35 TB/s), a
prediction (untimed): step 1 reads K and V (537 MB) and writes 16.8 MB of logits and 2.1 MB of tile maxima:
557 MB, 166 us at peak, ~200 us at the 2.8 TB/s cuDNN's dense decode reaches (193 us). Steps 2-4 move 10-20 MB
(the tile maxima twice, ~1.5K logit sectors and <= 110 KB of candidates twice per head row, the sequence): ~5 us
of bandwidth; they are bound by their launches (scratch memset, combine, bound, take, rank, levels, union:
~2 us each in a CUDA graph) and by the 32 dependent reductions of each row program's bisections (~3-5 us each
in bound and rank): ~25 us. About 0.2-0.23 ms for attention + selection against 0.19 ms for cuDNN's dense
decode; today's SDPA + decode_logits + select_tokens costs 0.79 ms. Not included: the caller's per-key state
(methods/lessismore.py: kernels/key_state.py from the mask's structure, two more launches; computing it here
from `visible` with kernels.fasa.key_state costs ~15 small PyTorch launches at (B, Lk)).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from sparse_compile.kernels.fasa import key_state
from sparse_compile.kernels.lessismore import decode_logits_reference, select_from_logits
from sparse_compile.kernels.limits import kernel_unsupported, triton_interpreting
from sparse_compile.kernels.sparse_decode import (
    _combine_kernel,
    check_decode_shapes,
    default_splits,
    sparse_decode_reference,
    store_split_result,
)
from sparse_compile.kernels.topk_select import order_code

LOG2E = 1.4426950408889634
TILES = (4, 8, 16, 32)  # tile sizes of the tile maxima (powers of two dividing BLOCK_N)
BLOCK_CAP = 16384  # codes a row program holds in registers; longer rows loop over blocks
TAKE_TILES = 512  # tiles per `_take_kernel` program
UNION_BLOCK = 2048  # sequence positions per `_levels_kernel` / `_union_kernel` program
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _row_codes(PTR, offs, n_a, a_cap, n_b, PACKED: tl.constexpr):
    """The codes at slots `offs` of a row laid out as [n_a entries | unused up to a_cap | n_b entries] (int32
    codes, or packed int64 keys whose high half is the code); INT32_MIN, below every code, at unused slots."""
    ok = (offs < n_a) | ((offs >= a_cap) & (offs < a_cap + n_b))
    if PACKED:
        code = (tl.load(PTR + offs, mask=ok, other=0) >> 32).to(tl.int32)
    else:
        code = tl.load(PTR + offs, mask=ok, other=0)
    return tl.where(ok, code, -2147483648)


@triton.jit
def _kth_largest(PTR, n_a, a_cap, n_b, k, PACKED: tl.constexpr, BLOCK: tl.constexpr, NBLK: tl.constexpr):
    """(t, count(code > t)) for the largest code t with count(code >= t) >= k over a row of `_row_codes`
    (t = INT32_MIN when the row holds fewer than k codes): 32 bisection steps over the int32 range; the row stays
    in registers when NBLK == 1."""
    offs = tl.arange(0, BLOCK)
    if NBLK == 1:
        codes = _row_codes(PTR, offs, n_a, a_cap, n_b, PACKED)
    lo = tl.full([], -2147483648, tl.int64)
    hi = tl.full([], 2147483647, tl.int64)
    for _ in range(32):
        mid = lo + (hi - lo + 1) // 2
        t = mid.to(tl.int32)
        if NBLK == 1:
            count = tl.sum((codes >= t).to(tl.int32), axis=0)
        else:
            count = tl.zeros([], tl.int32)
            for j in range(NBLK):
                count += tl.sum((_row_codes(PTR, j * BLOCK + offs, n_a, a_cap, n_b, PACKED) >= t).to(tl.int32), axis=0)
        ok = count >= k
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    t = lo.to(tl.int32)
    if NBLK == 1:
        above = tl.sum((codes > t).to(tl.int32), axis=0)
    else:
        above = tl.zeros([], tl.int32)
        for j in range(NBLK):
            above += tl.sum((_row_codes(PTR, j * BLOCK + offs, n_a, a_cap, n_b, PACKED) > t).to(tl.int32), axis=0)
    return t, above


# ---------------------------------------------------------------------------------------------
# 1. attention + logits + tile maxima + forced keys (one pass over K/V)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _attend_tile(
    start, acc, l_i, m_i, seen, bad, q, heads, h_ok, offs_n, offs_d, write_fixed,
    k_base, v_base, st_base, lg_base, tm_base, fx_base, nfx_ptr,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_sn, stride_lh, stride_th,
    kv_len, n_tiles, n_fixed, scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, TILE: tl.constexpr,
    HAS_FIXED: tl.constexpr, IEEE_DOT: tl.constexpr,
):
    """One BLOCK_N tile of keys: writes its logits, tile maxima and forced keys; returns the updated
    (acc, l_i, m_i, seen, bad) of the online softmax (as kernels/sparse_decode.py's `_decode_block`)."""
    keys = start + offs_n
    in_range = keys < kv_len
    st = tl.load(st_base + keys * stride_sn, mask=in_range, other=0)
    vis = st != 0
    # 1. K rows of the visible keys (others load as zeros and are masked below); the group's logits in one dot
    load_mask = vis[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(k_base + keys[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=load_mask, other=0.0)
    if IEEE_DOT:
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        qk = tl.dot(q, tl.trans(k))
    # 2. middle-region logits (-inf at invisible and forced keys) and the largest code of each TILE keys
    logit = tl.where((st == 1)[None, :], qk * scale, float("-inf"))
    tl.store(lg_base + heads[:, None] * stride_lh + keys[None, :], logit, mask=h_ok[:, None] & in_range[None, :])
    tmax = tl.max(tl.reshape(order_code(logit), (BLOCK_H, BLOCK_N // TILE, TILE)), axis=2)
    tiles = start // TILE + tl.arange(0, BLOCK_N // TILE)
    tl.store(tm_base + heads[:, None] * stride_th + tiles[None, :], tmax,
             mask=h_ok[:, None] & (tiles < n_tiles)[None, :])
    # 3. forced keys of the batch row (KV head 0's programs): one atomic per tile holding one, order fixed later
    if HAS_FIXED:
        forced = (st == 2).to(tl.int32)
        n_forced = tl.sum(forced, axis=0)
        if write_fixed & (n_forced > 0):
            slot = tl.atomic_add(nfx_ptr, n_forced) + tl.cumsum(forced, axis=0) - 1
            tl.store(fx_base + slot, keys + 1, mask=(forced > 0) & (slot < n_fixed))
    # 4. online softmax in base 2 over the visible keys; a visible non-finite logit poisons its head
    bad = bad | (tl.max((vis[None, :] & ~(tl.abs(qk) < float("inf"))).to(tl.int32), axis=1) > 0)
    s = tl.where(vis[None, :], qk * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    # 5. acc = acc * alpha + P V
    v = tl.load(v_base + keys[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=load_mask, other=0.0)
    if IEEE_DOT:
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, l_i, m_new, seen | vis, bad


@triton.jit
def _attention_logits_kernel(
    Q, K, V, STATE, LOGITS, TMAX, FIXED, N_FIXED, OUT, M_PART, L_PART, ACC_PART,
    kv_len, n_tiles, n_fixed, split_n, scale, qk_scale,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_sb, stride_sn,
    stride_lb, stride_lh,
    stride_tb, stride_th,
    stride_fb,
    stride_ob, stride_oh, stride_od,
    stride_mb, stride_mh, stride_ms,
    stride_ab, stride_ah, stride_as, stride_ad,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr, TILE: tl.constexpr, HAS_FIXED: tl.constexpr, ONE_SPLIT: tl.constexpr,
    IEEE_DOT: tl.constexpr, INTERPRET: tl.constexpr,
):
    tl.static_assert(BLOCK_N % TILE == 0, "a tile of the tile maxima lies inside one key block")
    split = tl.program_id(0)
    hkv = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)

    # 1. the group's query rows (padded to BLOCK_H for the dot), and whether each is finite
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    h_ok = offs_h < G
    heads = hkv * G + offs_h
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=h_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    q_bad = tl.max(tl.where(tl.abs(q.to(tl.float32)) < float("inf"), 0, 1), axis=1)  # (BLOCK_H,)

    # 2. this split's keys, BLOCK_N at a time
    k_base = K + b * stride_kb + hkv * stride_kh
    v_base = V + b * stride_vb + hkv * stride_vh
    st_base = STATE + b * stride_sb
    lg_base = LOGITS + b * stride_lb
    tm_base = TMAX + b * stride_tb
    fx_base = FIXED + b * stride_fb
    nfx_ptr = N_FIXED + b
    write_fixed = hkv == 0
    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
    seen = tl.zeros((BLOCK_N,), dtype=tl.int1)
    bad = tl.zeros((BLOCK_H,), dtype=tl.int1)
    split_start = split * split_n
    stop = tl.minimum(split_start + split_n, kv_len)
    if INTERPRET:  # the interpreter cannot take a run-time `range` bound with numpy >= 2.4
        start = split_start
        while start < stop:
            acc, l_i, m_i, seen, bad = _attend_tile(
                start, acc, l_i, m_i, seen, bad, q, heads, h_ok, offs_n, offs_d, write_fixed,
                k_base, v_base, st_base, lg_base, tm_base, fx_base, nfx_ptr,
                stride_kn, stride_kd, stride_vn, stride_vd, stride_sn, stride_lh, stride_th,
                kv_len, n_tiles, n_fixed, scale, qk_scale, HEAD_DIM, BLOCK_H, BLOCK_N, TILE, HAS_FIXED, IEEE_DOT)
            start += BLOCK_N
    else:
        for start in range(split_start, stop, BLOCK_N):
            acc, l_i, m_i, seen, bad = _attend_tile(
                start, acc, l_i, m_i, seen, bad, q, heads, h_ok, offs_n, offs_d, write_fixed,
                k_base, v_base, st_base, lg_base, tm_base, fx_base, nfx_ptr,
                stride_kn, stride_kd, stride_vn, stride_vd, stride_sn, stride_lh, stride_th,
                kv_len, n_tiles, n_fixed, scale, qk_scale, HEAD_DIM, BLOCK_H, BLOCK_N, TILE, HAS_FIXED, IEEE_DOT)

    # 3. poisoned heads (a visible non-finite key, or a non-finite q that sees a key), then the output or the
    # split's partial (max, sum, acc) for `_combine_kernel` (l = NaN marks a poisoned split)
    any_seen = tl.max(seen.to(tl.int32), axis=0)
    poison = bad | ((q_bad > 0) & (any_seen > 0))
    poison = poison | (tl.max(tl.where(tl.abs(acc) < float("inf"), 0, 1), axis=1) > 0)
    store_split_result(OUT, M_PART, L_PART, ACC_PART, acc, m_i, l_i, poison, b, heads, split, offs_d, h_ok,
                       stride_ob, stride_oh, stride_od, stride_mb, stride_mh, stride_ms,
                       stride_ab, stride_ah, stride_as, stride_ad, HEAD_DIM, ONE_SPLIT)


# ---------------------------------------------------------------------------------------------
# 2. each head's candidates: the bound L from the tile maxima, then the logits of the tiles >= L
# ---------------------------------------------------------------------------------------------


@triton.jit
def _bound_kernel(TMAX, BOUND, n_tiles, k_sel, stride_tr, BLOCK: tl.constexpr, NBLK: tl.constexpr):
    """BOUND[row] = the k_sel-th largest tile maximum of head row `row` (INT32_MIN with fewer tiles)."""
    row = tl.program_id(0)
    bound, _ = _kth_largest(TMAX + row.to(tl.int64) * stride_tr, n_tiles, n_tiles, 0, k_sel, False, BLOCK, NBLK)
    tl.store(BOUND + row, bound)


@triton.jit
def _take_kernel(
    LOGITS, TMAX, BOUND, CAND, COUNT, kv_len, n_tiles, k_sel, a_cap, n_rows, stride_lr, stride_tr, stride_cr,
    TILE: tl.constexpr, TILES_PER: tl.constexpr,
):
    """Candidates of head row `row` from TILES_PER tiles: logits > L into slots [0, a_cap) (COUNT[row]), and
    logits == L into slots a_cap + [0, k_sel) (COUNT[n_rows + row], extra ties dropped), packed with their token."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    bound = tl.load(BOUND + row)
    # 1. the tiles that hold a candidate: maximum >= L and above -inf (-inf never ranks: the spec drops it)
    tiles = chunk * TILES_PER + tl.arange(0, TILES_PER)
    tmax = tl.load(TMAX + row * stride_tr + tiles, mask=tiles < n_tiles, other=-2147483648)
    hot = (tmax >= bound) & (tmax > -2139095041)
    # 2. their logits only (masked lanes read nothing), flattened in key order
    keys = tiles[:, None] * TILE + tl.arange(0, TILE)[None, :]
    x = tl.load(LOGITS + row * stride_lr + keys, mask=hot[:, None] & (keys < kv_len), other=float("-inf"))
    keys = tl.reshape(keys, (TILES_PER * TILE,))
    code = tl.reshape(order_code(x), (TILES_PER * TILE,))
    key = (code.to(tl.int64) << 32) | (2147483647 - keys).to(tl.int64)
    live = code > -2139095041
    above = (live & (code > bound)).to(tl.int32)
    tie = (live & (code == bound)).to(tl.int32)
    # 3. compaction: one atomic per kind per program that holds one
    n_above = tl.sum(above, axis=0)
    if n_above > 0:
        slot = tl.atomic_add(COUNT + row, n_above) + tl.cumsum(above, axis=0) - 1
        tl.store(CAND + row * stride_cr + slot, key, mask=(above > 0) & (slot < a_cap))
    n_tie = tl.sum(tie, axis=0)
    if n_tie > 0:
        slot = tl.atomic_add(COUNT + n_rows + row, n_tie) + tl.cumsum(tie, axis=0) - 1
        tl.store(CAND + row * stride_cr + a_cap + slot, key, mask=(tie > 0) & (slot < k_sel))


# ---------------------------------------------------------------------------------------------
# 3. each head's top k in rank order -> the rank-major sequence and every token's earliest position
# ---------------------------------------------------------------------------------------------


@triton.jit
def _rank_kernel(
    CAND, COUNT, TOP, SEQ, FIRST, k_sel, a_cap, n_rows, H, stride_cr, stride_pr, stride_sb, stride_fb,
    BLOCK: tl.constexpr, NBLK: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // H
    h = row % H
    cand = CAND + row * stride_cr
    n_a = tl.minimum(tl.load(COUNT + row), a_cap)
    n_b = tl.minimum(tl.load(COUNT + n_rows + row), k_sel)
    # 1. T = the k-th largest candidate code; every code > T is kept, and `need` of the ties at T
    t, n_above = _kth_largest(cand, n_a, a_cap, n_b, k_sel, True, BLOCK, NBLK)
    need = k_sel - n_above
    # 2. compact the kept candidates (packed keys) into TOP[row, :n_kept]
    offs = tl.arange(0, BLOCK)
    n_kept = tl.zeros([], tl.int32)
    n_ties = tl.zeros([], tl.int32)
    for j in range(NBLK):
        slots = j * BLOCK + offs
        ok = (slots < n_a) | ((slots >= a_cap) & (slots < a_cap + n_b))
        key = tl.load(cand + slots, mask=ok, other=0)
        code = (key >> 32).to(tl.int32)
        tie = (ok & (code == t)).to(tl.int32)
        keep = (ok & (code > t)) | ((tie > 0) & (n_ties + tl.cumsum(tie, axis=0) <= need))
        slot = n_kept + tl.cumsum(keep.to(tl.int32), axis=0) - 1
        tl.store(TOP + row * stride_pr + slot, key, mask=keep)
        n_kept += tl.sum(keep.to(tl.int32), axis=0)
        n_ties += tl.sum(tie, axis=0)
    tl.debug_barrier()  # TOP's stores are visible to the whole program before it reads them back
    # 3. sort: logit descending, token ascending; the position is the rank
    offs_k = tl.arange(0, BLOCK_K)
    top = tl.sort(tl.load(TOP + row * stride_pr + offs_k, mask=offs_k < n_kept, other=-9223372036854775808),
                  descending=True)
    code = (top >> 32).to(tl.int32)
    token = (2147483647 - (top & 0xFFFFFFFF)).to(tl.int32)
    valid = (offs_k < n_kept) & (code < 2147483647)  # a NaN logit ranks but is not chosen, as in the spec
    # 4. the rank-major sequence (position r * H + h) and each token's earliest position
    pos = offs_k * H + h
    tl.store(SEQ + b * stride_sb + pos, tl.where(valid, token, -1), mask=offs_k < k_sel)
    tl.atomic_max(FIRST + b * stride_fb + token, (2147483647 - pos).to(tl.int32), mask=valid)


# ---------------------------------------------------------------------------------------------
# 4. the union: first occurrences in rank-major order, truncated at `middle`; the forced keys by position
# ---------------------------------------------------------------------------------------------


@triton.jit
def _first_occurrences(SEQ, FIRST, b, r, k_sel, H, stride_sb, stride_fb, BLOCK_HH: tl.constexpr):
    """(tokens, first) of the sequence positions r[:, None] * H + h: first = the token's earliest position."""
    hh = tl.arange(0, BLOCK_HH)
    ok = (r < k_sel)[:, None] & (hh < H)[None, :]
    pos = r[:, None] * H + hh[None, :]
    token = tl.load(SEQ + b * stride_sb + pos, mask=ok, other=-1)
    earliest = tl.load(FIRST + b * stride_fb + token, mask=token >= 0, other=0)
    return token, (token >= 0) & (earliest == 2147483647 - pos)


@triton.jit
def _levels_kernel(SEQ, FIRST, LEVELS, k_sel, H, stride_sb, stride_fb, stride_vb,
                   BLOCK_R: tl.constexpr, BLOCK_HH: tl.constexpr):
    """LEVELS[b, r] = the first occurrences among the H entries of rank level r."""
    b = tl.program_id(1).to(tl.int64)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    _, first = _first_occurrences(SEQ, FIRST, b, r, k_sel, H, stride_sb, stride_fb, BLOCK_HH)
    tl.store(LEVELS + b * stride_vb + r, tl.sum(first.to(tl.int32), axis=1), mask=r < k_sel)


@triton.jit
def _union_kernel(
    SEQ, FIRST, LEVELS, FIXED, SEL, k_sel, middle, n_fixed, H, stride_sb, stride_fb, stride_vb, stride_xb, stride_eb,
    BLOCK_R: tl.constexpr, BLOCK_HH: tl.constexpr, BLOCK_F: tl.constexpr, HAS_FIXED: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    sel = SEL + b * stride_eb
    # 1. first occurrences before this program's levels, and in all levels (the union's size before truncation)
    r0 = pid * BLOCK_R
    offs_r = tl.arange(0, BLOCK_R)
    before = tl.zeros([], tl.int32)
    total = tl.zeros([], tl.int32)
    start = 0
    while start < k_sel:
        lv = tl.load(LEVELS + b * stride_vb + start + offs_r, mask=start + offs_r < k_sel, other=0)
        total += tl.sum(lv, axis=0)
        before += tl.sum(tl.where(start + offs_r < r0, lv, 0), axis=0)
        start += BLOCK_R
    # 2. this program's first occurrences in rank-major order -> union slots; slots < middle are kept
    token, first = _first_occurrences(SEQ, FIRST, b, r0 + offs_r, k_sel, H, stride_sb, stride_fb, BLOCK_HH)
    token = tl.reshape(token, (BLOCK_R * BLOCK_HH,))
    first = tl.reshape(first, (BLOCK_R * BLOCK_HH,)).to(tl.int32)
    slot = before + tl.cumsum(first, axis=0) - 1
    tl.store(sel + n_fixed + slot, token, mask=(first > 0) & (slot < middle))
    # 3. -1 in the union slots [total, middle), this program's share of them
    span = tl.cdiv(middle, tl.num_programs(0))
    s = pid * span
    stop = tl.minimum(s + span, middle)
    offs_s = tl.arange(0, BLOCK_R)
    while s < stop:
        slots = s + offs_s
        tl.store(sel + n_fixed + slots, tl.full((BLOCK_R,), -1, tl.int32), mask=(slots >= total) & (slots < stop))
        s += BLOCK_R
    # 4. the forced keys by position (stored as token + 1, 0 = empty), -1 padded
    if HAS_FIXED:
        if pid == 0:
            offs_f = tl.arange(0, BLOCK_F)
            stored = tl.load(FIXED + b * stride_xb + offs_f, mask=offs_f < n_fixed, other=0)
            ordered = tl.sort(tl.where(stored > 0, stored - 1, 2147483647))
            tl.store(sel + offs_f, tl.where(ordered == 2147483647, -1, ordered), mask=offs_f < n_fixed)


# ---------------------------------------------------------------------------------------------
# launcher
# ---------------------------------------------------------------------------------------------


class SelectRun(NamedTuple):
    """What `select_triton` computes. out (B, H, 1, D); selection (B, n_sink + n_recent + middle) int32;
    logits (B, H, Lk) float32 (-inf outside the middle region); head_top (B, H, k) int32: each head's top
    k = min(middle, Lk) middle-region keys in rank order (-1 where the logit is -inf or NaN)."""

    out: Tensor
    selection: Tensor
    logits: Tensor
    head_top: Tensor


def check_inputs(q: Tensor, k: Tensor, v: Tensor, visible: Tensor | None, state: Tensor | None, scale: float,
                 n_sink: int, middle: int, n_recent: int) -> None:
    """Raise ValueError naming the argument when shapes, dtypes, devices or counts do not fit (no device sync)."""
    B, H, Hkv, Lk, D = check_decode_shapes(q, k, v)
    if Lk == 0:
        raise ValueError("k holds no key (Lk = 0)")
    if q.dtype not in _FLOAT_DTYPES or not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one float dtype (float16, bfloat16, float32, float64), got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if visible is None and state is None:
        raise ValueError("give visible (B, Lk) bool or state (B, Lk) int8")
    if visible is not None and not (q.device == k.device == v.device == visible.device):
        raise ValueError(f"q, k, v, visible must be on one device, got {q.device}, {k.device}, {v.device}, "
                         f"{visible.device}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if visible is not None and (tuple(visible.shape) != (B, Lk) or visible.dtype != torch.bool):
        raise ValueError(f"visible must be (B, Lk) = {(B, Lk)} bool, got {tuple(visible.shape)} {visible.dtype}")
    if state is not None and (tuple(state.shape) != (B, Lk) or state.dtype != torch.int8 or state.device != q.device):
        raise ValueError(f"state must be (B, Lk) = {(B, Lk)} int8 on {q.device} (kernels.fasa.key_state), got "
                         f"{tuple(state.shape)} {state.dtype} on {state.device}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite float > 0, got {scale!r}")
    for name, n in (("n_sink", n_sink), ("middle", middle), ("n_recent", n_recent)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{name} must be an int >= 0, got {n!r}")


def choose_tile(kv_len: int, k_sel: int, block_n: int) -> int:
    """The tile size that keeps both row programs' inputs smallest: max(Lk / TILE maxima, (TILE + 1) k
    candidates), among the TILES dividing block_n."""
    sizes = [t for t in TILES if block_n % t == 0]
    return min(sizes, key=lambda t: (max(triton.cdiv(kv_len, t), (t + 1) * max(k_sel, 1)), t))


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, poison: bool) -> Tensor:
    """torch.empty; poisoned (NaN, or 1: a plausible token and count) so a test catches a read of an unwritten
    element."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if poison:
        out.fill_(float("nan") if dtype.is_floating_point else 1)
    return out


def select_triton(q: Tensor, k: Tensor, v: Tensor, state: Tensor, scale: float, n_sink: int, middle: int,
                  n_recent: int, *, num_splits: int | None = None, tile: int | None = None,
                  out: Tensor | None = None, selection: Tensor | None = None, block_cap: int = BLOCK_CAP,
                  launch: tuple[int, int, int] | None = None, poison: bool = False) -> SelectRun:
    """The Triton pipeline (module docstring), inputs already checked. block_cap: codes a row program holds at
    once (a power of two; smaller values exercise the multi-block loops); launch: optional (BLOCK_N, num_warps,
    num_stages) of the attention pass (benchmarks); poison: fill every intermediate buffer with garbage first
    (tests)."""
    if not (q.is_cuda or triton_interpreting()):
        raise ValueError("the Triton path needs CUDA tensors or TRITON_INTERPRET=1")
    B, H, _, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = H // Hkv
    n_fixed = n_sink + n_recent
    k_sel = min(middle, Lk)
    rows = B * H
    dev = q.device
    limit = kernel_unsupported(D, q.dtype)
    if limit:
        raise ValueError(f"the Triton kernel cannot take {limit}")

    # launch config of the attention pass: kernels/sparse_decode.py's every-key decode, with 8 warps at
    # BLOCK_D <= 128 (4 spill ~900 bytes per thread with the logits and tile maxima: ptxas, sm_90; untimed)
    BLOCK_D = max(16, triton.next_power_of_2(D))
    BLOCK_H = max(16, triton.next_power_of_2(G))
    BLOCK_N, num_warps, num_stages, per_sm = (128, 8, 2, 4) if BLOCK_D <= 128 else (32, 8, 3, 2)
    if not q.is_cuda:
        BLOCK_N = 16
    if launch is not None:
        BLOCK_N, num_warps, num_stages = launch
    TILE = choose_tile(Lk, k_sel, BLOCK_N) if tile is None else tile
    if TILE not in TILES or BLOCK_N % TILE:
        raise ValueError(f"tile must be one of {TILES} dividing BLOCK_N = {BLOCK_N}, got {tile!r}")
    if num_splits is None:
        num_splits = default_splits(B, Hkv, Lk, BLOCK_N, dev, per_sm)
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits must be an int >= 1, got {num_splits!r}")
    split_n = triton.cdiv(triton.cdiv(Lk, num_splits), BLOCK_N) * BLOCK_N
    num_splits = triton.cdiv(Lk, split_n)
    n_tiles = triton.cdiv(Lk, TILE)
    a_cap = TILE * k_sel  # slots for the logits > L (fewer than TILE * k of them)

    # buffers: one zeroed int32 scratch (candidate counts, forced count and keys, earliest-position table)
    scratch = torch.zeros(2 * rows + B + B * n_fixed + B * Lk, dtype=torch.int32, device=dev)
    count = scratch[: 2 * rows]
    n_forced = scratch[2 * rows: 2 * rows + B]
    fixed = scratch[2 * rows + B: 2 * rows + B + B * n_fixed].view(B, n_fixed)
    first = scratch[2 * rows + B + B * n_fixed:].view(B, Lk)
    if out is None:
        out = torch.empty((B, H, 1, D), dtype=q.dtype, device=dev)
    if selection is None:
        selection = torch.empty((B, n_fixed + middle), dtype=torch.int32, device=dev)
    logits = _empty((B, H, Lk), torch.float32, dev, poison)
    tmax = _empty((B, H, n_tiles), torch.int32, dev, poison)
    bound = _empty((rows,), torch.int32, dev, poison)
    cand = _empty((rows, a_cap + k_sel), torch.int64, dev, poison)
    BLOCK_K = triton.next_power_of_2(max(k_sel, 1))
    top = _empty((rows, BLOCK_K), torch.int64, dev, poison)
    seq = _empty((B, max(k_sel, 1) * H), torch.int32, dev, poison)  # (never empty: a kernel argument)
    levels = _empty((B, max(k_sel, 1)), torch.int32, dev, poison)
    one = num_splits == 1
    m_part = _empty((B, H, num_splits), torch.float32, dev, poison)
    l_part = _empty((B, H, num_splits), torch.float32, dev, poison)
    acc_part = _empty((B, H, num_splits, D), torch.float32, dev, poison)

    # 1. attention + logits + tile maxima + forced keys
    _attention_logits_kernel[(num_splits, Hkv, B)](
        q, k, v, state, logits, tmax, fixed, n_forced, out, m_part, l_part, acc_part,
        Lk, n_tiles, n_fixed, split_n, scale, scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(3),
        *k.stride(), *v.stride(), *state.stride(),
        logits.stride(0), logits.stride(1), tmax.stride(0), tmax.stride(1), fixed.stride(0),
        out.stride(0), out.stride(1), out.stride(3),
        *m_part.stride(), *acc_part.stride(),
        G=G, HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_H=BLOCK_H, BLOCK_N=BLOCK_N, TILE=TILE, HAS_FIXED=n_fixed > 0,
        ONE_SPLIT=one, IEEE_DOT=q.dtype == torch.float32, INTERPRET=not q.is_cuda,
        num_warps=num_warps, num_stages=num_stages,
    )
    if not one:
        _combine_kernel[(H, B)](
            m_part, l_part, acc_part, out, num_splits,
            *m_part.stride(), *acc_part.stride(), out.stride(0), out.stride(1), out.stride(3),
            HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_S=max(2, triton.next_power_of_2(num_splits)), num_warps=4,
        )

    if k_sel > 0:
        # 2. per head row: the bound L, then the candidates from the tiles whose maximum is >= L
        BLOCK_T = min(triton.next_power_of_2(n_tiles), block_cap)
        _bound_kernel[(rows,)](tmax, bound, n_tiles, k_sel, n_tiles, BLOCK=BLOCK_T,
                               NBLK=triton.cdiv(n_tiles, BLOCK_T), num_warps=16 if BLOCK_T >= 8192 else 8)
        TILES_PER = min(TAKE_TILES, triton.next_power_of_2(n_tiles))
        _take_kernel[(rows, triton.cdiv(n_tiles, TILES_PER))](
            logits, tmax, bound, cand, count, Lk, n_tiles, k_sel, a_cap, rows, Lk, n_tiles, cand.stride(0),
            TILE=TILE, TILES_PER=TILES_PER, num_warps=8,
        )
        # 3. per head row: its top k in rank order -> the sequence and the earliest-position table
        BLOCK_C = min(triton.next_power_of_2(a_cap + k_sel), block_cap)
        _rank_kernel[(rows,)](
            cand, count, top, seq, first, k_sel, a_cap, rows, H, cand.stride(0), top.stride(0), seq.stride(0),
            first.stride(0), BLOCK=BLOCK_C, NBLK=triton.cdiv(a_cap + k_sel, BLOCK_C), BLOCK_K=BLOCK_K,
            num_warps=16 if BLOCK_C >= 8192 else 8,
        )
    # 4. first occurrences per rank level, then the union's slots and the forced keys
    BLOCK_HH = triton.next_power_of_2(H)
    BLOCK_R = max(1, UNION_BLOCK // BLOCK_HH)
    if k_sel > 0:
        _levels_kernel[(triton.cdiv(k_sel, BLOCK_R), B)](
            seq, first, levels, k_sel, H, seq.stride(0), first.stride(0), levels.stride(0),
            BLOCK_R=BLOCK_R, BLOCK_HH=BLOCK_HH, num_warps=4,
        )
    if n_fixed + middle > 0:
        _union_kernel[(max(1, triton.cdiv(k_sel, BLOCK_R)), B)](
            seq, first, levels, fixed, selection, k_sel, middle, n_fixed, H, seq.stride(0), first.stride(0),
            levels.stride(0), fixed.stride(0), selection.stride(0),
            BLOCK_R=BLOCK_R, BLOCK_HH=BLOCK_HH, BLOCK_F=triton.next_power_of_2(max(n_fixed, 1)),
            HAS_FIXED=n_fixed > 0, num_warps=4,
        )
    head_top = seq[:, : k_sel * H].view(B, k_sel, H).transpose(1, 2)
    return SelectRun(out, selection, logits, head_top)


def lessismore_select(q: Tensor, k: Tensor, v: Tensor, visible: Tensor | None, scale: float, n_sink: int, middle: int,
                      n_recent: int, *, state: Tensor | None = None, impl: str = "auto",
                      num_splits: int | None = None, tile: int | None = None, out: Tensor | None = None,
                      selection: Tensor | None = None, launch: tuple[int, int, int] | None = None
                      ) -> tuple[Tensor, Tensor]:
    """Exact decode attention and LessIsMore's selection from one read of K/V (module docstring: shapes, design).

    impl: "auto" (Triton on CUDA, the reference elsewhere), "triton" (CUDA, or CPU under TRITON_INTERPRET=1),
    "reference". num_splits: None (by occupancy) or an int >= 1; tile: None (by shape) or one of TILES; launch:
    None or (BLOCK_N, num_warps, num_stages) of the attention pass (benchmarks).
    out: optional (B, H, 1, D) buffer in q's dtype, selection: optional (B, n_sink + n_recent + middle) int32
    buffer, both on q's device (written and returned).
    Returns (out (B, H, 1, D) in q's dtype, selection (B, n_sink + n_recent + middle) int32)."""
    check_inputs(q, k, v, visible, state, scale, n_sink, middle, n_recent)
    if impl not in ("auto", "triton", "reference"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'reference', got {impl!r}")
    B, H, _, D = q.shape
    size = n_sink + n_recent + middle
    if out is not None and (tuple(out.shape) != tuple(q.shape) or out.dtype != q.dtype or out.device != q.device):
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} on {q.device}, got {tuple(out.shape)} "
                         f"{out.dtype} on {out.device}")
    if selection is not None and (tuple(selection.shape) != (B, size) or selection.dtype != torch.int32
                                  or selection.device != q.device or not selection.is_contiguous()):
        raise ValueError(f"selection must be a contiguous (B, n_sink + n_recent + middle) = {(B, size)} int32 "
                         f"buffer on {q.device}, got {tuple(selection.shape)} {selection.dtype} on {selection.device}")
    if impl == "reference" or (impl == "auto" and not q.is_cuda):
        visible = state != 0 if visible is None else visible
        res_out, res_sel = lessismore_select_reference(q, k, v, visible, scale, n_sink, middle, n_recent)
        if out is not None:
            res_out = out.copy_(res_out)
        if selection is not None:
            res_sel = selection.copy_(res_sel)
        return res_out, res_sel
    if state is None:
        state = key_state(visible, n_sink, n_recent)
    run = select_triton(q, k, v, state.contiguous(), scale, n_sink, middle, n_recent, num_splits=num_splits,
                        tile=tile, out=out, selection=selection, launch=launch)
    return run.out, run.selection


# ---------------------------------------------------------------------------------------------
# reference
# ---------------------------------------------------------------------------------------------


def lessismore_select_reference(q: Tensor, k: Tensor, v: Tensor, visible: Tensor, scale: float, n_sink: int,
                                middle: int, n_recent: int) -> tuple[Tensor, Tensor]:
    """What `lessismore_select` must equal, in PyTorch: exact attention over the visible keys
    (kernels/sparse_decode.py's reference with every key listed) and the spec's selection from the float32 logits
    (kernels/lessismore.py: per-head torch.topk, union by rank, the forced keys by position)."""
    out = sparse_decode_reference(q, k, v, None, scale=scale, key_valid=visible)
    logits = decode_logits_reference(q, k, scale, visible)
    return out, select_from_logits(logits, visible, n_sink, middle, n_recent)
