"""Assemble attention sites: RoPE(q), RoPE(k) -> [KV-cache update] -> [GQA expansion] -> SDPA.

A static-cache site whose new keys also feed one `sparse_compile.cache_update` node (a SparseCache layer's
write of its dims copy and page summaries, sparse_compile/cache.py) records that node (`SiteMatch.
cache_update`): its arguments are the layer's buffers, which the rewrite hands to a method that reads them.

`find_sites(gm)` only reads the graph. Every SDPA call becomes either a `SiteMatch` (proven)
or a `Candidate` rejection with the reason. The rewrite (passes/rewrite.py) acts on matches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.fx as fx

from sparse_compile.passes.graph import GraphView, op_name, sdpa_args, shape_of, skip_transparent
from sparse_compile.passes.masks import MaskMatch, analyze_mask
from sparse_compile.passes.rope import RopeMatch, match_rope


@dataclass
class SiteMatch:
    """A proven attention site. k/v are the tensors *before* GQA expansion (after the cache)."""

    sdpa: fx.Node
    layer: int
    q: fx.Node
    k: fx.Node
    v: fx.Node
    rope: RopeMatch
    mask: MaskMatch
    scale: float
    phase: str
    cache: str
    gqa: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    q_len: object
    kv_len: object
    expansion_nodes: tuple[fx.Node, ...] = ()
    cache_update: fx.Node | None = None

    def cache_arguments(self) -> dict[str, Any]:
        """The recorded `cache_update` node's arguments by name ({} when there is none): key_dims, page_min,
        page_max, key_valid, dims, pos, k, page_size, member (nodes, None or, for page_size, an int)."""
        return {} if self.cache_update is None else op_arguments(self.cache_update)


def op_arguments(node: fx.Node) -> dict[str, Any]:
    """A custom-op call's arguments by the op's schema names, defaults filled in (positional and keyword
    calls read alike)."""
    op = node.target
    schema = (op if isinstance(op, torch._ops.OpOverload) else op.default)._schema  # a packet calls its default
    names = [a.name for a in schema.arguments]
    bound = {a.name: a.default_value for a in schema.arguments if a.has_default_value()}
    return bound | dict(zip(names, node.args, strict=False)) | dict(node.kwargs)


@dataclass
class Candidate:
    """An SDPA call left untouched."""

    sdpa: fx.Node
    layer: int
    reason: str


def strip_gqa(node: fx.Node) -> tuple[fx.Node, str, tuple[fx.Node, ...]]:
    """repeat_kv (x[:, :, None].expand(B, Hkv, g, L, D).reshape(B, H, L, D)) or
    repeat_interleave(x, g, dim=1) -> (x, kind, expansion nodes); else (node, 'none', ())."""
    if op_name(node) == "reshape":
        expand = node.args[0]
        if op_name(expand) == "expand" and op_name(expand.args[0]) == "getitem":
            getitem = expand.args[0]
            index = getitem.args[1]
            if (
                isinstance(index, tuple)
                and len(index) == 5
                and index[2] is None
                and all(isinstance(i, slice) and i == slice(None) for i in index[:2] + index[3:])
            ):
                base = getitem.args[0]
                bs, ns = shape_of(base), shape_of(node)
                if bs is not None and ns is not None and len(bs) == 4 and len(ns) == 4 and bs[3] == ns[3]:
                    return base, "repeat_kv", (node, expand, getitem)
    if op_name(node) == "repeat_interleave":
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
        if dim == 1:
            return node.args[0], "repeat_kv", (node,)
    return node, "none", ()


def prefix_slice_base(node: fx.Node) -> fx.Node | None:
    """buf[:, :, :n] (or buf[:, :, :n, :]) -> buf: StaticCache prefill reads a prefix of its buffer."""
    if op_name(node) != "getitem" or not isinstance(node.args[1], tuple):
        return None
    index = node.args[1]
    full = slice(None)
    if len(index) not in (3, 4) or index[:2] != (full, full) or (len(index) == 4 and index[3] != full):
        return None
    cut = index[2]
    if not isinstance(cut, slice) or cut.start not in (None, 0) or cut.step not in (None, 1):
        return None
    return node.args[0]


def is_last_position_index(index: Any) -> bool:
    """(:, :, -1) or (:, :, torch.tensor([-1])): the last slot along the sequence dim."""
    if not isinstance(index, tuple) or len(index) != 3 or index[0] != slice(None) or index[1] != slice(None):
        return False
    slot = index[2]
    if slot == -1 and isinstance(slot, int):
        return True
    return op_name(slot) == "tensor" and slot.args[:1] in (([-1],), ((-1,),))


def rolling_write(buffer: fx.Node, sdpa: fx.Node, view: GraphView) -> fx.Node | None:
    """The new key written into a sliding-window StaticCache buffer, or None. transformers emits

        new = buf.roll(-1, dims=-2); new[:, :, tensor([-1])] = k_new; buf.copy_(new)

    so the buffer holds the last W positions in order, the newest in the last slot."""
    copies = [
        u for u in buffer.users if op_name(u) == "copy_" and u.args[0] is buffer and view.before(u, sdpa)
    ]
    if not copies:
        return None
    copy = max(copies, key=lambda u: view.order[u])
    rolled = copy.args[1] if len(copy.args) > 1 else copy.kwargs.get("src")
    if op_name(rolled) != "roll" or rolled.args[0] is not buffer:
        return None
    shifts = rolled.args[1] if len(rolled.args) > 1 else rolled.kwargs.get("shifts")
    dims = rolled.args[2] if len(rolled.args) > 2 else rolled.kwargs.get("dims")
    if shifts not in (-1, (-1,), [-1]) or dims not in (-2, 2, (-2,), [-2], (2,), [2]):
        return None
    writes = [
        u for u in rolled.users
        if op_name(u) == "setitem" and u.args[0] is rolled and view.before(u, copy)
        and is_last_position_index(u.args[1])
    ]
    if len(writes) != 1 or len(rolled.users) != 2:
        return None  # something else reads or writes the rolled buffer
    return writes[0].args[2]


def strip_cache(node: fx.Node, sdpa: fx.Node, view: GraphView) -> tuple[fx.Node, str]:
    """The freshly projected+RoPE'd tensor written into the cache that `node` reads, and the cache kind:

      dynamic:        torch.cat([past, k_new], dim=-2)                      (DynamicCache)
      static:         buf.index_copy_(2, cache_position, k_new); buf or buf[:, :, :n]   (StaticCache)
      static_sliding: buf.copy_(roll(buf, -1) with k_new in the last slot)  (sliding-window StaticCache)
      none:           `node` itself (no cache, or a form not recognised: RoPE is then checked on it)
    """
    if op_name(node) == "cat":
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if isinstance(tensors, (list, tuple)) and len(tensors) == 2 and dim in (-2, 2):
            return tensors[1], "dynamic"
    buffer = prefix_slice_base(node) or node
    writes = [
        u for u in buffer.users
        if op_name(u) == "index_copy_" and u.args[0] is buffer and u.args[1] == 2 and view.before(u, sdpa)
    ]
    if writes:
        return max(writes, key=lambda u: view.order[u]).args[3], "static"
    if buffer is node:
        rolled = rolling_write(node, sdpa, view)
        if rolled is not None:
            return rolled, "static_sliding"
    return node, "none"


def cache_update_of(k_new: fx.Node, sdpa: fx.Node, view: GraphView) -> fx.Node | None:
    """The one `sparse_compile.cache_update` node before `sdpa` whose new keys (argument k) are `k_new`, or None
    (none, or several: nothing is guessed)."""
    target = getattr(torch.ops.sparse_compile, "cache_update", None)
    if target is None:  # sparse_compile.cache (which defines the op) not imported: no graph holds it
        return None
    found = []
    for user in k_new.users:
        if (user.op == "call_function" and user.target in (target, target.default) and view.before(user, sdpa)
                and op_arguments(user).get("k") is k_new):
            found.append(user)
    return found[0] if len(found) == 1 else None


def find_sites(gm: fx.GraphModule) -> tuple[list[SiteMatch], list[Candidate]]:
    view = GraphView(gm.graph)
    sites: list[SiteMatch] = []
    rejected: list[Candidate] = []
    for layer, sdpa in enumerate(view.sdpa_nodes()):
        result = match_site(sdpa, layer, view)
        (sites if isinstance(result, SiteMatch) else rejected).append(result)
    return sites, rejected


def match_site(sdpa: fx.Node, layer: int, view: GraphView) -> SiteMatch | Candidate:
    args = sdpa_args(sdpa)
    q, k_in, v_in = args["query"], args["key"], args["value"]
    if args["dropout_p"] not in (0, 0.0):
        return Candidate(sdpa, layer, f"dropout_p={args['dropout_p']} (only inference graphs are rewritten)")
    qs, ks, vs = shape_of(q), shape_of(k_in), shape_of(v_in)
    if qs is None or ks is None or vs is None or len(qs) != 4 or len(ks) != 4:
        return Candidate(sdpa, layer, "q/k/v are not 4-D tensors with recorded shapes")
    if args["enable_gqa"]:
        k, gqa_k, k_exp = k_in, "enable_gqa", ()
        v, v_exp = v_in, ()
    else:
        k, gqa_k, k_exp = strip_gqa(k_in)
        v, gqa_v, v_exp = strip_gqa(v_in)
        if gqa_k != gqa_v:
            return Candidate(sdpa, layer, "keys and values are expanded differently")
    k_new, cache = strip_cache(k, sdpa, view)
    q_rope = match_rope(q, view)
    if isinstance(q_rope, str):
        return Candidate(sdpa, layer, f"query: {q_rope}")
    k_rope = match_rope(k_new, view)
    if isinstance(k_rope, str):
        return Candidate(sdpa, layer, f"key: {k_rope}")
    if (q_rope.layout, q_rope.rotary_dim) != (k_rope.layout, k_rope.rotary_dim):
        return Candidate(sdpa, layer, "query and key use different RoPE layouts")
    B, H, Lq, D = qs
    kvs = shape_of(k)
    Hkv, Lk = kvs[1], kvs[2]
    if not isinstance(H, int) or not isinstance(Hkv, int) or not isinstance(D, int) or H % Hkv:
        reason = f"heads {H} / kv heads {Hkv} / head_dim {D} not static or not a GQA ratio"
        return Candidate(sdpa, layer, reason)
    scale = args["scale"]
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    if not isinstance(scale, (int, float)):
        return Candidate(sdpa, layer, "softmax scale is not a constant")
    if args["attn_mask"] is None:
        mask = MaskMatch(causal=bool(args["is_causal"]), q_offset_terms=(0,))
    elif args["is_causal"]:
        return Candidate(sdpa, layer, "both attn_mask and is_causal are set")
    else:
        mask = analyze_mask(args["attn_mask"], q, k)
    phase = "decode" if Lq == 1 else "prefill"
    if cache == "static_sliding" and phase == "decode" and isinstance(Lk, int):
        mask = rolling_window_mask(mask, Lk)
    return SiteMatch(
        sdpa=sdpa, layer=layer, q=q, k=k, v=v, rope=q_rope, mask=mask, scale=float(scale), phase=phase,
        cache=cache, gqa=gqa_k, num_heads=H, num_kv_heads=Hkv, head_dim=D, q_len=Lq, kv_len=Lk,
        expansion_nodes=k_exp + v_exp,
        cache_update=cache_update_of(k_new, sdpa, view) if cache == "static" else None,
    )


def rolling_window_mask(mask: MaskMatch, width: int) -> MaskMatch:
    """A decode query over a rolling buffer of `width` slots sits at the last slot and sees at most the
    buffer: causal(q_offset=width-1) + window=width is exact (it hides nothing) and records the window.
    Only applied to a structured (B,1,1,Lk) key-validity mask; a kept tensor stays as it is."""
    if mask.dense_mask is not None or mask.causal or mask.window or not mask.key_valid_from_4d:
        return mask
    return replace(mask, causal=True, window=width, q_offset_terms=(width - 1,), kv_offset_terms=())


__all__ = ["SiteMatch", "Candidate", "find_sites", "match_site", "skip_transparent"]
