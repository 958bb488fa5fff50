"""One positive and one negative test per recogniser, on small hand-written attention modules.

Each module projects q/k/v, applies RoPE in one layout, optionally writes a KV cache and expands
GQA heads in one of the forms transformers uses, then calls SDPA. Positive cases must be found
as sites with the right facts and compile (dense policy) to the eager output; near-misses must be
left alone with a reason in the report, and still give the eager output.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparse_compile import Report
from sparse_compile.passes.sites import Candidate, SiteMatch, find_sites

B, L, H, HKV, D = 2, 9, 4, 2, 16


def rope_tables(pos: torch.Tensor, inv_freq: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (B, 1, L, R) for positions (B, L), as transformers builds them."""
    freqs = pos[:, :, None].float() * inv_freq[None, None, :]
    if layout == "interleaved":
        emb = torch.repeat_interleave(freqs, 2, dim=-1)
    else:
        emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos()[:, None], emb.sin()[:, None]


def rotate(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The rotation RoPE multiplies by sin; 'swapped' is a near-miss (the halves' signs swapped)."""
    if layout == "interleaved":
        return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    if layout == "swapped":
        return torch.cat((x[..., :half], -x[..., half:]), dim=-1)
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str, rotary_dim: int
) -> torch.Tensor:
    """RoPE on the first `rotary_dim` dims of x (all of them: full rotary)."""
    if rotary_dim == x.shape[-1]:
        return x * cos + rotate(x, layout) * sin
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((x_rot * cos + rotate(x_rot, layout) * sin, x_pass), dim=-1)


def expand_heads(x: torch.Tensor, form: str) -> torch.Tensor:
    """(B, Hkv, L, D) -> (B, H, L, D) by repeat_kv, repeat_interleave, or a near-miss tiling."""
    groups = H // x.shape[1]
    if form == "repeat_kv":
        b, hkv, n, d = x.shape
        return x[:, :, None, :, :].expand(b, hkv, groups, n, d).reshape(b, hkv * groups, n, d)
    if form == "repeat_interleave":
        return x.repeat_interleave(groups, dim=1)
    if form == "tile":
        return x.repeat(1, groups, 1, 1)
    return x


class Attention(nn.Module):
    """A configurable RoPE attention layer.

    rope: "rotate_half" | "interleaved" | "swapped" (near-miss) | "none"; rope_k: False leaves k un-rotated.
    rotary_dim: RoPE dims (< D: partial rotary; `pass_first` concatenates the pass-through dims first:
      a near-miss).
    gqa: "none" (H == Hkv) | "repeat_kv" | "repeat_interleave" | "enable_gqa" | "tile" (near-miss) |
      "keys_only" (near-miss: values are projected to H heads, keys expanded).
    cache: "none" | "dynamic" (cat with a past) | "static" (index_copy_ into a buffer) |
      "static_prefix" (buffer[:, :, :n] after index_copy_) | "sliding" (roll + write last slot, decode) |
      "copy" (near-miss: the buffer is overwritten by copy_ of the new keys).
    mask: "causal" (is_causal=True) | "none" | "arange" (a bool causal mask built from aranges).
    trig: "cos_sin" | "tables" (near-miss: cos/sin are parameters, not computed by cos()/sin()).
    """

    def __init__(self, rope: str = "rotate_half", rotary_dim: int = D, gqa: str = "repeat_kv",
                 cache: str = "none", mask: str = "causal", trig: str = "cos_sin", rope_k: bool = True,
                 pass_first: bool = False, past: int = 5, buffer_len: int = 16):
        super().__init__()
        self.rope, self.rotary_dim, self.gqa, self.cache, self.mask = rope, rotary_dim, gqa, cache, mask
        self.trig, self.rope_k, self.pass_first, self.past = trig, rope_k, pass_first, past
        self.kv_heads = H if gqa == "none" else HKV
        torch.manual_seed(0)
        self.q = nn.Linear(H * D, H * D, bias=False)
        self.k = nn.Linear(H * D, self.kv_heads * D, bias=False)
        self.v = nn.Linear(H * D, (H if gqa == "keys_only" else self.kv_heads) * D, bias=False)
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
        self.cos_table = nn.Parameter(torch.randn(1, 1, 64, rotary_dim))
        self.sin_table = nn.Parameter(torch.randn(1, 1, 64, rotary_dim))
        self.register_buffer("past_k", torch.randn(B, self.kv_heads, past, D))
        self.register_buffer("past_v", torch.randn(B, self.v.out_features // D, past, D))
        self.register_buffer("buf_k", torch.zeros(B, self.kv_heads, buffer_len, D))
        self.register_buffer("buf_v", torch.zeros(B, self.v.out_features // D, buffer_len, D))

    def rope_of(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.rope == "none":
            return x
        if self.pass_first:  # near-miss: the pass-through dims placed before the rotated ones
            r = self.rotary_dim
            x_rot, x_pass = x[..., :r], x[..., r:]
            return torch.cat((x_pass, x_rot * cos + rotate(x_rot, self.rope) * sin), dim=-1)
        return apply_rope(x, cos, sin, self.rope, self.rotary_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q(x).view(b, n, H, D).transpose(1, 2)
        k = self.k(x).view(b, n, self.kv_heads, D).transpose(1, 2)
        v = self.v(x).view(b, n, -1, D).transpose(1, 2)
        offset = self.past if self.cache == "dynamic" else 0
        pos = (torch.arange(n, device=x.device) + offset)[None].expand(b, n)
        if self.trig == "tables":
            cos, sin = self.cos_table[:, :, :n], self.sin_table[:, :, :n]
        else:
            table_layout = "interleaved" if self.rope == "interleaved" else "half"
            cos, sin = rope_tables(pos, self.inv_freq, table_layout)
        q = self.rope_of(q, cos, sin)
        if self.rope_k:
            k = self.rope_of(k, cos, sin)
        if self.cache == "dynamic":
            k = torch.cat([self.past_k, k], dim=-2)
            v = torch.cat([self.past_v, v], dim=-2)
        elif self.cache in ("static", "static_prefix"):
            where = torch.arange(n, device=x.device)
            self.buf_k.index_copy_(2, where, k)
            self.buf_v.index_copy_(2, where, v)
            k, v = self.buf_k, self.buf_v
            if self.cache == "static_prefix":
                k, v = k[:, :, :n], v[:, :, :n]
        elif self.cache == "sliding":
            new_k, new_v = self.buf_k.roll(-1, dims=-2), self.buf_v.roll(-1, dims=-2)
            index = torch.tensor([-1], device=x.device)
            new_k[:, :, index] = k
            new_v[:, :, index] = v
            self.buf_k.copy_(new_k)
            self.buf_v.copy_(new_v)
            k, v = self.buf_k, self.buf_v
        elif self.cache == "copy":
            self.buf_k[:, :, :n].copy_(k)
            self.buf_v[:, :, :n].copy_(v)
            k, v = self.buf_k[:, :, :n], self.buf_v[:, :, :n]
        gqa = self.gqa
        if gqa == "keys_only":
            k = expand_heads(k, "repeat_kv")
        elif gqa != "enable_gqa":
            k, v = expand_heads(k, gqa), expand_heads(v, gqa)
        lk = k.shape[2]
        attn_mask, causal = None, self.mask == "causal" and n > 1
        if self.mask == "arange":
            q_idx = (torch.arange(n, device=x.device) + (lk - n))[None, None, :, None]
            kv_idx = torch.arange(lk, device=x.device)[None, None, None, :]
            attn_mask = (kv_idx <= q_idx).expand(b, 1, n, lk)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal,
                                              enable_gqa=gqa == "enable_gqa")


def capture(module: nn.Module, *args: Any) -> torch.fx.GraphModule:
    """The single graph dynamo hands a backend for `module(*args)`."""
    graphs: list[torch.fx.GraphModule] = []

    def keep(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        torch.compile(module, backend=keep, fullgraph=True)(*args)
    assert len(graphs) == 1
    return graphs[0]


def compiled_and_eager(
    make: Callable[[], nn.Module], x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, Report]:
    """(compiled output, eager output, report) from two fresh copies (caches mutate in place)."""
    eager_module, compiled_module = make(), make()
    report = Report()
    compiled = torch.compile(compiled_module, backend="sparse",
                             options={"policy": "dense", "inner": "eager", "report": report})
    with torch.no_grad():
        return compiled(x), eager_module(x), report


def the_site(module: nn.Module, x: torch.Tensor) -> SiteMatch | Candidate:
    sites, rejected = find_sites(capture(module, x))
    assert len(sites) + len(rejected) == 1
    return (sites + rejected)[0]


def inputs(length: int = L) -> torch.Tensor:
    return torch.randn(B, length, H * D, generator=torch.Generator().manual_seed(1))


# --- RoPE layouts and partial rotary ---------------------------------------------------------------


@pytest.mark.parametrize("layout, rotary_dim", [("rotate_half", D), ("interleaved", D), ("rotate_half", 8),
                                                ("interleaved", 4)])
def test_rope_layouts_positive(layout: str, rotary_dim: int) -> None:
    make = lambda: Attention(rope=layout, rotary_dim=rotary_dim)
    site = the_site(make(), inputs())
    assert isinstance(site, SiteMatch), site
    assert (site.rope.layout, site.rope.rotary_dim, site.rope.head_dim) == (layout, rotary_dim, D)
    out, ref, report = compiled_and_eager(make, inputs())
    assert [(s.rope, s.rotary_dim) for s in report.sites] == [(layout, rotary_dim)]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(rope="swapped"), "query: not RoPE: no operand is rotate_half(x)"),
    (dict(rope="none"), "query: not RoPE"),
    (dict(rope_k=False), "key: not RoPE"),
    (dict(trig="tables"), "not computed from cos()/sin()"),
    (dict(rotary_dim=8, pass_first=True), "query: not RoPE: the tensor comes from"),
])
def test_rope_near_misses_are_left_alone(kwargs: dict, needle: str) -> None:
    make = lambda: Attention(**kwargs)
    site = the_site(make(), inputs())
    assert isinstance(site, Candidate) and needle in site.reason, site
    out, ref, report = compiled_and_eager(make, inputs())
    assert report.sites == [] and len(report.rejected) == 1 and needle in report.rejected[0].reason
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# --- GQA expansion forms ---------------------------------------------------------------------------


@pytest.mark.parametrize("form, kv_heads, kind", [("repeat_kv", HKV, "repeat_kv"),
                                                  ("repeat_interleave", HKV, "repeat_kv"),
                                                  ("enable_gqa", HKV, "enable_gqa"), ("none", H, "none")])
def test_gqa_forms_positive(form: str, kv_heads: int, kind: str) -> None:
    make = lambda: Attention(gqa=form)
    site = the_site(make(), inputs())
    assert isinstance(site, SiteMatch), site
    assert (site.gqa, site.num_heads, site.num_kv_heads) == (kind, H, kv_heads)
    assert tuple(site.k.meta["example_value"].shape)[1] == kv_heads  # the node gets unexpanded keys
    out, ref, report = compiled_and_eager(make, inputs())
    assert [(s.gqa, s.num_kv_heads) for s in report.sites] == [(kind, kv_heads)]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("form, needle", [("tile", "key: not RoPE"),
                                          ("keys_only", "keys and values are expanded differently")])
def test_gqa_near_misses_are_left_alone(form: str, needle: str) -> None:
    """x.repeat(1, g, 1, 1) tiles heads (h -> h % Hkv), which is not repeat_kv's grouping (h -> h // g)."""
    make = lambda: Attention(gqa=form)
    site = the_site(make(), inputs())
    assert isinstance(site, Candidate) and needle in site.reason, site
    out, ref, report = compiled_and_eager(make, inputs())
    assert report.sites == [] and needle in report.rejected[0].reason
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# --- KV-cache forms --------------------------------------------------------------------------------


@pytest.mark.parametrize("cache, length, mask, kind, kv_len", [
    ("dynamic", L, "arange", "dynamic", 5 + L),
    ("static", L, "none", "static", 16),
    ("static_prefix", L, "causal", "static", L),
    ("sliding", 1, "none", "static_sliding", 16),
])
def test_cache_forms_positive(cache: str, length: int, mask: str, kind: str, kv_len: int) -> None:
    make = lambda: Attention(cache=cache, mask=mask)
    site = the_site(make(), inputs(length))
    assert isinstance(site, SiteMatch), site
    assert site.cache == kind and site.kv_len == kv_len
    assert site.phase == ("decode" if length == 1 else "prefill")
    if cache == "dynamic":
        assert site.mask.describe() == f"causal(q_offset={5})"
    out, ref, report = compiled_and_eager(make, inputs(length))
    assert [s.cache for s in report.sites] == [kind]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_cache_near_miss_is_left_alone() -> None:
    """Keys copied into a slice of a buffer (no index_copy_, no roll): the SDPA key is a buffer read,
    not provably the RoPE'd keys, so the call is left alone."""
    make = lambda: Attention(cache="copy")
    site = the_site(make(), inputs())
    assert isinstance(site, Candidate) and "key: not RoPE" in site.reason, site
    out, ref, report = compiled_and_eager(make, inputs())
    assert report.sites == [] and "key: not RoPE" in report.rejected[0].reason
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# --- masks at the SDPA call ------------------------------------------------------------------------


@pytest.mark.parametrize("mask, describe", [("causal", "causal(q_offset=0)"), ("none", "full"),
                                            ("arange", "causal(q_offset=0)")])
def test_sdpa_mask_forms_positive(mask: str, describe: str) -> None:
    make = lambda: Attention(mask=mask)
    site = the_site(make(), inputs())
    assert isinstance(site, SiteMatch) and site.mask.describe() == describe, site
    out, ref, report = compiled_and_eager(make, inputs())
    assert [s.mask for s in report.sites] == [describe]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


class DropoutAttention(Attention):
    """Near-miss: SDPA with dropout (a training graph)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q(x).view(b, n, H, D).transpose(1, 2)
        k = self.k(x).view(b, n, self.kv_heads, D).transpose(1, 2)
        v = self.v(x).view(b, n, -1, D).transpose(1, 2)
        cos, sin = rope_tables(torch.arange(n)[None].expand(b, n), self.inv_freq, "half")
        q, k = apply_rope(q, cos, sin, "rotate_half", D), apply_rope(k, cos, sin, "rotate_half", D)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.5, is_causal=True, enable_gqa=True)


def test_dropout_is_left_alone() -> None:
    site = the_site(DropoutAttention(), inputs())
    assert isinstance(site, Candidate) and "dropout_p=0.5" in site.reason
