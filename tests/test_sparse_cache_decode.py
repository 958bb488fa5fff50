"""The fused decode node reads a SparseCache's buffers (issue 34 item 2, DECODE_NOTES.md "Wiring").

A decode site whose keys come from a SparseCache layer hands the buffers its `cache_update` node wrote to the
attention node; FASA and LessIsMore then select in two stages (methods/two_stage.py). With a StaticCache the
graph is rewritten as before. CPU, tiny random Llama (4 heads, 2 KV heads, D = 16), the sparse backend with
the eager inner compiler.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from cache_keyword import CACHE_ARG
from test_sparse_cache import padded_batch, tiny_llama
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import StaticCache

import sparse_compile
from sparse_compile.attention_mask import SiteFacts, visible_keys
from sparse_compile.cache import SparseCache
from sparse_compile.kernels.fasa import budget_slots, key_state
from sparse_compile.kernels.lessismore import budget_split
from sparse_compile.kernels.sparse_decode import sparse_decode_reference
from sparse_compile.methods.fasa import FasaParams, layer_chunks
from sparse_compile.methods.two_stage import fasa_two_stage, lessismore_two_stage
from sparse_compile.ops import bind_node, node_call_of, node_config
from sparse_compile.passes.rewrite import OP, OP_SHARING, rewrite_attention
from sparse_compile.policy import load_policy

L_CACHE, PAGE = 64, 16  # 4 pages; the prompt (21 tokens) and 6 new tokens fill 2
H = 4


def fasa_policy(candidates: float, **params) -> dict:
    return {"name": "fasa-wired", "decode": {"method": "fasa", "min_seq_len": 0, "params": {
        "budget": 8, "dense_layers": [], "candidates": candidates, **params}}}


def lessismore_policy(candidates: float) -> dict:
    return {"name": "lim-wired", "decode": {"method": "lessismore", "min_seq_len": 0, "params": {
        "budget": 12, "sink": 2, "dense_layers": [0], "selection_layers": [1], "candidates": candidates}}}


# Every query head's dims together are all 16 head dims: the cache keeps no dims copy, the node reads K.
UNION_ALL = [[[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3], [4, 5, 6, 7]]] * 3
ALL_PAGES = 1000.0  # candidates x budget >= the cache: every page is a candidate


# --- (a) the graph ---------------------------------------------------------------------------------------------


def decode_graph(model, cache) -> torch.fx.GraphModule:
    """The dynamo graph of one decode forward over `cache` (the prefill runs eagerly)."""
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm

    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model(ids, **{CACHE_ARG: cache}, use_cache=True)
        torch.compile(model.forward, backend=keep, fullgraph=True)(ids[:, :1], **{CACHE_ARG: cache}, use_cache=True)
    torch._dynamo.reset()
    return graphs[0]


def test_decode_node_takes_the_buffers_of_the_cache_update_it_follows():
    """SparseCache: each FASA decode node's keyword arguments are the very nodes its layer's cache_update wrote
    (key_dims, page_min, page_max, dims, member) and the page size; the Report names them. StaticCache: the node
    has no such argument (rewritten as before). Both: the step's key state comes from one `key_state` node that
    every FASA node reads (computed once per step, before the first of them)."""
    model = tiny_llama(2)
    policy = load_policy(fasa_policy(4.0))
    gm = decode_graph(model, SparseCache(model, max_cache_len=L_CACHE, policy=policy, page_size=PAGE))
    updates = [n for n in gm.graph.nodes if n.target is torch.ops.sparse_compile.cache_update.default]
    gm, sites, _, _ = rewrite_attention(gm, policy)
    nodes = [n for n in gm.graph.nodes if n.target is OP]
    assert len(nodes) == len(updates) == 2
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    shared = shared_key_state(gm, nodes)
    for node, update in zip(nodes, updates, strict=True):
        key_dims, page_min, page_max, _, dims, _, k_new, size, member = update.args
        assert node.kwargs == {"key_dims": key_dims, "dims": dims, "member": member, "page_min": page_min,
                               "page_max": page_max, "page_size": PAGE} | shared
        assert order[update] < order[node]  # the node reads the summaries after this step's write
    assert [s.cache_buffers for s in sites] == ["key_dims, dims, member, page_min, page_max (P=16)"] * 2
    # the two layers' records leave the graph stacked: densities (2, B, H) and codes (2,), two outputs in all
    output = next(n for n in gm.graph.nodes if n.op == "output")
    *_, densities, codes = output.args[0]
    assert densities.target is torch.stack and codes.target is torch.stack
    assert [len(densities.args[0]), len(codes.args[0])] == [2, 2]

    gm = decode_graph(model, StaticCache(model.config, max_cache_len=L_CACHE))
    gm, sites, _, _ = rewrite_attention(gm, policy)
    nodes = [n for n in gm.graph.nodes if n.target is OP]
    shared = shared_key_state(gm, nodes)
    assert len(nodes) == 2 and all(set(n.kwargs) - set(shared) <= {"q_offset_tensor"} for n in nodes)
    assert [s.cache_buffers for s in sites] == ["", ""]


def shared_key_state(gm: torch.fx.GraphModule, nodes: list[torch.fx.Node]) -> dict[str, torch.fx.Node]:
    """The one `key_state` node's outputs, asserted to be every node's key_state / n_visible arguments and to come
    before the first node; returns them as the nodes' keyword arguments."""
    made = [n for n in gm.graph.nodes if n.target is torch.ops.sparse_compile.key_state.default]
    assert len(made) == 1
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    shared = {"key_state": nodes[0].kwargs["key_state"], "n_visible": nodes[0].kwargs["n_visible"]}
    assert [shared["key_state"].args, shared["n_visible"].args] == [(made[0], 0), (made[0], 1)]
    assert all(n.kwargs["key_state"] is shared["key_state"] and n.kwargs["n_visible"] is shared["n_visible"]
               for n in nodes)
    assert order[made[0]] < order[nodes[0]]
    return shared


def test_lessismore_selecting_node_takes_the_pages_only():
    """LessIsMore: the selecting layer's node gets page_min / page_max (its logits read K itself); exact and
    reusing layers get nothing (the cache keeps nothing for them either)."""
    model = tiny_llama(3)
    policy = load_policy(lessismore_policy(4.0))
    gm = decode_graph(model, SparseCache(model, max_cache_len=L_CACHE, policy=policy, page_size=PAGE))
    gm, sites, _, _ = rewrite_attention(gm, policy)
    nodes = [n for n in gm.graph.nodes if n.target is OP_SHARING]
    cached = [set(n.kwargs) - {"q_offset_tensor"} for n in nodes]
    assert cached == [set(), {"page_min", "page_max", "page_size"}, set()]
    assert [(s.role, s.cache_buffers) for s in sites] == [("exact", ""), ("select", "page_min, page_max (P=16)"),
                                                          ("reuse", "")]


# --- generate ----------------------------------------------------------------------------------------------------


class NodeChecker(TorchDispatchMode):
    """At every fused node call that has a SparseCache's buffers, recompute what the node must return from its
    inputs with the method's two-stage function (now: the buffers change at the next step) and keep both."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        call = node_call_of(func, args, kwargs)
        if call is not None and call.cache is not None and call.plan().ran:
            self.rows.append({"out": tuple(o.clone() for o in out), **two_stage_reference(call)})
        return out


def two_stage_reference(call) -> dict:
    """The node's outputs by the two-stage functions, from its bound inputs (ops.NodeCall)."""
    p, c = call.node.params, call.cache
    B, H, _, D = call.q.shape
    Hkv, Lk = call.k.shape[1], call.k.shape[2]
    visible = visible_keys(call.mask, B, 1, Lk)[:, 0, 0, :]
    if call.node.method.name == "fasa":
        slots = budget_slots(p.budget, Lk, p.sink, p.recent)
        key_dims, dims, member = c.key_dims, c.dims, c.member
        if key_dims is None:  # no dims copy: the node reads K, each head on its own chunks' dims
            chunks, _ = layer_chunks(p, call.node.site.layer, H, Hkv, D, D)  # one tuple (the rule) or one per head
            member = torch.zeros(H, D)
            for h in range(H):
                for chunk in chunks[0 if len(chunks) == 1 else h]:
                    member[h, [chunk, chunk + D // 2]] = 1.0  # rotate_half: chunk i = dims i, i + D/2
            key_dims, dims = call.k, torch.arange(D).expand(Hkv, D)
        idx = fasa_two_stage(call.q, key_dims, dims, member, c.page_min, c.page_max,
                             key_state(visible, p.sink, p.recent), slots, max(slots, math.ceil(p.candidates * slots)),
                             c.page_size, sink=p.sink, recent=p.recent, per_kv_head=p.gqa == "per_kv_head")
        out = sparse_decode_reference(call.q, call.k, call.v, idx, scale=call.scale)
        return {"ref_out": out, "ref_selection": idx, "visible": visible.sum(-1), "slots": slots}
    n_sink, middle, n_recent = budget_split(p.budget, p.sink, p.recent_fraction)
    made = lessismore_two_stage(call.q, call.k, c.page_min, c.page_max, visible, call.scale, n_sink, middle,
                                n_recent, max(1, math.ceil(p.candidates * middle)), c.page_size)
    return {"ref_selection": made, "visible": visible.sum(-1)}


def generate(model, ids, mask, cache, policy, checker: NodeChecker | None = None):
    """Greedy generation under the sparse backend (eager inner compiler), each graph call inside `checker`.
    Returns (tokens, logits (steps, B, V), report)."""
    torch._dynamo.reset()
    report = sparse_compile.Report()
    inner = sparse_compile.backend(policy, inner="eager", report=report)

    def checked(gm, example_inputs, **kwargs):
        compiled = inner(gm, example_inputs, **kwargs)
        if checker is None:
            return compiled

        def run(*args):
            with checker:
                return compiled(*args)

        return run

    if isinstance(cache, SparseCache):
        cache.set_padding(mask)
    forward = model.forward
    model.forward = torch.compile(forward, backend=checked)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            result = model.generate(ids, attention_mask=mask, **{CACHE_ARG: cache}, max_new_tokens=6,
                                    do_sample=False, output_logits=True, return_dict_in_generate=True)
    finally:
        model.forward = forward
        torch._dynamo.reset()
    return result.sequences, torch.stack(result.logits), report


CASES = {  # (layers, policy for a candidates multiple, SparseCache's dims_copy)
    "fasa": (2, lambda c: fasa_policy(c), True),
    "fasa-per-kv-head-sink-recent": (2, lambda c: fasa_policy(c, gqa="per_kv_head", sink=2, recent=2), True),
    "fasa-no-dims-copy": (2, lambda c: fasa_policy(c, chunks=UNION_ALL), True),
    "fasa-pages-only": (2, lambda c: fasa_policy(c, gqa="per_kv_head", sink=2, recent=2), False),
    "lessismore": (3, lessismore_policy, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_page_a_candidate_generates_as_the_single_stage_method(case):
    """Candidates covering every page: a SparseCache generates the same tokens as a StaticCache under the same
    policy (single-stage selection), logits equal up to float summation order (the sparse decode kernel sums the
    selected keys in selection order), with the two-stage path running at every decode node (checked calls)."""
    layers, policy, dims_copy = CASES[case]
    model = tiny_llama(layers)
    ids, mask = padded_batch()
    ref_tokens, ref_logits, ref_report = generate(model, ids, mask, StaticCache(model.config, max_cache_len=L_CACHE),
                                                  policy(ALL_PAGES))
    checker = NodeChecker()
    cache = SparseCache(model, max_cache_len=L_CACHE, policy=policy(ALL_PAGES), page_size=PAGE, dims_copy=dims_copy)
    tokens, logits, report = generate(model, ids, mask, cache, policy(ALL_PAGES), checker)
    assert tokens.tolist() == ref_tokens.tolist()
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
    assert report.layer_density("decode") == ref_report.layer_density("decode")
    assert min(report.layer_density("decode").values()) < 1.0  # the method ran
    wired = [s for s in report.sites if s.phase == "decode" and s.cache_buffers]
    assert wired and not [s for s in ref_report.sites if s.cache_buffers]
    assert "selects in two stages over the SparseCache's buffers" in str(report)
    assert "two stages" not in str(ref_report)
    assert len(checker.rows) == 5 * len(wired)  # 6 new tokens: 5 decode steps, each wired node ran two-stage
    if case in ("fasa-no-dims-copy", "fasa-pages-only"):  # the node reads K with the layer's full-dim tables
        assert all(layer.key_dims is None and layer.page_min is not None for layer in cache.layers)
        assert all(s.cache_buffers == "dims, member, page_min, page_max (P=16)" for s in wired)


@pytest.mark.parametrize("case", list(CASES))
def test_few_candidates_node_equals_the_two_stage_reference(case):
    """Candidates = the budget (one page of 16 for FASA's 8 slots): the run completes, every wired node returns
    what the method's two-stage function gives on the node's own inputs (selection, and for FASA the attention
    over it), and the Report's decode density is kept / visible keys: the budget's slots, or fewer where the one
    candidate page is the partly written last page (the density shows it)."""
    layers, policy, dims_copy = CASES[case]
    model = tiny_llama(layers)
    ids, mask = padded_batch()
    checker = NodeChecker()
    cache = SparseCache(model, max_cache_len=L_CACHE, policy=policy(1.0), page_size=PAGE, dims_copy=dims_copy)
    tokens, _, report = generate(model, ids, mask, cache, policy(1.0), checker)
    assert tokens.shape == (2, 27) and checker.rows
    for row in checker.rows:
        if "ref_out" in row:  # FASA
            out, density, _ = row["out"]
            torch.testing.assert_close(out, row["ref_out"], rtol=0, atol=0)
            kept = (row["ref_selection"] >= 0).sum(-1)  # (B, S): the slots, or the visible keys of the one page
            assert (kept <= row["slots"]).all() and (kept >= 1).all()
            expected = (kept.float() / row["visible"].float()[:, None]).repeat_interleave(H // kept.shape[1], 1)
            torch.testing.assert_close(density, expected, rtol=0, atol=0)
        else:  # LessIsMore's selecting layer: its selection output
            assert torch.equal(row["out"][3], row["ref_selection"])
    last = checker.rows[-1]
    measured = report.layer_density("decode")
    if case.startswith("fasa"):
        assert all(math.isclose(measured[layer], float(row["out"][1].mean()), rel_tol=1e-6)
                   for layer, row in zip(measured, checker.rows[-len(measured):], strict=True))
        assert max(measured.values()) <= float((last["slots"] / last["visible"].float()).mean()) + 1e-6
    else:  # the reusing layer attends to the selection: budget / visible keys
        want = float((12 / last["visible"].float()).mean())
        assert math.isclose(measured[2], want, rel_tol=1e-6)


def test_node_checks_the_cache_arguments():
    """bind_node: pages and page_size come together, in (B, Hkv, ceil(Lk / P), D); the dims triple all or none
    and shaped (B, Hkv, Lk, n) / (Hkv, n) / (H, n). ValueError names what is wrong."""
    q, k = torch.randn(1, H, 1, 16), torch.randn(1, 2, 40, 16)
    site = SiteFacts(layer=1, rotary_dim=16, head_dim=16, num_heads=H, num_kv_heads=2)
    config = node_config("fasa", FasaParams(budget=8), 0, site)
    pages = torch.zeros(1, 2, 3, 16)
    key_dims, dims, member = torch.zeros(1, 2, 40, 4), torch.zeros(2, 4, dtype=torch.int64), torch.zeros(H, 4)

    def bind(**cache):
        return bind_node(q, k, k, None, None, 0.25, True, 39, 0, config, **cache)

    assert bind().cache is None
    call = bind(page_min=pages, page_max=pages, page_size=16, key_dims=key_dims, dims=dims, member=member)
    assert call.cache.page_size == 16 and call.cache.key_dims is key_dims
    with pytest.raises(ValueError, match="page_min, page_max and page_size"):
        bind(page_min=pages, page_size=16)
    with pytest.raises(ValueError, match="page_min must be"):
        bind(page_min=torch.zeros(1, 2, 2, 16), page_max=pages, page_size=16)
    with pytest.raises(ValueError, match="come together"):
        bind(page_min=pages, page_max=pages, page_size=16, key_dims=key_dims)
    with pytest.raises(ValueError, match="member"):
        bind(page_min=pages, page_max=pages, page_size=16, key_dims=key_dims, dims=dims, member=member[:2])


def test_fraction_budget_generates_as_the_single_stage_method():
    """A fraction budget (a StaticCache's decode mask always has a key-validity row, so the slots are counted per
    row on the device, ragged with the padded row) runs the two-stage path too: every page a candidate gives the
    single-stage tokens and densities."""
    model = tiny_llama(2)
    ids, mask = padded_batch()
    policy = fasa_policy(ALL_PAGES, budget=0.25)
    ref_tokens, ref_logits, ref_report = generate(model, ids, mask, StaticCache(model.config, max_cache_len=L_CACHE),
                                                  policy)
    cache = SparseCache(model, max_cache_len=L_CACHE, policy=policy, page_size=PAGE)
    tokens, logits, report = generate(model, ids, mask, cache, policy)
    assert tokens.tolist() == ref_tokens.tolist()
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
    assert report.layer_density("decode") == ref_report.layer_density("decode") and all(
        d < 1.0 for d in report.layer_density("decode").values())
    assert all(s.cache_buffers for s in report.sites if s.phase == "decode")
