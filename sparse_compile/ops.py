"""The fused attention node: one custom op, `torch.ops.sparse_compile.attention`.

Its arguments name everything that will run, so a printed graph shows it:

    attention(q, k, v, key_valid, dense_mask, scale, causal, q_offset, window, config, q_offset_tensor=None,
              key_dims=None, dims=None, member=None, page_min=None, page_max=None, page_size=0,
              key_state=None, n_visible=None)
      q: (B, H, Lq, D) post-RoPE queries (float16/bfloat16/float32; float64 on CPU)
      k, v: (B, Hkv, Lk, D) keys/values after the cache update, *before* GQA expansion
      key_valid: (B, Lk) bool or None — padding (False = never attend)
      dense_mask: a mask the pass could not prove, broadcastable to (B, H, Lq, Lk), or None
      scale: softmax scale; causal/q_offset/window: see sparse_compile.attention_mask
      config: canonical JSON {"method", "params", "min_seq_len", "site"} (see `node_config`)
      q_offset_tensor: () int64 host tensor added to q_offset, or None: a StaticCache's fill level
             (`cumulative_length`), which is data, not a SymInt; the graph copies it to the host where
             transformers' mask read it (before the cache increments it in place) and the node adds it
      key_dims, dims, member, page_min, page_max, page_size: a SparseCache layer's buffers (all None / 0
             for any other cache: the node then runs exactly as without them), the very graph inputs the
             layer's `cache_update` node wrote just before (passes/rewrite.py hands the ones the site's
             method lists in `Method.cache_buffers`; see `CacheBuffers`):
             key_dims (B, Hkv, Lk, n) K's dominant dims, dims (Hkv, n) int64, member (H, n) float32,
             page_min / page_max (B, Hkv, ceil(Lk / P), D) per-page key min / max, page_size P (int).
             A method that reads them (FASA, LessIsMore's selecting layers) runs its two-stage selection
             (methods/two_stage.py): pages ranked by their bound, then its exact scoring of the candidates.
      key_state, n_visible: (B, Lk) int8 and (B,) int32, both or neither: the decode step's per-key state
             (`key_state` below) for a method that reads one (`Method.key_state_forced`); None: it computes
             its own.
    returns (out (B, H, Lq, Dv) in q's dtype,
             density (B, H) float32: the fraction of the allowed key blocks that were computed,
                     1.0 for exact attention; (B, H, 1 + F) for a method with F `density_parts`
                     (the total first, then its factors, all 1.0 when exact attention ran),
             fallback () int32: 0 when the method ran, else the index in FALLBACKS of the reason the
                     node ran exact attention instead)

`torch.ops.sparse_compile.attention_sharing_selection` is the node of methods whose layers share one
selection (`Method.selection_role`, e.g. LessIsMore): two more arguments, `selection` (B, N) int32 or None
(the selection of an earlier layer, a graph edge) and `role` ("exact" | "select" | "reuse"), and a fourth
output, the selection this node made ((B, N) int32 padded with -1 for role "select"; (B, 0) otherwise).
When a call falls back, a "select" node returns an all -1 selection and its "reuse" layers fall back too
(they see the same lengths, mask and shapes).

`torch.ops.sparse_compile.key_state(key_valid, causal, q_offset, window, sink, recent, q_offset_tensor=None)`
-> (state (B, Lk) int8, n_visible (B,) int32) is the per-key state of a decode step's mask
(kernels/key_state.py): the pass inserts one per step and mask and hands it to every node that reads it,
so the layers of one step share two launches instead of each making them.

`torch.ops.sparse_compile.attention_outside_graphs` is the same node for methods whose CUDA path
cannot be captured in a CUDA graph (`Method.capturable_phases` without the node's phase): it carries the
`cudagraph_unsafe` tag, so mode="reduce-overhead" runs it between captured partitions.

This module is the one place that decides the dense fallback (`fallback_reason`): an unproven
mask, a key length under the policy's min_seq_len, or a call the method declares unsupported.
The method itself never re-checks; the device dispatch is inside each method's `attention`.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from sparse_compile.attention_mask import AttentionMask, SiteFacts
from sparse_compile.kernels.key_state import key_state_from_mask
from sparse_compile.method import CacheBuffers, CallShape, KeyState, Method
from sparse_compile.methods import METHODS
from sparse_compile.params import canonical_json, params_from_mapping, params_to_dict

# Why a node ran exact attention instead of its method; the op's `fallback` output indexes this.
FALLBACKS = (
    "",
    "mask not recognised: exact attention with the mask tensor",
    "key length below the policy's min_seq_len",
    "call not supported by the method",
)
RAN, UNPROVEN_MASK, BELOW_MIN_SEQ_LEN, UNSUPPORTED = range(len(FALLBACKS))


@dataclass(frozen=True)
class NodeConfig:
    """The parsed `config` argument of one node."""

    method: Method
    params: Any
    min_seq_len: int
    site: SiteFacts


def node_config(method: str, params: Any, min_seq_len: int, site: SiteFacts) -> str:
    """The op's `config` argument for one site."""
    return canonical_json(
        {"method": method, "params": params_to_dict(params), "min_seq_len": min_seq_len, "site": asdict(site)}
    )


@functools.lru_cache(maxsize=1024)
def parse_config(config: str) -> NodeConfig:
    """The node's method, validated params, min_seq_len and site facts (memoised: a pure function of the
    string, so params are validated once per distinct node, never per call)."""
    data = json.loads(config)
    method = METHODS[data["method"]]
    params = params_from_mapping(method.Params, data["params"], f"op config of method {data['method']!r}")
    return NodeConfig(method, params, int(data["min_seq_len"]), SiteFacts(**data["site"]))


def fallback_reason(node: NodeConfig, call: CallShape, has_dense_mask: bool) -> tuple[int, str]:
    """(code, message) of why this call runs exact attention instead of the node's method; (RAN, "")
    when the method runs. Host-only and shape-only: the pass calls it at compile time (on the traced
    shapes, where they are static) and the op at every call."""
    if node.method.name == "dense":
        return RAN, ""
    if has_dense_mask:
        return UNPROVEN_MASK, FALLBACKS[UNPROVEN_MASK]
    if call.kv_len < node.min_seq_len:
        return BELOW_MIN_SEQ_LEN, f"key length {call.kv_len} < min_seq_len {node.min_seq_len}"
    if node.method.unsupported is not None:
        problem = node.method.unsupported(call, node.site, node.params)
        if problem:
            return UNSUPPORTED, f"{node.method.name} does not run this call: {problem}"
    return RAN, ""


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None,
                 scale: float, q_offset: int, window: int) -> None:
    """Raise ValueError naming the argument when the node's inputs do not fit together."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D (B, H, L, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"batch/heads/length mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q head_dim {q.shape[-1]} != k head_dim {k.shape[-1]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"num_heads {q.shape[1]} is not a multiple of num_kv_heads {k.shape[1]}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if key_valid is not None and tuple(key_valid.shape) != (k.shape[0], k.shape[2]):
        raise ValueError(f"key_valid must be (B, Lk) = {(k.shape[0], k.shape[2])}, got {tuple(key_valid.shape)}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite float > 0, got {scale!r}")
    if window < 0:
        raise ValueError(f"window must be >= 0 (0: no window), got {window}")


def call_shape(q: torch.Tensor, k: torch.Tensor, window: int = 0, causal: bool = True) -> CallShape:
    B, H, Lq, D = q.shape
    return CallShape(B, H, k.shape[1], Lq, k.shape[2], D, q.dtype, q.device.type, window, causal)


def cache_buffers(q: torch.Tensor, k: torch.Tensor, key_dims: torch.Tensor | None, dims: torch.Tensor | None,
                  member: torch.Tensor | None, page_min: torch.Tensor | None, page_max: torch.Tensor | None,
                  page_size: int) -> CacheBuffers | None:
    """The node's SparseCache arguments checked and bound (None when the node has none); ValueError names a
    bad one. q: (B, H, 1, D); k: (B, Hkv, Lk, D)."""
    given = [t is not None for t in (key_dims, dims, member)]
    if page_min is None and page_max is None and not any(given) and not page_size:
        return None
    B, H, _, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if page_min is None or page_max is None or page_size < 1:
        raise ValueError(f"page_min, page_max and page_size >= 1 come together, got page_size {page_size} and "
                         f"{'no ' if page_min is None else ''}page_min, {'no ' if page_max is None else ''}page_max")
    n_pages = -(-Lk // page_size)
    for name, t in (("page_min", page_min), ("page_max", page_max)):
        if tuple(t.shape) != (B, Hkv, n_pages, D):
            raise ValueError(f"{name} must be (B, Hkv, ceil(Lk / P), D) = {(B, Hkv, n_pages, D)}, got {tuple(t.shape)}")
    if key_dims is None and dims is not None and member is not None:  # no dims copy: the keys are K itself
        if tuple(dims.shape) != (Hkv, D) or tuple(member.shape) != (H, D):
            raise ValueError(f"without key_dims, dims must be (Hkv, D) = {(Hkv, D)} and member (H, D) = {(H, D)}, "
                             f"got {tuple(dims.shape)} and {tuple(member.shape)}")
        return CacheBuffers(None, dims, member, page_min, page_max, page_size)
    if any(given) and not all(given):
        raise ValueError("key_dims, dims and member come together, or dims and member alone (or none of them)")
    if key_dims is not None:
        n = dims.shape[-1]
        if (tuple(key_dims.shape) != (B, Hkv, Lk, n) or tuple(dims.shape) != (Hkv, n)
                or tuple(member.shape) != (H, n)):
            raise ValueError(f"key_dims (B, Hkv, Lk, n), dims (Hkv, n), member (H, n) with B, H, Hkv, Lk = "
                             f"{B}, {H}, {Hkv}, {Lk}: got {tuple(key_dims.shape)}, {tuple(dims.shape)}, "
                             f"{tuple(member.shape)}")
    return CacheBuffers(key_dims, dims, member, page_min, page_max, page_size)


@dataclass(frozen=True)
class NodeCall:
    """One call of a fused node with its arguments bound: what runs it (the op, calibration, tools).

    q: (B, H, Lq, D); k, v: (B, Hkv, Lk, D); mask: the call's AttentionMask (structure, or the unproven
    tensor); node: the parsed config; selection/role: the sharing node's extra arguments (None / "" for
    the plain node)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: AttentionMask
    scale: float
    node: NodeConfig
    selection: torch.Tensor | None = None
    role: str = ""
    cache: CacheBuffers | None = None
    key_state: KeyState | None = None

    def method_kwargs(self, method: Method) -> dict[str, Any]:
        """The keyword arguments `method`'s attention takes from this call: {"cache": the buffers} for a method
        that reads them (`Method.cache_buffers`), {"key_state": the shared state} for one that reads it
        (`Method.key_state_forced`)."""
        extra: dict[str, Any] = {}
        if self.cache is not None and method.cache_buffers:
            extra["cache"] = self.cache
        if self.key_state is not None and method.key_state_forced is not None:
            extra["key_state"] = self.key_state
        return extra

    @property
    def shape(self) -> CallShape:
        return call_shape(self.q, self.k, self.mask.window, self.mask.causal)

    def plan(self, method: Method | None = None, params: Any = None) -> NodePlan:
        """What runs this call: the node's method (or `method`/`params` put in its place, as calibration
        does), or exact attention with the reason (`fallback_reason`)."""
        method = self.node.method if method is None else method
        params = self.node.params if params is None else params
        candidate = NodeConfig(method, params, self.node.min_seq_len, self.node.site)
        code, reason = fallback_reason(candidate, self.shape, self.mask.dense_mask is not None)
        if code != RAN:
            return NodePlan(METHODS["dense"], METHODS["dense"].Params(), code, reason)
        return NodePlan(method, params, RAN, "")

    def run(self, plan: NodePlan | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(out (B, H, Lq, Dv), density (B, H) or (B, H, 1 + F)) of a plain (non-sharing) method's plan."""
        plan = self.plan() if plan is None else plan
        return plan.method.attention(self.q, self.k, self.v, self.mask, self.node.site, plan.params, self.scale,
                                     **self.method_kwargs(plan.method))


@dataclass(frozen=True)
class NodePlan:
    """The method that runs one call and its params; `code`/`reason` say why exact attention runs instead."""

    method: Method
    params: Any
    code: int = RAN
    reason: str = ""

    @property
    def ran(self) -> bool:
        return self.code == RAN


def with_host_offset(q_offset: int, q_offset_tensor: torch.Tensor | None) -> int:
    """q_offset plus the node's host offset tensor (a StaticCache's fill level, `q_offset_tensor`), checked."""
    if q_offset_tensor is None:
        return q_offset
    if q_offset_tensor.dim() != 0 or q_offset_tensor.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"q_offset_tensor must be a 0-d int64/int32 tensor, got "
                         f"{tuple(q_offset_tensor.shape)} {q_offset_tensor.dtype}")
    return q_offset + int(q_offset_tensor)


def bind_node(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None,
              dense_mask: torch.Tensor | None, scale: float, causal: bool, q_offset: int, window: int,
              config: str, selection: torch.Tensor | None = None, role: str = "",
              q_offset_tensor: torch.Tensor | None = None, key_dims: torch.Tensor | None = None,
              dims: torch.Tensor | None = None, member: torch.Tensor | None = None,
              page_min: torch.Tensor | None = None, page_max: torch.Tensor | None = None,
              page_size: int = 0, key_state: torch.Tensor | None = None,
              n_visible: torch.Tensor | None = None) -> NodeCall:
    """The node's arguments (either op's signature) checked and bound; ValueError names a bad one."""
    q_offset = with_host_offset(q_offset, q_offset_tensor)
    check_inputs(q, k, v, key_valid, scale, q_offset, window)
    mask = AttentionMask(
        causal=causal, q_offset=q_offset, window=window,
        key_valid=None if key_valid is None else key_valid.to(torch.bool), dense_mask=dense_mask,
    )
    cache = cache_buffers(q, k, key_dims, dims, member, page_min, page_max, page_size)
    return NodeCall(q, k, v, mask, scale, parse_config(config), selection, role, cache,
                    bind_key_state(q, k, key_state, n_visible))


def bind_key_state(q: torch.Tensor, k: torch.Tensor, state: torch.Tensor | None,
                   n_visible: torch.Tensor | None) -> KeyState | None:
    """The node's shared key state checked and bound (None without one); ValueError names a bad one.
    q: (B, H, Lq, D); k: (B, Hkv, Lk, D)."""
    if state is None and n_visible is None:
        return None
    if state is None or n_visible is None:
        raise ValueError("key_state and n_visible come together: give both or neither")
    B, Lk = k.shape[0], k.shape[2]
    if tuple(state.shape) != (B, Lk) or state.dtype != torch.int8:
        raise ValueError(f"key_state must be (B, Lk) = {(B, Lk)} int8, got {tuple(state.shape)} {state.dtype}")
    if tuple(n_visible.shape) != (B,) or n_visible.dtype != torch.int32:
        raise ValueError(f"n_visible must be (B,) = ({B},) int32, got {tuple(n_visible.shape)} {n_visible.dtype}")
    if state.device != q.device or n_visible.device != q.device:
        raise ValueError(f"key_state ({state.device}) and n_visible ({n_visible.device}) must be on q's device "
                         f"{q.device}")
    return KeyState(state, n_visible)


def node_call_of(func: Any, args: tuple, kwargs: dict | None = None) -> NodeCall | None:
    """The bound call when `func` (as a TorchDispatchMode sees it) is one of this module's fused ops, else
    None: how tools that watch a compiled graph find the nodes, by op identity, not by argument count."""
    packet = getattr(func, "overloadpacket", None)
    if packet not in (torch.ops.sparse_compile.attention, torch.ops.sparse_compile.attention_outside_graphs,
                      torch.ops.sparse_compile.attention_sharing_selection):
        return None
    bound = func._schema  # the op's own argument names: positional and keyword calls bind alike
    values = dict(zip((a.name for a in bound.arguments), args, strict=False)) | dict(kwargs or {})
    return bind_node(**values)


def run_node(q, k, v, key_valid, dense_mask, scale, causal, q_offset, window, config, q_offset_tensor=None,
             key_dims=None, dims=None, member=None, page_min=None, page_max=None, page_size=0, key_state=None,
             n_visible=None):
    """The node's computation: fallback decision, then the method (or exact attention)."""
    call = bind_node(q, k, v, key_valid, dense_mask, scale, causal, q_offset, window, config,
                     q_offset_tensor=q_offset_tensor, key_dims=key_dims, dims=dims, member=member,
                     page_min=page_min, page_max=page_max, page_size=page_size, key_state=key_state,
                     n_visible=n_visible)
    plan = call.plan()
    out, density = call.run(plan)
    return out.contiguous(), with_factors(density, call.node.method), torch.full((), plan.code, dtype=torch.int32,
                                                                                 device=q.device)


def with_factors(density: torch.Tensor, method) -> torch.Tensor:
    """The node's density output: (B, H), or (B, H, 1 + F) for a method with F `density_parts` (a (B, H)
    density from exact attention, which ran instead, gets every factor 1), as the fake impls declare."""
    parts = len(method.density_parts)
    if parts and density.dim() == 2:
        density = density[..., None].expand(*density.shape, 1 + parts)
    return density.contiguous()


def fake_node(q, k, v, key_valid, dense_mask, scale, causal, q_offset, window, config, q_offset_tensor=None,
              key_dims=None, dims=None, member=None, page_min=None, page_max=None, page_size=0, key_state=None,
              n_visible=None):
    B, H, Lq, _ = q.shape
    parts = len(parse_config(config).method.density_parts)
    density = q.new_empty((B, H, 1 + parts) if parts else (B, H), dtype=torch.float32)
    return q.new_empty((B, H, Lq, v.shape[-1])), density, q.new_empty((), dtype=torch.int32)



@torch.library.custom_op("sparse_compile::attention", mutates_args=())
def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None,
    dense_mask: torch.Tensor | None, scale: float, causal: bool, q_offset: int, window: int, config: str,
    q_offset_tensor: torch.Tensor | None = None, key_dims: torch.Tensor | None = None,
    dims: torch.Tensor | None = None, member: torch.Tensor | None = None, page_min: torch.Tensor | None = None,
    page_max: torch.Tensor | None = None, page_size: int = 0, key_state: torch.Tensor | None = None,
    n_visible: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return run_node(q, k, v, key_valid, dense_mask, scale, causal, q_offset, window, config, q_offset_tensor,
                    key_dims, dims, member, page_min, page_max, page_size, key_state, n_visible)


@torch.library.custom_op("sparse_compile::attention_outside_graphs", mutates_args=(),
                         tags=(torch.Tag.cudagraph_unsafe,))
def attention_outside_graphs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None,
    dense_mask: torch.Tensor | None, scale: float, causal: bool, q_offset: int, window: int, config: str,
    q_offset_tensor: torch.Tensor | None = None, key_dims: torch.Tensor | None = None,
    dims: torch.Tensor | None = None, member: torch.Tensor | None = None, page_min: torch.Tensor | None = None,
    page_max: torch.Tensor | None = None, page_size: int = 0, key_state: torch.Tensor | None = None,
    n_visible: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return run_node(q, k, v, key_valid, dense_mask, scale, causal, q_offset, window, config, q_offset_tensor,
                    key_dims, dims, member, page_min, page_max, page_size, key_state, n_visible)


attention.register_fake(fake_node)
attention_outside_graphs.register_fake(fake_node)

ROLES = ("exact", "select", "reuse")


def run_node_sharing(q, k, v, key_valid, dense_mask, scale, causal, q_offset, window, config, selection, role,
                     q_offset_tensor=None, key_dims=None, dims=None, member=None, page_min=None, page_max=None,
                     page_size=0, key_state=None, n_visible=None):
    """The node of a selection-sharing method: fallback decision, then the method's role."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    call = bind_node(q, k, v, key_valid, dense_mask, scale, causal, q_offset, window, config, selection, role,
                     q_offset_tensor, key_dims, dims, member, page_min, page_max, page_size, key_state, n_visible)
    node = call.node
    if node.method.selection_size is None:
        raise ValueError(f"method {node.method.name!r} does not share selections")
    width = node.method.selection_size(node.params) if role == "select" else 0
    if role == "reuse" and (selection is None or selection.dim() != 2 or selection.shape[0] != q.shape[0]):
        raise ValueError(f"a 'reuse' node needs a (B, N) selection, got "
                         f"{None if selection is None else tuple(selection.shape)}")
    plan = call.plan()
    if not plan.ran or role == "exact":
        out, density = call.run(NodePlan(METHODS["dense"], METHODS["dense"].Params(), plan.code, plan.reason))
        made = torch.full((q.shape[0], width), -1, dtype=torch.int32, device=q.device)
    else:
        out, density, made = node.method.attention(q, k, v, call.mask, node.site, node.params, scale, role, selection,
                                                   **call.method_kwargs(node.method))
    return (out.contiguous(), with_factors(density, node.method), torch.full((), plan.code, dtype=torch.int32,
                                                                             device=q.device), made)


def fake_node_sharing(q, k, v, key_valid, dense_mask, scale, causal, q_offset, window, config, selection, role,
                      q_offset_tensor=None, key_dims=None, dims=None, member=None, page_min=None, page_max=None,
                      page_size=0, key_state=None, n_visible=None):
    node = parse_config(config)
    width = node.method.selection_size(node.params) if role == "select" else 0
    return fake_node(q, k, v, key_valid, dense_mask, scale, causal, q_offset, window, config) + (
        q.new_empty((q.shape[0], width), dtype=torch.int32),)


@torch.library.custom_op("sparse_compile::attention_sharing_selection", mutates_args=())
def attention_sharing_selection(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None,
    dense_mask: torch.Tensor | None, scale: float, causal: bool, q_offset: int, window: int, config: str,
    selection: torch.Tensor | None, role: str,
    q_offset_tensor: torch.Tensor | None = None, key_dims: torch.Tensor | None = None,
    dims: torch.Tensor | None = None, member: torch.Tensor | None = None, page_min: torch.Tensor | None = None,
    page_max: torch.Tensor | None = None, page_size: int = 0, key_state: torch.Tensor | None = None,
    n_visible: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return run_node_sharing(q, k, v, key_valid, dense_mask, scale, causal, q_offset, window, config, selection, role,
                            q_offset_tensor, key_dims, dims, member, page_min, page_max, page_size, key_state,
                            n_visible)


attention_sharing_selection.register_fake(fake_node_sharing)


def run_key_state(key_valid: torch.Tensor, causal: bool, q_offset: int, window: int, sink: int, recent: int,
                  q_offset_tensor: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(state (B, Lk) int8, n_visible (B,) int32) of one decode query whose keys' padding is key_valid (B, Lk)
    bool (kernels/key_state.py; Triton on CUDA). q_offset_tensor: as the attention node's."""
    if key_valid.dim() != 2:
        raise ValueError(f"key_valid must be (B, Lk), got {tuple(key_valid.shape)}")
    q_offset = with_host_offset(q_offset, q_offset_tensor)
    B, Lk = key_valid.shape
    return key_state_from_mask(B, Lk, q_pos=q_offset, causal=causal, window=window, key_valid=key_valid.to(torch.bool),
                               sink=sink, recent=recent, device=key_valid.device)


@torch.library.custom_op("sparse_compile::key_state", mutates_args=())
def key_state(key_valid: torch.Tensor, causal: bool, q_offset: int, window: int, sink: int, recent: int,
              q_offset_tensor: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return run_key_state(key_valid, causal, q_offset, window, sink, recent, q_offset_tensor)


@key_state.register_fake
def _fake_key_state(key_valid, causal, q_offset, window, sink, recent, q_offset_tensor=None):
    B, Lk = key_valid.shape
    return (key_valid.new_empty((B, Lk), dtype=torch.int8), key_valid.new_empty((B,), dtype=torch.int32))
