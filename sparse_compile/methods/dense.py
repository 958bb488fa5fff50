"""Exact attention from the mask's structure, without an L x L mask tensor.

CUDA, by structure (each path measured in BENCHMARKS.md):
  StaticCache prefill               keys past the last query's position (the empty slots) cut off as views,
                                    then the path its structure takes below
  causal prefill, no padding        SDPA is_causal=True, cuDNN first, then flash
  left-padded causal prefill        one causal SDPA call per batch row on its unpadded part
  decode (one query), every key     SDPA with enable_gqa (K/V read once)
  decode with masked keys           kernels/sparse_decode.py over every key with a (B, Lk) validity row:
                                    masked keys are never loaded (padding, StaticCache tail, window);
                                    float64 or head_dim > 256: the O(Lk) exact reference
  windows, other padding, chunks    the block-sparse engine over every allowed block
CPU: SDPA math on the reference mask, which is what the eager model runs.

Non-finite values (the contract of sparse_compile.attention_mask): SDPA lets a NaN/inf in the K or V
of a key a row cannot see reach that row (0 * NaN in probs @ V), and its CPU kernel can drop a NaN a row
does see. So when q, K or V holds a non-finite value (checked on the host: free on CPU, one reduction
and sync per prefill call on CUDA), the call runs the
contract's exact reference (CPU) or the block-sparse engine (CUDA), which never let such a key influence
a row that cannot see it. Finite inputs take the paths above unchanged. CUDA decode needs no check (and
stays free of host syncs, so CUDA graphs capture it): with every key visible SDPA is exact under the
contract, and with masked keys the sparse decode kernel never loads them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from sparse_compile.attention_mask import AttentionMask, SiteFacts, exact_attention_reference, visible_keys
from sparse_compile.kernels.block_sparse_attention import block_sparse_attention
from sparse_compile.kernels.sparse_decode import kernel_unsupported, sparse_decode_attention
from sparse_compile.method import BenchCase, Method

FAST_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]


@dataclass(frozen=True)
class Params:
    """The dense method has no parameters."""


def expand_kv(k: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, Hkv, L, D) -> (B, H, L, D), as transformers' repeat_kv does."""
    groups = num_heads // k.shape[1]
    if groups == 1:
        return k
    B, Hkv, L, D = k.shape
    return k[:, :, None].expand(B, Hkv, groups, L, D).reshape(B, Hkv * groups, L, D)


def sdpa_with_mask(q, k, v, mask: AttentionMask, scale: float | None) -> torch.Tensor:
    """SDPA on the materialised reference mask (CPU path and unrecognised masks)."""
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    kk, vv = expand_kv(k, H), expand_kv(v, H)
    structured = mask.causal or mask.window or mask.key_valid is not None
    attn_mask = visible_keys(mask, B, Lq, Lk, device=q.device) if structured else None
    if mask.dense_mask is not None:
        dm = mask.dense_mask
        if attn_mask is None:
            attn_mask = dm
        elif dm.dtype == torch.bool:
            attn_mask = attn_mask & dm
        else:
            attn_mask = torch.zeros_like(dm).masked_fill(~attn_mask, float("-inf")) + dm
    return F.scaled_dot_product_attention(q, kk, vv, attn_mask=attn_mask, scale=scale)


def decode_key_mask(mask: AttentionMask, batch: int, kv_len: int, device) -> torch.Tensor:
    """(B, 1, 1, Lk) bool visibility for one query: linear in Lk, never L x L."""
    return visible_keys(mask, batch, 1, kv_len, device=device)


def masked_decode_attention(q, k, v, key_valid: torch.Tensor, scale: float) -> torch.Tensor:
    """One query over every key whose key_valid is True, on the sparse decode kernel: keys that are not
    valid are never loaded, so their values cannot reach the row (SDPA with a key mask lets a NaN there
    through). No host sync, fixed shapes: capturable. decode_paths.py times it against SDPA with the mask.

    q: (B, H, 1, D); k, v: (B, Hkv, Lk, D); key_valid: (B, Lk) bool. Returns (B, H, 1, D)."""
    return sparse_decode_attention(q, k, v, None, key_valid=key_valid, scale=scale)


def left_padding_starts(key_valid: torch.Tensor) -> list[int] | None:
    """For key_valid (B, Lk) of the form [False]*s_b + [True]*(Lk - s_b): the list of s_b; else None.

    One device sync. Left padding is what batched generation sends."""
    Lk = key_valid.shape[1]
    starts = (~key_valid).sum(dim=1)
    expected = torch.arange(Lk, device=key_valid.device)[None, :] >= starts[:, None]
    if not bool((key_valid == expected).all()):
        return None
    return starts.tolist()


def left_padded_causal_attention(q, k, v, starts: list[int], scale: float) -> torch.Tensor:
    """Causal self-attention (Lq == Lk, q_offset 0) of a left-padded batch, one SDPA call per row on
    its unpadded part, so the fast causal kernels run and padding costs nothing. Rows of padded
    queries (which see no valid key) are zeros, as in the reference.

    q: (B, H, L, D); k, v: (B, Hkv, L, D); starts: first valid position per batch row."""
    B, H, L, _ = q.shape
    out = torch.zeros(B, H, L, v.shape[-1], dtype=q.dtype, device=q.device)
    for b, s in enumerate(starts):
        if s >= L:
            continue
        kk, vv = expand_kv(k[b : b + 1, :, s:], H), expand_kv(v[b : b + 1, :, s:], H)
        out[b : b + 1, :, s:] = F.scaled_dot_product_attention(q[b : b + 1, :, s:], kk, vv, is_causal=True,
                                                               scale=scale)
    return out


def visible_prefix(k, v, mask: AttentionMask, q_len: int):
    """(k, v, mask) cut to the keys some query can see: under a causal mask without a tensor mask, keys at
    positions >= q_offset + q_len are invisible to every row (a StaticCache's empty slots), so dropping
    them is exact and costs nothing (views). Otherwise the inputs unchanged."""
    end = mask.q_offset + q_len
    if not mask.causal or mask.dense_mask is not None or end >= k.shape[2]:
        return k, v, mask
    key_valid = None if mask.key_valid is None else mask.key_valid[:, :end]
    return k[:, :, :end], v[:, :, :end], AttentionMask(mask.causal, mask.q_offset, mask.window, key_valid, None)


def cuda_attention(q, k, v, mask: AttentionMask, scale: float | None) -> torch.Tensor:
    B, H, Lq, D = q.shape
    if Lq > 1:  # a StaticCache prefill: its empty tail, then the square causal fast path below
        k, v, mask = visible_prefix(k, v, mask, Lq)
    Lk = k.shape[2]
    if mask.key_valid is not None and Lq > 1:
        starts = left_padding_starts(mask.key_valid)
        if starts is not None and not any(starts):
            # Padding masks of unpadded batches (generate() always passes one): the fast path below.
            mask = AttentionMask(mask.causal, mask.q_offset, mask.window, None, mask.dense_mask)
        elif (starts is not None and mask.causal and mask.q_offset == 0 and Lq == Lk and mask.window == 0
              and mask.dense_mask is None):
            with sdpa_kernel(FAST_BACKENDS + [SDPBackend.MATH], set_priority=True):
                return left_padded_causal_attention(q, k, v, starts, scale)
    plain = mask.window == 0 and mask.key_valid is None and mask.dense_mask is None
    with sdpa_kernel(FAST_BACKENDS + [SDPBackend.MATH], set_priority=True):
        if Lq == 1 and mask.dense_mask is None:
            see_all = plain and (not mask.causal or mask.q_offset >= Lk - 1)
            if not see_all:  # masked keys must not be loaded: the kernel, else the O(Lk) reference
                if not kernel_unsupported(D, q.dtype):
                    return masked_decode_attention(q, k, v, decode_key_mask(mask, B, Lk, q.device).reshape(B, Lk),
                                                   scale)
                return exact_attention_reference(q, k, v, mask, scale)
            # every key visible; enable_gqa: K/V read once per group (decode_paths.py measured it fastest)
            return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=H != k.shape[1])
        if plain and not mask.causal:
            return F.scaled_dot_product_attention(q, expand_kv(k, H), expand_kv(v, H), scale=scale)
        if plain and mask.q_offset == 0 and Lq == Lk:
            return F.scaled_dot_product_attention(q, expand_kv(k, H), expand_kv(v, H), is_causal=True, scale=scale)
    if mask.dense_mask is None and not kernel_unsupported(D, q.dtype):
        return block_sparse_attention(
            q, k, v, causal=mask.causal, q_offset=mask.q_offset, window=mask.window,
            key_valid=mask.key_valid, scale=scale, validate=False,
        )
    return sdpa_with_mask(q, k, v, mask, scale)


def has_nonfinite(*tensors: torch.Tensor) -> bool:
    """Whether any element is NaN or ±inf, with one host sync: amax/amin propagate NaN and reach ±inf, so
    two reductions per tensor read it once and materialise no mask."""
    extremes = [r for t in tensors if t.numel() for r in (t.amax(), t.amin())]
    return bool(extremes) and not bool(torch.isfinite(torch.stack(extremes)).all())


def nonfinite_safe_attention(q, k, v, mask: AttentionMask, scale: float) -> torch.Tensor:
    """Exact attention under the non-finite contract: the engine on CUDA (fp16/bf16/fp32, head_dim <= 256,
    no tensor mask), else the reference."""
    if q.is_cuda and mask.dense_mask is None and not kernel_unsupported(q.shape[-1], q.dtype):
        return block_sparse_attention(q, k, v, causal=mask.causal, q_offset=mask.q_offset, window=mask.window,
                                      key_valid=mask.key_valid, scale=scale, validate=False)
    return exact_attention_reference(q, k, v, mask, scale)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: AttentionMask,
    site: SiteFacts,
    params: Params | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention. q: (B, H, Lq, D); k, v: (B, Hkv, Lk, D). Returns (out, density=ones (B, H))."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    B, H, Lq, _ = q.shape
    plain_causal = (
        mask.causal and mask.q_offset == 0 and Lq == k.shape[2] and mask.window == 0
        and mask.key_valid is None and mask.dense_mask is None
    )
    guard = not q.is_cuda or Lq > 1  # CUDA decode stays sync-free (module docstring)
    # CUDA's SDPA kernels propagate a NaN/inf query themselves: only K/V are checked there
    if guard and has_nonfinite(*((k, v) if q.is_cuda else (q, k, v))):
        out = nonfinite_safe_attention(q, k, v, mask, scale)
    elif q.is_cuda:
        out = cuda_attention(q, k, v, mask, scale)
    elif plain_causal:
        out = F.scaled_dot_product_attention(q, expand_kv(k, H), expand_kv(v, H), is_causal=True, scale=scale)
    else:
        out = sdpa_with_mask(q, k, v, mask, scale)
    return out, torch.ones(q.shape[0], q.shape[1], dtype=torch.float32, device=q.device)


METHOD = Method(
    name="dense",
    phases=("prefill", "decode"),
    Params=Params,
    attention=attention,
    # prefill reads the padding layout on the host (one sync) to pick the per-row cuDNN path
    capturable_phases=("decode",),
    summary="exact attention (cuDNN/flash SDPA by mask structure, the block-sparse engine for the rest)",
    bench_cases=(BenchCase("prefill"), BenchCase("decode")),
)
