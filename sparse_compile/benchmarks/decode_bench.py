"""Decode methods (FASA, LessIsMore) on the GPU: selection + sparse decode against dense decode.

    python -m sparse_compile.benchmarks.decode_bench [--lengths 32768 131072] [--budget 2048] [--out f.json]

One decode query, B=1, H=32, Hkv=8, D=128, bf16, K/V from `methods.structured_qkv` (sinks, local window,
vertical keys). Rows (medians of triton.testing.do_bench; `graph` rows replay a captured CUDA graph of the
same call, i.e. without launch overhead, as mode="reduce-overhead" runs it):
  sdpa_flash, sdpa_cudnn      dense decode, SDPA with enable_gqa (K/V read once)
  flex_tokens:<gqa>           FlexAttention (compiled) with a mask_mod over the selected tokens: the
                              block mask holds every 128-key block that has a selected token
  gather_sdpa:<gqa>           the selected K/V rows gathered with torch.gather, then SDPA (torch only)
  fasa:<gqa>[:<chunks>]       METHODS["fasa"].attention: scores + top-k + sparse decode (what the node runs)
  fasa_scores / fasa_topk / sparse_decode   its three steps alone (fasa_topk: torch.topk unsorted + sentinels)
  topk_sorted:<gqa>           torch.topk sorted=True on the same scores
  lessismore:select           a selection layer: exact attention + logits + the shared token set
  lessismore:reuse            a reusing layer: the shared sparse decode over the one token set (G = 1)
  lessismore_selection        logits + select_tokens alone
  model32:<method>            derived, not timed: the mean per-layer step of a 32-layer model with the
                              defaults (fasa: layer 0 dense, 31 fasa layers; lessismore: layers 0-1
                              dense, 2 and 10 select, 28 reuse; dense: cuDNN), from the rows above
Chunks: "low" = the model-agnostic rule (the 16 lowest-frequency chunks of 64: two 32-byte sectors of each
K row), "scattered" = 16 random chunks per head (the union over a group spans every sector of K).
Checks: sparse decode (bf16) vs its fp32 reference on the same selection; Triton scores vs the fp32
reference; FASA and LessIsMore (reuse) output vs dense attention (relative error of the whole output).
Bytes model (predicted time at 2.8 TB/s): scores read Hkv * L * (sectors touched * 32 B) of K and write
S * L * 4 B; top-k reads the scores (a few radix passes); sparse decode reads S * budget * D * 2 * 2 B.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch

from sparse_compile.attention_mask import AttentionMask, SiteFacts
from sparse_compile.benchmarks.methods import environment, rel_err, structured_qkv


def bench(fn, rep_ms: float = 60.0) -> float:
    import triton

    return float(triton.testing.do_bench(fn, warmup=15, rep=rep_ms, return_mode="median"))


def capture(fn) -> tuple[torch.cuda.CUDAGraph, Any]:
    """(graph, outputs): fn() captured in a CUDA graph after two warm-up calls on a side stream; raises if
    fn synchronises with the device or copies from pageable host memory (what a capture forbids)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def graph_ms(fn, rep_ms: float = 60.0) -> float | str:
    """Median ms of replaying a CUDA graph that captured fn() (fn must not sync or allocate by data)."""
    try:
        return bench(capture(fn)[0].replay, rep_ms)
    except Exception as err:  # record why capture failed
        return f"capture failed: {type(err).__name__}: {str(err)[:160]}"


def sectors_per_row(segs: torch.Tensor) -> float:
    """Mean number of 32-byte sectors (16 bf16 dims) of one K row that the scores read."""
    return float((segs >= 0).sum()) / segs.shape[0]


def run(lengths: tuple[int, ...], budget: int, rep_ms: float) -> dict[str, Any]:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from sparse_compile.kernels.fasa import chunk_tables, fasa_scores, fasa_scores_reference, select_tokens
    from sparse_compile.kernels.sparse_decode import sparse_decode_attention, sparse_decode_reference
    from sparse_compile.methods import fasa

    B, H, Hkv, D = 1, 32, 8, 128
    dtype, dev = torch.bfloat16, "cuda"
    scale = 1.0 / math.sqrt(D)
    flex = torch.compile(flex_attention, dynamic=False)
    g = torch.Generator(device=dev).manual_seed(0)
    rows: list[dict[str, Any]] = []
    checks: list[dict[str, Any]] = []
    site = SiteFacts(layer=1, rope="rotate_half", rotary_dim=D, head_dim=D, num_heads=H, num_kv_heads=Hkv)
    scattered = tuple(tuple(torch.randperm(D // 2, generator=torch.Generator().manual_seed(h))[:16].tolist())
                      for h in range(H))

    def bench_length(L: int) -> None:
        q, k, v = structured_qkv(B, H, Hkv, 1, L, D, dtype=dtype, device=dev, generator=g)
        mask = AttentionMask(causal=True, q_offset=L - 1)
        base = {"L": L, "B": B, "H": H, "Hkv": Hkv, "D": D, "budget": budget}

        def add(impl: str, fn, **extra: Any) -> None:
            row = {**base, "impl": impl, **extra}
            try:
                row["ms"] = bench(fn, rep_ms)
                row["graph_ms"] = graph_ms(fn, rep_ms)
            except Exception as err:
                row["ms"], row["error"] = None, f"{type(err).__name__}: {str(err)[:200]}"
            rows.append(row)
            print(json.dumps(row), flush=True)

        for impl, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
            def dense_fn(backend=backend):
                with sdpa_kernel(backend):
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)
            add(impl, dense_fn)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            dense_out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)

        for gqa in fasa.GQA_MODES:
            for chunk_name, chunks in (("low", ()), ("scattered", ((), scattered))):
                params = fasa.FasaParams(budget=budget, gqa=gqa, chunks=chunks)
                tag = f"{gqa}" + ("" if chunk_name == "low" else ":scattered")
                out, density = fasa.attention(q, k, v, mask, site, params, scale)
                add(f"fasa:{tag}", lambda params=params: fasa.attention(q, k, v, mask, site, params, scale),
                    density=float(density.mean()), rel_err_vs_dense=rel_err(out, dense_out))
                layer_chunks, _ = fasa.layer_chunks(params, 1, H, Hkv, D, D)
                dims, member = chunk_tables(layer_chunks, H, Hkv, D, D, "rotate_half", str(q.device))
                per_kv = gqa == "per_kv_head"
                add(f"fasa_scores:{tag}", lambda dims=dims, member=member, per_kv=per_kv: fasa_scores(
                    q, k, dims, member, per_kv_head=per_kv, q_offset=L - 1),
                    sectors_per_k_row=sectors_per_row(dims))
                if chunk_name != "low":
                    continue
                scores = fasa_scores(q, k, dims, member, per_kv_head=per_kv, q_offset=L - 1)
                state = torch.ones(B, L, dtype=torch.int8, device=dev)
                ref_scores = fasa_scores_reference(q, k, dims, member, state, per_kv_head=per_kv)
                add(f"fasa_topk:{gqa}", lambda scores=scores: select_tokens(scores, budget))
                add(f"topk_sorted:{gqa}", lambda scores=scores: torch.topk(scores, budget, dim=-1, sorted=True))
                idx = select_tokens(scores, budget)
                add(f"sparse_decode:{gqa}", lambda idx=idx: sparse_decode_attention(q, k, v, idx, scale=scale))
                sd = sparse_decode_attention(q, k, v, idx, scale=scale)
                sd_ref = sparse_decode_reference(q.float(), k.float(), v.float(), idx, scale=scale)
                checks.append({"L": L, "gqa": gqa, "sparse_decode_bf16_vs_fp32_ref": rel_err(sd, sd_ref),
                               "scores_bf16_vs_fp32_ref": rel_err(scores, ref_scores),
                               "fasa_vs_dense": rel_err(out, dense_out)})
                print(json.dumps(checks[-1]), flush=True)
                # torch-only baseline: gather the selected rows, then SDPA
                S = idx.shape[1]
                if per_kv:
                    def gather_fn(idx=idx, S=S):
                        gi = idx.clamp(min=0)[..., None].expand(B, S, budget, D)
                        kg, vg = torch.gather(k, 2, gi), torch.gather(v, 2, gi)
                        return torch.nn.functional.scaled_dot_product_attention(q, kg, vg, scale=scale, enable_gqa=True)
                else:
                    def gather_fn(idx=idx):
                        gi = idx.clamp(min=0).view(B, Hkv, H // Hkv, budget, 1).expand(B, Hkv, H // Hkv, budget, D)
                        src_k = k[:, :, None].expand(B, Hkv, H // Hkv, L, D)
                        src_v = v[:, :, None].expand(B, Hkv, H // Hkv, L, D)
                        kg = torch.gather(src_k, 3, gi).view(B, H, budget, D)
                        vg = torch.gather(src_v, 3, gi).view(B, H, budget, D)
                        return torch.nn.functional.scaled_dot_product_attention(q, kg, vg, scale=scale)
                add(f"gather_sdpa:{gqa}", gather_fn)
                # FlexAttention with the same token mask (block mask from the mask_mod)
                try:
                    sel = torch.zeros(B, S, L, dtype=torch.bool, device=dev)
                    sel.scatter_(2, idx.clamp(min=0), True)
                    group = H // S

                    def mask_mod(b, h, q_idx, kv_idx, sel=sel, group=group):
                        return sel[b, h // group, kv_idx]

                    bm = create_block_mask(mask_mod, B, H, 1, L, device=dev, BLOCK_SIZE=128)
                    fo = flex(q, k, v, block_mask=bm, scale=scale, enable_gqa=True)
                    add(f"flex_tokens:{gqa}", lambda bm=bm: flex(q, k, v, block_mask=bm, scale=scale, enable_gqa=True),
                        rel_err_vs_fasa=rel_err(fo, out),
                        block_density=float(bm.kv_num_blocks.float().mean()) / math.ceil(L / 128))
                    del bm, sel
                except Exception as err:
                    rows.append({**base, "impl": f"flex_tokens:{gqa}", "ms": None,
                                 "error": f"{type(err).__name__}: {str(err)[:200]}"})

        lessismore_rows(q, k, v, mask, site, dense_out, add, checks)

    def lessismore_rows(q, k, v, mask, site, dense_out, add, checks) -> None:
        from sparse_compile.kernels.lessismore import decode_logits, select_tokens
        from sparse_compile.methods import lessismore

        params = lessismore.LessIsMoreParams(budget=budget)
        L = k.shape[2]
        add("lessismore:select", lambda: lessismore.attention(q, k, v, mask, site, params, scale, role="select"))
        _, _, chosen = lessismore.attention(q, k, v, mask, site, params, scale, role="select")
        out, density, _ = lessismore.attention(q, k, v, mask, site, params, scale, role="reuse", selection=chosen)
        add("lessismore:reuse", lambda: lessismore.attention(q, k, v, mask, site, params, scale, role="reuse",
                                                             selection=chosen),
            density=float(density.mean()), rel_err_vs_dense=rel_err(out, dense_out))
        visible = torch.ones(q.shape[0], L, dtype=torch.bool, device=q.device)
        add("lessismore_selection", lambda: select_tokens(decode_logits(q, k, scale, visible), visible, budget,
                                                          params.sink, params.recent_fraction))
        ref = sparse_decode_reference(q.float(), k.float(), v.float(), chosen[:, None, :], scale=scale)
        checks.append({"L": L, "lessismore_reuse_bf16_vs_fp32_ref": rel_err(out, ref),
                       "selection_size": int((chosen >= 0).sum(dim=1).min()),
                       "lessismore_vs_dense": rel_err(out, dense_out)})
        print(json.dumps(checks[-1]), flush=True)

    for L in lengths:
        bench_length(L)
        torch.cuda.empty_cache()
    rows += model_means(rows, budget)
    ref = {(r["L"], r["impl"]): r["ms"] for r in rows if r.get("ms")}
    for r in rows:
        for dense in ("sdpa_cudnn", "sdpa_flash"):
            if r.get("ms") and ref.get((r["L"], dense)):
                r[f"speedup_{dense[5:]}"] = ref[(r["L"], dense)] / r["ms"]
    return {"env": environment("cuda"), "rows": rows, "checks": checks}


MODEL32 = {  # method: [(row impl, layers)] of a 32-layer model with the method's default layer roles
    "dense": [("sdpa_cudnn", 32)],
    "fasa per_kv_head": [("sdpa_cudnn", 1), ("fasa:per_kv_head", 31)],
    "fasa per_head": [("sdpa_cudnn", 1), ("fasa:per_head", 31)],
    "lessismore": [("sdpa_cudnn", 2), ("lessismore:select", 2), ("lessismore:reuse", 28)],
}


def model_means(rows: list[dict[str, Any]], budget: int) -> list[dict[str, Any]]:
    """Derived rows: mean per-layer decode time of a 32-layer model (eager ms and graph ms)."""
    out = []
    for L in sorted({r["L"] for r in rows}):
        found = {r["impl"]: r for r in rows if r["L"] == L and r.get("ms")}
        for method, parts in MODEL32.items():
            if not all(impl in found and isinstance(found[impl].get("graph_ms"), float) for impl, _ in parts):
                continue
            row = {"L": L, "impl": f"model32:{method}", "budget": budget, "derived": True}
            for key in ("ms", "graph_ms"):
                row[key] = sum(found[impl][key] * n for impl, n in parts) / 32
            out.append(row)
    return out


def table(result: dict[str, Any]) -> str:
    lines = ["| L | impl | ms | graph ms | vs cuDNN | vs flash | note |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if r.get("ms") is None:
            lines.append(f"| {r['L']} | {r['impl']} | - | - | - | - | {r.get('error', '')} |")
            continue
        gm = r.get("graph_ms")
        gm = f"{gm:.4f}" if isinstance(gm, float) else str(gm)[:40]
        note = ", ".join(f"{key} {r[key]:.4g}" if isinstance(r[key], float) else f"{key} {r[key]}"
                         for key in ("density", "rel_err_vs_dense", "sectors_per_k_row",
                                     "block_density", "rel_err_vs_fasa") if key in r)
        lines.append(f"| {r['L']} | {r['impl']} | {r['ms']:.4f} | {gm} | {r.get('speedup_cudnn', 0):.2f}x | "
                     f"{r.get('speedup_flash', 0):.2f}x | {note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072], help="KV cache lengths")
    parser.add_argument("--budget", type=int, default=2048, help="tokens kept per score row")
    parser.add_argument("--rep-ms", type=float, default=60.0, help="do_bench repetition time per row")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("decode_bench needs a CUDA GPU")
    result = run(tuple(args.lengths), args.budget, args.rep_ms)
    print(json.dumps(result["env"]))
    print(table(result))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
