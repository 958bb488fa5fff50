"""Replace each proven attention site by one call of `torch.ops.sparse_compile.attention`.

`rewrite_attention(gm, policy, graph_index)` -> (gm, sites, rejections, layers). It edits only
what it matched: the SDPA call, the GQA expansion feeding it, and the mask subgraph once no
other node uses it. The density and fallback outputs of each node whose method is not `dense` are appended to the
graph's outputs so the backend can record them per call (compiler.py); `layers` says which layer each belongs to:
two stacked outputs (densities (n, B, H[, 1 + F]), codes (n,) int32) when the n >= 2 layers' densities have one
shape (one copy each per call under CUDA graphs, not 2n), else (density_0, fallback_0, density_1, ...).

Methods whose layers share one selection (`Method.selection_role`) get the op
`attention_sharing_selection`: the selection made by a "select" site flows as a graph edge into the
"reuse" sites after it (`wire_selections`), so nothing is carried between layers outside the graph.

A decode site whose keys come from a SparseCache layer (the site recorded its `cache_update` node) and whose
method lists `Method.cache_buffers` gets those buffers as keyword arguments of its node (`cache_kwargs`: the
very nodes the `cache_update` wrote, so the node runs after the write and reads the new summaries); the
method then runs its two-stage selection. Any other site is rewritten without them.

A decode site whose method reads a per-key state of the mask (`Method.key_state_forced`: FASA) gets it from
one `sparse_compile::key_state` node shared by every such site of the graph with the same padding mask, offsets
and forced counts (`key_state_kwargs`): the state is computed once per decode step, not once per layer.

A site whose method cannot be captured in CUDA graphs in its phase gets the tagged twin op
`attention_outside_graphs`. Fallbacks decidable from the traced shapes are recorded on the Site
at compile time by the same `fallback_reason` the op runs at every call.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from sparse_compile.attention_mask import SiteFacts
from sparse_compile.methods import METHODS
from sparse_compile.ops import RAN, CallShape, fallback_reason, node_config, parse_config
from sparse_compile.params import params_to_dict
from sparse_compile.passes.graph import meta_value, shape_of
from sparse_compile.passes.masks import MaskMatch, TensorOffset
from sparse_compile.passes.sites import SiteMatch, find_sites
from sparse_compile.policy import Policy
from sparse_compile.report import Rejection, Site

# Importing sparse_compile.ops registers the ops with torch.library.
OP = torch.ops.sparse_compile.attention.default
OP_OUTSIDE_GRAPHS = torch.ops.sparse_compile.attention_outside_graphs.default
OP_SHARING = torch.ops.sparse_compile.attention_sharing_selection.default
OP_KEY_STATE = torch.ops.sparse_compile.key_state.default


def offset_argument(graph: fx.Graph, mask: MaskMatch) -> tuple[Any, fx.Node | None]:
    """sum(q terms) - sum(kv terms) as (an int or a new SymInt node, a () host tensor node or None): the
    node's q_offset and q_offset_tensor (TensorOffset terms, a StaticCache's fill level, are data)."""
    value: Any = 0
    tensor: fx.Node | None = None
    for sign, terms in ((1, mask.q_offset_terms), (-1, mask.kv_offset_terms)):
        for term in terms:
            if isinstance(term, TensorOffset):
                host = host_copy(graph, term)
                if tensor is None:
                    tensor = host if sign > 0 else graph.call_function(operator.neg, (host,))
                else:
                    tensor = graph.call_function(operator.add if sign > 0 else operator.sub, (tensor, host))
            elif isinstance(term, int) and isinstance(value, int):
                value += sign * term
            elif term != 0:
                value = graph.call_function(operator.add if sign > 0 else operator.sub, (value, term))
    return value, tensor


def host_copy(graph: fx.Graph, term: TensorOffset) -> fx.Node:
    """`value.to("cpu", copy=True)` placed just before the mask node that reads `value`: the value the mask
    saw (a StaticCache increments its cumulative_length in place later in the graph), copied once to the
    host (one device sync per graph; the nodes then read it for free). Sites sharing the mask share it."""
    previous = term.read_at.prev
    if (previous.op == "call_method" and previous.target == "to" and previous.args == (term.value,)
            and previous.kwargs == {"device": "cpu", "copy": True}):
        return previous
    with graph.inserting_before(term.read_at):
        return graph.call_method("to", (term.value,), {"device": "cpu", "copy": True})


def reads_host_offset(mask: MaskMatch) -> bool:
    """The node takes a q_offset_tensor: its graph copies a device value to the host, which CUDA graphs
    cannot capture, so the node is the twin op that runs outside them."""
    return any(isinstance(t, TensorOffset) for t in mask.q_offset_terms + mask.kv_offset_terms)


def site_facts(site: SiteMatch) -> SiteFacts:
    return SiteFacts(
        layer=site.layer, rope=site.rope.layout, rotary_dim=site.rope.rotary_dim, head_dim=site.head_dim,
        num_heads=site.num_heads, num_kv_heads=site.num_kv_heads,
    )


def static_fallback(site: SiteMatch, config: str) -> str:
    """The fallback reason decidable at compile time (static lengths, an unproven mask), or ""."""
    q_len, kv_len = site.q_len, site.kv_len
    node = parse_config(config)
    value = meta_value(site.q)
    if not (isinstance(q_len, int) and isinstance(kv_len, int)):
        if site.mask.dense_mask is not None and node.method.name != "dense":
            return fallback_reason(node, CallShape(1, 1, 1, 1, 1, 1, value.dtype, "cpu"), True)[1]
        return ""
    call = CallShape(int(value.shape[0]) if isinstance(value.shape[0], int) else 1, site.num_heads, site.num_kv_heads,
                     q_len, kv_len, site.head_dim, value.dtype, value.device.type, int(site.mask.window),
                     bool(site.mask.causal))
    code, message = fallback_reason(node, call, site.mask.dense_mask is not None)
    return "" if code == RAN else message


def cache_kwargs(site: SiteMatch, method: str, role: str) -> dict[str, Any]:
    """The SparseCache buffers the site's node takes ({} for none): for a decode site with a recorded
    `cache_update` node whose method reads them (`Method.cache_buffers`; not LessIsMore's reusing or exact
    layers, which select nothing), page_min, page_max and page_size when the layer keeps pages whose count
    fits the key length, plus key_dims, dims and member when the method reads them and the layer keeps them,
    shaped for this site ((B, Hkv, Lk, n), (Hkv, n), (H, n)), or dims and member alone ((Hkv, D), (H, D)) for
    a layer without a dims copy."""
    wanted = METHODS[method].cache_buffers
    if not wanted or site.phase != "decode" or role in ("exact", "reuse") or "page_min" not in wanted:
        return {}
    args = site.cache_arguments()
    page_min, page_max, size = args.get("page_min"), args.get("page_max"), args.get("page_size")
    if not (isinstance(page_min, fx.Node) and isinstance(page_max, fx.Node) and isinstance(size, int) and size > 0):
        return {}
    kv_len, pages = site.kv_len, shape_of(page_min)
    if not isinstance(kv_len, int) or pages is None or len(pages) != 4 or pages[2] != -(-kv_len // size):
        return {}  # the keys are not the whole buffer the pages summarise
    out: dict[str, Any] = {"page_min": page_min, "page_max": page_max, "page_size": size}
    names = [n for n in ("key_dims", "dims", "member") if n in wanted]
    if names and all(isinstance(args.get(n), fx.Node) for n in names):
        shapes = [shape_of(args[n]) for n in ("key_dims", "dims", "member")]
        n = shapes[1][-1] if shapes[1] else None
        if shapes == [(pages[0], site.num_kv_heads, kv_len, n), (site.num_kv_heads, n), (site.num_heads, n)]:
            out |= {name: args[name] for name in names}  # else: pages only, the method reads K
    elif names and args.get("key_dims") is None and all(isinstance(args.get(n), fx.Node) for n in ("dims", "member")):
        # no dims copy: the node reads K, each query head on its own dims of the layer's full-dim tables
        if [shape_of(args["dims"]), shape_of(args["member"])] == [(site.num_kv_heads, site.head_dim),
                                                                  (site.num_heads, site.head_dim)]:
            out |= {"dims": args["dims"], "member": args["member"]}
    return out


def key_state_kwargs(graph: fx.Graph, site: SiteMatch, method: str, params: Any, role: str, static: str,
                     shared: dict[tuple, dict[str, fx.Node]]) -> dict[str, Any]:
    """{"key_state": node, "n_visible": node} for a decode site whose method reads a key state
    (`Method.key_state_forced`) and whose mask is structure with a padding mask of exactly Lk columns, else {}.
    shared: the graph's key-state nodes by (padding mask, offsets, causal, window, sink, recent); a site with a
    key already there reuses its nodes, else one `key_state` node is inserted before this site (after its mask,
    before every later site that reads the same mask). static: the site's compile-time fallback ("" if none):
    a site that never runs its method gets no key state."""
    forced = METHODS[method].key_state_forced
    mask = site.mask
    if (forced is None or site.phase != "decode" or role in ("exact", "reuse") or static
            or mask.dense_mask is not None or mask.key_valid is None or mask.key_valid_needs_cut):
        return {}
    sink, recent = forced(params)
    key = (mask.key_valid, mask.key_valid_from_4d, mask.q_offset_terms, mask.kv_offset_terms, mask.causal,
           int(mask.window), sink, recent)
    if key not in shared:
        with graph.inserting_before(site.sdpa):
            key_valid = node_key_valid(graph, site)
            offset, offset_tensor = offset_argument(graph, mask)
            state = graph.call_function(
                OP_KEY_STATE, (key_valid, mask.causal, offset, int(mask.window), sink, recent),
                {} if offset_tensor is None else {"q_offset_tensor": offset_tensor})
            shared[key] = {"key_state": graph.call_function(operator.getitem, (state, 0)),
                           "n_visible": graph.call_function(operator.getitem, (state, 1))}
    return shared[key]


def node_key_valid(graph: fx.Graph, site: SiteMatch) -> fx.Node | None:
    """The node's (B, Lk) padding mask argument, built at the insertion point: the mask's key_valid, its
    [:, 0, 0] when it is a (B, 1, 1, Lk) tensor, cut to Lk columns when its width is not provably Lk."""
    mask = site.mask
    key_valid = mask.key_valid
    if key_valid is not None and mask.key_valid_from_4d:
        key_valid = graph.call_function(operator.getitem, (key_valid, (slice(None), 0, 0)))
    if key_valid is not None and mask.key_valid_needs_cut:
        kv_len = graph.call_method("size", (site.k, 2))
        key_valid = graph.call_function(operator.getitem, (key_valid, (slice(None), slice(None, kv_len))))
    return key_valid


def describe_cache(kwargs: dict[str, Any]) -> str:
    """The Site's `cache_buffers` line: the buffer names the node takes and the page size, or ""."""
    if not kwargs:
        return ""
    names = [n for n in ("key_dims", "dims", "member", "page_min", "page_max") if n in kwargs]
    return f"{', '.join(names)} (P={kwargs['page_size']})"


def site_record(site: SiteMatch, graph_index: int, method: str, params: Any, min_seq_len: int, fallback: str,
                captured: bool, role: str = "", cache_buffers: str = "") -> Site:
    notes = METHODS[method].notes
    note = (notes(site_facts(site), params) or "") if notes is not None else ""
    return Site(
        graph=graph_index, layer=site.layer, phase=site.phase, rope=site.rope.layout,
        rotary_dim=site.rope.rotary_dim, num_heads=site.num_heads, num_kv_heads=site.num_kv_heads,
        head_dim=site.head_dim, causal=site.mask.causal, window=site.mask.window or None, method=method,
        params=params_to_dict(params), mask=site.mask.describe(), cache=site.cache, gqa=site.gqa,
        q_len=str(site.q_len), kv_len=str(site.kv_len), min_seq_len=min_seq_len, fallback=fallback,
        cuda_graphs=captured, role=role, note=note, cache_buffers=cache_buffers,
    )


def rewrite_site(graph: fx.Graph, site: SiteMatch, config: str, op: Any,
                 sharing: tuple[Any, str] | None = None, cache: dict[str, Any] | None = None) -> tuple[fx.Node, ...]:
    """Insert the fused node for one site, rewire SDPA's users to it; returns its (density, fallback) and,
    for a selection-sharing node (sharing = (selection node or None, role)), its selection output. cache:
    the node's keyword arguments from the SparseCache (`cache_kwargs`) and the shared key state
    (`key_state_kwargs`), or None."""
    mask = site.mask
    with graph.inserting_before(site.sdpa):
        key_valid = node_key_valid(graph, site)
        offset, offset_tensor = offset_argument(graph, mask)
        fused = graph.call_function(
            op,
            (site.q, site.k, site.v, key_valid, mask.dense_mask, site.scale, mask.causal,
             offset, int(mask.window), config) + (() if sharing is None else sharing),
            ({} if offset_tensor is None else {"q_offset_tensor": offset_tensor}) | (cache or {}),
        )
        out = graph.call_function(operator.getitem, (fused, 0))
        density = graph.call_function(operator.getitem, (fused, 1))
        fallback = graph.call_function(operator.getitem, (fused, 2))
        made = graph.call_function(operator.getitem, (fused, 3)) if sharing is not None else None
    out.meta.update({k: v for k, v in site.sdpa.meta.items() if k in ("val", "example_value", "stack_trace")})
    site.sdpa.replace_all_uses_with(out)
    graph.erase_node(site.sdpa)
    return (density, fallback) if made is None else (density, fallback, made)


def selection_roles(matches: list[SiteMatch], policy: Policy) -> dict[int, str]:
    """{index in matches: role} for the sites whose method shares selections; a "reuse" site with no
    "select" site of its method before it in this graph becomes "exact"."""
    sharing = [(i, s, *policy.phase(s.phase).for_layer(s.layer)) for i, s in enumerate(matches)]
    sharing = [(i, s, m, p) for i, s, m, p in sharing if METHODS[m].selection_role is not None]
    num_layers = max((s.layer for s in matches), default=-1) + 1
    roles: dict[int, str] = {}
    selected: set[tuple[str, str]] = set()
    for i, site, method, _ in sharing:
        params = policy.phase(site.phase).for_layer(site.layer)[1]
        role = METHODS[method].selection_role(site.layer, num_layers, params)
        if role == "reuse" and (site.phase, method) not in selected:
            role = "exact"
        if role == "select":
            selected.add((site.phase, method))
        roles[i] = role
    return roles


def erase_unused(graph: fx.Graph, candidates: set[fx.Node]) -> None:
    """Erase matched nodes left without users (the L x L mask construction, GQA expansions)."""
    changed = True
    while changed:
        changed = False
        for node in list(candidates):
            if node.graph is graph and not node.users and node.op not in ("placeholder", "output"):
                graph.erase_node(node)
                candidates.discard(node)
                changed = True


def rewrite_attention(
    gm: fx.GraphModule, policy: Policy, graph_index: int = 0
) -> tuple[fx.GraphModule, list[Site], list[Rejection], list[int]]:
    """Rewrite every proven site of `gm` per `policy`. Returns (gm, sites, rejections, layers)."""
    matches, candidates = find_sites(gm)
    rejections = [Rejection(graph_index, c.layer, c.sdpa.name, c.reason) for c in candidates]
    sites: list[Site] = []
    outputs: list[fx.Node] = []
    layers: list[int] = []
    dead: set[fx.Node] = set()
    roles = selection_roles(matches, policy)
    latest_selection: dict[tuple[str, str], fx.Node] = {}
    key_states: dict[tuple, dict[str, fx.Node]] = {}
    widths: set[tuple[int, int]] = set()  # (H, density factors) of the recorded layers
    for index, site in enumerate(matches):
        phase = policy.phase(site.phase)
        method, params = phase.for_layer(site.layer)
        if site.mask.dense_mask is not None:
            rejections.append(Rejection(
                graph_index, site.layer, site.sdpa.name,
                f"mask not recognised ({site.mask.reason}): kept as a tensor argument of the fused node"
                + ("" if method == "dense" else f", which runs exact attention instead of {method}"),
                site_rewritten=True,
            ))
        config = node_config(method, params, phase.min_seq_len, site_facts(site))
        captured = site.phase in METHODS[method].capturable_phases and not reads_host_offset(site.mask)
        role = roles.get(index, "")
        cache = cache_kwargs(site, method, role)
        static = static_fallback(site, config)
        sites.append(site_record(site, graph_index, method, params, phase.min_seq_len, static, captured, role,
                                 describe_cache(cache)))
        cache = cache | key_state_kwargs(gm.graph, site, method, params, role, static, key_states)
        dense_mask = site.sdpa.kwargs.get("attn_mask", site.sdpa.args[3] if len(site.sdpa.args) > 3 else None)
        if role:
            key = (site.phase, method)
            *records, made = rewrite_site(gm.graph, site, config, OP_SHARING,
                                          (latest_selection.get(key) if role == "reuse" else None, role), cache)
            if role == "select":
                latest_selection[key] = made
        else:
            records = rewrite_site(gm.graph, site, config, OP if captured else OP_OUTSIDE_GRAPHS, cache=cache)
        if method != "dense":  # exact attention: density 1, no fallback; nothing to record per call
            outputs.extend(records)
            layers.append(site.layer)
            widths.add((site.num_heads, len(METHODS[method].density_parts)))
        dead |= site.mask.nodes | set(site.expansion_nodes)
        if isinstance(dense_mask, fx.Node):
            dead.add(dense_mask)
    erase_unused(gm.graph, dead)
    if outputs:
        output = next(n for n in gm.graph.nodes if n.op == "output")
        if len(layers) > 1 and len(widths) == 1:  # one shape: stack them (two outputs, two copies a call)
            with gm.graph.inserting_before(output):
                outputs = [gm.graph.call_function(torch.stack, (outputs[0::2],)),
                           gm.graph.call_function(torch.stack, (outputs[1::2],))]
        results = output.args[0]
        if not isinstance(results, (tuple, list)):
            results = (results,)
        output.args = (tuple(results) + tuple(outputs),)
    gm.graph.lint()
    gm.recompile()
    return gm, sites, rejections, layers
