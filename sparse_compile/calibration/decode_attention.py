"""Calibrations measured on decode-step attention over real text (`Knob.procedure` "chunks" and
"selection_layers"): one exact pass of the model per corpus window records every layer's post-RoPE q/k
(`text.record_windows`), the queries at `--queries` positions of each window's second half being decode
steps, and the result is written as a decode policy.

## chunks (FASA: `python -m sparse_compile calibrate fasa --out fasa.toml`)
Rank each head's RoPE frequency chunks by how well they predict the top keys, and write the dominant ones.

The authors' criterion (shared/specs/fasa.md): at decode steps over real text, for every layer, query head
and chunk c, the overlap |top-N by q_c.k_c  ∩  top-N by q.k| / N (raw dot products, no scale), averaged over
steps; chunks ranked by it. A decode step at position p is the query at p over the keys 0..p, so the
queries of one prefill pass over a window of text *are* decode steps: `--queries` positions evenly spaced
over the window's second half are used (each over all the keys before it). q and k are the post-RoPE
tensors the model hands its attention function (a transformers attention implementation that records
them), so the chunk pairs follow the site's real RoPE layout, as read by the backend's own matcher.

Besides the ranking, the command measures the quality of the chosen set: the top-N recall of the summed
partial score over the kept chunks (what the method runs), for the calibrated chunks, the model-agnostic
rule (the lowest-frequency quarter) and, with `--compare-adjacent`, chunks ranked and scored with the
authors' released pairing (2i, 2i + 1) instead of the true rotate-half pair (i, i + D/2).

## selection_layers (LessIsMore: `python -m sparse_compile calibrate lessismore --out lessismore-m.toml`)
Choose the selection layers whose token sets serve the following layers best.

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

## The needle check (both procedures; `--no-niah` skips it; needles.py)
The written policy runs eval's NIAH grid (at `--niah-lengths`, default `--length`) against the eager model:
its decode steps answer through the method. A needle eager finds and the policy loses moves to safer
settings, at most `--needle-probes` of them, the first that loses none being written (`chunk_candidates`:
more chunks per head and a larger budget, alternately; `selection_candidates`: one more selection layer
each). When none keeps every needle, the one losing fewest goes to `<out>.unverified.toml`, exit status 1.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch

from sparse_compile.argtypes import positive_int
from sparse_compile.calibration.needles import (
    Candidate,
    add_needle_arguments,
    check_candidates,
    needle_evaluator,
    needle_probes,
    write_checked,
)
from sparse_compile.calibration.text import (
    add_window_arguments,
    check_at_least_one,
    check_budget,
    decode_positions,
    load_calibration_text,
    record_windows,
)
from sparse_compile.kernels.fasa import chunk_dims, default_chunk_count, default_chunks
from sparse_compile.kernels.lessismore import budget_split, select_tokens, selection_visible
from sparse_compile.methods import METHODS
from sparse_compile.policy import parse_layers, parse_toml


def decode_policy_text(written_by: str, summary: str, name: str, description: str, method: str, min_seq_len: int,
                       params: list[str], notes: tuple[str, ...] | list[str] = ()) -> str:
    """A policy TOML with dense prefill and `method` in decode: header comment (the summary, then `notes`, e.g.
    the needle check's lines), then the decode params lines."""
    return "\n".join([
        f"# Written by `python -m sparse_compile calibrate {written_by}` "
        "(sparse_compile/calibration/decode_attention.py).",
        f"# {summary}", *(f"# {line}" for line in notes), f'name = "{name}"', f'description = "{description}"', "",
        "[prefill]", 'method = "dense"', "",
        "[decode]", f'method = "{method}"', f"min_seq_len = {min_seq_len}", "",
        "[decode.params]", *params, "",
    ])


# -- chunks (FASA) ---------------------------------------------------------------------------------

def add_chunks_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the chunks procedure."""
    add_window_arguments(parser, queries=64)
    parser.add_argument("--top-n", type=positive_int, default=256,
                        help="N of the top-N overlap criterion (default 256)")
    parser.add_argument("--keep", type=int, default=0,
                        help="chunks used per head: the policy's n_chunks (default 0: head_dim / 8); every chunk is "
                             "written, ranked best first, so n_chunks can be raised without recalibrating")
    parser.add_argument("--budget", type=float, default=0.25,
                        help="the policy's budget: tokens (>= 1) or a fraction of the cache (< 1); default 0.25")
    parser.add_argument("--gqa", choices=("per_head", "per_kv_head"), default="per_head", help="the policy's gqa")
    parser.add_argument("--sink", type=int, default=0, help="the policy's sink (first tokens always kept; default 0)")
    parser.add_argument("--recent", type=int, default=0, help="the policy's recent (last tokens kept; default 0)")
    parser.add_argument("--min-seq-len", type=int, default=1024, help="the policy's decode min_seq_len")
    parser.add_argument("--compare-adjacent", action="store_true",
                        help="also rank and score the authors' (2i, 2i+1) pairing (rotate-half models)")
    parser.add_argument("--report", type=Path, default=None, help="write per-layer overlaps/recalls as JSON here")
    add_needle_arguments(parser, "--length", "safer settings (more chunks per head and a larger budget, alternately)")


class OverlapStats:
    """Per layer: the summed per-chunk overlap (H, C) and the number of decode steps; on the last window
    (`final`), the top-N recall of the chosen chunk sets, measured right after that window's overlaps are in."""

    def __init__(self, top_n: int, positions: list[int], layouts: tuple[str, ...], rotary: dict[int, int],
                 keep: int):
        self.top_n, self.positions, self.layouts, self.rotary, self.keep = top_n, positions, layouts, rotary, keep
        self.sums: dict[tuple[str, int], torch.Tensor] = {}
        self.steps: dict[int, int] = {}
        self.final = False
        self.recalls: dict[str, dict[int, float]] = {"calibrated": {}, "rule": {}, "adjacent": {}}

    def add(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        """q: (H, L, D), k: (Hkv, L, D) post-RoPE of one window."""
        H, L, D = q.shape
        group = H // k.shape[0]
        pos = torch.tensor(self.positions)
        visible = torch.arange(L)[None, :] <= pos[:, None]  # (M, L): decode step at p sees keys 0..p
        for lay in self.layouts:
            self.sums[(lay, layer)] = self.sums.get((lay, layer), 0) + torch.zeros(H, D // 2, dtype=torch.float64)
        self.steps[layer] = self.steps.get(layer, 0) + len(self.positions)
        for h in range(H):  # one head at a time: (C, M, L) partial scores
            kk = k[h // group].double()  # (L, D)
            qs = q[h, pos].double()  # (M, D)
            full = (qs @ kk.T).masked_fill(~visible, float("-inf"))  # (M, L)
            in_top = torch.zeros_like(full, dtype=torch.bool).scatter_(-1, full.topk(self.top_n, -1).indices, True)
            for lay in self.layouts:
                pairs = torch.tensor([chunk_dims(c, lay, self.rotary[layer], D) for c in range(D // 2)])  # (C, 2)
                part = torch.einsum("mcx,lcx->cml", qs[:, pairs], kk[:, pairs]).masked_fill(~visible, float("-inf"))
                hits = torch.gather(in_top.expand(D // 2, -1, -1), -1, part.topk(self.top_n, -1).indices)
                self.sums[(lay, layer)][h] += hits.double().sum((-1, -2)) / self.top_n
            if self.final:
                self.add_recalls(layer, h, qs, kk, in_top, visible)

    def add_recalls(self, layer: int, h: int, qs: torch.Tensor, kk: torch.Tensor, in_top: torch.Tensor,
                    visible: torch.Tensor) -> None:
        """Top-N recall of the summed partial score over head h's kept chunks (this window's steps)."""
        D = qs.shape[1]
        sets = {"calibrated": (self.layouts[0], self.ranking(self.layouts[0], layer)[h, : self.keep].tolist()),
                "rule": (self.layouts[0], list(default_chunks(self.rotary[layer], D, self.keep)))}
        if "adjacent" in self.layouts[1:]:
            sets["adjacent"] = ("adjacent", self.ranking("adjacent", layer)[h, : self.keep].tolist())
        for name, (lay, cs) in sets.items():
            dims = [d for c in cs for d in chunk_dims(c, lay, self.rotary[layer], D)]
            pred = (qs[:, dims] @ kk[:, dims].T).masked_fill(~visible, float("-inf"))
            hit = float(torch.gather(in_top, -1, pred.topk(self.top_n, -1).indices).double().mean())
            self.recalls[name][layer] = self.recalls[name].get(layer, 0.0) + hit / self.heads(layer)

    def heads(self, layer: int) -> int:
        return self.sums[(self.layouts[0], layer)].shape[0]

    def ranking(self, layout: str, layer: int) -> torch.Tensor:
        """(H, C) chunk indices, best first (ties: lower chunk index first)."""
        mean = self.sums[(layout, layer)] / self.steps[layer]
        return torch.stack([torch.tensor(sorted(range(mean.shape[1]), key=lambda c, r=row: (-float(r[c]), c)))
                            for row in mean])


def toml_chunks(chunks: list[list[list[int]]]) -> str:
    """`chunks = [...]` with one layer per line (an empty list for layers that keep the rule)."""
    rows = ["  [" + ", ".join("[" + ", ".join(str(c) for c in head) + "]" for head in layer) + "]," for layer in chunks]
    return "chunks = [\n" + "\n".join(rows) + "\n]"


def chunks_policy_text(model_name: str, chunks: list[list[list[int]]], args: argparse.Namespace, summary: str,
                       keep: int, budget: float | None = None, notes: tuple[str, ...] | list[str] = ()) -> str:
    """The FASA policy: the budget (default `--budget`) and selection flags, every layer's full chunk ranking,
    `keep` of them used per head."""
    budget = args.budget if budget is None else budget
    budget = int(budget) if budget >= 1 else budget
    what = f"{budget} tokens" if budget >= 1 else f"{budget:.0%} of the cache"
    description = (f"FASA decode: top {what} by the dominant RoPE frequency chunks calibrated on {model_name} "
                   "(other models: the model-agnostic rule, the lowest-frequency quarter); dense prefill.")
    return decode_policy_text("fasa", summary, "fasa", description, "fasa", args.min_seq_len, [
        f"budget = {budget}",
        f"n_chunks = {keep}",
        f"sink = {args.sink}",
        f"recent = {args.recent}",
        "dense_layers = [0]",
        'mismatch = "rule"',
        f'gqa = "{args.gqa}"',
        toml_chunks(chunks),
    ], notes)


def larger_budget(budget: float) -> float:
    """The next budget of the needle search: twice the tokens, or for a fraction f of the cache min(2f, (1 + f) / 2)
    (0.25 -> 0.5 -> 0.75 -> 0.875: always below 1)."""
    return int(2 * budget) if budget >= 1 else min(2 * budget, (1 + budget) / 2)


def chunk_candidates(keep: int, budget: float, all_chunks: int, count: int) -> list[tuple[int, float]]:
    """`count` FASA settings (n_chunks, budget) for the needle check, the calibrated (keep, budget) first, then
    each safer than the one before: n_chunks doubled (at most `all_chunks`, the head's D/2, where the partial
    score is the exact one) and the budget raised (`larger_budget`), alternately; only the budget once every
    chunk is used."""
    found = [(keep, budget)]
    chunks_turn = True
    while len(found) < count:
        n, b = found[-1]
        if chunks_turn and n < all_chunks:
            found.append((min(2 * n, all_chunks), b))
        else:
            found.append((n, larger_budget(b)))
        chunks_turn = not chunks_turn
    return found


def run_chunks(args: argparse.Namespace) -> int:
    """The chunks procedure: rank, print the recall summary, write the policy (and --report)."""
    check_at_least_one(args, ("length", "samples", "queries", "top_n"))
    if args.sink < 0 or args.recent < 0:
        raise ValueError(f"--sink and --recent must be >= 0, got {args.sink} and {args.recent}")
    if args.top_n * 2 > args.length:
        raise ValueError(f"--top-n {args.top_n} must be at most half of --length {args.length}")
    check_budget(args.budget)
    source = load_calibration_text(args)
    ev = needle_evaluator(args, source.model, source.tokenizer, (args.length,))  # checks the grid before the work
    sites = source.sites
    layers = sorted(sites)
    D = sites[layers[0]].head_dim
    rotary = {layer: sites[layer].rotary_dim for layer in layers}
    layout = sites[layers[0]].rope
    keep = args.keep or default_chunk_count(D)
    if not 1 <= keep <= D // 2:
        raise ValueError(f"--keep {keep} must be in [1, head_dim / 2 = {D // 2}]")
    layouts = (layout, "adjacent") if args.compare_adjacent and layout != "adjacent" else (layout,)
    positions = decode_positions(args.length, args.queries)
    stats = OverlapStats(args.top_n, positions, layouts, rotary, keep)


    def record(layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        if layer in sites:
            stats.add(layer, q.float(), k.float())

    def before_window(i: int) -> None:
        stats.final = i == len(source.windows) - 1  # the last window also measures the chosen sets' recall

    record_windows(source, "calibrate_fasa", record, not args.no_progress, before_window=before_window)
    chunks = {lay: [stats.ranking(lay, layer).tolist() for layer in layers] for lay in layouts}  # full ranking

    def mean(name: str) -> float:
        rows = [value for layer, value in stats.recalls[name].items() if layer != 0]
        return sum(rows) / len(rows) if rows else math.nan

    summary = (f"{args.model}, corpus {source.corpus_name}, {args.samples} x {args.length} tokens, "
               f"{len(positions)} decode "
               f"steps per window, top-{args.top_n} overlap, {keep} of {D // 2} chunks per head ({layout}); top-"
               f"{args.top_n} recall of the kept chunks on the last window (layers 1+): calibrated "
               f"{mean('calibrated'):.3f}, rule {mean('rule'):.3f}"
               + (f", adjacent pairing {mean('adjacent'):.3f}" if stats.recalls["adjacent"] else ""))
    print(summary)
    out_chunks = chunks[layout]
    if layers != list(range(len(layers))):
        raise ValueError(f"site layers {layers} are not 0..{len(layers) - 1}: cannot index chunks by layer")
    settings = chunk_candidates(keep, args.budget, D // 2, 1 if ev is None else needle_probes(args) + 1)
    candidates = [Candidate(f"n_chunks {n}, budget {b:g}",
                            text_policy(chunks_policy_text(args.model, out_chunks, args, summary, n, b)))
                  for n, b in settings]  # each validated as it would be written
    check = None if ev is None else check_candidates(ev, candidates, needle_probes(args))
    n_chunks, budget = settings[check.chosen if check else 0]
    text = chunks_policy_text(args.model, out_chunks, args, summary, n_chunks, budget,
                              check.header() if check else ())
    text_policy(text)  # validates what is written
    status = write_checked(text, args.out, check)
    if args.report is not None:
        detail: dict[str, Any] = {"summary": summary, "recall": stats.recalls, "layout": layout, "keep": keep,
                                  "top_n": args.top_n,
                                  "overlap": {f"{lay}:{layer}": (stats.sums[(lay, layer)] / stats.steps[layer]).tolist()
                                              for lay in layouts for layer in layers},
                                  "chunks": chunks, "n_chunks": n_chunks, "budget": budget,
                                  "needles": check.entry if check else None}
        args.report.write_text(json.dumps(detail))
    return status


def text_policy(text: str) -> Any:
    """The policy TOML text as a loaded Policy (validation of the written file)."""
    return parse_toml(text, "calibrate fasa output")


# -- selection_layers (LessIsMore) -------------------------------------------------------------------

def add_selection_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the selection_layers procedure."""
    add_window_arguments(parser, queries=32)
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
    add_needle_arguments(parser, "--length", "more selection layers (one more each)")


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


def selection_candidates(coverage: torch.Tensor, dense: set[int], count: int, limit: int
                         ) -> list[tuple[list[int], float]]:
    """(layers, mean coverage) of the best `count` selection layers, then of the best count + 1, ... (each safer:
    fewer layers reuse another's token set): at most `limit` entries, and no more than the non-dense layers."""
    free = coverage.shape[0] - len(dense)
    return [choose_selection_layers(coverage, dense, c) for c in range(count, min(free, count + limit - 1) + 1)]


def selection_policy_text(model_name: str, layers: list[int], dense: list[int | str], args: argparse.Namespace,
                          summary: str, notes: tuple[str, ...] | list[str] = ()) -> str:
    """The LessIsMore policy: the chosen selection layers and the policy flags."""
    name = f"lessismore-{model_name}" if "/" not in model_name and "." not in model_name else "lessismore-calibrated"
    description = (f"LessIsMore decode above {args.min_seq_len} cached tokens with the selection layers calibrated "
                   f"on {model_name} ({', '.join(map(str, layers))}): {args.policy_budget} tokens shared by every "
                   "head of the layers after each; dense prefill.")
    return decode_policy_text("lessismore", summary, name, description, "lessismore", args.min_seq_len, [
        f"budget = {args.policy_budget}",
        f"recent_fraction = {args.recent_fraction}",
        f"sink = {args.sink}",
        f"selection_layers = {json.dumps(layers)}",
        f"dense_layers = {json.dumps(dense)}",
    ], notes)


def run_selection_layers(args: argparse.Namespace) -> int:
    """The selection_layers procedure: coverage matrix, the best layers, the policy (and --report)."""
    check_at_least_one(args, ("length", "samples", "queries", "selections", "policy_budget"))
    check_budget(args.budget)
    if not 0.0 <= args.recent_fraction < 1.0 or args.sink < 0:
        raise ValueError(f"--recent-fraction must be in [0, 1) and --sink >= 0, got {args.recent_fraction}, "
                         f"{args.sink}")
    dense_spec = parse_layers([part.strip() for part in args.dense_layers.split(",") if part.strip()],
                              "calibrate lessismore", "--dense-layers", allow_empty=True)
    source = load_calibration_text(args)
    ev = needle_evaluator(args, source.model, source.tokenizer, (args.length,))  # checks the grid before the work
    sites = source.sites
    num_layers = len(sites)
    if sorted(sites) != list(range(num_layers)):
        raise ValueError(f"site layers {sorted(sites)} are not 0..{num_layers - 1}: cannot index layers")
    dense = {layer for layer in range(num_layers) if layer in dense_spec}
    scale = sites[0].head_dim ** -0.5
    positions = decode_positions(args.length, args.queries)
    stats = CoverageStats(positions, args.budget, args.sink, args.recent_fraction)

    record_windows(source, "calibrate_lessismore", stats.capture, not args.no_progress,
                   after_window=lambda i: stats.finish_window(scale))
    coverage = stats.coverage()
    layers, chosen = choose_selection_layers(coverage, dense, args.selections)
    method = METHODS[args.method]
    default_params = method.Params(dense_layers=tuple(dense_spec.to_list()))
    default = [layer for layer in range(num_layers) if method.selection_role(layer, num_layers, default_params)
               == "select"]
    summary = (f"{args.model}, corpus {source.corpus_name}, {args.samples} x {args.length} tokens, "
               f"{len(positions)} decode "
               f"steps per window, budget {args.budget:g} at calibration; mean attention mass of the reusing layers "
               f"inside the reused set: chosen {layers} {chosen:.3f}, default {default} "
               f"{mean_coverage(coverage, dense, default):.3f}")
    print(summary)
    dense_list = dense_spec.to_list()
    options = selection_candidates(coverage, dense, args.selections, 1 if ev is None else needle_probes(args) + 1)
    candidates = [Candidate(f"selection layers {found} (coverage {cov:.3f})", parse_toml(
        selection_policy_text(args.model, found, dense_list, args, summary), "calibrate lessismore output"))
        for found, cov in options]  # each validated as it would be written
    check = None if ev is None else check_candidates(ev, candidates, needle_probes(args))
    written = options[check.chosen if check else 0][0]
    text = selection_policy_text(args.model, written, dense_list, args, summary, check.header() if check else ())
    parse_toml(text, "calibrate lessismore output")  # validates what is written
    status = write_checked(text, args.out, check)
    if args.report is not None:
        args.report.write_text(json.dumps({"summary": summary, "coverage": coverage.tolist(), "chosen": written,
                                           "calibrated": layers, "default": default, "positions": positions,
                                           "needles": check.entry if check else None}))
    return status
