"""Merge new keys into a SparseCache's per-page min/max summaries in one launch (`update_page_summaries`).

The PyTorch form (`update_page_summaries_reference`, what `sparse_compile.cache.cache_update` ran before) takes
five launches per layer and step: the validity gather, two `where`s and two `scatter_reduce_` (each ~8 µs in a
captured decode step on an H200, BENCHMARKS.md "Where the generate gap goes"). Here one program owns one
(batch row, KV head, page) touched by the new keys: it reduces the page's new valid keys and merges them into the
stored min and max. The new keys occupy consecutive slots (`pos` = first + 0..n-1, as every SparseLayer write
does), so a write of n keys touches at most ceil(n / P) + 1 pages and no two programs write the same page: no
atomics. The first slot is read on the device (no host sync, capturable).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _page_summary_kernel(
    K, VALID, POS, PMIN, PMAX,
    n_new, n_pages, kv_len,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vn,
    stride_pb, stride_ph, stride_pp, stride_pd,
    HKV: tl.constexpr, PAGE: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    bh = tl.program_id(0)
    b = (bh // HKV).to(tl.int64)
    h = (bh % HKV).to(tl.int64)
    first = tl.load(POS).to(tl.int64)  # slot of the first new key
    page = first // PAGE + tl.program_id(1)
    slots = page * PAGE + tl.arange(0, PAGE)  # the page's slots
    new = slots - first  # index among the new keys
    in_write = (new >= 0) & (new < n_new) & (slots < kv_len)
    valid = tl.load(VALID + b * stride_vb + slots * stride_vn, mask=in_write, other=0) != 0
    take = in_write & valid
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    ptrs = K + b * stride_kb + h * stride_kh + new[:, None] * stride_kn + offs_d[None, :] * stride_kd
    keys = tl.load(ptrs, mask=take[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    lo = tl.min(tl.where(take[:, None], keys, float("inf")), axis=0)
    hi = tl.max(tl.where(take[:, None], keys, float("-inf")), axis=0)
    any_new = tl.sum(take.to(tl.int32), axis=0) > 0
    store = d_ok & any_new & (page < n_pages)
    base = b * stride_pb + h * stride_ph + page * stride_pp + offs_d * stride_pd
    old_lo = tl.load(PMIN + base, mask=store, other=0.0)
    old_hi = tl.load(PMAX + base, mask=store, other=0.0)
    tl.store(PMIN + base, tl.minimum(old_lo.to(tl.float32), lo).to(PMIN.dtype.element_ty), mask=store)
    tl.store(PMAX + base, tl.maximum(old_hi.to(tl.float32), hi).to(PMAX.dtype.element_ty), mask=store)


def update_page_summaries(page_min: Tensor, page_max: Tensor, key_valid: Tensor, pos: Tensor, k: Tensor,
                          page_size: int) -> None:
    """Merge n new keys into the page summaries, in place (one Triton launch).

    page_min, page_max: (B, Hkv, NP, D), same dtype as k; key_valid: (B, L) bool; pos: (n,) int64, n consecutive
    slots (pos[i] = pos[0] + i; only pos[0] is read); k: (B, Hkv, n, D) the new keys; page_size: P, a power of two.
    page_min / page_max of the pages holding the valid new slots take the element-wise min / max with those keys
    (slots at or past L are dropped). ValueError for shapes, dtypes or devices that do not fit."""
    B, Hkv, n, D = k.shape
    if page_min.shape != page_max.shape or page_min.dim() != 4 or page_min.shape[:2] != (B, Hkv) \
            or page_min.shape[3] != D:
        raise ValueError(f"page_min/page_max {tuple(page_min.shape)}/{tuple(page_max.shape)} do not fit keys "
                         f"{tuple(k.shape)}: expected (B, Hkv, NP, D)")
    if page_min.dtype != k.dtype or page_max.dtype != k.dtype:
        raise ValueError(f"page summaries {page_min.dtype}/{page_max.dtype} and keys {k.dtype} differ")
    if key_valid.dim() != 2 or key_valid.shape[0] != B or key_valid.dtype != torch.bool:
        raise ValueError(f"key_valid must be (B={B}, L) bool, got {tuple(key_valid.shape)} {key_valid.dtype}")
    if pos.dim() != 1 or pos.numel() != n:
        raise ValueError(f"pos must hold the {n} new slots, got shape {tuple(pos.shape)}")
    if page_size < 1 or page_size & (page_size - 1):
        raise ValueError(f"page_size must be a power of two, got {page_size}")
    if len({t.device for t in (page_min, page_max, key_valid, pos, k)}) != 1:
        raise ValueError("page summaries, key_valid, pos and keys must be on one device")
    if n == 0:
        return
    touched = triton.cdiv(n, page_size) + 1  # n consecutive slots from any offset
    _page_summary_kernel[(B * Hkv, touched)](
        k, key_valid, pos, page_min, page_max,
        n, page_min.shape[2], key_valid.shape[1],
        *k.stride(), *key_valid.stride(), *page_min.stride(),
        HKV=Hkv, PAGE=page_size, BLOCK_D=triton.next_power_of_2(D), HEAD_DIM=D,
    )


def update_page_summaries_reference(page_min: Tensor, page_max: Tensor, key_valid: Tensor, pos: Tensor, k: Tensor,
                                    page_size: int) -> None:
    """The definition in PyTorch (any slots, consecutive or not): scatter_reduce_ of the valid new keys."""
    B, Hkv, n, D = k.shape
    valid = key_valid.index_select(1, pos)[:, None, :, None]  # (B, 1, n, 1)
    page = (pos // page_size)[None, None, :, None].expand(B, Hkv, n, D)
    page_min.scatter_reduce_(2, page, torch.where(valid, k, float("inf")), reduce="amin")
    page_max.scatter_reduce_(2, page, torch.where(valid, k, float("-inf")), reduce="amax")
