"""LessIsMore: one decode token set shared by all heads, selected in a few layers and reused
(arXiv 2508.07101; shared/specs/lessismore.md; kernels/lessismore.py).

Layer roles (each decode step; prefill stays dense): `dense_layers` run exact attention; each of the
`selection_layers` runs exact attention and selects `budget` tokens (sink + rank-by-rank union of the
heads' top tokens + recent) from its own logits; every other layer attends only over the selection of
the latest selection layer before it. The selection is a tensor edge of the FX graph (the pass wires it,
see sparse_compile.method); nothing is kept between calls. Layers before the first selection layer that
are not dense layers also run exact attention (there is nothing to reuse yet).

Budget split: recent = ceil(recent_fraction * budget) last tokens, `sink` first tokens, the rest from
the union. (The public code takes the sink out of the recency share: recent = budget - int(0.75 budget)
- 4; here the recency share is exactly `recent_fraction`, as the issue's contract states.)

Selecting layers without a SparseCache run attention and selection from one read of K/V on CUDA
(kernels/lessismore_select.py: the logits come out of the attention pass, and the selection runs no torch.topk);
elsewhere dense attention, then `decode_logits` and `select_tokens` (the same selection, as a set, ties aside).

Two-stage selection: when the site's keys come from a `sparse_compile.SparseCache` that keeps this selection
layer's page summaries, the node passes them (`cache=`) and the selecting layer calls methods/two_stage.py
`lessismore_two_stage` with the same (sink, middle, recent) counts: the heads' page rankings by the bound of
q.k, united rank by rank, `candidates` x middle tokens' worth of pages, then the exact logits of their keys.
With every page a candidate the selection is the single-stage one.

Falls back to exact attention (reason in the Report) when budget >= the cache length, for a sliding
window (the selection would ignore it) and for prefill (q_len > 1: the method is decode-only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sparse_compile.attention_mask import AttentionMask, SiteFacts, visible_keys
from sparse_compile.kernels.key_state import key_state_from_mask
from sparse_compile.kernels.lessismore import budget_split, decode_logits, select_tokens
from sparse_compile.kernels.lessismore_select import lessismore_select
from sparse_compile.kernels.sparse_decode import kernel_unsupported, sparse_decode_attention
from sparse_compile.layers import in_layers, layer_list
from sparse_compile.method import BenchCase, CacheBuffers, Knob, Method
from sparse_compile.methods import METHODS
from sparse_compile.methods.two_stage import lessismore_two_stage
from sparse_compile.params import MethodParams, param


@dataclass(frozen=True)
class LessIsMoreParams(MethodParams):
    """LessIsMore's parameters (policy table `[decode.params]`)."""

    budget: int = param(2048, range=(8, 1 << 24), help="tokens every head attends to in reusing layers")
    recent_fraction: float = param(0.25, range=(0.0, 1.0),
                                   help="share of the budget given to the most recent tokens (ceil)")
    sink: int = param(4, range=(0, 1 << 16), help="first tokens always kept")
    selection_layers: tuple = param((), type=(list, tuple), convert=layer_list,
                                    help="layers that select (ints and 'a-b' ranges); [] = layer 2 and "
                                         "num_layers // 3, counted over the layers of the compiled graph")
    dense_layers: tuple = param((0, 1), type=(list, tuple), convert=layer_list,
                                help="layers that always run exact attention")
    candidates: float = param(4.0, type=(int, float), range=(1.0, 1 << 20),
                              help="SparseCache two-stage selection: middle-region candidate tokens, a multiple of "
                                   "the middle count (whole pages)")

    def validate(self) -> str | None:
        try:
            budget_split(self.budget, self.sink, self.recent_fraction)
        except ValueError as err:
            return f"{err} (lower sink or recent_fraction, or raise budget)"
        return None


Params = LessIsMoreParams


def selection_layers(params: LessIsMoreParams, num_layers: int) -> tuple[int | str, ...]:
    if params.selection_layers:
        return params.selection_layers
    return tuple(sorted({2, max(2, num_layers // 3)}))


def selection_role(layer: int, num_layers: int, params: LessIsMoreParams) -> str:
    """"exact" for dense layers, "select" for selection layers, "reuse" for the others (the pass turns a
    "reuse" with no selection layer before it into "exact")."""
    if in_layers(layer, params.dense_layers):
        return "exact"
    if in_layers(layer, selection_layers(params, num_layers)):
        return "select"
    return "reuse"


def selection_size(params: LessIsMoreParams) -> int:
    return params.budget


def unsupported(call: Any, site: SiteFacts, params: LessIsMoreParams) -> str | None:
    """Why LessIsMore cannot run this call (the node then runs exact attention), or None."""
    if call.q_len != 1:
        return f"q_len {call.q_len} (LessIsMore selects for one decode query)"
    if call.window:
        return f"sliding window {call.window}"
    if params.budget >= call.kv_len:
        return f"budget {params.budget} >= cache length {call.kv_len}: every token is attended"
    if call.device_type == "cuda":  # the Triton scoring and sparse decode kernels
        return kernel_unsupported(call.head_dim, call.dtype)
    return None


def decode_visible(mask: AttentionMask, batch: int, kv_len: int, device: torch.device) -> Tensor:
    """(B, Lk) bool: the keys the one decode query may see (causality, padding)."""
    return visible_keys(mask, batch, 1, kv_len, device=device)[:, 0, 0, :]


def visible_count(mask: AttentionMask, batch: int, kv_len: int, device: torch.device) -> Tensor:
    """(B,) float32 number of keys the decode query sees (at least 1): arithmetic without a key mask."""
    if mask.key_valid is None:
        last = min(mask.q_offset, kv_len - 1) if mask.causal else kv_len - 1
        first = max(0, mask.q_offset - mask.window + 1) if mask.window else 0
        return torch.full((batch,), float(max(last - first + 1, 1)), device=device)
    return decode_visible(mask, batch, kv_len, device).sum(dim=1).clamp(min=1).float()


def fused_select(q: Tensor, mask: AttentionMask, impl: str) -> bool:
    """Whether a selecting layer without a SparseCache runs kernels/lessismore_select.py (attention and selection
    from one read of K/V): impl "auto" on CUDA, "triton" (CUDA, or the interpreter), never "reference"; only when
    the selection sees exactly the keys attention sees (no dense mask) and the kernel takes the dtype/head_dim."""
    if impl not in ("auto", "triton", "reference"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'reference', got {impl!r}")
    wanted = impl == "triton" or (impl == "auto" and q.is_cuda)
    return wanted and mask.dense_mask is None and kernel_unsupported(q.shape[-1], q.dtype) is None


def attention(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, site: SiteFacts, params: LessIsMoreParams,
              scale: float, role: str = "reuse", selection: Tensor | None = None,
              cache: CacheBuffers | None = None, impl: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """One decode step of one layer. q: (B, H, 1, D); k, v: (B, Hkv, Lk, D); cache: a SparseCache layer's page
    summaries (role "select": two-stage selection) or None.

    role "select": exact attention, and the selection made from this layer's logits (B, budget) int32;
    role "reuse": attention over `selection` only. Returns (out (B, H, 1, D), density (B, H): selected
    visible tokens / visible tokens (1.0 when selecting), selection made ((B, 0) when reusing)).
    impl (role "select" without a cache): "auto" (on CUDA one pass over K/V computes the attention and the
    selection, kernels/lessismore_select.py; elsewhere dense attention + decode_logits + select_tokens),
    "triton" (the fused kernels, also under the Triton interpreter), "reference" (the PyTorch path)."""
    B, H = q.shape[:2]
    Lk = k.shape[2]
    if role == "select":
        if cache is None and fused_select(q, mask, impl):  # the per-key state from the mask's structure, in Triton
            n_sink, middle, n_recent = budget_split(params.budget, params.sink, params.recent_fraction)
            state, _ = key_state_from_mask(B, Lk, q_pos=mask.q_offset, causal=mask.causal, window=mask.window,
                                           key_valid=mask.key_valid, sink=n_sink, recent=n_recent, device=q.device,
                                           impl="auto" if q.is_cuda else "triton")
            out, made = lessismore_select(q, k, v, None, scale, n_sink, middle, n_recent, state=state, impl="triton")
            return out, torch.ones(B, H, dtype=torch.float32, device=q.device), made
        visible = decode_visible(mask, B, Lk, q.device)
        dense = METHODS["dense"]
        out, density = dense.attention(q, k, v, mask, site, dense.Params(), scale)
        if cache is not None:  # SparseCache: the page prefilter, then the exact logits of the candidates
            n_sink, middle, n_recent = budget_split(params.budget, params.sink, params.recent_fraction)
            made = lessismore_two_stage(q, k, cache.page_min, cache.page_max, visible, scale, n_sink, middle, n_recent,
                                        max(1, math.ceil(params.candidates * middle)), cache.page_size)
            return out, density, made
        logits = decode_logits(q, k, scale, visible, impl="reference" if impl == "reference" else "auto")
        made = select_tokens(logits, visible, params.budget, params.sink, params.recent_fraction)
        return out, density, made
    if role != "reuse" or selection is None:
        raise ValueError(f"LessIsMore attention: role {role!r} needs a selection" if role == "reuse"
                         else f"LessIsMore attention: unknown role {role!r}")
    # one index set for every head: the kernel reads each selected token's K/V once per KV head. Every
    # listed token is visible (the selection layer chose among the visible keys of this same step and mask),
    # so the kernel needs no key mask; -1 slots are skipped.
    out = sparse_decode_attention(q, k, v, selection[:, None, :], scale=scale)
    kept = (selection >= 0).sum(dim=1).float()
    density = (kept / visible_count(mask, B, Lk, q.device))[:, None].expand(B, H).contiguous()
    return out, density, selection.new_empty((B, 0))


METHOD = Method(
    name="lessismore",
    phases=("decode",),
    Params=LessIsMoreParams,
    attention=attention,
    unsupported=unsupported,
    capturable_phases=("decode",),
    cache_buffers=("page_min", "page_max"),
    selection_role=selection_role,
    selection_size=selection_size,
    summary="decode: one token set shared by all heads, selected in a few layers and reused (LessIsMore)",
    bench_cases=(BenchCase("decode", "select", role="select"), BenchCase("decode", "reuse", role="reuse")),
    knobs=(Knob(("selection_layers",), "selection_layers", "decode"),),
)
