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

from sparse_compile.methods import METHODS
from sparse_compile.ops import BELOW_MIN_SEQ_LEN, FALLBACKS


@dataclass(frozen=True)
class Site:
    """One rewritten attention site.

    graph: index of the captured graph (prefill, first decode, ...) in compile order.
    layer: index of the attention call in graph order (== the model's layer index).
    rope: "rotate_half" | "interleaved"; rotary_dim: dims RoPE rotates (< head_dim: partial).
    window: sliding window size or None. mask: the recognised mask structure.
    cache: "none" | "dynamic" (torch.cat) | "static" (index_copy_) | "static_sliding" (rolling buffer).
    gqa: "none" | "repeat_kv" | "enable_gqa".
    fallback: why the node runs exact attention instead of `method` on every call of this graph, when
      the traced shapes decide it (e.g. "key length 2048 < min_seq_len 4096"); "" otherwise. Calls
      decided at run time are in `Report.fallbacks()`.
    cuda_graphs: False when the node carries the cudagraph_unsafe tag (its method cannot be captured in
      this phase): under mode="reduce-overhead" it runs between captured partitions.
    role: for methods whose layers share one selection: "select" (makes it), "reuse" (takes the latest
      selection made before it in this graph) or "exact"; "" for other methods.
    cache_buffers: the SparseCache buffers the node takes, e.g. "key_dims, dims, member, page_min, page_max
      (P=16)": the method runs its two-stage selection over them; "" (any other cache): the single-stage one.
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
    min_seq_len: int = 0
    fallback: str = ""
    cuda_graphs: bool = True
    role: str = ""
    note: str = ""
    cache_buffers: str = ""


@dataclass(frozen=True)
class Rejection:
    """An attention call that was left as it was, and why."""

    graph: int
    layer: int | None
    node: str
    reason: str
    site_rewritten: bool = False  # True: the call became a fused node anyway (e.g. keeping an unproven mask)


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

    cuda_graphs: the backend compiles with CUDA graphs (mode="reduce-overhead" or "max-autotune").
    Compared by identity: torch.compile compares backend options to decide whether a cached compile
    can be reused, and two distinct (even empty) reports must not count as the same option."""

    policy: str = ""
    warning: str = ""  # the policy's measured warning (Policy.warning), printed first
    cuda_graphs: bool = False
    sites: list[Site] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    graphs: list[GraphRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    densities: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict, repr=False)
    fallback_codes: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict, repr=False)
    calls: dict[int, int] = field(default_factory=dict)

    def record_call(self, graph: int, layers: list[int], values: list[torch.Tensor] | tuple) -> None:
        """Keep the latest call's outputs of graph `graph`: per layer, in order, the node's (B, H) density
        and its () int32 fallback code (sparse_compile.ops.FALLBACKS), either as 2 * len(layers) tensors or, for
        two layers or more, stacked as two (passes/rewrite.py): densities (len(layers), B, H[, 1 + F]) and codes
        (len(layers),). No device sync."""
        stacked = len(layers) > 1 and len(values) == 2
        if not stacked and len(values) != 2 * len(layers):
            raise ValueError(f"expected a density and a fallback code per layer ({2 * len(layers)} values) or the "
                             f"two stacked, got {len(values)}")
        if stacked and (values[0].shape[:1] != (len(layers),) or tuple(values[1].shape) != (len(layers),)):
            raise ValueError(f"stacked records must hold {len(layers)} layers, got {tuple(values[0].shape)} and "
                             f"{tuple(values[1].shape)}")
        self.calls[graph] = self.calls.get(graph, 0) + 1
        for i, layer in enumerate(layers):
            density, code = (values[0][i], values[1][i]) if stacked else (values[2 * i], values[2 * i + 1])
            self.densities[(graph, layer)] = density.detach()
            self.fallback_codes[(graph, layer)] = code.detach()

    def latest_graph(self, phase: str) -> int | None:
        """Index of the latest graph of `phase` that has run, or None."""
        ran = [g.index for g in self.graphs if g.phase == phase and g.index in self.calls]
        return ran[-1] if ran else None

    def fallbacks(self, phase: str = "prefill") -> dict[int, str]:
        """{layer: why it ran exact attention instead of its method} in the latest call of the latest
        graph of `phase` (layers whose method ran are absent). Reads the codes (one device sync)."""
        graph = self.latest_graph(phase)
        if graph is None:
            return {}
        sites = {s.layer: s for s in self.sites if s.graph == graph}
        out = {}
        for (g, layer), code in sorted(self.fallback_codes.items()):
            value = int(code)
            if g != graph or value == 0:
                continue
            site = sites.get(layer)
            if site is not None and site.fallback:
                out[layer] = site.fallback
            elif value == BELOW_MIN_SEQ_LEN and site is not None:
                length = f" {site.kv_len}" if site.kv_len.isdigit() else ""
                out[layer] = f"key length{length} < min_seq_len {site.min_seq_len}"
            else:
                out[layer] = FALLBACKS[value]
        return out

    def layer_density(self, phase: str = "prefill") -> dict[int, float]:
        """Mean achieved block density per layer (over batch and heads) in the latest call of the
        latest graph of `phase` that has run; {} if none has run. Sites of the dense method are 1.0."""
        graph = self.latest_graph(phase)
        if graph is None:
            return {}
        out = {s.layer: 1.0 for s in self.sites if s.graph == graph and s.method == "dense"}
        out.update({layer: float(total(value).float().mean()) for (g, layer), value in self.densities.items()
                    if g == graph})
        return dict(sorted(out.items()))

    def layer_density_parts(self, phase: str = "prefill") -> dict[int, dict[str, float]]:
        """{layer: {factor: mean}} for the layers whose method reports its density as named factors
        (`Method.density_parts`, e.g. token_sparse's kept fraction and inner block density), in the latest
        call of the latest graph of `phase`; {} if none."""
        graph = self.latest_graph(phase)
        names = {s.layer: METHODS[s.method].density_parts for s in self.sites
                 if s.graph == graph and s.method in METHODS}
        out = {}
        for (g, layer), value in sorted(self.densities.items()):
            parts = names.get(layer, ())
            if g == graph and parts and value.dim() == 3 and value.shape[-1] == 1 + len(parts):
                means = value.float().mean(dim=(0, 1))
                out[layer] = {name: float(means[1 + i]) for i, name in enumerate(parts)}
        return out

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
            if d is None and s.method == "dense" and s.graph in self.calls:
                d = torch.ones(())
            d = None if d is None else total(d)
            dens = "-" if d is None else f"{float(d.float().mean()):.3f}"
            method = f"{s.method} ({s.role})" if s.role else s.method
            key = (str(s.graph), s.phase, method, s.rope, str(s.rotary_dim), str(s.num_heads),
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
        if self.warning:
            lines.append(f"WARNING: {self.warning}")
        for g in self.graphs:
            lines.append(
                f"graph {g.index} ({g.phase}): {g.num_rewritten}/{g.num_attention_calls} attention calls rewritten, "
                f"{g.nodes_before} -> {g.nodes_after} FX nodes"
            )
        if self.sites:
            lines.extend(self.site_table(per_layer=False))
            # repr keys: a value may be a list or a table (token_sparse's layers and inner_params)
            methods = {(s.method, repr(sorted(s.params.items()))): s.params for s in self.sites if s.params}
            for (method, _), params in sorted(methods.items(), key=lambda item: item[0]):
                params = sorted(params.items())
                lines.append(f"{method} params: " + ", ".join(f"{k}={short_value(v)}" for k, v in params))
        for phase in ("prefill", "decode"):
            parts = self.layer_density_parts(phase)
            if parts:
                lines.append(f"density factors in the latest {phase} call (density = their product):")
                lines.extend(merge_layers([(self.latest_graph(phase), layer, ", ".join(
                    f"{name} {value:.3f}" for name, value in factors.items())) for layer, factors in parts.items()]))
        cached = [s for s in self.sites if s.cache_buffers]
        if cached:
            lines.append("selects in two stages over the SparseCache's buffers (pages, then their keys):")
            lines.extend(merge_layers([(s.graph, s.layer, s.cache_buffers) for s in cached]))
        noted = [s for s in self.sites if s.note and not s.fallback]
        if noted:
            lines.append("runs its method, with a note:")
            lines.extend(merge_layers([(s.graph, s.layer, s.note) for s in noted]))
        static = [s for s in self.sites if s.fallback]
        if static:
            lines.append("runs exact attention instead of its method (decided at compile time):")
            lines.extend(merge_layers([(s.graph, s.layer, s.fallback) for s in static]))
        for phase in ("prefill", "decode"):
            latest = self.fallbacks(phase)
            graph = self.latest_graph(phase)
            dynamic = {layer: why for layer, why in latest.items()
                       if not any(s.graph == graph and s.layer == layer and s.fallback for s in self.sites)}
            if dynamic:
                lines.append(f"ran exact attention instead of its method in the latest {phase} call:")
                lines.extend(merge_layers([(graph, layer, why) for layer, why in dynamic.items()]))
        outside = [s for s in self.sites if not s.cuda_graphs and s.method != "dense"]
        if outside and self.cuda_graphs:
            lines.append("outside CUDA graphs under mode='reduce-overhead' (method not capturable in this phase): "
                         + ", ".join(sorted({f"{s.method} ({s.phase})" for s in outside})))
        if self.rejected:
            lines.append("not rewritten or kept as a tensor mask:")
            lines.extend(
                f"  graph {r.graph} layer {'?' if r.layer is None else r.layer} ({r.node}): {r.reason}"
                for r in self.rejected
            )
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def total(density: torch.Tensor) -> torch.Tensor:
    """The node's total density: (B, H) as is, or the first entry of a (B, H, 1 + factors) density."""
    return density[..., 0] if density.dim() == 3 else density


def merge_layers(items: list[tuple[int, int, str]]) -> list[str]:
    """'  graph g layers a-b: reason' lines, merging consecutive layers with the same reason."""
    rows: list[list] = []
    for graph, layer, why in sorted(items):
        if rows and rows[-1][0] == graph and rows[-1][2] == layer - 1 and rows[-1][3] == why:
            rows[-1][2] = layer
        else:
            rows.append([graph, layer, layer, why])
    return [f"  graph {g} layer{'s' if a != b else ''} {a if a == b else f'{a}-{b}'}: {why}" for g, a, b, why in rows]


def short_value(value: Any, limit: int = 80) -> str:
    """A parameter as the report prints it: long values (FASA's per-layer chunk tables) are cut, with their
    size, so the table stays readable; the whole value is in the policy and in `Site.params`."""
    text = str(value)
    if len(text) <= limit:
        return text
    size = f"{len(value)} entries, " if isinstance(value, (list, tuple, dict)) else ""
    return f"{text[:limit - 20]}... ({size}{len(text)} characters)"
