"""Sparse decode attention: one query token per head over a gathered list of key indices (split-K).

Shared by the decode methods (FASA, LessIsMore): a method picks token indices, this file attends over
exactly those tokens of the KV cache.

    sparse_decode_attention(q, k, v, indices, counts=None, *, scale=None, key_valid=None,
                            impl="auto", num_splits=None, out=None) -> out

      q:        (B, H, 1, D)  float16 / bfloat16 / float32 (float64 on the reference path)
      k, v:     (B, Hkv, Lk, D) same dtype, H % Hkv == 0 (un-expanded: GQA groups read K/V once)
      indices:  None: every key 0 .. Lk-1, one set for all heads (dense decode; loads are contiguous), or
                (B, G, N) int32 / int64 token indices into the Lk keys, G one of
                  H   one index set per query head,
                  Hkv one set per KV head (shared by the heads of its group),
                  1   one set for every head;
                generally: G divides H, and G divides Hkv or Hkv divides G. Query head h uses set
                h // (H // G).
      counts:   (B, G) int32/int64 or None. Slot n of set g is *listed* iff n < counts[b, g] (None: every
                slot). A listed slot whose index is < 0 or >= Lk, or whose key is padding
                (key_valid[b, idx] False), is ignored: -1 is the padding sentinel of callers without counts.
      scale:    softmax scale (None: 1/sqrt(D)).
      key_valid: (B, Lk) bool or None; False keys never contribute, whatever the lists say.
      impl:     "auto" (Triton on CUDA, the reference on CPU), "triton" (CUDA, or CPU under
                TRITON_INTERPRET=1), "reference".
      num_splits: None (by occupancy) or an int >= 1: how many programs share one index set (split-K).
      returns (B, H, 1, D) in q's dtype:
                out[b, h] = softmax_n(scale * q[b, h] . k[b, h // (H/Hkv), idx_n]) @ v[b, ..., idx_n]
                over the listed, in-range, valid slots n of head h's set. A duplicated index counts once
                per slot (as if the key were listed twice); callers pass distinct indices.

Rows (heads) with no such slot are zeros. Non-finite values (the contract of sparse_compile.attention_mask):
a key that is not a counted slot of the head's set is never loaded, so it never influences the head; a
NaN/inf in q[b, h], or in the K or V row of a counted key, makes the head's output NaN (all of it).

Graph capture: no host synchronisation and no allocation whose size depends on data (the split count
and the partial buffers follow the shapes only), so the launch can be captured in a CUDA graph.

Algorithm (flash-decoding): grid (splits, P, B) with P = max(G, Hkv); program p handles query heads
[p * H/P, (p + 1) * H/P) (all inside one KV head, all sharing one index set), and slots
[split * SPLIT_N, (split + 1) * SPLIT_N) of that set, BLOCK_N at a time: gather K rows, scores for
its heads with one dot, online softmax, gather V rows, accumulate. With one split it writes the output;
otherwise it writes a partial (max, sum, acc) and `_combine_kernel` merges the splits.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from sparse_compile.kernels.limits import MAX_HEAD_DIM, kernel_unsupported, triton_interpreting  # noqa: F401 - re-exported

_INDEX_DTYPES = (torch.int32, torch.int64)
LOG2E = 1.4426950408889634


@triton.jit
def _decode_block(
    start, acc, l_i, m_i, seen, bad, q, offs_n, offs_d, idx_base, split_end, n_listed,
    k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, valid_base, stride_vln, qk_scale, kv_len,
    HEAD_DIM: tl.constexpr, HAS_VALID: tl.constexpr, IEEE_DOT: tl.constexpr, EVERY_KEY: tl.constexpr,
    EARLY_V: tl.constexpr,
):
    """One BLOCK_N chunk of slots: returns the updated (acc, l_i, m_i, seen, bad).

    seen (BLOCK_N,) and bad (BLOCK_H, BLOCK_N) are element-wise ORs over the chunks (reduced once, after the
    loop): a counted slot was met at that lane; a counted key's logit was not finite for that head."""
    # 1. which slots count: listed, in range, valid
    slots = start + offs_n
    listed = (slots < split_end) & (slots < n_listed)
    if EVERY_KEY:  # slot n is key n: no index load, so the K/V loads do not wait on one
        idx = slots.to(tl.int64)
        ok = listed
    else:
        idx = tl.load(idx_base + slots, mask=listed, other=-1).to(tl.int64)
        ok = listed & (idx >= 0) & (idx < kv_len)
    if HAS_VALID:
        kvalid = tl.load(valid_base + idx * stride_vln, mask=ok, other=0)
        ok = ok & (kvalid != 0)
    load_mask = ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    # 2. gather K rows; S = q K^T for the program's heads (uncounted slots load as zeros, masked to -inf)
    k = tl.load(k_base + idx[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=load_mask, other=0.0)
    if EARLY_V:  # both gathers in flight before the dot waits on K (a loop of one chunk cannot pipeline them)
        v = tl.load(v_base + idx[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=load_mask, other=0.0)
    if IEEE_DOT:
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        qk = tl.dot(q, tl.trans(k))
    # a NaN/inf in the head's q or in a counted key's K row makes its logit NaN or +-inf (0 * inf = NaN)
    bad = bad | (ok[None, :] & ~(tl.abs(qk) < float("inf")))
    qk = tl.where(ok[None, :], qk * qk_scale, float("-inf"))
    # 3. online softmax in base 2 (a chunk with no counted slot leaves the state unchanged)
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    # 4. gather V rows, acc = acc * alpha + P V
    if not EARLY_V:
        v = tl.load(v_base + idx[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=load_mask, other=0.0)
    if IEEE_DOT:
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    # a NaN/inf in a counted key's V row reaches acc through the dot (p * inf = inf, 0 * inf = NaN): the
    # kernel turns a non-finite output into NaN when it stores it
    seen = seen | ok
    return acc, l_i, m_new, seen, bad


@triton.jit
def store_split_result(OUT, M_PART, L_PART, ACC_PART, acc, m_i, l_i, poison, b, heads, split, offs_d, h_ok,
                       stride_ob, stride_oh, stride_od, stride_mb, stride_mh, stride_ms,
                       stride_ab, stride_ah, stride_as, stride_ad,
                       HEAD_DIM: tl.constexpr, ONE_SPLIT: tl.constexpr):
    """A split-K decode program's epilogue: with one split the output rows (NaN for poisoned heads), else the
    split's partial (max, sum, acc) for `_combine_kernel` (l = NaN marks a poisoned split)."""
    if ONE_SPLIT:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        out = tl.where(poison[:, None], float("nan"), out)
        tl.store(OUT + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
                 out.to(OUT.dtype.element_ty), mask=h_ok[:, None] & (offs_d < HEAD_DIM)[None, :])
    else:
        l_i = tl.where(poison, float("nan"), l_i)
        tl.store(M_PART + b * stride_mb + heads * stride_mh + split * stride_ms, m_i, mask=h_ok)
        tl.store(L_PART + b * stride_mb + heads * stride_mh + split * stride_ms, l_i, mask=h_ok)
        tl.store(ACC_PART + b * stride_ab + heads[:, None] * stride_ah + split * stride_as
                 + offs_d[None, :] * stride_ad, acc, mask=h_ok[:, None] & (offs_d < HEAD_DIM)[None, :])


@triton.jit
def _sparse_decode_kernel(
    Q, K, V, IDX, COUNTS, VALID, OUT, M_PART, L_PART, ACC_PART,
    kv_len, n_slots, split_n, qk_scale,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ib, stride_ig, stride_in,
    stride_cb, stride_cg,
    stride_vlb, stride_vln,
    stride_ob, stride_oh, stride_od,
    stride_mb, stride_mh, stride_ms,
    stride_ab, stride_ah, stride_as, stride_ad,
    H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, P: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_COUNTS: tl.constexpr, HAS_VALID: tl.constexpr, ONE_SPLIT: tl.constexpr, IEEE_DOT: tl.constexpr,
    EVERY_KEY: tl.constexpr, EARLY_V: tl.constexpr, INTERPRET: tl.constexpr,
):
    split = tl.program_id(0)
    p = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    HP: tl.constexpr = H // P  # query heads of this program
    h0 = p * HP
    hkv = h0 // (H // HKV)
    g = p * G // P  # the index set of these heads

    # 1. the program's query rows (padded to BLOCK_H for the dot), and whether each is finite
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    h_ok = offs_h < HP
    q = tl.load(Q + b * stride_qb + (h0 + offs_h)[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=h_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    q_bad = tl.max(tl.where(tl.abs(q.to(tl.float32)) < float("inf"), 0, 1), axis=1)  # (BLOCK_H,)

    # 2. this split's slots of set g
    if HAS_COUNTS:
        n_listed = tl.load(COUNTS + b * stride_cb + g * stride_cg).to(tl.int32)
    else:
        n_listed = n_slots
    split_start = split * split_n
    split_end = tl.minimum(split_start + split_n, n_slots)
    idx_base = IDX + b * stride_ib + g * stride_ig  # slots are contiguous (the launcher makes them so)
    k_base = K + b * stride_kb + hkv * stride_kh
    v_base = V + b * stride_vb + hkv * stride_vh
    valid_base = VALID + b * stride_vlb

    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
    seen = tl.zeros((BLOCK_N,), dtype=tl.int1)
    bad = tl.zeros((BLOCK_H, BLOCK_N), dtype=tl.int1)
    stop = tl.minimum(split_end, n_listed)
    if INTERPRET:  # the interpreter cannot take a run-time `range` bound with numpy >= 2.4
        start = split_start
        while start < stop:
            acc, l_i, m_i, seen, bad = _decode_block(
                start, acc, l_i, m_i, seen, bad, q, offs_n, offs_d, idx_base, split_end, n_listed,
                k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, valid_base, stride_vln, qk_scale,
                kv_len, HEAD_DIM, HAS_VALID, IEEE_DOT, EVERY_KEY, EARLY_V)
            start += BLOCK_N
    else:
        for start in range(split_start, stop, BLOCK_N):
            acc, l_i, m_i, seen, bad = _decode_block(
                start, acc, l_i, m_i, seen, bad, q, offs_n, offs_d, idx_base, split_end, n_listed,
                k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, valid_base, stride_vln, qk_scale,
                kv_len, HEAD_DIM, HAS_VALID, IEEE_DOT, EVERY_KEY, EARLY_V)

    # 3. poisoned heads: a counted non-finite key (K via its logit, V via acc), or a non-finite q that sees
    # some key
    any_ok = tl.max(seen.to(tl.int32), axis=0)
    poison = (tl.max(bad.to(tl.int32), axis=1) > 0) | ((q_bad > 0) & (any_ok > 0))  # (BLOCK_H,)
    poison = poison | (tl.max(tl.where(tl.abs(acc) < float("inf"), 0, 1), axis=1) > 0)
    heads = h0 + offs_h
    store_split_result(OUT, M_PART, L_PART, ACC_PART, acc, m_i, l_i, poison, b, heads, split, offs_d, h_ok,
                       stride_ob, stride_oh, stride_od, stride_mb, stride_mh, stride_ms,
                       stride_ab, stride_ah, stride_as, stride_ad, HEAD_DIM, ONE_SPLIT)


@triton.jit
def _combine_kernel(
    M_PART, L_PART, ACC_PART, OUT, n_splits,
    stride_mb, stride_mh, stride_ms,
    stride_ab, stride_ah, stride_as, stride_ad,
    stride_ob, stride_oh, stride_od,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Merge the splits of one (b, h): out = sum_s acc_s 2^(m_s - M) / sum_s l_s 2^(m_s - M)."""
    h = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < n_splits
    m = tl.load(M_PART + b * stride_mb + h * stride_mh + offs_s * stride_ms, mask=s_ok, other=float("-inf"))
    l = tl.load(L_PART + b * stride_mb + h * stride_mh + offs_s * stride_ms, mask=s_ok, other=0.0)
    poison = tl.max(tl.where(l != l, 1, 0), axis=0) > 0
    m = tl.where(l != l, float("-inf"), m)
    m_max = tl.max(m, axis=0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.where(m == float("-inf"), 0.0, tl.math.exp2(m - m_safe))
    w = tl.where(l != l, 0.0, w)
    l_tot = tl.sum(l * w, axis=0)
    acc = tl.load(ACC_PART + b * stride_ab + h * stride_ah + offs_s[:, None] * stride_as + offs_d[None, :] * stride_ad,
                  mask=s_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.where(l_tot > 0, l_tot, 1.0)
    out = tl.where(poison, float("nan"), out)
    tl.store(OUT + b * stride_ob + h * stride_oh + offs_d * stride_od, out.to(OUT.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


# ---------------------------------------------------------------------------------------------
# launcher
# ---------------------------------------------------------------------------------------------


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def check_decode_shapes(q: Tensor, k: Tensor, v: Tensor) -> tuple[int, int, int, int, int]:
    """(B, H, Hkv, Lk, D) of one decode call; ValueError naming the argument when q is not (B, H, 1, D), k and v
    not both (B, Hkv, Lk, D) with q's batch and head_dim, or H not a multiple of Hkv."""
    if q.dim() != 4 or q.shape[2] != 1:
        raise ValueError(f"q must be (B, H, 1, D), got {tuple(q.shape)}")
    if k.dim() != 4 or tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"k and v must both be (B, Hkv, Lk, D), got {tuple(k.shape)} and {tuple(v.shape)}")
    B, H, _, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k {tuple(k.shape)} does not fit q {tuple(q.shape)} (batch, head_dim)")
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"num_heads {H} is not a multiple of num_kv_heads {Hkv}")
    return B, H, Hkv, Lk, D


def check_inputs(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, counts: Tensor | None,
                 key_valid: Tensor | None) -> None:
    """Raise ValueError naming the argument when shapes, dtypes or devices do not fit (no device sync)."""
    B, H, Hkv, Lk, D = check_decode_shapes(q, k, v)
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device == indices.device):
        raise ValueError(f"q, k, v, indices must be on one device, got {q.device}, {k.device}, {v.device}, "
                         f"{indices.device}")
    if indices.dim() != 3 or indices.shape[0] != B:
        raise ValueError(f"indices must be (B={B}, G, N), got {tuple(indices.shape)}")
    if indices.dtype not in _INDEX_DTYPES:
        raise ValueError(f"indices must be int32 or int64, got {indices.dtype}")
    G = indices.shape[1]
    if G == 0 or H % G or (Hkv % G and G % Hkv):
        raise ValueError(f"indices has G = {G} sets: G must divide num_heads {H} and divide or be a multiple of "
                         f"num_kv_heads {Hkv} (G = H per head, Hkv per KV head, 1 shared)")
    if counts is not None:
        if tuple(counts.shape) != (B, G) or counts.dtype not in _INDEX_DTYPES or counts.device != q.device:
            raise ValueError(f"counts must be (B, G) = {(B, G)} int32/int64 on {q.device}, got "
                             f"{tuple(counts.shape)} {counts.dtype} on {counts.device}")
    if key_valid is not None and (tuple(key_valid.shape) != (B, Lk) or key_valid.device != q.device):
        raise ValueError(f"key_valid must be (B, Lk) = {(B, Lk)} on {q.device}, got {tuple(key_valid.shape)} "
                         f"on {key_valid.device}")


def default_splits(batch: int, programs_per_batch: int, n_slots: int, block_n: int, device: torch.device,
                   per_sm: int = 2) -> int:
    """Splits per index set: about `per_sm` programs per SM (CUDA) without splitting below one BLOCK_N."""
    blocks = max(1, triton.cdiv(n_slots, block_n))
    if device.type != "cuda":
        return min(blocks, 2)
    target = per_sm * _sm_count(device)
    return max(1, min(blocks, triton.cdiv(target, batch * programs_per_batch)))


def sparse_decode_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    indices: Tensor | None,
    counts: Tensor | None = None,
    *,
    scale: float | None = None,
    key_valid: Tensor | None = None,
    impl: str = "auto",
    num_splits: int | None = None,
    out: Tensor | None = None,
    launch: tuple[int, ...] | None = None,
) -> Tensor:
    """Attention of one query token per head over the listed keys (module docstring: shapes, semantics).

    out: optional (B, H, 1, D) buffer in q's dtype on q's device (written and returned).
    launch: optional (BLOCK_N, num_warps, num_stages[, early_v]) override of the launch config (benchmarks;
    early_v: gather a chunk's V rows right after its K rows instead of after the scores).
    Returns (B, H, 1, D) in q's dtype."""
    if impl not in ("auto", "triton", "reference"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'reference', got {impl!r}")
    every_key = indices is None
    if every_key:  # the kernel reads no index (slot n is key n): a launch-free stand-in unless the reference runs
        indices = every_key_indices(k, values=not (impl == "triton" or (impl == "auto" and q.is_cuda)))
    check_inputs(q, k, v, indices, counts, key_valid)
    B, H, _, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite float > 0, got {scale!r}")
    if out is not None and (tuple(out.shape) != tuple(q.shape) or out.dtype != q.dtype or out.device != q.device):
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} on {q.device}, got {tuple(out.shape)} "
                         f"{out.dtype} on {out.device}")
    use_triton = impl == "triton" or (impl == "auto" and q.is_cuda)
    if not use_triton:
        res = sparse_decode_reference(q, k, v, indices, counts, scale=scale, key_valid=key_valid)
        return res if out is None else out.copy_(res)
    if not (q.is_cuda or triton_interpreting()):
        raise ValueError("impl='triton' needs CUDA tensors or TRITON_INTERPRET=1")
    limit = kernel_unsupported(D, q.dtype)
    if limit:
        raise ValueError(f"the Triton kernel cannot take {limit}")

    Hkv, Lk = k.shape[1], k.shape[2]
    G, N = indices.shape[1], indices.shape[2]
    P = max(G, Hkv)
    HP = H // P
    BLOCK_D = max(16, triton.next_power_of_2(D))
    BLOCK_H = max(16, triton.next_power_of_2(HP))
    # index lists, D <= 128, 16-bit K/V: 128 slots a program in one stage (scripts/tune_decode_launch.py, H100, bf16,
    # 2048 slots per KV head, B = 1: 8.1 us against 10.1 for 64 slots x 3 stages, still used for float32: not swept)
    wide = BLOCK_D <= 128 and q.element_size() == 2
    BLOCK_N = 128 if wide else (64 if BLOCK_D <= 128 else 32)
    num_warps = 4 if BLOCK_D <= 128 else 8
    num_stages = 1 if wide else 3
    per_sm = 2
    if every_key and BLOCK_D <= 128:  # decode_paths.py --sweep (H100, 32K/128K, B 1/4): within 1% of SDPA
        BLOCK_N, num_stages, per_sm = 128, 2, 4
    if not q.is_cuda:
        BLOCK_N = 16
    early_v = False
    if launch is not None:
        BLOCK_N, num_warps, num_stages = launch[:3]
        early_v = bool(launch[3]) if len(launch) > 3 else False
    if num_splits is None:
        num_splits = default_splits(B, P, N, BLOCK_N, q.device, per_sm)
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits must be an int >= 1, got {num_splits!r}")
    split_n = triton.cdiv(triton.cdiv(max(N, 1), num_splits), BLOCK_N) * BLOCK_N
    num_splits = max(1, triton.cdiv(N, split_n))

    idx = indices if every_key or indices.stride(-1) == 1 else indices.contiguous()  # every key: never read
    if out is None:
        out = torch.empty((B, H, 1, D), dtype=q.dtype, device=q.device)
    dummy = torch.empty(1, dtype=torch.int32, device=q.device)  # never read (its flags are off)
    cnt = counts if counts is not None else dummy.view(1, 1)
    valid = key_valid.view(torch.int8) if key_valid is not None and key_valid.dtype == torch.bool else key_valid
    valid = valid if valid is not None else dummy.view(1, 1)
    one = num_splits == 1
    if one:
        m_part = l_part = torch.empty((1, 1, 1), dtype=torch.float32, device=q.device)
        acc_part = torch.empty((1, 1, 1, 1), dtype=torch.float32, device=q.device)
    else:
        m_part = torch.empty((B, H, num_splits), dtype=torch.float32, device=q.device)
        l_part = torch.empty((B, H, num_splits), dtype=torch.float32, device=q.device)
        acc_part = torch.empty((B, H, num_splits, D), dtype=torch.float32, device=q.device)
    _sparse_decode_kernel[(num_splits, P, B)](
        q, k, v, idx, cnt, valid, out, m_part, l_part, acc_part,
        Lk, N, split_n, scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(3),
        *k.stride(), *v.stride(),
        *idx.stride(), *cnt.stride(), *valid.stride(),
        out.stride(0), out.stride(1), out.stride(3),
        *m_part.stride(), *acc_part.stride(),
        H=H, HKV=Hkv, G=G, P=P, HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_H=BLOCK_H, BLOCK_N=BLOCK_N,
        HAS_COUNTS=counts is not None, HAS_VALID=key_valid is not None, ONE_SPLIT=one,
        IEEE_DOT=q.dtype == torch.float32, EVERY_KEY=every_key, EARLY_V=early_v, INTERPRET=not q.is_cuda,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if not one:
        _combine_kernel[(H, B)](
            m_part, l_part, acc_part, out, num_splits,
            *m_part.stride(), *acc_part.stride(), out.stride(0), out.stride(1), out.stride(3),
            HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_S=max(2, triton.next_power_of_2(num_splits)), num_warps=4,
        )
    return out


# ---------------------------------------------------------------------------------------------
# reference
# ---------------------------------------------------------------------------------------------


def counted_slots(indices: Tensor, counts: Tensor | None, kv_len: int, key_valid: Tensor | None) -> Tensor:
    """(B, G, N) bool: the slots that count (listed, index in [0, kv_len), key valid)."""
    B, G, N = indices.shape
    slot = torch.arange(N, device=indices.device)
    ok = (indices >= 0) & (indices < kv_len)
    if counts is not None:
        ok = ok & (slot[None, None, :] < counts[:, :, None])
    if key_valid is not None:
        safe = indices.clamp(0, max(kv_len - 1, 0)).long()
        ok = ok & torch.gather(key_valid.to(torch.bool)[:, None, :].expand(B, G, kv_len), 2, safe)
    return ok


def every_key_indices(k: Tensor, values: bool = True) -> Tensor:
    """indices = None spelled out: (B, 1, Lk) int32 [0, Lk), one set for every head (an expanded view). values=False:
    the same shape, dtype and device with unset values and no kernel launch (for a kernel that reads no index)."""
    B, Lk = k.shape[0], k.shape[2]
    if not values:
        return torch.empty(1, 1, 1, device=k.device, dtype=torch.int32).expand(B, 1, Lk)
    return torch.arange(Lk, device=k.device, dtype=torch.int32).view(1, 1, Lk).expand(B, 1, Lk)


def sparse_decode_reference(q: Tensor, k: Tensor, v: Tensor, indices: Tensor | None, counts: Tensor | None = None,
                            *, scale: float | None = None, key_valid: Tensor | None = None) -> Tensor:
    """The same function in PyTorch (float32, or float64 for float64 inputs): gather the listed K/V rows
    per head, softmax over the counted slots. Shapes as `sparse_decode_attention`; returns q's dtype."""
    indices = every_key_indices(k) if indices is None else indices
    check_inputs(q, k, v, indices, counts, key_valid)
    B, H, _, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G, N = indices.shape[1], indices.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    ok = counted_slots(indices, counts, Lk, key_valid)  # (B, G, N)
    head_set = torch.arange(H, device=q.device) // (H // G)  # (H,)
    ok_h = ok[:, head_set]  # (B, H, N)
    idx_h = indices[:, head_set].clamp(0, max(Lk - 1, 0)).long()  # (B, H, N)
    kv_head = torch.arange(H, device=q.device) // (H // Hkv)
    gather = idx_h[..., None].expand(B, H, N, D)
    kk = torch.gather(k[:, kv_head].to(work), 2, gather)  # (B, H, N, D)
    vv = torch.gather(v[:, kv_head].to(work), 2, gather)
    # non-finite rows are computed as zeros, then the heads that count them are set to NaN
    bad = ~(torch.isfinite(kk).all(-1) & torch.isfinite(vv).all(-1))  # (B, H, N)
    kk = kk.masked_fill(bad[..., None], 0.0)
    vv = vv.masked_fill(bad[..., None], 0.0)
    qq = q.to(work)
    q_bad = ~torch.isfinite(qq).all(-1)  # (B, H, 1)
    qq = qq.masked_fill(q_bad[..., None], 0.0)
    logits = torch.matmul(qq, kk.transpose(-1, -2)) * scale  # (B, H, 1, N)
    logits = logits.masked_fill(~ok_h[:, :, None, :], float("-inf"))
    sees = ok_h.any(-1)  # (B, H)
    probs = torch.softmax(logits, dim=-1).masked_fill(~sees[:, :, None, None], 0.0)
    out = torch.matmul(probs, vv)  # (B, H, 1, D)
    poisoned = (ok_h & bad).any(-1) | (q_bad[..., 0] & sees)
    return out.masked_fill(poisoned[:, :, None, None], float("nan")).to(q.dtype)
