"""SparseCache: a StaticCache-shaped KV cache that also keeps what decode selection reads.

The user creates it and passes it where a `transformers.StaticCache` goes (shared/DESIGN.md, "the project
may own a KV cache"); nothing in transformers is patched, and with a plain Dynamic/StaticCache every method
still runs:

    cache = SparseCache(model, max_cache_len=8192, policy="fasa", page_size=32)
    cache.set_padding(inputs.attention_mask)      # only for left-padded batches (see "Padding")
    model.generate(**inputs, **cache_kwargs(model, cache), max_new_tokens=256)
    # cache_kwargs: `cache=` on transformers that renamed `past_key_values` (5.25 warns), `past_key_values=` before

Per full-attention layer, beside K and V (B, Hkv, max_cache_len, D) as StaticLayer keeps them:

  key_dims   (B, Hkv, max_cache_len, n)  K's dominant dims of each KV head, stored contiguously: `dims[g]`
             (Hkv, n) int64 lists them per KV head. For a layer the policy's decode method runs FASA on, the
             dims are the ones FASA scores (methods/fasa.py `layer_chunks` -> kernels/fasa.py `chunk_dims`),
             unioned over the query heads of each KV head's group and padded to one count n by repeating
             the group's first dim (`member` (H, n) float32 says which column belongs to which query head: 0
             on the padding). Absent (None) where FASA does not run, where the union is every dim (the copy
             would be K itself) and with `dims_copy=False`: the node then reads K, and the layer keeps only the
             tables dims (Hkv, D) = 0..D-1 and member (H, D) (`full_dim_tables`, a few KB), so that the node
             gets them as graph inputs instead of copying them to the device at every call.
  page_min, page_max  (B, Hkv, n_pages, D), n_pages = ceil(max_cache_len / P): per page of P consecutive
             slots, the element-wise min / max of its keys over the head dim (Quest, specs/quest_pages.md),
             in K's dtype. A page (or part of one) with no valid key written holds +inf / -inf, the neutral
             elements of min / max. Kept on the layers a selection reads: FASA layers and LessIsMore's
             selection layers.
  key_valid  (B, max_cache_len) bool: False at slots `set_padding` marked as padding.

`update` writes all of it in one call, with tensor ops only (index_copy_ for K/V and the dims,
scatter_reduce_ amin/amax for the pages), no host synchronisation and no data-dependent shapes: dynamo traces
it into the decode graph and CUDA graphs capture it. The dims and pages are written by one custom op,
`torch.ops.sparse_compile.cache_update`, so the compiled graph holds one node per layer naming the buffers and
the new keys: what a graph pass matches to hand the buffers to the attention node. Prefill writes many slots,
decode one, chunked prefill a chunk; each write merges into the pages it touches (include_self), so the summary
of a partial page grows as tokens arrive. K and V are written exactly as StaticLayer writes them
(`keys.index_copy_(2, pos, k)`), so the graph pass recognises the cache as a StaticCache.

Padding. `update` is not told the attention mask, so the cache cannot see which slots are left padding.
`set_padding(attention_mask)` (B, L0) marks them; padded slots then enter neither min nor max (their K/V and
dims are still written, as StaticCache writes them: attention masks them). Without it, padded keys count in
their page's summary: the bound stays an upper bound for the real keys, only looser on the one page per row
that mixes padding and text (all-padding pages are invisible to the query and never selected).

Memory, per layer with both parts (s = bytes per element of K, L = max_cache_len):
    K + V     2 * B * Hkv * L * D * s
    extra     B * Hkv * L * n * s  +  2 * B * Hkv * ceil(L / P) * D * s  (+ B * L bytes of key_valid)
    ratio     extra / (K + V) = n / (2 D) + 1 / P
`kv_bytes()` and `extra_bytes()` report the allocated totals.

Tensor parallelism: buffers are allocated on the first `update` from the key tensor's shape (as StaticLayer
does), so a rank holding Hkv / tp KV heads allocates that many; per-head dims tables are sliced from
`kv_head_offset` (the global index of the rank's first KV head).
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import (
    Cache,
    DynamicCache,
    StaticCache,
    StaticLayer,
    StaticSlidingWindowLayer,
    get_layer_types_and_kwargs,
)

from sparse_compile.kernels.fasa import chunk_dims
from sparse_compile.kernels.page_summary import update_page_summaries, update_page_summaries_reference
from sparse_compile.layers import in_layers
from sparse_compile.methods import fasa, lessismore
from sparse_compile.policy import Policy, load_policy

PAGE_SIZES = (16, 32, 64)  # allowed page sizes: the selection kernels tile pages by powers of two
CACHE_FORMS = "static, dynamic, sparse[16|32|64][-pages]"  # the forms `cache_form` parses
INTERLEAVED_FAMILIES = ("cohere", "cohere2", "gptj")  # model types whose RoPE pairs (2i, 2i + 1)


def cache_argument(model: Any) -> str:
    """The keyword this transformers' model (or model class) takes its KV cache by: "cache" (newer transformers
    renamed it; 5.25 warns that `past_key_values` goes away) or "past_key_values" (5.17 and before). Read from the
    model class's forward signature (of the module a torch.compile wrapper holds), so a compiled `model.forward`
    does not hide it."""
    import inspect

    model = getattr(model, "_orig_mod", model)  # a torch.compile'd module: the model it wraps
    forward = (model if isinstance(model, type) else type(model)).forward  # a model or its class
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def cache_kwargs(model: Any, cache: Cache | None) -> dict[str, Any]:
    """{keyword: cache} for `model(...)` and `model.generate(...)` under either name (`cache_argument`):
    `model.generate(**inputs, **sparse_compile.cache_kwargs(model, cache))` runs warning-free on old and new
    transformers."""
    return {cache_argument(model): cache}


def returned_cache(output: Any) -> Cache | None:
    """The cache a forward call returned: `output.cache` (newer transformers) or `output.past_key_values`."""
    fields = getattr(output, "__dataclass_fields__", {})
    return output.cache if "cache" in fields else output.past_key_values


def _compiling() -> bool:
    return bool(torch.compiler.is_compiling())


# ---------------------------------------------------------------------------------------------
# what each layer stores: derived from the policy
# ---------------------------------------------------------------------------------------------


def model_facts(config: Any) -> dict[str, Any]:
    """num_layers, num_heads, num_kv_heads, head_dim, rotary_dim, layout of a (text) config."""
    H = config.num_attention_heads
    Hkv = getattr(config, "num_key_value_heads", None) or H
    D = getattr(config, "head_dim", None) or config.hidden_size // H
    factor = getattr(config, "partial_rotary_factor", None)
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if factor is None and isinstance(rope, dict):
        factor = rope.get("partial_rotary_factor")
    rotary = int(D * (1.0 if factor is None else factor))
    layout = "interleaved" if getattr(config, "model_type", "") in INTERLEAVED_FAMILIES else "rotate_half"
    return {"num_layers": config.num_hidden_layers, "num_heads": H, "num_kv_heads": Hkv, "head_dim": D,
            "rotary_dim": rotary, "layout": layout}


def query_head_dims(per_head: tuple[tuple[int, ...], ...], facts: dict[str, Any]) -> list[tuple[int, ...]]:
    """The dim tuple of each of the H query heads from per_head: one tuple per query head (len H), per KV head
    (len Hkv: its group's heads share it) or one for all (len 1)."""
    H, Hkv = facts["num_heads"], facts["num_kv_heads"]
    group = H // Hkv
    return [per_head[0 if len(per_head) == 1 else (h if len(per_head) == H else h // group)] for h in range(H)]


def kv_head_dims(per_head: tuple[tuple[int, ...], ...], facts: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """(dims (Hkv, n) int64, member (H, n) float32) from one layer's per-head dim tuples.

    per_head: a dim tuple per query head (len H), per KV head (len Hkv) or one for all (len 1). dims[g] is
    the sorted union of the dims of KV head g's query heads, padded to the longest union by repeating its
    first dim; member[h, j] = 1 iff dims[h // group, j] is one of h's dims (0 on the padding)."""
    H, Hkv = facts["num_heads"], facts["num_kv_heads"]
    group = H // Hkv
    own = query_head_dims(per_head, facts)
    unions = [sorted({d for h in range(g * group, (g + 1) * group) for d in own[h]}) for g in range(Hkv)]
    n = max(len(u) for u in unions)
    dims = torch.tensor([u + [u[0]] * (n - len(u)) for u in unions], dtype=torch.int64)
    member = torch.zeros(H, n, dtype=torch.float32)
    for h in range(H):
        wanted = set(own[h])
        for j, d in enumerate(unions[h // group]):
            member[h, j] = float(d in wanted)
    return dims, member


def full_dim_tables(per_head: tuple[tuple[int, ...], ...], facts: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """(dims (Hkv, D) int64, member (H, D) float32) of a layer that keeps no dims copy: dims[g] = 0..D-1 (the node
    scores K's own rows) and member[h, d] = 1 iff d is one of query head h's dims (per_head as `kv_head_dims`).
    Kept by the layer so that the decode node reads them as graph inputs instead of building them per call."""
    H, Hkv, D = facts["num_heads"], facts["num_kv_heads"], facts["head_dim"]
    member = torch.zeros(H, D, dtype=torch.float32)
    for h, own in enumerate(query_head_dims(per_head, facts)):
        member[h, list(own)] = 1.0
    return torch.arange(D, dtype=torch.int64).repeat(Hkv, 1), member


def layer_tables(per_head: tuple[tuple[int, ...], ...] | None, facts: dict[str, Any],
                 dims_copy: bool) -> tuple[Tensor | None, Tensor | None, bool]:
    """(dims, member, keep a dims copy) of one layer: `kv_head_dims` with a copy of K's dominant dims where the
    layer asks for one and the union is fewer than all D dims, else `full_dim_tables` (the node reads K);
    (None, None, False) where FASA does not run the layer."""
    if per_head is None:
        return None, None, False
    if dims_copy:
        dims, member = kv_head_dims(per_head, facts)
        if dims.shape[1] < facts["head_dim"]:
            return dims, member, True
    dims, member = full_dim_tables(per_head, facts)
    return dims, member, False


def check_dims(dims: Any, facts: dict[str, Any], where: str) -> tuple[tuple[int, ...], ...]:
    """Validate user dims (a list of head dims, or one list per query head / KV head) as per-head tuples."""
    D, H, Hkv = facts["head_dim"], facts["num_heads"], facts["num_kv_heads"]
    lists = dims if dims and isinstance(dims[0], (list, tuple)) else [dims]
    if len(lists) not in (1, H, Hkv):
        raise ValueError(f"{where}: {len(lists)} dim lists; expected 1, {Hkv} (KV heads) or {H} (query heads)")
    out = []
    for i, row in enumerate(lists):
        row = tuple(row)
        if not row:
            raise ValueError(f"{where}: dim list {i} is empty")
        bad = [d for d in row if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d < D]
        if bad:
            raise ValueError(f"{where}: dims {bad} are not head dims: each must be an int in [0, head_dim = {D})")
        if len(set(row)) != len(row):
            raise ValueError(f"{where}: dim list {i} repeats a dim: {list(row)}")
        if len(row) >= D:
            raise ValueError(f"{where}: dim list {i} names {len(row)} dims >= head_dim = {D}: the copy would be K "
                             f"itself (omit dims to read K)")
        out.append(row)
    return tuple(out)


def fasa_head_dims(params: Any, layer: int, facts: dict[str, Any]) -> tuple[tuple[int, ...], ...] | None:
    """The head dims FASA scores on one layer, one tuple per listed head (methods/fasa.py `layer_chunks` ->
    kernels/fasa.py `chunk_dims`), or None where FASA does not run the layer (mismatch = "dense")."""
    chunks, _ = fasa.layer_chunks(params, layer, facts["num_heads"], facts["num_kv_heads"],
                                  facts["head_dim"], min(facts["rotary_dim"], facts["head_dim"]))
    if chunks is None:
        return None
    return tuple(tuple(d for c in head for d in chunk_dims(c, facts["layout"], facts["rotary_dim"], facts["head_dim"]))
                 for head in chunks)


def layer_plan(policy: Policy, layer: int, facts: dict[str, Any], dims: Any) -> tuple[tuple | None, bool]:
    """(per-head dim tuples or None, keep page summaries) for one layer under the policy's decode phase."""
    method, params = policy.decode.for_layer(layer)
    if method == "fasa" and not in_layers(layer, params.dense_layers):
        if dims is not None:
            per_layer = dims.get(layer) if isinstance(dims, dict) else dims
            if per_layer is None:
                raise ValueError(f"SparseCache: dims given per layer but none for FASA layer {layer}")
            return check_dims(per_layer, facts, f"SparseCache: dims of layer {layer}"), True
        per_head = fasa_head_dims(params, layer, facts)
        return per_head, per_head is not None
    if method == "lessismore":
        return None, lessismore.selection_role(layer, facts["num_layers"], params) == "select"
    return None, False


# ---------------------------------------------------------------------------------------------
# the write of the extras: one custom op, so a graph pass finds a site's buffers by op identity
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("sparse_compile::cache_update", mutates_args=("key_dims", "page_min", "page_max"))
def cache_update(key_dims: Tensor | None, page_min: Tensor | None, page_max: Tensor | None, key_valid: Tensor,
                 dims: Tensor | None, pos: Tensor, k: Tensor, page_size: int, member: Tensor | None = None) -> None:
    """Write the dims copy and merge the page summaries of n new keys, in place.

    key_dims: (B, Hkv, L, n) or None; page_min, page_max: (B, Hkv, NP, D) or None (both or neither);
    key_valid: (B, L) bool; dims: (Hkv, n) int64 (with key_dims); pos: (n_new,) int64 consecutive slots (every
    SparseLayer write is); k: (B, Hkv, n_new, D) the new keys; page_size: P; member: (H, n) float32 (with
    key_dims; not read here: an argument so that the graph names it for the attention node, which scores query
    head h on its own dims).
    key_dims[:, g, pos, j] = k[:, g, :, dims[g, j]]; page_min / page_max of the pages pos // P take the
    element-wise min / max with the new keys whose slot is valid (include_self).
    index_copy_ for the dims; the pages by kernels/page_summary.py (one Triton launch on CUDA, scatter_reduce_
    elsewhere): no host sync. In a compiled graph the call is one node
    whose arguments name the layer's buffers and the new keys (the same k_new StaticLayer's index_copy_
    writes into `keys`): DECODE_NOTES.md, "Wiring the node to the cache"."""
    B, Hkv, n, D = k.shape
    if key_dims is not None and dims is not None:
        key_dims.index_copy_(2, pos, k.gather(3, dims[None, :, None, :].expand(B, Hkv, n, dims.shape[1])))
    if page_min is not None and page_max is not None:
        if k.is_cuda:  # one Triton launch instead of five (kernels/page_summary.py)
            update_page_summaries(page_min, page_max, key_valid, pos, k, page_size)
        else:
            update_page_summaries_reference(page_min, page_max, key_valid, pos, k, page_size)


@cache_update.register_fake
def _cache_update_fake(key_dims: Tensor | None, page_min: Tensor | None, page_max: Tensor | None, key_valid: Tensor,
                       dims: Tensor | None, pos: Tensor, k: Tensor, page_size: int,
                       member: Tensor | None = None) -> None:
    return None


# ---------------------------------------------------------------------------------------------
# one layer
# ---------------------------------------------------------------------------------------------


class SparseLayer(StaticLayer):
    """A StaticLayer that also keeps the dominant dims of K and per-page key summaries (module docstring).

    dims: (Hkv_global, n) int64 and member (H_global, n) float32 (`layer_tables`), or None (not a FASA layer).
    dims_copy: keep key_dims, K's columns `dims` (else dims lists all D head dims and the node reads K itself;
    the tables still go to the node). page_size: P, or 0: no page summaries."""

    def __init__(self, max_cache_len: int, dims: Tensor | None = None, member: Tensor | None = None,
                 page_size: int = 0, kv_head_offset: int = 0, dims_copy: bool = True, **kwargs: Any) -> None:
        super().__init__(max_cache_len=max_cache_len)
        if (dims is None) != (member is None):
            raise ValueError("SparseLayer: dims and member come together (or neither)")
        self.dims_global, self.member_global = dims, member
        self.dims_copy = dims_copy and dims is not None
        self.page_size = page_size
        self.n_pages = math.ceil(max_cache_len / page_size) if page_size else 0
        self.kv_head_offset = kv_head_offset
        self.key_dims: Tensor | None = None
        self.dims: Tensor | None = None
        self.member: Tensor | None = None
        self.page_min: Tensor | None = None
        self.page_max: Tensor | None = None
        self.key_valid: Tensor | None = None
        self.pending_padding: Tensor | None = None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        """Allocate K/V (StaticLayer) and the extra buffers from the first keys' shape, dtype and device."""
        super().lazy_initialization(key_states, value_states)
        B, Hkv, _, D = key_states.shape
        if self.dims_global is not None:
            lo, total = self.kv_head_offset, self.dims_global.shape[0]
            if lo + Hkv > total:
                raise ValueError(f"SparseCache: the keys hold {Hkv} KV heads from head {lo}, the dims table "
                                 f"{total}: under tensor parallelism pass kv_head_offset (this rank's first head)")
            group = self.member_global.shape[0] // total
            self.dims = self.dims_global[lo:lo + Hkv].to(self.device)
            self.member = self.member_global[lo * group:(lo + Hkv) * group].to(self.device)
        if self.dims_copy:
            self.key_dims = torch.zeros(B, Hkv, self.max_cache_len, self.dims.shape[1], dtype=key_states.dtype,
                                        device=self.device)
        if self.page_size:
            shape = (B, Hkv, self.n_pages, D)
            self.page_min = torch.full(shape, float("inf"), dtype=key_states.dtype, device=self.device)
            self.page_max = torch.full(shape, float("-inf"), dtype=key_states.dtype, device=self.device)
        self.key_valid = torch.ones(B, self.max_cache_len, dtype=torch.bool, device=self.device)
        if self.pending_padding is not None:
            self.apply_padding(self.pending_padding)
        if not _compiling():
            for t in (self.key_dims, self.dims, self.member, self.page_min, self.page_max, self.key_valid):
                if t is not None:
                    torch._dynamo.mark_static_address(t)

    def apply_padding(self, attention_mask: Tensor) -> None:
        """Mark the slots where attention_mask (B, L0) is 0 as padding (the rest stays valid)."""
        B, L0 = attention_mask.shape
        if B != self.key_valid.shape[0]:
            raise ValueError(f"SparseCache.set_padding: attention_mask has batch {B}, the cache "
                             f"{self.key_valid.shape[0]}")
        self.key_valid.fill_(True)
        self.key_valid[:, :L0] = attention_mask.to(device=self.device, dtype=torch.bool)
        self.pending_padding = None

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """Write K/V (as StaticLayer), the dims copy and the page summaries of the new slots.

        key_states, value_states: (B, Hkv, n, D) post-RoPE. Returns (keys, values) (B, Hkv, max_cache_len, D)."""
        n = key_states.shape[-2]
        if n > self.max_cache_len:  # shapes are static under tracing: no host sync
            raise ValueError(f"SparseCache: {n} new tokens do not fit max_cache_len = {self.max_cache_len}")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        elif n > 1 and not _compiling():  # eager prefill / chunk: one host read of the length, outside graphs
            used = int(self.cumulative_length)
            if used + n > self.max_cache_len:
                raise ValueError(f"SparseCache: {used} cached + {n} new tokens exceed max_cache_len = "
                                 f"{self.max_cache_len}")
        pos = torch.arange(n, device=self.device) + self.cumulative_length  # before StaticLayer advances it
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        if self.key_dims is not None or self.page_size:
            cache_update(self.key_dims, self.page_min, self.page_max, self.key_valid, self.dims, pos, key_states,
                         self.page_size, self.member)
        return keys, values

    def recompute_pages(self, start_page: int = 0) -> None:
        """Rebuild the page summaries from K from page `start_page` on (after crop; host-side, not traced)."""
        if not (self.is_initialized and self.page_size):
            return
        B, Hkv, L, D = self.keys.shape
        used = int(self.cumulative_length)
        P = self.page_size
        self.page_min[:, :, start_page:] = float("inf")
        self.page_max[:, :, start_page:] = float("-inf")
        if used > start_page * P:
            pos = torch.arange(start_page * P, used, device=self.device)
            cache_update(None, self.page_min, self.page_max, self.key_valid, None, pos, self.keys.index_select(2, pos),
                         P)

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last -tokens_to_remove tokens (a negative count, as transformers 5.25's StaticLayer; 5.17's
        has no crop) and rebuild the pages from the new last one (host-side: assisted decoding rolls back)."""
        if tokens_to_remove > 0:
            raise ValueError("SparseCache layers are cropped by a negative count: the number of tokens to remove")
        self.cumulative_length.sub_(abs(tokens_to_remove))
        if self.page_size and self.is_initialized:
            self.recompute_pages(int(self.cumulative_length) // self.page_size)

    def reset(self) -> None:
        """Zero K/V and the dims, empty the pages, forget the padding, length 0."""
        super().reset()
        if self.is_initialized:
            if self.key_dims is not None:
                self.key_dims.zero_()
            if self.page_size:
                self.page_min.fill_(float("inf"))
                self.page_max.fill_(float("-inf"))
            self.key_valid.fill_(True)
        self.pending_padding = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("SparseCache does not support beam search (its buffers have static addresses)")

    def extra_bytes(self) -> int:
        """Bytes of the dims copy, the page summaries and key_valid (0 before allocation)."""
        return sum(t.numel() * t.element_size() for t in (self.key_dims, self.page_min, self.page_max, self.key_valid)
                   if t is not None)

    def kv_bytes(self) -> int:
        """Bytes of K and V (0 before allocation)."""
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values) if t is not None)


# ---------------------------------------------------------------------------------------------
# the cache
# ---------------------------------------------------------------------------------------------


class SparseCache(Cache):
    """A StaticCache-shaped cache with the dominant dims of K and per-page key summaries (module docstring).

    config_or_model: the model or its config. max_cache_len: slots per layer (prompt + new tokens).
    policy: the sparse_compile policy the decode graph runs (name, path, mapping or Policy): which layers keep
    dims (FASA layers, with FASA's dims) and pages (FASA layers, LessIsMore selection layers). dims: optional
    explicit head dims for the FASA layers (one list for all heads, or one per KV / query head; or a dict
    layer -> such lists) instead of the policy's chunks. dims_copy: False keeps no dims copy (FASA layers keep
    pages only, and the node scores its candidates on K's own rows: extra memory 1/P of K+V instead of
    n/(2D) + 1/P; DECODE_NOTES.md measures both). page_size: P, one of 16, 32, 64. batch_size, dtype, device:
    all three given -> buffers are allocated now (as `early_initialization`), else on the first update.
    kv_head_offset: under tensor parallelism, the global index of this rank's first KV head."""

    def __init__(self, config_or_model: Any, max_cache_len: int, policy: Any = "dense", *, page_size: int = 32,
                 dims: Any = None, dims_copy: bool = True, batch_size: int | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 kv_head_offset: int = 0) -> None:
        config = getattr(config_or_model, "config", config_or_model)
        text = config.get_text_config(decoder=True)
        if isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int) or max_cache_len < 1:
            raise ValueError(f"SparseCache: max_cache_len must be an int >= 1, got {max_cache_len!r}")
        if isinstance(page_size, bool) or page_size not in PAGE_SIZES:
            raise ValueError(f"SparseCache: page_size must be one of {PAGE_SIZES}, got {page_size!r}")
        self.policy = load_policy(policy)
        self.facts = model_facts(text)
        self.page_size, self.cache_len = page_size, max_cache_len  # (5.17's Cache.max_cache_len is a property)
        types, kwargs = get_layer_types_and_kwargs(text)  # kwargs: one dict (<= 5.17) or one per layer (5.25)
        layers: list[Any] = []
        for i, kind in enumerate(types):
            layer_kwargs = kwargs[i] if isinstance(kwargs, list) else kwargs
            if kind in ("sliding_attention", "chunked_attention"):
                layers.append(StaticSlidingWindowLayer(max_cache_len=max_cache_len,
                                                       sliding_window=layer_kwargs["sliding_window"]))
                continue
            if kind != "full_attention":
                raise ValueError(f"SparseCache: layer {i} is a {kind!r} layer; only attention layers are supported")
            per_head, pages = layer_plan(self.policy, i, self.facts, dims)
            table, member, copy = layer_tables(per_head, self.facts, dims_copy)
            layers.append(SparseLayer(max_cache_len, table, member, page_size if pages else 0, kv_head_offset,
                                      dims_copy=copy))
        super().__init__(layers=layers)
        self.first_sparse = next((i for i, x in enumerate(layers) if isinstance(x, SparseLayer)), None)
        if (batch_size, dtype, device) != (None, None, None):
            if None in (batch_size, dtype, device):
                raise ValueError("SparseCache: give batch_size, dtype and device together (or none: lazy allocation)")
            self.early_initialization(batch_size, self.facts["num_kv_heads"], self.facts["head_dim"], dtype,
                                      torch.device(device))

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[Tensor, Tensor]:
        """Cache.update, plus a length check at the first SparseLayer outside compiled graphs (one host read per
        eager forward: a clear error where index_copy_ would fail out of range; compiled graphs skip it)."""
        layer = self.layers[layer_idx]
        if layer_idx == self.first_sparse and layer.is_initialized and not _compiling():
            used, n = int(layer.cumulative_length), key_states.shape[-2]
            if used + n > self.cache_len:
                raise ValueError(f"SparseCache: {used} cached + {n} new tokens exceed max_cache_len = {self.cache_len}"
                                 f" (prompt + max_new_tokens must fit)")
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def set_padding(self, attention_mask: Tensor) -> None:
        """Left padding of the prompt: attention_mask (B, L0), 0 at padded tokens, 1 at text. Call before the
        first forward (or after `reset`); padded slots then stay out of the page summaries."""
        if attention_mask.dim() != 2 or attention_mask.shape[1] > self.cache_len:
            raise ValueError(f"SparseCache.set_padding: attention_mask must be (B, L0) with L0 <= max_cache_len = "
                             f"{self.cache_len}, got {tuple(attention_mask.shape)}")
        for layer in self.layers:
            if isinstance(layer, SparseLayer):
                if layer.is_initialized:
                    layer.apply_padding(attention_mask)
                else:
                    layer.pending_padding = attention_mask

    def sparse_layer(self, layer_idx: int) -> SparseLayer:
        layer = self.layers[layer_idx]
        if not isinstance(layer, SparseLayer):
            raise ValueError(f"SparseCache: layer {layer_idx} is a {type(layer).__name__}, not a SparseLayer")
        return layer

    def kv_bytes(self) -> int:
        """Bytes of K and V over all layers (allocated so far)."""
        return sum(layer.kv_bytes() if isinstance(layer, SparseLayer) else
                   sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if t is not None)
                   for layer in self.layers)

    def extra_bytes(self) -> int:
        """Bytes of the dims copies, page summaries and validity flags over all layers (allocated so far)."""
        return sum(layer.extra_bytes() for layer in self.layers if isinstance(layer, SparseLayer))

    def __repr__(self) -> str:
        parts = []
        for i, layer in enumerate(self.layers):
            if isinstance(layer, SparseLayer):
                n = layer.dims_global.shape[1] if layer.dims_copy else 0
                parts.append(f"{i}:dims={n},P={layer.page_size}")
        return f"SparseCache(max_cache_len={self.cache_len}, policy={self.policy.name!r}, {' '.join(parts)})"


def filled_layer(method: str, params: Any, facts: dict[str, Any], keys: Tensor, values: Tensor, page_size: int,
                 layer: int = 0, dims_copy: bool = True) -> SparseLayer:
    """A SparseLayer holding `keys` / `values` (B, Hkv, L, D), written by one prefill `update`, with the buffers
    a `method` ("fasa": dims copy and pages, with `params`' chunks; "lessismore": pages) layer keeps: what a
    decode node over a SparseCache of length L receives, for benchmarks and tests that start from K.
    dims_copy=False: pages only (as `SparseCache(dims_copy=False)`)."""
    if method not in ("fasa", "lessismore"):
        raise ValueError(f"filled_layer: {method!r} keeps no SparseCache buffers (fasa and lessismore do)")
    per_head = None
    if method == "fasa":
        per_head = fasa_head_dims(params, layer, facts)
        if per_head is None:
            raise ValueError(f"FASA does not run layer {layer} under these params (mismatch = 'dense')")
    dims, member, copy = layer_tables(per_head, facts, dims_copy)
    layer_obj = SparseLayer(max_cache_len=keys.shape[2], dims=dims, member=member, page_size=page_size,
                            dims_copy=copy)
    layer_obj.update(keys, values)
    return layer_obj


# ---------------------------------------------------------------------------------------------
# the cache a tool runs on, by name: `bench --cache`, `eval --cache`
# ---------------------------------------------------------------------------------------------


def cache_form(kind: str) -> tuple[str, int, bool]:
    """(cache class, page size, dims copy) of a cache form: "static", "dynamic" (page size 0, no dims copy), or
    "sparse" with an optional page size (default 32) and "-pages" (no dims copy: pages only), e.g.
    "sparse16-pages" -> ("sparse", 16, False). ValueError naming the allowed forms for anything else."""
    if kind in ("static", "dynamic"):
        return kind, 0, False
    match = re.fullmatch(r"sparse(16|32|64)?(-pages)?", kind)
    if match is None:
        raise ValueError(f"unknown cache {kind!r}; choose from {CACHE_FORMS}")
    return "sparse", int(match.group(1) or 32), match.group(2) is None


def build_cache(kind: str, config_or_model: Any, max_cache_len: int, policy: Any = "dense") -> Cache:
    """A new, empty cache of form `kind` (`cache_form`): a DynamicCache (max_cache_len unused), a StaticCache of
    max_cache_len slots, or a SparseCache of max_cache_len slots for `policy` (the policy the backend compiles
    the model with: it decides which layers keep dims and pages), with the form's page size and dims copy."""
    cls, page_size, dims_copy = cache_form(kind)
    config = getattr(config_or_model, "config", config_or_model)
    if cls == "dynamic":
        return DynamicCache(config=config)
    if cls == "static":
        return StaticCache(config=config, max_cache_len=max_cache_len)
    return SparseCache(config, max_cache_len=max_cache_len, policy=policy, page_size=page_size, dims_copy=dims_copy)
