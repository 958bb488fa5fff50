"""The block mass of Prism's sampled coverage in one Triton launch (`sampled_block_mass`).

Shapes: q (B, H, Lq, D), k (B, Hkv, Lk, D), H = G * Hkv, fp16 / bf16 / fp32 (the same dtype); positions (nq, s)
int, the query indices of each query block's samples, all inside that block (`kernels.prism.sample_positions`);
w = weights (B, nq, s) float32, each sample's weight (`sampled_blocks` passes take = used & the query is not
padding). Output: mass (B, H, nq, nk) float32, nq = ceil(Lq / b), nk = ceil(Lk / b), b = block_size:

    mass[b, h, m, n] = sum_j w[b, m, j] * sum_{t in block n} softmax_t(scale * q[b, h, pos[m, j]] . k[b, h // G, t])

where the softmax of sample j runs over the keys visible to query position i = pos[m, j] (key position
q_offset + i; key t visible iff (not causal or t <= q_offset + i) and (window == 0 or t > q_offset + i - window)
and key_valid[b, t]), in float32. A sample with no visible key adds 0 (the reference's nan_to_num).

Algorithm: one program per (query block m, chunk of a KV head's query heads, batch row b, KV head). The rows of the
program are its heads x samples (HEADS * S_PAD, at least 16: the M dimension of `tl.dot`; rows past G heads or s
samples, and samples of weight 0, load no query and weigh 0); the key tiles are the key blocks (BLOCK = b keys, read
in k's dtype, dots accumulated in float32) from the window's start of the block's first live sample to the causal
limit of its last one (a query block without a live sample reads no key). Pass 1 keeps each row's running max and sum
of exp2 (online softmax, base-2 logits scale * log2(e) * q.k); pass 2 recomputes the logits, sums
exp2(l - max_row) / sum_row * weight_row over the tile's keys, then over each head's samples, and stores
mass[b, h, m, n] for the program's heads. The key blocks outside the read range are written as zeros, so every entry
of the output is written. The reference (`sampled_block_mass_reference`, what `sampled_blocks` runs on the CPU) is the
same math in PyTorch, float32, a chunk of query blocks at a time. Prediction and measurements: KERNEL_NOTES.md
"Sampled block mass".
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from sparse_compile.kernels.block_mask import _cdiv
from sparse_compile.kernels.limits import MAX_HEAD_DIM, triton_interpreting

__all__ = ["sampled_block_mass", "sampled_block_mass_reference", "sampled_mass_unsupported"]

BLOCK_SIZES = (64, 128)  # key tiles are whole key blocks
CHUNK_BYTES = 1 << 29  # the reference's float32 logits held at once (512 MiB; prism.VERTICAL_CHUNK_BYTES)
SHARED_BYTES = 200 * 1024  # budget of the Q tile plus the pipelined K tiles on CUDA (H100: 227 KiB per program)
LOG2E = math.log2(math.e)


@triton.jit
def _tile_logits(q, k_base, valid_base, tile, qpos, offs_d, LK, window, qk_scale, stride_kl, stride_kd, stride_vl,
                 D: tl.constexpr, BLOCK: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                 HAS_VALID: tl.constexpr, PRECISION: tl.constexpr):
    """Base-2 logits (ROWS, BLOCK) fp32 of the rows' queries q against key block `tile`; -inf where not visible."""
    keys = tile * BLOCK + tl.arange(0, BLOCK)
    k_ok = keys < LK
    kt = tl.load(k_base + keys.to(tl.int64)[None, :] * stride_kl + offs_d[:, None] * stride_kd,
                 mask=(offs_d < D)[:, None] & k_ok[None, :], other=0.0)  # (D_PAD, BLOCK), k's dtype
    s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
    visible = k_ok[None, :] & (qpos[:, None] >= 0)
    if CAUSAL:
        visible = visible & (keys[None, :] <= qpos[:, None])
    if HAS_WINDOW:
        visible = visible & (keys[None, :] > qpos[:, None] - window)
    if HAS_VALID:
        kv = tl.load(valid_base + keys * stride_vl, mask=k_ok, other=0) != 0
        visible = visible & kv[None, :]
    return tl.where(visible, s, float("-inf"))


@triton.jit
def _max_sum_step(m_i, l_i, s):
    """One online-softmax step (base 2): the running row max and sum of exp2 after the tile's logits s."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet: exp2(-inf) = 0
    l_i = l_i * tl.exp2(m_i - m_use) + tl.sum(tl.exp2(s - m_use[:, None]), axis=1)
    return m_new, l_i


@triton.jit
def _store_tile_mass(s, m_use, factor, o_base, tile, stride_on, head_ok, HEADS: tl.constexpr, S_PAD: tl.constexpr):
    """mass[.., tile] of the program's heads: each row's probabilities (weighted) summed over the tile's keys and
    over the head's samples."""
    p = tl.exp2(s - m_use[:, None])
    per_row = tl.sum(p, axis=1) * factor  # (ROWS,): row r is sample r % S_PAD of head r // S_PAD
    per_head = tl.sum(tl.reshape(per_row, (HEADS, S_PAD)), axis=1)
    tl.store(o_base + tile * stride_on, per_head, mask=head_ok)


@triton.jit
def _sampled_mass_kernel(
    Q, K, POS, W, VALID, MASS,
    LQ, LK, nq, nk, n_samples, q_offset, window, qk_scale, G, HKV, H_CHUNKS,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_pm, stride_ps,
    stride_wb, stride_wm, stride_ws,
    stride_vb, stride_vl,
    stride_ob, stride_oh, stride_om, stride_on,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr, HEADS: tl.constexpr, S_PAD: tl.constexpr,
    ZB: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_VALID: tl.constexpr,
    PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    """MASS[b, h, m, :] for the HEADS query heads of chunk c of KV head hk: grid (nq * H_CHUNKS, B * HKV), the
    query blocks last first (the causal ones with the most key tiles start first)."""
    pid = tl.program_id(0)
    m = nq - 1 - pid // H_CHUNKS
    chunk = pid % H_CHUNKS
    bh = tl.program_id(1).to(tl.int64)
    b = bh // HKV
    hk = bh % HKV
    # the rows: sample j = r % S_PAD of head g = chunk * HEADS + r // S_PAD of the KV head's group
    r = tl.arange(0, HEADS * S_PAD)
    g = chunk * HEADS + r // S_PAD
    j = r % S_PAD
    row_ok = (g < G) & (j < n_samples)
    pos = tl.load(POS + m * stride_pm + j * stride_ps, mask=row_ok, other=0)
    w = tl.load(W + b * stride_wb + m * stride_wm + j * stride_ws, mask=row_ok, other=0.0)
    live = row_ok & (w != 0.0) & (pos >= 0) & (pos < LQ)
    w = tl.where(live, w, 0.0)
    qpos = tl.where(live, pos + q_offset, -1)  # key position of the row's query (-1: a dead row sees nothing)
    offs_d = tl.arange(0, D_PAD)
    h = hk * G + g
    q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + pos[:, None] * stride_ql + offs_d[None, :] * stride_qd,
                mask=live[:, None] & (offs_d < D)[None, :], other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    valid_base = VALID + b * stride_vb

    # key blocks read: from the window's start of the first live sample to the causal limit of the last one
    any_live = tl.max(live.to(tl.int32), axis=0) > 0
    n_hi = nk
    if CAUSAL:
        n_hi = tl.minimum(nk, tl.max(qpos, axis=0) // BLOCK + 1)
    n_hi = tl.where(any_live, n_hi, 0)
    n_lo = 0
    if HAS_WINDOW:
        first = tl.min(tl.where(live, qpos, 2147483647), axis=0)
        n_lo = tl.where(any_live, tl.maximum(first - window + 1, 0) // BLOCK, 0)

    # pass 1: each row's max and sum of exp2 over its visible keys
    m_i = tl.full([HEADS * S_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([HEADS * S_PAD], dtype=tl.float32)
    if INTERPRET:  # the interpreter cannot take a run-time `range` bound with numpy >= 2.4
        tile = n_lo
        while tile < n_hi:
            s = _tile_logits(q, k_base, valid_base, tile, qpos, offs_d, LK, window, qk_scale, stride_kl, stride_kd,
                             stride_vl, D, BLOCK, CAUSAL, HAS_WINDOW, HAS_VALID, PRECISION)
            m_i, l_i = _max_sum_step(m_i, l_i, s)
            tile += 1
    else:
        for tile in range(n_lo, n_hi):
            s = _tile_logits(q, k_base, valid_base, tile, qpos, offs_d, LK, window, qk_scale, stride_kl, stride_kd,
                             stride_vl, D, BLOCK, CAUSAL, HAS_WINDOW, HAS_VALID, PRECISION)
            m_i, l_i = _max_sum_step(m_i, l_i, s)
    m_use = tl.where(m_i == float("-inf"), 0.0, m_i)
    factor = tl.where(l_i > 0.0, w / tl.where(l_i > 0.0, l_i, 1.0), 0.0)  # a row with no visible key adds nothing

    # pass 2: the probabilities again, summed per key block and over each head's samples
    heads = chunk * HEADS + tl.arange(0, HEADS)
    head_ok = heads < G
    o_base = MASS + b * stride_ob + (hk * G + heads) * stride_oh + m * stride_om
    if INTERPRET:
        tile = n_lo
        while tile < n_hi:
            s = _tile_logits(q, k_base, valid_base, tile, qpos, offs_d, LK, window, qk_scale, stride_kl, stride_kd,
                             stride_vl, D, BLOCK, CAUSAL, HAS_WINDOW, HAS_VALID, PRECISION)
            _store_tile_mass(s, m_use, factor, o_base, tile, stride_on, head_ok, HEADS, S_PAD)
            tile += 1
    else:
        for tile in range(n_lo, n_hi):
            s = _tile_logits(q, k_base, valid_base, tile, qpos, offs_d, LK, window, qk_scale, stride_kl, stride_kd,
                             stride_vl, D, BLOCK, CAUSAL, HAS_WINDOW, HAS_VALID, PRECISION)
            _store_tile_mass(s, m_use, factor, o_base, tile, stride_on, head_ok, HEADS, S_PAD)

    # the key blocks not read hold no visible key of a live sample: zeros
    zn = tl.arange(0, ZB)
    zeros = tl.zeros([HEADS, ZB], dtype=tl.float32)
    z0 = 0
    while z0 < nk:
        n = z0 + zn
        outside = (n < nk) & ((n < n_lo) | (n >= n_hi))
        tl.store(o_base[:, None] + n[None, :] * stride_on, zeros, mask=head_ok[:, None] & outside[None, :])
        z0 += ZB


def sampled_mass_unsupported(q: Tensor, k: Tensor, block_size: int) -> str | None:
    """Why `sampled_block_mass` cannot take q, k and block_size (the caller then runs the reference), or None.
    Looks at shapes, dtypes and devices only (no host sync)."""
    if q.dim() != 4 or k.dim() != 4:
        return f"q and k must be 4-D (B, H, L, D); got shapes {tuple(q.shape)} and {tuple(k.shape)}"
    B, H, Lq, D = q.shape
    Bk, Hkv, Lk, Dk = k.shape
    if (Bk, Dk) != (B, D):
        return f"k shape {tuple(k.shape)} does not match q shape {tuple(q.shape)} in batch/head_dim"
    if Hkv == 0 or H % Hkv:
        return f"num_heads {H} is not a multiple of num_kv_heads {Hkv}"
    if Lq == 0 or Lk == 0:
        return f"empty sequence: q_len {Lq}, kv_len {Lk}"
    if D > MAX_HEAD_DIM:
        return f"head_dim {D} > {MAX_HEAD_DIM}"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype:
        return f"q/k dtype must be one of float16/bfloat16/float32 and equal; got {q.dtype}/{k.dtype}"
    if k.device != q.device:
        return f"q is on {q.device} but k is on {k.device}"
    if not q.is_cuda and not triton_interpreting():
        return f"the Triton kernel needs CUDA tensors or TRITON_INTERPRET=1 (got {q.device})"
    if block_size not in BLOCK_SIZES:
        return f"block_size must be one of {BLOCK_SIZES}, got {block_size}"
    return None


def _check_inputs(q: Tensor, k: Tensor, positions: Tensor, weights: Tensor, block_size: int, q_offset: int,
                  window: int, key_valid: Tensor | None, max_rows: int | None) -> None:
    why = sampled_mass_unsupported(q, k, block_size)
    if why is not None:
        raise ValueError(why)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    nq = _cdiv(Lq, block_size)
    if positions.dim() != 2 or positions.shape[0] != nq or not 1 <= positions.shape[1] <= block_size \
            or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be (nq={nq}, s) int32/int64 with 1 <= s <= block_size={block_size}, got "
                         f"{positions.dtype} {tuple(positions.shape)}")
    s = positions.shape[1]
    if tuple(weights.shape) != (B, nq, s) or weights.dtype != torch.float32:
        raise ValueError(f"weights must be (B, nq, s) = ({B}, {nq}, {s}) float32, got {weights.dtype} "
                         f"{tuple(weights.shape)}")
    if key_valid is not None and (tuple(key_valid.shape) != (B, Lk) or key_valid.dtype != torch.bool):
        raise ValueError(f"key_valid must be a (B, Lk) = ({B}, {Lk}) bool tensor, got {key_valid.dtype} "
                         f"{tuple(key_valid.shape)}")
    others = [positions, weights] + ([] if key_valid is None else [key_valid])
    if any(t.device != q.device for t in others):
        raise ValueError(f"positions, weights and key_valid must be on q's device {q.device}, got "
                         f"{[str(t.device) for t in others]}")
    if q_offset < 0 or window < 0:
        raise ValueError(f"q_offset ({q_offset}) and window ({window}) must be >= 0")
    if max_rows is not None and (max_rows < 16 or max_rows & (max_rows - 1)):
        raise ValueError(f"max_rows must be a power of two >= 16, got {max_rows}")


def _launch_config(d_pad: int, elem_bytes: int, block_size: int, cuda: bool) -> tuple[int, int]:
    """(max_rows, num_stages): on CUDA at most 128 rows, shrunk (stages first, then rows) until the Q tile and the
    pipelined K tiles fit SHARED_BYTES; under the interpreter one program takes a KV head's whole group."""
    if not cuda:
        return 1 << 20, 1
    rows, stages = 128, 2
    while elem_bytes * d_pad * (rows + stages * block_size) > SHARED_BYTES:
        if stages > 1:
            stages -= 1
        elif rows > 16:
            rows //= 2
        else:
            break
    return rows, stages


def sampled_block_mass(
    q: Tensor,
    k: Tensor,
    positions: Tensor,
    weights: Tensor,
    *,
    block_size: int,
    scale: float,
    q_offset: int,
    causal: bool = True,
    window: int = 0,
    key_valid: Tensor | None = None,
    max_rows: int | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """The sampled block mass (module docstring) in one Triton launch; no host sync.

    q: (B, H, Lq, D), k: (B, Hkv, Lk, D), fp16/bf16/fp32 (equal), any strides, CUDA (or CPU under
    TRITON_INTERPRET=1); positions: (nq, s) int32/int64 query indices, row m inside query block m (a position
    outside [0, Lq) is a dead sample), 1 <= s <= block_size; weights: (B, nq, s) float32; block_size: 64 or 128;
    scale: the softmax scale; q_offset >= 0: query i sits at key position q_offset + i; window: 0 (none) or the
    sliding window; key_valid: (B, Lk) bool or None (all valid). max_rows: rows (heads x padded samples) per
    program, a power of two >= 16 (None: fit to the device; at least one head's samples are taken). out: a
    (B, H, nq, nk) float32 tensor on q's device to write into (any strides), or None. Returns mass (B, H, nq, nk)
    float32 (`out` when given), every entry written. ValueError for inputs that do not fit.
    """
    _check_inputs(q, k, positions, weights, block_size, q_offset, window, key_valid, max_rows)
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = H // Hkv
    nq, nk = _cdiv(Lq, block_size), _cdiv(Lk, block_size)
    s = positions.shape[1]
    if out is None:
        mass = torch.empty(B, H, nq, nk, dtype=torch.float32, device=q.device)
    elif tuple(out.shape) != (B, H, nq, nk) or out.dtype != torch.float32 or out.device != q.device:
        raise ValueError(f"out must be a (B, H, nq, nk) = ({B}, {H}, {nq}, {nk}) float32 tensor on {q.device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    else:
        mass = out
    if B == 0 or H == 0:
        return mass
    d_pad = max(16, triton.next_power_of_2(D))
    cap, stages = _launch_config(d_pad, q.element_size(), block_size, q.is_cuda)
    if max_rows is not None:
        cap = max_rows
    s_pad = triton.next_power_of_2(s)
    heads = min(triton.next_power_of_2(G), max(1, cap // s_pad))
    s_pad = max(s_pad, 16 // heads)  # tl.dot needs M >= 16: pad the samples
    h_chunks = _cdiv(G, heads)
    rows = heads * s_pad
    fp32 = q.dtype == torch.float32
    precision = ("tf32x3" if q.is_cuda else "ieee") if fp32 else "tf32"  # (16-bit inputs: ignored)
    valid = key_valid if key_valid is not None else positions  # any pointer: HAS_VALID is off
    valid_strides = key_valid.stride() if key_valid is not None else (0, 0)
    _sampled_mass_kernel[(nq * h_chunks, B * Hkv)](
        q, k, positions, weights, valid, mass,
        Lq, Lk, nq, nk, s, q_offset, window, float(scale) * LOG2E, G, Hkv, h_chunks,
        *q.stride(), *k.stride(), *positions.stride(), *weights.stride(), *valid_strides, *mass.stride(),
        D=D, D_PAD=d_pad, BLOCK=block_size, HEADS=heads, S_PAD=s_pad, ZB=min(256, triton.next_power_of_2(nk)),
        CAUSAL=bool(causal), HAS_WINDOW=window > 0, HAS_VALID=key_valid is not None, PRECISION=precision,
        INTERPRET=not q.is_cuda, num_warps=8 if rows * block_size >= 16384 else 4, num_stages=stages,
    )
    return mass


def sampled_block_mass_reference(
    q: Tensor,
    k: Tensor,
    positions: Tensor,
    weights: Tensor,
    *,
    block_size: int,
    scale: float,
    q_offset: int,
    causal: bool = True,
    window: int = 0,
    key_valid: Tensor | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> Tensor:
    """`sampled_block_mass` in PyTorch, float32 (the definition; `sampled_blocks` runs it on the CPU).

    The arguments of `sampled_block_mass` (positions[m] must lie in query block m). The logits of one KV head's
    group are computed for as many query blocks at a time as keep them under `chunk_bytes` (causal: only the keys up
    to the chunk's last sample). No host synchronisation. Returns mass (B, H, nq, nk) float32.
    """
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = H // Hkv
    dev = q.device
    nq, nk = _cdiv(Lq, block_size), _cdiv(Lk, block_size)
    samples = positions.shape[1]
    pos, take = positions, weights
    kv_valid = torch.ones(B, Lk, dtype=torch.bool, device=dev) if key_valid is None else key_valid
    mass = torch.zeros(B, H, nq, nk, dtype=torch.float32, device=dev)
    per_block = max(1, chunk_bytes // (4 * B * G * samples * Lk))
    j = torch.arange(Lk, device=dev)
    for m0 in range(0, nq, per_block):
        m1 = min(nq, m0 + per_block)
        rows = pos[m0:m1].reshape(-1)  # (R,) query indices
        key_pos = rows[:, None] + q_offset
        hi = Lk
        if causal:  # keys past the chunk's last sample are never visible: skip them
            hi = max(1, min(Lk, (min(m1 * block_size, Lq) - 1) + q_offset + 1))
        visible = torch.ones(rows.numel(), hi, dtype=torch.bool, device=dev)
        if causal:
            visible &= j[None, :hi] <= key_pos
        if window:
            visible &= j[None, :hi] > key_pos - window
        visible = visible[None] & kv_valid[:, None, :hi]  # (B, R, hi)
        qs = q[:, :, rows].reshape(B, Hkv, G * rows.numel(), D).float()
        for h in range(Hkv):
            logits = torch.matmul(qs[:, h], k[:, h, :hi].float().transpose(-1, -2)) * scale  # (B, G*R, hi)
            logits = logits.view(B, G, rows.numel(), hi).masked_fill(~visible[:, None], float("-inf"))
            probs = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)
            probs = torch.nn.functional.pad(probs, (0, nk * block_size - hi)).view(B, G, rows.numel(), nk, block_size)
            per_row = probs.sum(-1).view(B, G, m1 - m0, samples, nk) * take[:, None, m0:m1, :, None]
            mass[:, h * G:(h + 1) * G, m0:m1] = per_row.sum(3)
    return mass
