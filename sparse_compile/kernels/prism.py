"""Prism block estimation in Triton: pooling, dual-band calibrated scores, top-p into block lists.

Three launches, nothing of size L x L (only (L / b)^2 block scores):

  1. `_prism_pool_kernel`, grid (cdiv(B * Hx * n_blocks, NB),), once for q and once for k: the mean of
     each block over its valid tokens (fp32) and the block's squared norm in the full head, the high
     band and the low band (for the energy calibration).
  2. `_prism_scores_kernel`, grid (cdiv(nq, BLOCK_QB), B * H): per (batch, head) the calibrated
     band temperatures, then both bands' block logits (tl.dot, tf32x3 on CUDA) and their log-sum-exp over
     the allowed key blocks (online, one pass).
  3. `_prism_select_kernel`, grid (cdiv(B * Hm * nq, BLOCK_M),): per query block, each band's
     probabilities, a top-p by an early-exit bisection over the fp32 bit patterns (no sort), the union
     (over the bands and, for per_kv_head, over the group's heads), the forced sink/recent
     blocks, and the compacted ascending list written straight into kv_num_blocks / kv_indices.

The reference these kernels equal (up to fp32 rounding at the top-p boundary) is
`select_blocks_reference` at the end of this file (also exported as `reference`);
`prism_select_triton` takes exactly its arguments. Allowed blocks follow
`sparse_compile.kernels.block_mask.allowed_blocks`; sinks and recent blocks `sink_block` and
`recent_blocks` below. This file imports nothing above `sparse_compile.kernels`.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from sparse_compile.kernels.block_mask import MaskStructure, _cdiv, allowed_blocks
from sparse_compile.kernels.device_constants import host_constant, on_device
from sparse_compile.kernels.limits import triton_interpreting
from sparse_compile.kernels.sampled_mass import (
    sampled_block_mass,
    sampled_block_mass_reference,
    sampled_mass_unsupported,
)

__all__ = ["prism_select_triton", "reference", "select_blocks_reference", "vertical_blocks"]

CALIBRATION_EPS = 1e-6  # clamp of the rms denominators (as the authors)
VERTICAL_CHUNK_BYTES = 1 << 29  # float32 logits of the vertical coverage held at once (512 MiB)
MIN_TEMPERATURE = 1e-12  # a band with no energy gives zero logits instead of 0 / 0

MAX_KV_BLOCKS = 8192  # one query block's row of key-block probabilities is held by one program
PRECISIONS = ("ieee", "tf32x3", "tf32")  # tl.dot input precisions of the band logits
# launch configuration (H100-tuned, KERNEL_NOTES.md "Prism estimation"); sizes are upper bounds,
# clipped to the problem: pool_elems elements (tokens x dims) per load step / pool_warps, scores
# tile of query x key blocks / scores_warps, select rows per program (at most select_elems /
# nk_pad) / select_warps, smallest causal bucket select_min_pad key blocks
DEFAULT_TUNING: dict[str, int] = {
    "pool_elems": 16384, "pool_warps": 8,
    "scores_qb": 64, "scores_kb": 64, "scores_warps": 4,
    "select_rows": 16, "select_elems": 1024, "select_warps": 2, "select_min_pad": 64,
}
RMS_EPS: tl.constexpr = tl.constexpr(CALIBRATION_EPS)
TEMPERATURE_FLOOR: tl.constexpr = tl.constexpr(MIN_TEMPERATURE)


@triton.jit
def _allowed_blocks(CUM_b, p0, p1, n, NK, LK, window, BLOCK: tl.constexpr, CAUSAL: tl.constexpr,
                    HAS_WINDOW: tl.constexpr, HAS_VALID: tl.constexpr):
    """Key blocks n holding a valid key visible to some query at positions [p0, p1] (broadcast)."""
    lo = n * BLOCK
    hi = tl.minimum(lo + BLOCK, LK) - 1
    if CAUSAL:
        hi = tl.minimum(hi, p1)
    if HAS_WINDOW:
        lo = tl.maximum(lo, p0 - window + 1)
    lo_c = tl.minimum(tl.maximum(lo, 0), LK)
    hi_c = tl.minimum(tl.maximum(hi + 1, 0), LK)
    ok = (hi_c > lo_c) & (n < NK)
    if HAS_VALID:
        # valid keys in [lo_c, hi_c) from the prefix sums of key_valid
        count = tl.load(CUM_b + hi_c, mask=ok, other=0) - tl.load(CUM_b + lo_c, mask=ok, other=0)
        ok = ok & (count > 0)
    return ok


@triton.jit
def _prism_pool_kernel(
    X, CUM, OUT, ENERGY, BAND,
    L, LK, pos_offset, H_X, n_blocks, n_rows,
    stride_xb, stride_xh, stride_xl, stride_xd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_eb, stride_eh, stride_en,
    stride_cb,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, NB: tl.constexpr,
    HAS_VALID: tl.constexpr,
):
    """OUT[b, h, blk] = mean of X[b, h, tokens of blk] over the valid tokens; ENERGY[b, h, blk, :3]
    = the squared norms (full head, high band, low band) of that mean. One program pools NB
    blocks of the flattened (b, h, blk) index."""
    tl.static_assert(BLOCK % ROWS == 0, "ROWS must divide BLOCK")
    r = tl.program_id(0).to(tl.int64) * NB + tl.arange(0, NB)
    r_ok = r < n_rows
    blk = r % n_blocks
    b = (r // n_blocks) // H_X
    h = (r // n_blocks) % H_X
    d = tl.arange(0, D_PAD)
    d_ok = d < D
    x_base = X + b * stride_xb + h * stride_xh
    acc = tl.zeros([NB, D_PAD], dtype=tl.float32)
    count = tl.zeros([NB, ROWS], dtype=tl.int32)
    # step 1: sum each block's valid tokens, ROWS at a time
    for r0 in tl.static_range(0, BLOCK, ROWS):
        tok = blk[:, None] * BLOCK + r0 + tl.arange(0, ROWS)[None, :]  # (NB, ROWS)
        valid = (tok < L) & r_ok[:, None]
        if HAS_VALID:
            pos = tok + pos_offset
            inside = valid & (pos >= 0) & (pos < LK)
            pos_c = tl.minimum(tl.maximum(pos, 0), LK - 1)
            cum_b = CUM + b[:, None] * stride_cb
            # key_valid[pos] = cum[pos + 1] - cum[pos]; positions outside the keys count as valid
            is_valid = tl.load(cum_b + pos_c + 1, mask=inside, other=1) - tl.load(cum_b + pos_c, mask=inside, other=0)
            valid = valid & (is_valid > 0)
        x_ptrs = x_base[:, None, None] + tok[:, :, None] * stride_xl + d[None, None, :] * stride_xd
        x = tl.load(x_ptrs, mask=valid[:, :, None] & d_ok[None, None, :], other=0.0).to(tl.float32)
        acc += tl.sum(x, axis=1)
        count += valid.to(tl.int32)
    # step 2: the means (zeros for a block without valid tokens)
    mean = acc / tl.maximum(tl.sum(count, axis=1), 1).to(tl.float32)[:, None]
    o_ptrs = OUT + (b * stride_ob + h * stride_oh + blk * stride_on)[:, None] + d[None, :] * stride_od
    tl.store(o_ptrs, mean, mask=r_ok[:, None] & d_ok[None, :])
    # step 3: squared norms per band (BAND bit 0: high band, bit 1: low band)
    band = tl.load(BAND + d, mask=d_ok, other=0)[None, :]
    sq = mean * mean
    e_ptr = ENERGY + b * stride_eb + h * stride_eh + blk * stride_en
    tl.store(e_ptr + 0, tl.sum(sq, axis=1), mask=r_ok)
    tl.store(e_ptr + 1, tl.sum(tl.where((band & 1) != 0, sq, 0.0), axis=1), mask=r_ok)
    tl.store(e_ptr + 2, tl.sum(tl.where((band & 2) != 0, sq, 0.0), axis=1), mask=r_ok)


@triton.jit
def _prism_scores_kernel(
    QP, KP, QE, KE, HIGH_IDX, LOW_IDX, CUM, LOGITS, LSE,
    nq, nk, n_max, LQ, LK, q_offset, window, temperature_high, temperature_low, sqrt_high, sqrt_low, H, G,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_qeb, stride_qeh, stride_qen,
    stride_keb, stride_keh, stride_ken,
    stride_lb, stride_lh, stride_lband, stride_lm, stride_ln,
    stride_sb, stride_sh, stride_sband, stride_sm,
    stride_cb,
    D: tl.constexpr, N_HIGH: tl.constexpr, N_LOW: tl.constexpr, HIGH_PAD: tl.constexpr, LOW_PAD: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_QB: tl.constexpr, BLOCK_KB: tl.constexpr, ECHUNK: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_VALID: tl.constexpr, CALIBRATE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """LOGITS[b, h, band, m, n] = band logits of query block m and key block n (only the allowed
    entries are written and meaningful: key tiles wholly past the causal frontier or before the
    window of this program's query blocks are skipped); LSE[b, h, band, m] = their log-sum-exp over
    the allowed key blocks. PRECISION: tl.dot's input_precision ("ieee", "tf32x3" or "tf32")."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // G  # the KV head this query head reads
    # step 3: band temperatures, calibrated from the pooled energies of all blocks of (b, h)
    if CALIBRATE:
        acc_q = tl.zeros([ECHUNK, 4], dtype=tl.float32)
        acc_k = tl.zeros([ECHUNK, 4], dtype=tl.float32)
        col = tl.arange(0, 4)
        i0 = 0
        while i0 < n_max:  # (while: runtime-bound for-loops break the interpreter with numpy >= 2.4)
            i = i0 + tl.arange(0, ECHUNK)
            # columns of ENERGY: squared norm in the full head, the high band, the low band
            acc_q += tl.load(QE + b * stride_qeb + h * stride_qeh + i[:, None] * stride_qen + col[None, :],
                             mask=(i < nq)[:, None] & (col < 3)[None, :], other=0.0)
            acc_k += tl.load(KE + b * stride_keb + hk * stride_keh + i[:, None] * stride_ken + col[None, :],
                             mask=(i < nk)[:, None] & (col < 3)[None, :], other=0.0)
            i0 += ECHUNK
        e_q = tl.sum(acc_q, axis=0)
        e_k = tl.sum(acc_k, axis=0)
        qf = tl.sum(tl.where(col == 0, e_q, 0.0), axis=0)
        qh_e = tl.sum(tl.where(col == 1, e_q, 0.0), axis=0)
        ql_e = tl.sum(tl.where(col == 2, e_q, 0.0), axis=0)
        kf = tl.sum(tl.where(col == 0, e_k, 0.0), axis=0)
        kh_e = tl.sum(tl.where(col == 1, e_k, 0.0), axis=0)
        kl_e = tl.sum(tl.where(col == 2, e_k, 0.0), axis=0)
        rq = tl.maximum(tl.sqrt(qf / (nq * D)), RMS_EPS)
        rk = tl.maximum(tl.sqrt(kf / (nk * D)), RMS_EPS)
        # t = sqrt(n_band / D) * (rms(q_band) / rms(q)) * (rms(k_band) / rms(k))
        t_high = tl.sqrt(qh_e / (nq * N_HIGH) * (kh_e / (nk * N_HIGH)) * N_HIGH / D) / (rq * rk)
        t_low = tl.sqrt(ql_e / (nq * N_LOW) * (kl_e / (nk * N_LOW)) * N_LOW / D) / (rq * rk)
    else:
        t_high = temperature_high
        t_low = temperature_low
    inv_high = 1.0 / (sqrt_high * tl.maximum(t_high, TEMPERATURE_FLOOR))
    inv_low = 1.0 / (sqrt_low * tl.maximum(t_low, TEMPERATURE_FLOOR))

    # step 2: this program's query blocks, gathered into the two bands
    m = pid_m * BLOCK_QB + tl.arange(0, BLOCK_QB)
    m_ok = m < nq
    dh = tl.arange(0, HIGH_PAD)
    dl = tl.arange(0, LOW_PAD)
    idx_h = tl.load(HIGH_IDX + dh, mask=dh < N_HIGH, other=0)
    idx_l = tl.load(LOW_IDX + dl, mask=dl < N_LOW, other=0)
    q_base = QP + b * stride_qb + h * stride_qh + m[:, None] * stride_qn
    q_high = tl.load(q_base + idx_h[None, :] * stride_qd, mask=m_ok[:, None] & (dh < N_HIGH)[None, :], other=0.0)
    q_low = tl.load(q_base + idx_l[None, :] * stride_qd, mask=m_ok[:, None] & (dl < N_LOW)[None, :], other=0.0)
    p0 = (q_offset + m * BLOCK)[:, None]
    p1 = (q_offset + tl.minimum((m + 1) * BLOCK, LQ) - 1)[:, None]

    # step 4: logits per key tile, online max / sum of exp over allowed blocks
    max_h = tl.full([BLOCK_QB], -1.0e30, dtype=tl.float32)
    max_l = tl.full([BLOCK_QB], -1.0e30, dtype=tl.float32)
    sum_h = tl.zeros([BLOCK_QB], dtype=tl.float32)
    sum_l = tl.zeros([BLOCK_QB], dtype=tl.float32)
    k_base = KP + b * stride_kb + hk * stride_kh
    l_base = LOGITS + b * stride_lb + h * stride_lh + m[:, None] * stride_lm
    # key tiles that can hold an allowed block of some query block of this program
    n_end = nk
    if CAUSAL:
        last_pos = q_offset + tl.minimum((pid_m + 1) * BLOCK_QB * BLOCK, LQ) - 1
        n_end = tl.minimum(nk, last_pos // BLOCK + 1)
    n0 = 0
    if HAS_WINDOW:
        first_pos = q_offset + pid_m * BLOCK_QB * BLOCK - window + 1
        n0 = tl.maximum(first_pos, 0) // BLOCK // BLOCK_KB * BLOCK_KB
    while n0 < n_end:
        n = n0 + tl.arange(0, BLOCK_KB)
        n_ok = n < nk
        k_high = tl.load(k_base + n[None, :] * stride_kn + idx_h[:, None] * stride_kd,
                         mask=(dh < N_HIGH)[:, None] & n_ok[None, :], other=0.0)
        k_low = tl.load(k_base + n[None, :] * stride_kn + idx_l[:, None] * stride_kd,
                        mask=(dl < N_LOW)[:, None] & n_ok[None, :], other=0.0)
        logit_h = tl.dot(q_high, k_high, input_precision=PRECISION) * inv_high
        logit_l = tl.dot(q_low, k_low, input_precision=PRECISION) * inv_low
        ok = _allowed_blocks(CUM + b * stride_cb, p0, p1, n[None, :], nk, LK, window, BLOCK, CAUSAL, HAS_WINDOW,
                             HAS_VALID)
        ok = ok & m_ok[:, None]
        store_ok = m_ok[:, None] & n_ok[None, :]
        tl.store(l_base + n[None, :] * stride_ln, logit_h, mask=store_ok)
        tl.store(l_base + stride_lband + n[None, :] * stride_ln, logit_l, mask=store_ok)
        new_h = tl.maximum(max_h, tl.max(tl.where(ok, logit_h, -1.0e30), axis=1))
        new_l = tl.maximum(max_l, tl.max(tl.where(ok, logit_l, -1.0e30), axis=1))
        exp_h = tl.exp(tl.where(ok, logit_h - new_h[:, None], -float("inf")))
        exp_l = tl.exp(tl.where(ok, logit_l - new_l[:, None], -float("inf")))
        sum_h = sum_h * tl.exp(max_h - new_h) + tl.sum(exp_h, axis=1)
        sum_l = sum_l * tl.exp(max_l - new_l) + tl.sum(exp_l, axis=1)
        max_h = new_h
        max_l = new_l
        n0 += BLOCK_KB
    s_base = LSE + b * stride_sb + h * stride_sh + m * stride_sm
    # (a row without allowed blocks gets a finite dummy: select never reads it)
    tl.store(s_base, max_h + tl.log(tl.maximum(sum_h, 1.0e-30)), mask=m_ok)
    tl.store(s_base + stride_sband, max_l + tl.log(tl.maximum(sum_l, 1.0e-30)), mask=m_ok)


@triton.jit
def _top_p(p, ok, threshold, BLOCK_M: tl.constexpr):
    """Blocks kept by top-p in each row: ranked by probability (desc, ties by lower index), a
    block is kept while the mass ranked before it is < threshold. p: (BLOCK_M, NK_PAD) fp32, zero
    where not ok. Returns (BLOCK_M, NK_PAD) bool.

    A threshold search instead of a sort: over the fp32 bit patterns x of the probabilities
    (non-negative floats order like their bits), the mass G(x) of the blocks above x falls as x
    grows. The bisection keeps lo, hi with G(lo) >= threshold > G(hi) and the counts of blocks
    above each; the cut z (the largest x with G(x) >= threshold) lies in [lo, hi). Early exit:
    once a row has the same count above lo and above hi, no value lies in (lo, hi], so the kept
    set {bits > z} = {bits > lo} is final. The loop runs until every row of the program has
    converged: about log2(range / gap between the values near the cut) steps, 31 at most. Then
    the group tied at the smallest kept value is cut in index order (a scan only when a row of the
    program has such ties).
    """
    bits = tl.where(ok, p.to(tl.int32, bitcast=True), -1)  # blocks not allowed are never "above"
    lo = tl.full([BLOCK_M], -1, tl.int32)
    hi = tl.max(bits, axis=1)  # G(row max) = 0 < threshold (threshold <= 0: nothing kept, below)
    cnt_lo = tl.sum(ok.to(tl.int32), axis=1)
    cnt_hi = tl.zeros([BLOCK_M], dtype=tl.int32)
    open_rows = tl.max(((cnt_lo != cnt_hi) & (hi - lo > 1)).to(tl.int32), axis=0)
    while open_rows > 0:
        mid = lo + (hi - lo) // 2
        above = bits > mid[:, None]
        mass_above = tl.sum(tl.where(above, p, 0.0), axis=1)
        cnt_above = tl.sum(above.to(tl.int32), axis=1)
        at_or_above_cut = mass_above >= threshold
        lo = tl.where(at_or_above_cut, mid, lo)
        cnt_lo = tl.where(at_or_above_cut, cnt_above, cnt_lo)
        hi = tl.where(at_or_above_cut, hi, mid)
        cnt_hi = tl.where(at_or_above_cut, cnt_hi, cnt_above)
        open_rows = tl.max(((cnt_lo != cnt_hi) & (hi - lo > 1)).to(tl.int32), axis=0)
    kept = bits > lo[:, None]
    # ties at the smallest kept value v: mass before = G(v) + (rank among the tied) * v
    v_min = tl.min(tl.where(kept, p, float("inf")), axis=1)[:, None]
    tied = kept & (p == v_min)
    if tl.max(tl.sum(tied.to(tl.int32), axis=1), axis=0) > 1:
        tie_rank = tl.cumsum(tied.to(tl.int32), axis=1) - 1
        mass_gt = tl.sum(tl.where(p > v_min, p, 0.0), axis=1)[:, None]
        kept = kept & ((~tied) | (mass_gt + tie_rank.to(tl.float32) * v_min < threshold))
    return ok & ((kept & (threshold > 0.0)) | (threshold >= 1.0))


@triton.jit
def _prism_select_kernel(
    LOGITS, LSE, CUM, SINK, KV_NUM, KV_IDX,
    nq, nk, LQ, LK, q_offset, window, threshold_high, threshold_low, Hm, n_rows, m_start, m_span,
    stride_lb, stride_lh, stride_lband, stride_lm, stride_ln,
    stride_sb, stride_sh, stride_sband, stride_sm,
    stride_cb,
    stride_nb, stride_nh, stride_nm,
    stride_ib, stride_ih, stride_im, stride_in,
    BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, NK_PAD: tl.constexpr, G_SEL: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_VALID: tl.constexpr, FORCE_SINK: tl.constexpr,
    FORCE_RECENT: tl.constexpr, ANY_FULL: tl.constexpr,
):
    """kv_num_blocks[b, hm, m] and kv_indices[b, hm, m, :count] (ascending) for BLOCK_M rows of
    the flattened (b, hm, m - m_start) index, m in [m_start, m_start + m_span): one launch per
    range of query blocks whose allowed key blocks all lie below NK_PAD (causal buckets)."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = r < n_rows
    m = m_start + r % m_span
    b = (r // m_span) // Hm
    hm = (r // m_span) % Hm
    n = tl.arange(0, NK_PAD)[None, :]
    p0 = (q_offset + m * BLOCK)[:, None]
    p1 = (q_offset + tl.minimum((m + 1) * BLOCK, LQ) - 1)[:, None]
    cum_b = CUM + (b * stride_cb)[:, None]
    ok = _allowed_blocks(cum_b, p0, p1, n, nk, LK, window, BLOCK, CAUSAL, HAS_WINDOW, HAS_VALID) & r_ok[:, None]
    # steps 5-6: top-p of each band of each head of the group, united
    selected = ok & (n < 0)
    for g in tl.static_range(G_SEL):
        h = hm * G_SEL + g
        l_ptr = LOGITS + (b * stride_lb + h * stride_lh + m * stride_lm)[:, None] + n * stride_ln
        s_ptr = LSE + b * stride_sb + h * stride_sh + m * stride_sm
        lse_h = tl.load(s_ptr, mask=r_ok, other=0.0)[:, None]
        lse_l = tl.load(s_ptr + stride_sband, mask=r_ok, other=0.0)[:, None]
        prob_h = tl.exp(tl.where(ok, tl.load(l_ptr, mask=ok, other=0.0) - lse_h, -float("inf")))
        prob_l = tl.exp(tl.where(ok, tl.load(l_ptr + stride_lband, mask=ok, other=0.0) - lse_l, -float("inf")))
        selected = selected | _top_p(prob_h, ok, threshold_high, BLOCK_M)
        selected = selected | _top_p(prob_l, ok, threshold_low, BLOCK_M)
    # a query block of padding only keeps just the forced blocks (unless a threshold is 1)
    if HAS_VALID and not ANY_FULL:
        lo = tl.minimum(tl.maximum(p0, 0), LK)
        hi = tl.minimum(tl.maximum(p1 + 1, 0), LK)
        outside = (p0 < 0) | (p1 >= LK)
        n_valid = tl.load(cum_b + hi, mask=r_ok[:, None], other=0) - tl.load(cum_b + lo, mask=r_ok[:, None], other=0)
        selected = selected & (outside | (n_valid > 0))
    # step 6: forced blocks: the sink (block of the first valid key), the blocks holding the query
    # block's own positions and the most recent allowed block
    if FORCE_SINK:
        sink = tl.load(SINK + b, mask=r_ok, other=0)[:, None]
        selected = selected | (ok & (n == sink))
    if FORCE_RECENT:
        last = tl.max(tl.where(ok, n, -1), axis=1)[:, None]
        own = (n >= p0 // BLOCK) & (n <= p1 // BLOCK)
        selected = selected | (ok & (own | (n == last)))
    # step 7: compact each row into an ascending list
    slot = tl.cumsum(selected.to(tl.int32), axis=1) - 1
    row = (b * stride_ib + hm * stride_ih + m * stride_im)[:, None]
    tl.store(KV_IDX + row + slot * stride_in, n.to(tl.int32) + slot * 0, mask=selected)
    count = tl.sum(selected.to(tl.int32), axis=1)
    tl.store(KV_NUM + b * stride_nb + hm * stride_nh + m * stride_nm, count, mask=r_ok)


def _check_inputs(q: Tensor, k: Tensor, high_idx: Tensor, low_idx: Tensor, mask: MaskStructure, block_size: int):
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be 4-D (B, H, L, D); got shapes {tuple(q.shape)} and {tuple(k.shape)}")
    B, H, Lq, D = q.shape
    Bk, Hkv, Lk, Dk = k.shape
    if (Bk, Dk) != (B, D):
        raise ValueError(f"k shape {tuple(k.shape)} does not match q shape {tuple(q.shape)} in batch/head_dim")
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"num_heads {H} is not a multiple of num_kv_heads {Hkv}")
    if Lq == 0 or Lk == 0:
        raise ValueError(f"empty sequence: q_len {Lq}, kv_len {Lk}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype:
        raise ValueError(f"q/k dtype must be one of float16/bfloat16/float32 and equal; got {q.dtype}/{k.dtype}")
    if k.device != q.device:
        raise ValueError(f"q is on {q.device} but k is on {k.device}")
    if not q.is_cuda and not triton_interpreting():
        raise ValueError(f"prism_select_triton needs CUDA tensors (got {q.device}); use the reference on CPU")
    if block_size < 2 or block_size & (block_size - 1) or block_size > 256:
        raise ValueError(f"block_size must be a power of two in [2, 256], got {block_size}")
    nk = -(-Lk // block_size)
    if nk > MAX_KV_BLOCKS:
        raise ValueError(f"kv_len {Lk} gives {nk} key blocks of {block_size}; at most {MAX_KV_BLOCKS} are supported")
    for name, idx in (("high_idx", high_idx), ("low_idx", low_idx)):
        if idx.dim() != 1 or idx.numel() == 0 or idx.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be a non-empty 1-D integer tensor, got {idx.dtype} {tuple(idx.shape)}")
        if int(idx.min()) < 0 or int(idx.max()) >= D:
            raise ValueError(f"{name} holds dims outside [0, head_dim={D})")
    if mask.dense_mask is not None:
        raise ValueError("mask.dense_mask is set: Prism selection needs a structured mask (run exact attention)")
    if mask.q_offset < 0 or mask.window < 0:
        raise ValueError(f"mask.q_offset ({mask.q_offset}) and mask.window ({mask.window}) must be >= 0")
    if mask.key_valid is not None and (tuple(mask.key_valid.shape) != (B, Lk) or mask.key_valid.dtype != torch.bool):
        raise ValueError(f"mask.key_valid must be a (B, Lk) = ({B}, {Lk}) bool tensor, got "
                         f"{mask.key_valid.dtype} {tuple(mask.key_valid.shape)}")


def prism_select_triton(
    q: Tensor,
    k: Tensor,
    high_idx: Tensor,
    low_idx: Tensor,
    mask: MaskStructure,
    *,
    block_size: int,
    threshold_high: float,
    threshold_low: float,
    temperature_high: float | None,
    temperature_low: float | None,
    force_sink: bool = True,
    force_recent: bool = True,
    per_kv_head: bool = False,
    precision: str = "auto",
    tuning: dict[str, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Prism block lists with the Triton kernels; the arguments of `reference` (select_blocks_reference).

    q: (B, H, Lq, D), k: (B, Hkv, Lk, D), fp16/bf16/fp32, any strides, CUDA (or the Triton
    interpreter). high_idx / low_idx: 1-D int band dims. temperature_* None: energy calibration.
    precision: input precision of the band-logit dots, one of PRECISIONS; "auto" = "tf32x3" on
    CUDA (tensor cores, fp32-level error: PRISM_NOTES.md) and "ieee" under the interpreter.
    tuning: overrides of the launch configuration (keys of DEFAULT_TUNING; benchmarks only).
    Returns kv_num_blocks (B, Hm, nq) int32 and kv_indices (B, Hm, nq, nk) int32 (ascending,
    entries past the count undefined), Hm = Hkv if per_kv_head else H.
    """
    _check_inputs(q, k, high_idx, low_idx, mask, block_size)
    if precision == "auto":
        precision = "tf32x3" if q.is_cuda else "ieee"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be 'auto' or one of {PRECISIONS}, got {precision!r}")
    unknown = set(tuning or {}) - set(DEFAULT_TUNING)
    if unknown:
        raise ValueError(f"unknown tuning keys {sorted(unknown)}; allowed: {sorted(DEFAULT_TUNING)}")
    tune = {**DEFAULT_TUNING, **(tuning or {})}
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = H // Hkv
    Hm = Hkv if per_kv_head else H
    nq, nk = triton.cdiv(Lq, block_size), triton.cdiv(Lk, block_size)
    dev = q.device
    f32 = torch.float32

    # inputs of the kernels: band dims and membership, key-validity prefix sums, sink blocks
    high_idx, low_idx, band = band_tables(high_idx, low_idx, D, dev)
    has_valid = mask.key_valid is not None
    if has_valid:
        cum = torch.zeros(B, Lk + 1, dtype=torch.int32, device=dev)
        cum[:, 1:] = mask.key_valid.to(torch.int32).cumsum(-1)
        sink = (torch.argmax(mask.key_valid.to(torch.int32), dim=1) // block_size).to(torch.int32)
    else:
        cum = torch.zeros(B, 1, dtype=torch.int32, device=dev)
        sink = torch.zeros(B, dtype=torch.int32, device=dev)

    # 1. pooling (fp32 means) and block energies, for q (positions q_offset + i) and k
    d_pad = triton.next_power_of_2(D)
    rows = min(block_size, max(1, tune["pool_elems"] // d_pad))
    pooled = {}
    for name, x, pos_offset in (("q", q, mask.q_offset), ("k", k, 0)):
        n_blocks = triton.cdiv(x.shape[2], block_size)
        n_rows = B * x.shape[1] * n_blocks
        nb = max(1, min(triton.next_power_of_2(n_rows), tune["pool_elems"] // (rows * d_pad)))  # blocks per program
        out = torch.empty(B, x.shape[1], n_blocks, D, dtype=f32, device=dev)
        energy = torch.empty(B, x.shape[1], n_blocks, 4, dtype=f32, device=dev)
        _prism_pool_kernel[(triton.cdiv(n_rows, nb),)](
            x, cum, out, energy, band,
            x.shape[2], Lk, pos_offset, x.shape[1], n_blocks, n_rows,
            *x.stride(), *out.stride(), *energy.stride()[:3], cum.stride(0),
            D=D, D_PAD=d_pad, BLOCK=block_size, ROWS=rows, NB=nb, HAS_VALID=has_valid, num_warps=tune["pool_warps"],
        )
        pooled[name] = (out, energy)
    (q_pool, q_energy), (k_pool, k_energy) = pooled["q"], pooled["k"]

    # 2. band logits and their log-sum-exp over allowed key blocks
    n_high, n_low = high_idx.numel(), low_idx.numel()
    logits = torch.empty(B, H, 2, nq, nk, dtype=f32, device=dev)
    lse = torch.empty(B, H, 2, nq, dtype=f32, device=dev)
    calibrate = temperature_high is None or temperature_low is None
    block_qb = max(16, min(tune["scores_qb"], triton.next_power_of_2(nq)))
    block_kb = max(16, min(tune["scores_kb"], triton.next_power_of_2(nk)))
    _prism_scores_kernel[(triton.cdiv(nq, block_qb), B * H)](
        q_pool, k_pool, q_energy, k_energy, high_idx, low_idx, cum, logits, lse,
        nq, nk, max(nq, nk), Lq, Lk, mask.q_offset, mask.window,
        1.0 if temperature_high is None else float(temperature_high),
        1.0 if temperature_low is None else float(temperature_low),
        math.sqrt(n_high), math.sqrt(n_low), H, G,
        *q_pool.stride(), *k_pool.stride(), *q_energy.stride()[:3], *k_energy.stride()[:3],
        *logits.stride(), *lse.stride(), cum.stride(0),
        D=D, N_HIGH=n_high, N_LOW=n_low,
        HIGH_PAD=max(16, triton.next_power_of_2(n_high)), LOW_PAD=max(16, triton.next_power_of_2(n_low)),
        BLOCK=block_size, BLOCK_QB=block_qb, BLOCK_KB=block_kb, ECHUNK=256,
        CAUSAL=mask.causal, HAS_WINDOW=mask.window > 0, HAS_VALID=has_valid, CALIBRATE=calibrate,
        PRECISION=precision, num_warps=tune["scores_warps"],
    )

    # 3. top-p per band, union, forced blocks, compacted lists; one launch per causal bucket
    kv_num_blocks = torch.empty(B, Hm, nq, dtype=torch.int32, device=dev)
    kv_indices = torch.empty(B, Hm, nq, nk, dtype=torch.int32, device=dev)
    for m_start, m_end, nk_pad in _select_buckets(nq, nk, Lq, mask.q_offset, block_size, mask.causal,
                                                  tune["select_min_pad"]):
        n_rows = B * Hm * (m_end - m_start)
        if q.is_cuda:  # rows per program: few, so the bisection's row reductions stay short
            block_m = max(1, min(tune["select_rows"], tune["select_elems"] // nk_pad, triton.next_power_of_2(n_rows)))
        else:  # the interpreter's cost is per operation: many rows per program
            block_m = max(1, min(64, 4096 // nk_pad, triton.next_power_of_2(n_rows)))
        _prism_select_kernel[(triton.cdiv(n_rows, block_m),)](
            logits, lse, cum, sink, kv_num_blocks, kv_indices,
            nq, nk, Lq, Lk, mask.q_offset, mask.window, float(threshold_high), float(threshold_low),
            Hm, n_rows, m_start, m_end - m_start,
            *logits.stride(), *lse.stride(), cum.stride(0), *kv_num_blocks.stride(), *kv_indices.stride(),
            BLOCK=block_size, BLOCK_M=block_m, NK_PAD=nk_pad, G_SEL=G if per_kv_head else 1,
            CAUSAL=mask.causal, HAS_WINDOW=mask.window > 0, HAS_VALID=has_valid, FORCE_SINK=force_sink,
            FORCE_RECENT=force_recent, ANY_FULL=max(threshold_high, threshold_low) >= 1.0,
            num_warps=tune["select_warps"],
        )
    return kv_num_blocks, kv_indices


def band_tables(high_idx: Tensor, low_idx: Tensor, head_dim: int,
                device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(high_idx (n_high,) int32, low_idx (n_low,) int32, band (head_dim,) int32) on `device`; band[d] has
    bit 0 set iff d is a high-band dim and bit 1 iff a low-band dim.

    Built once per band layout on the host (memoised, page-locked) and copied asynchronously per call: a copy
    a CUDA graph can capture (`device_constants`). Host band dims (what the Prism method passes) cost no
    device sync; device band dims are read back once per call (as `_check_inputs` already does).
    """
    tables = host_band_tables(tuple(high_idx.tolist()), tuple(low_idx.tolist()), head_dim)
    return tuple(on_device(t, device) for t in tables)


@functools.lru_cache(maxsize=256)
def host_band_tables(high: tuple[int, ...], low: tuple[int, ...], head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """`band_tables` on the host for band dims given as tuples (memoised, page-locked when CUDA is available)."""
    band = torch.zeros(head_dim, dtype=torch.int32)
    band[list(high)] |= 1
    band[list(low)] |= 2
    return (host_constant(torch.tensor(high, dtype=torch.int32)), host_constant(torch.tensor(low, dtype=torch.int32)),
            host_constant(band))


def _select_buckets(nq: int, nk: int, Lq: int, q_offset: int, block_size: int, causal: bool,
                    min_pad: int) -> list[tuple[int, int, int]]:
    """(m_start, m_end, nk_pad) ranges of query blocks for the select launches.

    Causal: query block m sees key blocks < min(nk, (q_offset + min((m+1) b, Lq) - 1) // b + 1),
    which grows with m; each range gets the smallest power of two >= min_pad covering its last
    row, so early rows do not scan the masked half of the (nq, nk) square (128K: 1024 key blocks,
    buckets 64/128/256/512/1024 cut the select work by ~30%). Non-causal: one range.
    """
    full = max(2, triton.next_power_of_2(nk))
    if not causal:
        return [(0, nq, full)]

    def frontier(m: int) -> int:
        return min(nk, (q_offset + min((m + 1) * block_size, Lq) - 1) // block_size + 1)

    buckets = []
    m_start = 0
    while m_start < nq:
        pad = min(full, max(2, min_pad, triton.next_power_of_2(frontier(m_start))))
        m_end = m_start + 1
        while m_end < nq and frontier(m_end) <= pad:
            m_end += 1
        buckets.append((m_start, m_end, pad))
        m_start = m_end
    return buckets


def estimation_flops(B: int, H: int, Lq: int, Lk: int, block_size: int, n_high: int, n_low: int) -> float:
    """FLOPs of the band logits (2 per multiply-add): 2 * B * H * nq * nk * (n_high + n_low)."""
    return 2.0 * B * H * math.ceil(Lq / block_size) * math.ceil(Lk / block_size) * (n_high + n_low)


# ---------------------------------------------------------------------------------------------
# The reference: Prism's selection in plain PyTorch (float64 by default), which the kernels above equal
# ---------------------------------------------------------------------------------------------


def key_valid_or_ones(mask: MaskStructure, batch: int, kv_len: int, device) -> Tensor:
    """(B, Lk) bool: mask.key_valid, or all True."""
    if mask.key_valid is None:
        return torch.ones(batch, kv_len, dtype=torch.bool, device=device)
    return mask.key_valid.to(device=device, dtype=torch.bool)


def query_valid(mask: MaskStructure, key_valid: Tensor, q_len: int) -> Tensor:
    """(B, Lq) bool: query i is a padding token iff its position q_offset + i is a padded key.

    Positions outside [0, Lk) count as valid.
    """
    B, Lk = key_valid.shape
    pos = torch.arange(q_len, device=key_valid.device) + mask.q_offset
    inside = (pos >= 0) & (pos < Lk)
    gathered = key_valid[:, pos.clamp(0, max(Lk - 1, 0))]
    return torch.where(inside[None, :], gathered, torch.ones_like(gathered))


def sink_block(key_valid: Tensor, block_size: int) -> Tensor:
    """(B,) int64: the block of the first valid key of each batch row (0 when none is valid)."""
    first = torch.argmax(key_valid.to(torch.int32), dim=1)  # first True (0 when none)
    return first // block_size


def recent_blocks(mask: MaskStructure, allowed: Tensor, q_len: int, block_size: int) -> Tensor:
    """(B, nq, nk) bool: the blocks holding the positions of the block's own queries, plus the last
    allowed block (the most recent visible one), restricted to allowed blocks."""
    B, nq, nk = allowed.shape
    dev = allowed.device
    m = torch.arange(nq, device=dev)
    n = torch.arange(nk, device=dev)
    p0 = mask.q_offset + m * block_size
    p1 = mask.q_offset + torch.clamp((m + 1) * block_size, max=q_len) - 1
    own = (n[None, :] >= torch.div(p0, block_size, rounding_mode="floor")[:, None]) & (
        n[None, :] <= torch.div(p1, block_size, rounding_mode="floor")[:, None]
    )
    last = torch.where(allowed, n, -1).amax(-1, keepdim=True)  # (B, nq, 1)
    return allowed & (own[None] | (n == last))


def local_blocks(mask: MaskStructure, allowed: Tensor, q_len: int, block_size: int, window: int) -> Tensor:
    """(B, nq, nk) bool: the key blocks holding the `window` positions before each query block's first query
    (what a query at the start of a block reads most and block-level estimates weigh by 1/b), restricted to
    allowed blocks. window 0: none."""
    B, nq, nk = allowed.shape
    if window <= 0:
        return torch.zeros_like(allowed)
    dev = allowed.device
    p0 = mask.q_offset + torch.arange(nq, device=dev) * block_size  # first query position of each block
    lo = torch.div((p0 - window).clamp(min=0), block_size, rounding_mode="floor")
    hi = torch.div((p0 - 1).clamp(min=0), block_size, rounding_mode="floor")
    n = torch.arange(nk, device=dev)
    near = (n[None, :] >= lo[:, None]) & (n[None, :] <= hi[:, None]) & (p0 > 0)[:, None]
    return allowed & near[None]


def pool_blocks(x: Tensor, valid: Tensor, block_size: int, dtype: torch.dtype) -> Tensor:
    """Mean over the valid tokens of each block.

    x: (B, Hx, L, D); valid: (B, L) bool. Returns (B, Hx, ceil(L / b), D) in `dtype`;
    a block without valid tokens pools to zeros.
    """
    B, Hx, L, D = x.shape
    n = _cdiv(L, block_size)
    pad = n * block_size - L
    xw = torch.nn.functional.pad(x.to(dtype), (0, 0, 0, pad))
    vw = torch.nn.functional.pad(valid, (0, pad))  # padding rows are invalid
    xw = xw * vw[:, None, :, None].to(dtype)
    sums = xw.view(B, Hx, n, block_size, D).sum(3)
    counts = vw.view(B, n, block_size).sum(-1).clamp_min(1).to(dtype)
    return sums / counts[:, None, :, None]


def band_temperature(qb: Tensor, kb: Tensor, idx: Tensor) -> Tensor:
    """Energy-calibrated temperature of one band, (B, H, 1, 1).

    qb: (B, H, nq, D), kb: (B, H, nk, D) pooled; idx: (n_band,) the band's dims.
    t = sqrt(n_band / D) * (rms(qb[..., idx]) / rms(qb)) * (rms(kb[..., idx]) / rms(kb)).
    """
    D = qb.shape[-1]

    def rms(x: Tensor) -> Tensor:
        return x.pow(2).mean(dim=(-2, -1), keepdim=True).sqrt()

    rq, rk = rms(qb).clamp_min(CALIBRATION_EPS), rms(kb).clamp_min(CALIBRATION_EPS)
    return math.sqrt(idx.numel() / D) * (rms(qb[..., idx]) / rq) * (rms(kb[..., idx]) / rk)


def top_p_blocks(probs: Tensor, allowed: Tensor, threshold: float) -> Tensor:
    """Top-p per row: keep a block while the mass of the blocks ranked before it is < threshold.

    probs: (..., nk) with zeros outside `allowed` (same shape, bool). Rank: descending
    probability, ties broken by the lower block index. threshold >= 1 keeps every allowed block.
    """
    if threshold >= 1.0:
        return allowed.clone()
    order = torch.sort(probs, dim=-1, descending=True, stable=True)
    cum = torch.cumsum(order.values, dim=-1)
    before = torch.cat([torch.zeros_like(cum[..., :1]), cum[..., :-1]], dim=-1)  # exclusive cumsum
    keep_sorted = before < threshold
    keep = torch.zeros_like(allowed).scatter(-1, order.indices, keep_sorted)
    return keep & allowed


def vertical_blocks(
    q: Tensor,
    k: Tensor,
    mask: MaskStructure,
    *,
    block_size: int,
    threshold: float,
    scale: float,
    per_kv_head: bool = False,
    heads_per_chunk: int | None = None,
) -> Tensor:
    """Query-aware vertical coverage (FlexPrefill's vertical estimate, arXiv 2502.20766): the exact attention
    of the prompt's last `block_size` queries, summed per key block, ranks the key blocks for every query block.

    q: (B, H, Lq, D), k: (B, Hkv, Lk, D) post-RoPE; scale: the attention's softmax scale. The last
    min(block_size, Lq) queries (padding queries excluded) attend to their visible keys (causal with the
    offset, window, key_valid) in float32; their probabilities summed per key block give each head a mass per
    key block. Each query block renormalises that mass over its allowed key blocks and keeps the top-p
    (`top_p_blocks`, threshold in (0, 1)); blocks with zero mass are never kept. The scores are computed for
    `heads_per_chunk` KV heads at a time (None: as many as keep the float32 logits under VERTICAL_CHUNK_BYTES;
    one KV head of 4 query heads x 128 queries at 128K keys is 256 MiB). No host synchronisation.
    Returns the (B, Hm, nq, nk) bool block mask, Hm = Hkv if per_kv_head else H.
    """
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = H // Hkv
    dev = q.device
    n = min(block_size, Lq)
    kv_valid = key_valid_or_ones(mask, B, Lk, dev)
    q_ok = query_valid(mask, kv_valid, Lq)[:, Lq - n:]  # (B, n)
    pos = torch.arange(Lq - n, Lq, device=dev)[:, None] + mask.q_offset  # (n, 1) key positions of the queries
    j = torch.arange(Lk, device=dev)[None, :]
    visible = torch.ones(n, Lk, dtype=torch.bool, device=dev)
    if mask.causal:
        visible &= j <= pos
    if mask.window:
        visible &= j > pos - mask.window
    visible = visible[None] & kv_valid[:, None, :] & q_ok[:, :, None]  # (B, n, Lk)
    nk = _cdiv(Lk, block_size)
    if heads_per_chunk is None:
        heads_per_chunk = max(1, VERTICAL_CHUNK_BYTES // (4 * B * G * n * Lk))
    mass = torch.empty(B, H, nk, dtype=torch.float32, device=dev)
    qt = q[:, :, Lq - n:].reshape(B, Hkv, G * n, D)
    for h0 in range(0, Hkv, heads_per_chunk):
        h1 = min(Hkv, h0 + heads_per_chunk)
        logits = torch.matmul(qt[:, h0:h1].float(), k[:, h0:h1].float().transpose(-1, -2)) * scale
        logits = logits.view(B, h1 - h0, G, n, Lk).masked_fill(~visible[:, None, None], float("-inf"))
        probs = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0).sum(3)  # (B, h, G, Lk)
        probs = torch.nn.functional.pad(probs, (0, nk * block_size - Lk)).view(B, h1 - h0, G, nk, block_size)
        mass[:, h0 * G:h1 * G] = probs.sum(-1).view(B, (h1 - h0) * G, nk)
    allowed = allowed_blocks(Lq, Lk, block_size, causal=mask.causal, q_offset=mask.q_offset, window=mask.window,
                             key_valid=kv_valid)[:, None]  # (B, 1, nq, nk)
    rows = mass[:, :, None, :] * allowed  # (B, H, nq, nk)
    rows = rows / rows.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    keep = top_p_blocks(rows, allowed.expand_as(rows), threshold) & (rows > 0)
    if per_kv_head:
        keep = keep.view(B, Hkv, G, *keep.shape[2:]).any(2)
    return keep


def sample_positions(q_len: int, block_size: int, samples: int, device=None) -> tuple[Tensor, Tensor]:
    """The queries that estimate each query block's attention: (positions (nq, samples) int64, used (nq, samples)
    bool). Sample j of block m sits at m * b + b - 1 - (j * (b - 1)) // (samples - 1) (evenly spaced from the
    block's last query to its first, both included; one sample: the last query); in the last, partial block sample 0
    is the last query and samples at or past it are unused. The first query matters: it reads the previous block
    most (a local head's recent keys), which no later query of the block shows."""
    nq = _cdiv(q_len, block_size)
    j = torch.arange(samples, device=device)
    offsets = block_size - 1 - (j * (block_size - 1)) // max(samples - 1, 1)
    pos = torch.arange(nq, device=device)[:, None] * block_size + offsets[None]  # (nq, s)
    first = pos[:, :1].clamp(max=q_len - 1)
    used = torch.ones_like(pos, dtype=torch.bool)
    used[:, 1:] = pos[:, 1:] < first
    return torch.cat([first, pos[:, 1:].clamp(max=q_len - 1)], 1), used


def sampled_blocks(
    q: Tensor,
    k: Tensor,
    mask: MaskStructure,
    *,
    block_size: int,
    samples: int,
    threshold: float,
    scale: float,
    per_kv_head: bool = False,
    chunk_bytes: int = VERTICAL_CHUNK_BYTES,
) -> Tensor:
    """Query-aware sampled coverage: each query block keeps the top-p of its key blocks' mass under the exact
    attention of `samples` of its own queries (`sample_positions`).

    q: (B, H, Lq, D), k: (B, Hkv, Lk, D) post-RoPE; scale: the attention's softmax scale; samples in
    [1, block_size] (block_size: every query, the exact block mass). Each used, non-padding sample with a
    visible key attends to its visible keys (causal with the offset, window, key_valid) in float32; its
    probabilities summed per key block and over the block's samples give the block's mass row, which is
    renormalised over the block's allowed key blocks; the top-p (`top_p_blocks`, threshold in (0, 1)) is kept,
    never a zero-mass block. The mass is `kernels.sampled_mass`'s: its Triton kernel on CUDA (where it takes the
    inputs), else its PyTorch reference, which computes the logits of one KV head's group for as many query blocks at
    a time as keep them under `chunk_bytes` (causal: only the keys up to the chunk's last sample). No host
    synchronisation.
    Returns the (B, Hm, nq, nk) bool block mask, Hm = Hkv if per_kv_head else H.
    """
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = H // Hkv
    dev = q.device
    nq, nk = _cdiv(Lq, block_size), _cdiv(Lk, block_size)
    kv_valid = key_valid_or_ones(mask, B, Lk, dev)
    q_ok = query_valid(mask, kv_valid, Lq)
    pos, used = sample_positions(Lq, block_size, samples, dev)
    take = (used[None] & q_ok[:, pos]).to(torch.float32)  # (B, nq, s) weight of each sample
    kw = dict(block_size=block_size, scale=scale, q_offset=mask.q_offset, causal=mask.causal, window=mask.window,
              key_valid=None if mask.key_valid is None else kv_valid)
    if q.is_cuda and sampled_mass_unsupported(q, k, block_size) is None:
        mass = sampled_block_mass(q, k, pos, take, **kw)  # (B, H, nq, nk) float32
    else:
        mass = sampled_block_mass_reference(q, k, pos, take, chunk_bytes=chunk_bytes, **kw)
    allowed = allowed_blocks(Lq, Lk, block_size, causal=mask.causal, q_offset=mask.q_offset, window=mask.window,
                             key_valid=kv_valid)[:, None]  # (B, 1, nq, nk)
    rows = mass * allowed
    rows = rows / rows.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    keep = top_p_blocks(rows, allowed.expand_as(rows), threshold) & (rows > 0)
    if per_kv_head:
        keep = keep.view(B, Hkv, G, nq, nk).any(2)
    return keep


def select_blocks_reference(
    q: Tensor,
    k: Tensor,
    high_idx: Tensor,
    low_idx: Tensor,
    mask: MaskStructure,
    *,
    block_size: int,
    threshold_high: float,
    threshold_low: float,
    temperature_high: float | None,
    temperature_low: float | None,
    force_sink: bool = True,
    force_recent: bool = True,
    per_kv_head: bool = False,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Prism's block selection in plain PyTorch (the definition the Triton launcher equals).

    q: (B, H, Lq, D), k: (B, Hkv, Lk, D) post-RoPE, any float dtype; high_idx / low_idx: int64
    band dims (see band_dims); temperature_* None means energy calibration (step 3).
    Returns the (B, Hm, nq, nk) bool block mask, Hm = Hkv if per_kv_head else H.
    """
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = H // Hkv
    dev = q.device
    high_idx, low_idx = high_idx.to(dev), low_idx.to(dev)
    kv_valid = key_valid_or_ones(mask, B, Lk, dev)
    q_valid = query_valid(mask, kv_valid, Lq)
    # step 1: pool over valid tokens; GQA: k expanded to the query heads for scoring
    qb = pool_blocks(q, q_valid, block_size, dtype)  # (B, H, nq, D)
    kb = pool_blocks(k, kv_valid, block_size, dtype).repeat_interleave(G, dim=1)  # (B, H, nk, D)
    allowed = allowed_blocks(Lq, Lk, block_size, causal=mask.causal, q_offset=mask.q_offset, window=mask.window,
                             key_valid=kv_valid)[:, None]  # (B, 1, nq, nk)
    nq = _cdiv(Lq, block_size)
    q_valid_padded = torch.nn.functional.pad(q_valid, (0, nq * block_size - Lq))
    q_block_has_valid = q_valid_padded.view(B, 1, nq, block_size).any(-1, keepdim=True)  # (B, 1, nq, 1)

    selected = torch.zeros(B, H, qb.shape[2], kb.shape[2], dtype=torch.bool, device=dev)
    for idx, threshold, temperature in (
        (high_idx, threshold_high, temperature_high),
        (low_idx, threshold_low, temperature_low),
    ):
        # steps 2-3: band slices and temperature
        t = band_temperature(qb, kb, idx) if temperature is None else torch.tensor(temperature, dtype=dtype)
        scale = math.sqrt(idx.numel()) * torch.clamp(t, min=MIN_TEMPERATURE)
        # step 4: band logits, softmax over allowed key blocks
        logits = torch.matmul(qb[..., idx], kb[..., idx].transpose(-1, -2)) / scale
        logits = logits.masked_fill(~allowed, float("-inf"))
        probs = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)
        # step 5: top-p of this band; step 6: union
        selected |= top_p_blocks(probs, allowed.expand_as(probs), threshold)
    if max(threshold_high, threshold_low) < 1.0:
        selected &= q_block_has_valid  # padding-only query blocks: forced blocks only
    # step 6: forced blocks
    if force_sink:
        nk = selected.shape[-1]
        sink = sink_block(kv_valid, block_size)  # (B,)
        is_sink = torch.arange(nk, device=dev)[None, :] == sink[:, None]  # (B, nk)
        selected |= allowed & is_sink[:, None, None, :]
    if force_recent:
        selected |= recent_blocks(mask, allowed[:, 0], Lq, block_size)[:, None]
    # step 7: one list per KV head
    if per_kv_head:
        selected = selected.view(B, Hkv, G, *selected.shape[2:]).any(2)
    return selected


reference = select_blocks_reference
