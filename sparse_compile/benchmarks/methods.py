"""End-to-end attention of every registered method (estimation included) against dense SDPA
(flash and cuDNN backends) and FlexAttention on the same block mask; prefill and decode.

Inputs are synthetic but structured like real post-RoPE attention (random q/k give no sparsity):
pre-RoPE q and k share one direction per KV head, which after RoPE scores high near the diagonal
and decays with distance (the local window); the first `sinks` keys and `verticals` random keys
carry a strong component in the slowest-rotating RoPE pairs that every query also carries, so
they score high from everywhere (attention sinks and vertical lines). RoPE theta 500000,
rotate-half layout, as Llama 3.

Rows (one per phase, length, implementation), times are medians of `triton.testing.do_bench`:
  sdpa_flash, sdpa_cudnn   dense SDPA; prefill on K/V expanded to H heads (what repeat_kv feeds
                           it), decode with enable_gqa=True (K/V read once)
  flex_causal              FlexAttention with every causal block (prefill only)
  <method>                 METHODS[<method>].attention(q, k, v, mask, site, Params(), scale):
                           what the fused node runs, estimation + attention
  <method>:select          the estimation alone (methods exposing `select` or `<method>_select`
                           that returns a BlockList)
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

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sparse_compile.attention_mask import AttentionMask, SiteFacts
from sparse_compile.kernels.block_mask import BlockList
from sparse_compile.report import total

ROPE_THETA = 500_000.0
PREFILL_LENGTHS = (8192, 32768, 131072)
DECODE_LENGTHS = (32768, 131072)


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float = ROPE_THETA) -> torch.Tensor:
    """Rotate-half RoPE of x (B, H, L, D) at `positions` (L,), in float32."""
    D = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (L, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return x * emb.cos() + torch.cat([-x2, x1], dim=-1) * emb.sin()


def structured_qkv(
    batch: int, heads: int, kv_heads: int, q_len: int, kv_len: int, head_dim: int, *,
    dtype: torch.dtype, device: str | torch.device, generator: torch.Generator,
    sinks: int = 4, verticals: int = 16, local: float = 9.0, vertical_q: float = 1.5, vertical_k: float = 4.0,
    noise: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Post-RoPE q (B, H, Lq, D), k and v (B, Hkv, Lk, D) with sinks, a local window and vertical
    keys (see the module docstring); queries sit at the last Lq key positions."""
    B, H, Hkv, D = batch, heads, kv_heads, head_dim
    f32 = {"device": device, "dtype": torch.float32, "generator": generator}
    shared = torch.randn(B, Hkv, 1, D, **f32)
    shared = local * shared / shared.norm(dim=-1, keepdim=True)  # |a| = local: diagonal logit ~ local^2 / sqrt(D)
    slow = torch.zeros(D, device=device)
    slow[D // 2 - 8: D // 2] = 1.0  # the 8 slowest rotate-half pairs: (i, i + D/2)
    slow[D - 8:] = 1.0
    k = shared + noise * torch.randn(B, Hkv, kv_len, D, **f32)
    q = shared.repeat_interleave(H // Hkv, dim=1) + noise * torch.randn(B, H, q_len, D, **f32) + vertical_q * slow
    special = torch.randperm(max(kv_len - sinks, 1), generator=generator, device=device)[:verticals] + sinks
    special = torch.cat([torch.arange(min(sinks, kv_len), device=device), special[special < kv_len]])
    k[:, :, special] += vertical_k * slow
    positions = torch.arange(kv_len, device=device)
    q = rope(q, positions[kv_len - q_len:])
    k = rope(k, positions)
    v = torch.randn(B, Hkv, kv_len, D, **f32)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def registered_methods() -> dict[str, Any]:
    """METHODS from `sparse_compile.methods` ({} if the registry is missing)."""
    try:
        from sparse_compile.methods import METHODS
    except ImportError:
        return {}
    return dict(METHODS)


def selector(name: str, module: Any) -> Callable | None:
    """The method's estimation step, `Method.select(q, k, v, mask, site, params, scale)`, if any."""
    return getattr(module, "select", None)


def flex_permuted_block_mask(sel: Any, heads: int, q_len: int, q_offset: int) -> Any:
    """A FlexAttention BlockMask for a permuted selection (PBS): the same block lists over the permuted
    K/V, every listed block partial with a mask_mod that checks causality on the original positions
    (kv_order), as the engine does. Per-KV-head selections are repeated over their query heads."""
    from torch.nn.attention.flex_attention import BlockMask

    from sparse_compile.benchmarks.engine import _lists_full_width as lists_full_width

    order = sel.kv_order  # (B, Hs, Lk)
    dense = BlockList(sel.kv_num_blocks, sel.kv_indices, sel.block_size, q_len, order.shape[-1]).to_dense()
    if dense.shape[1] != heads:
        dense = dense.repeat_interleave(heads // dense.shape[1], dim=1)
    group = heads // order.shape[1]

    def mask_mod(b, h, q_idx, kv_idx):
        return order[b, h // group, kv_idx] <= q_idx + q_offset

    p_num, p_idx = lists_full_width(dense)
    return BlockMask.from_kv_blocks(p_num, p_idx, BLOCK_SIZE=sel.block_size, mask_mod=mask_mod,
                                    seq_lengths=(q_len, order.shape[-1]), compute_q_blocks=False)


def flex_block_mask(blocks: BlockList, heads: int) -> Any:
    """A FlexAttention BlockMask selecting the same blocks as `blocks` (per-KV-head lists are
    repeated over their query heads). Prefill (q_len == kv_len): diagonal blocks partial with a
    causal mask_mod, others full. Decode (q_len < kv_len, queries at the end): all blocks full."""
    from torch.nn.attention.flex_attention import BlockMask

    from sparse_compile.benchmarks.engine import _causal_mod as causal_mod
    from sparse_compile.benchmarks.engine import _lists_full_width as lists_full_width

    dense = blocks.to_dense()
    if dense.shape[1] != heads:
        dense = dense.repeat_interleave(heads // dense.shape[1], dim=1)
    nq, nk = dense.shape[-2:]
    if blocks.q_len == blocks.kv_len:
        diag = torch.eye(nq, nk, dtype=torch.bool, device=dense.device).expand_as(dense)
        partial, full = dense & diag, dense & ~diag
        mask_mod = causal_mod
    else:
        partial, full = torch.zeros_like(dense), dense
        mask_mod = None
    p_num, p_idx = lists_full_width(partial)
    f_num, f_idx = lists_full_width(full)
    return BlockMask.from_kv_blocks(p_num, p_idx, f_num, f_idx, BLOCK_SIZE=blocks.block_size, mask_mod=mask_mod,
                                    seq_lengths=(blocks.q_len, blocks.kv_len), compute_q_blocks=False)


def time_ms(fn: Callable[[], Any], rep_ms: float, device: str) -> float:
    """Median milliseconds of fn(): triton's do_bench on CUDA; a plain timer elsewhere (tests)."""
    if device == "cuda":
        from sparse_compile.benchmarks.engine import _bench

        return _bench(fn, rep_ms)
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[1]


def first_call_ms(fn: Callable[[], Any], device: str) -> float:
    """Milliseconds of one call of fn (synchronised): the first call pays JIT/compile time."""
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def measure(rows: list[dict], base: dict, impl: str, fn: Callable[[], Any], rep_ms: float, device: str,
            **extra: Any) -> dict | None:
    """Time fn into a row (ms = None and the error text when it fails, e.g. an unavailable backend)."""
    row = {**base, "impl": impl, **extra}
    try:
        row["ms"] = time_ms(fn, rep_ms, device)
    except Exception as err:  # a backend may be unavailable for a shape: record and go on
        row["ms"], row["error"] = None, f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    rows.append(row)
    return row


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def measure_sdpa(rows: list[dict], base: dict, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                 rep_ms: float, device: str) -> None:
    """Dense SDPA rows (flash, cuDNN). Prefill (Lq == Lk): causal, K/V expanded to H heads outside
    the timing (what repeat_kv feeds SDPA in HF models). Decode: `enable_gqa=True` on the Hkv heads,
    so each K/V byte is read once (the fastest dense decode; expanding would read it H/Hkv times)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    prefill = q.shape[2] == k.shape[2]
    groups = q.shape[1] // k.shape[1]
    kx, vx = (k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)) if prefill else (k, v)
    for impl, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
        def run_sdpa(backend: Any = backend) -> torch.Tensor:
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(
                    q, kx, vx, is_causal=prefill, scale=scale, enable_gqa=not prefill)

        measure(rows, base, impl, run_sdpa, rep_ms, device, density=1.0)


def bench_case(
    phase: str, length: int, methods: dict[str, Any], *, heads: int, kv_heads: int, head_dim: int,
    dtype: torch.dtype, rep_ms: float, device: str, with_flex: bool, flex: Any, generator: torch.Generator,
) -> list[dict]:
    """All rows of one (phase, length)."""
    B, H, Hkv, D = 1, heads, kv_heads, head_dim
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

    measure_sdpa(rows, base, q, k, v, scale, rep_ms, device)
    if with_flex and phase == "prefill":
        full = BlockList.causal_full(B, H, q_len, length, 128, device=device)
        bm = flex_block_mask(full, H)
        measure(rows, base, "flex_causal", lambda: flex(q, k, v, block_mask=bm, enable_gqa=True, scale=scale),
                rep_ms, device, density=1.0)
        del bm
    for name, module in methods.items():
        if phase not in module.phases:
            continue
        params = module.Params()

        def run_method(module: Any = module, params: Any = params) -> torch.Tensor:
            return module.attention(q, k, v, mask, site, params, scale)

        try:
            first_ms = first_call_ms(run_method, device)  # includes Triton's JIT compile of the method's kernels
            out, density = run_method()
            achieved = float(total(density).float().mean())  # a method with density factors: the total
        except Exception as err:
            rows.append({**base, "impl": name, "ms": None, "error": f"{type(err).__name__}: {err}"[:300]})
            continue
        measure(rows, base, name, run_method, rep_ms, device, density=achieved, first_ms=first_ms)
        select = selector(name, module)
        if select is None or q_len == 1:
            continue
        measure(rows, base, f"{name}:select",
                lambda select=select, params=params: select(q, k, v, mask, site, params, scale),
                rep_ms, device, density=achieved)
        if with_flex:
            sel = select(q, k, v, mask, site, params, scale)
            if hasattr(sel, "kv_order"):  # permuted keys: Flex attends over the same permuted K/V
                bm = flex_permuted_block_mask(sel, H, q_len, mask.q_offset)
                kf, vf = sel.k_perm, sel.v_perm
            else:
                bm = flex_block_mask(sel, H)
                kf, vf = k, v
            blocks = sel

            def run_flex(bm: Any = bm, kf: Any = kf, vf: Any = vf) -> torch.Tensor:
                return flex(q, kf, vf, block_mask=bm, enable_gqa=True, scale=scale)

            check = {}
            if length <= 32768:
                try:
                    check["rel_err_vs_method"] = rel_err(run_flex(), out)
                except Exception as err:
                    check["error"] = f"{type(err).__name__}: {err}"[:300]
            measure(rows, base, f"flex:{name}", run_flex, rep_ms, device, density=achieved, **check)
            del bm, blocks, sel, kf, vf
        del out
    ref = {r["impl"]: r["ms"] for r in rows if r.get("ms")}
    for row in rows:
        if row.get("ms"):
            row[unit] = work / (row["ms"] / 1e3)
            for dense in ("sdpa_cudnn", "sdpa_flash"):
                if ref.get(dense):
                    row[f"speedup_{dense.removeprefix('sdpa_')}"] = ref[dense] / row["ms"]
    return rows


def environment(device: str) -> dict[str, Any]:
    import datetime as _dt

    env = {"torch": torch.__version__, "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
           "device": device}
    if device == "cuda":
        import triton

        env.update(gpu=torch.cuda.get_device_name(0), triton=triton.__version__, cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())
    return env


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
) -> dict[str, Any]:
    """Time every method (or those named) in both phases; returns {"env", "settings", "rows", "skipped"}.

    Methods not in the registry are listed in "skipped" (with the reason) instead of failing, so
    the benchmark runs while methods are still being added. device="cpu" exists for tests only.
    """
    if device == "cuda":
        check_cuda()
    registry = registered_methods()
    wanted = list(registry) if methods is None else list(methods)
    chosen = {m: registry[m] for m in wanted if m in registry}
    skipped = {m: "not registered in sparse_compile.methods.METHODS" for m in wanted if m not in registry}
    flex = None
    if with_flex:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
    generator = torch.Generator(device=device).manual_seed(seed)
    rows: list[dict] = []
    for phase, lengths in (("prefill", prefill_lengths), ("decode", decode_lengths)):
        for length in lengths:
            case = bench_case(phase, length, chosen, heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype,
                              rep_ms=rep_ms, device=device, with_flex=with_flex, flex=flex, generator=generator)
            for row in case:
                log(format_row(row))
            rows += case
            if device == "cuda":
                torch.cuda.empty_cache()
    settings = {"heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "dtype": str(dtype)[6:],
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
    length = f"{row['length'] // 1024}K" if row["length"] >= 1024 else str(row["length"])
    return (f"| {row['phase']} | {length} | {row['impl']} | {num('ms', '.3f')} | {num('density', '.3f')} | "
            f"{num('speedup_cudnn', '.2f')} | {num('speedup_flash', '.2f')} | {throughput} | {note} |")


def markdown_table(result: dict[str, Any]) -> str:
    """The results as markdown: environment line, then one row per measurement."""
    env, st = result["env"], result["settings"]
    head = (f"{env.get('gpu', env['device'])}, torch {env['torch']}, triton {env.get('triton', '–')}, "
            f"CUDA {env.get('cuda', '–')}, cuDNN {env.get('cudnn', '–')}, {env['date']}; B=1, H={st['heads']}, "
            f"Hkv={st['kv_heads']}, D={st['head_dim']}, {st['dtype']}, structured q/k (sinks, local, verticals)\n\n"
            "| phase | L | impl | ms | density | × vs cuDNN | × vs flash | dense-eq. TFLOP/s (prefill) or GB/s "
            "(decode) | note |\n|---|---|---|---|---|---|---|---|---|\n")
    lines = [format_row(r) for r in result["rows"]]
    skipped = [f"- skipped {m}: {why}" for m, why in result.get("skipped", {}).items()]
    return head + "\n".join(lines) + "\n" + ("\n" + "\n".join(skipped) + "\n" if skipped else "")


class BenchmarkUnavailable(RuntimeError):
    """The benchmark cannot run here (no CUDA GPU, or a part of it is not installed)."""


def check_cuda() -> None:
    """Raise BenchmarkUnavailable unless a CUDA GPU is usable (fail before any work)."""
    if not torch.cuda.is_available():
        raise BenchmarkUnavailable(
            f"bench needs a CUDA GPU: torch.cuda.is_available() is False (torch {torch.__version__}); run it on a "
            "GPU machine (`python -m sparse_compile eval` is the CPU tool)"
        )


def engine_module() -> Any:
    """`sparse_compile.benchmarks.engine`, imported lazily (it needs Triton and the engine kernels)."""
    try:
        from sparse_compile.benchmarks import engine
    except ImportError as err:
        raise BenchmarkUnavailable(f"the engine benchmark (sparse_compile.benchmarks.engine) cannot be imported: "
                                   f"{err}; run `bench --what methods` for the methods alone") from err
    return engine


def engine_plot_rows(result: dict[str, Any]) -> list[dict]:
    """The engine benchmark's rows in `plot_bench`'s form (impl per density, SDPA once per length)."""
    rows: list[dict] = []
    for r in result.get("rows", []):
        pct = f"{100 * r['density_target']:.0f}%"
        rows.append({"phase": "prefill", "length": r["L"], "impl": f"engine {pct}", "ms": r.get("ours")})
        if r.get("flex") is not None:
            rows.append({"phase": "prefill", "length": r["L"], "impl": f"flex {pct}", "ms": r["flex"]})
    seen = set()
    for r in result.get("rows", []):
        for impl in ("sdpa_flash", "sdpa_cudnn"):
            if r.get(impl) is not None and (r["L"], impl) not in seen:
                seen.add((r["L"], impl))
                rows.append({"phase": "prefill", "length": r["L"], "impl": impl, "ms": r[impl]})
    return [r for r in rows if r["ms"] is not None and not math.isnan(r["ms"])]


def plot_if_possible(result: dict[str, Any], path: Path) -> list[Path]:
    """[path] after drawing `plot_bench`, or [] when matplotlib is missing (GPU images may lack it)."""
    try:
        from sparse_compile.evaluation.plots import plot_bench
    except ImportError as err:
        print(f"no plot {path.name}: {err} (pip install matplotlib)", flush=True)
        return []
    png = plot_bench(result, path)
    return [png] if png else []


def run_benchmarks(
    out_dir: Path, *, what: tuple[str, ...] = ("engine", "methods"),
    prefill_lengths: tuple[int, ...] = PREFILL_LENGTHS, decode_lengths: tuple[int, ...] = DECODE_LENGTHS,
    densities: tuple[float, ...] = (1.0, 0.3, 0.1, 0.05), methods: tuple[str, ...] | None = None,
    heads: int = 32, kv_heads: int = 8, head_dim: int = 128, rep_ms: float = 100.0, with_flex: bool = True,
    md_file: Path | None = None, command: str = "",
) -> list[Path]:
    """What `python -m sparse_compile bench` does: run the parts in `what`, write JSON, markdown and
    PNG under out_dir (bench_engine.*, bench_methods.*, bench.md) and, when md_file is given,
    replace its "bench" section. Returns the paths written. CUDA only."""
    from sparse_compile.evaluation.output import update_markdown_section

    check_cuda()
    engine = engine_module() if "engine" in what else None
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    sections = [f"Command: `{command}`", ""]
    if engine is not None:
        t0 = time.perf_counter()
        result = engine.run_engine_benchmark(lengths=prefill_lengths, densities=densities, heads=heads,
                                             kv_heads=kv_heads, head_dim=head_dim, rep_ms=rep_ms,
                                             with_flex=with_flex)
        result["wall_s"] = time.perf_counter() - t0
        table = engine.markdown_table(result)
        written += [out_dir / "bench_engine.json", out_dir / "bench_engine.md"]
        written[-2].write_text(json.dumps(result, indent=1, default=str) + "\n")
        written[-1].write_text(table)
        written += plot_if_possible({"rows": engine_plot_rows(result)}, out_dir / "bench_engine.png")
        sections += ["#### Block-sparse engine (random causal block masks)", "", table, ""]
    if "methods" in what:
        t0 = time.perf_counter()
        result = run_methods_benchmark(prefill_lengths, decode_lengths, methods, heads, kv_heads, head_dim,
                                       rep_ms=rep_ms, with_flex=with_flex)
        result["wall_s"] = time.perf_counter() - t0
        table = markdown_table(result)
        written += [out_dir / "bench_methods.json", out_dir / "bench_methods.md"]
        written[-2].write_text(json.dumps(result, indent=1, default=str) + "\n")
        written[-1].write_text(table)
        written += plot_if_possible(result, out_dir / "bench_methods.png")
        sections += ["#### Methods end to end (estimation + attention, structured q/k)", "", table, ""]
    (out_dir / "bench.md").write_text("\n".join(sections))
    written.append(out_dir / "bench.md")
    if md_file is not None:
        update_markdown_section(md_file, f"bench {','.join(what)}", "\n".join(sections))
        written.append(md_file)
    return written
