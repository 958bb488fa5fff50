"""Two-stage decode selection in Triton: page bounds over a SparseCache's page summaries, then exact partial
scores of the candidate pages' keys (shared/specs/quest_pages.md; the algorithm and its PyTorch form are in
sparse_compile/methods/two_stage.py, which calls these kernels on CUDA).

    page_bounds(q, page_min, page_max, state, page_size, *, q_mask=None, reduce="none")
        q: (B, H, 1, D); page_min, page_max: (B, Hkv, NP, D) (+inf / -inf on pages no key was written to);
        state: (B, Lk) int8 per-key state (kernels.fasa.key_state: 0 invisible, 1 visible, 2 forced);
        q_mask: (H, D) 0/1 (which dims each query head scores) or None (every dim).
        Returns (B, S, NP) float32, S = H (reduce "none"), Hkv ("sum" / "max" over the group):
            U[b, h, p] = sum_d max(q'_d m_d, q'_d M_d) = q'+ . M + q'- . m,   q' = q * q_mask
        an upper bound of q'_h . k over the keys of page p; -inf where no key of the page is visible, +inf
        where one is forced (so forced pages are always kept, invisible ones never); a page whose bound is
        NaN (summaries of unwritten slots) counts as +inf: never dropped on a bad bound.
    candidate_scores(q, key_dims, head_dims, member, pages, state, page_size, *, per_kv_head)
        key_dims: (B, Hkv, Lk, n) K's dims per KV head, contiguous (SparseCache); head_dims: (H, n) int, the
        head dim of column j for query head h; member: (H, n) 0/1, column j is one of head h's own dims;
        pages: (B, Hkv, K) int64 candidate page ids, -1 = none. Returns (scores (B, S, K * P) float32,
        tokens (B, Hkv, K * P) int64): FASA's partial score sum_j member[h, j] q[h, head_dims[h, j]]
        key_dims[t, j] of each candidate token t = page * P + i (summed over the group per_kv_head), -inf
        for invisible / out-of-range / padding slots (token -1 there), +inf for forced keys.

Both kernels read only the summaries (2 D values per page) and the candidate rows of key_dims: nothing reads
all of K. They cast q to the cache's dtype for the dot (tensor cores; fp32 inputs use IEEE fp32 dots) and
accumulate in fp32, as kernels/fasa.py's scoring kernel does. No host synchronisation, no data-dependent
allocation: capturable in a CUDA graph. `page_bounds_reference` / `candidate_scores_reference` (PyTorch, the
same math in float32 or float64) are what the kernels must equal.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from sparse_compile.kernels.limits import triton_interpreting

REDUCE_MODES = ("none", "sum", "max")
PAGE_SIZES = (16, 32, 64)


# ---------------------------------------------------------------------------------------------
# stage 1: page bounds
# ---------------------------------------------------------------------------------------------


@triton.jit
def _page_bounds_kernel(
    Q, QMASK, PMIN, PMAX, STATE, OUT,
    n_pages, kv_len,
    stride_qb, stride_qh, stride_qd, stride_mh, stride_md,
    stride_pb, stride_ph, stride_pp, stride_pd,
    stride_xb, stride_xh, stride_xp, stride_xd,
    stride_sb, stride_sn,
    stride_ob, stride_oh, stride_op,
    GQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_P: tl.constexpr, PAGE: tl.constexpr, HAS_MASK: tl.constexpr, REDUCE: tl.constexpr,
    IEEE_DOT: tl.constexpr,
):
    """Bounds of BLOCK_P pages of one (batch, KV head) for the group's GQ query heads."""
    pid_p = tl.program_id(0)
    hkv = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    p_ok = offs_p < n_pages
    g_ok = offs_g < GQ
    d_ok = offs_d < HEAD_DIM
    heads = hkv * GQ + offs_g

    # 1. the group's queries, split by sign (q' = q * mask), in the summaries' dtype for the dot
    qm = g_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd, mask=qm, other=0.0)
    q = q.to(tl.float32)
    if HAS_MASK:
        q = q * tl.load(QMASK + heads[:, None] * stride_mh + offs_d[None, :] * stride_md, mask=qm, other=0.0)
    q_pos = tl.maximum(q, 0.0).to(PMAX.dtype.element_ty)
    q_neg = tl.minimum(q, 0.0).to(PMIN.dtype.element_ty)

    # 2. U = q+ . M + q- . m for every page of the block: (BLOCK_G, BLOCK_P)
    pm = p_ok[:, None] & d_ok[None, :]
    p_rows = b * stride_pb + hkv * stride_ph + offs_p[:, None].to(tl.int64) * stride_pp
    x_rows = b * stride_xb + hkv * stride_xh + offs_p[:, None].to(tl.int64) * stride_xp
    # masked lanes load 0 (0 * 0 = 0): an unwritten page's +-inf only meets the dims it holds
    page_max = tl.load(PMAX + x_rows + offs_d[None, :] * stride_xd, mask=pm, other=0.0)
    page_min = tl.load(PMIN + p_rows + offs_d[None, :] * stride_pd, mask=pm, other=0.0)
    if IEEE_DOT:
        u = tl.dot(q_pos, tl.trans(page_max), input_precision="ieee")
        u = tl.dot(q_neg, tl.trans(page_min), u, input_precision="ieee")
    else:
        u = tl.dot(q_pos, tl.trans(page_max))
        u = tl.dot(q_neg, tl.trans(page_min), u)
    u = tl.where(u == u, u, float("inf"))  # NaN (inf - inf from an unwritten slot's summary): never dropped

    # 3. page visibility from the per-key state: the page's largest state (0 none visible, 2 one forced)
    offs_i = tl.arange(0, PAGE)
    keys = offs_p[:, None] * PAGE + offs_i[None, :]
    st = tl.load(STATE + b * stride_sb + keys.to(tl.int64) * stride_sn, mask=p_ok[:, None] & (keys < kv_len),
                 other=0)
    page_state = tl.max(st.to(tl.int32), axis=1)  # (BLOCK_P,)

    # 4. reduce over the group (or not) and store
    if REDUCE == 0:
        u = tl.where(page_state[None, :] == 2, float("inf"), tl.where(page_state[None, :] >= 1, u, float("-inf")))
        tl.store(OUT + b * stride_ob + heads[:, None] * stride_oh + offs_p[None, :] * stride_op, u,
                 mask=g_ok[:, None] & p_ok[None, :])
    else:
        if REDUCE == 1:
            total = tl.sum(tl.where(g_ok[:, None], u, 0.0), axis=0)
        else:
            total = tl.max(tl.where(g_ok[:, None], u, float("-inf")), axis=0)
        total = tl.where(page_state == 2, float("inf"), tl.where(page_state >= 1, total, float("-inf")))
        tl.store(OUT + b * stride_ob + hkv * stride_oh + offs_p * stride_op, total, mask=p_ok)


def _check_device(*tensors: Tensor, what: str) -> None:
    device = tensors[0].device
    for t in tensors:
        if t.device != device:
            raise ValueError(f"{what}: every tensor must be on {device}, got one on {t.device}")
    if not (device.type == "cuda" or triton_interpreting()):
        raise ValueError(f"{what} needs CUDA tensors or TRITON_INTERPRET=1 (the PyTorch path is "
                         f"methods/two_stage.py); got {device}")


def check_page_inputs(q: Tensor, page_min: Tensor, page_max: Tensor, state: Tensor, page_size: int,
                      q_mask: Tensor | None, reduce: str) -> None:
    """ValueError naming the problem when the page-bound inputs do not fit each other."""
    if q.dim() != 4 or q.shape[2] != 1:
        raise ValueError(f"q must be (B, H, 1, D), got {tuple(q.shape)}")
    B, H, _, D = q.shape
    if page_min.shape != page_max.shape or page_min.dim() != 4 or page_min.shape[0] != B or page_min.shape[3] != D:
        raise ValueError(f"page_min {tuple(page_min.shape)} / page_max {tuple(page_max.shape)} must both be "
                         f"(B={B}, Hkv, NP, D={D})")
    Hkv, n_pages = page_min.shape[1], page_min.shape[2]
    if H % Hkv:
        raise ValueError(f"query heads {H} are not a multiple of the summaries' KV heads {Hkv}")
    if page_size not in PAGE_SIZES:
        raise ValueError(f"page_size must be one of {PAGE_SIZES}, got {page_size}")
    if state.dim() != 2 or state.shape[0] != B or state.dtype != torch.int8:
        raise ValueError(f"state must be (B={B}, Lk) int8, got {tuple(state.shape)} {state.dtype}")
    if n_pages != -(-state.shape[1] // page_size):
        raise ValueError(f"{n_pages} pages do not cover {state.shape[1]} keys at page_size {page_size}")
    if q_mask is not None and tuple(q_mask.shape) != (H, D):
        raise ValueError(f"q_mask must be (H={H}, D={D}), got {tuple(q_mask.shape)}")
    if reduce not in REDUCE_MODES:
        raise ValueError(f"reduce must be one of {REDUCE_MODES}, got {reduce!r}")
    if page_min.dtype != page_max.dtype or page_min.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"page summaries must share a float16/bfloat16/float32 dtype, got {page_min.dtype} / "
                         f"{page_max.dtype}")


def page_bounds(q: Tensor, page_min: Tensor, page_max: Tensor, state: Tensor, page_size: int, *,
                q_mask: Tensor | None = None, reduce: str = "none") -> Tensor:
    """Stage 1 in Triton (module docstring). Returns (B, S, NP) float32."""
    check_page_inputs(q, page_min, page_max, state, page_size, q_mask, reduce)
    _check_device(q, page_min, page_max, state, *(() if q_mask is None else (q_mask,)), what="page_bounds")
    B, H, _, D = q.shape
    Hkv, n_pages = page_min.shape[1], page_min.shape[2]
    S = H if reduce == "none" else Hkv
    out = torch.empty(B, S, n_pages, dtype=torch.float32, device=q.device)
    mask = q_mask if q_mask is not None else out  # a dummy pointer, never read without HAS_MASK
    block_p = 64 if q.is_cuda else 16
    _page_bounds_kernel[(triton.cdiv(n_pages, block_p), Hkv, B)](
        q, mask, page_min, page_max, state, out,
        n_pages, state.shape[1],
        q.stride(0), q.stride(1), q.stride(3), mask.stride(0), mask.stride(1) if q_mask is not None else 0,
        *page_min.stride(), *page_max.stride(), *state.stride(), *out.stride(),
        GQ=H // Hkv, HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_G=max(16, triton.next_power_of_2(H // Hkv)),
        BLOCK_P=block_p, PAGE=page_size, HAS_MASK=q_mask is not None, REDUCE=REDUCE_MODES.index(reduce),
        IEEE_DOT=page_min.dtype == torch.float32, num_warps=4,
    )
    return out


def page_bounds_reference(q: Tensor, page_min: Tensor, page_max: Tensor, state: Tensor, page_size: int, *,
                          q_mask: Tensor | None = None, reduce: str = "none") -> Tensor:
    """`page_bounds` in PyTorch (float32; float64 for float64 q), q rounded to the summaries' dtype as the
    kernel's dot sees it."""
    check_page_inputs(q, page_min, page_max, state, page_size, q_mask, reduce)
    B, H, _, D = q.shape
    Hkv, n_pages = page_min.shape[1], page_min.shape[2]
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    qq = q[:, :, 0].to(work)
    if q_mask is not None:
        qq = qq * q_mask.to(work)
    q_pos = qq.clamp(min=0).to(page_max.dtype).to(work).view(B, Hkv, H // Hkv, D)
    q_neg = qq.clamp(max=0).to(page_min.dtype).to(work).view(B, Hkv, H // Hkv, D)
    # 0 * inf = NaN where a query dim is 0 on an unwritten summary: the kernel's dot does the same
    u = torch.matmul(q_pos, page_max.to(work).transpose(-1, -2))
    u = u + torch.matmul(q_neg, page_min.to(work).transpose(-1, -2))
    u = torch.where(torch.isnan(u), float("inf"), u)  # (B, Hkv, G, NP)
    if reduce == "sum":
        u = u.sum(2, keepdim=True)
    elif reduce == "max":
        u = u.amax(2, keepdim=True)
    u = u.reshape(B, -1, n_pages)
    padded = torch.zeros(B, n_pages * page_size, dtype=torch.int8, device=state.device)
    padded[:, : state.shape[1]] = state
    st = padded.view(B, n_pages, page_size).amax(-1)[:, None, :]
    u = torch.where(st >= 1, u, float("-inf"))
    return torch.where(st == 2, float("inf"), u).to(torch.float32 if work == torch.float32 else work)


# ---------------------------------------------------------------------------------------------
# stage 2: exact partial scores of the candidate pages' keys
# ---------------------------------------------------------------------------------------------


@triton.jit
def _candidate_scores_kernel(
    Q, KD, HDIMS, MEMBER, PAGES, STATE, SCORES, TOKENS,
    kv_len, n_kept,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kj,
    stride_hh, stride_hj, stride_mh, stride_mj,
    stride_pb, stride_ph, stride_pk,
    stride_sb, stride_sn,
    stride_ob, stride_oh, stride_oc,
    stride_tb, stride_th, stride_tc,
    GQ: tl.constexpr, N_DIMS: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_C: tl.constexpr, PAGE: tl.constexpr, PER_KV_HEAD: tl.constexpr, IEEE_DOT: tl.constexpr,
):
    """Scores of BLOCK_C candidate slots (BLOCK_C / PAGE pages) of one (batch, KV head)."""
    pid_c = tl.program_id(0)
    hkv = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_g = tl.arange(0, BLOCK_G)
    offs_j = tl.arange(0, BLOCK_J)
    c_ok = offs_c < n_kept * PAGE
    g_ok = offs_g < GQ
    j_ok = offs_j < N_DIMS
    heads = hkv * GQ + offs_g

    # 1. slot -> token: page id of the slot's page, offset inside it
    page = tl.load(PAGES + b * stride_pb + hkv * stride_ph + (offs_c // PAGE) * stride_pk, mask=c_ok, other=-1)
    token = page * PAGE + (offs_c % PAGE)
    ok = c_ok & (page >= 0) & (token < kv_len)
    st = tl.load(STATE + b * stride_sb + token * stride_sn, mask=ok, other=0)
    ok = ok & (st != 0)

    # 2. the group's queries on the cache's columns (zero off each head's own dims)
    qm = g_ok[:, None] & j_ok[None, :]
    cols = tl.load(HDIMS + heads[:, None] * stride_hh + offs_j[None, :] * stride_hj, mask=qm, other=0)
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + cols * stride_qd, mask=qm, other=0.0)
    own = tl.load(MEMBER + heads[:, None] * stride_mh + offs_j[None, :] * stride_mj, mask=qm, other=0.0)
    q = (q.to(tl.float32) * own).to(KD.dtype.element_ty)

    # 3. the candidate rows of key_dims, scores (BLOCK_C, BLOCK_G)
    kd = tl.load(KD + b * stride_kb + hkv * stride_kh + token[:, None] * stride_kn + offs_j[None, :] * stride_kj,
                 mask=ok[:, None] & j_ok[None, :], other=0.0)
    if IEEE_DOT:
        s = tl.dot(kd, tl.trans(q), input_precision="ieee")
    else:
        s = tl.dot(kd, tl.trans(q))

    # 4. store scores (forced +inf, not ok -inf) and the token of each slot (-1 where not ok)
    forced = ok & (st == 2)
    tl.store(TOKENS + b * stride_tb + hkv * stride_th + offs_c * stride_tc, tl.where(ok, token, -1), mask=c_ok)
    if PER_KV_HEAD:
        total = tl.sum(s, axis=1)
        total = tl.where(forced, float("inf"), tl.where(ok, total, float("-inf")))
        tl.store(SCORES + b * stride_ob + hkv * stride_oh + offs_c * stride_oc, total, mask=c_ok)
    else:
        s = tl.where(forced[:, None], float("inf"), tl.where(ok[:, None], s, float("-inf")))
        tl.store(SCORES + b * stride_ob + heads[None, :] * stride_oh + offs_c[:, None] * stride_oc, s,
                 mask=c_ok[:, None] & g_ok[None, :])


def check_candidate_inputs(q: Tensor, key_dims: Tensor, head_dims: Tensor, member: Tensor, pages: Tensor,
                           state: Tensor, page_size: int) -> None:
    """ValueError naming the problem when the candidate-scoring inputs do not fit each other."""
    if q.dim() != 4 or q.shape[2] != 1:
        raise ValueError(f"q must be (B, H, 1, D), got {tuple(q.shape)}")
    B, H, _, D = q.shape
    if key_dims.dim() != 4 or key_dims.shape[0] != B or H % key_dims.shape[1]:
        raise ValueError(f"key_dims must be (B={B}, Hkv, Lk, n) with H={H} a multiple of Hkv, got "
                         f"{tuple(key_dims.shape)}")
    Hkv, Lk, n = key_dims.shape[1], key_dims.shape[2], key_dims.shape[3]
    if tuple(head_dims.shape) != (H, n) or head_dims.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"head_dims must be (H={H}, n={n}) int32/int64, got {tuple(head_dims.shape)} "
                         f"{head_dims.dtype}")
    if tuple(member.shape) != (H, n):
        raise ValueError(f"member must be (H={H}, n={n}), got {tuple(member.shape)}")
    if pages.dim() != 3 or tuple(pages.shape[:2]) != (B, Hkv) or pages.dtype != torch.int64:
        raise ValueError(f"pages must be (B={B}, Hkv={Hkv}, K) int64, got {tuple(pages.shape)} {pages.dtype}")
    if tuple(state.shape) != (B, Lk) or state.dtype != torch.int8:
        raise ValueError(f"state must be (B={B}, Lk={Lk}) int8, got {tuple(state.shape)} {state.dtype}")
    if page_size not in PAGE_SIZES:
        raise ValueError(f"page_size must be one of {PAGE_SIZES}, got {page_size}")
    if key_dims.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"key_dims must be float16/bfloat16/float32, got {key_dims.dtype}")


def candidate_scores(q: Tensor, key_dims: Tensor, head_dims: Tensor, member: Tensor, pages: Tensor, state: Tensor,
                     page_size: int, *, per_kv_head: bool) -> tuple[Tensor, Tensor]:
    """Stage 2 in Triton (module docstring). Returns (scores (B, S, K * P) float32, tokens (B, Hkv, K * P)
    int64)."""
    check_candidate_inputs(q, key_dims, head_dims, member, pages, state, page_size)
    _check_device(q, key_dims, head_dims, member, pages, state, what="candidate_scores")
    B, H, _, D = q.shape
    Hkv, Lk, n = key_dims.shape[1], key_dims.shape[2], key_dims.shape[3]
    kept = pages.shape[2]
    C = kept * page_size
    S = Hkv if per_kv_head else H
    scores = torch.empty(B, S, C, dtype=torch.float32, device=q.device)
    tokens = torch.empty(B, Hkv, C, dtype=torch.int64, device=q.device)
    block_c = 128 if q.is_cuda else 32
    _candidate_scores_kernel[(triton.cdiv(C, block_c), Hkv, B)](
        q, key_dims, head_dims, member, pages, state, scores, tokens,
        Lk, kept,
        q.stride(0), q.stride(1), q.stride(3), *key_dims.stride(), *head_dims.stride(), *member.stride(),
        *pages.stride(), *state.stride(), *scores.stride(), *tokens.stride(),
        GQ=H // Hkv, N_DIMS=n, BLOCK_J=max(16, triton.next_power_of_2(n)),
        BLOCK_G=max(16, triton.next_power_of_2(H // Hkv)), BLOCK_C=block_c, PAGE=page_size,
        PER_KV_HEAD=per_kv_head, IEEE_DOT=key_dims.dtype == torch.float32, num_warps=4,
    )
    return scores, tokens


def candidate_scores_reference(q: Tensor, key_dims: Tensor, head_dims: Tensor, member: Tensor, pages: Tensor,
                               state: Tensor, page_size: int, *, per_kv_head: bool) -> tuple[Tensor, Tensor]:
    """`candidate_scores` in PyTorch (float32; float64 for float64 q), q rounded to key_dims' dtype as the
    kernel's dot sees it."""
    check_candidate_inputs(q, key_dims, head_dims, member, pages, state, page_size)
    B, H, _, D = q.shape
    Hkv, Lk, n = key_dims.shape[1], key_dims.shape[2], key_dims.shape[3]
    G = H // Hkv
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    offs = torch.arange(page_size, device=pages.device)
    tokens = (pages[..., None] * page_size + offs).flatten(-2)  # (B, Hkv, C)
    ok = (pages >= 0).repeat_interleave(page_size, dim=-1) & (tokens < Lk)
    safe = torch.where(ok, tokens, 0)
    st = state.gather(1, safe.view(B, -1)).view(safe.shape)
    ok = ok & (st != 0)
    C = tokens.shape[-1]
    kd = key_dims.gather(2, safe[..., None].expand(B, Hkv, C, n)).to(work)  # (B, Hkv, C, n)
    qd = q[:, :, 0].to(work).gather(-1, head_dims.long()[None].expand(B, H, n)) * member.to(work)
    qd = qd.to(key_dims.dtype).to(work).view(B, Hkv, G, n)
    s = torch.matmul(qd, kd.transpose(-1, -2))  # (B, Hkv, G, C)
    if per_kv_head:
        s = s.sum(2, keepdim=True)
    s = s.masked_fill(~ok[:, :, None], float("-inf")).masked_fill((ok & (st == 2))[:, :, None], float("inf"))
    out_dtype = torch.float32 if work == torch.float32 else work
    return s.reshape(B, -1, C).to(out_dtype), torch.where(ok, tokens, -1)
