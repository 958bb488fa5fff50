"""FASA: frequency-chunk token selection for decode (arXiv 2602.03152; shared/specs/fasa.md).

Each decode step (one query token), per layer: score every visible key by the partial dot product
q_c . k_c over the head's few *dominant* RoPE frequency chunks (from calibration: `python -m
sparse_compile calibrate fasa`), keep the top `budget` keys, and attend exactly (full head dim, the site's
scale) over those keys with the shared sparse decode kernel. Prefill is dense (the method runs in the
decode phase only); `dense_layers` (default [0], as the authors) run exact attention.

Two-stage selection. When the site's keys come from a `sparse_compile.SparseCache` that keeps this layer's
dims copy and page summaries, the node passes them (`cache=`, ops.CacheBuffers) and the selection is
methods/two_stage.py `fasa_two_stage`: pages ranked by the bound of FASA's partial score, the `candidates`
tokens' worth of best pages kept, FASA's partial scores of their keys read from the contiguous `key_dims`,
top `slots`. The dims scored are the cache's (`dims`, `member`: built from the cache's policy, or its explicit
`dims=`): build the cache from the backend's policy. Where the cache keeps no dims copy (the union is every
head dim) the keys are read from K with this layer's own dims. With every page a candidate the selection is
the single-stage one (a fraction budget over ragged rows keeps each row's count, as the single stage).
Attention over the selected tokens is the same sparse decode kernel.

Chunks, the scoring rule, ties and the CUDA path are in kernels/fasa.py. Parameters (`[decode.params]`):
  budget   tokens per score row (>= 1), or a fraction (< 1) of the visible keys; sink + recent count inside
           it and it is never below sink + recent. A budget that covers the cache runs exact attention.
  max_budget  at most this many tokens per row, whatever the budget (0: no cap): budget = 0.25 with
           max_budget = 2048 is min(25%, 2048), one policy for an 8K chat and a 128K one.
  chunks   per layer, per head, the dominant chunk indices, best first (calibration writes them):
           chunks[layer] = [[c, ...] per query head] (or per KV head, or one list for every head);
           [] for a layer (or no chunks at all): the model-agnostic rule `default_chunks`.
  n_chunks how many chunks per head: the first n of each calibrated list, or of the agnostic rule
           (0: every listed chunk, or `rule_fraction` of the D/2 chunks for the rule: 0.25 by default, as
           the authors; the generic `fasa` policy keeps half).
  sink, recent  the first / last visible keys always kept (the authors keep none: both 0 by default).
  gqa      "per_head" (the authors': one token set per query head) or "per_kv_head" (the group's
           predicted scores summed, one set per KV head: each selected K/V row is read once per group).
  candidates  with a SparseCache (two-stage selection, below): candidate tokens per KV head as a multiple of
           the slots kept (default 4; whole pages, so rounded up; at least the slots).
  min_cache_mib  a speed gate: FASA runs only where this layer's K and V (the whole batch, at the cache's
           capacity) hold at least this many MiB; below it the selection's fixed cost (~60-80 us a layer on an
           H100) exceeds what dense decode spends reading K/V, so exact attention runs, with the reason in the
           Report (0: no gate, the default; the crossover on an H100 is not measured yet, DECODE_NOTES.md).
  mismatch "rule": a layer whose calibrated chunks do not fit the site (another model: layer count, head
           count, chunk index >= D/2) uses the model-agnostic rule, so a policy calibrated on one model runs
           on any; "dense": such a layer runs exact attention, with the reason in the Report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sparse_compile.attention_mask import AttentionMask, SiteFacts
from sparse_compile.kernels.device_constants import on_device
from sparse_compile.kernels.fasa import (
    budget_slots,
    default_chunk_count,
    default_chunks,
    fasa_scores,
    fasa_scores_reference,
    host_chunk_tables,
    select_tokens,
    visible_range,
)
from sparse_compile.kernels.kept_density import kept_density
from sparse_compile.kernels.key_state import key_state_from_mask
from sparse_compile.kernels.sparse_decode import kernel_unsupported, sparse_decode_attention
from sparse_compile.layers import in_layers, layer_list  # noqa: F401 - in_layers re-exported
from sparse_compile.method import GQA_MODES, BenchCase, CacheBuffers, KeyState, Knob, Method
from sparse_compile.methods.two_stage import fasa_two_stage, kept_pages
from sparse_compile.params import MethodParams, param


def as_tuples(value: Any, key: str = "", where: str = "") -> Any:
    """Nested lists -> nested tuples (hashable, frozen); other values unchanged."""
    return tuple(as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def chunks_problem(chunks: Any) -> str | None:
    """Why a `chunks` value is malformed (structure only; ranges are checked per site), or None."""
    for i, layer in enumerate(chunks):
        if not isinstance(layer, tuple):
            return f"key 'chunks': layer {i} must be a list of per-head chunk lists, got {layer!r}"
        widths = set()
        for h, head in enumerate(layer):
            if not isinstance(head, tuple) or not head:
                return f"key 'chunks': layer {i} head {h} must be a non-empty list of chunk indices"
            if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in head):
                return f"key 'chunks': layer {i} head {h} holds a value that is not a chunk index (int >= 0)"
            if len(set(head)) != len(head):
                return f"key 'chunks': layer {i} head {h} repeats a chunk"
            widths.add(len(head))
        if len(widths) > 1:
            return f"key 'chunks': layer {i} gives heads different chunk counts {sorted(widths)}"
    return None


@dataclass(frozen=True)
class FasaParams(MethodParams):
    """FASA's parameters (policy table `[decode.params]`; the module docstring explains each)."""

    budget: float = param(256, type=(int, float), range=(0.0, 1 << 30),
                          help="tokens kept per score row (>= 1), or a fraction (< 1) of the visible keys")
    max_budget: int = param(0, range=(0, 1 << 30),
                            help="at most this many tokens per row (0: no cap; never below sink + recent); budget "
                                 "= 0.25 with max_budget = 2048 keeps min(25% of the visible keys, 2048)")
    chunks: tuple = param((), type=(list, tuple), convert=as_tuples,
                          help="per layer, per head: dominant frequency chunks, best first (from `calibrate "
                               "fasa`); [] = the model-agnostic rule (lowest-frequency quarter)")
    rule_fraction: float = param(0.25, range=(1e-6, 1.0),
                                 help="the model-agnostic rule's share of each head's D/2 chunks when n_chunks = 0 "
                                      "(0.25: the authors' 16 of 64; the generic `fasa` policy keeps 0.5)")
    n_chunks: int = param(0, range=(0, 1 << 12),
                          help="chunks used per head: the first n of each list (0: all listed; "
                               "rule_fraction of D/2 for the rule)")
    sink: int = param(0, range=(0, 1 << 20), help="first visible tokens always kept (inside the budget)")
    recent: int = param(0, range=(0, 1 << 20), help="last visible tokens always kept (inside the budget)")
    dense_layers: tuple = param((0,), type=(list, tuple), convert=layer_list, help="layers that run exact attention")
    candidates: float = param(4.0, type=(int, float), range=(1.0, 1 << 20),
                              help="SparseCache two-stage selection: candidate tokens per KV head, a multiple "
                                   "of the slots kept (whole pages)")
    min_cache_mib: float = param(0.0, type=(int, float), range=(0.0, float(1 << 30)),
                                 help="speed gate: run only where the layer's K+V (batch, cache capacity) hold "
                                      ">= this many MiB (0: always; smaller caches decode faster dense)")
    mismatch: str = param("rule", choices=("rule", "dense"),
                          help="a layer whose calibrated chunks do not fit the site (another model): the "
                               "model-agnostic rule, or exact attention with the reason in the Report")
    gqa: str = param("per_head", choices=GQA_MODES,
                     help="per_head: one token set per query head (the authors'); per_kv_head: the group's "
                          "scores summed, one set per KV head (K/V rows read once per group)")

    def validate(self) -> str | None:
        if self.budget <= 0:
            return f"key 'budget' = {self.budget} must be > 0 (tokens, or a fraction < 1)"
        if self.budget >= 1 and self.budget != int(self.budget):
            return f"key 'budget' = {self.budget}: a budget >= 1 counts tokens and must be a whole number"
        return chunks_problem(self.chunks)


Params = FasaParams


def chunk_misfit(params: FasaParams, layer: int, num_heads: int, num_kv_heads: int, head_dim: int) -> str:
    """Why the policy's calibrated chunks do not fit this layer of this model, or "" (they fit, or the
    policy lists none and uses the rule by design)."""
    listed = params.chunks[layer] if layer < len(params.chunks) else None
    if params.chunks and listed is None:
        return f"no calibrated chunks for layer {layer} (the policy lists {len(params.chunks)} layers)"
    if listed and len(listed) not in (num_heads, num_kv_heads, 1):
        return (f"calibrated chunks of layer {layer} name {len(listed)} heads; the site has {num_heads} "
                f"query heads and {num_kv_heads} KV heads")
    if listed and max(max(head) for head in listed) >= head_dim // 2:
        return f"a calibrated chunk of layer {layer} is >= head_dim / 2 = {head_dim // 2}"
    return ""


def layer_chunks(params: FasaParams, layer: int, num_heads: int, num_kv_heads: int,
                 head_dim: int, rotary_dim: int) -> tuple[tuple[tuple[int, ...], ...] | None, str]:
    """(per-head chunk tuples for this layer, "") or (None, why the layer cannot use FASA)."""
    listed = params.chunks[layer] if layer < len(params.chunks) else None
    misfit = chunk_misfit(params, layer, num_heads, num_kv_heads, head_dim)
    if misfit and params.mismatch == "dense":
        return None, misfit
    if misfit or not listed:
        count = min(params.n_chunks or default_chunk_count(head_dim, params.rule_fraction), head_dim // 2)
        return (default_chunks(rotary_dim, head_dim, count),), ""
    n = params.n_chunks or len(listed[0])
    return tuple(head[:n] for head in listed), ""


def notes(site: SiteFacts, params: FasaParams) -> str | None:
    """The Report's note when a layer's calibrated chunks do not fit this site and `mismatch = "rule"`
    replaces them by the model-agnostic rule (much worse than calibrated chunks: EVAL.md)."""
    if params.mismatch != "rule" or in_layers(site.layer, params.dense_layers):
        return None
    misfit = chunk_misfit(params, site.layer, site.num_heads, site.num_kv_heads, site.head_dim)
    if not misfit:
        return None
    return f"{misfit}: the model-agnostic chunk rule runs instead (run `calibrate fasa` for this model)"


def cache_mib(call: Any) -> float:
    """MiB of K and V one decode call's dense attention reads: B x Hkv x Lk x 2 D elements of the call's dtype."""
    return call.batch * call.num_kv_heads * call.kv_len * 2 * call.head_dim * call.dtype.itemsize / 2 ** 20


def unsupported(call: Any, site: SiteFacts, params: FasaParams) -> str | None:
    """Why FASA does not run this call (the node then runs exact attention), or None."""
    if call.q_len != 1:
        return f"q_len {call.q_len} (FASA selects for one decode query)"
    if in_layers(site.layer, params.dense_layers):
        return f"layer {site.layer} is in dense_layers"
    mib = cache_mib(call)
    if mib < params.min_cache_mib:
        return (f"K+V of this layer {mib:.1f} MiB < min_cache_mib {params.min_cache_mib:g}: "
                "the policy's speed gate")
    slots = row_slots(params, call.kv_len)
    if slots >= call.kv_len:
        return f"budget {params.budget} covers the cache length {call.kv_len}: every token is attended"
    limit = kernel_unsupported(call.head_dim, call.dtype) if call.device_type == "cuda" else None
    if limit:  # the Triton scoring and sparse decode kernels
        return limit
    rotary = min(site.rotary_dim, call.head_dim)
    _, problem = layer_chunks(params, site.layer, call.num_heads, call.num_kv_heads, call.head_dim, rotary)
    return problem or None


@dataclass(frozen=True)
class Selection:
    """One FASA decode selection. indices: (B, S, slots) int64 token indices, best first, -1 = none
    (S = H per_head, Hkv per_kv_head); density: (B, H) float32 kept / visible keys."""

    indices: Tensor
    density: Tensor


def site_host_tables(params: FasaParams, site: SiteFacts, H: int, Hkv: int, D: int) -> tuple[Tensor, Tensor]:
    """The host (memoised, page-locked) `chunk_tables` (segments, member (H, D)) of the chunks this site's layer
    scores; ValueError when the layer cannot run FASA (`unsupported` rules such calls out before the method runs)."""
    rotary = min(site.rotary_dim, D)
    chunks, problem = layer_chunks(params, site.layer, H, Hkv, D, rotary)
    if chunks is None:
        raise ValueError(f"FASA cannot run layer {site.layer}: {problem}")
    layout = "interleaved" if site.rope == "interleaved" else "rotate_half"
    return host_chunk_tables(chunks, H, Hkv, D, rotary, layout)


def site_chunk_tables(params: FasaParams, site: SiteFacts, H: int, Hkv: int, D: int,
                      device: torch.device) -> tuple[Tensor, Tensor]:
    """`site_host_tables` on `device` (`kernels.fasa.chunk_tables`: a capturable copy per call)."""
    segs, member = site_host_tables(params, site, H, Hkv, D)
    return on_device(segs, device), on_device(member, device)


def site_member(params: FasaParams, site: SiteFacts, H: int, Hkv: int, D: int, device: torch.device) -> Tensor:
    """The member table (H, D) float32 alone on `device`: the two-stage selection over a pages-only cache reads
    no segment table, so one host-to-device copy per call instead of two."""
    return on_device(site_host_tables(params, site, H, Hkv, D)[1], device)


def row_slots(params: FasaParams, kv_len: int) -> int:
    """Top-k slots per score row for `kv_len` keys: kernels/fasa.py `budget_slots`, capped at `max_budget` (never
    below sink + recent)."""
    slots = budget_slots(params.budget, kv_len, params.sink, params.recent)
    if params.max_budget:
        slots = min(slots, max(params.max_budget, params.sink + params.recent))
    return slots


def row_budget(params: FasaParams, mask: AttentionMask, Lk: int, S: int,
               n_visible: Tensor | None) -> tuple[int, Tensor | None]:
    """(top-k slots per score row, per-row counts (B, S) or None). n_visible: (B,) visible keys per batch row
    when the mask has padding: a fraction budget then keeps ceil(budget * visible) per row, counted on the
    device; without padding the visible count is known on the host and the slots hold exactly the budget."""
    if n_visible is None:
        lo, hi = visible_range(Lk, mask.causal, mask.q_offset, mask.window)
        n_vis = max(0, hi - lo + 1)
        slots = row_slots(params, max(n_vis, 1) if params.budget < 1 else Lk)
        return min(slots, Lk), None
    slots = row_slots(params, Lk)
    if params.budget >= 1:
        return slots, None
    want = torch.ceil(params.budget * n_visible.double()).long().clamp(min=params.sink + params.recent)
    if params.max_budget:
        want = want.clamp(max=max(params.max_budget, params.sink + params.recent))
    return slots, want[:, None].expand(n_visible.shape[0], S)


def step_key_state(q: Tensor, k: Tensor, mask: AttentionMask, params: FasaParams,
                   shared: KeyState | None = None) -> tuple[Tensor, Tensor]:
    """(state (B, Lk) int8, n_visible (B,) int32) of this decode call (kernels/key_state.py): the step's shared
    one when the pass handed it (computed once for the layers of a step), else computed here."""
    if shared is not None:
        return shared.state, shared.n_visible
    return key_state_from_mask(q.shape[0], k.shape[2], q_pos=mask.q_offset, causal=mask.causal, window=mask.window,
                               key_valid=mask.key_valid, sink=params.sink, recent=params.recent, device=q.device)


def fasa_select(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, site: SiteFacts, params: FasaParams,
                scale: float | None = None, key_state: KeyState | None = None) -> Selection:
    """Steps 1-3 of kernels/fasa.py for one decode call. q: (B, H, 1, D); k, v: (B, Hkv, Lk, D); key_state: the
    step's shared key state or None."""
    B, H, _, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    segs, member = site_chunk_tables(params, site, H, Hkv, D, q.device)
    per_kv_head = params.gqa == "per_kv_head"
    padded = mask.key_valid is not None
    if padded or not q.is_cuda:  # visibility as a state vector (ranks for sink/recent)
        state, n_visible = step_key_state(q, k, mask, params, key_state)
    if q.is_cuda:
        scores = fasa_scores(q, k, segs, member, per_kv_head=per_kv_head, causal=mask.causal, q_offset=mask.q_offset,
                             window=mask.window, state=state if padded else None, sink=params.sink,
                             recent=params.recent)
    else:
        scores = fasa_scores_reference(q, k, segs, member, state, per_kv_head=per_kv_head)
    slots, counts = row_budget(params, mask, Lk, scores.shape[1], n_visible if padded else None)
    idx = select_tokens(scores, slots, counts)
    if padded:  # visible counts on the device
        density = kept_density(idx, n_visible, H)  # one launch on CUDA
    else:  # every visible key scores finite, so min(slots, visible) slots hold one: known on the host
        lo, hi = visible_range(Lk, mask.causal, mask.q_offset, mask.window)
        n_vis = max(0, hi - lo + 1)
        density = torch.full((B, H), min(slots, n_vis) / max(n_vis, 1), dtype=torch.float32, device=q.device)
    return Selection(idx, density)


def two_stage_select(q: Tensor, k: Tensor, mask: AttentionMask, site: SiteFacts, params: FasaParams,
                     cache: CacheBuffers, key_state: KeyState | None = None) -> Selection:
    """FASA's selection through a SparseCache's page summaries and dims copy (module docstring).

    q: (B, H, 1, D); k: (B, Hkv, Lk, D); cache: key_dims (B, Hkv, Lk, n) / dims (Hkv, n) / member (H, n), or
    None (read K with this layer's own dims), page_min / page_max (B, Hkv, ceil(Lk / P), D); key_state: the
    step's shared key state or None (computed here)."""
    B, H, _, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    state, n_visible = step_key_state(q, k, mask, params, key_state)
    S = Hkv if params.gqa == "per_kv_head" else H
    slots, counts = row_budget(params, mask, Lk, S, None if mask.key_valid is None else n_visible)
    key_dims, dims, member = cache.key_dims, cache.dims, cache.member
    all_dims = key_dims is None
    if all_dims and member is None:  # a cache without the layer's tables: built per call (a host-to-device copy)
        member = site_member(params, site, H, Hkv, D, q.device)
        dims = torch.arange(D, device=q.device).expand(Hkv, D)
    if all_dims:  # no dims copy: the keys themselves, each query head on its own dims (member (H, D))
        key_dims = k
    candidates = max(slots, math.ceil(params.candidates * slots))
    host_density = None
    if mask.key_valid is None:  # visible keys [lo, hi]: is every slot's pick known to be finite?
        lo, hi = visible_range(Lk, mask.causal, mask.q_offset, mask.window)
        n_vis, P = max(0, hi - lo + 1), cache.page_size
        n_pages = -(-Lk // P)
        keep = kept_pages(candidates, P, n_pages, params.sink, params.recent)
        # the kept pages are visible ones (invisible pages rank last); at most the first and the last are partial
        if keep >= n_pages or (keep - 2) * P + 2 >= slots:
            host_density = min(slots, n_vis) / max(n_vis, 1)
    density = None if host_density is not None else torch.empty(B, H, dtype=torch.float32, device=q.device)
    idx = fasa_two_stage(q, key_dims, dims, member, cache.page_min, cache.page_max, state, slots, candidates,
                         cache.page_size, sink=params.sink, recent=params.recent,
                         per_kv_head=params.gqa == "per_kv_head", counts=counts, all_dims=all_dims,
                         density_out=density, n_visible=None if density is None else n_visible)
    if density is None:
        density = torch.full((B, H), host_density, dtype=torch.float32, device=q.device)
    return Selection(idx, density)  # the density from the final top-k's launch on CUDA


def attention(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, site: SiteFacts, params: FasaParams,
              scale: float | None = None, cache: CacheBuffers | None = None,
              key_state: KeyState | None = None) -> tuple[Tensor, Tensor]:
    """FASA decode. q: (B, H, 1, D); k, v: (B, Hkv, Lk, D) post-RoPE; cache: a SparseCache layer's buffers
    (two-stage selection) or None; key_state: the step's per-key state for (params.sink, params.recent), shared
    by the layers of the step (the pass's `key_state` node), or None (computed here). Returns (out (B, H, 1, D)
    in q's dtype, density (B, H) float32 = kept / visible keys). Called only for calls `unsupported` accepts."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if cache is not None:
        sel = two_stage_select(q, k, mask, site, params, cache, key_state)
    else:
        sel = fasa_select(q, k, v, mask, site, params, scale, key_state)
    out = sparse_decode_attention(q, k, v, sel.indices, scale=scale)
    return out, sel.density


# the shipped generic policy's params (policies/fasa.toml): 2048 tokens, half the chunks by the rule,
# 4 sink and 64 recent tokens forced; bench cases time it with and without a SparseCache (two-stage selection)
GENERIC = (("budget", 2048), ("rule_fraction", 0.5), ("sink", 4), ("recent", 64))

METHOD = Method(
    name="fasa",
    phases=("decode",),
    Params=FasaParams,
    attention=attention,
    unsupported=unsupported,
    notes=notes,
    select=fasa_select,
    cache_buffers=("key_dims", "dims", "member", "page_min", "page_max"),
    key_state_forced=lambda params: (params.sink, params.recent),
    capturable_phases=("decode",),  # Triton scores, torch.topk, the split-K kernel: no host sync on CUDA
    summary="decode: top tokens by a few dominant RoPE frequency chunks of q.k, exact attention over them (FASA)",
    bench_cases=(BenchCase("decode"), BenchCase("decode", "b2048", (("budget", 2048),)),
                 BenchCase("decode", "b2048:per_kv_head", (("budget", 2048), ("gqa", "per_kv_head"))),
                 BenchCase("decode", "generic", GENERIC),
                 BenchCase("decode", "generic:cache16", GENERIC, page_size=16),
                 BenchCase("decode", "generic:per_kv_head", GENERIC + (("gqa", "per_kv_head"),)),
                 BenchCase("decode", "generic:per_kv_head:cache16", GENERIC + (("gqa", "per_kv_head"),), page_size=16),
                 BenchCase("decode", "generic:per_kv_head:cache32", GENERIC + (("gqa", "per_kv_head"),), page_size=32),
                 BenchCase("decode", "generic:per_kv_head:pages32", GENERIC + (("gqa", "per_kv_head"),), page_size=32,
                           dims_copy=False),
                 BenchCase("decode", "generic:per_kv_head:pages32:cand2", GENERIC + (("gqa", "per_kv_head"),
                                                                                  ("candidates", 2.0)),
                           page_size=32, dims_copy=False),
                 BenchCase("decode", "generic:per_kv_head:pages32:cand3", GENERIC + (("gqa", "per_kv_head"),
                                                                                  ("candidates", 3.0)),
                           page_size=32, dims_copy=False)),
    knobs=(Knob(("chunks",), "chunks", "decode"),),
)
