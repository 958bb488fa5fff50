"""PNG plots of evaluation and benchmark results (matplotlib's object API: no pyplot state).

    plot_ppl_vs_density(results, path)   one panel per length: dPPL % vs mean prefill density,
                                         one line per policy base (its sweep points joined)
    plot_niah(results, path)             one heat map per run: context length x needle depth
    plot_bench(bench, path)              time vs length per method, one panel per phase
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def plot_ppl_vs_density(results: dict[str, Any], path: Path) -> Path | None:
    """dPPL (%) against achieved mean prefill block density; None when no run has perplexity."""
    runs = [r for r in results["runs"] if "ppl" in r]
    if not runs:
        return None
    lengths = list(runs[0]["ppl"])
    fig = Figure(figsize=(4.2 * len(lengths), 3.6))
    axes = fig.subplots(1, len(lengths), squeeze=False)[0]
    bases = sorted({r["base"] for r in runs})
    for ax, length in zip(axes, lengths, strict=True):
        for base in bases:
            points = sorted(
                (r["ppl"][length]["mean_density"], r["ppl"][length]["dppl_pct"], r["label"])
                for r in runs if r["base"] == base and r["ppl"][length]["mean_density"] is not None
            )
            if not points:
                continue
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            ax.plot(xs, ys, marker="o", label=base)
            if len(points) > 1:
                for x, y, label in points:
                    ax.annotate(label.removeprefix(base), (x, y), fontsize=6, xytext=(3, 3),
                                textcoords="offset points")
        ax.axhline(0.0, color="grey", lw=0.8, ls="--")
        ax.set_title(f"L = {int(length) // 1024}K" if int(length) >= 1024 else f"L = {length}")
        ax.set_xlabel("mean prefill block density")
        ax.set_ylabel("dPPL vs eager (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{results['meta']['model']['name']} on {results['meta']['corpus']['name']}")
    return save(fig, path)


def plot_niah(results: dict[str, Any], path: Path) -> Path | None:
    """Exact-match heat maps (rows: context length, columns: needle depth), baseline first."""
    panels = [(results["baseline"]["label"], results["baseline"]["niah"])] if "niah" in results["baseline"] else []
    panels += [(r["label"], r["niah"]) for r in results["runs"] if "niah" in r]
    if not panels:
        return None
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(3.4 * cols, 2.8 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    image = None
    for ax, (label, niah) in zip(axes, panels, strict=False):
        lengths = list(niah["grid"])
        depths = list(niah["grid"][lengths[0]])
        values = [[niah["grid"][L].get(d, float("nan")) for d in depths] for L in lengths]
        image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(depths)), depths, fontsize=7)
        ax.set_yticks(range(len(lengths)), lengths, fontsize=7)
        ax.set_xlabel("needle depth")
        ax.set_ylabel("context length")
        ax.set_title(f"{label}: {niah['score']:.2f}", fontsize=8)
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6)
    for ax in axes[len(panels):]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=list(axes), shrink=0.8, label="exact match")
    return save(fig, path)


def plot_bench(bench: dict[str, Any], path: Path) -> Path | None:
    """Milliseconds against context length (log-log), one line per implementation, per phase."""
    rows = bench.get("rows", [])
    phases = [p for p in ("prefill", "decode") if any(r["phase"] == p for r in rows)]
    if not phases:
        return None
    fig = Figure(figsize=(5.0 * len(phases), 3.8))
    axes = fig.subplots(1, len(phases), squeeze=False)[0]
    for ax, phase in zip(axes, phases, strict=True):
        impls = list(dict.fromkeys(r["impl"] for r in rows if r["phase"] == phase))  # first-seen order
        for impl in impls:
            pts = sorted((r["length"], r["ms"]) for r in rows
                         if r["phase"] == phase and r["impl"] == impl and r.get("ms") is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("ms")
        ax.set_title(phase)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    return save(fig, path)
