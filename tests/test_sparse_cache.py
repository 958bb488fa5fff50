"""SparseCache (sparse_compile/cache.py) and two-stage selection (sparse_compile/methods/two_stage.py).

The cache's split keys and page summaries == recomputing them from K, after prefill, chunked prefill, single
decode steps and ragged left padding; generate() with a SparseCache == with a StaticCache token for token,
eager and compiled by the sparse backend; bad arguments raise ValueError before anything is written; the
two-stage selections with every page kept == the exact single-stage ones (FASA's; LessIsMore's spec, checked
by a loop reference written from shared/specs/lessismore.md)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from cache_keyword import CACHE_ARG
from hypothesis import given
from hypothesis import strategies as st
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache

import sparse_compile
from sparse_compile.attention_mask import SiteFacts
from sparse_compile.cache import (
    SparseCache,
    SparseLayer,
    build_cache,
    cache_argument,
    cache_form,
    cache_kwargs,
    returned_cache,
)
from sparse_compile.kernels.fasa import (
    fasa_scores_reference,
    host_chunk_tables,
    key_state,
    select_tokens,
)
from sparse_compile.methods.fasa import site_member
from sparse_compile.methods.two_stage import fasa_two_stage, lessismore_two_stage, page_bounds

FASA_ALL = {"name": "fasa-all", "decode": {"method": "fasa", "params": {"dense_layers": []}}}
H, HKV, D = 4, 2, 16


def tiny_config(layers: int = 2) -> LlamaConfig:
    return LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                       num_attention_heads=H, num_key_value_heads=HKV, max_position_embeddings=512,
                       attn_implementation="sdpa")


def tiny_llama(layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(layers)).eval()


def expected_buffers(layer: SparseLayer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(key_dims, page_min, page_max) recomputed from K, the written length and key_valid (slots past the length
    and padded slots are in no page summary; the dims copy mirrors K at every slot, written or not)."""
    keys, n, P = layer.keys, int(layer.cumulative_length), layer.page_size
    B, Hkv, L, Dh = keys.shape
    written = torch.arange(L) < n
    dims = keys.gather(3, layer.dims[None, :, None, :].expand(B, Hkv, L, -1))
    ok = (written[None] & layer.key_valid)[:, None, :, None]  # (B, 1, L, 1)
    pad = layer.n_pages * P - L
    lo = torch.nn.functional.pad(torch.where(ok, keys, math.inf), (0, 0, 0, pad), value=math.inf)
    hi = torch.nn.functional.pad(torch.where(ok, keys, -math.inf), (0, 0, 0, pad), value=-math.inf)
    return (dims, lo.view(B, Hkv, layer.n_pages, P, Dh).amin(3), hi.view(B, Hkv, layer.n_pages, P, Dh).amax(3))


def assert_buffers(cache: SparseCache) -> None:
    for layer in cache.layers:
        dims, lo, hi = expected_buffers(layer)
        assert torch.equal(layer.key_dims, dims)
        assert torch.equal(layer.page_min, lo)
        assert torch.equal(layer.page_max, hi)


def test_dims_are_fasas_dims_unioned_per_kv_head():
    """The cache stores, per KV head, the union of the dims FASA scores for its query heads (calibrated chunks
    per query head, rotate-half pairing), and `member` gives each head back exactly its own dims."""
    chunks = [[[7, 2], [0, 5], [1, 6], [3, 4]], [[1], [1], [6], [2]]]
    policy = {"decode": {"method": "fasa", "params": {"dense_layers": [], "chunks": chunks}}}
    cache = SparseCache(tiny_config(), max_cache_len=32, policy=policy, page_size=16)
    for i, layer in enumerate(cache.layers):
        _, member = host_chunk_tables(tuple(map(tuple, chunks[i])), H, HKV, D, D, "rotate_half")
        for h in range(H):
            mine = {int(d) for d, m in zip(layer.dims_global[h // 2], layer.member_global[h], strict=True) if m}
            assert mine == set(torch.nonzero(member[h]).flatten().tolist())


@given(
    page=st.sampled_from([16, 32, 64]),
    batch=st.integers(1, 3),
    chunks=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    steps=st.integers(0, 20),
    pads=st.lists(st.integers(0, 30), min_size=3, max_size=3),
)
def test_buffers_equal_recomputation(page, batch, chunks, steps, pads):
    """Prefill in chunks (one chunk = plain prefill), ragged left padding, then single-token steps: after every
    update the dims copy and the page min/max equal what K gives."""
    prompt = sum(chunks)
    max_len = prompt + steps + 3  # not a page multiple in general
    cache = SparseCache(tiny_config(1), max_cache_len=max_len, policy=FASA_ALL, page_size=page)
    mask = torch.ones(batch, prompt, dtype=torch.long)
    for b in range(batch):
        mask[b, : min(pads[b], prompt - 1)] = 0
    if batch > 1:
        cache.set_padding(mask)
    gen = torch.Generator().manual_seed(prompt * 131 + page)
    for n in chunks + [1] * steps:
        k = torch.randn(batch, HKV, n, D, generator=gen)
        keys, values = cache.update(k, torch.randn(batch, HKV, n, D, generator=gen), 0)
        assert keys.shape == (batch, HKV, max_len, D)
        assert_buffers(cache)
    assert int(cache.layers[0].cumulative_length) == prompt + steps


def test_reset_and_crop_keep_the_summaries_exact():
    cache = SparseCache(tiny_config(1), max_cache_len=50, policy=FASA_ALL, page_size=16)
    cache.update(torch.randn(2, HKV, 40, D), torch.randn(2, HKV, 40, D), 0)
    for layer in cache.layers:
        layer.crop(-20)  # keep the first 20 tokens (Cache.crop exists in transformers 5.25 only)
    assert_buffers(cache)
    cache.update(torch.randn(2, HKV, 5, D), torch.randn(2, HKV, 5, D), 0)
    assert_buffers(cache)
    cache.reset()
    assert_buffers(cache)
    assert torch.isinf(cache.layers[0].page_min).all()


def test_layers_keep_what_the_policy_reads():
    """FASA: dims and pages on its layers, nothing on dense_layers; LessIsMore: pages on selection layers only;
    dense: a plain static cache. Memory is reported, the formula holds."""
    fasa = SparseCache(tiny_config(3), 64, {"decode": {"method": "fasa", "params": {"dense_layers": [0]}}},
                       batch_size=1, dtype=torch.float32, device="cpu")
    assert [layer.dims_global is not None for layer in fasa.layers] == [False, True, True]
    assert [layer.page_size for layer in fasa.layers] == [0, 32, 32]
    n = fasa.layers[1].dims.shape[1]
    per_layer_kv = 2 * HKV * 64 * D * 4
    extra = HKV * 64 * n * 4 + 2 * HKV * 2 * D * 4 + 64  # dims copy + min/max + key_valid (bytes)
    assert fasa.kv_bytes() == 3 * per_layer_kv
    assert fasa.extra_bytes() == 2 * extra + 64
    params = {"budget": 8, "sink": 0, "selection_layers": [1], "dense_layers": [0]}
    lim = {"decode": {"method": "lessismore", "params": params}}
    lessismore = SparseCache(tiny_config(3), 64, lim)
    assert [layer.page_size for layer in lessismore.layers] == [0, 32, 0]
    assert all(layer.dims_global is None for layer in lessismore.layers)
    dense = SparseCache(tiny_config(2), 64)
    assert all(layer.page_size == 0 and layer.dims_global is None for layer in dense.layers)
    pages_only = SparseCache(tiny_config(3), 64, {"decode": {"method": "fasa", "params": {"dense_layers": [0]}}},
                             dims_copy=False, batch_size=1, dtype=torch.float32, device="cpu")
    assert [layer.page_size for layer in pages_only.layers] == [0, 32, 32]
    assert all(layer.key_dims is None for layer in pages_only.layers)
    assert pages_only.extra_bytes() == 2 * (2 * HKV * 2 * D * 4 + 64) + 64  # min/max + key_valid only


@pytest.mark.parametrize("chunks", [None, [[[7, 2], [0, 1], [3, 5], [1, 6]]], [[[2, 3, 4, 5, 6, 7, 0, 1]] * H]],
                         ids=["rule", "per-head", "union-all"])
def test_pages_only_layers_keep_the_nodes_full_dim_tables(chunks):
    """Without a dims copy (pages only, or a union of every dim) a FASA layer keeps dims (Hkv, D) = 0..D-1 and
    member (H, D) equal to the table the node would otherwise copy to the device at every call (methods/fasa.py
    `site_member`); under tensor parallelism the rank's rows."""
    params = {"dense_layers": []} | ({"chunks": chunks} if chunks else {})
    policy = sparse_compile.load_policy({"decode": {"method": "fasa", "params": params}})
    site = SiteFacts(layer=0, rope="rotate_half", rotary_dim=D, head_dim=D, num_heads=H, num_kv_heads=HKV)
    expected = site_member(policy.decode.for_layer(0)[1], site, H, HKV, D, torch.device("cpu"))
    assert expected.sum() > 0
    for dims_copy in (False, True):
        cache = SparseCache(tiny_config(1), 32, policy, page_size=16, dims_copy=dims_copy, batch_size=1,
                            dtype=torch.float32, device="cpu")
        layer = cache.layers[0]
        if dims_copy and chunks != [[[2, 3, 4, 5, 6, 7, 0, 1]] * H]:
            assert layer.key_dims is not None and layer.dims.shape[1] < D  # the copy's own tables
            continue
        assert layer.key_dims is None and not layer.dims_copy
        assert torch.equal(layer.dims, torch.arange(D).repeat(HKV, 1))
        assert torch.equal(layer.member, expected)
    rank = SparseCache(tiny_config(1), 32, policy, page_size=16, dims_copy=False, kv_head_offset=1)
    rank.update(torch.randn(1, 1, 4, D), torch.randn(1, 1, 4, D), 0)  # this rank holds KV head 1 of 2
    assert torch.equal(rank.layers[0].member, expected[H // HKV:])
    assert torch.equal(rank.layers[0].dims, torch.arange(D)[None])


def test_lazy_allocation_follows_the_keys_heads():
    """Tensor parallelism: a rank whose k holds fewer KV heads than the config allocates that many, and its dims
    rows are the global table's rows from kv_head_offset."""
    chunks = [[[7], [0]]]
    policy = {"decode": {"method": "fasa", "params": {"dense_layers": [], "chunks": chunks}}}
    cache = SparseCache(tiny_config(1), 32, policy, page_size=16, kv_head_offset=1)
    cache.update(torch.randn(1, 1, 4, D), torch.randn(1, 1, 4, D), 0)
    layer = cache.layers[0]
    assert layer.keys.shape == (1, 1, 32, D) and layer.page_min.shape == (1, 1, 2, D)
    assert layer.dims.tolist() == [[0, 8]]
    assert_buffers(cache)
    bad = SparseCache(tiny_config(1), 32, policy, page_size=16, kv_head_offset=2)
    with pytest.raises(ValueError, match="kv_head_offset"):
        bad.update(torch.randn(1, 1, 4, D), torch.randn(1, 1, 4, D), 0)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"page_size": 8}, "page_size must be one of \\(16, 32, 64\\)"),
        ({"page_size": 24}, "page_size must be one of \\(16, 32, 64\\)"),
        ({"dims": [3, 16]}, "dims \\[16\\] are not head dims"),
        ({"dims": list(range(16))}, "names 16 dims >= head_dim = 16"),
        ({"dims": [[1, 2]] * 3}, "3 dim lists"),
        ({"max_cache_len": 0}, "max_cache_len must be an int >= 1"),
        ({"batch_size": 2}, "give batch_size, dtype and device together"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs, needle):
    args = {"max_cache_len": 32, "policy": FASA_ALL, **kwargs}
    with pytest.raises(ValueError, match=needle):
        SparseCache(tiny_config(), **args)


@pytest.mark.parametrize(
    "kind, form",
    [("dynamic", ("dynamic", 0, False)), ("static", ("static", 0, False)), ("sparse", ("sparse", 32, True)),
     ("sparse16", ("sparse", 16, True)), ("sparse64", ("sparse", 64, True)), ("sparse-pages", ("sparse", 32, False)),
     ("sparse32-pages", ("sparse", 32, False))],
)
def test_cache_forms_parse_and_build(kind, form):
    """`cache_form` (eval --cache, bench --cache) -> (class, page size, dims copy); `build_cache` makes that
    cache: a SparseCache with the form's page size, keeping the dims copy only without "-pages"."""
    assert cache_form(kind) == form
    cache = build_cache(kind, tiny_llama(2), max_cache_len=40, policy=FASA_ALL)
    assert type(cache) is {"dynamic": DynamicCache, "static": StaticCache, "sparse": SparseCache}[form[0]]
    if form[0] == "sparse":
        assert [layer.page_size for layer in cache.layers] == [form[1]] * 2
        assert all(layer.dims_copy == form[2] for layer in cache.layers)  # FASA on both layers
        assert cache.policy.name == "fasa-all" and cache.cache_len == 40
    elif form[0] == "static":
        assert cache.layers[0].max_cache_len == 40


@pytest.mark.parametrize("kind", ["sparse8", "sparse32pages", "Static", "sparse-16", "", "dense"])
def test_unknown_cache_form_names_the_forms(kind):
    with pytest.raises(ValueError, match=f"unknown cache '{kind}'; choose from static, dynamic, "
                                         "sparse\\[16\\|32\\|64\\]\\[-pages\\]"):
        cache_form(kind)


def test_prompt_longer_than_the_cache_raises_before_writing():
    cache = SparseCache(tiny_config(1), max_cache_len=8, policy=FASA_ALL, page_size=16)
    with pytest.raises(ValueError, match="9 new tokens do not fit max_cache_len = 8"):
        cache.update(torch.randn(1, HKV, 9, D), torch.randn(1, HKV, 9, D), 0)
    assert not cache.layers[0].is_initialized
    cache.update(torch.randn(1, HKV, 6, D), torch.randn(1, HKV, 6, D), 0)
    before = cache.layers[0].keys.clone()
    with pytest.raises(ValueError, match="6 cached \\+ 3 new tokens exceed max_cache_len = 8"):
        cache.update(torch.randn(1, HKV, 3, D), torch.randn(1, HKV, 3, D), 0)
    assert torch.equal(cache.layers[0].keys, before) and int(cache.layers[0].cumulative_length) == 6
    model = tiny_llama(1)
    with pytest.raises(ValueError, match="do not fit max_cache_len"), torch.no_grad():
        model(torch.randint(0, 128, (1, 12)), **{CACHE_ARG: SparseCache(model, 10, FASA_ALL, page_size=16)})
    small = SparseCache(model, 12, FASA_ALL, page_size=16)  # generate past the end: a clear error, not IndexError
    with pytest.raises(ValueError, match="12 cached \\+ 1 new tokens exceed max_cache_len = 12"):
        run_generate(model, torch.randint(0, 128, (1, 10)), None, small)


# --- generate ----------------------------------------------------------------------------------------------


def run_generate(model, ids, mask, cache, backend=None):
    forward = model.forward
    if backend is not None:
        model.forward = torch.compile(forward, backend=backend)
    try:
        with torch.no_grad():
            return model.generate(ids, attention_mask=mask, **cache_kwargs(model, cache), max_new_tokens=6,
                                  do_sample=False)
    finally:
        model.forward = forward


def test_cache_kwargs_name_the_cache_as_this_transformers_takes_it():
    """`cache=` where the model's forward takes it (transformers 5.25 warns about `past_key_values`),
    `past_key_values=` before; the compiled module's wrapper does not hide the name; generate and forward run
    without the deprecation warning and the forward returns the cache it was given."""
    import inspect

    model = tiny_llama(1)
    name = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    assert cache_argument(model) == name == cache_argument(torch.compile(model, backend="eager"))
    cache = SparseCache(model, max_cache_len=16, policy="dense")
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # a deprecation warning would fail the call
        out = model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True)
        assert returned_cache(out) is cache
        model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, cache), max_new_tokens=2,
                       do_sample=False)


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 128, (2, 21), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    return ids, mask


def test_generate_equals_static_cache_eager():
    model = tiny_llama(2)
    ids, mask = padded_batch()
    ref = run_generate(model, ids, mask, StaticCache(model.config, max_cache_len=40))
    cache = SparseCache(model, max_cache_len=40, policy=FASA_ALL, page_size=16)
    cache.set_padding(mask)
    got = run_generate(model, ids, mask, cache)
    assert got.tolist() == ref.tolist()
    assert_buffers(cache)
    assert not cache.layers[0].key_valid[1, :5].any() and cache.layers[0].key_valid[1, 5:].all()


@pytest.mark.parametrize("policy", ["dense", "fasa"])
def test_generate_equals_static_cache_compiled(policy):
    """The model's forward compiled by the sparse backend (eager inner compiler): a SparseCache gives the same
    tokens as a StaticCache under the same backend policy (dense, and FASA whose node reads K through the
    recognised static-cache write), and its buffers, written inside the compiled graphs, are exact."""
    model = tiny_llama(2)
    ids, mask = padded_batch()
    backend_policy = "dense" if policy == "dense" else {
        "decode": {"method": "fasa", "min_seq_len": 0, "params": {"budget": 8, "dense_layers": [0]}}}
    if policy == "dense":  # the dense backend == eager: compare with eager generation (one compile less)
        ref = run_generate(model, ids, mask, StaticCache(model.config, max_cache_len=40))
    else:
        ref = run_generate(model, ids, mask, StaticCache(model.config, max_cache_len=40),
                           sparse_compile.backend(backend_policy, inner="eager"))
        torch._dynamo.reset()
    report = sparse_compile.Report()
    cache = SparseCache(model, max_cache_len=40, policy=FASA_ALL, page_size=16)
    cache.set_padding(mask)
    got = run_generate(model, ids, mask, cache, sparse_compile.backend(backend_policy, inner="eager", report=report))
    assert got.tolist() == ref.tolist()
    if policy == "fasa":
        assert report.layer_density("decode")[1] < 1.0  # FASA ran on the SparseCache's keys
    assert_buffers(cache)


# --- two-stage selection -----------------------------------------------------------------------------------


def summaries(k: torch.Tensor, valid: torch.Tensor, P: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Page min/max of k (B, Hkv, L, D) over valid keys (B, L), as the cache keeps them."""
    B, Hkv, L, Dh = k.shape
    NP = math.ceil(L / P)
    ok = valid[:, None, :, None]
    lo = torch.nn.functional.pad(torch.where(ok, k, math.inf), (0, 0, 0, NP * P - L), value=math.inf)
    hi = torch.nn.functional.pad(torch.where(ok, k, -math.inf), (0, 0, 0, NP * P - L), value=-math.inf)
    return lo.view(B, Hkv, NP, P, Dh).amin(3), hi.view(B, Hkv, NP, P, Dh).amax(3)


def draw_visible(batch: int, L: int, pads: list[int], unwritten: int) -> torch.Tensor:
    """(B, L) bool: left padding per row and a static-cache tail of unwritten slots."""
    vis = torch.ones(batch, L, dtype=torch.bool)
    for b in range(batch):
        vis[b, : pads[b]] = False
    vis[:, L - unwritten:] = False
    return vis


@given(
    L=st.integers(20, 200),
    P=st.sampled_from([16, 32, 64]),
    slots=st.integers(1, 24),
    sink=st.integers(0, 3),
    recent=st.integers(0, 3),
    per_kv_head=st.booleans(),
    group=st.sampled_from(["union", "max"]),
    pads=st.lists(st.integers(0, 15), min_size=2, max_size=2),
    seed=st.integers(0, 1000),
)
def test_page_bound_and_fasa_two_stage_all_candidates(L, P, slots, sink, recent, per_kv_head, group, pads, seed):
    """Every key scores at most its page's bound; with every page kept, FASA's two-stage selection == the
    single-stage one (fasa_scores_reference + select_tokens), as sets per score row (float64: no ties)."""
    gen = torch.Generator().manual_seed(seed)
    B = 2
    q = torch.randn(B, H, 1, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, HKV, L, D, generator=gen, dtype=torch.float64)
    visible = draw_visible(B, L, pads, unwritten=3)
    state = key_state(visible, sink, recent)
    chunks = ((0, 5), (1, 6), (3, 4), (7, 2))
    _, member_full = host_chunk_tables(chunks, H, HKV, D, D, "rotate_half")
    cache = SparseCache(tiny_config(1), L, {"decode": {"method": "fasa", "params": {
        "dense_layers": [], "chunks": [[list(c) for c in chunks]]}}}, page_size=P)
    layer = cache.layers[0]
    dims, member = layer.dims_global, layer.member_global
    key_dims = k.gather(3, dims[None, :, None, :].expand(B, HKV, L, -1))
    lo, hi = summaries(k, visible, P)

    bounds = page_bounds(q, lo, hi)  # (B, H, NP)
    exact = torch.einsum("bhd,bhnd->bhn", q[:, :, 0], k.repeat_interleave(H // HKV, 1))
    page_of = torch.arange(L) // P
    ok = visible[:, None, :].expand(B, H, L)
    assert (exact[ok] <= bounds.gather(2, page_of.expand(B, H, L))[ok] + 1e-9).all()

    slots = max(slots, sink + recent)
    ref = select_tokens(fasa_scores_reference(q, k, None, member_full.double(), state, per_kv_head=per_kv_head),
                        slots)
    got = fasa_two_stage(q, key_dims, dims, member, lo, hi, state, slots, candidates=L, page_size=P,
                         per_kv_head=per_kv_head, group=group)
    assert got.shape == ref.shape
    assert torch.equal(got.sort(-1).values, ref.sort(-1).values)
    # a pages-only cache: K itself as the dims copy, member already on the full head dim (all_dims)
    every = torch.arange(D).expand(HKV, D)
    via_k = fasa_two_stage(q, k, every, member_full.double(), lo, hi, state, slots, candidates=L, page_size=P,
                           per_kv_head=per_kv_head, group=group, all_dims=True)
    assert torch.equal(via_k.sort(-1).values, ref.sort(-1).values)
    # ... and with few candidates it equals the general path, which builds the full-dim mask by a scatter
    kw = dict(candidates=slots, page_size=P, sink=sink, recent=recent, per_kv_head=per_kv_head, group=group)
    assert torch.equal(fasa_two_stage(q, k, every, member_full.double(), lo, hi, state, slots, all_dims=True, **kw),
                       fasa_two_stage(q, k, every, member_full.double(), lo, hi, state, slots, **kw))
    # fewer candidates: still only visible keys, every forced key kept
    few = fasa_two_stage(q, key_dims, dims, member, lo, hi, state, slots, candidates=slots, page_size=P,
                         sink=sink, recent=recent, per_kv_head=per_kv_head, group=group)
    for b in range(B):
        forced = set(torch.nonzero(state[b] == 2).flatten().tolist())
        for row in few[b].tolist():
            kept = {t for t in row if t >= 0}
            assert all(visible[b, t] for t in kept) and forced <= kept


def lessismore_spec(q, k, visible, scale, n_sink, middle, n_recent) -> list[set[int]]:
    """shared/specs/lessismore.md as loops: sink = the first n_sink visible tokens, recent = the last n_recent
    (not sink); each head ranks the rest by q.k * scale; the rank-by-rank union (first occurrence wins,
    truncated at `middle`). One set per batch row."""
    B, Hq, _, Dh = q.shape
    group = Hq // k.shape[1]
    out = []
    for b in range(B):
        vis = [j for j in range(k.shape[2]) if visible[b, j]]
        sink = vis[:n_sink]
        recent = [j for j in vis[len(vis) - n_recent:] if j not in sink] if n_recent else []
        rest = [j for j in vis if j not in sink and j not in recent]
        rankings = []
        for h in range(Hq):
            logit = {j: float(q[b, h, 0] @ k[b, h // group, j]) * scale for j in rest}
            rankings.append(sorted(rest, key=lambda j: -logit[j]))
        union: list[int] = []
        for r in range(len(rest)):
            for h in range(Hq):
                if rankings[h][r] not in union and len(union) < middle:
                    union.append(rankings[h][r])
        out.append(set(sink) | set(recent) | set(union))
    return out


@given(
    L=st.integers(20, 160),
    P=st.integers(16, 64),
    middle=st.integers(1, 30),
    n_sink=st.integers(0, 4),
    n_recent=st.integers(0, 6),
    pads=st.lists(st.integers(0, 10), min_size=2, max_size=2),
    seed=st.integers(0, 1000),
)
def test_lessismore_two_stage_all_candidates_equals_the_spec(L, P, middle, n_sink, n_recent, pads, seed):
    gen = torch.Generator().manual_seed(seed)
    B = 2
    q = torch.randn(B, H, 1, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, HKV, L, D, generator=gen, dtype=torch.float64)
    visible = draw_visible(B, L, pads, unwritten=2)
    lo, hi = summaries(k, visible, P)
    scale = D ** -0.5
    got = lessismore_two_stage(q, k, lo, hi, visible, scale, n_sink, middle, n_recent, candidates=L, page_size=P)
    assert got.shape == (B, n_sink + middle + n_recent)
    want = lessismore_spec(q, k, visible, scale, n_sink, middle, n_recent)
    for b in range(B):
        row = [t for t in got[b].tolist() if t >= 0]
        assert len(row) == len(set(row)) and set(row) == want[b]
    few = lessismore_two_stage(q, k, lo, hi, visible, scale, n_sink, middle, n_recent, candidates=middle, page_size=P)
    for b in range(B):
        assert all(visible[b, t] for t in few[b].tolist() if t >= 0)


def test_update_traces_without_graph_breaks():
    """Prefill and decode forwards with a SparseCache compile as one graph each (fullgraph=True): the update is
    plain tensor ops, no host synchronisation."""
    model = tiny_llama(2)
    cache = SparseCache(model, max_cache_len=32, policy=FASA_ALL, page_size=16)
    forward = torch.compile(model.forward, backend="eager", fullgraph=True)
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        forward(ids, **{CACHE_ARG: cache}, use_cache=True)
        for _ in range(2):
            forward(ids[:, :1], **{CACHE_ARG: cache}, use_cache=True)
    assert int(cache.layers[0].cumulative_length) == 11
    assert_buffers(cache)


def test_graph_names_each_layers_buffers_in_one_cache_update_node():
    """What a graph pass will match: per layer one `sparse_compile.cache_update` node whose new keys are the
    very tensor StaticLayer's index_copy_ writes into the K buffer (the static-cache write the pass knows)."""
    model = tiny_llama(2)
    cache = SparseCache(model, max_cache_len=32, policy=FASA_ALL, page_size=16)
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm

    forward = torch.compile(model.forward, backend=keep, fullgraph=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        forward(torch.randint(0, 128, (1, 5)), **{CACHE_ARG: cache}, use_cache=True)
    nodes = list(graphs[0].graph.nodes)
    updates = [n for n in nodes if n.target is torch.ops.sparse_compile.cache_update.default]
    writes = [n for n in nodes if n.op == "call_method" and n.target == "index_copy_"]
    assert len(updates) == 2 and len(writes) == 4  # K and V of each layer
    k_written = {w.args[3] for w in writes}
    assert all(u.args[6] in k_written for u in updates)
    assert_buffers(cache)


@pytest.mark.parametrize("family", ["gemma3", "gpt_neox"])
def test_other_families_generate_as_with_a_static_cache(family):
    """Gemma3: sliding layers stay transformers' sliding static layers, full ones are SparseLayers; GPT-NeoX
    (partial rotary, half of D): FASA's rule picks the lowest-frequency rotary chunks of R = D/2."""
    import transformers

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=256,
                  attn_implementation="sdpa")
    torch.manual_seed(0)
    if family == "gemma3":
        config = transformers.Gemma3TextConfig(
            **common, sliding_window=8, query_pre_attn_scalar=16, head_dim=16, num_key_value_heads=2,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"])
        model = transformers.Gemma3ForCausalLM(config).eval()
    else:
        config = transformers.GPTNeoXConfig(**common, rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(1))
    ref = run_generate(model, ids, None, StaticCache(config, max_cache_len=32))
    cache = SparseCache(model, 32, FASA_ALL, page_size=16)
    assert run_generate(model, ids, None, cache).tolist() == ref.tolist()
    sparse = [i for i, layer in enumerate(cache.layers) if isinstance(layer, SparseLayer)]
    assert sparse == ([1] if family == "gemma3" else [0, 1, 2])
    if family == "gpt_neox":
        assert cache.layers[0].dims.tolist() == [[2, 3, 6, 7]] * 4  # chunks 2, 3 of R = 8: (2, 6), (3, 7)
    for i in sparse:
        dims, lo, hi = expected_buffers(cache.layers[i])
        assert torch.equal(cache.layers[i].page_min, lo) and torch.equal(cache.layers[i].key_dims, dims)
