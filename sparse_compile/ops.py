"""The fused attention node: one custom op, `torch.ops.sparse_compile.attention`.

Its arguments name everything that will run, so a printed graph shows it:

    attention(q, k, v, key_valid, dense_mask, scale, causal, q_offset, window, config)
      q: (B, H, Lq, D) post-RoPE queries (float16/bfloat16/float32)
      k, v: (B, Hkv, Lk, D) keys/values after the cache update, *before* GQA expansion
      key_valid: (B, Lk) bool or None — padding (False = never attend)
      dense_mask: a mask the pass could not prove, broadcastable to (B, H, Lq, Lk), or None
      scale: softmax scale; causal/q_offset/window: see sparse_compile.attention_mask
      config: canonical JSON {"method", "params", "min_seq_len", "site"} (see `node_config`)
    returns (out (B, H, Lq, Dv) in q's dtype, density (B, H) float32: fraction of the
    causally allowed key blocks that were computed; 1.0 for exact attention)

CPU runs each method's pure-PyTorch reference; CUDA runs its Triton kernels.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import torch

from sparse_compile.attention_mask import AttentionMask, SiteFacts
from sparse_compile.params import canonical_json, params_from_mapping, params_to_dict


def node_config(method: str, params: Any, min_seq_len: int, site: SiteFacts) -> str:
    """The op's `config` argument for one site."""
    from dataclasses import asdict

    return canonical_json(
        {"method": method, "params": params_to_dict(params), "min_seq_len": min_seq_len, "site": asdict(site)}
    )


@functools.lru_cache(maxsize=1024)
def parse_config(config: str) -> tuple[Any, Any, int, SiteFacts]:
    """(method module, params, min_seq_len, site) from the op's JSON config (memoised: pure)."""
    from sparse_compile.methods import METHODS

    data = json.loads(config)
    module = METHODS[data["method"]]
    params = params_from_mapping(module.Params, data["params"], f"op config of method {data['method']!r}")
    return module, params, int(data["min_seq_len"]), SiteFacts(**data["site"])


def check_inputs(q, k, v, key_valid) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D (B, H, L, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"batch/heads/length mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"num_heads {q.shape[1]} is not a multiple of num_kv_heads {k.shape[1]}")
    if key_valid is not None and tuple(key_valid.shape) != (k.shape[0], k.shape[2]):
        raise ValueError(f"key_valid must be (B, Lk) = {(k.shape[0], k.shape[2])}, got {tuple(key_valid.shape)}")


@torch.library.custom_op("sparse_compile::attention", mutates_args=())
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_valid: torch.Tensor | None,
    dense_mask: torch.Tensor | None,
    scale: float,
    causal: bool,
    q_offset: int,
    window: int,
    config: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    check_inputs(q, k, v, key_valid)
    module, params, min_seq_len, site = parse_config(config)
    mask = AttentionMask(
        causal=causal, q_offset=q_offset, window=window,
        key_valid=None if key_valid is None else key_valid.to(torch.bool), dense_mask=dense_mask,
    )
    if k.shape[2] < min_seq_len or dense_mask is not None:
        from sparse_compile.methods import dense

        module, params = dense, dense.Params()
    out, density = module.attention(q, k, v, mask, site, params, scale)
    return out.contiguous(), density


@attention.register_fake
def _(q, k, v, key_valid, dense_mask, scale, causal, q_offset, window, config):
    B, H, Lq, _ = q.shape
    return q.new_empty((B, H, Lq, v.shape[-1])), q.new_empty((B, H), dtype=torch.float32)
