"""Prism: spectral-aware block scoring for sparse prefill (arXiv 2602.08426; notes in PRISM_NOTES.md).

Mean pooling a block of post-RoPE vectors averages vectors rotated by different angles: in the
high-frequency RoPE pairs the block mean collapses toward zero, so one pooled score goes blind to
local structure. Prism scores two bands of head dims separately, rescales each band's softmax
temperature by the energy that survives pooling, keeps the top-p blocks of each band and attends
to the union (plus the sink and the most recent blocks) with the block-sparse engine.

This module holds the parameters, the band layout, the reference selection (plain PyTorch, the
definition the Triton kernels in `sparse_compile.kernels.prism` are tested against) and the
method's `attention` entry point.

Selection, step by step (b = block_size, nq = ceil(Lq / b), nk = ceil(Lk / b)):
  1. pool q and k per block: the mean over the block's *valid* tokens (inside the sequence and
     not padding); a block with no valid token pools to zeros.
  2. split the pooled vectors into the high band and the low band (`band_dims`).
  3. calibrate: per (batch, head), t = sqrt(n_band / D) * (rms(Qb_band) / rms(Qb)) *
     (rms(Kb_band) / rms(Kb)), rms over all blocks and the band's dims, denominators clamped at
     1e-6; or fixed temperatures when calibrate = false.
  4. per band, logits = Qb_band . Kb_band / (sqrt(n_band) * t); softmax over the *allowed* key
     blocks of each query block (at least one key visible to some query of the block: causal with
     the q/kv offset, window, padding).
  5. per band, top-p: sort a row descending (ties: lower block index first), keep a block while
     the mass before it is < p; p >= 1 keeps every allowed block.
  6. union of the bands; a query block holding no valid query keeps only forced blocks (when
     p < 1); force the sink and the recent blocks (where allowed).
  7. per_kv_head: union over each KV head's group of query heads.
  8. vertical_threshold > 0 (ours, off by default): the union with the query-aware vertical coverage
     (`kernels.prism.vertical_blocks`: the last query block's exact attention mass per key block, top-p per
     query block), which restores the far blocks pooled scores miss in heads whose attention is spread out
     (PRISM_NOTES.md "Vertical coverage").
  9. sampled_threshold > 0 (ours, off by default): the union with the query-aware sampled coverage
     (`kernels.prism.sampled_blocks`: per query block, the exact attention mass per key block of
     `sampled_queries` of its own queries, top-p), an affordable estimate of each block's true mass.
 10. local_window > 0 (ours, off by default): the key blocks holding the `local_window` positions before each
     query block's first query (`kernels.prism.local_blocks`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sparse_compile.attention_mask import AttentionMask, SiteFacts
from sparse_compile.kernels.block_mask import BlockList, allowed_blocks  # noqa: F401 - re-exported
from sparse_compile.kernels.block_sparse_attention import block_sparse_attention
from sparse_compile.kernels.limits import KERNEL_DTYPES, MAX_HEAD_DIM
from sparse_compile.kernels.prism import (  # noqa: F401 - the reference's pieces, re-exported for tests and docs
    CALIBRATION_EPS,
    MAX_KV_BLOCKS,
    MIN_TEMPERATURE,
    band_temperature,
    key_valid_or_ones,
    local_blocks,
    pool_blocks,
    prism_select_triton,
    query_valid,
    recent_blocks,
    sampled_blocks,
    select_blocks_reference,
    sink_block,
    top_p_blocks,
    vertical_blocks,
)
from sparse_compile.method import GQA_MODES, BenchCase, Knob, Method
from sparse_compile.params import MethodParams, param


@dataclass(frozen=True)
class PrismParams(MethodParams):
    """Prism's parameters (policy table `[prefill.params]`); dims are counts, never indices."""

    block_size: int = param(128, help="tokens per query/key block", choices=(64, 128))
    high_dims: int | None = param(
        None,
        type=int,
        range=(2, None),
        even=True,
        help="head dims in the high-frequency band (the fastest-rotating RoPE pairs); "
        "default: half the rotary dims (64 of 128)",
    )
    low_dims: int | None = param(
        None,
        type=int,
        range=(2, None),
        even=True,
        help="head dims in the low-frequency band (non-rotating pass-through dims first, then the "
        "slowest RoPE pairs); default: 3/4 of head_dim (96 of 128)",
    )
    threshold_high: float = param(0.95, range=(0.0, 1.0), quality="higher",
                                  help="top-p mass kept in the high band (1.0: dense)")
    threshold_low: float = param(0.95, range=(0.0, 1.0), quality="higher",
                                 help="top-p mass kept in the low band (1.0: dense)")
    calibrate: bool = param(True, help="energy-calibrated band temperatures (else the fixed temperatures)")
    temperature_high: float = param(
        1.0, range=(1e-6, 1e6), help="high-band temperature when calibrate = false"
    )
    temperature_low: float = param(1.0, range=(1e-6, 1e6), help="low-band temperature when calibrate = false")
    force_sink: bool = param(True, help="always keep the block of the first valid key (attention sink)")
    force_recent: bool = param(True, help="always keep the blocks holding each query's own position")
    vertical_threshold: float = param(
        0.0, range=(0.0, 1.0),
        help="query-aware vertical coverage (0: off, the authors' Prism): every query block also keeps the top-p "
        "of the key blocks' mass under the prompt's last block of queries' exact attention (FlexPrefill's "
        "vertical estimate); catches the far blocks pooled scores miss in heads with spread attention")
    sampled_threshold: float = param(
        0.0, range=(0.0, 1.0),
        help="query-aware sampled coverage (0: off): every query block also keeps the top-p of its key blocks' mass "
        "under the exact attention of `sampled_queries` of its own queries")
    local_window: int = param(
        0, range=(0, 1 << 20),
        help="keys within this many positions before each query block's first query are always kept (the blocks "
        "holding them; 0: off): a query at the start of a block reads its predecessors most, which block-level "
        "estimates weigh by 1/block_size")
    sampled_queries: int = param(8, range=(1, 128), help="queries per block whose exact attention the sampled "
                                 "coverage reads (evenly spaced from the block's last query to its first; "
                                 "block_size: all of them)")
    gqa: str = param(
        "per_head",
        choices=GQA_MODES,
        help="per_head: one selection per query head (the authors'); per_kv_head: the union over the "
        "group, so each K/V block is loaded once per group",
    )

    def validate(self) -> str | None:
        """Cross-field checks; a message naming the keys, or None."""
        if self.calibrate and (self.temperature_high != 1.0 or self.temperature_low != 1.0):
            return (
                "keys 'temperature_high'/'temperature_low' are only used when 'calibrate' = false; "
                "remove them or set calibrate = false"
            )
        if self.sampled_queries > self.block_size:
            return f"sampled_queries = {self.sampled_queries} exceeds block_size = {self.block_size}"
        if self.threshold_high == 0.0 and self.threshold_low == 0.0 and not (self.force_sink or self.force_recent):
            return (
                "threshold_high = threshold_low = 0 with force_sink = force_recent = false selects no "
                "block; raise a threshold or force the sink/recent blocks"
            )
        return None


Params = PrismParams


# ---------------------------------------------------------------------------------------------
# Bands
# ---------------------------------------------------------------------------------------------


def resolved_band_sizes(site: SiteFacts, params: PrismParams) -> tuple[int, int]:
    """(high_dims, low_dims) for a site: the params' counts or their defaults, validated.

    Defaults: high = half the rotary dims (rounded down to even), low = 3/4 of head_dim (even).
    Raises ValueError when a count is odd, < 2, high > rotary_dim or low > head_dim.
    """
    D, R = site.head_dim, site.rotary_dim
    if not (0 < R <= D) or R % 2:
        raise ValueError(f"site rotary_dim {R} must be even and in (0, head_dim={D}]")
    high = params.high_dims if params.high_dims is not None else max(2, (R // 2) // 2 * 2)
    low = params.low_dims if params.low_dims is not None else max(2, (3 * D // 4) // 2 * 2)
    if high % 2 or high < 2 or high > R:
        raise ValueError(f"high_dims = {high} must be even, >= 2 and <= rotary_dim = {R} (head_dim {D})")
    if low % 2 or low < 2 or low > D:
        raise ValueError(f"low_dims = {low} must be even, >= 2 and <= head_dim = {D}")
    if low > D - R and (low - (D - R)) % 2:
        raise ValueError(f"low_dims = {low} leaves an odd number of rotary dims beside {D - R} pass-through dims")
    return high, low


@functools.lru_cache(maxsize=256)
def band_dims(site: SiteFacts, params: PrismParams) -> tuple[Tensor, Tensor]:
    """The head-dim indices of the high and the low band, from the site's RoPE layout.

    Returns (high_idx, low_idx): int64 CPU tensors of shapes (high_dims,) and (low_dims,), ascending;
    memoised per (site, params), so a node builds them once (treat as read-only). The CUDA selection copies
    them to the device itself (`kernels.prism.band_tables`, page-locked and capturable).

    Frequency index f in [0, R/2) (R = rotary_dim; lower f = higher frequency) owns the pair
      rotate_half: dims (f, f + R/2);   interleaved: dims (2f, 2f + 1).
    High band: the high_dims/2 highest-frequency pairs (f < high_dims/2).
    Low band: the lowest frequencies. With partial rotary the pass-through dims [R, D) do not
    rotate at all (zero frequency), so they are the lowest band members and come first: the low
    band is the last min(low_dims, D - R) pass-through dims, then the slowest
    (low_dims - (D - R)) / 2 rotary pairs. The bands may overlap (high + low > D), as intended.
    """
    high, low = resolved_band_sizes(site, params)
    D, R = site.head_dim, site.rotary_dim
    if site.rope not in ("rotate_half", "interleaved"):
        raise ValueError(f"site rope layout {site.rope!r} is not 'rotate_half' or 'interleaved'")

    def pair_dims(freqs: range) -> list[int]:
        # the two head dims of each frequency index, in this layout
        if site.rope == "rotate_half":
            return [d for f in freqs for d in (f, f + R // 2)]
        return [d for f in freqs for d in (2 * f, 2 * f + 1)]

    high_idx = pair_dims(range(high // 2))
    n_pass = min(low, D - R)
    low_rot_pairs = (low - n_pass) // 2
    low_idx = list(range(D - n_pass, D)) + pair_dims(range(R // 2 - low_rot_pairs, R // 2))
    return torch.tensor(sorted(high_idx), dtype=torch.long), torch.tensor(sorted(low_idx), dtype=torch.long)


# ---------------------------------------------------------------------------------------------
# Public selection and attention
# ---------------------------------------------------------------------------------------------


def selection_kwargs(site: SiteFacts, params: PrismParams, *, block_size: int | None = None) -> dict:
    """The keyword arguments of select_blocks_reference / prism_select_triton for a site (params were
    validated when the policy loaded; nothing is re-checked here)."""
    high_idx, low_idx = band_dims(site, params)
    return dict(
        high_idx=high_idx,
        low_idx=low_idx,
        block_size=params.block_size if block_size is None else block_size,
        threshold_high=params.threshold_high,
        threshold_low=params.threshold_low,
        temperature_high=None if params.calibrate else params.temperature_high,
        temperature_low=None if params.calibrate else params.temperature_low,
        force_sink=params.force_sink,
        force_recent=params.force_recent,
        per_kv_head=params.gqa == "per_kv_head",
    )


def _check_site(q: Tensor, k: Tensor, site: SiteFacts) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be 4-D (B, H, L, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[-1] != site.head_dim or k.shape[-1] != site.head_dim:
        raise ValueError(f"q/k head_dim {q.shape[-1]}/{k.shape[-1]} != site head_dim {site.head_dim}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"num_heads {q.shape[1]} is not a multiple of num_kv_heads {k.shape[1]}")


def prism_select_reference(
    q: Tensor,
    k: Tensor,
    mask: AttentionMask,
    site: SiteFacts,
    params: PrismParams,
    *,
    dtype: torch.dtype = torch.float64,
    block_size: int | None = None,
    scale: float | None = None,
) -> BlockList:
    """The reference selection as a BlockList (lists ascending).

    q: (B, H, Lq, D), k: (B, Hkv, Lk, D). Hm = H (gqa = per_head) or Hkv (per_kv_head).
    block_size overrides params.block_size (tests use small blocks); scale: the attention's softmax scale
    (default 1/sqrt(D)), read only by the vertical coverage.
    """
    _check_site(q, k, site)
    kw = selection_kwargs(site, params, block_size=block_size)
    dense_mask = select_blocks_reference(q, k, mask=mask, dtype=dtype, **kw)
    if params.vertical_threshold > 0:
        dense_mask |= vertical(q, k, mask, params, kw["block_size"], scale)
    if params.sampled_threshold > 0:
        dense_mask |= sampled(q, k, mask, params, kw["block_size"], scale)
    if params.local_window > 0:
        dense_mask |= local(k, mask, params, kw["block_size"], q.shape[2], dense_mask.shape[1])
    return BlockList.from_dense(dense_mask, kw["block_size"], q.shape[2], k.shape[2])


def vertical(q: Tensor, k: Tensor, mask: AttentionMask, params: PrismParams, block_size: int,
             scale: float | None) -> Tensor:
    """The vertical coverage's (B, Hm, nq, nk) bool block mask (`kernels.prism.vertical_blocks`)."""
    return vertical_blocks(q, k, mask, block_size=block_size, threshold=params.vertical_threshold,
                           scale=q.shape[-1] ** -0.5 if scale is None else scale,
                           per_kv_head=params.gqa == "per_kv_head")


def sampled(q: Tensor, k: Tensor, mask: AttentionMask, params: PrismParams, block_size: int,
            scale: float | None) -> Tensor:
    """The sampled coverage's (B, Hm, nq, nk) bool block mask (`kernels.prism.sampled_blocks`)."""
    return sampled_blocks(q, k, mask, block_size=block_size, samples=min(params.sampled_queries, block_size),
                          threshold=params.sampled_threshold, scale=q.shape[-1] ** -0.5 if scale is None else scale,
                          per_kv_head=params.gqa == "per_kv_head")


def local(k: Tensor, mask: AttentionMask, params: PrismParams, block_size: int, q_len: int, heads: int) -> Tensor:
    """The local coverage's (B, heads, nq, nk) bool block mask (`kernels.prism.local_blocks`, the same for every
    head)."""
    B, Lk = k.shape[0], k.shape[2]
    kv_valid = key_valid_or_ones(mask, B, Lk, k.device)
    allowed = allowed_blocks(q_len, Lk, block_size, causal=mask.causal, q_offset=mask.q_offset, window=mask.window,
                             key_valid=kv_valid)
    near = local_blocks(mask, allowed, q_len, block_size, params.local_window)
    return near[:, None].expand(B, heads, *near.shape[1:])


def prism_select(
    q: Tensor, k: Tensor, mask: AttentionMask, site: SiteFacts, params: PrismParams, *, block_size: int | None = None,
    scale: float | None = None,
) -> BlockList:
    """Prism's block lists: the Triton kernels on CUDA, the reference in float32 on CPU.

    q: (B, H, Lq, D), k: (B, Hkv, Lk, D) post-RoPE (fp16/bf16/fp32); scale: the attention's softmax scale
    (default 1/sqrt(D), read by the vertical coverage only). Returns a BlockList with kv_num_blocks (B, Hm, nq)
    int32 and kv_indices (B, Hm, nq, nk) int32.
    """
    if not q.is_cuda:
        return prism_select_reference(q, k, mask, site, params, dtype=torch.float32, block_size=block_size,
                                      scale=scale)
    _check_site(q, k, site)
    # band dims stay on the host: checked there, copied page-locked (`kernels.prism.band_tables`)
    kw = selection_kwargs(site, params, block_size=block_size)
    kv_num_blocks, kv_indices = prism_select_triton(q, k, mask=mask, **kw)
    blocks = BlockList(kv_num_blocks, kv_indices, kw["block_size"], q.shape[2], k.shape[2])
    if params.vertical_threshold > 0 or params.sampled_threshold > 0 or params.local_window > 0:
        blocks = add_coverage(blocks, q, k, mask, params, scale)
    return blocks


def add_coverage(blocks: BlockList, q: Tensor, k: Tensor, mask: AttentionMask, params: PrismParams,
                 scale: float | None) -> BlockList:
    """`blocks` united with the vertical and sampled coverage the params turn on, as full-width lists (nk slots
    per row: no device sync, so the selection stays capturable). The union runs in PyTorch on the
    (B, Hm, nq, nk) block masks."""
    union = blocks.to_dense()
    if params.vertical_threshold > 0:
        union |= vertical(q, k, mask, params, blocks.block_size, scale)
    if params.sampled_threshold > 0:
        union |= sampled(q, k, mask, params, blocks.block_size, scale)
    if params.local_window > 0:
        union |= local(k, mask, params, blocks.block_size, q.shape[2], union.shape[1])
    return BlockList.from_dense(union, blocks.block_size, blocks.q_len, blocks.kv_len,
                                max_blocks=blocks.num_kv_blocks)


def selection_density(blocks: BlockList, mask: AttentionMask, num_heads: int) -> Tensor:
    """(B, H) float32: `BlockList.density` under the call's mask (per_kv_head lists are broadcast to
    their group's heads)."""
    density = blocks.density(causal=mask.causal, q_offset=mask.q_offset, window=mask.window,
                             key_valid=mask.key_valid)
    if density.shape[0] == 1 and blocks.kv_num_blocks.shape[0] > 1:
        density = density.expand(blocks.kv_num_blocks.shape[0], -1)
    return density.repeat_interleave(num_heads // density.shape[1], dim=1)


def unsupported(call: Any, site: SiteFacts, params: PrismParams) -> str | None:
    """Why Prism cannot run this call (the node then runs exact attention), or None.

    call: sparse_compile.method.CallShape (batch, heads, q_len, kv_len, head_dim, dtype, device_type)."""
    if call.q_len == 0 or call.kv_len == 0:
        return f"empty sequence (q_len {call.q_len}, kv_len {call.kv_len})"
    if call.head_dim > MAX_HEAD_DIM:
        return f"head_dim {call.head_dim} > {MAX_HEAD_DIM}"
    if call.device_type == "cuda" and call.dtype not in KERNEL_DTYPES:
        return f"dtype {call.dtype} on CUDA (float16, bfloat16 or float32)"
    if call.device_type == "cuda" and -(-call.kv_len // params.block_size) > MAX_KV_BLOCKS:
        return f"{-(-call.kv_len // params.block_size)} key blocks > {MAX_KV_BLOCKS}"
    try:
        resolved_band_sizes(site, params)
    except ValueError as err:
        return f"band sizes do not fit this site: {err}"
    return None


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: AttentionMask,
    site: SiteFacts,
    params: PrismParams,
    scale: float | None = None,
    *,
    block_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Prism prefill attention.

    q: (B, H, Lq, D); k, v: (B, Hkv, Lk, D), post-RoPE, fp16/bf16/fp32 (CUDA) or any float (CPU).
    Returns (out (B, H, Lq, D) in q's dtype, density (B, H) float32 = selected / allowed blocks).
    Called by the node only for proven masks and calls `unsupported` accepts (sparse_compile/ops.py
    decides the fallback; there is no second gate here). Device dispatch: `prism_select` and the
    engine run Triton on CUDA and their references on CPU.
    """
    blocks = prism_select(q, k, mask, site, params, block_size=block_size, scale=scale)
    # our lists are well formed: no validation (and no device sync) on CUDA
    out = block_sparse_attention(
        q, k, v, blocks.kv_num_blocks, blocks.kv_indices,
        block_size=blocks.block_size, causal=mask.causal, q_offset=mask.q_offset, window=mask.window,
        key_valid=mask.key_valid, scale=scale, validate=not q.is_cuda,
    )
    return out, selection_density(blocks, mask, q.shape[1])


METHOD = Method(
    name="prism",
    phases=("prefill",),
    Params=PrismParams,
    attention=attention,
    unsupported=unsupported,
    select=lambda q, k, v, mask, site, params, scale=None: prism_select(q, k, mask, site, params, scale=scale),
    # no host sync on CUDA: band tables are page-locked host constants copied asynchronously, launch sizes
    # come from shapes (KERNEL_NOTES.md: the selection and the attention captured and replayed on an H100)
    capturable_phases=("prefill",),
    summary="spectral block scoring (dual RoPE-frequency bands, calibrated temperatures, top-p) -> block-sparse",
    bench_cases=(BenchCase("prefill"), BenchCase("prefill", "p0.9", (("threshold_high", 0.9), ("threshold_low", 0.9))),
                 BenchCase("prefill", "p0.97+vertical0.8", (("threshold_high", 0.97), ("threshold_low", 0.97),
                                                            ("vertical_threshold", 0.8))),
                 BenchCase("prefill", "sampled8p0.98", (("threshold_high", 0.0), ("threshold_low", 0.0),
                                                        ("sampled_threshold", 0.98), ("sampled_queries", 8))),
                 # examples/prism_sampled.toml: 0.39 density at +0.26% on SmolLM2 8K (EVAL.md)
                 BenchCase("prefill", "p0.9+sampled32p0.965", (("threshold_high", 0.9), ("threshold_low", 0.9),
                                                               ("sampled_threshold", 0.965), ("sampled_queries", 32)))),
    knobs=(Knob(("threshold_high", "threshold_low"), "quality", "prefill"),),
)
