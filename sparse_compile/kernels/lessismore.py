"""LessIsMore's token selection for decode: one token set shared by every head (shared/specs/lessismore.md).

In a selection layer each query head ranks the middle region of the cache (not sink, not recent) by its
scaled logits q . k / sqrt(D) and takes its top `middle`; the union is built rank by rank (every head's
rank-0 token, then every rank-1 token, ...), duplicates dropped, truncated at `middle` tokens, so the
highest-ranked tokens win, never the earliest positions. The set = sink + union + recent.

Everything here is fixed-size tensor work (matmul, topk, scatter_reduce): no host synchronisation and no
allocation whose size depends on data, so it runs inside CUDA graphs. The union is computed without a
loop: token t gets the order key min over (rank r, head h) that chose it of r * H + h (the position of
its first occurrence in the rank-major sequence); the union truncated at `middle` is the `middle` tokens
with the smallest keys. `union_reference` is the plain loop it must equal.

    budget_split(budget, sink, recent_fraction) -> (sink, middle, recent)
    decode_logits(q, k, scale, visible)          (B, H, Lk) float32 scaled logits, -inf where invisible
                                                 (CUDA: FASA's scoring kernel with every dim kept)
    select_tokens(logits, visible, budget, ...)  (B, budget) int32 token indices, -1 padded
    select_from_logits(logits, visible, n_sink, middle, n_recent)   the same with the budget split

Attention over the selection is the shared sparse decode kernel (kernels/sparse_decode.py) with one
index set for all heads, so K/V of each selected token are read once per KV head.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sparse_compile.kernels.fasa import chunk_tables, fasa_scores, key_state

NOT_CHOSEN = torch.iinfo(torch.int32).max  # order key of a token no head chose


def budget_split(budget: int, sink: int, recent_fraction: float) -> tuple[int, int, int]:
    """(sink, middle, recent) token counts of a budget: recent = ceil(recent_fraction * budget), sink as
    given, middle = the rest (>= 0). Raises ValueError when sink + recent exceed the budget."""
    recent = math.ceil(recent_fraction * budget)
    middle = budget - sink - recent
    if middle < 0:
        raise ValueError(f"budget {budget} < sink {sink} + recent {recent}")
    return sink, middle, recent


def decode_logits(q: Tensor, k: Tensor, scale: float, visible: Tensor, impl: str = "auto") -> Tensor:
    """Scaled logits of one query per head, float32, -inf at keys the query cannot see.

    q: (B, H, 1, D); k: (B, Hkv, Lk, D) (un-expanded, H % Hkv == 0); visible: (B, Lk) bool.
    Returns (B, H, Lk). K is read once per KV head (the group's queries share the work). On CUDA the
    products come from FASA's scoring kernel with every dim kept (K read once in its own dtype, float32
    accumulation); elsewhere from `decode_logits_reference`. impl: "auto" | "triton" (CUDA or the
    Triton interpreter) | "reference"."""
    if impl not in ("auto", "triton", "reference"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'reference', got {impl!r}")
    if impl == "reference" or (impl == "auto" and not q.is_cuda):
        return decode_logits_reference(q, k, scale, visible)

    B, H, _, D = q.shape
    Hkv = k.shape[1]
    segs, member = chunk_tables((tuple(range(D // 2)),), H, Hkv, D, D, "rotate_half", str(q.device))
    scores = fasa_scores(q, k, segs, member, per_kv_head=False, state=key_state(visible, 0, 0))
    return scores * scale


def decode_logits_reference(q: Tensor, k: Tensor, scale: float, visible: Tensor) -> Tensor:
    """`decode_logits` in PyTorch (float32 matmul of the un-expanded K)."""
    B, H, _, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    qg = q.reshape(B, Hkv, H // Hkv, D).float()
    logits = torch.matmul(qg, k.float().transpose(-1, -2)).reshape(B, H, Lk) * scale
    return logits.masked_fill(~visible[:, None, :], float("-inf"))


def fixed_regions(visible: Tensor, sink: int, recent: int) -> tuple[Tensor, Tensor]:
    """(is_sink, is_recent), each (B, Lk) bool: the first `sink` and the last `recent` visible keys of
    each row (left padding and unwritten static-cache slots are invisible, so they are skipped)."""
    count = visible.cumsum(dim=1)  # 1-based index among the visible keys
    total = count[:, -1:]
    is_sink = visible & (count <= sink)
    is_recent = visible & (count > total - recent) & ~is_sink
    return is_sink, is_recent


def union_by_rank(head_top: Tensor, valid: Tensor, length: int, middle: int) -> Tensor:
    """The rank-by-rank union of per-head rankings, truncated at `middle` tokens.

    head_top: (B, H, M) token indices, each head's ranking (rank 0 first); valid: (B, H, M) bool.
    Returns (B, middle) int32 token indices (the union in order of first occurrence), -1 padded when the
    union has fewer tokens."""
    B, H, M = head_top.shape
    if middle == 0 or M == 0:
        return torch.full((B, middle), -1, dtype=torch.int32, device=head_top.device)
    rank = torch.arange(M, device=head_top.device, dtype=torch.int32)[None, None, :]
    head = torch.arange(H, device=head_top.device, dtype=torch.int32)[None, :, None]
    order = (rank * H + head).expand(B, H, M).masked_fill(~valid, NOT_CHOSEN)
    keys = torch.full((B, length), NOT_CHOSEN, dtype=torch.int32, device=head_top.device)
    keys.scatter_reduce_(1, head_top.reshape(B, H * M).long(), order.reshape(B, H * M), reduce="amin")
    take = min(middle, length)
    smallest, tokens = torch.topk(keys, take, dim=1, largest=False, sorted=True)
    tokens = tokens.to(torch.int32).masked_fill(smallest == NOT_CHOSEN, -1)
    if take < middle:
        tokens = torch.cat([tokens, tokens.new_full((B, middle - take), -1)], dim=1)
    return tokens


def union_reference(head_top: Tensor, valid: Tensor, middle: int) -> list[list[int]]:
    """The union as the spec states it, with Python loops: per batch row, the tokens in order."""
    B, H, M = head_top.shape
    result = []
    for b in range(B):
        chosen: list[int] = []
        for r in range(M):
            for h in range(H):
                token = int(head_top[b, h, r])
                if valid[b, h, r] and token not in chosen and len(chosen) < middle:
                    chosen.append(token)
        result.append(chosen)
    return result


def indices_of(flags: Tensor, count: int) -> Tensor:
    """(B, count) int32 indices of the True entries of flags (B, L) (at most `count` per row), -1 padded."""
    B, L = flags.shape
    take = min(count, L)
    position = torch.arange(L, 0, -1, device=flags.device, dtype=torch.int32)  # earlier first among ties
    score, index = torch.topk(flags.to(torch.int32) * position, take, dim=1)
    index = index.to(torch.int32).masked_fill(score == 0, -1)
    if take < count:
        index = torch.cat([index, index.new_full((B, count - take), -1)], dim=1)
    return index


def select_tokens(logits: Tensor, visible: Tensor, budget: int, sink: int, recent_fraction: float) -> Tensor:
    """One token set per batch row, shared by all heads: sink + rank-by-rank union + recent.

    logits: (B, H, Lk) float32, -inf where invisible; visible: (B, Lk) bool.
    Returns (B, budget) int32 token indices, -1 in unused slots (when fewer keys are visible)."""
    return select_from_logits(logits, visible, *budget_split(budget, sink, recent_fraction))


def select_from_logits(logits: Tensor, visible: Tensor, n_sink: int, middle: int, n_recent: int) -> Tensor:
    """`select_tokens` with the budget already split: (B, n_sink + n_recent + middle) int32, laid out as
    [sink and recent by position, the union by rank], -1 padded."""
    is_sink, is_recent = fixed_regions(visible, n_sink, n_recent)
    in_middle = visible & ~is_sink & ~is_recent
    ranked = logits.masked_fill(~in_middle[:, None, :], float("-inf"))
    take = min(middle, logits.shape[-1])
    values, head_top = torch.topk(ranked, take, dim=-1, sorted=True)
    union = union_by_rank(head_top, values > float("-inf"), logits.shape[-1], middle)
    fixed = indices_of(is_sink | is_recent, n_sink + n_recent)
    return torch.cat([fixed, union], dim=1)


def selection_visible(selection: Tensor, length: int) -> Tensor:
    """(B, length) bool: which tokens a selection (B, N) int32 (-1 padded) holds."""
    B = selection.shape[0]
    hit = torch.zeros(B, length + 1, dtype=torch.bool, device=selection.device)
    slot = torch.where(selection < 0, length, selection.long())
    hit.scatter_(1, slot, True)
    return hit[:, :length]
