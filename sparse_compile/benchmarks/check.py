"""`python -m sparse_compile bench --what check`: GPU correctness of the kernels and methods (CUDA only).

Asserted (a failing row makes `bench` exit 1):
  engine       `block_sparse_attention` vs its float32 reference on random lists: GQA, odd lengths, D 32-128,
               per-head and per-KV-head lists in any order, permuted keys, window, padding, the dense engine
  head_dims    the default launch config for D in {64, 80, 96, 128, 192, 256} x GQA group {1, 4, 8} x bf16/fp16
               x {causal, window, left padding, q_len < kv_len}, a few thousand tokens
               (tol 2e-2 bf16, 3e-3 fp16: |ours - ref| <= tol * (1 + |ref|), no NaN; outputs poisoned first)
  nonfinite    NaN/inf planted in q/K/V: the same NaN rows as the reference and the same finite values
  sparse_decode  the split-K decode kernel (dense method's decode, index lists) incl. the non-finite contract
  page_select  the two-stage selection kernels (page bounds, candidate scores) vs their references, the bound
               property, FASA's two-stage selection through the kernels vs through PyTorch
  compiled     a random 2-layer Llama in bf16 compiled with every prefill method at min_seq_len 0, with and
               without mode="reduce-overhead": finite logits, and the exact methods within 0.1 of eager
  capture      every declared bench case in a phase its Method declares capturable: captured in a CUDA graph,
               replayed, equal to an eager call (relative error <= 1e-3: equal but for a reduction order)
Recorded, not asserted (a selection may flip at a threshold between the GPU and the CPU arithmetic):
  methods      every declared bench case (`Method.bench_cases`) on CUDA vs the method's CPU reference on
               the same structured inputs: relative error of the output and both densities
"""

from __future__ import annotations

import math
from typing import Any

import torch

import sparse_compile
from sparse_compile.attention_mask import AttentionMask, SiteFacts, exact_attention_reference
from sparse_compile.benchmarks.methods import case_call, case_name, case_params
from sparse_compile.benchmarks.timing import capture, rel_err, structured_qkv
from sparse_compile.kernels.block_mask import BlockList
from sparse_compile.kernels.block_sparse_attention import block_sparse_attention, block_sparse_attention_reference
from sparse_compile.kernels.sparse_decode import sparse_decode_attention
from sparse_compile.methods import METHODS, dense
from sparse_compile.report import total

BLOCK = 128
DECODE_TOL = {torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float32: 1e-5}


def check_engine(seed: int = 0) -> list[dict]:
    """GPU checks: fp16/bf16 kernel vs the float32 reference on random lists, GQA, odd lengths,
    D in {32, 64, 96, 128}, per-head and per-KV-head lists, permuted keys, window, padding, dense
    engine. Outputs are poisoned (NaN) first."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    rows = []
    cases = [
        # B, H, Hkv, Lq, Lk, D, dtype, per_kv_lists, extra
        (1, 8, 2, 1000, 1000, 128, torch.bfloat16, False, {}),
        (2, 8, 2, 777, 1300, 64, torch.float16, True, {}),
        (1, 4, 4, 513, 513, 96, torch.bfloat16, False, {"causal": False}),
        (1, 6, 2, 640, 900, 32, torch.float16, False, {"window": 300}),
        (2, 4, 1, 900, 900, 128, torch.bfloat16, True, {"kv_order": True}),
        (2, 8, 2, 700, 1000, 128, torch.float16, False, {"key_valid": True}),
        (1, 8, 2, 1111, 1500, 128, torch.bfloat16, None, {}),  # dense engine (no lists)
        (1, 8, 2, 1024, 1024, 64, torch.bfloat16, None, {"window": 200}),
        (1, 4, 2, 600, 600, 128, torch.float32, False, {}),
    ]
    for B, H, Hkv, Lq, Lk, D, dtype, per_kv, extra in cases:
        q = torch.randn(B, H, Lq, D, device=dev, dtype=dtype, generator=g)
        k = torch.randn(B, Hkv, Lk, D, device=dev, dtype=dtype, generator=g)
        v = torch.randn(B, Hkv, Lk, D, device=dev, dtype=dtype, generator=g)
        kw = {k_: v_ for k_, v_ in extra.items() if k_ not in ("kv_order", "key_valid")}
        if extra.get("kv_order"):
            seg = 256  # permute inside segments, like PBS-Attn
            order = torch.arange(Lk, device=dev).repeat(B, Hkv, 1)
            for s0 in range(0, Lk - seg + 1, seg):
                perm = torch.argsort(torch.rand(B, Hkv, seg, device=dev, generator=g), dim=-1)
                order[..., s0:s0 + seg] = s0 + perm
            kw["kv_order"] = order
            k = torch.gather(k, 2, order[..., None].expand(-1, -1, -1, D))
            v = torch.gather(v, 2, order[..., None].expand(-1, -1, -1, D))
        if extra.get("key_valid"):
            kw["key_valid"] = torch.rand(B, Lk, device=dev, generator=g) < 0.8
        lists = {}
        if per_kv is not None:
            Hm = Hkv if per_kv else H
            nq, nk = math.ceil(Lq / BLOCK), math.ceil(Lk / BLOCK)
            dense = torch.rand(B, Hm, nq, nk, device=dev, generator=g) < 0.5
            bl = BlockList.from_dense(dense, BLOCK, Lq, Lk)
            # shuffle each row's defined entries: lists may come in any order
            perm = torch.argsort(torch.rand(bl.kv_indices.shape, device=dev, generator=g), dim=-1)
            slot = torch.arange(bl.kv_indices.shape[-1], device=dev)
            key = torch.where(slot < bl.kv_num_blocks[..., None], perm, perm + 10**6)
            shuffled = torch.gather(bl.kv_indices, -1, torch.argsort(key, dim=-1))
            lists = {"kv_num_blocks": bl.kv_num_blocks, "kv_indices": shuffled.contiguous()}
        out = torch.full_like(q, float("nan"))
        block_sparse_attention(q, k, v, **lists, out=out, **kw)
        ref = block_sparse_attention_reference(q.float(), k.float(), v.float(), **lists, **kw)
        err = ((out.float() - ref).norm() / ref.norm().clamp_min(1e-12)).item()
        nan = bool(out.isnan().any())
        tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
        row = {"check": "engine", "shape": f"B{B} H{H}/{Hkv} Lq{Lq} Lk{Lk} D{D} {str(dtype)[6:]}",
               "lists": "none" if per_kv is None else ("per-kv" if per_kv else "per-head"),
               "extra": ",".join(extra) or "-", "rel_err": err, "nan": nan, "ok": (not nan) and err < tol}
        rows.append(row)
    return rows


def _bench(fn, rep_ms: float) -> float:
    import triton

    return float(triton.testing.do_bench(fn, warmup=max(10.0, rep_ms / 4), rep=rep_ms, return_mode="median"))


HEAD_DIMS = (64, 80, 96, 128, 192, 256)
GROUPS = (1, 4, 8)
TOL = {torch.bfloat16: 2e-2, torch.float16: 3e-3}
CASES = {  # name: (B, Lq, Lk, window, left padding per batch row)
    "causal": (1, 3000, 3000, 0, None),
    "window": (1, 3000, 3000, 700, None),
    "left-pad": (2, 2500, 2500, 0, (0, 700)),
    "q<kv": (1, 800, 3000, 0, None),
}


def random_inputs(B: int, H: int, Hkv: int, Lq: int, Lk: int, D: int, dtype: torch.dtype, g: torch.Generator,
                  left_pad: tuple[int, ...] | None = None) -> tuple[Any, ...]:
    """Random q (B, H, Lq, D), k, v (B, Hkv, Lk, D) on CUDA and key_valid (B, Lk) for left padding (or None)."""
    dev = "cuda"
    q = torch.randn(B, H, Lq, D, device=dev, dtype=dtype, generator=g)
    k = torch.randn(B, Hkv, Lk, D, device=dev, dtype=dtype, generator=g)
    v = torch.randn(B, Hkv, Lk, D, device=dev, dtype=dtype, generator=g)
    key_valid = None
    if left_pad is not None:
        key_valid = torch.arange(Lk, device=dev)[None, :] >= torch.tensor(left_pad, device=dev)[:, None]
    return q, k, v, key_valid


def check_head_dims(head_dims: tuple[int, ...] = HEAD_DIMS, seed: int = 0) -> list[dict]:
    """Every (D, dtype, GQA group, case) at the default launch config: ours (outputs poisoned with NaN first)
    against the float32 reference; ok: no NaN and |ours - ref| <= tol * (1 + |ref|) everywhere."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    H, rows = 8, []
    for D in head_dims:
        for dtype in (torch.bfloat16, torch.float16):
            for group in GROUPS:
                for case, (B, Lq, Lk, window, left_pad) in CASES.items():
                    q, k, v, key_valid = random_inputs(B, H, H // group, Lq, Lk, D, dtype, g, left_pad)
                    out = torch.full_like(q, float("nan"))
                    block_sparse_attention(q, k, v, window=window, key_valid=key_valid, out=out)
                    ref = block_sparse_attention_reference(q.float(), k.float(), v.float(), window=window,
                                                           key_valid=key_valid)
                    err = (out.float() - ref).abs()
                    tol = TOL[dtype]
                    ok = bool(not out.isnan().any() and (err <= tol * (1 + ref.abs())).all())
                    row = {"check": "head_dims", "D": D, "dtype": str(dtype)[6:], "group": group, "case": case,
                           "max_abs_err": err.max().item(),
                           "max_abs_ref": ref.abs().max().item(),
                           "rel_err": ((out.float() - ref).norm() / ref.norm()).item(), "ok": ok}
                    rows.append(row)
    return rows


def check_nonfinite(seed: int = 1) -> list[dict]:
    """NaN/inf planted in q, K, V (visible and invisible to various rows); ours vs the reference: same NaN
    rows, same finite values. Default config and the TMA variant (D = 128, 256)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    rows = []
    for D, case, tma in ((128, "causal", False), (128, "causal", True), (128, "left-pad", False),
                         (256, "causal", False), (256, "left-pad", False), (256, "window", True), (80, "q<kv", False)):
        B, Lq, Lk, window, left_pad = CASES[case]
        q, k, v, key_valid = random_inputs(B, 8, 2, Lq, Lk, D, torch.bfloat16, g, left_pad)
        vals = torch.tensor([float("nan"), float("inf"), -float("inf")], device="cuda", dtype=q.dtype)
        for t, n, lo, hi in ((k, 20, Lk - Lk // 10, Lk), (v, 20, Lk - Lk // 10, Lk), (q, 30, 0, Lq)):
            # K/V: keys in the last 10 % (future to most rows, visible to the last ones); q: any row
            b, h = (torch.randint(0, s_, (n,), device="cuda", generator=g) for s_ in t.shape[:2])
            j = torch.randint(lo, hi, (n,), device="cuda", generator=g)
            t[b, h, j, torch.randint(0, D, (n,), device="cuda", generator=g)] = vals[j % 3]
        if key_valid is not None:  # and padded keys, never visible
            k[1, :, : left_pad[1] : 7, 0] = float("nan")
            v[1, :, 3 : left_pad[1] : 11, 1] = float("inf")
        out = torch.full_like(q, 7.0)
        block_sparse_attention(q, k, v, window=window, key_valid=key_valid, out=out, config={"USE_TMA": tma})
        ref = block_sparse_attention_reference(q.float(), k.float(), v.float(), window=window, key_valid=key_valid)
        same_nan = torch.equal(out.isnan(), ref.isnan())
        fin = ~ref.isnan()
        err = (out.float()[fin] - ref[fin]).abs()
        ok = same_nan and bool((err <= TOL[torch.bfloat16] * (1 + ref[fin].abs())).all())
        row = {"check": "nonfinite", "D": D, "case": case, "tma": tma, "nan_rows": int(ref.isnan().all(-1).sum()),
               "rows": ref.shape[0] * ref.shape[1] * ref.shape[2], "same_nan": same_nan,
               "max_abs_err_finite": err.max().item() if err.numel() else 0.0, "ok": ok}
        rows.append(row)
    return rows


def check_sparse_decode() -> list[dict]:
    """kernels/sparse_decode.py through the dense method's decode path against the float64 masked reference
    (bf16/fp16/fp32, D 64-256, padding, windows), masked keys poisoned with NaN/inf (ignored), one NaN/inf in
    a visible key (poisons exactly its KV head's query heads); then the index-list entry FASA and LessIsMore
    use: NaN in unlisted keys ignored, inf in a listed key poisons its group."""

    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for D in (64, 80, 96, 128, 192, 256):
            for B, H, Hkv, L in ((1, 32, 8, 5000), (3, 8, 8, 777), (2, 12, 4, 4096)):
                q = torch.randn(B, H, 1, D, device="cuda", dtype=dtype, generator=g)
                k = torch.randn(B, Hkv, L, D, device="cuda", dtype=dtype, generator=g)
                v = torch.randn(B, Hkv, L, D, device="cuda", dtype=dtype, generator=g)
                kv = torch.rand(B, L, device="cuda", generator=g) > 0.2
                kv[-1, : L // 3] = False  # left padding of the last row
                masks = (AttentionMask(True, L - 1, 0, kv), AttentionMask(True, L - 40, 0, None),
                         AttentionMask(True, L - 1, 300, kv))
                for mask in masks:
                    vis = dense.decode_key_mask(mask, B, L, q.device).reshape(B, L)
                    ref = exact_attention_reference(q.double(), k.double(), v.double(), mask, 0.1)
                    out, _ = dense.attention(q, k, v, mask, SiteFacts(), dense.Params(), 0.1)
                    err = float((out.double() - ref).abs().max())
                    ok = err <= DECODE_TOL[dtype] * 4
                    # poison: masked keys everywhere, then one element of one visible key per batch row
                    kk, vv = k.clone(), v.clone()
                    kk[~vis[:, None, :].expand_as(kk[..., 0])] = float("nan")
                    vv[~vis[:, None, :].expand_as(vv[..., 0])] = float("inf")
                    out2, _ = dense.attention(q, kk, vv, mask, SiteFacts(), dense.Params(), 0.1)
                    ok &= torch.equal(out2, out)
                    for value, where in ((float("nan"), "k"), (-float("inf"), "k"), (float("inf"), "v"),
                                         (float("nan"), "v")):
                        j = int(vis[0].nonzero()[-1])  # the last visible key of row 0
                        t = (kk if where == "k" else vv).clone()
                        t[0, 0, j, D // 2] = value
                        out3, _ = dense.attention(q, t if where == "k" else kk, t if where == "v" else vv, mask,
                                                  SiteFacts(), dense.Params(), 0.1)
                        group = H // Hkv
                        ok &= bool(torch.isnan(out3[0, :group]).all())  # the heads of KV head 0
                        ok &= torch.equal(out3[0, group:], out[0, group:]) and torch.equal(out3[1:], out[1:])
                    rows.append({"check": "sparse_decode", "dtype": str(dtype)[6:], "D": D, "B": B, "H": H,
                                 "Hkv": Hkv, "L": L, "q_offset": mask.q_offset, "window": mask.window,
                                 "key_valid": mask.key_valid is not None, "max_abs_err": err, "ok": bool(ok)})
    # the method-facing kernel with index lists (FASA / LessIsMore): NaN in listed vs unlisted keys
    for dtype in (torch.bfloat16, torch.float16):
        q = torch.randn(2, 32, 1, 128, device="cuda", dtype=dtype, generator=g)
        k = torch.randn(2, 8, 8192, 128, device="cuda", dtype=dtype, generator=g)
        v = torch.randn_like(k)
        idx = torch.randperm(8192, device="cuda", generator=g)[:2048].view(1, 1, -1).expand(2, 8, -1).contiguous()
        base = sparse_decode_attention(q, k, v, idx)
        unlisted = torch.ones(8192, dtype=torch.bool, device="cuda")
        unlisted[idx[0, 0].long()] = False
        v2 = v.clone()
        v2[:, :, unlisted] = float("nan")
        ok = torch.equal(sparse_decode_attention(q, k, v2, idx), base)
        v2[1, 3, int(idx[1, 3, 100]), 5] = float("inf")
        out = sparse_decode_attention(q, k, v2, idx)
        ok &= bool(torch.isnan(out[1, 12:16]).all()) and torch.equal(out[0], base[0])
        rows.append({"check": "sparse_decode index lists", "dtype": str(dtype)[6:], "ok": bool(ok)})
    return rows


def check_page_select(seed: int = 0) -> list[dict]:
    """kernels/page_select.py on CUDA against its PyTorch references (bf16/fp16/fp32, D 64/128/256, pages
    16/32/64, GQA 4 and 3, left padding, unwritten pages, forced keys): page bounds (every reduce mode) and
    candidate scores equal the reference (same infinities, finite values within tol * (1 + |ref|)), every
    visible key scores at most its page's bound, and FASA's two-stage selection through the kernels holds
    >= 99% of the PyTorch path's tokens (a bf16 rounding may swap a key at the top-k boundary)."""
    from sparse_compile.kernels.fasa import key_state
    from sparse_compile.kernels.page_select import (
        candidate_scores,
        candidate_scores_reference,
        page_bounds,
        page_bounds_reference,
    )
    from sparse_compile.methods.two_stage import fasa_two_stage

    def close(got: torch.Tensor, ref: torch.Tensor, tol: float) -> bool:
        inf = torch.isinf(ref)
        if not torch.equal(torch.isinf(got), inf) or not torch.equal(got[inf], ref[inf]):
            return False
        return bool(((got[~inf] - ref[~inf]).abs() <= tol * (1 + ref[~inf].abs())).all())

    rows = []
    g = torch.Generator(device="cuda").manual_seed(seed)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        tol = DECODE_TOL[dtype] if dtype != torch.float32 else 1e-4
        for D in (64, 128, 256):
            for P in (16, 32, 64):
                for B, H, Hkv, L in ((2, 32, 8, 5000), (1, 12, 4, 3001)):
                    q = torch.randn(B, H, 1, D, device="cuda", dtype=dtype, generator=g)
                    k = torch.randn(B, Hkv, L, D, device="cuda", dtype=dtype, generator=g)
                    visible = torch.ones(B, L, dtype=torch.bool, device="cuda")
                    visible[-1, : L // 5] = False  # left padding of the last row
                    visible[:, L - 37:] = False  # unwritten static-cache slots
                    NP = -(-L // P)
                    ok4 = visible[:, None, :, None]
                    pad = NP * P - L
                    lo = torch.nn.functional.pad(torch.where(ok4, k, float("inf")), (0, 0, 0, pad), value=float("inf"))
                    hi = torch.nn.functional.pad(torch.where(ok4, k, -float("inf")), (0, 0, 0, pad),
                                                 value=-float("inf"))
                    lo, hi = lo.view(B, Hkv, NP, P, D).amin(3), hi.view(B, Hkv, NP, P, D).amax(3)
                    state = key_state(visible, 4, 64)
                    q_mask = (torch.rand(H, D, device="cuda", generator=g) < 0.5).float()
                    ok = True
                    for reduce in ("none", "sum", "max"):
                        got = page_bounds(q, lo, hi, state, P, q_mask=q_mask, reduce=reduce)
                        ref = page_bounds_reference(q, lo, hi, state, P, q_mask=q_mask, reduce=reduce)
                        ok &= close(got, ref, tol)
                    bound = page_bounds(q, lo, hi, state, P)  # every dim: bounds q . k of each visible key
                    kx = k.float().repeat_interleave(H // Hkv, 1)
                    exact = torch.einsum("bhd,bhnd->bhn", q[:, :, 0].float(), kx)
                    page_of = torch.arange(L, device="cuda") // P
                    seen = visible[:, None, :].expand(B, H, L)
                    limit = bound.gather(2, page_of.expand(B, H, L))[seen] + tol * (1 + exact[seen].abs())
                    ok &= bool((exact[seen] <= limit).all())
                    n = D // 4
                    dims = torch.stack([torch.randperm(D, device="cuda", generator=g)[:n] for _ in range(Hkv)])
                    member = (torch.rand(H, n, device="cuda", generator=g) < 0.7).float()
                    key_dims = k.gather(3, dims[None, :, None, :].expand(B, Hkv, L, n)).contiguous()
                    pages = torch.randint(-1, NP, (B, Hkv, 64), device="cuda", generator=g)
                    head_dims = dims.repeat_interleave(H // Hkv, 0)
                    for per_kv_head in (False, True):
                        s1, t1 = candidate_scores(q, key_dims, head_dims, member, pages, state, P,
                                                  per_kv_head=per_kv_head)
                        s2, t2 = candidate_scores_reference(q, key_dims, head_dims, member, pages, state, P,
                                                            per_kv_head=per_kv_head)
                        ok &= torch.equal(t1, t2) and close(s1, s2, tol * 4)
                    overlap = 1.0
                    for per_kv_head in (False, True):
                        args = (q, key_dims, dims, member, lo, hi, state, 256, 1024, P)
                        kw = {"sink": 4, "recent": 64, "per_kv_head": per_kv_head}
                        a = fasa_two_stage(*args, **kw, impl="triton")
                        b = fasa_two_stage(*args, **kw, impl="reference")
                        same = (a.sort(-1).values[..., :, None] == b.sort(-1).values[..., None, :]).any(-1)
                        overlap = min(overlap, float(same.float().mean()))
                    ok &= overlap >= 0.99
                    rows.append({"check": "page_select", "dtype": str(dtype)[6:], "D": D, "P": P, "B": B, "H": H,
                                 "Hkv": Hkv, "L": L, "selection_overlap": overlap, "ok": bool(ok)})
    return rows


def check_methods(length: int = 4096, seed: int = 0) -> list[dict]:
    """Every declared bench case on CUDA (bf16) against the CPU reference (float32) of the same method on the
    same structured inputs (B=1, H=8, Hkv=2, D=128); recorded, not asserted."""

    rows = []
    g = torch.Generator(device="cuda").manual_seed(seed)
    site = SiteFacts(layer=0, rope="rotate_half", rotary_dim=128, head_dim=128, num_heads=8, num_kv_heads=2)
    for method in METHODS.values():
        for case in method.bench_cases:
            q_len = length if case.phase == "prefill" else 1
            q, k, v = structured_qkv(1, 8, 2, q_len, length, 128, dtype=torch.bfloat16, device="cuda", generator=g)
            mask = AttentionMask(causal=True, q_offset=length - q_len)
            params = case_params(method, case)
            row: dict[str, Any] = {"check": "methods", "case": case_name(method.name, case), "phase": case.phase}
            try:
                out, density = case_call(method, case, params, q, k, v, mask, site, 128 ** -0.5)()
                ref, ref_density = case_call(method, case, params, q.cpu().float(), k.cpu().float(),
                                             v.cpu().float(), mask, site, 128 ** -0.5)()
                row.update(rel_err=rel_err(out.cpu(), ref), density=float(total(density).float().mean()),
                           reference_density=float(total(ref_density).float().mean()),
                           finite=bool(out.isfinite().all()))
            except Exception as err:  # recorded: a case that cannot run on this GPU says why
                row["error"] = f"{type(err).__name__}: {err}"[:300]
            rows.append(row)
    return rows


def check_compiled(seed: int = 0) -> list[dict]:
    """A random 2-layer Llama (hidden 512, 8/2 heads, bf16, B=2, 2048 tokens) compiled through the sparse
    backend with dense and every prefill method (min_seq_len 0, block_size 64 where it has one), with and
    without mode="reduce-overhead": max |compiled - eager| of the logits and the mean prefill density."""
    from transformers import LlamaConfig, LlamaForCausalLM


    cfg = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, attn_implementation="sdpa")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, 1000, (2, 2048), device="cuda")
    policies: list[Any] = ["dense"]
    for name, method in METHODS.items():
        if name != "dense" and "prefill" in method.phases:
            params = {"block_size": 64} if any(f == "block_size" for f in method.Params.__dataclass_fields__) else {}
            policies.append({"name": f"{name}-check", "prefill": {"method": name, "min_seq_len": 0, "params": params}})
    rows = []
    with torch.no_grad():
        ref = model(ids).logits.float()
        for policy in policies:
            for mode in (None, "reduce-overhead"):
                torch._dynamo.reset()
                fast = sparse_compile.compile(model, policy, mode=mode)
                for _ in range(3):
                    torch.compiler.cudagraph_mark_step_begin()
                    out = fast(ids).logits.float()
                name = policy if isinstance(policy, str) else policy["name"]
                err = (out - ref).abs().max().item()
                ok = bool(out.isfinite().all()) and (name != "dense" or err < 0.1)
                rows.append({"check": "compiled", "policy": name, "mode": mode, "max_abs_logit_err": err,
                             "mean_density": fast.sparse_report.mean_density("prefill"), "ok": ok})
    torch._dynamo.reset()
    return rows


def check_capture(length: int = 8192, seed: int = 0) -> list[dict]:
    """Every declared bench case in a phase its Method declares capturable (`capturable_phases`): captured in
    a CUDA graph (which fails on a host sync or a data-dependent allocation), replayed, and the replay equal
    to an eager call on the same inputs (relative error <= 1e-3) (B=1, H=32, Hkv=8, D=128, bf16, structured q/k)."""
    rows = []
    g = torch.Generator(device="cuda").manual_seed(seed)
    site = SiteFacts(layer=0, rope="rotate_half", rotary_dim=128, head_dim=128, num_heads=32, num_kv_heads=8)
    for method in METHODS.values():
        for case in method.bench_cases:
            if case.phase not in method.capturable_phases:
                continue
            q_len = length if case.phase == "prefill" else 1
            q, k, v = structured_qkv(1, 32, 8, q_len, length, 128, dtype=torch.bfloat16, device="cuda", generator=g)
            mask = AttentionMask(causal=True, q_offset=length - q_len)
            run = case_call(method, case, case_params(method, case), q, k, v, mask, site, 128 ** -0.5)
            row: dict[str, Any] = {"check": "capture", "case": case_name(method.name, case), "phase": case.phase}
            try:
                graph, (out, _) = capture(run)
                graph.replay()
                torch.cuda.synchronize()
                eager = run()[0]
                row.update(max_abs_diff=float((out.float() - eager.float()).abs().max()), rel_err=rel_err(out, eager))
                row["ok"] = row["rel_err"] <= 1e-3  # equal but for a reduction order (split-K) that may vary
            except Exception as err:  # a capture failure is the finding: the phase is declared capturable
                row.update(error=f"{type(err).__name__}: {err}"[:300], ok=False)
            rows.append(row)
    return rows


CHECKS = {"engine": check_engine, "head_dims": check_head_dims, "nonfinite": check_nonfinite,
          "sparse_decode": check_sparse_decode, "page_select": check_page_select,
          "compiled": check_compiled, "methods": check_methods,
          "capture": check_capture}


def run_checks(log: Any = print) -> dict[str, list[dict]]:
    """Every check of `CHECKS`, each row logged; {check: rows}. Rows with "ok" False are failures."""
    results = {}
    for name, check in CHECKS.items():
        results[name] = check()
        for row in results[name]:
            log(f"{name}: {row}")
    return results


def failures(results: dict[str, list[dict]]) -> list[dict]:
    """The rows whose "ok" is False (the recorded-only rows have no "ok")."""
    return [row for rows in results.values() for row in rows if row.get("ok") is False]
