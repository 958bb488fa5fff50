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
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from sparse_compile.attention_mask import AttentionMask, SiteFacts
from sparse_compile.kernels.block_mask import BlockList
from sparse_compile.methods import dense
from sparse_compile.params import PolicyError, check_value, param

PHASES = ("prefill",)
GQA_MODES = ("per_head", "per_kv_head")
CALIBRATION_EPS = 1e-6  # clamp of the rms denominators (as the authors)
MIN_TEMPERATURE = 1e-12  # a band with no energy gives zero logits instead of 0 / 0


@dataclass(frozen=True)
class PrismParams:
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
    threshold_high: float = param(0.95, range=(0.0, 1.0), help="top-p mass kept in the high band (1.0: dense)")
    threshold_low: float = param(0.95, range=(0.0, 1.0), help="top-p mass kept in the low band (1.0: dense)")
    calibrate: bool = param(True, help="energy-calibrated band temperatures (else the fixed temperatures)")
    temperature_high: float = param(
        1.0, range=(1e-6, 1e6), help="high-band temperature when calibrate = false"
    )
    temperature_low: float = param(1.0, range=(1e-6, 1e6), help="low-band temperature when calibrate = false")
    force_sink: bool = param(True, help="always keep the block of the first valid key (attention sink)")
    force_recent: bool = param(True, help="always keep the blocks holding each query's own position")
    gqa: str = param(
        "per_head",
        choices=GQA_MODES,
        help="per_head: one selection per query head (the authors'); per_kv_head: the union over the "
        "group, so each K/V block is loaded once per group",
    )

    def __post_init__(self) -> None:
        # programmatic construction gets the same per-field checks as a policy table
        for f in fields(self):
            object.__setattr__(self, f.name, check_value(f, getattr(self, f.name), "PrismParams"))

    def validate(self) -> str | None:
        """Cross-field checks; a message naming the keys, or None."""
        if self.calibrate and (self.temperature_high != 1.0 or self.temperature_low != 1.0):
            return (
                "keys 'temperature_high'/'temperature_low' are only used when 'calibrate' = false; "
                "remove them or set calibrate = false"
            )
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


def band_dims(site: SiteFacts, params: PrismParams) -> tuple[Tensor, Tensor]:
    """The head-dim indices of the high and the low band, from the site's RoPE layout.

    Returns (high_idx, low_idx): int64 CPU tensors of shapes (high_dims,) and (low_dims,), ascending.

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
# Reference selection (the definition; float64 by default)
# ---------------------------------------------------------------------------------------------


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def key_valid_or_ones(mask: AttentionMask, batch: int, kv_len: int, device) -> Tensor:
    """(B, Lk) bool: mask.key_valid, or all True."""
    if mask.key_valid is None:
        return torch.ones(batch, kv_len, dtype=torch.bool, device=device)
    return mask.key_valid.to(device=device, dtype=torch.bool)


def query_valid(mask: AttentionMask, key_valid: Tensor, q_len: int) -> Tensor:
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


def allowed_blocks(mask: AttentionMask, key_valid: Tensor, q_len: int, block_size: int) -> Tensor:
    """(B, nq, nk) bool: key block n holds at least one valid key visible to some query of block m.

    The queries of block m sit at positions p0 = q_offset + m*b .. p1 = q_offset + min((m+1)b, Lq) - 1;
    together they see keys in (p0 - window, p1] (causal) and only the valid ones.
    """
    B, Lk = key_valid.shape
    dev = key_valid.device
    nq, nk = _cdiv(q_len, block_size), _cdiv(Lk, block_size)
    m = torch.arange(nq, device=dev)
    n = torch.arange(nk, device=dev)
    p0 = (mask.q_offset + m * block_size)[:, None]
    p1 = (mask.q_offset + torch.clamp((m + 1) * block_size, max=q_len) - 1)[:, None]
    lo = (n * block_size)[None, :].expand(nq, nk)
    hi = (torch.clamp((n + 1) * block_size, max=Lk) - 1)[None, :].expand(nq, nk)
    if mask.causal:
        hi = torch.minimum(hi, p1)
    if mask.window > 0:
        lo = torch.maximum(lo, p0 - mask.window + 1)
    lo_c, hi_c = lo.clamp(0, Lk), (hi + 1).clamp(0, Lk)
    cum = torch.nn.functional.pad(key_valid.to(torch.int64).cumsum(-1), (1, 0))  # (B, Lk + 1)
    count = cum[:, hi_c.reshape(-1)] - cum[:, lo_c.reshape(-1)]
    return ((count > 0) & (hi_c > lo_c).reshape(1, -1)).reshape(B, nq, nk)


def recent_blocks(mask: AttentionMask, allowed: Tensor, q_len: int, block_size: int) -> Tensor:
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


def select_blocks_reference(
    q: Tensor,
    k: Tensor,
    high_idx: Tensor,
    low_idx: Tensor,
    mask: AttentionMask,
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
    allowed = allowed_blocks(mask, kv_valid, Lq, block_size)[:, None]  # (B, 1, nq, nk)
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


# ---------------------------------------------------------------------------------------------
# Public selection and attention
# ---------------------------------------------------------------------------------------------


def selection_kwargs(site: SiteFacts, params: PrismParams, *, block_size: int | None = None) -> dict:
    """The keyword arguments of select_blocks_reference / prism_select_triton for a site."""
    problem = params.validate()
    if problem:
        raise PolicyError(f"PrismParams: {problem}")
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
) -> BlockList:
    """The reference selection as a BlockList (lists ascending).

    q: (B, H, Lq, D), k: (B, Hkv, Lk, D). Hm = H (gqa = per_head) or Hkv (per_kv_head).
    block_size overrides params.block_size (tests use small blocks).
    """
    _check_site(q, k, site)
    kw = selection_kwargs(site, params, block_size=block_size)
    dense_mask = select_blocks_reference(q, k, mask=mask, dtype=dtype, **kw)
    return BlockList.from_dense(dense_mask, kw["block_size"], q.shape[2], k.shape[2])


def prism_select(
    q: Tensor, k: Tensor, mask: AttentionMask, site: SiteFacts, params: PrismParams, *, block_size: int | None = None
) -> BlockList:
    """Prism's block lists: the Triton kernels on CUDA, the reference in float32 on CPU.

    q: (B, H, Lq, D), k: (B, Hkv, Lk, D) post-RoPE (fp16/bf16/fp32). Returns a BlockList with
    kv_num_blocks (B, Hm, nq) int32 and kv_indices (B, Hm, nq, nk) int32.
    """
    if not q.is_cuda:
        return prism_select_reference(q, k, mask, site, params, dtype=torch.float32, block_size=block_size)
    from sparse_compile.kernels.prism import prism_select_triton

    _check_site(q, k, site)
    kw = selection_kwargs(site, params, block_size=block_size)
    kv_num_blocks, kv_indices = prism_select_triton(q, k, mask=mask, **kw)
    return BlockList(kv_num_blocks, kv_indices, kw["block_size"], q.shape[2], k.shape[2])


def selection_density(blocks: BlockList, mask: AttentionMask, num_heads: int) -> Tensor:
    """(B, H) float32: selected allowed blocks / allowed blocks, per head (per_kv_head lists are
    broadcast to their group's heads). Allowed = holds a visible valid key (allowed_blocks)."""
    B, Hm = blocks.kv_num_blocks.shape[:2]
    kv_valid = key_valid_or_ones(mask, B, blocks.kv_len, blocks.kv_num_blocks.device)
    allowed = allowed_blocks(mask, kv_valid, blocks.q_len, blocks.block_size)[:, None]  # (B, 1, nq, nk)
    selected = (blocks.to_dense() & allowed).sum(dim=(-1, -2)).float()
    density = selected / allowed.sum(dim=(-1, -2)).clamp_min(1).float()
    return density.repeat_interleave(num_heads // Hm, dim=1)


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

    q: (B, H, Lq, D); k, v: (B, Hkv, Lk, D), post-RoPE, fp16/bf16 (CUDA) or any float (CPU).
    Returns (out (B, H, Lq, D) in q's dtype, density (B, H) float32 = selected / allowed blocks).
    Runs exact attention (density 1) when Lq == 1 or the mask could not be recognised
    (mask.dense_mask set). The length gate is the policy's phase-level `min_seq_len`, applied by
    sparse_compile/ops.py before this is called (there is no second gate here).
    """
    B, H, Lq, _ = q.shape
    if Lq == 1 or mask.dense_mask is not None:
        return dense.attention(q, k, v, mask, site, None, scale)
    from sparse_compile.kernels.block_sparse_attention import block_sparse_attention

    blocks = prism_select(q, k, mask, site, params, block_size=block_size)
    # the engine: Triton on CUDA, its reference on CPU; our lists are well formed (no validation sync)
    out = block_sparse_attention(
        q, k, v, blocks.kv_num_blocks, blocks.kv_indices,
        block_size=blocks.block_size, causal=mask.causal, q_offset=mask.q_offset, window=mask.window,
        key_valid=mask.key_valid, scale=scale, validate=not q.is_cuda,
    )
    return out, selection_density(blocks, mask, H)
