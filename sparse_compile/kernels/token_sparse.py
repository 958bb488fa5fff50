"""Token Sparse Attention: per-head token selection, compress (gather), attend, decompress (scatter).

Paper: arXiv 2602.03216 (spec in shared/specs/token_sparse.md). Per layer and head, a reduced set of
tokens is chosen by Dynamic Token Coverage; their Q/K/V rows are gathered into dense buffers, attention
runs on the compressed sequence, and the output rows are scattered back to length L with zeros for the
dropped tokens (their residual stream passes through the layer unchanged). The same sorted index set is
used for the queries and the keys of a head, so plain causal attention on the compressed sequence is
causal attention over the original positions restricted to the kept tokens.

Steps (one prefill call, Lq == Lk == L; w = recent, s = smooth, m = min_keep, tau = dropped_mass):
  1. score (`key_scores` of sparse_compile.kernels.pbs, shared with PBS: the same quantity, with w rows):
     A[b, h, j] = mean over the last w queries i of softmax_j(q_i . k_j * scale) over the keys i sees
     (causal, valid keys); only the prefix keys j < L - w are ranked.
  2. smooth: 1-D average pooling of width s along j, zero padding counted (the authors' avg_pool1d);
     padded keys are reset to 0 afterwards.
  3. Dynamic Token Coverage (`coverage_counts`): normalise A per head (A_h) and the head mean (A_g);
     sort A_g ascending; n_drop = how many valid prefix keys have cumulative mass < tau, plus one when
     it is not 0 (0: nothing dropped, the row stays dense); per batch row n_keep = min(P, max(m, P -
     n_drop)) with P the valid prefix keys. Every head keeps the same count, its own top-n_keep of A_h.
  4. `keep_sets`: the kept prefix keys plus every valid recent token -> inv (B, H, L) int32, the slot of
     each token in its head's compressed sequence (-1: dropped), and idx (B, H, Lc) int32, the original
     position in each slot (ascending; -1 past the row's count). Lc = the largest count over the batch
     (the one host sync of the method: it sizes the buffers).
  5. `gather_qkv` (Triton): q, k, v rows at idx -> qc, kc, vc (B, H, Lc, D), K/V expanded per query head
     (heads keep different tokens); rows past a batch row's count are zeros.
  6. attention on (qc, kc, vc): causal, q_offset 0, and key_valid (B, Lc) = slot < count when the batch
     rows keep different counts (sparse_compile.methods.token_sparse).
  7. `scatter_rows` (Triton): out[b, h, j] = oc[b, h, inv[b, h, j]], zeros where inv is -1; one pass
     writes every output row (no separate zero fill).

Reads top to bottom: the jit kernels, their launchers with input checks, the PyTorch references, then
the selection (torch ops on every device; step 1 runs the Triton scoring kernels on CUDA).
This file imports nothing above `sparse_compile.kernels`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from sparse_compile.kernels.limits import KERNEL_DTYPES
from sparse_compile.kernels.pbs import key_scores, key_scores_triton

# ---------------------------------------------------------------------------------------------
# Step 5: gather the kept rows of q, k, v (one launch for the three tensors)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _gather_qkv_kernel(
    Q, K, V, IDX, QC, KC, VC,
    Lc, H, G,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_ib, stride_ih,
    stride_cb, stride_ch, stride_cl,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Grid (cdiv(Lc, BLOCK_L), B * H): slots [pid * BLOCK_L, ...) of head h; qc/kc/vc share strides."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hkv = h // G
    slots = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    in_range = slots < Lc
    # 1. the original position of each slot (-1: past the row's count, written as zeros)
    src = tl.load(IDX + b * stride_ib + h * stride_ih + slots, mask=in_range, other=-1).to(tl.int64)
    load_mask = (src >= 0)[:, None] & (offs_d < HEAD_DIM)[None, :]
    store_mask = in_range[:, None] & (offs_d < HEAD_DIM)[None, :]
    row = tl.where(src >= 0, src, 0)
    dst = b * stride_cb + h * stride_ch + slots.to(tl.int64)[:, None] * stride_cl + offs_d[None, :]
    # 2. copy the rows: q of head h, k and v of its KV head
    x = tl.load(Q + b * stride_qb + h * stride_qh + row[:, None] * stride_ql + offs_d[None, :] * stride_qd,
                mask=load_mask, other=0.0)
    tl.store(QC + dst, x, mask=store_mask)
    x = tl.load(K + b * stride_kb + hkv * stride_kh + row[:, None] * stride_kl + offs_d[None, :] * stride_kd,
                mask=load_mask, other=0.0)
    tl.store(KC + dst, x, mask=store_mask)
    x = tl.load(V + b * stride_vb + hkv * stride_vh + row[:, None] * stride_vl + offs_d[None, :] * stride_vd,
                mask=load_mask, other=0.0)
    tl.store(VC + dst, x, mask=store_mask)


# ---------------------------------------------------------------------------------------------
# Step 7: scatter the compressed output back to length L, zeros for dropped tokens
# ---------------------------------------------------------------------------------------------


@triton.jit
def _scatter_rows_kernel(
    OC, INV, OUT,
    L, H,
    stride_cb, stride_ch, stride_cl, stride_cd,
    stride_ib, stride_ih,
    stride_ob, stride_oh, stride_ol,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Grid (cdiv(L, BLOCK_L), B * H): output rows [pid * BLOCK_L, ...) of head h, every one written."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    in_range = rows < L
    slot = tl.load(INV + b * stride_ib + h * stride_ih + rows, mask=in_range, other=-1).to(tl.int64)
    kept = slot >= 0
    x = tl.load(OC + b * stride_cb + h * stride_ch + tl.where(kept, slot, 0)[:, None] * stride_cl
                + offs_d[None, :] * stride_cd, mask=kept[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    tl.store(OUT + b * stride_ob + h * stride_oh + rows.to(tl.int64)[:, None] * stride_ol + offs_d[None, :], x,
             mask=in_range[:, None] & (offs_d < HEAD_DIM)[None, :])


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _check_index(name: str, index: Tensor, shape: tuple[int, ...], device: torch.device) -> None:
    if index.dtype != torch.int32 or tuple(index.shape) != shape or index.device != device:
        raise ValueError(f"{name} must be an int32 tensor of shape {shape} on {device}, got {index.dtype} "
                         f"{tuple(index.shape)} on {index.device}")
    if index.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim, got strides {index.stride()}")


def _use_triton(impl: str, x: Tensor) -> bool:
    if impl not in ("auto", "triton", "reference"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'reference', got {impl!r}")
    if impl == "triton" and x.dtype not in KERNEL_DTYPES:
        raise ValueError(f"the Triton kernels take float16/bfloat16/float32, got {x.dtype}")
    return impl == "triton" or (impl == "auto" and x.is_cuda)


def _block_l(block_d: int) -> int:
    return 64 if block_d <= 128 else 32


def gather_qkv(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, *, impl: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """Compress: the rows of q, k, v at idx, per query head.

    q: (B, H, L, D); k, v: (B, Hkv, L, D), H % Hkv == 0, one dtype and device; idx: (B, H, Lc) int32,
    original positions in [0, L) or -1 (that slot is written as zeros).
    Returns qc, kc, vc: (B, H, Lc, D) contiguous, in q's dtype (K/V expanded to the query heads).
    impl: "auto" (Triton on CUDA, reference on CPU), "triton" (CUDA or TRITON_INTERPRET=1), "reference".
    """
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q (B, H, L, D), k and v (B, Hkv, L, D) do not fit: {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"num_heads {H} is not a multiple of num_kv_heads {Hkv}")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must share dtype and device: {q.dtype}/{k.dtype}/{v.dtype}")
    if idx.dim() != 3:
        raise ValueError(f"idx must be (B, H, Lc), got {tuple(idx.shape)}")
    _check_index("idx", idx, (B, H, idx.shape[2]), q.device)
    if not _use_triton(impl, q):
        return gather_qkv_reference(q, k, v, idx)
    Lc = idx.shape[2]
    qc = torch.empty(B, H, Lc, D, dtype=q.dtype, device=q.device)
    kc, vc = torch.empty_like(qc), torch.empty_like(qc)
    if Lc == 0 or B * H == 0:
        return qc, kc, vc
    BLOCK_D = max(16, triton.next_power_of_2(D))
    BLOCK_L = _block_l(BLOCK_D)
    _gather_qkv_kernel[(triton.cdiv(Lc, BLOCK_L), B * H)](
        q, k, v, idx, qc, kc, vc, Lc, H, H // Hkv,
        *q.stride(), *k.stride(), *v.stride(), idx.stride(0), idx.stride(1),
        qc.stride(0), qc.stride(1), qc.stride(2),
        HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_L=BLOCK_L, num_warps=4,
    )
    return qc, kc, vc


def scatter_rows(oc: Tensor, inv: Tensor, *, impl: str = "auto") -> Tensor:
    """Decompress: out[b, h, j] = oc[b, h, inv[b, h, j]], zeros where inv[b, h, j] == -1.

    oc: (B, H, Lc, D); inv: (B, H, L) int32 slots in [0, Lc) or -1. Returns (B, H, L, D) in oc's dtype,
    every row written (no separate zero fill).
    """
    if oc.dim() != 4 or inv.dim() != 3 or inv.shape[:2] != oc.shape[:2]:
        raise ValueError(f"oc (B, H, Lc, D) and inv (B, H, L) do not fit: {tuple(oc.shape)}, {tuple(inv.shape)}")
    _check_index("inv", inv, tuple(inv.shape), oc.device)
    if not _use_triton(impl, oc):
        return scatter_rows_reference(oc, inv)
    B, H, _, D = oc.shape
    L = inv.shape[2]
    out = torch.empty(B, H, L, D, dtype=oc.dtype, device=oc.device)
    if L == 0 or B * H == 0:
        return out
    BLOCK_D = max(16, triton.next_power_of_2(D))
    BLOCK_L = _block_l(BLOCK_D)
    _scatter_rows_kernel[(triton.cdiv(L, BLOCK_L), B * H)](
        oc, inv, out, L, H, *oc.stride(), inv.stride(0), inv.stride(1), out.stride(0), out.stride(1),
        out.stride(2), HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_L=BLOCK_L, num_warps=4,
    )
    return out


# ---------------------------------------------------------------------------------------------
# References of the two kernels
# ---------------------------------------------------------------------------------------------


def gather_qkv_reference(q: Tensor, k: Tensor, v: Tensor, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`gather_qkv` with torch.gather (same arguments and result)."""
    B, H, L, D = q.shape
    G = H // k.shape[1]
    ok = (idx >= 0)[..., None]  # (B, H, Lc, 1)
    index = idx.clamp_min(0).long()[..., None].expand(B, H, idx.shape[2], D)

    def take(x: Tensor) -> Tensor:
        full = x if x.shape[1] == H else x.repeat_interleave(G, dim=1)
        return torch.gather(full, 2, index).masked_fill(~ok, 0).contiguous()

    return take(q), take(k), take(v)


def scatter_rows_reference(oc: Tensor, inv: Tensor) -> Tensor:
    """`scatter_rows` with torch.gather (same arguments and result)."""
    B, H, L = inv.shape
    D = oc.shape[-1]
    if oc.shape[2] == 0:
        return oc.new_zeros(B, H, L, D)
    rows = torch.gather(oc, 2, inv.clamp_min(0).long()[..., None].expand(B, H, L, D))
    return rows.masked_fill((inv < 0)[..., None], 0)


# ---------------------------------------------------------------------------------------------
# Steps 1-4: the selection (torch ops; step 1 in Triton on CUDA)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenSelection:
    """The kept tokens of one call.

    idx: (B, H, Lc) int32 original positions per slot, ascending, -1 past the row's count.
    inv: (B, H, L) int32 slot of each token, -1 for dropped (and padded) tokens.
    kept: (B,) int64 on the device, tokens kept per batch row (every head keeps as many).
    kept_host: the same as a tuple of ints (read with the method's one host sync).
    valid: (B,) int64, the row's valid (non-padded) tokens; valid_host: the same as ints.
    """

    idx: Tensor
    inv: Tensor
    kept: Tensor
    kept_host: tuple[int, ...]
    valid: Tensor
    valid_host: tuple[int, ...]

    def drops_nothing(self) -> bool:
        """Whether every row kept all its valid tokens (then attention is exact attention)."""
        return self.kept_host == self.valid_host

    def keep_mask(self) -> Tensor:
        """(B, H, L) bool: which tokens each head kept."""
        return self.inv >= 0

    def kept_fraction(self) -> Tensor:
        """(B, H) float32: kept tokens / valid tokens of the row (1.0 for an empty row)."""
        frac = torch.where(self.valid > 0, self.kept.float() / self.valid.clamp_min(1).float(), 1.0)
        return frac[:, None].expand(self.inv.shape[0], self.inv.shape[1]).contiguous()


def token_scores(q: Tensor, k: Tensor, *, key_valid: Tensor | None, scale: float, recent: int,
                 impl: str = "auto") -> Tensor:
    """Step 1. q: (B, H, L, D), k: (B, Hkv, L, D), key_valid: (B, L) bool or None.

    Returns (B, H, L) float32: each key's mean probability over the last `recent` queries.
    The Triton kernels of PBS on CUDA (or impl="triton"), their reference otherwise."""
    if _use_triton(impl, q):
        return key_scores_triton(q, k, q_offset=0, key_valid=key_valid, scale=scale, per_kv_head=False,
                                 last_queries=recent)
    valid = torch.ones(q.shape[0], k.shape[2], dtype=torch.bool, device=q.device) if key_valid is None else key_valid
    return key_scores(q, k, q_offset=0, key_valid=valid, scale=scale, per_kv_head=False, last_queries=recent)


def smooth_scores(scores: Tensor, width: int) -> Tensor:
    """Step 2. (B, H, P) -> (B, H, P): average pooling of odd `width`, zero padding counted."""
    if width == 1 or scores.shape[-1] == 0:
        return scores
    B, H, P = scores.shape
    out = torch.nn.functional.avg_pool1d(scores.reshape(B * H, 1, P), kernel_size=width, stride=1,
                                         padding=width // 2, count_include_pad=True)
    return out.view(B, H, P)


def coverage_counts(scores: Tensor, prefix_valid: Tensor, *, dropped_mass: float, min_keep: int) -> Tensor:
    """Step 3. scores: (B, H, P) smoothed, 0 at padded keys; prefix_valid: (B, P) bool.

    Returns n_keep (B,) int64: how many prefix keys every head of the row keeps (no host sync)."""
    P = scores.shape[-1]
    g = scores.mean(1)  # (B, P) head mean
    g = g / (g.sum(-1, keepdim=True) + 1e-8)
    cumulative = torch.cumsum(torch.sort(g, dim=-1).values, dim=-1)
    n_pad = (~prefix_valid).sum(-1)  # padded keys have mass 0: they sort first and are all counted when tau > 0
    n_valid = P - n_pad
    n_drop = ((cumulative < dropped_mass).sum(-1) - n_pad).clamp_min(0)
    n_drop = torch.where(n_drop > 0, n_drop + 1, n_drop)  # the authors' "+1" (0 keeps the row dense)
    return torch.minimum(n_valid, torch.clamp_min(n_valid - n_drop, min_keep))


def keep_sets(scores: Tensor, key_valid: Tensor, n_keep: Tensor, recent: int) -> TokenSelection:
    """Step 4. scores: (B, H, P) smoothed, P = L - recent; key_valid: (B, L) bool; n_keep: (B,) int64.

    Each head keeps its top-n_keep prefix keys by per-head normalised score (ties: lower position first)
    and every valid recent token. One host sync (the counts, which size idx)."""
    B, H, P = scores.shape
    L = key_valid.shape[1]
    dev = scores.device
    prefix_valid = key_valid[:, :P]
    a_h = scores / (scores.sum(-1, keepdim=True) + 1e-8)
    ranked = torch.sort(a_h.masked_fill(~prefix_valid[:, None], -1.0), dim=-1, descending=True, stable=True).indices
    top = (torch.arange(P, device=dev)[None, :] < n_keep[:, None])[:, None].expand(B, H, P)
    keep_prefix = torch.zeros(B, H, P, dtype=torch.bool, device=dev).scatter(-1, ranked, top)
    keep = torch.cat([keep_prefix, key_valid[:, None, P:].expand(B, H, L - P)], dim=-1)  # (B, H, L)
    slot = torch.cumsum(keep, dim=-1, dtype=torch.int32) - 1
    inv = torch.where(keep, slot, -1).to(torch.int32).contiguous()
    kept = n_keep + key_valid[:, P:].sum(-1)
    valid = key_valid.sum(-1)
    counts = torch.stack([kept, valid]).tolist()  # the one host sync
    kept_host, valid_host = tuple(counts[0]), tuple(counts[1])
    Lc = max(kept_host, default=0)
    idx = torch.full((B, H, Lc + 1), -1, dtype=torch.int32, device=dev)
    target = torch.where(keep, slot, Lc).long()  # dropped tokens land in a spare slot, cut off below
    idx.scatter_(-1, target, torch.arange(L, dtype=torch.int32, device=dev).expand(B, H, L))
    idx = idx[..., :Lc].contiguous()
    return TokenSelection(idx, inv, kept, kept_host, valid, valid_host)


def select_tokens(q: Tensor, k: Tensor, *, key_valid: Tensor | None, scale: float, dropped_mass: float,
                  min_keep: int, recent: int, smooth: int, impl: str = "auto") -> TokenSelection:
    """Steps 1-4 for one prefill call (Lq == Lk == L > recent).

    q: (B, H, L, D), k: (B, Hkv, L, D); key_valid: (B, L) bool (left padding) or None.
    Returns the TokenSelection. dropped_mass 0 keeps every valid token."""
    B, H, L, _ = q.shape
    if k.shape[2] != L or recent < 1 or recent >= L:
        raise ValueError(f"select_tokens needs Lq == Lk > recent >= 1, got Lq {L}, Lk {k.shape[2]}, recent {recent}")
    if smooth < 1 or smooth % 2 == 0:
        raise ValueError(f"smooth must be an odd width >= 1, got {smooth}")
    valid = torch.ones(B, L, dtype=torch.bool, device=q.device) if key_valid is None else key_valid.to(torch.bool)
    P = L - recent
    scores = token_scores(q, k, key_valid=key_valid, scale=scale, recent=recent, impl=impl)[..., :P]
    scores = smooth_scores(scores, smooth).masked_fill(~valid[:, None, :P], 0.0)
    if dropped_mass <= 0.0:
        n_keep = valid[:, :P].sum(-1)
    else:
        n_keep = coverage_counts(scores, valid[:, :P], dropped_mass=dropped_mass, min_keep=min_keep)
    return keep_sets(scores, valid, n_keep, recent)
