"""LessIsMore (decode): the rank-by-rank union, the token set's properties, the selection edges in the
graph, and a compiled model against an independent reference attention written with Python loops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from cache_keyword import CACHE_ARG
from hypothesis import given
from hypothesis import strategies as st
from test_backend import peaked_llama
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

import sparse_compile
from sparse_compile.kernels.lessismore import (
    budget_split,
    decode_logits,
    select_tokens,
    selection_visible,
    union_by_rank,
    union_reference,
)
from sparse_compile.methods import lessismore
from sparse_compile.ops import CallShape
from sparse_compile.params import PolicyError, params_from_mapping


@given(B=st.integers(1, 2), H=st.integers(1, 5), M=st.integers(1, 12), length=st.integers(12, 40),
       middle=st.integers(0, 14), seed=st.integers(0, 2**16))
def test_union_by_rank_equals_the_loop(B, H, M, length, middle, seed):
    g = torch.Generator().manual_seed(seed)
    # each head ranks M distinct tokens (as topk does), some slots invalid
    head_top = torch.stack([torch.stack([torch.randperm(length, generator=g)[:M] for _ in range(H)])
                            for _ in range(B)])
    valid = torch.rand(B, H, M, generator=g) > 0.2
    got = union_by_rank(head_top, valid, length, middle)
    want = union_reference(head_top, valid, middle)
    assert got.shape == (B, middle)
    for b in range(B):
        assert [t for t in got[b].tolist() if t >= 0] == want[b]
        assert (got[b, len(want[b]):] == -1).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("H", "Hkv", "D"), [(4, 2, 64), (3, 1, 80), (2, 2, 128)])
def test_decode_logits_kernel_equals_reference(dtype, H, Hkv, D):
    """The Triton logits (FASA's scoring kernel with every dim, interpreter) == the PyTorch reference, -inf
    exactly at the invisible keys (left padding included)."""
    g = torch.Generator().manual_seed(H * D)
    B, Lk = 2, 70
    q = torch.randn(B, H, 1, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype)
    visible = torch.rand(B, Lk, generator=g) > 0.3
    visible[1, :10] = False
    got = decode_logits(q, k, D ** -0.5, visible, impl="triton")
    want = decode_logits(q, k, D ** -0.5, visible, impl="reference")
    hidden = ~visible[:, None, :].expand(B, H, Lk)
    assert got.shape == (B, H, Lk) and got.dtype == torch.float32
    assert torch.equal(got == float("-inf"), hidden)
    torch.testing.assert_close(got[~hidden], want[~hidden], rtol=1e-4, atol=1e-4)


def visible_rows(B: int, Lk: int, pads: list[int], q_offset: int) -> torch.Tensor:
    pos = torch.arange(Lk)
    return torch.stack([(pos >= pads[b]) & (pos <= q_offset) for b in range(B)])


@given(B=st.integers(1, 3), Hkv=st.integers(1, 2), G=st.integers(1, 3), Lk=st.integers(20, 90),
       budget=st.integers(8, 40), sink=st.integers(0, 4), recent_fraction=st.sampled_from([0.0, 0.25, 0.5]),
       seed=st.integers(0, 2**16), data=st.data())
def test_selected_set_properties(B, Hkv, G, Lk, budget, sink, recent_fraction, seed, data):
    """Size, sink, recency window, visibility, no duplicates, and the rank order: a token some head ranks
    r-th is kept before any token whose best rank is worse than r."""
    if math.ceil(recent_fraction * budget) + sink > budget:
        return
    g = torch.Generator().manual_seed(seed)
    H, D = Hkv * G, 8
    pads = [data.draw(st.integers(0, Lk // 3)) for _ in range(B)]
    q_offset = data.draw(st.integers(Lk // 2, Lk - 1))  # static-cache slots after q_offset are unwritten
    visible = visible_rows(B, Lk, pads, q_offset)
    q, k = torch.randn(B, H, 1, D, generator=g), torch.randn(B, Hkv, Lk, D, generator=g)
    logits = decode_logits(q, k, 0.3, visible)
    chosen = select_tokens(logits, visible, budget, sink, recent_fraction)
    n_sink, middle, n_recent = budget_split(budget, sink, recent_fraction)
    assert chosen.shape == (B, budget) and chosen.dtype == torch.int32
    for b in range(B):
        tokens = [t for t in chosen[b].tolist() if t >= 0]
        assert len(tokens) == len(set(tokens)) == min(budget, int(visible[b].sum()))
        assert all(visible[b, t] for t in tokens)
        seen = visible[b].nonzero().flatten().tolist()
        assert set(seen[:n_sink]) <= set(tokens)
        assert set(seen[max(0, len(seen) - n_recent):]) <= set(tokens)
        region = [t for t in seen[n_sink:len(seen) - n_recent] if t not in seen[:n_sink]]
        # best rank of each middle token over the heads
        order = logits[b][:, region].argsort(dim=1, descending=True, stable=True)
        best = {}
        for h in range(H):
            for r, j in enumerate(order[h].tolist()):
                best[region[j]] = min(best.get(region[j], r), r)
        kept = [t for t in tokens if t in best]
        dropped = [t for t in region if t not in kept]
        assert len(kept) == min(middle, len(region))
        if kept and dropped:
            assert max(best[t] for t in kept) <= min(best[t] for t in dropped)
    assert torch.equal(selection_visible(chosen, Lk) & ~visible, torch.zeros_like(visible))


def test_params_and_roles():
    params = lessismore.LessIsMoreParams()
    assert params.dense_layers == ("0-1",) and params.selection_layers == ()
    roles = [lessismore.selection_role(i, 30, params) for i in range(30)]
    assert roles[:3] == ["exact", "exact", "select"] and roles[10] == "select"
    assert roles.count("select") == 2 and roles.count("reuse") == 26
    with pytest.raises(PolicyError, match="budget 8 < sink 4 \\+ recent 6"):
        params_from_mapping(lessismore.LessIsMoreParams, {"budget": 8, "recent_fraction": 0.7}, "t.toml")
    with pytest.raises(PolicyError, match="selection_layers"):
        params_from_mapping(lessismore.LessIsMoreParams, {"selection_layers": ["x"]}, "t.toml")
    call = CallShape(1, 4, 2, 1, 100, 16, torch.float32, "cpu")
    assert "budget 2048 >= cache length 100" in lessismore.unsupported(call, None, params)
    assert "q_len 5" in lessismore.unsupported(CallShape(1, 4, 2, 5, 9000, 16, torch.float32, "cpu"), None, params)
    assert "head_dim 512 > 256" in lessismore.unsupported(CallShape(1, 4, 2, 1, 9000, 512, torch.bfloat16, "cuda"),
                                                           None, params)
    assert "dtype torch.float64 on CUDA" in lessismore.unsupported(
        CallShape(1, 4, 2, 1, 9000, 64, torch.float64, "cuda"), None, params)
    assert lessismore.unsupported(CallShape(1, 4, 2, 1, 9000, 512, torch.float32, "cpu"), None, params) is None


POLICY = {"name": "lim-test", "decode": {"method": "lessismore", "min_seq_len": 0,
                                         "params": {"budget": 24, "selection_layers": [2, 4], "dense_layers": [0]}}}


def rewritten_decode_graph(model, ids, mask, policy) -> torch.fx.GraphModule:
    """The FX graph of one decode step after the pass (nothing computed but the prefill)."""
    from sparse_compile.compiler import rewrite_graph
    from sparse_compile.explain_graphs import run_on_fake_tensors

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, attention_mask=mask, **{CACHE_ARG: cache}, use_cache=True)
    graphs = []

    def backend(gm, example_inputs):
        gm, n_outputs, layers = rewrite_graph(gm, example_inputs, sparse_compile.load_policy(policy),
                                              sparse_compile.Report())
        graphs.append(gm)
        return run_on_fake_tensors(gm, n_outputs)

    step_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    with torch.no_grad():
        torch.compile(model, backend=backend)(ids[:, :1], attention_mask=step_mask, **{CACHE_ARG: cache},
                                              use_cache=True)
    return graphs[0]


def test_selection_edges_in_the_graph():
    """Layers 2 and 4 select; 3 reuses 2's selection, 5 reuses 4's; layer 0 is dense; layer 1 (before any
    selection) runs exact attention; nothing else takes a selection."""
    model = peaked_llama(6)
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    gm = rewritten_decode_graph(model, ids, torch.ones_like(ids), POLICY)
    op = torch.ops.sparse_compile.attention_sharing_selection.default
    nodes = [n for n in gm.graph.nodes if n.target is op]
    assert [n.args[11] for n in nodes] == ["exact", "exact", "select", "reuse", "select", "reuse"]
    made = {}
    for layer, node in enumerate(nodes):
        out3 = [u for u in node.users if u.args[1] == 3]
        if node.args[11] == "select":
            made[layer] = out3[0]
        source = node.args[10]
        expected = {3: made.get(2), 5: made.get(4)}.get(layer)
        assert source is expected, (layer, source)


def reference_attention_factory(params: dict, layers: int):
    """An eager attention implementing LessIsMore decode with plain loops (registered through transformers'
    AttentionInterface, an explicit object: the selection of the latest selection layer is its state)."""
    budget, sink, rf = params["budget"], 4, 0.25
    n_sink, middle, n_recent = budget_split(budget, sink, rf)
    state = {}

    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        B, H, Lq, D = query.shape
        Hkv, Lk = key.shape[1], key.shape[2]
        kk = key.repeat_interleave(H // Hkv, dim=1)
        vv = value.repeat_interleave(H // Hkv, dim=1)
        layer = module.layer_idx
        if Lq > 1 or layer in params["dense_layers"] or layer < min(params["selection_layers"]):
            out = F.scaled_dot_product_attention(query, kk, vv, attn_mask=attention_mask, scale=scaling)
            return out.transpose(1, 2).contiguous(), None
        visible = attention_mask[:, 0, 0, :] if attention_mask is not None else torch.ones(B, Lk, dtype=torch.bool)
        logits = torch.einsum("bhd,bhld->bhl", query[:, :, 0].float(), kk.float()) * scaling
        if layer in params["selection_layers"]:
            out = F.scaled_dot_product_attention(query, kk, vv, attn_mask=attention_mask, scale=scaling)
            for b in range(B):
                seen = visible[b].nonzero().flatten().tolist()
                fixed = seen[:n_sink] + seen[max(n_sink, len(seen) - n_recent):]
                region = [t for t in seen if t not in fixed]
                chosen: list[int] = []
                ranked = [sorted(region, key=lambda t, h=h: -float(logits[b, h, t])) for h in range(H)]
                for r in range(len(region)):
                    for h in range(H):
                        if len(chosen) < middle and ranked[h][r] not in chosen:
                            chosen.append(ranked[h][r])
                state[b] = fixed + chosen
            return out.transpose(1, 2).contiguous(), None
        out = torch.zeros(B, H, 1, D)
        for b in range(B):
            keep = torch.tensor(state[b])
            w = torch.softmax(logits[b][:, keep], dim=-1)
            out[b, :, 0] = (w[:, None, :] @ vv[b][:, keep].float())[:, 0]
        return out.to(query.dtype).transpose(1, 2).contiguous(), None

    attend.state = state
    return attend


def compiled_generate(model, policy: dict, report, ids: torch.Tensor, kwargs: dict):
    """generate() with the model's forward compiled by the sparse backend (eager inner), forward restored after."""
    forward = model.forward
    model.forward = torch.compile(forward, backend=sparse_compile.backend(policy, inner="eager", report=report))
    try:
        return model.generate(ids, **kwargs)
    finally:
        model.forward = forward


def test_compiled_decode_equals_the_loop_reference():
    """Greedy generation through the compiled model (left-padded batch of 2) == the same model run with a
    reference attention written from the spec with loops, logits of every step included; budget >= the
    cache runs exact attention (== eager dense)."""
    model = peaked_llama(6)
    ids = torch.randint(0, 128, (2, 60), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    params = {"budget": 24, "selection_layers": [2, 4], "dense_layers": [0]}
    AttentionInterface.register("lessismore_reference", reference_attention_factory(params, 6))
    ALL_MASK_ATTENTION_FUNCTIONS.register("lessismore_reference", sdpa_mask)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, output_logits=True,
                  return_dict_in_generate=True)
    with torch.no_grad():
        dense = model.generate(ids, **kwargs)
        model.set_attn_implementation("lessismore_reference")
        ref = model.generate(ids, **kwargs)
        model.set_attn_implementation("sdpa")
        report = sparse_compile.Report()
        got = compiled_generate(model, POLICY, report, ids, kwargs)
    assert got.sequences.tolist() == ref.sequences.tolist()
    for a, b in zip(got.logits, ref.logits, strict=True):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4)
    assert max(float((a - b).abs().max()) for a, b in zip(got.logits[1:], dense.logits[1:], strict=True)) > 1e-3
    density = report.layer_density("decode")
    assert density[0] == density[1] == density[2] == density[4] == 1.0 and 0 < density[3] < 0.5
    assert report.fallbacks("decode") == {}
    big = {**POLICY, "decode": {**POLICY["decode"], "params": {**params, "budget": 4096}}}
    report = sparse_compile.Report()
    with torch.no_grad():
        exact = compiled_generate(model, big, report, ids, kwargs)
    assert exact.sequences.tolist() == dense.sequences.tolist()
    assert "call not supported by the method" in report.fallbacks("decode")[3], str(report)


def brute_force_choice(coverage: torch.Tensor, dense: set[int], count: int) -> float:
    """The best mean coverage over every admissible choice of selection layers (itertools, no DP)."""
    import itertools

    from sparse_compile.calibration.decode_attention import mean_coverage

    free = [layer for layer in range(coverage.shape[0]) if layer not in dense]
    return max(mean_coverage(coverage, dense, [free[0], *rest])
               for rest in itertools.combinations(free[1:], count - 1))


@given(n=st.integers(3, 8), count=st.integers(1, 3), dense_mask=st.integers(0, 7), seed=st.integers(0, 2**16))
def test_selection_layer_choice_is_the_best_split(n, count, dense_mask, seed):
    """The dynamic programme finds the best mean coverage that trying every choice finds, starts at the
    first non-dense layer, and its reported mean equals `mean_coverage` of the layers it returns."""
    from sparse_compile.calibration.decode_attention import choose_selection_layers, mean_coverage

    dense = {layer for layer in range(3) if dense_mask >> layer & 1}
    free = [layer for layer in range(n) if layer not in dense]
    if count > len(free):
        with pytest.raises(ValueError, match="--selections"):
            choose_selection_layers(torch.rand(n, n), dense, count)
        return
    coverage = torch.rand(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    layers, mean = choose_selection_layers(coverage, dense, count)
    assert len(layers) == count and layers[0] == free[0] and layers == sorted(layers)
    assert not set(layers) & dense
    assert mean == pytest.approx(mean_coverage(coverage, dense, layers))
    assert mean == pytest.approx(brute_force_choice(coverage, dense, count))


def test_calibrate_lessismore_end_to_end(tmp_path, capsys):
    """`calibrate lessismore` on a tiny random model writes a policy that loads, with the chosen layers and
    the coverage it measured in its header; the report holds an (N, N) matrix of fractions. The written
    policy ran the NIAH grid against eager (LessIsMore answering from 256 cached tokens on): its header and
    the report say what eager found and the policy lost; --no-niah skips the check."""
    import json

    from sparse_compile.__main__ import main
    from sparse_compile.evaluation.models import save_tiny_llama

    model = save_tiny_llama(tmp_path / "model", layers=4)
    corpus = tmp_path / "text.txt"
    corpus.write_text(" ".join(f"token{i % 97} attends to key{i % 13}." for i in range(400)))
    out, report = tmp_path / "lim.toml", tmp_path / "cov.json"
    argv = ["calibrate", "lessismore", "--model", str(model), "--corpus", str(corpus), "--length", "160",
            "--samples", "1", "--queries", "4", "--budget", "24", "--policy-budget", "64", "--selections", "2",
            "--dense-layers", "0", "--device", "cpu", "--no-progress", "--min-seq-len", "256", "--niah-lengths",
            "400", "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--report", str(report)]
    assert main(argv) == 0, capsys.readouterr().err
    policy = sparse_compile.load_policy(str(out))
    params = policy.decode.params
    assert policy.decode.method == "lessismore" and params.budget == 64 and params.dense_layers == (0,)
    chosen = json.loads(report.read_text())
    assert list(params.selection_layers) == chosen["chosen"] == chosen["calibrated"]  # no needle lost: unchanged
    assert chosen["chosen"][0] == 1 and len(chosen["chosen"]) == 2
    cov = torch.tensor(chosen["coverage"])
    assert cov.shape == (4, 4) and bool(((cov >= 0) & (cov <= 1 + 1e-9)).all())
    text = out.read_text()
    assert "mean attention mass of the reusing layers" in text
    needles = chosen["needles"]
    assert needles["samples"] == 5 and needles["lengths"] == [400] and needles["lost"] == 0
    assert needles["chosen"].startswith(f"selection layers {chosen['chosen']}")
    assert f"# Needles: eager finds {needles['eager_found']} of 5 (NIAH at 400 tokens); the policy loses 0." in text
    assert main(argv[:-4] + ["--selections", "9", "--out", str(out)]) == 2
    assert "--selections must be in [1, 3]" in capsys.readouterr().err
    skipped = tmp_path / "skipped.toml"
    assert main(argv[:-4] + ["--no-niah", "--out", str(skipped), "--report", str(report)]) == 0
    assert "Needles" not in skipped.read_text() and json.loads(report.read_text())["needles"] is None


@given(B=st.integers(1, 3), Lk=st.integers(1, 40), q_offset=st.integers(0, 50), window=st.integers(0, 12),
       causal=st.booleans(), padded=st.booleans(), seed=st.integers(0, 2**16))
def test_visible_count_equals_the_mask(B, Lk, q_offset, window, causal, padded, seed):
    """The reusing layer's density denominator (arithmetic without a key mask) == the visible keys the mask
    gives, at least 1."""
    from sparse_compile.attention_mask import AttentionMask

    key_valid = torch.rand(B, Lk, generator=torch.Generator().manual_seed(seed)) > 0.4 if padded else None
    mask = AttentionMask(causal=causal, q_offset=q_offset, window=window, key_valid=key_valid)
    want = lessismore.decode_visible(mask, B, Lk, torch.device("cpu")).sum(dim=1).clamp(min=1).float()
    assert torch.equal(lessismore.visible_count(mask, B, Lk, torch.device("cpu")), want)


def authors_formulation_factory(params: dict, log: list):
    """LessIsMore decode written the way the authors' code states it (K/V expanded to the query heads, one
    (H, middle) top-k of the middle region, the union as the rank-major flattening of it with duplicates
    dropped, truncated at `middle`; sink and recent as position ranges of the cache), independent of
    sparse_compile.kernels.lessismore. For B = 1 without padding (the NIAH path). `log` gets (layer, Lk,
    selection) at every selection."""
    n_sink, middle, n_recent = budget_split(params["budget"], 4, 0.25)
    state: dict = {"layer": -1, "selection": None}

    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        H, Lq, Lk = query.shape[1], query.shape[2], key.shape[2]
        kk = key.repeat_interleave(H // key.shape[1], dim=1)
        vv = value.repeat_interleave(H // key.shape[1], dim=1)
        layer = module.layer_idx
        if layer <= state["layer"]:  # a new forward: no selection carried over from the previous step
            state["selection"] = None
        state["layer"] = layer
        full = F.scaled_dot_product_attention(query, kk, vv, attn_mask=attention_mask, scale=scaling,
                                              is_causal=attention_mask is None and Lq > 1)
        reuse = state["selection"] is not None and layer not in params["selection_layers"]
        if Lq > 1 or layer in params["dense_layers"] or not (layer in params["selection_layers"] or reuse):
            return full.transpose(1, 2).contiguous(), None
        logits = torch.einsum("hd,hld->hl", query[0, :, 0].float(), kk[0].float()) * scaling  # (H, Lk)
        if layer in params["selection_layers"]:
            recent_start = Lk - n_recent
            top = torch.topk(logits[:, n_sink:recent_start], middle, dim=-1).indices + n_sink  # (H, middle)
            union = list(dict.fromkeys(top.t().reshape(-1).tolist()))[:middle]  # rank-major, then head
            state["selection"] = torch.tensor(list(range(n_sink)) + union + list(range(recent_start, Lk)))
            log.append((layer, Lk, state["selection"]))
            return full.transpose(1, 2).contiguous(), None
        keep = state["selection"]
        w = torch.softmax(logits[:, keep], dim=-1)  # (H, budget)
        out = (w[:, None, :] @ vv[0][:, keep].float())[:, 0]  # (H, D)
        return out.to(query.dtype)[None, :, None].transpose(1, 2).contiguous(), None

    return attend


def test_compiled_needle_path_equals_the_authors_formulation():
    """The path NIAH takes (sparse_compile.evaluation.needle.greedy_generate): a DynamicCache, B = 1, no
    attention_mask, one compiled call per decode step, so the cache grows by one token per step (the first
    decode graph has static lengths, the next ones SymInt lengths). The compiled model's logits at every
    step == the same model with LessIsMore written as the authors' code states it; the selections really
    change with the step (a stale selection or stale sink/recent offsets would be caught)."""
    model = peaked_llama(6)
    ids = torch.randint(0, 128, (1, 70), generator=torch.Generator().manual_seed(5))
    params = {"budget": 24, "selection_layers": [2, 4], "dense_layers": [0]}
    log: list = []
    AttentionInterface.register("lessismore_authors", authors_formulation_factory(params, log))
    ALL_MASK_ATTENTION_FUNCTIONS.register("lessismore_authors", sdpa_mask)

    def greedy(forward, steps=6):
        cache = DynamicCache(config=model.config)
        out = forward(input_ids=ids, **{CACHE_ARG: cache}, use_cache=True)
        tokens, logits = [int(out.logits[0, -1].argmax())], []
        for _ in range(steps):
            out = forward(input_ids=torch.tensor([[tokens[-1]]]), **{CACHE_ARG: cache}, use_cache=True)
            logits.append(out.logits[0, -1])
            tokens.append(int(out.logits[0, -1].argmax()))
        return tokens, torch.stack(logits)

    report = sparse_compile.Report()
    with torch.no_grad():
        dense_tokens, dense_logits = greedy(model)
        model.set_attn_implementation("lessismore_authors")
        ref_tokens, ref_logits = greedy(model)
        model.set_attn_implementation("sdpa")
        fast = torch.compile(model, backend=sparse_compile.backend(POLICY, inner="eager", report=report))
        got_tokens, got_logits = greedy(fast)
    assert got_tokens == ref_tokens
    torch.testing.assert_close(got_logits, ref_logits, atol=2e-4, rtol=2e-4)
    assert float((got_logits - dense_logits).abs().max()) > 1e-3  # the method really ran
    assert report.fallbacks("decode") == {}
    lengths = sorted({lk for _, lk, _ in log})
    assert lengths == list(range(71, 77)), lengths  # one selection per step, on the grown cache
    recent = [set(sel.tolist()) for layer, _, sel in log if layer == 2]
    assert all(lk - 1 in sel for (_, lk, _), sel in zip([e for e in log if e[0] == 2], recent, strict=True))
