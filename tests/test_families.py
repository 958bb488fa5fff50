"""Family coverage of the matcher: for tiny random configs of every supported RoPE family, as
transformers 5.17 emits them under dynamo, `explain` finds exactly the RoPE attention layers, the
compiled model (dense policy) equals eager, and greedy generation gives identical tokens with a
DynamicCache and a StaticCache. Non-RoPE models (GPT-2, BERT) give zero sites and unchanged outputs.

Also the helpers other matcher tests import: `FAMILIES`, `family_config`, `build_model`, `expected_sites`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples

import sparse_compile
from sparse_compile import Report

VOCAB = 128
ATOL = 1e-5  # fp32


@dataclass(frozen=True)
class Family:
    """How to build one family's tiny config, and what the matcher must report for it.

    layout: RoPE layout; rotary_fraction: rotary_dim / head_dim; config_name: transformers class;
    gqa: the family has num_key_value_heads; head_dim_key: the config takes an explicit head_dim.
    """

    name: str
    config_name: str
    layout: str = "rotate_half"
    rotary_fraction: float = 1.0
    gqa: bool = True
    head_dim_key: bool = True


FAMILIES = {
    f.name: f
    for f in (
        Family("llama", "LlamaConfig"),
        Family("qwen2", "Qwen2Config", head_dim_key=False),
        Family("qwen3", "Qwen3Config"),
        Family("mistral", "MistralConfig"),
        Family("olmo2", "Olmo2Config", head_dim_key=False),
        Family("granite", "GraniteConfig", head_dim_key=False),
        Family("cohere", "CohereConfig", layout="interleaved", head_dim_key=False),
        Family("gpt_neox", "GPTNeoXConfig", rotary_fraction=0.5, gqa=False, head_dim_key=False),
        Family("stablelm", "StableLmConfig", rotary_fraction=0.25, head_dim_key=False),
        Family("smollm3", "SmolLM3Config", head_dim_key=False),
        Family("gemma3", "Gemma3TextConfig"),
    )
}


@dataclass(frozen=True)
class Draw:
    """The drawn shape of a tiny model."""

    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    window: int | None = None  # Mistral / Gemma3 sliding window (None: Mistral without one)
    layer_flags: tuple[bool, ...] = ()  # SmolLM3: uses RoPE; Gemma3: sliding layer


def family_config(family: Family, draw: Draw) -> Any:
    """A tiny random config of `family` with hidden size heads * head_dim and the sdpa attention."""
    cls = getattr(transformers, family.config_name)
    kw: dict[str, Any] = dict(
        vocab_size=VOCAB, hidden_size=draw.heads * draw.head_dim, intermediate_size=64,
        num_hidden_layers=draw.layers, num_attention_heads=draw.heads, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, max_position_embeddings=256, attn_implementation="sdpa",
    )
    if family.gqa:
        kw["num_key_value_heads"] = draw.kv_heads
    if family.head_dim_key:
        kw["head_dim"] = draw.head_dim
    if family.name in ("gpt_neox", "stablelm"):
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0,
                                 "partial_rotary_factor": family.rotary_fraction}
    if family.name == "mistral":
        kw["sliding_window"] = draw.window
    if family.name in ("qwen2", "qwen3"):
        kw["layer_types"] = ["full_attention"] * draw.layers
    if family.name == "smollm3":
        kw["no_rope_layers"] = [int(f) for f in draw.layer_flags]
        kw["layer_types"] = ["full_attention"] * draw.layers
    if family.name == "gemma3":
        kw["sliding_window"] = draw.window
        kw["layer_types"] = ["sliding_attention" if f else "full_attention" for f in draw.layer_flags]
        kw["query_pre_attn_scalar"] = draw.head_dim
    return cls(**kw)


def build_model(config: Any, seed: int = 0) -> torch.nn.Module:
    """The causal LM of `config` (text-only Gemma3ForCausalLM for Gemma3), random weights, eval mode."""
    torch.manual_seed(seed)
    if isinstance(config, transformers.Gemma3TextConfig):
        return transformers.Gemma3ForCausalLM(config).eval()
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@dataclass(frozen=True)
class Expected:
    """What the matcher must report for one RoPE attention layer."""

    layer: int
    rope: str
    rotary_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    window: int | None


def expected_sites(family: Family, draw: Draw) -> list[Expected]:
    """The RoPE attention layers of the drawn model, in layer order."""
    kv = draw.kv_heads if family.gqa else draw.heads
    rotary = int(draw.head_dim * family.rotary_fraction)
    out = []
    for layer in range(draw.layers):
        if family.name == "smollm3" and not draw.layer_flags[layer]:
            continue  # a NoPE layer: no RoPE, not a site
        window = None
        if family.name == "mistral":
            window = draw.window
        if family.name == "gemma3" and draw.layer_flags[layer]:
            window = draw.window
        out.append(Expected(layer, family.layout, rotary, draw.heads, kv, draw.head_dim, window))
    return out


def site_facts(report: Report) -> list[Expected]:
    return [
        Expected(s.layer, s.rope, s.rotary_dim, s.num_heads, s.num_kv_heads, s.head_dim, s.window)
        for s in report.sites
    ]


@st.composite
def draws(draw: Callable, family: Family) -> Draw:
    """Small random shapes for `family`."""
    heads = draw(st.sampled_from([2, 4]))
    kv_heads = draw(st.sampled_from([h for h in (1, 2, 4) if heads % h == 0])) if family.gqa else heads
    head_dim = draw(st.sampled_from([16, 32]))
    layers = draw(st.integers(1, 2))
    window = None
    flags: tuple[bool, ...] = ()
    if family.name == "mistral":
        window = draw(st.sampled_from([None, 3, 5, 64]))
    if family.name == "gemma3":
        window = draw(st.sampled_from([3, 5, 64]))
        flags = tuple(draw(st.lists(st.booleans(), min_size=layers, max_size=layers)))
    if family.name == "smollm3":
        layers = draw(st.integers(2, 3))
        flags = tuple(draw(st.lists(st.booleans(), min_size=layers, max_size=layers)))
    return Draw(heads, kv_heads, head_dim, layers, window, flags)


def fresh_dynamo() -> None:
    """Forget compiled code before a compile that must fill its own Report. Dynamo reuses a cached
    graph when the backends compare equal, and torch.compile's wrapper compares `options` by value:
    two Reports that are still equal (e.g. both empty) make a second compile reuse the first one's
    code, so the second Report stays empty (Hypothesis examples within one test hit this)."""
    torch._dynamo.reset()


def compile_dense(model: Any, report: Report) -> Any:
    """`torch.compile` with the sparse backend, dense policy, eager inner compiler (fresh dynamo)."""
    fresh_dynamo()
    options = {"policy": "dense", "inner": "eager", "report": report}
    return torch.compile(model, backend="sparse", options=options)


def padded_batch(
    batch: int, length: int, pad: int, side: str, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids (batch, length) and a 2-D attention mask whose last row has `pad` padded positions."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    if pad:
        if side == "left":
            mask[-1, :pad] = 0
        else:
            mask[-1, length - pad:] = 0
        ids[mask == 0] = 0
    return ids, mask


def assert_logits_equal(out: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """Compiled == eager at fp32 tolerance, compared where the query is a real token; no NaN."""
    if mask is not None:
        out, ref = out[mask.bool()], ref[mask.bool()]
    assert not torch.isnan(out).any(), "compiled logits contain NaN"
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=ATOL)


def generate_tokens(model: Any, ids: torch.Tensor, mask: torch.Tensor, cache: str | None,
                    report: Report | None, new_tokens: int = 8) -> torch.Tensor:
    """Greedy `generate`; with a report, `model.forward` is compiled with the sparse backend (the way
    transformers documents compiling generation) and restored afterwards."""
    kw: dict[str, Any] = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              disable_compile=True, attention_mask=mask, pad_token_id=0)
    if cache is not None:
        kw["cache_implementation"] = cache
    forward = model.forward
    if report is not None:
        fresh_dynamo()
        model.forward = torch.compile(
            forward, backend="sparse", options={"policy": "dense", "inner": "eager", "report": report}
        )
    try:
        with torch.no_grad():
            return model.generate(ids, **kw)
    finally:
        model.forward = forward


# --- explain + compiled logits, per family ------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FAMILIES))
@settings(max_examples=examples(3))
@given(data=st.data())
def test_matcher_finds_rope_layers_and_compiled_equals_eager(name: str, data: st.DataObject) -> None:
    family = FAMILIES[name]
    shape = data.draw(draws(family), label="shape")
    batch = data.draw(st.integers(1, 2), label="batch")
    length = data.draw(st.integers(3, 12), label="length")
    pad = data.draw(st.integers(0, length - 1), label="pad") if batch > 1 else 0
    side = data.draw(st.sampled_from(["left", "right"]), label="side")
    model = build_model(family_config(family, shape))
    ids, mask = padded_batch(batch, length, pad, side)

    report = sparse_compile.explain(model, input_ids=ids, attention_mask=mask)
    expected = expected_sites(family, shape)
    assert site_facts(report) == expected, str(report)
    assert all(s.phase == "prefill" for s in report.sites)
    assert all(s.mask != "tensor" for s in report.sites), str(report)
    rope_layers = {e.layer for e in expected}
    nope_layers = [i for i in range(shape.layers) if i not in rope_layers]
    assert sorted(r.layer for r in report.rejected) == nope_layers
    assert all("not RoPE" in r.reason for r in report.rejected), str(report)

    compiled_report = Report()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        out = compile_dense(model, compiled_report)(input_ids=ids, attention_mask=mask).logits
    assert len(compiled_report.sites) == len(expected)
    assert_logits_equal(out, ref, mask)


# --- generation with DynamicCache and StaticCache, per family --------------------------------------


@pytest.mark.parametrize("cache", [None, "static"], ids=["dynamic", "static"])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_generate_tokens_equal_eager(name: str, cache: str | None) -> None:
    family = FAMILIES[name]
    # One layer (tracing time grows with depth), two where layers differ: RoPE/NoPE, sliding/full.
    flags = {"smollm3": (True, False), "gemma3": (True, False)}.get(name, ())
    kv_heads = 2 if family.gqa else 4
    shape = Draw(4, kv_heads, 16, layers=max(1, len(flags)), window=4, layer_flags=flags)
    model = build_model(family_config(family, shape))
    ids, mask = padded_batch(2, 7, 2, "left", seed=1)
    ref = generate_tokens(model, ids, mask, cache, None)
    report = Report()
    out = generate_tokens(model, ids, mask, cache, report)
    assert torch.equal(out, ref), (out, ref)
    n_rope = len(expected_sites(family, shape))
    phases = [g.phase for g in report.graphs]
    assert phases[0] == "prefill" and phases[-1] == "decode", str(report)
    assert len(report.graphs) == (3 if cache is None else 2), str(report)
    decode = [s for s in report.sites if s.phase == "decode"]
    assert len(decode) == n_rope * (len(report.graphs) - 1), str(report)
    assert {s.cache for s in decode} <= ({"dynamic"} if cache is None else {"static", "static_sliding"})
    # Decode masks are structure (never a kept tensor), sliding layers keep their window.
    assert all(s.mask != "tensor" for s in decode), str(report)
    windows = {e.layer: e.window for e in expected_sites(family, shape)}
    assert all(s.window == windows[s.layer] for s in decode), str(report)


# --- dynamic shapes ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_three_prompt_lengths_compile_twice(name: str) -> None:
    """A second prompt length makes dynamo recompile with SymInt lengths; the third reuses it."""
    family = FAMILIES[name]
    shape = Draw(4, 2, 16, 2, window=4, layer_flags=(True, False))
    model = build_model(family_config(family, shape))
    report = Report()
    calls: list[int] = []
    from sparse_compile.compiler import sparse_backend

    def counting(gm: torch.fx.GraphModule, example_inputs: list, **kw: Any) -> Callable:
        calls.append(len(example_inputs))
        options = {"policy": "dense", "inner": "eager", "report": report}
        return sparse_backend(gm, example_inputs, options=options)

    compiled = torch.compile(model, backend=counting)
    with torch.no_grad():
        for length in (5, 8, 11):
            ids, _ = padded_batch(1, length, 0, "left", seed=length)
            assert_logits_equal(compiled(input_ids=ids).logits, model(input_ids=ids).logits)
    assert len(calls) == 2 and len(report.graphs) == 2
    symbolic = [s for s in report.sites if s.graph == 1]
    assert len(symbolic) == 2 and all(not s.q_len.isdigit() for s in symbolic), str(report)


# --- non-RoPE models -----------------------------------------------------------------------------


def non_rope_models() -> dict[str, tuple[torch.nn.Module, Callable[[Any], torch.Tensor]]]:
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, attn_implementation="sdpa",
        bos_token_id=1, eos_token_id=2)).eval()
    bert = transformers.BertModel(transformers.BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=VOCAB,
        attn_implementation="sdpa")).eval()
    return {"gpt2": (gpt2, lambda o: o.logits), "bert": (bert, lambda o: o.last_hidden_state)}


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_non_rope_models_have_no_sites(name: str) -> None:
    model, pick = non_rope_models()[name]
    ids, mask = padded_batch(2, 9, 3, "right")
    explained = sparse_compile.explain(model, input_ids=ids, attention_mask=mask)
    assert explained.sites == []
    assert sorted(r.layer for r in explained.rejected) == [0, 1]
    assert all("not RoPE" in r.reason for r in explained.rejected), str(explained)
    report = Report()
    with torch.no_grad():
        ref = pick(model(input_ids=ids, attention_mask=mask))
        out = pick(compile_dense(model, report)(input_ids=ids, attention_mask=mask))
    assert report.sites == [] and len(report.rejected) == 2
    assert_logits_equal(out, ref, mask)


# --- the default (Inductor) inner compiler, once ------------------------------------------------


def test_inductor_inner_compiler_partial_rotary_with_padding() -> None:
    """GPT-NeoX (fused qkv split, partial rotary, no GQA) through Inductor, B=2 with left padding."""
    family = FAMILIES["gpt_neox"]
    model = build_model(family_config(family, Draw(4, 4, 16, 2)))
    ids, mask = padded_batch(2, 10, 3, "left")
    report = Report()
    compiled = torch.compile(model, backend="sparse", options={"policy": "dense", "report": report})
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        out = compiled(input_ids=ids, attention_mask=mask).logits
    assert [(s.layer, s.rotary_dim, s.mask) for s in report.sites] == [
        (0, 8, "causal(q_offset=0)+padding"), (1, 8, "causal(q_offset=0)+padding")]
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], atol=1e-4, rtol=1e-4)


def test_expected_sites_table_is_consistent() -> None:
    """The expectation table itself: partial rotary dims and NoPE / sliding layers."""
    assert expected_sites(FAMILIES["gpt_neox"], Draw(4, 4, 32, 1))[0].rotary_dim == 16
    assert expected_sites(FAMILIES["stablelm"], Draw(4, 2, 32, 1))[0].rotary_dim == 8
    smol = expected_sites(FAMILIES["smollm3"], Draw(2, 1, 16, 3, layer_flags=(True, False, True)))
    assert [e.layer for e in smol] == [0, 2]
    gemma = expected_sites(FAMILIES["gemma3"], Draw(2, 1, 16, 2, window=5, layer_flags=(True, False)))
    assert [e.window for e in gemma] == [5, None]
    assert math.isclose(FAMILIES["cohere"].rotary_fraction, 1.0)
    assert FAMILIES["cohere"].layout == "interleaved"
