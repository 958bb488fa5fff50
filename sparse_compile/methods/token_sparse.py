"""Token Sparse Attention (`token_sparse`): compress, attend, decompress (arXiv 2602.03216;
shared/specs/token_sparse.md; kernels and references in sparse_compile.kernels.token_sparse).

Per layer and head, Dynamic Token Coverage keeps the tokens that carry all but `dropped_mass` of the
attention mass of the last `recent` queries (at least `min_keep` prefix tokens, plus the recent ones);
their Q/K/V rows are gathered into dense buffers, attention runs on the compressed sequence (causal
there = causal on the original positions), and the output is scattered back with zeros for the dropped
tokens, whose residual stream passes through the layer unchanged. A token dropped in one layer can be
kept in the next: nothing is evicted, and the KV cache stays full (decode is dense).

Attention on the compressed sequence: exact (the dense method: cuDNN/flash SDPA on CUDA when every batch
row keeps the same count) or, stacked, any registered block-sparse prefill method (`inner = "prism"` or
`"pbs"`, with its own parameters in `[prefill.params.inner_params]`), run through the registry on the
compressed tensors; when the inner method declines the compressed call, exact attention runs.

density (the node's (B, H) output): the kept fraction (kept tokens / valid tokens of the row; every head
of a row keeps as many tokens) times the inner method's density on the compressed sequence (1.0 alone).
So alone it is the kept fraction, stacked it is the issue's "total work" proxy (kept x block density).

Batch > 1 and left padding: padded tokens are never kept; counts differ per row, so the buffers are sized
by the largest count, read with one host sync per call (not one per row), and the compressed call gets a
key_valid of the slots below each row's count. Not supported (exact attention, reason in the Report):
chunked prefill and decode (q_len != kv_len: tokens are chosen over a whole prompt), sliding windows and
non-causal masks (a window on original positions is not a window on the compressed sequence), prompts of
at most min_keep + recent tokens and dropped_mass 0 (dense, as the authors), layers outside `layers`,
head_dim > 256 or float64 on CUDA.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sparse_compile.attention_mask import AttentionMask, SiteFacts
from sparse_compile.kernels.limits import KERNEL_DTYPES, MAX_HEAD_DIM
from sparse_compile.kernels.token_sparse import TokenSelection, gather_qkv, scatter_rows, select_tokens
from sparse_compile.layers import parse_layers
from sparse_compile.method import BenchCase, CallShape, Knob, Method
from sparse_compile.methods import METHODS
from sparse_compile.params import MethodParams, PolicyError, param, params_from_mapping, show

NAME = "token_sparse"


@functools.lru_cache(maxsize=256)
def _layer_set(layers: tuple, where: str):
    """The LayerSet of a `layers` value (memoised: `unsupported` asks at every call)."""
    return parse_layers(list(layers), where)


@dataclass(frozen=True)
class TokenSparseParams(MethodParams):
    """Token Sparse Attention's parameters (policy table `[prefill.params]`)."""

    dropped_mass: float = param(0.005, range=(0.0, 1.0),
                                help="attention mass (of the head-mean scores) that may be dropped per layer; "
                                     "0: dense (the authors' 'coverage', default 0.005)")
    min_keep: int = param(1024, range=(0, 1 << 30), help="prefix tokens kept at least, per head")
    recent: int = param(128, range=(1, 1 << 20),
                        help="last queries that score the prefix keys; always kept")
    smooth: int = param(7, range=(1, 1023), help="odd width of the average pooling of the scores (1: none)")
    layers: tuple | None = param(None, type=(list, tuple),
                                 help="layers that run token_sparse (ints and 'a-b' ranges); the others run "
                                      "exact attention; default: every layer")
    inner: str | None = param(None, type=str,
                              help="prefill method run on the compressed sequence (e.g. 'prism', 'pbs'); "
                                   "default: exact attention")
    inner_params: Any = param(None, type=object, help="the inner method's parameters (a sub-table)")

    def __post_init__(self) -> None:
        super().__post_init__()
        where = "TokenSparseParams"
        if self.smooth % 2 == 0:
            raise PolicyError(f"{where}: key 'smooth' = {self.smooth} must be odd (same-length pooling)")
        if self.layers is not None:
            layer_set = _layer_set(tuple(self.layers), where)
            object.__setattr__(self, "layers", tuple(layer_set.to_list()))
        if self.inner is not None:
            allowed = [m for m, meth in METHODS.items() if "prefill" in meth.phases and m != NAME]
            if self.inner not in allowed:
                raise PolicyError(f"{where}: key 'inner' = {show(self.inner)} is not allowed; allowed: "
                                  f"{', '.join(allowed)}")
            cls = METHODS[self.inner].Params
            raw = self.inner_params
            if raw is None:
                value = cls()
            elif isinstance(raw, cls):
                value = raw
            elif isinstance(raw, Mapping):
                value = params_from_mapping(cls, raw, f"{where}: inner_params ({self.inner})")
            else:
                raise PolicyError(f"{where}: key 'inner_params' must be a table of {self.inner}'s parameters, "
                                  f"got {type(raw).__name__}")
            object.__setattr__(self, "inner_params", value)
        elif self.inner_params is not None:
            raise PolicyError(f"{where}: key 'inner_params' is given without 'inner'; name the inner method")

    def runs_on(self, layer: int) -> bool:
        return self.layers is None or layer in _layer_set(self.layers, "TokenSparseParams")


Params = TokenSparseParams


def unsupported(call: Any, site: SiteFacts, params: TokenSparseParams) -> str | None:
    """Why token_sparse does not run this call (the node then runs exact attention), or None."""
    if not params.runs_on(site.layer):
        return f"layer {site.layer} is not in layers {list(params.layers)}"
    if call.q_len != call.kv_len:
        return f"q_len {call.q_len} != kv_len {call.kv_len} (chunked prefill: tokens are chosen over a whole prompt)"
    if not call.causal:
        return "the mask is not causal"
    if call.window:
        return f"sliding window {call.window} (a window on original positions is not one on the compressed sequence)"
    if call.q_len <= params.min_keep + params.recent:
        return f"q_len {call.q_len} <= min_keep + recent = {params.min_keep + params.recent} (dense, as the authors)"
    if params.dropped_mass == 0.0:
        return "dropped_mass = 0 (dense)"
    if call.device_type == "cuda" and call.head_dim > MAX_HEAD_DIM:
        return f"head_dim {call.head_dim} > {MAX_HEAD_DIM}"
    if call.device_type == "cuda" and call.dtype not in KERNEL_DTYPES:
        return f"dtype {call.dtype} on CUDA (float16, bfloat16 or float32)"
    return None


def token_select(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, site: SiteFacts, params: TokenSparseParams,
                 scale: float | None = None, *, impl: str = "auto") -> TokenSelection:
    """Steps 1-4 (kernels/token_sparse.py) for one call: the kept tokens per head."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return select_tokens(q, k, key_valid=mask.key_valid, scale=scale, dropped_mass=params.dropped_mass,
                         min_keep=params.min_keep, recent=params.recent, smooth=params.smooth, impl=impl)


def attend_compressed(qc: Tensor, kc: Tensor, vc: Tensor, sel: TokenSelection, site: SiteFacts,
                      params: TokenSparseParams, scale: float) -> tuple[Tensor, Tensor]:
    """Step 6: causal attention on the compressed sequence, by the inner method or exactly.

    qc, kc, vc: (B, H, Lc, D). Returns (oc (B, H, Lc, D), inner density (B, H) float32)."""
    B, H, Lc, D = qc.shape
    key_valid = None
    if any(n != Lc for n in sel.kept_host):
        key_valid = torch.arange(Lc, device=qc.device)[None, :] < sel.kept[:, None]
    mask = AttentionMask(causal=True, q_offset=0, window=0, key_valid=key_valid)
    site_c = dataclasses.replace(site, num_kv_heads=H)
    method, inner_params = METHODS["dense"], METHODS["dense"].Params()
    if params.inner is not None and params.inner != "dense":
        inner = METHODS[params.inner]
        call = CallShape(B, H, H, Lc, Lc, D, qc.dtype, qc.device.type, 0, True)
        if inner.unsupported is None or not inner.unsupported(call, site_c, params.inner_params):
            method, inner_params = inner, params.inner_params
    return method.attention(qc, kc, vc, mask, site_c, inner_params, scale)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, site: SiteFacts, params: TokenSparseParams,
              scale: float | None = None, *, impl: str = "auto") -> tuple[Tensor, Tensor]:
    """Token Sparse prefill. q: (B, H, L, D); k, v: (B, Hkv, L, D) post-RoPE (calls `unsupported` accepts:
    q_len == kv_len, causal, no window). Returns (out (B, H, L, D) in q's dtype with zero rows for dropped
    tokens, density (B, H, 3) float32: [kept fraction x inner density, kept fraction, inner density on the
    compressed sequence (1 alone)]). impl: kernels' "auto"/"triton"/"reference"."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    sel = token_select(q, k, v, mask, site, params, scale, impl=impl)
    if sel.drops_nothing() or not sel.idx.shape[2]:  # exact attention on every row (or nothing kept: every row
        # is padding, which exact attention also returns as zeros): skip the copies
        out, _ = METHODS["dense"].attention(q, k, v, mask, site, METHODS["dense"].Params(), scale)
        return out, torch.ones(q.shape[0], q.shape[1], 3, dtype=torch.float32, device=q.device)
    qc, kc, vc = gather_qkv(q, k, v, sel.idx, impl=impl)
    oc, inner_density = attend_compressed(qc, kc, vc, sel, site, params, scale)
    out = scatter_rows(oc.contiguous(), sel.inv, impl=impl)
    kept, inner = sel.kept_fraction().float(), inner_density.float()
    return out, torch.stack([kept * inner, kept, inner], dim=-1)


METHOD = Method(
    name=NAME,
    phases=("prefill",),
    Params=TokenSparseParams,
    attention=attention,
    unsupported=unsupported,
    # no `select`: the protocol's select returns block lists (benchmarks build Flex masks from them); the
    # kept tokens are `token_select(...)`, a TokenSelection
    # the kept counts size the compressed buffers (one host sync per call): not captured in CUDA graphs
    capturable_phases=(),
    density_parts=("kept", "inner"),
    summary="per-head token coverage -> gather Q/K/V, attend on the compressed sequence (optionally stacked "
            "on a block method), scatter with zeros (Token Sparse Attention)",
    bench_cases=(BenchCase("prefill"), BenchCase("prefill", "tau0.05", (("dropped_mass", 0.05),)),
                 BenchCase("prefill", "prism", (("inner", "prism"),))),
    knobs=(Knob(("layers",), "drift_layers", "prefill"),),
)
