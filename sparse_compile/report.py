"""What the backend did: the sites it rewrote, the candidates it left alone and why, and the
density each site achieved at run time.

A `Report` is filled by the backend (pass one in `options={"report": report}`, or read
`sparse_compile.explain(...)`'s return value). Run-time densities are kept as the device
tensors of the latest call and only turned into numbers when read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Site:
    """One rewritten attention site.

    graph: index of the captured graph (prefill, first decode, ...) in compile order.
    layer: index of the attention call in graph order (== the model's layer index).
    rope: "rotate_half" | "interleaved"; rotary_dim: dims RoPE rotates (< head_dim: partial).
    window: sliding window size or None. mask: the recognised mask structure.
    cache: "none" | "dynamic" (torch.cat) | "static" (index_copy_) | "static_sliding" (rolling buffer).
    gqa: "none" | "repeat_kv" | "enable_gqa".
    """

    graph: int
    layer: int
    phase: str
    rope: str
    rotary_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    causal: bool
    window: int | None
    method: str
    params: dict[str, Any]
    mask: str
    cache: str
    gqa: str
    q_len: str
    kv_len: str


@dataclass(frozen=True)
class Rejection:
    """An attention call that was left as it was, and why."""

    graph: int
    layer: int | None
    node: str
    reason: str


@dataclass
class GraphRecord:
    index: int
    phase: str
    num_attention_calls: int
    num_rewritten: int
    nodes_before: int
    nodes_after: int
    policy: str


@dataclass(eq=False)
class Report:
    """Sites rewritten, candidates rejected, per-graph summaries and run-time densities.

    Compared by identity: torch.compile compares backend options to decide whether a cached compile
    can be reused, and two distinct (even empty) reports must not count as the same option."""

    policy: str = ""
    sites: list[Site] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    graphs: list[GraphRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    densities: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict, repr=False)
    calls: dict[int, int] = field(default_factory=dict)

    def record_densities(self, graph: int, layers: list[int], values: list[torch.Tensor] | tuple) -> None:
        """Keep the latest call's (B, H) density tensors of graph `graph` (no device sync)."""
        self.calls[graph] = self.calls.get(graph, 0) + 1
        for layer, value in zip(layers, values, strict=True):
            self.densities[(graph, layer)] = value.detach()

    def layer_density(self, phase: str = "prefill") -> dict[int, float]:
        """Mean achieved block density per layer (over batch and heads) in the latest call of the
        latest graph of `phase` that has run; {} if none has run."""
        ran = [g.index for g in self.graphs if g.phase == phase and g.index in self.calls]
        if not ran:
            return {}
        graph = ran[-1]
        return {
            layer: float(value.float().mean())
            for (g, layer), value in sorted(self.densities.items())
            if g == graph
        }

    def mean_density(self, phase: str = "prefill") -> float | None:
        """Mean of `layer_density(phase)` over the layers, or None if nothing ran."""
        per_layer = self.layer_density(phase)
        return sum(per_layer.values()) / len(per_layer) if per_layer else None

    def site_table(self, per_layer: bool = True) -> list[str]:
        """The sites as aligned text rows; per_layer=False merges runs of layers that agree."""
        header = ("graph", "layers", "phase", "method", "rope", "rot", "H", "Hkv", "D", "mask", "cache", "gqa",
                  "density")
        groups: list[list] = []
        for s in self.sites:
            d = self.densities.get((s.graph, s.layer))
            dens = "-" if d is None else f"{float(d.float().mean()):.3f}"
            key = (str(s.graph), s.phase, s.method, s.rope, str(s.rotary_dim), str(s.num_heads),
                   str(s.num_kv_heads), str(s.head_dim), s.mask, s.cache, s.gqa)
            last = groups[-1] if groups else None
            if not per_layer and last and last[0] == key and last[2] == s.layer - 1 and (dens == "-") == (
                    last[3] == "-"):
                last[2] = s.layer
                last[4].append(d)
            else:
                groups.append([key, s.layer, s.layer, dens, [d]])
        rows = []
        for key, first, last, dens, values in groups:
            if first != last and values[0] is not None:
                dens = f"{sum(float(v.float().mean()) for v in values) / len(values):.3f}"
            layers = str(first) if first == last else f"{first}-{last}"
            rows.append((key[0], layers) + key[1:] + (dens,))
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
        out.extend("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)
        return out

    def __str__(self) -> str:
        lines = [f"sparse_compile report — policy {self.policy or '?'}"]
        for g in self.graphs:
            lines.append(
                f"graph {g.index} ({g.phase}): {g.num_rewritten}/{g.num_attention_calls} attention calls rewritten, "
                f"{g.nodes_before} -> {g.nodes_after} FX nodes"
            )
        if self.sites:
            lines.extend(self.site_table(per_layer=False))
            methods = {(s.method, tuple(sorted(s.params.items()))) for s in self.sites if s.params}
            for method, params in sorted(methods, key=str):
                lines.append(f"{method} params: " + ", ".join(f"{k}={v}" for k, v in params))
        if self.rejected:
            lines.append("not rewritten:")
            lines.extend(
                f"  graph {r.graph} layer {'?' if r.layer is None else r.layer} ({r.node}): {r.reason}"
                for r in self.rejected
            )
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)
