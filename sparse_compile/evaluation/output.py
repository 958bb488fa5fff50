"""Render evaluation results: a markdown report, the JSON file and the plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sparse_compile.evaluation.budget import SUMMARY, budget_table


def fmt(value: Any, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def environment_lines(meta: dict[str, Any]) -> list[str]:
    env, model, corpus = meta["env"], meta["model"], meta["corpus"]
    return [
        f"- Command: `{env['command']}`",
        f"- Machine: {env['machine']}, {env['cpus']} CPUs ({env['torch_threads']} torch threads); "
        f"Python {env['python']}, torch {env['torch']}, transformers {env['transformers']}; "
        f"sparse_compile {env['sparse_compile_revision']}; {env['date']}",
        device_line(env),
        f"- Model: {model['name']} ({model['class']}, {model['layers']} layers, {model['heads']}/{model['kv_heads']} "
        f"heads, {model['parameters'] / 1e6:.1f}M parameters, {model['dtype']}, fingerprint {model['fingerprint']})",
        f"- Corpus: {corpus['name']}: {corpus['source']} ({corpus['tokens']} tokens, sha256 {corpus['sha256']})",
    ]


def device_line(env: dict[str, Any]) -> str:
    """`- Device: cuda (NVIDIA H100 ..., sm 9.0, CUDA 12.8, triton 3.6); dtype fp32` (cpu for older results)."""
    device = env.get("device", "cpu")
    extra = [env[k] if k != "capability" else f"sm {env[k]}" for k in ("gpu", "capability") if env.get(k)]
    extra += [f"{k.upper() if k == 'cuda' else k} {env[k]}" for k in ("cuda", "triton") if env.get(k)]
    return f"- Device: {device}" + (f" ({', '.join(extra)})" if extra else "") + f"; dtype {env.get('dtype', 'fp32')}"


def ppl_table(results: dict[str, Any]) -> list[str]:
    """One row per (policy, length); `first s` is the first window (it includes dynamo's compile for a
    compiled policy), `steady s` the mean of the later windows."""
    base = results["baseline"]
    lines = ["| policy | L | windows | PPL | dPPL | dPPL % | mean prefill density | first s | steady s | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for length, row in base["ppl"].items():
        lines.append(f"| {base['label']} | {length} | {len(row['windows'])} | {row['ppl']:.4f} | – | – | 1.000 | "
                     f"{fmt(row.get('first_s'), '.2f')} | {fmt(row.get('steady_s'), '.2f')} | "
                     f"{sum(w['seconds'] for w in row['windows']):.1f} |")
    for run in results["runs"]:
        for length, row in run.get("ppl", {}).items():
            lines.append(f"| {run['label']} | {length} | {len(row['windows'])} | {row['ppl']:.4f} | "
                         f"{row['dppl']:+.4f} | {row['dppl_pct']:+.2f} | {fmt(row['mean_density'])} | "
                         f"{fmt(row.get('first_s'), '.2f')} | {fmt(row.get('steady_s'), '.2f')} | "
                         f"{row['wall_s']:.1f} |")
    return lines


def continuation_table(results: dict[str, Any]) -> list[str]:
    """One row per (policy, length): PPL of the last predictions of each window and their top-1 agreement
    with the eager model (the whole-window PPL above counts the predictions a dropped token spoils)."""
    base = results["baseline"]
    last = results["meta"]["config"]["last"]
    lines = [f"| policy | L | PPL of the last {last} | dPPL % | top-1 agreement with eager | mean prefill density |",
             "|---|---|---|---|---|---|"]
    for length, row in base["ppl"].items():
        lines.append(f"| {base['label']} | {length} | {row['last_ppl']:.4f} | – | 1.000 | 1.000 |")
    for run in results["runs"]:
        for length, row in run.get("ppl", {}).items():
            lines.append(f"| {run['label']} | {length} | {row['last_ppl']:.4f} | {row['last_dppl_pct']:+.2f} | "
                         f"{row['agree_last']:.3f} | {fmt(row['mean_density'])} |")
    return lines


def cache_label(entry: dict[str, Any]) -> str:
    """The KV cache a run's decode and niah tasks used, for a table cell: "DynamicCache", "StaticCache",
    "SparseCache P=32", "SparseCache P=16 pages only" (results from before `eval --cache`: "DynamicCache")."""
    cache = entry.get("cache", {"class": "DynamicCache"})
    if cache["class"] != "SparseCache":
        return cache["class"]
    return f"SparseCache P={cache['page_size']}" + ("" if cache["dims_copy"] else " pages only")


def decode_table(results: dict[str, Any]) -> list[str]:
    """One row per (policy, prompt length): teacher-forced decode steps against the eager model, with the cache
    they ran on."""
    base = results["baseline"]
    lines = ["| policy | cache | prompt | windows | PPL of the steps | dPPL % | top-1 agreement with eager | "
             "mean decode density | wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for length, row in base["decode"].items():
        lines.append(f"| {base['label']} | {cache_label(base)} | {length} | {len(row['windows'])} | {row['ppl']:.4f} | "
                     f"– | 1.000 | 1.000 | {sum(w['seconds'] for w in row['windows']):.1f} |")
    for run in results["runs"]:
        for length, row in run.get("decode", {}).items():
            lines.append(f"| {run['label']} | {cache_label(run)} | {length} | {len(row['windows'])} | "
                         f"{row['ppl']:.4f} | {row['dppl_pct']:+.2f} | {row['agreement']:.3f} | "
                         f"{fmt(row['mean_density'])} | {row['wall_s']:.1f} |")
    return lines


def found(samples: list[dict[str, Any]], length: str | None = None) -> str:
    """"k/n": needles found among the samples (of one length)."""
    rows = [s for s in samples if length is None or str(s["length"]) == length]
    return f"{sum(1 for s in rows if s['score'] >= 1.0)}/{len(rows)}"


def niah_entries(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    base = results["baseline"]["niah"]
    return [(results["baseline"]["label"], base)] + [(r["label"], r["niah"]) for r in results["runs"] if "niah" in r]


def niah_caches(results: dict[str, Any]) -> list[str]:
    """The cache label of each `niah_entries` entry, in the same order."""
    return [cache_label(results["baseline"])] + [cache_label(r) for r in results["runs"] if "niah" in r]


def lost_cell(niah: dict[str, Any], length: str | None = None) -> str:
    vs = niah.get("vs_eager")
    if vs is None:
        return "–"
    lost = [x for x in vs["lost"] if length is None or str(x["length"]) == length]
    gained = [x for x in vs["gained"] if length is None or str(x["length"]) == length]
    return f"{len(lost)}" + (f" (+{len(gained)} gained)" if gained else "")


def niah_table(results: dict[str, Any]) -> list[str]:
    """Needles found per length and overall, needles lost against eager, densities, wall time; the cache the
    answers were decoded on."""
    base = results["baseline"]["niah"]
    lengths = list(base["by_length"])
    lines = ["| policy | cache | " + " | ".join(f"L={L}" for L in lengths)
             + " | all | lost vs eager | mean prefill density | mean decode density | wall s |",
             "|---|---|" + "---|" * (len(lengths) + 5)]
    for (label, niah), cache in zip(niah_entries(results), niah_caches(results), strict=True):
        cells = " | ".join(found(niah["samples"], L) for L in lengths)
        wall = niah.get("wall_s", sum(s["seconds"] for s in niah["samples"]))
        lines.append(f"| {label} | {cache} | {cells} | {found(niah['samples'])} | {lost_cell(niah)} | "
                     f"{fmt(niah.get('mean_density', 1.0))} | {fmt(niah.get('decode_mean_density', 1.0))} | "
                     f"{wall:.1f} |")
    return lines


def niah_depth_table(results: dict[str, Any]) -> list[str]:
    """Hits per (policy, length, depth), needles lost against eager, first-sample and steady seconds."""
    base = results["baseline"]["niah"]
    lengths = list(base["grid"])
    depths = sorted({d for L in lengths for d in base["grid"][L]}, key=float)
    lines = ["| policy | L | " + " | ".join(f"depth {d}" for d in depths) + " | lost vs eager | first s | steady s |",
             "|---|---|" + "---|" * (len(depths) + 3)]
    for label, niah in niah_entries(results):
        for L in lengths:
            counts = niah.get("hits", {}).get(L, {})
            cells = " | ".join(f"{counts[d][0]}/{counts[d][1]}" if d in counts else "–" for d in depths)
            timing = niah.get("timing", {}).get(L, {})
            lines.append(f"| {label} | {L} | {cells} | {lost_cell(niah, L)} | {fmt(timing.get('first_s'), '.2f')} | "
                         f"{fmt(timing.get('steady_s'), '.2f')} |")
    return lines


def lost_lines(results: dict[str, Any]) -> list[str]:
    """Each needle a policy lost that the eager model found: where, the value, both answers."""
    lines = []
    for run in results["runs"]:
        for x in run.get("niah", {}).get("vs_eager", {}).get("lost", []):
            lines.append(f"- {run['label']} lost L={x['length']} depth {x['depth']:g} sample {x['index']}: "
                         f"needle {x['value']}, answered {x['answer'].strip()!r} (eager {x['eager_answer'].strip()!r})")
    return ["Needles lost against eager:", "", *lines, ""] if lines else []


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
            staged = info.get("two_stage_sites", 0)
            staged = f", {staged} select in two stages over the {cache_label(run)}'s buffers" if staged else ""
            lines.append(f"- {run['label']} ({task}): {info['sites']} attention sites rewritten, "
                         f"{info['rejected']} left alone{staged}{note}")
        skipped = sum(not w["ran_sites"] for row in run.get("ppl", {}).values() for w in row["windows"])
        if skipped and any(info["sites"] for info in run["compile"].values()):
            lines.append(f"- {run['label']}: **{skipped} PPL window(s) ran without a rewritten graph** "
                         "(dynamo fell back to eager code)")
    return lines


def markdown(results: dict[str, Any]) -> str:
    """The report: environment, PPL table, NIAH table, the budget check, per-layer densities, site counts."""
    meta = results["meta"]
    out = [f"### {meta['model']['name']} on {meta['corpus']['name']}", "", *environment_lines(meta), ""]
    out += [f"- Not measured: {line}" for line in meta.get("notes", [])] + ([""] if meta.get("notes") else [])
    tasks = meta["config"]["tasks"]
    if "ppl" in tasks:
        out += ["Perplexity (dPPL against the eager model):", "", *ppl_table(results), ""]
    if "continuation" in tasks:
        out += ["Continuation (the last predictions of the same windows):", "", *continuation_table(results), ""]
    if "decode" in tasks:
        out += [f"Decode ({meta['config']['decode_steps']} real tokens fed as decode steps after each prompt):", "",
                *decode_table(results), ""]
    if "niah" in results["baseline"]:
        cfg = meta["config"]
        out += [f"Needle in a haystack (exact match; depths {', '.join(f'{d:g}' for d in cfg['niah_depths'])}; "
                f"{cfg['niah_samples']} sample(s) per cell; found/samples):", "", *niah_table(results), "",
                "Per depth (first s: the first sample of a length, which compiles; steady s: mean of the rest):",
                "", *niah_depth_table(results), "", *lost_lines(results)]
    if results["runs"]:
        out += [f"Budget of a shipped default ({SUMMARY}):", "", *budget_table(results), ""]
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
