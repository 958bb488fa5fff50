"""Mask recognition (issue 11): the structure the pass reads from transformers' traced masks.

Padding (left and right, B > 1), sliding windows shorter and longer than the sequence, chunked
prefill (a second forward on a non-empty DynamicCache), decode with DynamicCache and StaticCache:
the recognised description is the expected one and compiled logits/tokens equal eager. A graph
test proves no L x L tensor survives the rewrite; an unrecognisable mask stays a tensor argument.
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
from test_families import (
    FAMILIES,
    VOCAB,
    Draw,
    assert_logits_equal,
    build_model,
    compile_dense,
    family_config,
    generate_tokens,
)
from torch import nn
from transformers import DynamicCache

from sparse_compile import Report, load_policy
from sparse_compile.compiler import rewrite_graph, with_call_records


def batch_with_padding(
    pads: list[int], length: int, side: str, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids (B, length) and a 2-D attention mask with pads[b] padded positions in row b."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (len(pads), length), generator=gen)
    mask = torch.ones(len(pads), length, dtype=torch.long)
    for b, pad in enumerate(pads):
        if pad and side == "left":
            mask[b, :pad] = 0
        elif pad:
            mask[b, length - pad:] = 0
    ids[mask == 0] = 0
    return ids, mask


def llama(layers: int = 1) -> nn.Module:
    return build_model(family_config(FAMILIES["llama"], Draw(4, 2, 16, layers)))


def gemma3(window: int, flags: tuple[bool, ...] = (True, False)) -> nn.Module:
    return build_model(family_config(FAMILIES["gemma3"], Draw(4, 2, 16, len(flags), window, flags)))


def mistral(window: int, layers: int = 1) -> nn.Module:
    return build_model(family_config(FAMILIES["mistral"], Draw(4, 2, 16, layers, window)))


def compiled_vs_eager(model: nn.Module, **inputs: Any) -> Report:
    """Run eager and compiled (dense policy); assert equal logits on real tokens; return the report."""
    report = Report()
    with torch.no_grad():
        ref = model(**inputs).logits
        out = compile_dense(model, report)(**inputs).logits
    assert_logits_equal(out, ref, inputs.get("attention_mask"))
    return report


# --- padding -------------------------------------------------------------------------------------


@settings(max_examples=examples(4))
@given(
    length=st.integers(2, 12),
    data=st.data(),
    side=st.sampled_from(["left", "right"]),
)
def test_padding_is_key_validity(length: int, data: st.DataObject, side: str) -> None:
    pads = data.draw(st.lists(st.integers(0, length - 1), min_size=2, max_size=3), label="pads")
    ids, mask = batch_with_padding(pads, length, side)
    report = compiled_vs_eager(llama(), input_ids=ids, attention_mask=mask)
    facts = [(s.mask, s.window, s.causal) for s in report.sites]
    assert facts == [("causal(q_offset=0)+padding", None, True)]
    assert report.rejected == []


# --- sliding windows -----------------------------------------------------------------------------


@settings(max_examples=examples(4))
@given(window=st.integers(2, 16), length=st.integers(3, 12), pad=st.integers(0, 2),
       side=st.sampled_from(["left", "right"]))
def test_sliding_window_shorter_and_longer_than_length(window: int, length: int, pad: int, side: str) -> None:
    """Gemma3: layer 0 slides (window recorded, never widened), layer 1 is full causal."""
    ids, mask = batch_with_padding([0, pad], length, side)
    report = compiled_vs_eager(gemma3(window), input_ids=ids, attention_mask=mask)
    padding = "+padding"
    assert [(s.layer, s.mask, s.window) for s in report.sites] == [
        (0, f"causal(q_offset=0)+window={window}{padding}", window),
        (1, f"causal(q_offset=0){padding}", None),
    ]


def test_mistral_window_recognised_where_it_matters() -> None:
    """A window shorter than the prompt is read as a window. For a prompt within the window,
    transformers 5.17 still traces the window term and 5.23 leaves it out (it constrains nothing):
    both are exact, and the next, longer prompt recompiles with the window recognised."""
    window = 4
    model = mistral(window)
    report = Report()
    compiled = compile_dense(model, report)
    for length in (3, 9):
        ids = torch.randint(3, VOCAB, (2, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            assert_logits_equal(compiled(input_ids=ids).logits, model(input_ids=ids).logits)
    windowed = f"causal(q_offset=0)+window={window}"
    assert report.sites[0].mask in ("causal(q_offset=0)", windowed), str(report)
    assert (report.sites[-1].mask, report.sites[-1].window) == (windowed, window), str(report)
    assert report.rejected == []


# --- use_cache=False: position ids and the packed-sequence mask built in the graph ----------------


def test_use_cache_false_prefill_is_plain_causal() -> None:
    """model(ids, use_cache=False) builds position ids and a packed-sequence mask in the graph: read as
    plain causal (one sequence per row), so sparse methods run there."""
    ids = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
    report = compiled_vs_eager(llama(2), input_ids=ids, use_cache=False)
    assert [s.mask for s in report.sites] == ["causal(q_offset=0)"] * 2, str(report)
    assert report.rejected == []


def test_user_position_ids_stay_a_tensor_mask() -> None:
    """Packed sequences (position ids restarting inside a row) are data the graph cannot prove: the mask
    stays a tensor argument and the compiled model still equals eager."""
    ids = torch.randint(3, VOCAB, (1, 10), generator=torch.Generator().manual_seed(1))
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]])
    report = compiled_vs_eager(llama(), input_ids=ids, position_ids=position_ids, use_cache=False)
    assert [s.mask for s in report.sites] == ["tensor"], str(report)
    assert len(report.rejected) == 1 and "mask not recognised" in report.rejected[0].reason, str(report)


# --- chunked prefill -----------------------------------------------------------------------------


def chunked(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, first: int, report: Report | None
            ) -> list[torch.Tensor]:
    """Prefill ids[:, :first], then ids[:, first:] on the same DynamicCache (q_len > 1, non-empty cache)."""
    run = model if report is None else compile_dense(model, report)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        a = run(input_ids=ids[:, :first], attention_mask=mask[:, :first], **{CACHE_ARG: cache}).logits
        b = run(input_ids=ids[:, first:], attention_mask=mask, **{CACHE_ARG: cache}).logits
    return [a, b]


@settings(max_examples=examples(3))
@given(first=st.integers(2, 6), second=st.integers(2, 6), pad=st.integers(0, 1))
def test_chunked_prefill_has_a_query_offset(first: int, second: int, pad: int) -> None:
    model = llama()
    ids, mask = batch_with_padding([pad, 0], first + second, "left")
    report = Report()
    outs, refs = chunked(model, ids, mask, first, report), chunked(model, ids, mask, first, None)
    for out, ref, m in zip(outs, refs, (mask[:, :first], mask[:, first:]), strict=True):
        assert_logits_equal(out, ref, m)
    # The 2-D attention_mask is read in the graph whether or not it pads anything.
    assert [(s.graph, s.mask) for s in report.sites] == [
        (0, "causal(q_offset=0)+padding"), (1, f"causal(q_offset={first})+padding")], str(report)
    assert report.sites[1].phase == "prefill"


def test_chunked_prefill_through_a_sliding_window_cache() -> None:
    """Gemma3's sliding layers keep only the last window-1 keys: keys start at a symbolic offset and
    the padding mask is read there (kept as the (B, Lk) gather, not an L x L mask)."""
    model = gemma3(window=4)
    ids, mask = batch_with_padding([1, 0], 11, "left")
    report = Report()
    outs, refs = chunked(model, ids, mask, 6, report), chunked(model, ids, mask, 6, None)
    for out, ref, m in zip(outs, refs, (mask[:, :6], mask[:, 6:]), strict=True):
        assert_logits_equal(out, ref, m)
    second = [s for s in report.sites if s.graph == 1]
    assert [s.window for s in second] == [4, None]
    assert second[0].mask.startswith("causal(q_offset=") and second[0].mask.endswith("+window=4+padding")
    assert second[1].mask == "causal(q_offset=6)+padding"
    assert report.rejected == []


# --- decode --------------------------------------------------------------------------------------


def test_decode_masks_dynamic_cache() -> None:
    model = gemma3(window=4)
    ids, mask = batch_with_padding([2, 0], 6, "left", seed=3)
    report = Report()
    tokens = generate_tokens(model, ids, mask, None, report)
    assert torch.equal(tokens, generate_tokens(model, ids, mask, None, None))
    first_decode = [(s.layer, s.mask, s.window) for s in report.sites if s.graph == 1]
    sliding, full = first_decode
    assert sliding[0] == 0 and sliding[2] == 4 and sliding[1].endswith("+window=4+padding")
    assert full == (1, "causal(q_offset=6)+padding", None)
    # The third graph has SymInt lengths; the sliding layer's cache is full (window - 1 + 1 keys).
    (s0, s1) = [s for s in report.sites if s.graph == 2]
    assert (s0.q_len, s0.kv_len, s1.q_len) == ("1", "4", "1") and not s1.kv_len.isdigit(), str(report)
    assert report.rejected == []


def test_decode_masks_static_cache() -> None:
    """The (B,1,1,Lk) bool decode mask input is key validity; a rolling sliding buffer of W slots
    adds causal(q_offset=W-1)+window=W, which hides nothing the mask shows."""
    model = gemma3(window=4)
    ids, mask = batch_with_padding([2, 0], 6, "left", seed=4)
    report = Report()
    tokens = generate_tokens(model, ids, mask, "static", report)
    assert torch.equal(tokens, generate_tokens(model, ids, mask, "static", None))
    decode = [(s.layer, s.mask, s.window, s.cache) for s in report.sites if s.phase == "decode"]
    assert decode == [(0, "causal(q_offset=3)+window=4+padding", 4, "static_sliding"),
                      (1, "full+padding", None, "static")]


def test_static_prefill_mask_input_is_kept_with_a_reason() -> None:
    """StaticCache prefill of a sliding model: generate hands the (B,1,L,L) mask in as data; nothing
    in the graph proves its structure, so it stays a tensor (exact attention) and the report says so."""
    model = mistral(window=4)
    ids, mask = batch_with_padding([0, 0], 6, "left")
    report = Report()
    assert torch.equal(generate_tokens(model, ids, mask, "static", report, new_tokens=2),
                       generate_tokens(model, ids, mask, "static", None, new_tokens=2))
    prefill = [s for s in report.sites if s.phase == "prefill"]
    assert [s.mask for s in prefill] == ["tensor"]
    assert any("mask not recognised (mask is a graph input" in r.reason for r in report.rejected), str(report)


# --- no L x L tensor survives --------------------------------------------------------------------


class ShapeRecorder(torch.fx.Interpreter):
    """Runs a graph on real inputs and records every node's tensor output shape."""

    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__(gm)
        self.shapes: dict[str, tuple[int, ...]] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.shapes[n.name] = tuple(out.shape)
        return out


def square_nodes(gm: torch.fx.GraphModule, inputs: list, length: int) -> list[str]:
    """Nodes whose value has both of its last two dims >= length."""
    recorder = ShapeRecorder(gm)
    with torch.no_grad():
        recorder.run(*inputs)
    return [name for name, shape in recorder.shapes.items() if len(shape) >= 2 and min(shape[-2:]) >= length]


def test_no_square_mask_survives_the_rewrite() -> None:
    """L exceeds every model dim (hidden 64, MLP 64, vocab 128), so only a mask can be L x L."""
    length = 136
    model = gemma3(window=8)
    ids, mask = batch_with_padding([5, 0], length, "left")
    found: dict[str, list[str]] = {}
    report = Report()

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        found["before"] = square_nodes(gm, example_inputs, length)
        gm, n_outputs, layers = rewrite_graph(gm, example_inputs, load_policy("dense"), report)
        found["after"] = square_nodes(gm, example_inputs, length)
        return with_call_records(gm.forward, n_outputs, layers, report, 0)

    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        out = torch.compile(model, backend=backend)(input_ids=ids, attention_mask=mask).logits
    assert_logits_equal(out, ref, mask)
    assert len(report.sites) == 2 and all(s.mask != "tensor" for s in report.sites)
    assert found["before"], "the check must see transformers' L x L mask before the rewrite"
    assert found["after"] == [], found["after"]


# --- an unrecognisable mask ----------------------------------------------------------------------


class WeirdMask(nn.Module):
    """RoPE'd q/k with a mask the pass cannot read: causal, or any key at an even position."""

    def __init__(self, heads: int = 2, head_dim: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.heads, self.head_dim = heads, head_dim
        self.qkv = nn.Linear(heads * head_dim, 3 * heads * head_dim, bias=False)
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        freqs = torch.arange(n).float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        half = self.head_dim // 2
        q = q * cos + torch.cat((-q[..., half:], q[..., :half]), dim=-1) * sin
        k = k * cos + torch.cat((-k[..., half:], k[..., :half]), dim=-1) * sin
        q_idx = torch.arange(n)[None, None, :, None]
        kv_idx = torch.arange(n)[None, None, None, :]
        mask = (kv_idx <= q_idx) | (kv_idx % 2 == 0)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_unrecognised_mask_is_kept_as_a_tensor() -> None:
    model = WeirdMask()
    x = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(0))
    report = Report()
    with torch.no_grad():
        ref = model(x)
        out = compile_dense(model, report)(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert [(s.rope, s.mask) for s in report.sites] == [("rotate_half", "tensor")]
    assert len(report.rejected) == 1 and report.rejected[0].reason.startswith("mask not recognised (")
    assert "kept as a tensor" in report.rejected[0].reason
