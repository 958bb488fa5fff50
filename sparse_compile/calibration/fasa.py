"""FASA calibration: rank each head's RoPE frequency chunks by how well they predict the top keys, and
write the dominant ones into a policy (`python -m sparse_compile calibrate fasa --out fasa.toml`).

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
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch

from sparse_compile.kernels.fasa import chunk_dims, default_chunk_count, default_chunks


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--length", type=int, default=4096, help="tokens per text window (default 4096)")
    parser.add_argument("--samples", type=int, default=2, help="text windows, evenly spaced over the corpus")
    parser.add_argument("--queries", type=int, default=64,
                        help="decode positions per window, evenly spaced over its second half (default 64)")
    parser.add_argument("--top-n", type=int, default=256, help="N of the top-N overlap criterion (default 256)")
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


def capture_attention(stats: OverlapStats, layers: set[int]):
    """A transformers attention function that records post-RoPE q/k of each layer, then runs SDPA."""
    from sparse_compile.calibration._decode_text import recording_attention

    def record(layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        if layer in layers:
            stats.add(layer, q.float(), k.float())

    return recording_attention(record)


def toml_chunks(chunks: list[list[list[int]]]) -> str:
    """`chunks = [...]` with one layer per line (an empty list for layers that keep the rule)."""
    rows = ["  [" + ", ".join("[" + ", ".join(str(c) for c in head) + "]" for head in layer) + "]," for layer in chunks]
    return "chunks = [\n" + "\n".join(rows) + "\n]"


def policy_text(model_name: str, chunks: list[list[list[int]]], args: argparse.Namespace, summary: str,
                keep: int) -> str:
    budget = int(args.budget) if args.budget >= 1 else args.budget
    what = f"{budget} tokens" if args.budget >= 1 else f"{args.budget:.0%} of the cache"
    return "\n".join([
        "# Written by `python -m sparse_compile calibrate fasa` (sparse_compile/calibration/fasa.py).",
        f"# {summary}",
        'name = "fasa"',
        f'description = "FASA decode: top {what} by the dominant RoPE frequency chunks calibrated on {model_name} '
        '(other models: the model-agnostic rule, the lowest-frequency quarter); dense prefill."',
        "",
        "[prefill]",
        'method = "dense"',
        "",
        "[decode]",
        'method = "fasa"',
        f"min_seq_len = {args.min_seq_len}",
        "",
        "[decode.params]",
        f"budget = {budget}",
        f"n_chunks = {keep}",
        f"sink = {args.sink}",
        f"recent = {args.recent}",
        "dense_layers = [0]",
        'mismatch = "rule"',
        f'gqa = "{args.gqa}"',
        toml_chunks(chunks),
        "",
    ])


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    import sparse_compile
    from sparse_compile.calibration._decode_text import (
        attention_implementation,
        decode_positions,
        load_calibration_text,
        write_policy,
    )

    for name in ("length", "samples", "queries", "top_n"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.sink < 0 or args.recent < 0:
        raise ValueError(f"--sink and --recent must be >= 0, got {args.sink} and {args.recent}")
    if args.top_n * 2 > args.length:
        raise ValueError(f"--top-n {args.top_n} must be at most half of --length {args.length}")
    if args.budget <= 0 or (args.budget >= 1 and args.budget != int(args.budget)):
        raise ValueError(f"--budget must be a whole number of tokens >= 1 or a fraction in (0, 1), got {args.budget}")
    source = load_calibration_text(args)
    model, sites, texts, device = source.model, source.sites, source.windows, source.device
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

    with attention_implementation(model, "sparse_compile_fasa_calibration", capture_attention(stats, set(layers))):
        for i, (_, window) in enumerate(tqdm(texts, desc="calibrate fasa (windows)", disable=args.no_progress)):
            stats.final = i == len(texts) - 1  # the last window also measures the chosen sets' recall
            with torch.no_grad():
                model.model(window[None].to(device))
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
    text = policy_text(args.model, out_chunks, args, summary, keep)
    sparse_compile.load_policy(text_policy(text))  # validates what is written
    write_policy(text, args.out)
    if args.report is not None:
        detail: dict[str, Any] = {"summary": summary, "recall": stats.recalls, "layout": layout, "keep": keep,
                                  "top_n": args.top_n,
                                  "overlap": {f"{lay}:{layer}": (stats.sums[(lay, layer)] / stats.steps[layer]).tolist()
                                              for lay in layouts for layer in layers},
                                  "chunks": chunks}
        args.report.write_text(json.dumps(detail))
    return 0


def text_policy(text: str) -> Any:
    """The policy TOML text as a loaded Policy (validation of the written file)."""
    from sparse_compile.policy import parse_toml

    return parse_toml(text, "calibrate fasa output")
