"""FASA token selection for decode: token importance from a few dominant RoPE frequency chunks
(arXiv 2602.03152; spec in shared/specs/fasa.md). Attention over the chosen tokens is the shared
sparse decode kernel (kernels/sparse_decode.py).

Frequency chunks. A head of width D has D/2 chunks. Chunk c < R/2 (R = rotary_dim) is RoPE's own pair of
dims: (c, c + R/2) for rotate-half layouts (Llama, Qwen, Mistral), (2c, 2c + 1) for interleaved ones
(Cohere, GPT-J). Partial rotary: the D - R pass-through dims are not rotated; they are grouped as extra
chunks of consecutive pairs, c = R/2 + j -> (R + 2j, R + 2j + 1), and ranked by calibration like the
others (they carry no position, so they are scored, never assumed dominant or ignored).
`layout="adjacent"` is the authors' released pairing, (2c, 2c + 1) whatever the layout: on rotate-half
models it mixes two different frequencies (kept only to measure it; EVAL.md).

Steps of one decode call (q: (B, H, 1, D), K: (B, Hkv, Lk, D)):
  1. `chunk_tables`: the layer's dominant chunks -> per KV head the 16-dim segments of K that hold a
     dominant dim of one of its query heads (Hkv, NSEG) int32 (segment start dims, -1 = none), and per
     query head a 0/1 mask of its own dominant dims (H, D) float32.
  2. `fasa_scores` (Triton; `fasa_scores_reference` in PyTorch): per query head the partial score
     sum_{c dominant} q_c . k_c (no scale, as the authors) of every key, reading only those segments of K
     (one 32-byte sector per bf16 row and segment: a dim-by-dim gather would issue 2-byte loads);
     `per_kv_head`: the group's heads' scores summed, one score per KV head. Keys the query cannot see
     (causal, window, padding) score -inf; forced keys (the first `sink` and the last `recent` visible
     keys) score +inf.
  3. `select_tokens`: torch.topk of the scores, `k` slots per score row (ties are broken as torch.topk
     breaks them: unspecified); a slot whose score is -inf (fewer visible keys than slots) becomes the
     sentinel -1. For fractional budgets with padding `counts` caps each row at ceil(fraction * visible).
     (A Triton radix select was measured slower than torch.topk: KERNEL_NOTES.md.)
  4. sparse_decode_attention over those slots with the usual 1/sqrt(D) scale (exact over the selection).

Nothing here synchronises with the host or allocates by data: the CUDA path can be captured in a graph.
This file imports nothing above `sparse_compile.kernels` (the caller passes visibility as a state vector).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from sparse_compile.kernels.device_constants import host_constant, on_device
from sparse_compile.kernels.limits import triton_interpreting

LAYOUTS = ("rotate_half", "interleaved", "adjacent")
INVISIBLE, VISIBLE, FORCED = 0, 1, 2  # the per-key state vector


# ---------------------------------------------------------------------------------------------
# chunks -> dims
# ---------------------------------------------------------------------------------------------


def chunk_dims(chunk: int, layout: str, rotary_dim: int, head_dim: int) -> tuple[int, int]:
    """The two head dims of frequency chunk `chunk` (module docstring)."""
    if not 0 <= chunk < head_dim // 2:
        raise ValueError(f"chunk {chunk} out of range [0, {head_dim // 2}) for head_dim {head_dim}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    half = rotary_dim // 2
    if layout == "adjacent":
        return 2 * chunk, 2 * chunk + 1
    if chunk >= half:  # pass-through dims of partial rotary, consecutive pairs
        j = chunk - half
        return rotary_dim + 2 * j, rotary_dim + 2 * j + 1
    if layout == "rotate_half":
        return chunk, chunk + half
    return 2 * chunk, 2 * chunk + 1


def default_chunk_count(head_dim: int, fraction: float = 0.25) -> int:
    """`fraction` of the head's D/2 chunks, at least 1 (a quarter: the authors keep 16 of 64 for D = 128)."""
    return max(1, min(head_dim // 2, round(fraction * (head_dim // 2))))


def default_chunks(rotary_dim: int, head_dim: int, count: int) -> tuple[int, ...]:
    """The model-agnostic rule, for models without calibrated chunks: the `count` lowest-frequency rotary
    chunks (c = R/2 - 1 down: the slowly rotating dims, which carry content rather than position), then
    pass-through chunks if R/2 < count. On SmolLM2 the calibrated choice leans the same way (68% of the
    calibrated chunks of layers 1-29 lie in the lower-frequency half, 39% in this quarter) but the rule
    predicts worse (top-1024 recall 0.61 against 0.78; EVAL.md): calibrate when you can."""
    half = rotary_dim // 2
    order = list(range(half - 1, -1, -1)) + list(range(half, head_dim // 2))
    return tuple(sorted(order[:count]))


SEGMENT = 16  # dims per K segment the scores read: 32 bytes (one memory sector) of a bf16/fp16 row


def chunk_tables(per_head: tuple[tuple[int, ...], ...], num_heads: int, num_kv_heads: int, head_dim: int,
                 rotary_dim: int, layout: str, device: str) -> tuple[Tensor, Tensor]:
    """(segs (Hkv, NSEG) int32, member (H, D) float32) for one layer's dominant chunks.

    per_head: one chunk tuple per query head (len H), per KV head (len Hkv), or one for all (len 1).
    segs[g] lists the start dims (multiples of SEGMENT) of the segments of K holding a dominant dim of one
    of KV head g's query heads, ascending, padded with -1; member[h, d] = 1 iff d is a dominant dim of h.
    Built once per layer on the host (memoised, page-locked) and copied to `device` per call: a copy a CUDA
    graph can capture, and no memoised tensor inside a CUDA-graph memory pool (`device_constants`).
    """
    segs, member = host_chunk_tables(per_head, num_heads, num_kv_heads, head_dim, rotary_dim, layout)
    return on_device(segs, device), on_device(member, device)


@functools.lru_cache(maxsize=512)
def host_chunk_tables(per_head: tuple[tuple[int, ...], ...], num_heads: int, num_kv_heads: int, head_dim: int,
                      rotary_dim: int, layout: str) -> tuple[Tensor, Tensor]:
    """`chunk_tables` on the host (memoised, page-locked when CUDA is available)."""
    H, Hkv = num_heads, num_kv_heads
    if len(per_head) not in (H, Hkv, 1):
        raise ValueError(f"chunks name {len(per_head)} heads; expected {H} (query heads), {Hkv} (KV heads) or 1")
    group = H // Hkv
    member = torch.zeros(H, head_dim, dtype=torch.float32)
    for h in range(H):
        chunks = per_head[0 if len(per_head) == 1 else (h if len(per_head) == H else h // group)]
        for c in chunks:
            member[h, list(chunk_dims(c, layout, rotary_dim, head_dim))] = 1.0
    used = member.view(Hkv, group, head_dim).amax(1) > 0  # (Hkv, D)
    starts = [[s for s in range(0, head_dim, SEGMENT) if bool(used[g, s:s + SEGMENT].any())] for g in range(Hkv)]
    segs = torch.full((Hkv, max(len(x) for x in starts)), -1, dtype=torch.int32)
    for g, x in enumerate(starts):
        segs[g, : len(x)] = torch.tensor(x, dtype=torch.int32)
    return host_constant(segs), host_constant(member)


# ---------------------------------------------------------------------------------------------
# step 2: scores (Triton)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _fasa_scores_kernel(
    Q, K, SEGS, MEMBER, STATE, SCORES,
    kv_len, q_offset, window, sink, recent, lo_vis, hi_vis,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_sg, stride_mh, stride_stb, stride_stn,
    stride_sb, stride_sh, stride_sn,
    GQ: tl.constexpr, NSEG: tl.constexpr, HEAD_DIM: tl.constexpr, SEG: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_STATE: tl.constexpr, PER_KV_HEAD: tl.constexpr,
    IEEE_DOT: tl.constexpr,
):
    """Scores of BLOCK_N keys of one (batch, KV head): K is read in the group's dominant segments only."""
    pid_n = tl.program_id(0)
    hkv = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_s = tl.arange(0, SEG)
    offs_g = tl.arange(0, BLOCK_G)
    g_ok = offs_g < GQ
    n_ok = offs_n < kv_len
    heads = hkv * GQ + offs_g
    k_rows = K + b * stride_kb + hkv * stride_kh + offs_n[:, None].to(tl.int64) * stride_kn

    # 1-2. per segment: the group's queries there (zero off each head's own dims) and K's segment (one
    # sector per row); partial scores (BLOCK_N, BLOCK_G) accumulate over the segments
    s = tl.zeros((BLOCK_N, BLOCK_G), dtype=tl.float32)
    for i in tl.static_range(NSEG):
        start = tl.load(SEGS + hkv * stride_sg + i)
        dims = start + offs_s
        d_ok = (dims < HEAD_DIM) & (start >= 0)
        qm = g_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + dims[None, :] * stride_qd, mask=qm, other=0.0)
        own = tl.load(MEMBER + heads[:, None] * stride_mh + dims[None, :], mask=qm, other=0.0)
        q = (q.to(tl.float32) * own).to(K.dtype.element_ty)
        k = tl.load(k_rows + dims[None, :] * stride_kd, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if IEEE_DOT:
            s = tl.dot(k, tl.trans(q), s, input_precision="ieee")
        else:
            s = tl.dot(k, tl.trans(q), s)

    # 3. visibility and forced keys: the caller's state vector, or causal/window arithmetic
    if HAS_STATE:
        state = tl.load(STATE + b * stride_stb + offs_n * stride_stn, mask=n_ok, other=0)
        visible = state != 0
        forced = state == 2
    else:
        visible = n_ok
        if CAUSAL:
            visible = visible & (offs_n <= q_offset)
        if window > 0:
            visible = visible & (offs_n > q_offset - window)
        forced = visible & ((offs_n < lo_vis + sink) | (offs_n > hi_vis - recent))

    # 4. store: one row per query head, or the group's sum per KV head
    if PER_KV_HEAD:
        total = tl.sum(s, axis=1)
        total = tl.where(forced, float("inf"), tl.where(visible, total, float("-inf")))
        tl.store(SCORES + b * stride_sb + hkv * stride_sh + offs_n * stride_sn, total, mask=n_ok)
    else:
        s = tl.where(forced[:, None], float("inf"), tl.where(visible[:, None], s, float("-inf")))
        tl.store(SCORES + b * stride_sb + heads[None, :] * stride_sh + offs_n[:, None] * stride_sn, s,
                 mask=n_ok[:, None] & g_ok[None, :])


def visible_range(kv_len: int, causal: bool, q_offset: int, window: int) -> tuple[int, int]:
    """(first, last) visible key of the one decode query without padding (last < first: none)."""
    hi = min(kv_len - 1, q_offset) if causal else kv_len - 1
    lo = max(0, q_offset - window + 1) if window else 0
    return lo, hi


def fasa_scores(q: Tensor, k: Tensor, segs: Tensor, member: Tensor, *, per_kv_head: bool, causal: bool = True,
                q_offset: int | None = None, window: int = 0, state: Tensor | None = None, sink: int = 0,
                recent: int = 0) -> Tensor:
    """Step 2 in Triton (CUDA, or CPU under TRITON_INTERPRET=1).

    q: (B, H, 1, D); k: (B, Hkv, Lk, D) (fp16/bf16/fp32); segs (Hkv, NSEG) int32 and member (H, D) float32
    from `chunk_tables`. Visibility: `state` (B, Lk) int8 from `key_state` (padding), or else the causal /
    window arithmetic with q_offset (default Lk - 1) and the sink/recent counts. Returns (B, S, Lk) float32,
    S = Hkv if per_kv_head else H: partial scores, -inf for invisible keys, +inf for forced ones.
    """
    B, H, _, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if q.shape[2] != 1 or k.shape[0] != B or k.shape[3] != D or H % Hkv:
        raise ValueError(f"q {tuple(q.shape)} / k {tuple(k.shape)}: expected (B, H, 1, D) / (B, Hkv, Lk, D)")
    if tuple(segs.shape[:1]) != (Hkv,) or tuple(member.shape) != (H, D):
        raise ValueError(f"segs {tuple(segs.shape)} / member {tuple(member.shape)} do not fit H={H}, Hkv={Hkv}, D={D}")
    if not (q.is_cuda or triton_interpreting()):
        raise ValueError("fasa_scores needs CUDA tensors or TRITON_INTERPRET=1 (use fasa_scores_reference)")
    q_offset = Lk - 1 if q_offset is None else int(q_offset)
    S = Hkv if per_kv_head else H
    scores = torch.empty(B, S, Lk, dtype=torch.float32, device=q.device)
    lo, hi = visible_range(Lk, causal, q_offset, window)
    dummy = torch.empty(1, 1, dtype=torch.int8, device=q.device)  # never read without HAS_STATE
    st = state if state is not None else dummy
    block_n = 128 if q.is_cuda else 32
    _fasa_scores_kernel[(triton.cdiv(Lk, block_n), Hkv, B)](
        q, k, segs, member, st, scores,
        Lk, q_offset, window, sink, recent, lo, hi,
        q.stride(0), q.stride(1), q.stride(3), *k.stride(),
        segs.stride(0), member.stride(0), st.stride(0), st.stride(1), *scores.stride(),
        GQ=H // Hkv, NSEG=segs.shape[1], HEAD_DIM=D, SEG=SEGMENT,
        BLOCK_G=max(16, triton.next_power_of_2(H // Hkv)), BLOCK_N=block_n, CAUSAL=causal,
        HAS_STATE=state is not None, PER_KV_HEAD=per_kv_head, IEEE_DOT=q.dtype == torch.float32, num_warps=4,
    )
    return scores


# ---------------------------------------------------------------------------------------------
# references and the steps shared by both paths (PyTorch)
# ---------------------------------------------------------------------------------------------


def key_state(visible: Tensor, sink: int, recent: int) -> Tensor:
    """(B, Lk) bool visibility -> (B, Lk) int8 state: 0 invisible, 1 visible, 2 forced (among the first
    `sink` or the last `recent` visible keys)."""
    vis = visible.to(torch.int32)
    rank = vis.cumsum(-1) - 1
    rank_back = vis.flip(-1).cumsum(-1).flip(-1) - 1
    forced = visible & ((rank < sink) | (rank_back < recent))
    return (visible.to(torch.int8) + forced.to(torch.int8)).contiguous()


def fasa_scores_reference(q: Tensor, k: Tensor, segs: Tensor, member: Tensor, state: Tensor, *,
                          per_kv_head: bool) -> Tensor:
    """Step 2 in PyTorch over the full head dim (q masked to each head's dominant dims): float32 (float64
    for float64 inputs). segs is not needed (it only limits what the kernel reads). state: (B, Lk) int8 from
    `key_state`. Returns (B, S, Lk) as `fasa_scores`."""
    B, H, _, D = q.shape
    Hkv = k.shape[1]
    group = H // Hkv
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    own = member.to(work)
    qq = q[:, :, 0].to(work) * own  # (B, H, D)
    kk = k.to(work).repeat_interleave(group, dim=1)  # (B, H, Lk, D)
    scores = torch.einsum("bhd,bhnd->bhn", qq, kk)
    if per_kv_head:
        scores = scores.view(B, Hkv, group, -1).sum(2)
    scores = scores.to(torch.float32)
    scores = scores.masked_fill(state[:, None] == INVISIBLE, float("-inf"))
    return scores.masked_fill(state[:, None] == FORCED, float("inf"))


def budget_slots(budget: float, kv_len: int, sink: int, recent: int) -> int:
    """Top-k slots per score row for a key length: budget tokens (budget >= 1) or ceil(budget * kv_len)
    (a fraction), at least sink + recent, at most kv_len."""
    want = int(budget) if budget >= 1 else math.ceil(budget * kv_len)
    return max(1, min(kv_len, max(want, sink + recent)))


def select_tokens(scores: Tensor, slots: int, counts: Tensor | None = None) -> Tensor:
    """Step 3: (B, S, Lk) scores -> (B, S, slots) token indices of the top scores (torch.topk; ties as
    torch.topk breaks them), -1 where the score is -inf (an invisible key). counts: (B, S) or None; row r
    keeps its `counts[r]` best slots (the others become -1). The slots are in torch.topk's unsorted order
    unless counts are given (sorting 2048 of 128K keys per row costs 15-20 us on H100; attention ignores
    order)."""
    values, idx = torch.topk(scores, slots, dim=-1, largest=True, sorted=counts is not None)
    idx = torch.where(values == float("-inf"), torch.full_like(idx, -1), idx)
    if counts is not None:
        slot = torch.arange(slots, device=scores.device)
        idx = torch.where(slot[None, None, :] < counts[..., None], idx, torch.full_like(idx, -1))
    return idx
