"""The method protocol: what an attention method declares so that the backend can run it.

A method is four files and nothing else:

    sparse_compile/methods/<m>.py     parameters, selection, `attention`, and `METHOD = Method(...)`
    kernels/<m>.py                    its Triton kernels + the PyTorch reference they equal
    sparse_compile/policies/<m>.toml  a shipped policy that runs it (loadable by name; `<m>-lossy.toml` when its
                                      generic rule is measured to fail the quality budget)
    tests/test_<m>.py                 its tests

`sparse_compile.methods.registry()` finds every module of `sparse_compile/methods/` that defines
`METHOD`; no list of methods is kept anywhere else. What every method shares lives in one place:

    parameter validation   `Params` (a frozen dataclass of `param(...)` fields), validated once
                           when the policy loads (sparse_compile.params); never per call
    dense fallback         `fallback_reason` (sparse_compile.ops): unproven mask, min_seq_len,
                           or the method's own `unsupported(...)`; the reason goes to the Report
    device dispatch        inside the method's `attention`: CUDA tensors run its kernels, CPU
                           tensors the reference of the same algorithm (the op never branches)
    allowed blocks/density `sparse_compile.kernels.block_mask.allowed_blocks` / `block_density`

`attention(q, k, v, mask, site, params, scale) -> (out, density)`:
    q: (B, H, Lq, D); k, v: (B, Hkv, Lk, D) post-RoPE, un-expanded (H % Hkv == 0);
    mask: AttentionMask (structure, never an L x L tensor); site: SiteFacts; params: Params;
    scale: softmax scale. Returns out (B, H, Lq, D) in q's dtype and density (B, H) float32:
    the fraction of the allowed key blocks (or tokens) that were computed, 1.0 for exact attention.
    It is only called when `unsupported(...)` returned None and the mask is proven.

Methods whose layers share one selection (`selection_role` set, e.g. LessIsMore) pass it between layers
as a tensor edge of the FX graph, never as hidden state. The pass asks `selection_role(layer, num_layers,
params)` for each site's role:
    "exact"   the layer runs exact attention and neither makes nor takes a selection;
    "select"  the layer makes a selection, (B, selection_size(params)) int32 token indices padded with -1;
    "reuse"   the layer takes the selection of the latest "select" layer before it in the same graph
              (none there: it runs exact attention and the Report says why).
and such a method's attention takes two more arguments and returns the selection it made:
    `attention(q, k, v, mask, site, params, scale, role, selection) -> (out, density, selection_out)`
with selection_out (B, selection_size(params)) int32 for role "select", (B, 0) otherwise.

Methods that read a SparseCache's selection buffers (sparse_compile/cache.py) list them in `cache_buffers`
(names among "key_dims", "dims", "member", "page_min", "page_max"). When the site's keys come from a
SparseCache layer that keeps them, the pass hands them to the node, and the method's attention gets one more
keyword argument, `cache=` (ops.CacheBuffers: the buffers and the page size); with any other cache it is not
passed and the method runs as it always did.

Methods whose decode selection reads a per-key state of the mask (visible, forced sink/recent keys:
kernels/key_state.py) declare `key_state_forced(params) -> (sink, recent)`. The state is the same for every
layer of one decode step that shares the mask and those counts, so the pass computes it once per step (one
`sparse_compile::key_state` node) and hands it to each such node; the method's attention then gets
`key_state=` (KeyState) and does not recompute it. Without it (tools, a site the pass could not share it
for) the method computes its own.

What the tools need (the `bench`, `eval` and `calibrate` harnesses read these; the core never does):
    bench_cases   the configurations `bench` times: phase, Params overrides, role (BenchCase)
    knobs         what `calibrate` tunes and how: the Params fields, the procedure, the phase (Knob)
    phases        also drive `eval`: prefill methods are judged by window perplexity, decode methods
                  by decode steps (top-1 agreement with the exact model, continuation perplexity)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

PHASES = ("prefill", "decode")
GQA_MODES = ("per_head", "per_kv_head")  # one selection per query head, or one per KV head (its group united)
ROLES = ("select", "reuse")
CACHE_BUFFERS = ("key_dims", "dims", "member", "page_min", "page_max")
PROCEDURES = ("quality", "chunks", "selection_layers", "drift_layers")


@dataclass(frozen=True)
class BenchCase:
    """One configuration `python -m sparse_compile bench` times for a method (on structured q/k/v).

    phase: "prefill" (q_len == kv_len, causal) or "decode" (one query over the cache).
    label: the row's name after the method's ("fasa:b2048"); "" for the method's defaults ("fasa").
    params: Params overrides as (field, value) pairs (validated by the Params class when the case runs).
    role: selection-sharing methods only: "select" times a selecting layer, "reuse" a reusing layer on
        the selection the select case made.
    page_size: > 0: the keys sit in a SparseCache layer with pages of this size (and the method's dims copy),
        and the method gets its buffers (`cache=`): the two-stage selection; 0: plain K/V.
    dims_copy: with page_size, whether the layer keeps the method's dims copy (False: pages only, the node
        scores the candidates from K's rows, as `SparseCache(dims_copy=False)`).
    """

    phase: str
    label: str = ""
    params: tuple[tuple[str, Any], ...] = ()
    role: str | None = None
    page_size: int = 0
    dims_copy: bool = True


@dataclass(frozen=True)
class Knob:
    """What `python -m sparse_compile calibrate <method>` tunes, and by which procedure.

    fields: the Params fields the written policy sets.
    procedure: "quality": per-layer values under a perplexity budget (`--max-dppl`; the fields are marked
        `param(..., quality=...)`); "chunks": per-head RoPE-frequency chunks from decode attention on real
        text; "selection_layers": the layers whose decode attention best covers the others'; "drift_layers":
        the layers whose hidden states drift least (where dropped tokens cost least).
    phase: the phase whose attention the procedure measures.
    """

    fields: tuple[str, ...]
    procedure: str
    phase: str


@dataclass(frozen=True)
class CallShape:
    """What a method may look at to decide whether it can run one call (host-side facts only)."""

    batch: int
    num_heads: int
    num_kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    dtype: torch.dtype
    device_type: str
    window: int = 0
    causal: bool = True


@dataclass(frozen=True)
class CacheBuffers:
    """A SparseCache layer's selection buffers as one node receives them (DECODE_NOTES.md, "Wiring").

    key_dims: (B, Hkv, Lk, n) K's dominant dims per KV head, or None (not kept: the method reads K);
    dims: (Hkv, n) int64 their head dims; member: (H, n) float32, 1 where column j is query head h's own dim
    (without key_dims: (Hkv, D) = 0..D-1 and (H, D), the layer's tables for reading K, or both None);
    page_min, page_max: (B, Hkv, NP, D) per-page element-wise key min / max (NP = ceil(Lk / P));
    page_size: P."""

    key_dims: Tensor | None
    dims: Tensor | None
    member: Tensor | None
    page_min: Tensor
    page_max: Tensor
    page_size: int


@dataclass(frozen=True)
class KeyState:
    """The per-key state of one decode step's mask, computed once and shared by the layers that read it.

    state: (B, Lk) int8, 0 invisible, 1 visible, 2 visible and forced (one of the first `sink` or the last
    `recent` visible keys of its row; kernels/key_state.py); n_visible: (B,) int32 visible keys per row."""

    state: Tensor
    n_visible: Tensor


@dataclass(frozen=True)
class Method:
    """One attention method a fused node can run (see the module docstring).

    name: the policy's `method = "<name>"`.
    phases: the phases it runs in, a subset of ("prefill", "decode").
    Params: its frozen parameter dataclass (fields made with `sparse_compile.params.param`).
    attention: (q, k, v, mask, site, params, scale) -> (out, density): density (B, H) float32, or
        (B, H, 1 + len(density_parts)) with the total first and then the named factors.
    unsupported: (q_len, kv_len, head_dim, dtype, site, params) -> a reason string when the method
        cannot run this call (the node then runs exact attention and the Report shows the reason), or
        None. Shapes only: it runs on the host, at compile time on fake shapes and at run time.
    select: optional (q, k, v, mask, site, params, scale) -> the method's selection alone (benchmarks,
        tests): a BlockList, or an object with kv_num_blocks / kv_indices / block_size and, for methods
        that permute keys, k_perm / v_perm / kv_order (the engine's inputs).
    capturable_phases: the phases whose CUDA path has no host synchronisation and no allocation whose
        size depends on data, so CUDA graphs (mode="reduce-overhead") may capture the node; in the
        other phases the node carries torch's `cudagraph_unsafe` tag and runs outside captured graphs
        (the Report says so).
    summary: one line for `--help` and the README's method table.
    selection_role, selection_size: for methods whose layers share one selection (module docstring).
    notes: optional (site, params) -> a line the user should read about this site although the method
        runs there (e.g. a calibrated table that does not fit this model, replaced by a rule), or None;
        the pass puts it in the Report at compile time.
    density_parts: names of the factors whose product is the density, when the method reports them
        (token_sparse: ("kept", "inner")); the node then returns (B, H, 1 + len(density_parts)) and the
        Report shows each factor per layer.
    cache_buffers: the SparseCache buffers its attention reads through `cache=` (module docstring); () for none.
    key_state_forced: (params) -> (sink, recent): the forced counts of the per-key state its decode selection
        reads through `key_state=` (module docstring), or None for a method that reads none.
    bench_cases, knobs: what the tools read (module docstring): every method declares at least one bench
        case per phase it runs in; knobs may be empty (nothing to calibrate, e.g. dense).
    """

    name: str
    phases: tuple[str, ...]
    Params: type
    attention: Callable[..., Any]
    unsupported: Callable[..., str | None] | None = None
    select: Callable[..., Any] | None = None
    capturable_phases: tuple[str, ...] = PHASES
    summary: str = ""
    selection_role: Callable[[int, int, Any], str] | None = None
    selection_size: Callable[[Any], int] | None = None
    notes: Callable[[Any, Any], str | None] | None = None
    density_parts: tuple[str, ...] = ()
    cache_buffers: tuple[str, ...] = ()
    key_state_forced: Callable[[Any], tuple[int, int]] | None = None
    bench_cases: tuple[BenchCase, ...] = ()
    knobs: tuple[Knob, ...] = ()

    def __post_init__(self) -> None:
        if not set(self.cache_buffers) <= set(CACHE_BUFFERS):
            raise ValueError(f"method {self.name!r}: cache_buffers {self.cache_buffers!r} must be among "
                             f"{CACHE_BUFFERS}")
        if not self.phases or any(p not in PHASES for p in self.phases):
            raise ValueError(f"method {self.name!r}: phases {self.phases!r} must be a non-empty subset of {PHASES}")
        if (self.selection_role is None) != (self.selection_size is None):
            raise ValueError(f"method {self.name!r}: give both selection_role and selection_size, or neither")
        if self.selection_role is not None and not set(self.phases) <= set(self.capturable_phases):
            raise ValueError(f"method {self.name!r}: a selection-sharing method must be capturable in its phases")
        for case in self.bench_cases:
            if case.phase not in self.phases:
                raise ValueError(f"method {self.name!r}: bench case {case.label!r} is in phase {case.phase!r}, "
                                 f"not one of its phases {self.phases}")
            if (case.role is not None) != (self.selection_role is not None) or case.role not in (None, *ROLES):
                raise ValueError(f"method {self.name!r}: bench case {case.label!r} has role {case.role!r}: give one "
                                 f"of {ROLES} exactly when the method shares a selection")
        for knob in self.knobs:
            if knob.procedure not in PROCEDURES or knob.phase not in self.phases or not knob.fields:
                raise ValueError(f"method {self.name!r}: knob {knob} needs fields, a procedure in {PROCEDURES} and "
                                 f"one of its phases {self.phases}")
