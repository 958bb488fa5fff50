"""Token Sparse Attention (`token_sparse`): dense at dropped_mass 0, kept rows equal attention restricted to
the kept tokens on original positions, dropped rows zero, gather/scatter kernels equal their references,
Dynamic Token Coverage against a plain re-implementation, stacking, fallbacks, and a compiled model."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples
from test_backend import tiny_llama

import sparse_compile
from sparse_compile.attention_mask import AttentionMask, SiteFacts, exact_attention_reference
from sparse_compile.kernels.token_sparse import (
    gather_qkv,
    gather_qkv_reference,
    scatter_rows,
    scatter_rows_reference,
    smooth_scores,
    token_scores,
)
from sparse_compile.methods import token_sparse as ts
from sparse_compile.ops import CallShape
from sparse_compile.params import PolicyError

SITE = SiteFacts(layer=0, rope="rotate_half", rotary_dim=16, head_dim=16, num_heads=4, num_kv_heads=2)


def tensors(B, H, Hkv, L, D, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, L, D, generator=g, dtype=dtype)
    k[:, :, torch.randperm(L, generator=g)[:5]] *= 3  # a few loud keys, so coverage has something to find
    v = torch.randn(B, Hkv, L, D, generator=g, dtype=dtype)
    return q, k, v


@st.composite
def problems(draw):
    """A prefill call: GQA, B up to 2 with the last row left-padded, lengths and widths off any grid."""
    Hkv = draw(st.sampled_from([1, 2]))
    H = Hkv * draw(st.sampled_from([1, 2]))
    D = draw(st.sampled_from([8, 24]))
    B = draw(st.integers(1, 2))
    recent = draw(st.integers(1, 12))
    min_keep = draw(st.integers(0, 20))
    L = draw(st.integers(min_keep + recent + 1, min_keep + recent + 60))
    pad = draw(st.integers(0, L // 3))
    key_valid = None
    if pad:
        key_valid = torch.ones(B, L, dtype=torch.bool)
        key_valid[-1, :pad] = False
    params = ts.TokenSparseParams(dropped_mass=draw(st.sampled_from([0.0, 0.01, 0.2, 0.6])), min_keep=min_keep,
                                  recent=recent, smooth=draw(st.sampled_from([1, 3, 7])))
    return B, H, Hkv, L, D, AttentionMask(causal=True, key_valid=key_valid), params, draw(st.integers(0, 999))


def restricted_reference(q, k, v, mask: AttentionMask, keep: torch.Tensor, scale: float) -> torch.Tensor:
    """Exact attention where query i and key j take part only if both are kept by the head, causal on the
    ORIGINAL positions; rows of dropped tokens see nothing, so they are zeros."""
    both = keep[:, :, :, None] & keep[:, :, None, :]  # (B, H, L, L)
    return exact_attention_reference(q.double(), k.double(), v.double(),
                                     AttentionMask(causal=True, key_valid=mask.key_valid, dense_mask=both), scale)


@settings(max_examples=examples(12), deadline=None)
@given(problems())
def test_kept_rows_are_attention_over_kept_tokens_and_dropped_rows_are_zero(problem):
    B, H, Hkv, L, D, mask, params, seed = problem
    q, k, v = tensors(B, H, Hkv, L, D, seed)
    torch.manual_seed(seed)
    out, parts = ts.attention(q, k, v, mask, SITE, params, 0.3)
    density, kept, inner = parts.unbind(-1)  # alone: total == kept fraction, inner 1
    assert bool((inner == 1).all()) and torch.equal(density, kept)
    sel = ts.token_select(q, k, v, mask, SITE, params, 0.3)
    keep = sel.keep_mask()
    ref = restricted_reference(q, k, v, mask, keep, 0.3)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    assert torch.equal(out[~keep], torch.zeros_like(out[~keep]))  # dropped rows: exactly zero
    valid = torch.ones(B, L, dtype=torch.bool) if mask.key_valid is None else mask.key_valid
    # selection invariants: padded tokens never kept, valid recent tokens always kept, one count per row
    assert not (keep & ~valid[:, None]).any()
    assert bool((keep[..., L - params.recent:] == valid[:, None, L - params.recent:]).all())
    counts = keep.sum(-1)
    assert bool((counts == counts[:, :1]).all()) and counts[:, 0].tolist() == list(sel.kept_host)
    prefix_valid = valid[:, : L - params.recent].sum(-1)
    assert bool((counts[:, 0] - valid[:, L - params.recent:].sum(-1) >= prefix_valid.clamp_max(params.min_keep)).all())
    torch.testing.assert_close(density, counts.float() / valid.sum(-1, keepdim=True).float())
    if params.dropped_mass == 0.0:  # nothing dropped: exact attention
        assert bool(keep.eq(valid[:, None]).all()) and bool((density == 1).all())
        exact = exact_attention_reference(q.double(), k.double(), v.double(), mask, 0.3)
        torch.testing.assert_close(out.double(), exact, atol=2e-5, rtol=2e-5)


def coverage_by_hand(q, k, params: ts.TokenSparseParams, scale: float) -> list[torch.Tensor]:
    """The authors' selection for B = 1 without padding, written as plainly as possible: per head the
    sorted kept positions."""
    L = q.shape[2]
    w, P = params.recent, q.shape[2] - params.recent
    G = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(G, dim=1)[0].double()
    A = torch.zeros(q.shape[1], P, dtype=torch.float64)
    for h in range(q.shape[1]):
        for i in range(L - w, L):
            logits = (q[0, h, i].double() @ kk[h, : i + 1].T) * scale
            A[h] += torch.softmax(logits, -1)[:P] / w
    A = torch.nn.functional.avg_pool1d(A[:, None], params.smooth, 1, params.smooth // 2)[:, 0]
    g = A.mean(0)
    g = g / (g.sum() + 1e-8)
    n_drop = int((torch.cumsum(torch.sort(g).values, 0) < params.dropped_mass).sum())
    n_drop = n_drop + 1 if n_drop else 0
    n_keep = max(params.min_keep, P - n_drop)
    heads = []
    for h in range(q.shape[1]):
        a = A[h] / (A[h].sum() + 1e-8)
        top = torch.sort(a, descending=True, stable=True).indices[:n_keep]
        heads.append(torch.cat([top, torch.arange(P, L)]).sort().values)
    return heads


@pytest.mark.parametrize("dropped_mass, min_keep", [(0.05, 4), (0.3, 10), (0.3, 200), (0.9, 0)])
def test_dynamic_token_coverage_matches_a_plain_reimplementation(dropped_mass, min_keep):
    q, k, _ = tensors(1, 4, 2, 90, 16, seed=11)
    params = ts.TokenSparseParams(dropped_mass=dropped_mass, min_keep=min_keep, recent=10, smooth=5)
    sel = ts.token_select(q, k, k, AttentionMask(), SITE, params, 0.25)
    for h, want in enumerate(coverage_by_hand(q, k, params, 0.25)):
        n = sel.kept_host[0]
        assert torch.equal(sel.idx[0, h, :n].long(), want), (h, sel.idx[0, h, :n], want)


@pytest.mark.parametrize("H, Hkv", [(4, 2), (6, 2), (3, 3)])
def test_output_equals_the_authors_compress_attend_decompress(H, Hkv):
    """The whole method against the authors' formulation, step by step: the kept positions per head
    (`coverage_by_hand`), Q and the *expanded* K/V gathered at them, plain causal SDPA on the compressed
    sequence, the result scattered into zeros (so a dropped token's attention output is exactly 0, and
    through a bias-free o_proj its residual stream passes the layer unchanged). Nothing else: no rescaling
    of the kept rows, no mixing of the layer input into dropped rows."""
    q, k, v = tensors(1, H, Hkv, 96, 16, seed=3)
    params = ts.TokenSparseParams(dropped_mass=0.2, min_keep=10, recent=12, smooth=7)
    site = dataclasses.replace(SITE, num_heads=H, num_kv_heads=Hkv)
    out, density = ts.attention(q, k, v, AttentionMask(), site, params, 0.25)
    G = H // Hkv
    kk, vv = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    want = torch.zeros_like(q)
    kept = coverage_by_hand(q, k, params, 0.25)
    for h, idx in enumerate(kept):
        qc, kc, vc = q[0, h, idx], kk[0, h, idx], vv[0, h, idx]
        want[0, h, idx] = torch.nn.functional.scaled_dot_product_attention(
            qc[None], kc[None], vc[None], is_causal=True, scale=0.25)[0]
    assert len(kept[0]) < 96  # tokens were really dropped
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    dropped = torch.ones(H, 96, dtype=torch.bool)
    for h, idx in enumerate(kept):
        dropped[h, idx] = False
    assert bool((out[0][dropped] == 0).all())
    assert torch.allclose(density[0, :, 1], torch.full((H,), len(kept[0]) / 96))


@settings(max_examples=examples(8), deadline=None)
@given(B=st.integers(1, 2), Hkv=st.sampled_from([1, 3]), G=st.sampled_from([1, 2]), L=st.integers(1, 90),
       Lc=st.integers(0, 90), D=st.sampled_from([8, 24, 80]), dtype=st.sampled_from([torch.float32, torch.float16]),
       seed=st.integers(0, 99))
def test_triton_gather_and_scatter_equal_their_references(B, Hkv, G, L, Lc, D, dtype, seed):
    """Interpreter kernels == torch.gather references on drawn shapes, slots of -1 included; outputs are
    poisoned before the kernel runs (torch.empty) and compared exactly (they are copies)."""
    H = Hkv * G
    q, k, v = tensors(B, H, Hkv, L, D, seed, dtype)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(-1, L, (B, H, Lc), generator=g, dtype=torch.int32)
    for got, want in zip(gather_qkv(q, k, v, idx, impl="triton"), gather_qkv_reference(q, k, v, idx), strict=True):
        assert torch.equal(got, want)
    oc = torch.randn(B, H, Lc, D, generator=g).to(dtype)
    inv = torch.randint(-1 if Lc else -1, max(Lc, 0), (B, H, L), generator=g, dtype=torch.int32)
    assert torch.equal(scatter_rows(oc, inv, impl="triton"), scatter_rows_reference(oc, inv))


def test_gather_then_scatter_round_trips_the_kept_rows():
    q, k, v = tensors(2, 4, 2, 70, 16, seed=2)
    params = ts.TokenSparseParams(dropped_mass=0.3, min_keep=5, recent=8, smooth=3)
    sel = ts.token_select(q, k, v, AttentionMask(), SITE, params, 0.25)
    qc, _, vc = gather_qkv(q, k, v, sel.idx, impl="triton")
    keep = sel.keep_mask()
    back = scatter_rows(qc, sel.inv, impl="triton")
    assert torch.equal(back[keep], q[keep]) and not back[~keep].any()
    assert torch.equal(scatter_rows(vc, sel.inv, impl="triton")[keep],
                       v.repeat_interleave(2, dim=1)[keep])
    for b, n in enumerate(sel.kept_host):  # ascending (causal stays causal), then -1 past the row's count
        assert bool((sel.idx[b, :, 1:n] > sel.idx[b, :, : n - 1]).all()) and bool((sel.idx[b, :, n:] == -1).all())


@pytest.mark.parametrize("pad", [0, 17])
def test_triton_path_equals_the_reference_path(pad):
    """Scoring (PBS's kernels with `recent` rows), gather and scatter under the interpreter == the CPU
    reference path, end to end, with and without left padding."""
    q, k, v = tensors(2, 4, 2, 120, 16, seed=4)
    key_valid = torch.ones(2, 120, dtype=torch.bool)
    key_valid[1, :pad] = False
    mask = AttentionMask(key_valid=key_valid if pad else None)
    params = ts.TokenSparseParams(dropped_mass=0.2, min_keep=10, recent=16, smooth=5)
    ref_scores = token_scores(q, k, key_valid=mask.key_valid, scale=0.3, recent=16, impl="reference")
    tri_scores = token_scores(q, k, key_valid=mask.key_valid, scale=0.3, recent=16, impl="triton")
    torch.testing.assert_close(tri_scores, ref_scores, atol=1e-6, rtol=1e-5)
    out_ref, d_ref = ts.attention(q, k, v, mask, SITE, params, 0.3, impl="reference")
    out_tri, d_tri = ts.attention(q, k, v, mask, SITE, params, 0.3, impl="triton")
    torch.testing.assert_close(out_tri, out_ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(d_tri, d_ref) and bool((d_ref[..., 0] < 1).all())


def test_smoothing_keeps_length_and_mass_inside():
    x = torch.zeros(1, 1, 9)
    x[0, 0, 4] = 7.0
    assert torch.equal(smooth_scores(x, 7)[0, 0], torch.tensor([0, 1, 1, 1, 1, 1, 1, 1, 0.0]))
    assert torch.equal(smooth_scores(x, 1), x)


@pytest.mark.parametrize("inner, inner_params", [
    ("prism", {"block_size": 64, "threshold_high": 1.0, "threshold_low": 1.0}),
    ("pbs", {"block_size": 16, "segment_size": 32, "threshold": 1.0}),
])
def test_stacked_at_full_budget_equals_token_sparse_alone(inner, inner_params):
    """The inner method at threshold 1.0 computes every block of the compressed sequence: the same output
    as token_sparse alone; at a lower threshold it runs sparse (density below the kept fraction)."""
    q, k, v = tensors(2, 4, 2, 200, 16, seed=6)
    key_valid = torch.ones(2, 200, dtype=torch.bool)
    key_valid[0, :23] = False
    mask = AttentionMask(key_valid=key_valid)
    base = dict(dropped_mass=0.2, min_keep=16, recent=16, smooth=3)
    alone, d_alone = ts.attention(q, k, v, mask, SITE, ts.TokenSparseParams(**base), 0.3)
    stacked, d_stacked = ts.attention(q, k, v, mask, SITE, ts.TokenSparseParams(
        **base, inner=inner, inner_params=inner_params), 0.3)
    torch.testing.assert_close(stacked, alone, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(d_stacked, d_alone)
    low = {**inner_params, **({"threshold": 0.3} if inner == "pbs" else {"threshold_high": 0.3, "threshold_low": 0.3})}
    sparse, d_sparse = ts.attention(q, k, v, mask, SITE, ts.TokenSparseParams(**base, inner=inner, inner_params=low),
                                    0.3)
    assert torch.isfinite(sparse).all() and bool((d_sparse <= d_alone).all()) and d_sparse.mean() < d_alone.mean()
    # the factors: the same kept fraction, the inner block density below 1, their product the total
    assert torch.equal(d_sparse[..., 1], d_alone[..., 1]) and float(d_sparse[..., 2].mean()) < 1.0
    torch.testing.assert_close(d_sparse[..., 0], d_sparse[..., 1] * d_sparse[..., 2])


L8 = SiteFacts(layer=8)


@pytest.mark.parametrize("call, site, needle", [
    (CallShape(1, 4, 2, 100, 300, 64, torch.float32, "cpu"), L8, "q_len 100 != kv_len 300"),
    (CallShape(1, 4, 2, 1, 300, 64, torch.float32, "cpu"), L8, "q_len 1 != kv_len 300"),
    (CallShape(1, 4, 2, 3000, 3000, 64, torch.float32, "cpu", window=128), L8, "sliding window 128"),
    (CallShape(1, 4, 2, 3000, 3000, 64, torch.float32, "cpu", causal=False), L8, "not causal"),
    (CallShape(1, 4, 2, 1152, 1152, 64, torch.float32, "cpu"), L8, "q_len 1152 <= min_keep + recent = 1152"),
    (CallShape(1, 4, 2, 3000, 3000, 512, torch.float16, "cuda"), L8, "head_dim 512"),
    (CallShape(1, 4, 2, 3000, 3000, 64, torch.float64, "cuda"), L8, "dtype torch.float64 on CUDA"),
    (CallShape(1, 4, 2, 3000, 3000, 64, torch.float32, "cpu"), SiteFacts(layer=3),
     "layer 3 is not in layers [5, '7-9']"),
])
def test_unsupported_calls_name_the_reason(call, site, needle):
    params = ts.TokenSparseParams(layers=[5, "7-9"])
    assert needle in ts.unsupported(call, site, params)
    ok = CallShape(1, 4, 2, 3000, 3000, 64, torch.float32, "cpu")
    assert ts.unsupported(ok, SiteFacts(layer=8), params) is None
    assert "dropped_mass = 0" in ts.unsupported(ok, SiteFacts(layer=8), ts.TokenSparseParams(dropped_mass=0.0))


def test_policy_and_params_validation():
    assert sparse_compile.load_policy("token_sparse-lossy").prefill.params.layers is None  # generic: every layer
    policy = sparse_compile.load_policy("token_sparse-smollm2")
    assert policy.prefill.method == "token_sparse" and policy.prefill.params.layers == ("3-7", "9-10", "12-17", "25-26")
    assert policy.prefill.params.runs_on(14) and not policy.prefill.params.runs_on(8)
    stacked = sparse_compile.load_policy({"prefill": {"method": "token_sparse", "params": {
        "inner": "prism", "layers": [3, "1-2"], "inner_params": {"threshold_high": 0.9}}}})
    p = stacked.prefill.params
    assert p.layers == ("1-3",) and p.inner_params.threshold_high == 0.9 and hash(p)
    for bad, needle in [({"smooth": 4}, "must be odd"), ({"inner": "token_sparse"}, "key 'inner'"),
                        ({"inner_params": {"threshold": 1.0}}, "without 'inner'"),
                        ({"inner": "pbs", "inner_params": {"thresold": 1.0}}, "unknown key 'thresold'"),
                        ({"layers": ["9-2"]}, "empty"), ({"recent": 0}, "recent"),
                        ({"dropped_mass": float("nan")}, "dropped_mass")]:
        with pytest.raises(PolicyError, match=needle) as err:
            sparse_compile.load_policy({"prefill": {"method": "token_sparse", "params": bad}})
        assert str(err.value).startswith("<mapping>: [prefill].params: ")  # the table is named


def reference_attention_function(params: ts.TokenSparseParams, key_valid: torch.Tensor):
    """A transformers attention function (AttentionInterface) that runs the method's CPU reference path
    on the eager model: the independent side of the compiled-model check."""

    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        site = SiteFacts(layer=module.layer_idx, head_dim=query.shape[-1], rotary_dim=query.shape[-1],
                         num_heads=query.shape[1], num_kv_heads=key.shape[1])
        call = CallShape(query.shape[0], query.shape[1], key.shape[1], query.shape[2], key.shape[2], query.shape[-1],
                         query.dtype, "cpu")
        mask = AttentionMask(causal=True, key_valid=key_valid)
        if ts.unsupported(call, site, params):
            out = exact_attention_reference(query, key, value, mask, scaling)
        else:
            out, _ = ts.attention(query, key, value, mask, site, params, scaling, impl="reference")
        return out.transpose(1, 2).contiguous(), None

    return attend


def test_compiled_model_equals_the_method_reference():
    """A 3-layer GQA Llama, B = 2 with left padding, token_sparse on layers 1-2: the compiled model (the
    fused node) == the eager model running the method's reference as its attention function; the Report
    shows the kept fraction on the sparse layers and why layer 0 runs exact attention."""
    from transformers import AttentionInterface

    model = tiny_llama(3)
    ids = torch.randint(0, 128, (2, 120), generator=torch.Generator().manual_seed(0))
    attn = torch.ones_like(ids)
    attn[1, :15] = 0
    table = {"dropped_mass": 0.3, "min_keep": 8, "recent": 16, "smooth": 3, "layers": ["1-2"]}
    policy = {"name": "ts-test", "prefill": {"method": "token_sparse", "params": table}}
    with torch.no_grad():
        fast = sparse_compile.compile(model, policy, inner="eager")
        out = fast(ids, attention_mask=attn).logits
        AttentionInterface.register("token_sparse_test_reference",
                                    reference_attention_function(ts.TokenSparseParams(**table), attn.bool()))
        model.set_attn_implementation("token_sparse_test_reference")
        ref = model(ids, attention_mask=attn).logits
        model.set_attn_implementation("sdpa")
        dense = model(ids, attention_mask=attn).logits
    keep = attn.bool()
    torch.testing.assert_close(out[keep], ref[keep], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[keep], dense[keep], atol=1e-3)  # tokens were really dropped
    report = fast.sparse_report
    density = report.layer_density("prefill")
    assert density[0] == 1.0 and 0 < density[1] < 1 and 0 < density[2] < 1, density
    assert "layer 0 is not in layers ['1-2']" in str(report)
    parts = report.layer_density_parts("prefill")  # alone: kept == density, inner 1; layer 0 ran exact
    assert parts[0] == {"kept": 1.0, "inner": 1.0}
    assert all(abs(parts[i]["kept"] - density[i]) < 1e-6 and parts[i]["inner"] == 1.0 for i in (1, 2)), parts
    assert "density factors in the latest prefill call" in str(report)
    assert f"kept {parts[1]['kept']:.3f}, inner 1.000" in str(report)


def test_calibration_measures_drift_and_writes_a_policy_that_loads(tmp_path):
    """`calibrate token_sparse` on a saved tiny model: the drift of each layer equals the relative residual
    update computed from output_hidden_states, the layers at or below the median are written, and the
    written policy loads back (layers replaced, everything else from the shipped policy). The policy ran
    the NIAH grid against eager and its header says what eager found and the policy lost; --no-niah skips."""
    from sparse_compile.calibration import drift as cal
    from sparse_compile.calibration import run_calibration
    from sparse_compile.evaluation.models import save_tiny_llama

    save_tiny_llama(tmp_path / "m", layers=4)
    out = tmp_path / "p.toml"
    argv = ["--model", str(tmp_path / "m"), "--corpus", "licenses", "--lengths", "200", "--windows", "1",
            "--no-progress", "--niah-lengths", "400", "--cache-dir", str(tmp_path / "cache")]
    assert run_calibration("token_sparse", argv + ["--out", str(out)]) == 0
    text = out.read_text()
    assert re.search(r"# Needles: eager finds \d of 5 \(NIAH at 400 tokens\); the policy loses 0\.\n", text), text
    skipped = tmp_path / "skipped.toml"
    assert run_calibration("token_sparse", argv + ["--no-niah", "--out", str(skipped)]) == 0
    assert "Needles" not in skipped.read_text()
    policy = sparse_compile.load_policy(str(out))
    assert sparse_compile.load_policy(str(skipped)).to_dict() == policy.to_dict()
    shipped = sparse_compile.load_policy("token_sparse-smollm2")
    model = tiny_llama(4)
    ids = torch.randint(0, 128, (64,), generator=torch.Generator().manual_seed(1))
    drift = cal.layer_drift(model, [ids], progress=False)
    with torch.no_grad():
        hidden = model(ids[None], output_hidden_states=True).hidden_states
    for i in range(3):  # the last entry of hidden_states is after the final norm
        want = ((hidden[i + 1] - hidden[i]).norm(dim=-1) / hidden[i].norm(dim=-1)).mean()
        assert abs(float(drift[i]) - float(want)) < 1e-5
    assert cal.sparse_layers(torch.tensor([0.9, 0.1, 0.5, 0.3], dtype=torch.float64), 0.5) == [1, 3]
    layers = policy.prefill.params.layers
    assert layers and sum(1 for i in range(4) if policy.prefill.params.runs_on(i)) == 2
    assert policy.prefill.params == dataclasses.replace(shipped.prefill.params, layers=layers)
    with pytest.raises(ValueError, match="quantile"):
        run_calibration("token_sparse", ["--model", str(tmp_path / "m"), "--quantile", "2", "--no-progress"])


def test_an_all_padding_row_is_zeros_and_counts_as_exact():
    q, k, v = tensors(2, 2, 1, 60, 8, seed=9)
    key_valid = torch.ones(2, 60, dtype=torch.bool)
    key_valid[1] = False
    mask = AttentionMask(key_valid=key_valid)
    out, parts = ts.attention(q, k, v, mask, SITE, ts.TokenSparseParams(dropped_mass=0.3, min_keep=4, recent=8,
                                                                        smooth=3), 0.3)
    density = parts[..., 0]
    assert not out[1].any() and bool((density[1] == 1).all()) and bool((density[0] < 1).all())


@pytest.mark.parametrize("L, min_seq_len", [(200, 0), (200, 500), (16, 0)])
def test_node_density_factors_match_the_fake_shape(L, min_seq_len):
    """The op's density is (B, H, 3) for token_sparse whether the method ran (L=200), the node fell back for
    min_seq_len (500) or the method declined the call (L=16 <= min_keep + recent): the fake impl's shape, so
    the compiled graph and the Report see one layout."""
    from sparse_compile.ops import fake_node, node_config, run_node

    B, H, Hkv, D = 2, 4, 2, 16
    q, k, v = tensors(B, H, Hkv, L, D, seed=3)
    params = ts.TokenSparseParams(dropped_mass=0.3, min_keep=8, recent=8, smooth=3)
    config = node_config("token_sparse", params, min_seq_len, SITE)
    args = (q, k, v, None, None, 0.25, True, 0, 0, config)
    out, density, code = run_node(*args)
    fake = fake_node(*args)
    assert density.shape == fake[1].shape == (B, H, 3) and out.shape == fake[0].shape
    total, kept, inner = density.unbind(-1)
    torch.testing.assert_close(total, kept * inner)
    assert bool((inner == 1).all())
    assert (int(code) == 0) == (L == 200 and min_seq_len == 0)
    assert bool((kept < 1).all()) == (int(code) == 0)
