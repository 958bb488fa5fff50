"""What every benchmark of the `bench` harness shares: timing (do_bench, CUDA-graph replays, a CPU timer
for tests), structured post-RoPE inputs, FlexAttention block masks built from our block lists, error and
environment records. The bottom of the benchmarks package: it imports the core only.

    do_bench(fn, rep_ms)             median ms of fn() (triton.testing.do_bench)
    graph_ms(fn, rep_ms)             median ms of replaying a CUDA graph that captured fn()
    time_ms(fn, rep_ms, device)      do_bench on CUDA, a plain timer elsewhere (tests)
    structured_qkv(...)              q, k, v with sinks, a local window and vertical keys after RoPE
    flex_block_mask(blocks, heads)   a Flex BlockMask selecting the same blocks as a BlockList
"""

from __future__ import annotations

import datetime as _dt
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.nn.attention.flex_attention import BlockMask

from sparse_compile.kernels.block_mask import BlockList


def do_bench(fn: Callable[[], Any], rep_ms: float = 60.0) -> float:
    """Median milliseconds of fn() by `triton.testing.do_bench` (warm-up max(10, rep_ms / 4) ms)."""
    import triton

    return float(triton.testing.do_bench(fn, warmup=max(10.0, rep_ms / 4), rep=rep_ms, return_mode="median"))


def lists_full_width(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_num_blocks (B, H, n) and kv_indices (B, H, n, n) of a (B, H, n, n) bool block mask, selected
    blocks first (ascending): the full-width lists FlexAttention's `BlockMask.from_kv_blocks` takes."""
    num = mask.sum(-1, dtype=torch.int32)
    idx = torch.sort(mask.to(torch.int8), dim=-1, descending=True, stable=True).indices.to(torch.int32)
    return num.contiguous(), idx.contiguous()


def causal_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
    """FlexAttention mask_mod of causal attention (queries and keys at the same positions)."""
    return q_idx >= kv_idx


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| (Frobenius, float32)."""
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def time_ms(fn: Callable[[], Any], rep_ms: float, device: str) -> float:
    """Median milliseconds of fn(): triton's do_bench on CUDA; elsewhere (tests) one call after a warm-up."""
    if device == "cuda":
        return do_bench(fn, rep_ms)
    fn()  # warm-up, then one timed call: the CPU path checks that a case runs, it is no benchmark
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def first_call_ms(fn: Callable[[], Any], device: str) -> float:
    """Milliseconds of one call of fn (synchronised): the first call pays JIT/compile time."""
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


ROPE_THETA = 500_000.0


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


def capture(fn: Callable[[], Any]) -> tuple[Any, Any]:
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


def graph_ms(fn: Callable[[], Any], rep_ms: float = 60.0) -> float | str:
    """Median ms of replaying a CUDA graph that captured fn() (fn must not sync or allocate by data)."""
    try:
        return do_bench(capture(fn)[0].replay, rep_ms)
    except Exception as err:  # record why capture failed
        return f"capture failed: {type(err).__name__}: {str(err)[:160]}"


def flex_permuted_block_mask(sel: Any, heads: int, q_len: int, q_offset: int) -> Any:
    """A FlexAttention BlockMask for a permuted selection (PBS): the same block lists over the permuted
    K/V, every listed block partial with a mask_mod that checks causality on the original positions
    (kv_order), as the engine does. Per-KV-head selections are repeated over their query heads."""
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


def measure(rows: list[dict], base: dict, impl: str, fn: Callable[[], Any], rep_ms: float, device: str,
            graph: bool = False, **extra: Any) -> dict | None:
    """Time fn into a row (ms = None and the error text when it fails, e.g. an unavailable backend); with
    graph (CUDA) also `graph_ms`, the replay of a CUDA graph that captured fn (a string when capture fails):
    decode steps run captured in practice, where launch overhead disappears."""
    row = {**base, "impl": impl, **extra}
    try:
        row["ms"] = time_ms(fn, rep_ms, device)
    except Exception as err:  # a backend may be unavailable for a shape: record and go on
        row["ms"], row["error"] = None, f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    if graph and device == "cuda" and row["ms"] is not None:
        row["graph_ms"] = graph_ms(fn, rep_ms)
    rows.append(row)
    return row


def environment(device: str) -> dict[str, Any]:
    """torch, date, device and, on CUDA, the GPU, triton, CUDA and cuDNN versions."""
    env = {"torch": torch.__version__, "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
           "device": device}
    if device == "cuda":
        import triton

        env.update(gpu=torch.cuda.get_device_name(0), triton=triton.__version__, cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())
    return env


class BenchmarkUnavailable(RuntimeError):
    """The benchmark cannot run here (no CUDA GPU, or a part of it is not installed)."""


def check_cuda() -> None:
    """Raise BenchmarkUnavailable unless a CUDA GPU is usable (fail before any work)."""
    if not torch.cuda.is_available():
        raise BenchmarkUnavailable(
            f"bench needs a CUDA GPU: torch.cuda.is_available() is False (torch {torch.__version__}); run it on a "
            "GPU machine (`python -m sparse_compile eval` is the CPU tool)"
        )


