"""LessIsMore calibration: choose the selection layers whose token sets serve the following layers best,
and write them into a policy (`python -m sparse_compile calibrate lessismore --out lessismore-m.toml`).

The method's default (layer 2 and num_layers // 3, the paper's rule for its reasoning models) is a guess
about where a model's attention stabilises. This command measures it. At decode steps over real text (the
queries at `--queries` positions of each window's second half, each over every key before it: exactly a
decode step, as in `calibrate fasa`), for every pair of layers s < l it records the coverage

    coverage(s, l) = mean over steps and query heads of layer l of the attention mass (softmax of layer
                     l's own logits) that falls inside the token set layer s would select
                     (`kernels.lessismore.select_tokens`: sink + rank-by-rank union + recent, `--budget`)

and then picks `--selections` layers (the first non-dense layer always selects: nothing exists before it
to reuse) maximising the total coverage of the layers that reuse, by dynamic programming over where each
selection segment starts (exact: every split is tried). Every choice runs the same number of exact
layers, so the comparison is at equal cost. The whole matrix goes to `--report`; the written policy's
header says how it was made and the coverage of the default and of the chosen layers.

Deterministic (no sampling); on CPU for SmolLM2 2 x 4096 tokens take about a minute plus the model load.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sparse_compile.kernels.lessismore import budget_split, select_tokens, selection_visible


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--length", type=int, default=4096, help="tokens per text window (default 4096)")
    parser.add_argument("--samples", type=int, default=2, help="text windows, evenly spaced over the corpus")
    parser.add_argument("--queries", type=int, default=32,
                        help="decode steps per window: query positions spread over its second half (default 32)")
    parser.add_argument("--budget", type=float, default=0.25,
                        help="tokens selected per step at calibration: a count, or a fraction (< 1) of the visible "
                             "keys (default 0.25)")
    parser.add_argument("--policy-budget", type=int, default=2048,
                        help="the written policy's budget in tokens (default 2048)")
    parser.add_argument("--selections", type=int, default=2, help="selection layers to choose (default 2)")
    parser.add_argument("--dense-layers", default="0-1", help="layers that stay exact, e.g. '0-1' (default)")
    parser.add_argument("--sink", type=int, default=4, help="the policy's sink (default 4)")
    parser.add_argument("--recent-fraction", type=float, default=0.25, help="the policy's recent_fraction (0.25)")
    parser.add_argument("--min-seq-len", type=int, default=4096, help="the policy's decode min_seq_len (4096)")
    parser.add_argument("--report", type=Path, default=None, help="write the coverage matrix as JSON here")


class CoverageStats:
    """Accumulates coverage(s, l) over windows from post-RoPE q/k captured per layer."""

    def __init__(self, positions: list[int], budget: float, sink: int, recent_fraction: float) -> None:
        self.positions = positions
        self.budget, self.sink, self.recent_fraction = budget, sink, recent_fraction
        self.captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.sums: torch.Tensor | None = None  # (N, N) float64: [s, l] summed coverage
        self.steps = 0

    def capture(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        """q: (H, L, D), k: (Hkv, L, D) of one window; only the query rows at the positions are kept."""
        self.captured[layer] = (q[:, self.positions].float(), k.float())

    def finish_window(self, scale: float) -> None:
        """Compute this window's coverage matrix from the captured layers and add it."""
        layers = sorted(self.captured)
        n = len(layers)
        pos = torch.tensor(self.positions)
        probs, chosen = [], []
        for layer in layers:
            q, k = self.captured[layer]  # (H, M, D), (Hkv, L, D)
            H, L = q.shape[0], k.shape[1]
            group = H // k.shape[0]
            visible = torch.arange(L)[None, :] <= pos[:, None]  # (M, L)
            logits = torch.einsum("hmd,hld->mhl", q, k.repeat_interleave(group, 0)) * scale
            logits = logits.masked_fill(~visible[:, None, :], float("-inf"))
            probs.append(torch.softmax(logits, dim=-1))  # (M, H, L)
            sets = []
            for m, p in enumerate(self.positions):  # each step selects from its own visible keys
                budget = int(round(self.budget * (p + 1))) if self.budget < 1 else int(self.budget)
                budget = self.fitting_budget(budget)
                sel = select_tokens(logits[m:m + 1], visible[m:m + 1], budget, self.sink, self.recent_fraction)
                sets.append(selection_visible(sel, L)[0])
            chosen.append(torch.stack(sets).double())  # (M, L)
        window = torch.zeros(n, n, dtype=torch.float64)
        for s in range(n):
            for t in range(n):
                window[s, t] = torch.einsum("mhl,ml->", probs[t].double(), chosen[s]) / probs[t].shape[1]
        self.sums = window if self.sums is None else self.sums + window
        self.steps += len(self.positions)
        self.captured.clear()

    def fitting_budget(self, want: int) -> int:
        """The smallest budget >= want that holds the sink and the recency share (a middle >= 0)."""
        budget = max(want, 1)
        while budget - self.sink - budget_split(budget, 0, self.recent_fraction)[2] < 0:
            budget += 1
        return budget

    def coverage(self) -> torch.Tensor:
        """(N, N) mean coverage: [s, l] = mass of layer l inside the set layer s selects."""
        assert self.sums is not None, "no window was measured"
        return self.sums / self.steps


def choose_selection_layers(coverage: torch.Tensor, dense: set[int], count: int) -> tuple[list[int], float]:
    """The `count` selection layers (the first non-dense layer among them) maximising the summed coverage of
    the reusing layers (each non-dense, non-selecting layer reuses the latest selection before it).

    coverage: (N, N), [s, l]. Returns (layers, mean coverage over the reusing layers)."""
    free = [layer for layer in range(coverage.shape[0]) if layer not in dense]
    if count < 1 or count > len(free):
        raise ValueError(f"--selections must be in [1, {len(free)}] (non-dense layers), got {count}")
    cov = coverage.tolist()

    def segment(i: int, j: int) -> float:  # free[i] selects, free[i+1 .. j-1] reuse it
        return sum(cov[free[i]][free[x]] for x in range(i + 1, j))

    n = len(free)
    best: dict[tuple[int, int], tuple[float, list[int]]] = {}
    for i in range(n - 1, -1, -1):
        best[(i, 1)] = (segment(i, n), [free[i]])
        for c in range(2, count + 1):
            options = [(segment(i, j) + best[(j, c - 1)][0], [free[i]] + best[(j, c - 1)][1])
                       for j in range(i + 1, n) if (j, c - 1) in best]
            if options:
                best[(i, c)] = max(options, key=lambda o: o[0])
    total, layers = best[(0, count)]
    reusing = n - count
    return layers, total / max(reusing, 1)


def mean_coverage(coverage: torch.Tensor, dense: set[int], selecting: list[int]) -> float:
    """Mean coverage of the reusing layers for a given list of selection layers."""
    cov, values, latest = coverage.tolist(), [], None
    for layer in range(coverage.shape[0]):
        if layer in dense:
            continue
        if layer in selecting:
            latest = layer
        elif latest is not None:
            values.append(cov[latest][layer])
    return sum(values) / max(len(values), 1)


def capture_attention(stats: CoverageStats):
    """A transformers attention function that records post-RoPE q/k of each layer, then runs SDPA."""
    from sparse_compile.calibration._decode_text import recording_attention

    return recording_attention(stats.capture)


def policy_text(model_name: str, layers: list[int], dense: list[int | str], args: argparse.Namespace,
                summary: str) -> str:
    return "\n".join([
        "# Written by `python -m sparse_compile calibrate lessismore` (sparse_compile/calibration/lessismore.py).",
        f"# {summary}",
        f'name = "lessismore-{model_name}"' if "/" not in model_name and "." not in model_name
        else 'name = "lessismore-calibrated"',
        f'description = "LessIsMore decode above {args.min_seq_len} cached tokens with the selection layers '
        f'calibrated on {model_name} ({", ".join(map(str, layers))}): {args.policy_budget} tokens shared by every '
        'head of the layers after each; dense prefill."',
        "",
        "[prefill]",
        'method = "dense"',
        "",
        "[decode]",
        'method = "lessismore"',
        f"min_seq_len = {args.min_seq_len}",
        "",
        "[decode.params]",
        f"budget = {args.policy_budget}",
        f"recent_fraction = {args.recent_fraction}",
        f"sink = {args.sink}",
        f"selection_layers = {json.dumps(layers)}",
        f"dense_layers = {json.dumps(dense)}",
        "",
    ])


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from sparse_compile.calibration._decode_text import (
        attention_implementation,
        decode_positions,
        load_calibration_text,
        write_policy,
    )
    from sparse_compile.methods import lessismore
    from sparse_compile.policy import parse_layers, parse_toml

    for name in ("length", "samples", "queries", "selections", "policy_budget"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.budget <= 0 or (args.budget >= 1 and args.budget != int(args.budget)):
        raise ValueError(f"--budget must be a whole number of tokens >= 1 or a fraction in (0, 1), got {args.budget}")
    if not 0.0 <= args.recent_fraction < 1.0 or args.sink < 0:
        raise ValueError(f"--recent-fraction must be in [0, 1) and --sink >= 0, got {args.recent_fraction}, "
                         f"{args.sink}")
    dense_spec = parse_layers([part.strip() for part in args.dense_layers.split(",") if part.strip()],
                              "calibrate lessismore", "--dense-layers", allow_empty=True)
    source = load_calibration_text(args)
    sites = source.sites
    num_layers = len(sites)
    if sorted(sites) != list(range(num_layers)):
        raise ValueError(f"site layers {sorted(sites)} are not 0..{num_layers - 1}: cannot index layers")
    dense = {layer for layer in range(num_layers) if layer in dense_spec}
    scale = sites[0].head_dim ** -0.5
    positions = decode_positions(args.length, args.queries)
    stats = CoverageStats(positions, args.budget, args.sink, args.recent_fraction)

    with attention_implementation(source.model, "sparse_compile_lessismore_calibration", capture_attention(stats)):
        for _, window in tqdm(source.windows, desc="calibrate lessismore (windows)", disable=args.no_progress):
            with torch.no_grad():
                source.model.model(window[None].to(source.device))
            stats.finish_window(scale)
    coverage = stats.coverage()
    layers, chosen = choose_selection_layers(coverage, dense, args.selections)
    default_params = lessismore.LessIsMoreParams(dense_layers=tuple(dense_spec.to_list()))
    default = [int(x) for x in lessismore.selection_layers(default_params, num_layers)]
    summary = (f"{args.model}, corpus {source.corpus_name}, {args.samples} x {args.length} tokens, "
               f"{len(positions)} decode "
               f"steps per window, budget {args.budget:g} at calibration; mean attention mass of the reusing layers "
               f"inside the reused set: chosen {layers} {chosen:.3f}, default {default} "
               f"{mean_coverage(coverage, dense, default):.3f}")
    print(summary)
    text = policy_text(args.model, layers, dense_spec.to_list(), args, summary)
    parse_toml(text, "calibrate lessismore output")  # validates what is written
    write_policy(text, args.out)
    if args.report is not None:
        args.report.write_text(json.dumps({"summary": summary, "coverage": coverage.tolist(), "chosen": layers,
                                           "default": default, "positions": positions}))
    return 0
