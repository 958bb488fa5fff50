"""Render evaluation results: a markdown report, the JSON file and the plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def fmt(value: Any, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def environment_lines(meta: dict[str, Any]) -> list[str]:
    env, model, corpus = meta["env"], meta["model"], meta["corpus"]
    return [
        f"- Command: `{env['command']}`",
        f"- Machine: {env['machine']}, {env['cpus']} CPUs ({env['torch_threads']} torch threads); "
        f"Python {env['python']}, torch {env['torch']}, transformers {env['transformers']}; "
        f"sparse_compile {env['sparse_compile_revision']}; {env['date']}",
        f"- Model: {model['name']} ({model['class']}, {model['layers']} layers, {model['heads']}/{model['kv_heads']} "
        f"heads, {model['parameters'] / 1e6:.1f}M parameters, {model['dtype']}, fingerprint {model['fingerprint']})",
        f"- Corpus: {corpus['name']}: {corpus['source']} ({corpus['tokens']} tokens, sha256 {corpus['sha256']})",
    ]


def ppl_table(results: dict[str, Any]) -> list[str]:
    base = results["baseline"]
    lines = ["| policy | L | windows | PPL | dPPL | dPPL % | mean prefill density | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for length, row in base["ppl"].items():
        lines.append(f"| {base['label']} | {length} | {len(row['windows'])} | {row['ppl']:.4f} | – | – | 1.000 | "
                     f"{sum(w['seconds'] for w in row['windows']):.1f} |")
    for run in results["runs"]:
        for length, row in run.get("ppl", {}).items():
            lines.append(f"| {run['label']} | {length} | {len(row['windows'])} | {row['ppl']:.4f} | "
                         f"{row['dppl']:+.4f} | {row['dppl_pct']:+.2f} | {fmt(row['mean_density'])} | "
                         f"{row['wall_s']:.1f} |")
    return lines


def niah_table(results: dict[str, Any]) -> list[str]:
    base = results["baseline"]["niah"]
    lengths = list(base["by_length"])
    lines = ["| policy | " + " | ".join(f"L={L}" for L in lengths)
             + " | all | mean prefill density | mean decode density | wall s |",
             "|---|" + "---|" * (len(lengths) + 4)]
    entries = [(results["baseline"]["label"], base)] + [(r["label"], r["niah"]) for r in results["runs"] if "niah" in r]
    for label, niah in entries:
        cells = " | ".join(f"{niah['by_length'][L]:.2f}" for L in lengths)
        wall = niah.get("wall_s", sum(s["seconds"] for s in niah["samples"]))
        lines.append(f"| {label} | {cells} | {niah['score']:.2f} | {fmt(niah.get('mean_density', 1.0))} | "
                     f"{fmt(niah.get('decode_mean_density', 1.0))} | {wall:.1f} |")
    return lines


def layer_density_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    for run in results["runs"]:
        for length, row in run.get("ppl", {}).items():
            per_layer = row["layer_density"]
            if per_layer and any(v < 1.0 for v in per_layer.values()):
                values = " ".join(f"{v:.2f}" for v in per_layer.values())
                lines.append(f"- {run['label']} L={length}: {values}")
    if not lines:
        return []
    return ["Per-layer mean prefill block density (layer 0 first; PPL windows):", "", *lines, ""]


def site_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    for run in results["runs"]:
        for task, info in run["compile"].items():
            note = "" if info["sites"] else "  **no site rewritten: the policy did not apply**"
            lines.append(f"- {run['label']} ({task}): {info['sites']} attention sites rewritten, "
                         f"{info['rejected']} left alone{note}")
        skipped = sum(not w["ran_sites"] for row in run.get("ppl", {}).values() for w in row["windows"])
        if skipped and any(info["sites"] for info in run["compile"].values()):
            lines.append(f"- {run['label']}: **{skipped} PPL window(s) ran without a rewritten graph** "
                         "(dynamo fell back to eager code)")
    return lines


def markdown(results: dict[str, Any]) -> str:
    """The report: environment, PPL table, NIAH table, per-layer densities, site counts."""
    meta = results["meta"]
    out = [f"### {meta['model']['name']} on {meta['corpus']['name']}", "", *environment_lines(meta), ""]
    if "ppl" in results["baseline"]:
        out += ["Perplexity (dPPL against the eager model):", "", *ppl_table(results), ""]
    if "niah" in results["baseline"]:
        cfg = meta["config"]
        out += [f"Needle in a haystack (exact match; depths {', '.join(f'{d:g}' for d in cfg['niah_depths'])}; "
                f"{cfg['niah_samples']} sample(s) per cell):", "", *niah_table(results), ""]
    out += layer_density_lines(results)
    out += site_lines(results)
    return "\n".join(out).rstrip() + "\n"


def write_outputs(results: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """results.json, results.md, ppl_vs_density.png, niah.png under `out_dir`; returns what was written."""
    from sparse_compile.evaluation.plots import plot_niah, plot_ppl_vs_density  # matplotlib: the eval extra

    out_dir.mkdir(parents=True, exist_ok=True)
    written = {"json": out_dir / "results.json", "markdown": out_dir / "results.md"}
    written["json"].write_text(json.dumps(results, indent=1, sort_keys=False) + "\n")
    written["markdown"].write_text(markdown(results))
    for name, plot in (("ppl_plot", plot_ppl_vs_density), ("niah_plot", plot_niah)):
        path = plot(results, out_dir / ("ppl_vs_density.png" if name == "ppl_plot" else "niah.png"))
        if path is not None:
            written[name] = path
    return written


def update_markdown_section(path: Path, section: str, body: str) -> None:
    """Replace the text between `<!-- BEGIN section -->` and `<!-- END section -->` in `path` with
    `body`, or append a new marked section (creating the file) when there is none."""
    begin, end = f"<!-- BEGIN {section} -->", f"<!-- END {section} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}\n"
    text = path.read_text() if path.exists() else ""
    start = text.find(begin)
    stop = text.find(end, start)
    if start >= 0 and stop >= 0:
        rest = text[stop + len(end):].lstrip("\n")
        text = text[:start] + block + ("\n" + rest if rest else "")
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + block
    path.write_text(text)
