"""StaticCache masks (issue 34): the mask transformers builds from the cache's `cumulative_length` is
structure, not an L x L tensor.

With a StaticCache passed to `model(...)` (transformers 5.17 and 5.25), the mask compares key slots with
`arange(Lq) + cumulative_length`, a 0-d tensor the cache increments in place after the mask read it, over
all `max_cache_len` slots. Prefill nodes get causal(q_offset=<that tensor>) (unfilled slots sit past every
query), decode nodes the (B, 1, 1, Lk) mask rows as key validity; padding stays the key-validity vector.
Checked here: the recognised description, compiled == eager (first prefill, chunked prefill into a partly
filled cache, a prefill into a reset cache, decode; B = 1 and B = 2 left-padded), the node's visibility
equal to transformers' mask call by call, no (Lq, Lk) tensor left in the rewritten prefill graph, and
near-miss masks kept as tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from cache_keyword import CACHE_ARG
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples
from test_families import assert_logits_equal, compile_dense, fresh_dynamo
from test_masks import ShapeRecorder, batch_with_padding, llama
from torch import nn
from torch.overrides import TorchFunctionMode
from transformers import StaticCache

import sparse_compile
from sparse_compile import Report, load_policy
from sparse_compile.attention_mask import visible_keys
from sparse_compile.compiler import rewrite_graph, with_call_records
from sparse_compile.ops import NodeCall, node_call_of

TENSOR_OFFSET = "causal(q_offset=tensor("  # transformers names the node q_offset; the test does not rely on it


def static_steps(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None, chunks: list[tuple[int, int]],
                 max_cache_len: int, run: Callable, reset_after: int | None = None) -> list[torch.Tensor]:
    """Forward ids[:, a:b] for each chunk on one StaticCache (attention_mask[:, :b] when a mask is given);
    after chunk number `reset_after` the cache is reset (its counter back to a 0 tensor) and chunks restart."""
    cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
    outs = []
    with torch.no_grad():
        for n, (a, b) in enumerate(chunks):
            kw = {} if mask is None else {"attention_mask": mask[:, :b]}
            outs.append(run(input_ids=ids[:, a:b], **{CACHE_ARG: cache}, **kw).logits)
            if n == reset_after:
                cache.reset()
    return outs


def query_mask(mask: torch.Tensor | None, a: int, b: int) -> torch.Tensor | None:
    return None if mask is None else mask[:, a:b]


# --- prefill, chunked prefill, reset, decode: recognised and exact --------------------------------


@settings(max_examples=examples(4))
@given(first=st.integers(2, 6), second=st.integers(2, 5), spare=st.integers(0, 5), batch=st.integers(1, 2),
       data=st.data())
def test_static_cache_masks_are_structure(first: int, second: int, spare: int, batch: int,
                                          data: st.DataObject) -> None:
    pad = data.draw(st.integers(0, first - 1), label="pad") if batch == 2 else 0
    with_mask = pad > 0 or data.draw(st.booleans(), label="with_mask")
    total = first + second + 1
    ids, mask = batch_with_padding([pad] + [0] * (batch - 1), total, "left", seed=first * 7 + second)
    mask = mask if with_mask else None
    # prefill, a second prefill chunk into the partly filled cache, a decode step
    chunks = [(0, first), (first, first + second), (total - 1, total)]
    model = llama(1)
    report = Report()
    refs = static_steps(model, ids, mask, chunks, total + spare, model)
    outs = static_steps(model, ids, mask, chunks, total + spare, compile_dense(model, report))
    for (a, b), out, ref in zip(chunks, outs, refs, strict=True):
        assert_logits_equal(out, ref, query_mask(mask, a, b))
    assert report.rejected == [], str(report)
    padding = "+padding" if with_mask else ""
    by_graph = {s.graph: s for s in report.sites}
    first_graph, chunk_graph, decode_graph = sorted(by_graph)
    # The first prefill finds the cache uninitialised: its offset is the int 0.
    assert by_graph[first_graph].mask == "causal(q_offset=0)" + padding, str(report)
    chunk = by_graph[chunk_graph]
    assert (chunk.phase, chunk.kv_len) == ("prefill", str(total + spare)), str(report)
    assert chunk.mask.startswith(TENSOR_OFFSET) and chunk.mask.endswith(")" + padding), str(report)
    assert not chunk.cuda_graphs, "the host copy of the offset cannot be captured"
    assert (by_graph[decode_graph].phase, by_graph[decode_graph].mask) == ("decode", "full+padding"), str(report)
    assert all(s.cache == "static" for s in report.sites)


def test_prefill_into_a_reset_cache_reads_the_counter_at_run_time() -> None:
    """After `cache.reset()` the counter is a 0 tensor again. The prefill at offset 0 and the next chunk at
    offset 4 run one graph, so the offset must be read per call (a traced constant would be wrong)."""
    model = llama(2)
    ids, mask = batch_with_padding([2, 0], 10, "left", seed=5)
    chunks = [(0, 5), (5, 10), (0, 4), (4, 9)]  # reset after the second
    report = Report()
    refs = static_steps(model, ids, mask, chunks, 16, model, reset_after=1)
    outs = static_steps(model, ids, mask, chunks, 16, compile_dense(model, report), reset_after=1)
    for (a, b), out, ref in zip(chunks, outs, refs, strict=True):
        assert_logits_equal(out, ref, query_mask(mask, a, b))
    assert report.rejected == [], str(report)
    tensor_graphs = {s.graph for s in report.sites if s.mask.startswith(TENSOR_OFFSET)}
    assert sorted(report.calls[g] for g in tensor_graphs) == [1, 2], (str(report), report.calls)


def test_inductor_compiles_the_tensor_offset() -> None:
    """The default inner compiler: the counter reaches the node as a host tensor argument, no data-dependent
    int in the graph (Inductor would need capture_scalar_outputs for one). The first chunk runs eagerly,
    so the one compiled graph is the chunk into the filled cache."""
    model = llama(1)
    ids, mask = batch_with_padding([2, 0], 9, "left", seed=9)
    report = Report()
    compiled = torch.compile(model, backend=sparse_compile.backend(policy="dense", report=report))
    fresh_dynamo()
    outs = []
    for run in (model, compiled):
        cache = StaticCache(config=model.config, max_cache_len=12)
        with torch.no_grad():
            model(input_ids=ids[:, :4], attention_mask=mask[:, :4], **{CACHE_ARG: cache})
            outs.append(run(input_ids=ids[:, 4:], attention_mask=mask, **{CACHE_ARG: cache}).logits)
    torch.testing.assert_close(outs[1][mask[:, 4:].bool()], outs[0][mask[:, 4:].bool()], atol=1e-4, rtol=1e-4)
    assert [s.mask[:len(TENSOR_OFFSET)] for s in report.sites] == [TENSOR_OFFSET], str(report)
    assert report.rejected == [], str(report)


# --- the node's visibility is transformers' mask, call by call ----------------------------------


class SdpaMasks(TorchFunctionMode):
    """Records (attn_mask, is_causal, Lk) of every eager SDPA call."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[torch.Tensor | None, bool, int]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            causal = bool(kwargs.get("is_causal", False))
            self.records.append((None if mask is None else mask.clone(), causal, args[1].shape[2]))
        return func(*args, **kwargs)


def eager_visibility(record: tuple[torch.Tensor | None, bool, int], batch: int, q_len: int, kv_len: int
                     ) -> torch.Tensor:
    """The (B, 1, Lq, kv_len) bool visibility of one eager SDPA call. Eager transformers cuts the keys of
    an empty StaticCache's causal prefill to Lq (is_causal, no mask) and packs a decode query's GQA groups
    along the query dim (its mask rows are shared): both are undone here; slots it cut are invisible."""
    mask, causal, eager_kv = record
    if mask is None:
        full = torch.ones(q_len if causal else 1, eager_kv, dtype=torch.bool)
        mask = torch.tril(full) if causal else full
    mask = mask.to(torch.bool)
    mask = mask.expand(batch, 1, q_len if mask.shape[-2] == 1 else mask.shape[-2], mask.shape[-1])
    assert mask.shape[2] == q_len, (tuple(mask.shape), q_len)
    return F.pad(mask, (0, kv_len - mask.shape[-1]), value=False)


class NodeCalls(torch.fx.Interpreter):
    """Runs a rewritten graph node by node, recording each fused node's bound call."""

    def __init__(self, gm: torch.fx.GraphModule, calls: list[NodeCall]):
        super().__init__(gm)
        self.calls = calls

    def call_function(self, target: Any, args: tuple, kwargs: dict) -> Any:
        call = node_call_of(target, args, kwargs)
        if call is not None:
            self.calls.append(call)
        return super().call_function(target, args, kwargs)


def recording_backend(report: Report, calls: list[NodeCall], check: Callable | None = None) -> Callable:
    """The sparse pass (dense policy), then the graph run by NodeCalls; check(gm_before_and_after) hook."""

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        if check is not None:
            check("before", gm, example_inputs)
        index = len(report.graphs)
        gm, n_outputs, layers = rewrite_graph(gm, example_inputs, load_policy("dense"), report)
        if check is not None:
            check("after", gm, example_inputs)
        return with_call_records(lambda *args: NodeCalls(gm, calls).run(*args), n_outputs, layers, report, index)

    return backend


@settings(max_examples=examples(3))
@given(pad=st.integers(0, 3), second=st.integers(2, 4))
def test_node_visibility_equals_the_transformers_mask(pad: int, second: int) -> None:
    """Per call and layer: causal/q_offset (with the counter's value)/key_valid of the node give exactly the
    boolean mask eager transformers hands SDPA, unfilled cache slots included."""
    model = llama(1)
    total = 4 + second + 1
    ids, mask = batch_with_padding([pad, 0], total, "left", seed=pad)
    chunks = [(0, 4), (4, 4 + second), (total - 1, total)]
    eager = SdpaMasks()
    with eager:
        refs = static_steps(model, ids, mask, chunks, total + 3, model)
    fresh_dynamo()
    calls: list[NodeCall] = []
    report = Report()
    compiled = torch.compile(model, backend=recording_backend(report, calls))
    outs = static_steps(model, ids, mask, chunks, total + 3, compiled)
    for (a, b), out, ref in zip(chunks, outs, refs, strict=True):
        assert_logits_equal(out, ref, query_mask(mask, a, b))
    assert len(calls) == len(eager.records) == len(chunks)
    for call, record in zip(calls, eager.records, strict=True):
        assert call.mask.dense_mask is None
        B, lq, lk = call.q.shape[0], call.q.shape[2], call.k.shape[2]
        got, expected = visible_keys(call.mask, B, lq, lk), eager_visibility(record, B, lq, lk)
        assert torch.equal(got, expected), (call.mask.describe(), got.int(), expected.int())


# --- no (Lq, Lk) tensor in the rewritten prefill graph ---------------------------------------------


def test_no_query_by_key_mask_in_the_static_prefill_graph() -> None:
    """Lk = max_cache_len = 37 and Lq = 11 match no model dim (hidden 64, heads 4/2, head_dim 16, vocab 128):
    only a mask (or attention scores) is (.., 11, 37). Graphs run on copies of their inputs, so the cache
    the model uses is untouched; the second graph is the chunk whose offset is the cache's counter."""
    model = llama(2)
    ids, mask = batch_with_padding([3, 0], 22, "left", seed=2)
    chunks = [(0, 11), (11, 22)]
    found: dict[tuple[int, str], list[str]] = {}
    seen = {"graphs": 0}

    def check(stage: str, gm: torch.fx.GraphModule, example_inputs: list) -> None:
        copies = [x.clone() if isinstance(x, torch.Tensor) else x for x in example_inputs]
        recorder = ShapeRecorder(gm)
        with torch.no_grad():
            recorder.run(*copies)
        found[(seen["graphs"], stage)] = [n for n, s in recorder.shapes.items() if len(s) >= 2 and s[-2:] == (11, 37)]
        seen["graphs"] += stage == "after"

    report = Report()
    calls: list[NodeCall] = []
    fresh_dynamo()
    # static shapes: the graphs run here on concrete inputs (dynamic ones would hand the backend SymInts)
    compiled = torch.compile(model, backend=recording_backend(report, calls, check), dynamic=False)
    refs = static_steps(model, ids, mask, chunks, 37, model)
    outs = static_steps(model, ids, mask, chunks, 37, compiled)
    for (a, b), out, ref in zip(chunks, outs, refs, strict=True):
        assert_logits_equal(out, ref, query_mask(mask, a, b))
    assert [s.mask for s in report.sites if s.graph == 1][0].startswith(TENSOR_OFFSET), str(report)
    for graph in (0, 1):
        assert found[(graph, "before")], "the check must see transformers' (Lq, Lk) mask before the rewrite"
        assert found[(graph, "after")] == [], found[(graph, "after")]


# --- near misses stay tensors ----------------------------------------------------------------------


class OffsetMask(nn.Module):
    """RoPE'd attention whose mask compares key indices with `arange(n) + offset`, `offset` a tensor input.

    form "causal": kv <= q (recognised, any 0-d integer offset); "strict": kv < q (the diagonal hidden:
    not causal); "float": the offset is a float tensor; "vector": the offset has shape (1,)."""

    def __init__(self, form: str, heads: int = 2, head_dim: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.form, self.heads, self.head_dim = form, heads, head_dim
        self.qkv = nn.Linear(heads * head_dim, 3 * heads * head_dim, bias=False)
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))

    def forward(self, x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        freqs = torch.arange(n).float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        half = self.head_dim // 2
        q = q * cos + torch.cat((-q[..., half:], q[..., :half]), dim=-1) * sin
        k = k * cos + torch.cat((-k[..., half:], k[..., :half]), dim=-1) * sin
        q_idx = (torch.arange(n) + offset)[None, None, :, None]
        kv_idx = torch.arange(n)[None, None, None, :]
        mask = kv_idx < q_idx if self.form == "strict" else kv_idx <= q_idx
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def offset_case(form: str, offset: torch.Tensor) -> Report:
    model = OffsetMask(form)
    x = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(0))
    report = Report()
    with torch.no_grad():
        ref = model(x, offset)
        out = compile_dense(model, report)(x, offset)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    return report


def test_a_zero_d_integer_offset_is_a_causal_offset() -> None:
    report = offset_case("causal", torch.tensor(3))
    assert [s.mask[:len(TENSOR_OFFSET)] for s in report.sites] == [TENSOR_OFFSET], str(report)
    assert report.rejected == []


def test_near_miss_offset_masks_stay_tensors() -> None:
    cases = {
        "strict": (torch.tensor(3), "comparison kv lt q+0 is neither causal nor a sliding window"),
        "float": (torch.tensor(3.0), "reads graph input L_offset_ as data"),
        "vector": (torch.tensor([3]), "reads graph input L_offset_ as data"),
    }
    for form, (offset, why) in cases.items():
        report = offset_case("strict" if form == "strict" else "causal", offset)
        assert [s.mask for s in report.sites] == ["tensor"], (form, str(report))
        assert len(report.rejected) == 1, (form, str(report))
        assert report.rejected[0].reason.startswith("mask not recognised (") and why in report.rejected[0].reason, (
            form, report.rejected[0].reason)
