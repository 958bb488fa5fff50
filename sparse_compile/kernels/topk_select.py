"""The top-k of each row as an unordered set, in Triton: one program per row finds the k-th largest value over
the values' order-preserving integer codes (at most 32 bisection steps, or four 8-bit radix histograms), then writes the
indices of the k largest.

    topk_indices(x, k, *, row_k=None, tokens=None, drop_neg_inf=True, algorithm="bisect") -> (..., k) int64
        x: (..., N) float32 scores; k: slots per row (k <= N); row_k: (...) int, the number of slots each row
        fills (<= k; the others are -1), or None (every row fills k); tokens: (R / g, N) int or None, written
        instead of the indices (row r writes tokens[r // g, index]: the candidates' token ids, one row of them
        per g score rows), so the caller needs no gather.
        Returns the indices of each row's row_k largest values in ascending index order (ties at the k-th
        value: the lowest indices), -1 in the unfilled slots and, with drop_neg_inf, where the value is -inf
        (a key nothing may select). NaN ranks above +inf, as in torch.topk.

Why: the decode selection ranks 8K-16K candidates per KV head and keeps 2048 every step; torch.topk costs a
~45 us floor there on an H100 (radix sort passes, several launches) whatever the length. A set is all the
selection needs (the sparse decode kernel sums over it in any order), so one program per row that keeps the row
in registers (N <= MAX_N), bisects the 32-bit codes (32 reductions over registers) and compacts with a prefix
sum is enough. Longer rows fall back to torch.topk (`topk_indices_reference`, which it must equal as a set).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from sparse_compile.kernels.kept_density import kept_density_reference, store_row_density
from sparse_compile.kernels.limits import triton_interpreting

MAX_N = 16384  # the longest row one program holds in registers


@triton.jit
def order_code(x):
    """Order-preserving int32 code of float32 values: positive floats keep their bits, negative ones flip their
    magnitude bits (-0.0 -> -1, just below +0.0 -> 0), NaN (any sign) -> the largest code, above +inf."""
    bits = x.to(tl.int32, bitcast=True)
    code = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return tl.where(x != x, 2147483647, code)


@triton.jit
def _load_row(X, ROW_K, r, N, K, stride_x, HAS_ROW_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """(offs, in_row, x, code, k) of row r: its values (-inf past N), their codes, and the slots it fills."""
    offs = tl.arange(0, BLOCK_N)
    in_row = offs < N
    x = tl.load(X + r * stride_x + offs, mask=in_row, other=float("-inf"))
    k = K
    if HAS_ROW_K:
        k = tl.minimum(tl.load(ROW_K + r).to(tl.int32), K)
    k = tl.maximum(tl.minimum(k, N), 0)
    return offs, in_row, x, order_code(x), k


@triton.jit
def _write_set(OUT, TOKENS, DENS, NVIS, r, offs, x, greater, equal, k, K, stride_o, stride_t, GROUP, ROWS_PER_B,
               HAS_TOKENS: tl.constexpr, DROP_NEG_INF: tl.constexpr, BLOCK_K: tl.constexpr,
               HAS_DENSITY: tl.constexpr, HEADS_PER_ROW: tl.constexpr, BLOCK_HR: tl.constexpr):
    """Slots [0, k) of row r: the indices (or TOKENS' entries) of the values above the threshold and of the
    lowest-indexed ties at it, in index order; slots [k, K): -1. With HAS_DENSITY, also the row's filled slots
    (index >= 0) over its batch row's visible keys, for each of the HEADS_PER_ROW query heads sharing the row."""
    need = k - tl.sum(greater.to(tl.int32), axis=0)  # ties at the threshold: the lowest indices
    if need < tl.sum(equal.to(tl.int32), axis=0):  # only then do the ties need ranking (a scan of the row)
        take = greater | (equal & (tl.cumsum(equal.to(tl.int32), axis=0) <= need))
    else:
        take = greater | equal
    pos = tl.cumsum(take.to(tl.int32), axis=0) - 1
    index = offs.to(tl.int64)
    if HAS_TOKENS:
        index = tl.load(TOKENS + (r // GROUP) * stride_t + offs, mask=take, other=-1).to(tl.int64)
    if DROP_NEG_INF:
        index = tl.where(x == float("-inf"), -1, index)
    tl.store(OUT + r * stride_o + pos, index, mask=take)
    slot = tl.arange(0, BLOCK_K)
    tl.store(OUT + r * stride_o + slot, tl.full([BLOCK_K], -1, tl.int64), mask=(slot >= k) & (slot < K))
    if HAS_DENSITY:
        filled = tl.sum((take & (index >= 0)).to(tl.float32), axis=0)
        store_row_density(DENS + r * HEADS_PER_ROW, filled, tl.load(NVIS + r // ROWS_PER_B), HEADS_PER_ROW,
                          BLOCK_HR)


@triton.jit
def _topk_indices_kernel(X, OUT, ROW_K, TOKENS, N, K, stride_x, stride_o, stride_t, GROUP, DENS, NVIS, ROWS_PER_B,
                         HAS_ROW_K: tl.constexpr, HAS_TOKENS: tl.constexpr, DROP_NEG_INF: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         HAS_DENSITY: tl.constexpr, HEADS_PER_ROW: tl.constexpr, BLOCK_HR: tl.constexpr):
    r = tl.program_id(0)
    offs, in_row, x, code, k = _load_row(X, ROW_K, r, N, K, stride_x, HAS_ROW_K, BLOCK_N)
    # a t with count(code >= t) >= k and count(code > t) < k; a step that counts exactly k codes >= mid ends the
    # search (every t between it and the largest such t selects the same set), so rows without ties at the k-th
    # value stop after ~log2(code range / gap at the k-th value) steps. The search starts between the row's
    # smallest and largest *finite* codes when the k-th value is finite: the forced (+inf) and invisible (-inf)
    # entries would otherwise widen the range to all 2^32 codes, and a row of values close together (page bounds
    # are sums of many positive terms) then spends ~10 more steps on exponents no value has.
    # Slots past N get the smallest int32, below every value's code (-inf's is -2139095041): no mid (> lo >= the
    # row's smallest code) counts them, so the search's compare needs no row mask.
    ranked = tl.where(in_row, code, -2147483648)
    finite = in_row & (tl.abs(x) < float("inf"))
    lo_f = tl.min(tl.where(finite, code, 2147483647), axis=0).to(tl.int64)
    hi_f = tl.max(tl.where(finite, code, -2147483648), axis=0).to(tl.int64)
    # +inf and NaN (codes >= +inf's, 2139095040) and -inf counted in one reduction: n_neg + n_top * 2^16 (N < 2^16)
    packed = tl.sum(tl.where(in_row & (code >= 2139095040), 65536, 0) + tl.where(in_row & (x == float("-inf")), 1, 0),
                    axis=0)
    n_top, n_neg = packed // 65536, packed % 65536
    top = tl.max(ranked, axis=0).to(tl.int64)
    if n_top >= k:  # the k-th value is +inf or NaN: t among those codes (k = 0 is set just below)
        lo, hi = tl.full([], 2139095040, tl.int64), top
    elif N - n_neg >= k:  # finite: count(>= lo_f) = N - n_neg >= k and count(> hi_f) = n_top < k
        lo, hi = lo_f, hi_f
    else:  # fewer than k values above -inf: t = -inf's code (every -inf ties there)
        lo, hi = tl.full([], -2139095041, tl.int64), tl.full([], -2139095041, tl.int64)
    lo = tl.where(k == 0, top, lo)  # k = 0: t = the largest code, and need = 0 takes no tie
    hi = tl.where(k == 0, top, hi)
    while lo < hi:
        mid = lo + (hi - lo + 1) // 2
        count = tl.sum((ranked >= mid.to(tl.int32)).to(tl.int32), axis=0)
        ok = count >= k
        lo = tl.where(ok, mid, lo)
        hi = tl.where(count == k, mid, tl.where(ok, hi, mid - 1))
    t = lo.to(tl.int32)
    _write_set(OUT, TOKENS, DENS, NVIS, r, offs, x, (code > t) & in_row, (code == t) & in_row, k, K, stride_o,
               stride_t, GROUP, ROWS_PER_B, HAS_TOKENS, DROP_NEG_INF, BLOCK_K, HAS_DENSITY, HEADS_PER_ROW, BLOCK_HR)


@triton.jit
def _topk_radix_kernel(X, OUT, ROW_K, TOKENS, N, K, stride_x, stride_o, stride_t, GROUP, DENS, NVIS, ROWS_PER_B,
                       HAS_ROW_K: tl.constexpr, HAS_TOKENS: tl.constexpr, DROP_NEG_INF: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       HAS_DENSITY: tl.constexpr, HEADS_PER_ROW: tl.constexpr, BLOCK_HR: tl.constexpr):
    """The same threshold as `_topk_indices_kernel`, found 8 bits at a time: four 256-bin histograms of the
    codes that still match the threshold's high bits, instead of 32 bisection steps."""
    r = tl.program_id(0)
    offs, in_row, x, code, k = _load_row(X, ROW_K, r, N, K, stride_x, HAS_ROW_K, BLOCK_N)
    ucode = (code ^ -2147483648).to(tl.uint32, bitcast=True)  # unsigned order == signed order of code
    bins = tl.arange(0, 256)
    match = in_row
    k_rem = k
    t = tl.zeros([], tl.uint32)
    for p in tl.static_range(4):
        digit = ((ucode >> (24 - 8 * p)) & 255).to(tl.int32)
        hist = tl.histogram(digit, 256, mask=match)
        at_least = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist  # matching codes with digit >= d
        d = tl.max(tl.where(at_least >= k_rem, bins, 0), axis=0)
        k_rem = k_rem - tl.sum(tl.where(bins > d, hist, 0), axis=0)
        match = match & (digit == d)
        t = t | (d.to(tl.uint32) << (24 - 8 * p))
    t = tl.where(k > 0, t, 4294967295)  # k = 0: nothing is above the threshold (and need = 0 takes no tie)
    _write_set(OUT, TOKENS, DENS, NVIS, r, offs, x, (ucode > t) & in_row, (ucode == t) & in_row, k, K, stride_o,
               stride_t, GROUP, ROWS_PER_B, HAS_TOKENS, DROP_NEG_INF, BLOCK_K, HAS_DENSITY, HEADS_PER_ROW, BLOCK_HR)


ALGORITHMS = ("bisect", "radix")


def check_topk_inputs(x: Tensor, k: int, row_k: Tensor | None) -> None:
    """ValueError naming the problem when the inputs do not fit."""
    if x.dim() < 1 or x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"x must be (..., N) float32 (float64: the reference only), got {tuple(x.shape)} {x.dtype}")
    if not 0 <= k <= x.shape[-1]:
        raise ValueError(f"k = {k} must be in [0, N = {x.shape[-1]}]")
    if row_k is not None:
        if tuple(row_k.shape) != tuple(x.shape[:-1]):
            raise ValueError(f"row_k must be shaped like x's rows {tuple(x.shape[:-1])}, got {tuple(row_k.shape)}")
        if row_k.dtype.is_floating_point or row_k.dtype == torch.bool:
            raise ValueError(f"row_k must be an integer tensor, got {row_k.dtype}")
        if row_k.device != x.device:
            raise ValueError(f"row_k is on {row_k.device}, x on {x.device}")


def check_density_inputs(x: Tensor, density_out: Tensor | None, n_visible: Tensor | None) -> int:
    """The query heads per score row of `topk_indices`' fused density (1 without one); ValueError naming the
    problem when density_out / n_visible do not fit x's rows."""
    if density_out is None and n_visible is None:
        return 1
    if density_out is None or n_visible is None:
        raise ValueError("density_out and n_visible go together: give both or neither")
    R = x.numel() // max(x.shape[-1], 1)
    if n_visible.dim() != 1 or n_visible.dtype.is_floating_point or n_visible.dtype == torch.bool:
        raise ValueError(f"n_visible must be (B,) int, got {tuple(n_visible.shape)} {n_visible.dtype}")
    B = n_visible.shape[0]
    if (B == 0 and R) or (B and R % B):
        raise ValueError(f"x's {R} rows are not B = {B} batch rows of equally many score rows")
    S = R // B if B else 0
    if (density_out.dim() != 2 or density_out.shape[0] != B or density_out.shape[1] % max(S, 1)
            or density_out.dtype != torch.float32 or not density_out.is_contiguous()):
        raise ValueError(f"density_out must be a contiguous (B={B}, H) float32 tensor with H a multiple of the "
                         f"{S} score rows per batch row, got {tuple(density_out.shape)} {density_out.dtype}")
    if not (density_out.device == n_visible.device == x.device):
        raise ValueError(f"density_out ({density_out.device}), n_visible ({n_visible.device}) and x ({x.device}) "
                         "must share a device")
    return max(1, density_out.shape[1] // max(S, 1))


def topk_indices(x: Tensor, k: int, *, row_k: Tensor | None = None, tokens: Tensor | None = None,
                 drop_neg_inf: bool = True, impl: str = "auto", algorithm: str = "bisect",
                 num_warps: int | None = None, density_out: Tensor | None = None,
                 n_visible: Tensor | None = None) -> Tensor:
    """The k largest of each row as a set (module docstring). x: (..., N) float32. Returns (..., k) int64.
    impl: "auto" (Triton on CUDA for rows of at most MAX_N, torch.topk otherwise), "triton" (CUDA or the
    interpreter), "reference". tokens: (R / g, N) int, what to write instead of the index: row r's slots hold
    tokens[r // g, index] (g = rows of x per row of tokens; -1 stays -1). algorithm: "bisect" (32 steps of a
    compare and a block sum) or "radix" (four 256-bin histograms); num_warps: the launch's warps (None: by row
    length). (A W-way search, W thresholds per block sum, was measured slower than both: KERNEL_NOTES.md.)
    density_out, n_visible: (B, H) float32 and (B,) int, both or neither: x's rows are B batch rows of S = R / B
    score rows each, row s shared by query heads [s * H / S, (s + 1) * H / S); density_out[b, h] is written with
    the filled slots (index >= 0) of h's row over max(n_visible[b], 1) - `kernels.kept_density` of the result,
    in the same launch (the decode selection's density without a launch of its own)."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if impl not in ("auto", "triton", "reference"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'reference', got {impl!r}")
    check_topk_inputs(x, k, row_k)
    N = x.shape[-1]
    R = x.numel() // max(N, 1)
    group = 1
    if tokens is not None:
        if tokens.dim() < 1 or tokens.shape[-1] != N or tokens.numel() == 0 or R % (tokens.numel() // N):
            raise ValueError(f"tokens must be (R / g, N = {N}) with R = {R} rows of x a multiple of its rows, got "
                             f"{tuple(tokens.shape)}")
        if tokens.dtype.is_floating_point or tokens.device != x.device:
            raise ValueError(f"tokens must be an integer tensor on {x.device}, got {tokens.dtype} on {tokens.device}")
        group = R // (tokens.numel() // N)
    heads_per_row = check_density_inputs(x, density_out, n_visible)
    triton_ok = N <= MAX_N and (x.is_cuda or triton_interpreting()) and x.dtype == torch.float32
    if impl == "reference" or (impl == "auto" and not triton_ok):
        idx = topk_indices_reference(x, k, row_k=row_k, tokens=tokens, drop_neg_inf=drop_neg_inf)
        if density_out is not None and n_visible.shape[0]:
            B = n_visible.shape[0]
            density_out.copy_(kept_density_reference(idx.reshape(B, R // B, k), n_visible, density_out.shape[1]))
        return idx
    if not triton_ok:
        raise ValueError(f"the Triton top-k needs float32 rows of at most {MAX_N} (got {N}, {x.dtype}) on CUDA or "
                         f"under TRITON_INTERPRET=1 (got {x.device})")
    lead = x.shape[:-1]
    rows = x.reshape(-1, N)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape[0], k, dtype=torch.int64, device=x.device)
    if rows.shape[0] == 0:
        return out.view(*lead, k)
    if k == 0:
        if density_out is not None:
            density_out.zero_()
        return out.view(*lead, k)
    rk = row_k.reshape(-1).contiguous() if row_k is not None else out
    tok = tokens.reshape(-1, N) if tokens is not None else out
    if tok.stride(-1) != 1:
        tok = tok.contiguous()
    block_n = triton.next_power_of_2(N)
    kernel = _topk_indices_kernel if algorithm == "bisect" else _topk_radix_kernel
    dens = density_out if density_out is not None else out
    nvis = n_visible.contiguous() if n_visible is not None else out
    rows_per_b = rows.shape[0] // n_visible.shape[0] if n_visible is not None else 1
    kernel[(rows.shape[0],)](
        rows, out, rk, tok, N, k, rows.stride(0), out.stride(0), tok.stride(0), group, dens, nvis, rows_per_b,
        HAS_ROW_K=row_k is not None, HAS_TOKENS=tokens is not None, DROP_NEG_INF=drop_neg_inf,
        BLOCK_N=block_n, BLOCK_K=triton.next_power_of_2(k), HAS_DENSITY=density_out is not None,
        HEADS_PER_ROW=heads_per_row, BLOCK_HR=triton.next_power_of_2(heads_per_row),
        num_warps=num_warps or (4 if block_n <= 2048 else (8 if block_n <= 8192 else 16)))
    return out.view(*lead, k)


def topk_indices_reference(x: Tensor, k: int, *, row_k: Tensor | None = None, tokens: Tensor | None = None,
                           drop_neg_inf: bool = True) -> Tensor:
    """`topk_indices` with torch.topk (sorted by value: with row_k, each row keeps its row_k best slots).
    Equal to the kernel as a set per row wherever the k-th largest value is not tied."""
    values, idx = torch.topk(x, k, dim=-1, sorted=row_k is not None)
    if tokens is not None:
        N = x.shape[-1]
        rows = tokens.reshape(-1, N)
        group = (x.numel() // max(N, 1)) // rows.shape[0]
        idx = rows.repeat_interleave(group, dim=0).gather(-1, idx.reshape(rows.shape[0] * group, k)).view(idx.shape)
    if drop_neg_inf:
        idx = torch.where(values == float("-inf"), torch.full_like(idx, -1), idx)
    if row_k is not None:
        slot = torch.arange(k, device=x.device)
        idx = torch.where(slot < row_k[..., None], idx, torch.full_like(idx, -1))
    return idx
