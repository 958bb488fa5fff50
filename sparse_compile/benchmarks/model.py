"""Whole-model benchmarks on a random-weight Llama-3-8B-shaped model (CUDA, bf16): prefill and generate.

The model: hidden 4096, 32/8 heads, MLP 14336, vocab 32000, bf16, `--layers` decoder layers.

`bench --what model-prefill`: long-context prefill of `LlamaModel` (no LM head: attention + MLP), eager vs
plain torch.compile vs backend="sparse" (dense policy), each compiled with `dynamic=False` (one graph per
length, as a fixed-length server would), timed with CUDA events (median of `--reps` after `--warmup`
calls); peak memory from `torch.cuda.max_memory_allocated` over one call. `--batch` and `--left-pad` give a
left-padded batch (rows 1.. lose their first fraction of tokens).

`bench --what generate`: time to first token and decode tokens/s of `LlamaForCausalLM.generate` on one
cache of prompt + new tokens (`--cache`: a StaticCache, the default, reset between runs so every run sees
the same shapes and addresses; a `sparse_compile.SparseCache` made for the variant's policy, likewise; or a
new DynamicCache per run, whose decode shapes change every step, for TTFT comparisons):
  eager            the model as it is
  compile_ro       torch.compile(forward, mode="reduce-overhead")           (Inductor + CUDA graphs)
  sparse_ro        torch.compile(forward, backend="sparse", mode="reduce-overhead")   (dense policy)
  compile, sparse  the same without CUDA graphs (mode="default")
  sparse_ro:P, sparse:P   the sparse variants with policy P (a shipped name or a TOML file), e.g.
                   sparse_ro:lessismore-lossy, sparse_ro:fasa (decode methods: their selection runs in the graph)
  ceiling_ro       compile_ro with attention replaced by a no-op (an attention function registered through
                   transformers' AttentionInterface that returns q): the tok/s the run would reach if
                   attention took no time (K/V are still written), the bound any attention method works under
  V@C              variant V on cache C only (e.g. sparse_ro:fasa@sparse), whatever `--cache` lists
TTFT = median time of generate(max_new_tokens=1) (prefill + one token); decode tokens/s = new_tokens / the median
time of the new_tokens decode steps of generate(max_new_tokens=1 + new_tokens), from the step after the prefill's
token to the last (`StepMarks`: CUDA events recorded by a stopping criterion, no synchronisation between steps).
Until 2026-12-07 it was new_tokens / (median total - median TTFT), two separately timed runs whose prefill spread
(tens of ms at 32K, hundreds at 128K) entered the decode rate; the rows keep that number as
`decode_tok_s_from_totals`. Warm-up runs (compilation, CUDA-graph recording) are not timed. transformers' own
auto-compile is disabled.
"""

from __future__ import annotations

import gc
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import sparse_compile
from sparse_compile.cache import build_cache, cache_form, cache_kwargs

PREFILL_VARIANTS = ("eager", "compile", "sparse-dense")
GENERATE_VARIANTS = ("eager", "compile_ro", "sparse_ro", "compile", "sparse")
NOOP_ATTENTION = "sparse_compile_noop"  # the attention implementation of the ceiling_ro variant


def noop_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention that costs nothing: q (B, H, L, D) returned as the output (B, L, H, D)."""
    return query.transpose(1, 2), None


def no_mask(*args: Any, **kwargs: Any) -> None:
    """The mask function of the no-op attention: it reads no mask."""
    return None


def use_noop_attention(model: Any) -> str:
    """Switch the model to the no-op attention (registered under NOOP_ATTENTION in transformers'
    AttentionInterface / AttentionMaskInterface, their public extension points); returns the previous one."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NOOP_ATTENTION, noop_attention)
    AttentionMaskInterface.register(NOOP_ATTENTION, no_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(NOOP_ATTENTION)
    return previous


def build_model(layers: int, max_len: int, lm_head: bool = False) -> torch.nn.Module:
    """Random-weight Llama-3-8B-shaped model on CUDA, bf16: `LlamaModel`, or `LlamaForCausalLM` with lm_head."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

    cfg = LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=max_len, rope_theta=500000.0,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = (LlamaForCausalLM if lm_head else LlamaModel)(cfg).to(torch.bfloat16).eval()
    return model


def time_call(fn: Callable[[], Any], warmup: int, reps: int) -> tuple[float, float]:
    """(median ms, peak GiB) of fn()."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    return statistics.median(times), peak


def run_prefill(lengths: tuple[int, ...], batch: int = 1, left_pad: float = 0.0, layers: int = 2,
                variants: tuple[str, ...] = PREFILL_VARIANTS, warmup: int = 2, reps: int = 5,
                log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Prefill of the Llama-3-8B-shaped `LlamaModel` per length and variant (module docstring); rows in ms/GiB."""
    model = build_model(layers, max(lengths) + 16)
    results = []
    for L in lengths:
        ids = torch.randint(0, 32000, (batch, L), device="cuda")
        mask = None
        if left_pad > 0:
            mask = torch.ones(batch, L, dtype=torch.long, device="cuda")
            for b in range(1, batch):  # row 0 unpadded, the others padded on the left
                mask[b, : int(L * left_pad)] = 0
        kwargs = {"attention_mask": mask} if mask is not None else {}
        for variant in variants:
            torch._dynamo.reset()
            gc.collect()
            torch.cuda.empty_cache()
            report = sparse_compile.Report()
            if variant == "eager":
                fn = model
            elif variant == "compile":
                fn = torch.compile(model, dynamic=False)
            elif variant == "sparse-dense":
                fn = torch.compile(model, backend="sparse", dynamic=False,
                                   options={"policy": "dense", "report": report})
            else:
                raise ValueError(f"unknown variant {variant!r}")
            t0 = time.perf_counter()
            try:
                with torch.no_grad():
                    fn(ids, **kwargs)  # compile
                    torch.cuda.synchronize()
                    compile_s = time.perf_counter() - t0
                    ms, peak = time_call(lambda fn=fn, ids=ids, kw=kwargs: fn(ids, **kw), warmup, reps)
                row = {"L": L, "batch": batch, "left_pad": left_pad, "variant": variant, "ms": round(ms, 3),
                       "peak_gib": round(peak, 2), "first_call_s": round(compile_s, 1)}
                if variant == "sparse-dense":
                    row["sites"] = len(report.sites)
                    row["masks"] = sorted({s.mask for s in report.sites})
            except torch.OutOfMemoryError as err:
                row = {"L": L, "batch": batch, "left_pad": left_pad, "variant": variant, "error": f"OOM: {err}"[:200]}
            log(json.dumps(row))
            results.append(row)
            del fn
    return results


def prefill_markdown(results: list[dict[str, Any]]) -> str:
    """The prefill rows as a markdown table, with ratios to eager and to plain torch.compile."""
    lines = ["| L | B | left pad | variant | ms | peak GiB | vs eager | vs plain compile |",
             "|---|---|---|---|---|---|---|---|"]
    by = {(r["L"], r["batch"], r["left_pad"], r["variant"]): r for r in results}
    for r in results:
        if "error" in r:
            lines.append(f"| {r['L']} | {r['batch']} | {r['left_pad']} | {r['variant']} | {r['error'][:40]} | | | |")
            continue
        key = (r["L"], r["batch"], r["left_pad"])
        eager, comp = by.get(key + ("eager",)), by.get(key + ("compile",))
        ve = f"{r['ms'] / eager['ms']:.2f}x" if eager and "ms" in eager else ""
        vc = f"{r['ms'] / comp['ms']:.2f}x" if comp and "ms" in comp else ""
        lines.append(f"| {r['L']} | {r['batch']} | {r['left_pad']} | {r['variant']} | {r['ms']} | {r['peak_gib']} | "
                     f"{ve} | {vc} |")
    return "\n".join(lines)


def compiled_forward(variant: str, forward: Callable, report: Any) -> Callable:
    """The variant's forward; CUDA-graph variants mark a new step per call (generate reads each call's
    logits before the next one, as torch.compiler.cudagraph_mark_step_begin requires)."""
    variant, _, policy = variant.partition(":")
    if policy and variant not in ("sparse", "sparse_ro"):
        raise ValueError(f"variant {variant!r} takes no policy (only sparse and sparse_ro do)")
    policy = policy or None
    if variant == "eager":
        return forward
    if variant in ("compile_ro", "ceiling_ro"):
        compiled = torch.compile(forward, mode="reduce-overhead")
    elif variant == "sparse_ro":
        compiled = torch.compile(forward, backend=sparse_compile.backend(policy, report=report),
                                 mode="reduce-overhead")
    elif variant == "compile":
        return torch.compile(forward)
    elif variant == "sparse":
        return torch.compile(forward, backend=sparse_compile.backend(policy, report=report))
    else:
        raise ValueError(f"unknown variant {variant!r}; choose from {GENERATE_VARIANTS} (sparse ones may add :POLICY)")

    def step(*args: Any, **kwargs: Any) -> Any:
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args, **kwargs)

    return step


CACHES = ("static", "dynamic", "sparse")


def make_cache(kind: str, model: Any, max_cache_len: int, policy: str | None) -> Any:
    """The cache generate() runs on: a StaticCache, a SparseCache for `policy` (`sparse_compile.cache.cache_form`
    names the forms), or None (a DynamicCache per call)."""
    if cache_form(kind)[0] == "dynamic":
        return None
    return build_cache(kind, model.config, max_cache_len, policy or "dense")


class StepMarks:
    """A generate() stopping criterion that never stops and marks when each step's token is appended: a CUDA event
    recorded on the current stream (no synchronisation, so the steps run as they would unobserved), or the host
    clock on the CPU. The first mark follows the prefill's token, so `decode_seconds` (first mark to last) is the
    decode steps' time alone, host work between steps included, without the prefill's run-to-run spread."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.marks: list[Any] = []

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def decode_seconds(self) -> float:
        """Seconds from the first mark to the last (0.0 with fewer than two marks); synchronises on CUDA."""
        if len(self.marks) < 2:
            return 0.0
        if self.cuda:
            self.marks[-1].synchronize()
            return self.marks[0].elapsed_time(self.marks[-1]) / 1000
        return self.marks[-1] - self.marks[0]


def timed_generate(model: Any, ids: torch.Tensor, cache: Any, new_tokens: int,
                   marks: StepMarks | None = None) -> tuple[float, torch.Tensor]:
    """(seconds, tokens) of one greedy generate() on `cache` (reset first; None: a new DynamicCache). marks: a
    `StepMarks` that records every step's end (passed as a stopping criterion)."""
    from transformers import StoppingCriteriaList

    if cache is None:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
    else:
        cache.reset()
    synchronize = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    synchronize()
    start = time.perf_counter()
    extra = {} if marks is None else {"stopping_criteria": StoppingCriteriaList([marks])}
    with torch.no_grad():
        out = model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, disable_compile=True, attention_mask=torch.ones_like(ids), **extra)
    synchronize()
    return time.perf_counter() - start, out


def run_variant(model: Any, variant: str, ids: torch.Tensor, new_tokens: int, reps: int,
                cache_kind: str = "static") -> dict[str, Any]:
    forward = model.forward
    cache = make_cache(cache_kind, model, ids.shape[1] + new_tokens + 1, variant.partition(":")[2] or None)
    timed_generate(model, ids[:, :16], cache, 2)  # eager: the cache allocates its tensors outside any graph
    report = sparse_compile.Report()
    previous = use_noop_attention(model) if variant == "ceiling_ro" else None
    model.forward = compiled_forward(variant, forward, report)
    try:
        t0 = time.perf_counter()
        for _ in range(2):  # compile, record CUDA graphs (prefill, decode)
            timed_generate(model, ids, cache, 1 + new_tokens)
        warm_s = time.perf_counter() - t0
        ttft = statistics.median(timed_generate(model, ids, cache, 1)[0] for _ in range(reps))
        totals, steps, tokens = [], [], None
        for _ in range(reps):
            marks = StepMarks(ids.device)
            seconds, tokens = timed_generate(model, ids, cache, 1 + new_tokens, marks)
            totals.append(seconds)
            steps.append(marks.decode_seconds())
        total, decode = statistics.median(totals), statistics.median(steps)
        extra = {} if cache is None or not hasattr(cache, "extra_bytes") else {
            "cache_extra_gib": cache.extra_bytes() / 2**30, "cache_kv_gib": cache.kv_bytes() / 2**30}
        return {"variant": variant, "cache": cache_kind, **extra, "ttft_ms": 1000 * ttft, "total_ms": 1000 * total,
                "decode_tok_s": new_tokens / max(decode, 1e-9), "decode_ms": [1000 * t for t in steps],
                "decode_tok_s_from_totals": new_tokens / max(total - ttft, 1e-9), "warmup_s": warm_s,
                "tokens": tokens[0, ids.shape[1]:].tolist()}
    finally:
        model.forward = forward
        if previous is not None:
            model.set_attn_implementation(previous)
        torch._dynamo.reset()


def run_generate(prompt: int = 32768, new_tokens: int = 128, layers: int = 4, reps: int = 3,
                 variants: tuple[str, ...] = GENERATE_VARIANTS, log: Callable[[str], None] = print,
                 caches: tuple[str, ...] = ("static",)) -> list[dict[str, Any]]:
    """Greedy generation per variant (module docstring); one row per variant."""
    model = build_model(layers, prompt + new_tokens + 1, lm_head=True)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(0))
    rows = []
    runs = [(v.partition("@")[0], v.partition("@")[2]) if "@" in v else (v, c) for c in caches for v in variants]
    for variant, cache_kind in dict.fromkeys(runs):  # a V@C variant once, whatever the caches
        cache_form(cache_kind)  # a clear error for an unknown cache before any work
        torch.cuda.reset_peak_memory_stats()
        try:
            rows.append(run_variant(model, variant, ids, new_tokens, reps, cache_kind))
            rows[-1]["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        except torch.OutOfMemoryError as err:
            rows.append({"variant": variant, "cache": cache_kind, "error": f"OOM: {err}"[:200]})
            log(f"{variant} ({cache_kind} cache): {rows[-1]['error']}")
            torch.cuda.empty_cache()
            continue
        r = rows[-1]
        log(f"{variant} ({cache_kind} cache): TTFT {r['ttft_ms']:.1f} ms, decode {r['decode_tok_s']:.1f} tok/s "
            f"(warm-up {r['warmup_s']:.1f} s), peak {r['peak_gib']:.1f} GiB")
    return rows


def generate_markdown(rows: list[dict[str, Any]], prompt: int, new_tokens: int) -> str:
    """The generate rows as a markdown table: decode speed relative to compile_ro and to the dense policy
    (sparse_ro on a StaticCache), the ceiling (ceiling_ro's tok/s: attention free) beside every row, and
    whether the tokens equal eager's."""
    done = [r for r in rows if "error" not in r]
    base = {r["variant"]: r for r in done if r.get("cache", "static") == "static"}
    ref, dense, ceiling = base.get("compile_ro"), base.get("sparse_ro"), base.get("ceiling_ro")
    lines = [f"prompt {prompt} tokens, {new_tokens} new tokens, B=1", "",
             "| variant | cache | TTFT ms | decode tok/s | vs compile_ro | vs dense policy | ceiling tok/s | "
             "peak GiB | cache extra / K+V | tokens equal eager |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    eager_tokens = base["eager"]["tokens"] if "eager" in base else None

    def ratio(r: dict, other: dict | None) -> str:
        return f"{r['decode_tok_s'] / other['decode_tok_s']:.3f}x" if other else "-"

    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['cache']} | {r['error']} | | | | | | | |")
            continue
        same = "-" if eager_tokens is None else ("yes" if r["tokens"] == eager_tokens else "no")
        peak = f"{r['peak_gib']:.1f}" if "peak_gib" in r else "-"
        extra = (f"{r['cache_extra_gib']:.3f} / {r['cache_kv_gib']:.3f} GiB"
                 if r.get("cache_kv_gib") else "-")
        top = f"{ceiling['decode_tok_s']:.1f}" if ceiling else "-"
        lines.append(f"| {r['variant']} | {r.get('cache', 'static')} | {r['ttft_ms']:.1f} | {r['decode_tok_s']:.1f} | "
                     f"{ratio(r, ref)} | {ratio(r, dense)} | {top} | {peak} | {extra} | {same} |")
    return "\n".join(lines)
