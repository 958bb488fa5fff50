"""The decode selection's per-key state straight from the mask's structure, in Triton: which keys one query
sees and which of them are forced (the first `sink` and the last `recent` visible keys).

    key_state_from_mask(batch, kv_len, *, q_pos, causal, window, key_valid, sink, recent, device)
        -> (state (B, Lk) int8: 0 invisible, 1 visible, 2 forced; n_visible (B,) int32)
        visibility of key j: j < Lk, j <= q_pos if causal, j > q_pos - window if window, key_valid[b, j] if given.

Why: the PyTorch form (`key_state_from_mask_reference`: the (B, Lk) visibility, then kernels.fasa.key_state's
two cumulative sums and flips) costs ~45 us per layer on an H100 at 128K keys (B = 1) and ~440 us at B = 4,
more than the rest of the two-stage selection. Here two launches: per block of keys the visible count, then per
block the state from the counts of the blocks before it (a prefix over at most Lk / BLOCK counts, in registers).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from sparse_compile.kernels.fasa import key_state
from sparse_compile.kernels.limits import triton_interpreting

BLOCK = 1024  # keys per program
MAX_BLOCKS = 4096  # 4M keys: the counts of a row fit one program's registers


@triton.jit
def _visible(VALID, b, offs, Lk, q_pos, window, stride_vb, CAUSAL: tl.constexpr, HAS_VALID: tl.constexpr):
    vis = offs < Lk
    if CAUSAL:
        vis = vis & (offs <= q_pos)
    vis = vis & ((window <= 0) | (offs > q_pos - window))
    if HAS_VALID:
        vis = vis & (tl.load(VALID + b * stride_vb + offs, mask=offs < Lk, other=0) != 0)
    return vis


@triton.jit
def _visible_counts_kernel(VALID, COUNTS, Lk, q_pos, window, stride_vb, stride_cb,
                           CAUSAL: tl.constexpr, HAS_VALID: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    blk = tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    vis = _visible(VALID, b, offs, Lk, q_pos, window, stride_vb, CAUSAL, HAS_VALID)
    tl.store(COUNTS + b * stride_cb + blk, tl.sum(vis.to(tl.int32), axis=0))


@triton.jit
def _key_state_kernel(VALID, COUNTS, STATE, NVIS, Lk, q_pos, window, sink, recent, n_blocks,
                      stride_vb, stride_cb, stride_sb,
                      CAUSAL: tl.constexpr, HAS_VALID: tl.constexpr, BLOCK: tl.constexpr, BLOCKS_P2: tl.constexpr):
    b = tl.program_id(0)
    blk = tl.program_id(1)
    ids = tl.arange(0, BLOCKS_P2)
    counts = tl.load(COUNTS + b * stride_cb + ids, mask=ids < n_blocks, other=0)
    before = tl.sum(tl.where(ids < blk, counts, 0), axis=0)
    total = tl.sum(counts, axis=0)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    vis = _visible(VALID, b, offs, Lk, q_pos, window, stride_vb, CAUSAL, HAS_VALID)
    rank = before + tl.cumsum(vis.to(tl.int32), axis=0) - 1  # among the row's visible keys, 0-based
    forced = vis & ((rank < sink) | (total - 1 - rank < recent))
    tl.store(STATE + b * stride_sb + offs, (vis.to(tl.int8) + forced.to(tl.int8)), mask=offs < Lk)
    if blk == 0:
        tl.store(NVIS + b, total)


def key_state_from_mask(batch: int, kv_len: int, *, q_pos: int, causal: bool = True, window: int = 0,
                        key_valid: Tensor | None = None, sink: int = 0, recent: int = 0,
                        device: torch.device | str | None = None, impl: str = "auto") -> tuple[Tensor, Tensor]:
    """(state (B, Lk) int8, n_visible (B,) int32) of one decode query at position q_pos (module docstring).
    key_valid: (B, Lk) bool/int or None. impl: "auto" (Triton on CUDA), "triton" (CUDA or the interpreter),
    "reference"."""
    if impl not in ("auto", "triton", "reference"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'reference', got {impl!r}")
    device = torch.device(device) if device is not None else (key_valid.device if key_valid is not None
                                                               else torch.device("cpu"))
    if key_valid is not None:
        if tuple(key_valid.shape) != (batch, kv_len):
            raise ValueError(f"key_valid must be (B={batch}, Lk={kv_len}), got {tuple(key_valid.shape)}")
        if key_valid.device != device:
            raise ValueError(f"key_valid is on {key_valid.device}, expected {device}")
    if min(sink, recent, window) < 0:
        raise ValueError(f"sink {sink}, recent {recent} and window {window} must be >= 0")
    n_blocks = -(-kv_len // BLOCK)
    use = impl == "triton" or (impl == "auto" and device.type == "cuda")
    if not use or n_blocks > MAX_BLOCKS:
        if impl == "triton" and n_blocks > MAX_BLOCKS:
            raise ValueError(f"kv_len {kv_len} exceeds the kernel's {MAX_BLOCKS * BLOCK} keys")
        return key_state_from_mask_reference(batch, kv_len, q_pos=q_pos, causal=causal, window=window,
                                             key_valid=key_valid, sink=sink, recent=recent, device=device)
    if not (device.type == "cuda" or triton_interpreting()):
        raise ValueError(f"the Triton key state needs CUDA or TRITON_INTERPRET=1, got {device}")
    state = torch.empty(batch, kv_len, dtype=torch.int8, device=device)
    n_visible = torch.empty(batch, dtype=torch.int32, device=device)
    if batch == 0 or kv_len == 0:
        return state, n_visible.zero_()
    counts = torch.empty(batch, n_blocks, dtype=torch.int32, device=device)
    valid = key_valid
    if valid is not None:
        valid = valid.contiguous()
        if valid.dtype == torch.bool:
            valid = valid.view(torch.uint8)
    vptr = valid if valid is not None else state
    vstride = valid.stride(0) if valid is not None else 0
    grid = (batch, n_blocks)
    _visible_counts_kernel[grid](vptr, counts, kv_len, q_pos, window, vstride, counts.stride(0),
                                 CAUSAL=causal, HAS_VALID=valid is not None, BLOCK=BLOCK, num_warps=4)
    _key_state_kernel[grid](vptr, counts, state, n_visible, kv_len, q_pos, window, sink, recent, n_blocks,
                            vstride, counts.stride(0), state.stride(0),
                            CAUSAL=causal, HAS_VALID=valid is not None, BLOCK=BLOCK,
                            BLOCKS_P2=triton.next_power_of_2(n_blocks), num_warps=4)
    return state, n_visible


def key_state_from_mask_reference(batch: int, kv_len: int, *, q_pos: int, causal: bool = True, window: int = 0,
                                  key_valid: Tensor | None = None, sink: int = 0, recent: int = 0,
                                  device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """`key_state_from_mask` in PyTorch: the (B, Lk) visibility (attention_mask.visible_keys' rule for one query),
    then kernels.fasa.key_state."""
    j = torch.arange(kv_len, device=device)
    visible = torch.ones(kv_len, dtype=torch.bool, device=device)
    if causal:
        visible &= j <= q_pos
    if window:
        visible &= j > q_pos - window
    visible = visible[None].expand(batch, kv_len)
    if key_valid is not None:
        visible = visible & key_valid.to(device=visible.device, dtype=torch.bool)
    return key_state(visible, sink, recent), visible.sum(-1).to(torch.int32)
