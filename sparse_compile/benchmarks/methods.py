"""End-to-end attention of every registered method (estimation included) against dense SDPA
(flash and cuDNN backends) and FlexAttention on the same block mask; prefill and decode.

Inputs are synthetic but structured like real post-RoPE attention (random q/k give no sparsity):
pre-RoPE q and k share one direction per KV head, which after RoPE scores high near the diagonal
and decays with distance (the local window); the first `sinks` keys and `verticals` random keys
carry a strong component in the slowest-rotating RoPE pairs that every query also carries, so
they score high from everywhere (attention sinks and vertical lines). RoPE theta 500000,
rotate-half layout, as Llama 3.

Each method is timed on the cases it declares (`Method.bench_cases`: phase, Params overrides, role), so a
method added to the registry is benchmarked without a line here. Rows (one per phase, length,
implementation), times are medians of `triton.testing.do_bench`:
  sdpa_flash, sdpa_cudnn   dense SDPA; prefill on K/V expanded to H heads (what repeat_kv feeds
                           it), decode with enable_gqa=True (K/V read once)
  flex_causal              FlexAttention with every causal block (prefill only)
  <method>[:<label>]       METHODS[<method>].attention(q, k, v, mask, site, params, scale) with the
                           case's params: what the fused node runs, estimation + attention;
                           selection-sharing methods (LessIsMore): the "select" case is a selecting
                           layer (exact attention + the shared selection), the "reuse" case a reusing
                           layer over the selection the select case made
  <method>[:<label>]:select   the estimation alone (methods declaring `Method.select`)
  flex:<method>            FlexAttention on the block mask that estimation selected (prefill:
                           off-diagonal blocks full, diagonal blocks partial with a causal
                           mask_mod); its output is compared with the method's (rel_err)

Throughput formulas (written next to the milliseconds):
  prefill  dense-equivalent TFLOP/s = 4 * B * H * D * L * (L + 1) / 2 / time
  decode   dense-equivalent GB/s    = 2 * B * Hkv * L * D * bytes(dtype) / time   (K and V read once)
Sparse rows use the same dense-equivalent counts, so they read as "how fast dense would have
to be to match"; `speedup_cudnn` = sdpa_cudnn ms / row ms.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import flex_attention

from sparse_compile.attention_mask import AttentionMask, SiteFacts
from sparse_compile.benchmarks.timing import (
    ROPE_THETA,
    check_cuda,
    environment,
    first_call_ms,
    flex_block_mask,
    flex_permuted_block_mask,
    measure,
    rel_err,
    structured_qkv,
)
from sparse_compile.cache import filled_layer
from sparse_compile.kernels.block_mask import BlockList
from sparse_compile.method import BenchCase, CacheBuffers, Method
from sparse_compile.methods import METHODS
from sparse_compile.params import params_from_mapping
from sparse_compile.report import total

PREFILL_LENGTHS = (8192, 32768, 131072)
DECODE_LENGTHS = (32768, 131072)


def case_name(method: str, case: BenchCase) -> str:
    """The row name of a case: "<method>" or "<method>:<label>"."""
    return f"{method}:{case.label}" if case.label else method


def case_params(method: Method, case: BenchCase) -> Any:
    """The case's Params: the defaults with its overrides, validated by the Params class."""
    return params_from_mapping(method.Params, dict(case.params), f"{method.name} bench case {case.label!r}")


def measure_sdpa(rows: list[dict], base: dict, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                 rep_ms: float, device: str, graph: bool = False) -> None:
    """Dense SDPA rows (flash, cuDNN). Prefill (Lq == Lk): causal, K/V expanded to H heads outside
    the timing (what repeat_kv feeds SDPA in HF models). Decode: `enable_gqa=True` on the Hkv heads,
    so each K/V byte is read once (the fastest dense decode; expanding would read it H/Hkv times)."""
    prefill = q.shape[2] == k.shape[2]
    groups = q.shape[1] // k.shape[1]
    kx, vx = (k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)) if prefill else (k, v)
    for impl, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
        def run_sdpa(backend: Any = backend) -> torch.Tensor:
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(
                    q, kx, vx, is_causal=prefill, scale=scale, enable_gqa=not prefill)

        measure(rows, base, impl, run_sdpa, rep_ms, device, graph=graph, density=1.0)


def case_call(method: Method, case: BenchCase, params: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: AttentionMask, site: SiteFacts, scale: float) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """fn() -> (out, density) running the case as the fused node does. A "reuse" case first runs the method's
    "select" role once (outside the timing) for the selection it attends over."""
    extra = {}
    if case.page_size:  # the keys as a SparseCache layer holds them, and the buffers the node would pass
        facts = {"num_layers": site.layer + 1, "num_heads": site.num_heads, "num_kv_heads": site.num_kv_heads,
                 "head_dim": site.head_dim, "rotary_dim": site.rotary_dim, "layout": site.rope}
        layer = filled_layer(method.name, params, facts, k, v, case.page_size, site.layer, dims_copy=case.dims_copy)
        extra["cache"] = CacheBuffers(layer.key_dims, layer.dims, layer.member, layer.page_min, layer.page_max,
                                      case.page_size)
    if case.role is None:
        return lambda: method.attention(q, k, v, mask, site, params, scale, **extra)[:2]
    selection = None
    if case.role == "reuse":
        selection = method.attention(q, k, v, mask, site, params, scale, "select", None, **extra)[2]
    return lambda: method.attention(q, k, v, mask, site, params, scale, case.role, selection, **extra)[:2]


def bench_method_case(rows: list[dict], base: dict, method: Method, case: BenchCase, q: torch.Tensor,
                      k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, site: SiteFacts, scale: float, *,
                      rep_ms: float, device: str, with_flex: bool, flex: Any) -> None:
    """The rows of one declared case: the method end to end, its selection alone, Flex on that selection."""
    name = case_name(method.name, case)
    try:
        params = case_params(method, case)
        run_method = case_call(method, case, params, q, k, v, mask, site, scale)
        first_ms = first_call_ms(run_method, device)  # includes Triton's JIT compile of the method's kernels
        out, density = run_method()
        achieved = float(total(density).float().mean())  # a method with density factors: the total
    except Exception as err:  # a case that cannot run here is a row with its error, not a crash
        rows.append({**base, "impl": name, "ms": None, "error": f"{type(err).__name__}: {err}"[:300]})
        return
    measure(rows, base, name, run_method, rep_ms, device, graph=q.shape[2] == 1, density=achieved,
            first_ms=first_ms)
    if method.select is None or q.shape[2] == 1:
        return
    select = method.select
    measure(rows, base, f"{name}:select", lambda: select(q, k, v, mask, site, params, scale), rep_ms, device,
            density=achieved)
    if not with_flex:
        return
    sel = select(q, k, v, mask, site, params, scale)
    if hasattr(sel, "kv_order"):  # permuted keys: Flex attends over the same permuted K/V
        bm, kf, vf = flex_permuted_block_mask(sel, q.shape[1], q.shape[2], mask.q_offset), sel.k_perm, sel.v_perm
    else:
        bm, kf, vf = flex_block_mask(sel, q.shape[1]), k, v

    def run_flex() -> torch.Tensor:
        return flex(q, kf, vf, block_mask=bm, enable_gqa=True, scale=scale)

    check = {}
    if k.shape[2] <= 32768:
        try:
            check["rel_err_vs_method"] = rel_err(run_flex(), out)
        except Exception as err:  # Flex may reject a shape: the row says why
            check["error"] = f"{type(err).__name__}: {err}"[:300]
    measure(rows, base, f"flex:{name}", run_flex, rep_ms, device, density=achieved, **check)


def bench_case(
    phase: str, length: int, methods: dict[str, Method], *, heads: int, kv_heads: int, head_dim: int,
    dtype: torch.dtype, rep_ms: float, device: str, with_flex: bool, flex: Any, generator: torch.Generator,
    batch: int = 1,
) -> list[dict]:
    """All rows of one (phase, length): dense SDPA, Flex causal (prefill), every declared case of the phase.
    Decode rows also carry `graph_ms` (the call captured in a CUDA graph, as decode runs under
    mode="reduce-overhead") and `speedup_cudnn_graph` against cuDNN's captured call."""
    B, H, Hkv, D = batch, heads, kv_heads, head_dim
    q_len = length if phase == "prefill" else 1
    q, k, v = structured_qkv(B, H, Hkv, q_len, length, D, dtype=dtype, device=device, generator=generator)
    mask = AttentionMask(causal=True, q_offset=length - q_len)
    site = SiteFacts(layer=0, rope="rotate_half", rotary_dim=D, head_dim=D, num_heads=H, num_kv_heads=Hkv)
    scale = 1.0 / math.sqrt(D)
    bytes_per = torch.finfo(dtype).bits // 8
    if phase == "prefill":
        work, unit = 4 * B * H * D * length * (length + 1) / 2 / 1e12, "tflops"
    else:
        work, unit = 2 * B * Hkv * length * D * bytes_per / 1e9, "gbps"
    base = {"phase": phase, "length": length, "B": B, "H": H, "Hkv": Hkv, "D": D, "dtype": str(dtype)[6:]}
    rows: list[dict] = []

    measure_sdpa(rows, base, q, k, v, scale, rep_ms, device, graph=phase == "decode")
    if with_flex and phase == "prefill":
        bm = flex_block_mask(BlockList.causal_full(B, H, q_len, length, 128, device=device), H)
        measure(rows, base, "flex_causal", lambda: flex(q, k, v, block_mask=bm, enable_gqa=True, scale=scale),
                rep_ms, device, density=1.0)
        del bm
    for method in methods.values():
        for case in method.bench_cases:
            if case.phase == phase:
                bench_method_case(rows, base, method, case, q, k, v, mask, site, scale, rep_ms=rep_ms,
                                  device=device, with_flex=with_flex, flex=flex)
    ref = {r["impl"]: r["ms"] for r in rows if r.get("ms")}
    ref_graph = {r["impl"]: r["graph_ms"] for r in rows if isinstance(r.get("graph_ms"), float)}
    for row in rows:
        if row.get("ms"):
            row[unit] = work / (row["ms"] / 1e3)
            for dense in ("sdpa_cudnn", "sdpa_flash"):
                if ref.get(dense):
                    row[f"speedup_{dense.removeprefix('sdpa_')}"] = ref[dense] / row["ms"]
        if isinstance(row.get("graph_ms"), float) and ref_graph.get("sdpa_cudnn"):
            row["speedup_cudnn_graph"] = ref_graph["sdpa_cudnn"] / row["graph_ms"]
    return rows


def run_methods_benchmark(
    prefill_lengths: tuple[int, ...] = PREFILL_LENGTHS,
    decode_lengths: tuple[int, ...] = DECODE_LENGTHS,
    methods: tuple[str, ...] | None = None,
    heads: int = 32,
    kv_heads: int = 8,
    head_dim: int = 128,
    dtype: torch.dtype = torch.bfloat16,
    rep_ms: float = 100.0,
    with_flex: bool = True,
    device: str = "cuda",
    seed: int = 0,
    log: Callable[[str], None] = print,
    batch: int = 1,
) -> dict[str, Any]:
    """Time every method (or those named) in both phases; returns {"env", "settings", "rows", "skipped"}.

    Names not in the registry are listed in "skipped" (with the reason) instead of failing.
    device="cpu" exists for tests only (the methods' CPU references, timed by a plain timer).
    """
    if device == "cuda":
        check_cuda()
    wanted = list(METHODS) if methods is None else list(methods)
    chosen = {m: METHODS[m] for m in wanted if m in METHODS}
    skipped = {m: "not registered in sparse_compile.methods.METHODS" for m in wanted if m not in METHODS}
    flex = None
    if with_flex:
        flex = torch.compile(flex_attention, dynamic=False)
    generator = torch.Generator(device=device).manual_seed(seed)
    rows: list[dict] = []
    for phase, lengths in (("prefill", prefill_lengths), ("decode", decode_lengths)):
        for length in lengths:
            case = bench_case(phase, length, chosen, heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype,
                              rep_ms=rep_ms, device=device, with_flex=with_flex, flex=flex, generator=generator,
                              batch=batch)
            for row in case:
                log(format_row(row))
            rows += case
            if device == "cuda":
                torch.cuda.empty_cache()
    settings = {"batch": batch, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "dtype": str(dtype)[6:],
                "rep_ms": rep_ms, "seed": seed, "methods": list(chosen), "rope_theta": ROPE_THETA}
    return {"env": environment(device), "settings": settings, "rows": rows, "skipped": skipped}


def format_row(row: dict) -> str:
    """One markdown table row (see `markdown_table` for the header)."""
    def num(key: str, spec: str) -> str:
        value = row.get(key)
        return "–" if value is None else format(value, spec)

    throughput = num("tflops", ".0f") if row["phase"] == "prefill" else num("gbps", ".0f")
    note = row.get("error", "")
    if "rel_err_vs_method" in row:
        note = f"rel_err vs method {row['rel_err_vs_method']:.1e}"
    if row.get("first_ms") is not None:  # the first call of the process: Triton JIT compile included
        note = f"first call {row['first_ms']:.0f} ms" + (f"; {note}" if note else "")
    if isinstance(row.get("graph_ms"), float):
        graph = f"CUDA graph {row['graph_ms']:.4f} ms"
        if row.get("speedup_cudnn_graph"):
            graph += f" = {row['speedup_cudnn_graph']:.2f}x cuDNN's graph"
        note = graph + (f"; {note}" if note else "")
    elif row.get("graph_ms"):
        note = f"{row['graph_ms']}" + (f"; {note}" if note else "")
    length = f"{row['length'] // 1024}K" if row["length"] >= 1024 else str(row["length"])
    return (f"| {row['phase']} | {length} | {row['impl']} | {num('ms', '.3f')} | {num('density', '.3f')} | "
            f"{num('speedup_cudnn', '.2f')} | {num('speedup_flash', '.2f')} | {throughput} | {note} |")


def markdown_table(result: dict[str, Any]) -> str:
    """The results as markdown: environment line, then one row per measurement."""
    env, st = result["env"], result["settings"]
    head = (f"{env.get('gpu', env['device'])}, torch {env['torch']}, triton {env.get('triton', '–')}, "
            f"CUDA {env.get('cuda', '–')}, cuDNN {env.get('cudnn', '–')}, {env['date']}; B={st.get('batch', 1)}, "
            f"H={st['heads']}, "
            f"Hkv={st['kv_heads']}, D={st['head_dim']}, {st['dtype']}, structured q/k (sinks, local, verticals)\n\n"
            "| phase | L | impl | ms | density | × vs cuDNN | × vs flash | dense-eq. TFLOP/s (prefill) or GB/s "
            "(decode) | note |\n|---|---|---|---|---|---|---|---|---|\n")
    lines = [format_row(r) for r in result["rows"]]
    skipped = [f"- skipped {m}: {why}" for m, why in result.get("skipped", {}).items()]
    return head + "\n".join(lines) + "\n" + ("\n" + "\n".join(skipped) + "\n" if skipped else "")


