"""Two-stage decode selection over a SparseCache's page summaries (PyTorch; shared/specs/quest_pages.md).

Stage 1 (prefilter): per page of P keys the cache keeps the element-wise min m and max M of its keys
(sparse_compile/cache.py). For a query q the score of any key of the page is at most
    U = sum_d max(q_d m_d, q_d M_d) = q+ . M + q- . m        (q+ = max(q, 0), q- = min(q, 0)),
restricted to the dims a method scores (FASA: each head's dominant dims; LessIsMore: all of them). Pages
are ranked by U; the kept pages (`candidates` tokens' worth, whole pages) are the candidate set.
Stage 2: the method's own exact scoring on the candidates only, then one top-k over them.

With every page kept, each function returns exactly the method's single-stage selection: FASA's
(kernels/fasa.py `fasa_scores_reference` + `select_tokens`) and LessIsMore's as its spec defines it
(tests/test_sparse_cache.py checks both against references).

    page_bounds(q, page_min, page_max, q_mask)          (B, H, NP) float32 per query head
    page_state(state, page_size, n_pages)               (visible, forced) pages (B, NP) bool
    page_tokens(pages, page_size, length)               (tokens, in_range) of kept pages
    fasa_two_stage(...)                                 (B, S, slots) int64 like kernels.fasa.select_tokens
    lessismore_two_stage(...)                           (B, budget) int32 like kernels.lessismore.select_tokens

Everything is fixed-size tensor work (matmul, topk, gather): no host synchronisation, capturable.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sparse_compile.kernels.fasa import FORCED, INVISIBLE
from sparse_compile.kernels.lessismore import fixed_regions, indices_of, union_by_rank
from sparse_compile.kernels.page_select import PAGE_SIZES, candidate_scores
from sparse_compile.kernels.page_select import page_bounds as page_bounds_triton
from sparse_compile.kernels.topk_select import topk_indices


def work_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def page_bounds(q: Tensor, page_min: Tensor, page_max: Tensor, q_mask: Tensor | None = None) -> Tensor:
    """Upper bound of q_h . k (over the dims q_mask keeps) for every key of every page, per query head.

    q: (B, H, 1, D); page_min, page_max: (B, Hkv, NP, D) (+inf / -inf on pages with no key written);
    q_mask: (H, D) 0/1 or None (all dims). Returns (B, H, NP) float32 (float64 for float64 q). Pages with no
    valid key give +inf or NaN: mask them with the page visibility (`page_state`)."""
    B, H, _, D = q.shape
    Hkv, NP = page_min.shape[1], page_min.shape[2]
    work = work_dtype(q)
    qq = q[:, :, 0].to(work)
    if q_mask is not None:
        qq = qq * q_mask.to(work)
    qg = qq.view(B, Hkv, H // Hkv, D)
    upper = torch.matmul(qg.clamp(min=0), page_max.to(work).transpose(-1, -2))  # (B, Hkv, G, NP)
    lower = torch.matmul(qg.clamp(max=0), page_min.to(work).transpose(-1, -2))
    return (upper + lower).reshape(B, H, NP)


def page_state(state: Tensor, page_size: int, n_pages: int) -> tuple[Tensor, Tensor]:
    """(visible, forced) per page, each (B, NP) bool, from the per-key state (B, Lk) int8 of
    kernels.fasa.key_state (0 invisible, 1 visible, 2 forced): a page is visible if one of its keys is, forced
    if one of its keys is forced."""
    B, Lk = state.shape
    padded = torch.zeros(B, n_pages * page_size, dtype=state.dtype, device=state.device)
    padded[:, :Lk] = state[:, : n_pages * page_size]
    per_page = padded.view(B, n_pages, page_size)
    return (per_page != INVISIBLE).any(-1), (per_page == FORCED).any(-1)


def page_tokens(pages: Tensor, page_size: int, length: int) -> tuple[Tensor, Tensor]:
    """Token indices of kept pages. pages: (..., K) int64 -> (tokens (..., K * P) int64 clamped into
    [0, length), in_range (..., K * P) bool: False past the last slot)."""
    offs = torch.arange(page_size, device=pages.device)
    tokens = (pages[..., None] * page_size + offs).flatten(-2)
    in_range = tokens < length
    return tokens.clamp(max=length - 1), in_range


def kept_pages(candidates: int, page_size: int, n_pages: int, sink: int = 0, recent: int = 0) -> int:
    """Pages to keep for `candidates` tokens: ceil(candidates / P), and at least the pages the forced keys can
    span (the first `sink` / last `recent` visible keys are consecutive slots: ceil(n / P) + 1 pages each), at
    most every page."""
    forced = sum(math.ceil(n / page_size) + 1 for n in (sink, recent) if n)
    return max(1, min(n_pages, max(math.ceil(candidates / page_size), forced)))


def use_triton(q: Tensor, impl: str) -> bool:
    """Whether the two-stage functions run the Triton kernels (kernels/page_select.py): impl "auto" on CUDA,
    "triton" (CUDA, or CPU under TRITON_INTERPRET=1); "reference" never."""
    if impl not in ("auto", "triton", "reference"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'reference', got {impl!r}")
    return impl == "triton" or (impl == "auto" and q.is_cuda)


def topk_impl(q: Tensor, impl: str) -> str:
    """The `kernels.topk_select.topk_indices` impl the two-stage functions use for their impl: the Triton set
    top-k on CUDA (torch.topk past its row limit), under the interpreter when asked for, torch.topk elsewhere."""
    if q.is_cuda:
        return "auto" if impl != "reference" else "reference"
    return "triton" if use_triton(q, impl) else "reference"


def candidate_pages(bounds: Tensor, keep: int, impl: str = "reference") -> Tensor:
    """The kept pages per KV head from page bounds (B, Hkv, G', NP) (-inf: never, +inf: always): with one
    row per KV head (G' = 1) its top `keep` pages (as a set: `topk_indices`, impl its impl); with the group's
    rows (G' = G) the rank-by-rank union of the heads' own rankings. Returns (B, Hkv, keep) int64, -1 where
    fewer pages are visible."""
    B, Hkv, rows, NP = bounds.shape
    if rows == 1:
        return topk_indices(bounds[:, :, 0].contiguous(), keep, impl=impl)
    ranked = torch.topk(bounds.reshape(B * Hkv, rows, NP), keep, dim=-1, sorted=True)
    return union_by_rank(ranked.indices, ranked.values > float("-inf"), NP, keep).long().view(B, Hkv, keep)


def fasa_two_stage(q: Tensor, key_dims: Tensor, dims: Tensor, member: Tensor, page_min: Tensor, page_max: Tensor,
                   state: Tensor, slots: int, candidates: int, page_size: int, *, sink: int = 0, recent: int = 0,
                   per_kv_head: bool = False, bound_dims: str = "dominant", group: str = "union",
                   counts: Tensor | None = None, impl: str = "auto", all_dims: bool = False,
                   density_out: Tensor | None = None, n_visible: Tensor | None = None) -> Tensor:
    """FASA's selection with a page prefilter.

    q: (B, H, 1, D) post-RoPE; key_dims: (B, Hkv, Lk, n) K's dominant dims of each KV head (SparseCache);
    dims: (Hkv, n) int64 their head dims; member: (H, n) 0/1, which columns are query head h's own dims;
    page_min, page_max: (B, Hkv, NP, D); state: (B, Lk) int8 (kernels.fasa.key_state: visibility, forced
    sink/recent keys); slots: tokens kept per score row; candidates: candidate tokens per KV head (>= slots;
    whole pages, so rounded up to pages); sink, recent: the forced counts behind `state` (the pages they span
    are kept on top of the candidates, so every forced key survives); bound_dims: "dominant" (the bound of
    FASA's partial score, each head's own dims) or "full" (the bound of the full q.k).

    Stage 1 per KV head (one candidate set for the group): per_kv_head ranks pages by the sum of the group's
    bounds (a bound of the summed score); per_head by `group`: "union", the rank-by-rank union of the query
    heads' own page rankings (each head's best pages get in, whatever the other heads' scales), or "max", the
    largest of the group's bounds. Forced pages (holding a sink/recent key) always kept; invisible pages never.
    Stage 2: the partial scores sum_{own dims} q_d k_d of the candidates from key_dims (forced +inf, invisible
    -inf, as `fasa_scores_reference`), top `slots`.
    counts: (B, S) or None, as kernels.fasa.select_tokens: row r keeps its counts[r] best slots (a fraction
    budget over ragged rows), the others -1.
    impl: "auto" (the Triton kernels of kernels/page_select.py on CUDA, PyTorch elsewhere), "triton", "reference".
    all_dims: the caller promises dims[g] = 0..D-1 for every KV head (key_dims is K itself: a pages-only cache), so
    member (H, D) already is each head's mask on the full head dim: no per-call scatter builds it.
    density_out, n_visible: (B, H) float32 and (B,) int, or None: the final top-k also writes each query head's
    kept / visible keys into density_out (`kernels.kept_density` of the result, no launch of its own on CUDA).
    Returns (B, S, slots) int64 token indices (S = Hkv if per_kv_head else H), -1 where the score is -inf."""
    B, H, _, D = q.shape
    Hkv, Lk, n = key_dims.shape[1], key_dims.shape[2], key_dims.shape[3]
    G, NP = H // Hkv, page_min.shape[2]
    if bound_dims not in ("dominant", "full"):
        raise ValueError(f"bound_dims must be 'dominant' or 'full', got {bound_dims!r}")
    if group not in ("union", "max"):
        raise ValueError(f"group must be 'union' or 'max', got {group!r}")
    if slots > candidates:
        raise ValueError(f"candidates {candidates} < slots {slots}: the candidate set must hold the selection")
    if all_dims:  # K itself: every head scores columns 0..D-1, member is already on the full head dim
        if n != D or member.shape != (H, D):
            raise ValueError(f"all_dims needs key_dims with all {D} dims and member (H, D), got {n} and "
                             f"{tuple(member.shape)}")
        head_dims = dims[:1].expand(H, n)
    else:
        head_dims = dims.repeat_interleave(G, dim=0)  # (H, n): the dims of each query head's KV head
    q_mask = None
    if bound_dims == "dominant" and all_dims:
        q_mask = member
    elif bound_dims == "dominant":  # member back on the full head dim (padding columns repeat a dim: amax)
        q_mask = torch.zeros(H, D, dtype=member.dtype, device=q.device).scatter_reduce_(1, head_dims, member, "amax")
    keep = kept_pages(candidates, page_size, NP, sink, recent)
    reduce = "sum" if per_kv_head else ("max" if group == "max" else "none")
    if use_triton(q, impl) and page_size in PAGE_SIZES:  # the kernels tile pages by powers of two
        # 1. page bounds (visibility and forced pages applied in the kernel) -> candidate pages per KV head
        bounds = page_bounds_triton(q, page_min, page_max, state, page_size, q_mask=q_mask, reduce=reduce)
        pages = candidate_pages(bounds.view(B, Hkv, -1, NP), keep, topk_impl(q, impl))
        # 2. exact partial scores of the candidates from the contiguous dims (-1 tokens where not a key)
        scores, tokens = candidate_scores(q, key_dims, head_dims, member, pages, state, page_size,
                                          per_kv_head=per_kv_head)
        C = tokens.shape[-1]
    else:
        work = work_dtype(q)
        # 1. page bounds -> candidate pages per KV head
        bounds = page_bounds(q, page_min, page_max, q_mask).view(B, Hkv, G, NP)
        if reduce != "none":
            bounds = bounds.sum(2, keepdim=True) if per_kv_head else bounds.amax(2, keepdim=True)  # (B, Hkv, 1, NP)
        visible, forced = page_state(state, page_size, NP)
        bounds = torch.where(visible[:, None, None], bounds, float("-inf"))
        bounds = torch.where((forced & visible)[:, None, None], float("inf"), bounds)
        pages = candidate_pages(bounds, keep, topk_impl(q, impl))
        tokens, in_range = page_tokens(pages.clamp(min=0), page_size, Lk)  # (B, Hkv, C)
        in_range &= (pages >= 0).repeat_interleave(page_size, dim=-1)
        C = tokens.shape[-1]

        # 2. exact partial scores of the candidates from the contiguous dims
        kd = key_dims.gather(2, tokens[..., None].expand(B, Hkv, C, n)).to(work)  # (B, Hkv, C, n)
        qd = q[:, :, 0].to(work).gather(-1, head_dims[None].expand(B, H, n)) * member.to(work)  # (B, H, n)
        scores = torch.matmul(qd.view(B, Hkv, G, n), kd.transpose(-1, -2))  # (B, Hkv, G, C)
        if per_kv_head:
            scores = scores.sum(2, keepdim=True)
        scores = scores.to(torch.float32)
        st = state.gather(1, tokens.view(B, Hkv * C)).view(B, Hkv, 1, C)
        invisible = (st == INVISIBLE) | ~in_range[:, :, None]
        scores = scores.masked_fill(invisible, float("-inf")).masked_fill((st == FORCED) & ~invisible, float("inf"))

    # 3. one top-k over the candidates, back to token indices
    S = Hkv if per_kv_head else H
    scores = scores.reshape(B, S, C)
    take = min(slots, C)
    # the chosen candidates' token ids (score row (b, s) reads tokens[b, s // G']); -1: -inf or past counts
    chosen = topk_indices(scores.contiguous(), take, row_k=counts, tokens=tokens, impl=topk_impl(q, impl),
                          density_out=density_out, n_visible=n_visible)
    if take < slots:
        chosen = torch.cat([chosen, chosen.new_full((B, S, slots - take), -1)], dim=-1)
    return chosen


def lessismore_two_stage(q: Tensor, k: Tensor, page_min: Tensor, page_max: Tensor, visible: Tensor, scale: float,
                         n_sink: int, middle: int, n_recent: int, candidates: int, page_size: int) -> Tensor:
    """LessIsMore's selection (shared/specs/lessismore.md) with a page prefilter. One set for all heads:
    the first `n_sink` and last `n_recent` visible keys, plus `middle` tokens of the middle region (visible,
    neither sink nor recent) chosen by the rank-by-rank union of the query heads' rankings by q.k * scale.

    q: (B, H, 1, D); k: (B, Hkv, Lk, D); page_min, page_max: (B, Hkv, NP, D); visible: (B, Lk) bool;
    candidates: middle-region candidate tokens (whole pages).
    Stage 1: each query head ranks the pages holding a middle-region key by its bound; the candidate pages
    are the rank-by-rank union of those page rankings (the method's own union rule, one level up), truncated
    at ceil(candidates / P) pages. Stage 2: exact logits of the candidates, each head's top `middle`, their
    rank-by-rank union truncated at `middle`.
    Returns (B, n_sink + n_recent + middle) int32: [sink and recent by position, union by rank], -1 padded."""
    B, H, _, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G, NP = H // Hkv, page_min.shape[2]
    work = work_dtype(q)
    is_sink, is_recent = fixed_regions(visible, n_sink, n_recent)
    in_middle = visible & ~is_sink & ~is_recent

    # 1. candidate pages: rank-by-rank union of the heads' page rankings
    state = in_middle.to(torch.int8)
    page_visible, _ = page_state(state, page_size, NP)
    bounds = page_bounds(q, page_min, page_max)  # (B, H, NP)
    bounds = torch.where(page_visible[:, None], bounds, float("-inf"))
    keep = kept_pages(candidates, page_size, NP)
    ranked = torch.topk(bounds, keep, dim=-1, sorted=True)
    pages = union_by_rank(ranked.indices, ranked.values > float("-inf"), NP, keep).long()  # (B, keep), -1 padded
    tokens, in_range = page_tokens(pages.clamp(min=0), page_size, Lk)  # (B, C)
    in_range &= (pages >= 0).repeat_interleave(page_size, dim=1)
    C = tokens.shape[-1]

    # 2. exact logits of the candidates, each head's ranking, union by rank
    kc = k.gather(2, tokens[:, None, :, None].expand(B, Hkv, C, D)).to(work)  # (B, Hkv, C, D)
    logits = torch.matmul(q[:, :, 0].to(work).view(B, Hkv, G, 1, D), kc[:, :, None].transpose(-1, -2))
    logits = (logits.view(B, H, C) * scale).to(torch.float32)
    ok = in_middle.gather(1, tokens) & in_range  # (B, C)
    logits = logits.masked_fill(~ok[:, None, :], float("-inf"))
    take = min(middle, C)
    values, top = torch.topk(logits, take, dim=-1, sorted=True)  # (B, H, take) candidate slots, rank order
    head_top = tokens[:, None, :].expand(B, H, C).gather(-1, top)
    union = union_by_rank(head_top, values > float("-inf"), Lk, middle)
    fixed = indices_of(is_sink | is_recent, n_sink + n_recent)
    return torch.cat([fixed, union], dim=1)
