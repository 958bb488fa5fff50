"""The generic calibration: per-layer values of a method's quality knob under a perplexity budget.

    python -m sparse_compile calibrate prism --max-dppl 0.5 --lengths 8K --out prism-smollm2.toml

A method declares its knob in its Params: `param(..., quality="higher")` (a larger value is closer
to exact attention, and denser) or `quality="lower"`. Every field so marked is set to the same value
per layer (Prism: threshold_high and threshold_low). The search, for any such method:

1. **Sensitivity, one pass per window.** The model runs through the sparse backend with the dense
   policy; at every attention node (a TorchDispatchMode around the compiled graph sees the op's
   q, k, v, mask and site) the method runs once per candidate value of the knob on the layer's exact
   inputs, and records the relative output error e_l(v) = |out_v - out_exact|^2 / |out_exact|^2 and
   the achieved density d_l(v). The forward itself continues with the exact output, so every layer
   is measured on the inputs the exact model gives it. `--error value` (default) divides the squared
   error by the size of the layer's value vectors instead of |out_exact|^2: a layer with diffuse attention
   has a small |out| without its errors costing more perplexity (EVAL.md, proxy check). Candidates:
   `ladder` (for a [0, 1] knob pointing up: 0.998 0.995 0.99 0.98 0.97 0.95 0.9 0.8), plus "dense"
   (e = 0, d = 1).
   The knob's declared direction is checked here: the mean density must fall along the ladder.
2. **Allocation.** For a multiplier lam, each layer picks the option minimising d_l + lam * e_l
   (a Lagrangian relaxation of "minimise mean density subject to sum of errors <= E"); the lam path
   gives a family of per-layer allocations from sparsest to all dense, each with a predicted total
   error E = sum_l e_l.
3. **Fit to the budget on real perplexity.** ΔPPL is measured through the compiled model on the
   calibration windows for a few allocations along the path (secant steps on log ΔPPL vs log E,
   aiming at 85% of the budget, at most --max-probes); the sparsest allocation within the budget
   at every length wins. Then the best *uniform* value (one knob value for every layer, what a global
   setting gives) is probed too (`--uniform-probes`, default 2: the densest uniform value predicted
   sparser than the per-layer winner first, then sparser ones while they stay within the budget), and
   replaces the per-layer winner if it is sparser within the budget: the result is never worse than the
   best global value the probes reach.
4. **Held-out verification.** The winner runs on held-out windows (other positions of the corpus:
   the calibration and held-out windows interleave, evenly spaced); ΔPPL above the budget at any
   length fails loudly: exit status 1, and the policy is written as `<out>.unverified.toml` only.
4b. **Needle check** (unless `--no-niah`): the NIAH grid (eval's, at `--niah-lengths`, default the
   calibration lengths) runs eager and through the winner; a needle eager finds and the winner loses is over
   budget like a ΔPPL: the next denser allocations of the path are tried (`--needle-probes`, default 3, each
   re-verified on the held-out windows), and a policy that still loses one fails loudly (exit 1,
   `<out>.unverified.toml`). `--verify` runs the same check. The flags, the NIAH run and the header line are
   shared with the other procedures' needle check (needles.py).
5. **The policy**: the base policy (the method's shipped name-only policy, `method` or `method-lossy`, or
   `--base`) with one `[[prefill.overrides]]` table per distinct value (compact layer ranges) and a header comment
   saying how it was made: command, model fingerprint, corpus, windows, device, achieved density and
   ΔPPL on calibration and held-out windows, wall time.

`--sensitivity-length N` measures step 1 on windows of N tokens (at the calibration windows' corpus
positions) instead of at every calibration length: the allocation needs each layer's ranking, not its
absolute error, and the one-pass sensitivity is the step that grows fastest with length (on CPU it runs
the method's reference once per layer and candidate). Steps 3-4 still run at the calibration lengths.

Deterministic (fixed windows, no sampling); the eager baseline is cached per window like `eval`'s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from tqdm.auto import tqdm

import sparse_compile
from sparse_compile.argtypes import parse_floats, parse_length, parse_lengths, positive_int
from sparse_compile.calibration.needles import (
    add_needle_arguments,
    cache_dir,
    needle_entry,
    needle_line,
    needle_probes,
    needle_search,
    niah_fields,
    policy_niah,
)
from sparse_compile.calibration.text import policy_toml
from sparse_compile.evaluation.corpus import default_corpus, windows
from sparse_compile.evaluation.perplexity import logits_fn, nll_summary, perplexity, window_nll
from sparse_compile.evaluation.runner import EvalConfig, compile_with_policy, environment, prepare
from sparse_compile.methods import METHODS
from sparse_compile.ops import NodeCall, node_call_of
from sparse_compile.policy import LayerSet, Policy, generic_policy_name, load_policy, parse_toml
from sparse_compile.report import Report, total

DENSE = "dense"
LADDER_STEPS = (0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2)  # distance from the exact end, fraction of range
TARGET_FRACTION = 0.85  # aim the secant steps at this fraction of the budget


@dataclass(frozen=True)
class Knob:
    """A method's quality knob: the Params fields set together, the direction that is denser, the range."""

    method: str
    fields: tuple[str, ...]
    direction: str  # "higher": a larger value is closer to exact; "lower": a smaller one is
    low: float
    high: float

    def exact_end(self) -> float:
        return self.high if self.direction == "higher" else self.low

    def describe(self) -> str:
        return f"{self.method} {'/'.join(self.fields)} ({self.direction} = denser, range [{self.low:g}, {self.high:g}])"


def quality_knobs(params_cls: type) -> list[str]:
    """Names of the fields of a method's Params marked `quality=` (its quality knob), in field order."""
    if not dataclasses.is_dataclass(params_cls):
        return []
    return [f.name for f in dataclasses.fields(params_cls) if f.metadata.get("quality")]


def method_knob(method: str) -> Knob:
    """The quality knob that method `method` declares; ValueError when it declares none or an unusable one."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; registered: {', '.join(METHODS)}")
    if "prefill" not in METHODS[method].phases:
        raise ValueError(f"calibrate --max-dppl tunes prefill methods by perplexity; {method!r} runs in "
                         f"{', '.join(METHODS[method].phases)} only")
    marked = [f for f in dataclasses.fields(METHODS[method].Params) if f.metadata.get("quality")]
    if not marked:
        raise ValueError(f"method {method!r} declares no quality knob (param(..., quality='higher'|'lower') in its "
                         "Params), so the generic --max-dppl search cannot tune it")
    directions = {f.metadata["quality"] for f in marked}
    ranges = {f.metadata.get("range") for f in marked}
    if len(directions) != 1 or len(ranges) != 1:
        raise ValueError(f"method {method!r}: its quality fields {[f.name for f in marked]} must share one direction "
                         "and one range (they are set together)")
    (rng,) = ranges
    if rng is None or rng[0] is None or rng[1] is None or not rng[0] < rng[1]:
        raise ValueError(f"method {method!r}: quality knob {marked[0].name!r} needs a finite range (low, high)")
    return Knob(method, tuple(f.name for f in marked), directions.pop(), float(rng[0]), float(rng[1]))


def ladder(knob: Knob, values: tuple[float, ...] | None = None) -> tuple[float, ...]:
    """Candidate values from densest to sparsest (the exact end itself is the "dense" option)."""
    if values is None:
        span = knob.high - knob.low
        values = tuple(round(knob.exact_end() - s * span if knob.direction == "higher" else knob.exact_end() + s * span,
                             6) for s in LADDER_STEPS)
    bad = [v for v in values if not knob.low <= v <= knob.high]
    if bad:
        raise ValueError(f"--values {bad[0]} is outside the knob's range [{knob.low:g}, {knob.high:g}]")
    ordered = sorted(set(values), reverse=knob.direction == "higher")
    if not ordered:
        raise ValueError("give at least one candidate value")
    return tuple(ordered)


def with_knob(params: Any, knob: Knob, value: float) -> Any:
    """`params` with every knob field set to `value` (re-validated by the Params class)."""
    return dataclasses.replace(params, **{name: value for name in knob.fields})


# -- 1. sensitivity -----------------------------------------------------------------------------

@dataclass
class LayerStats:
    """Per-candidate sums over the prefill calls of one layer (divide by `calls`).

    err: |out_v - out|^2 / |out|^2 (relative to the layer's attention output);
    err_value: |out_v - out|^2 / (rows * mean |v_j|^2) (relative to the size of one value vector: a layer
    whose attention is diffuse has a small |out| without its errors mattering more)."""

    err: list[float]
    density: list[float]
    err_value: list[float] = field(default_factory=list)
    calls: int = 0


class SensitivityProbe(TorchDispatchMode):
    """Around the dense-policy compiled graph: at each prefill attention node, run the method at every
    candidate value on the node's own inputs; record output error and density; return the exact output."""

    def __init__(self, knob: Knob, values: tuple[float, ...], params: Any) -> None:
        super().__init__()
        self.knob, self.values, self.params = knob, values, params
        self.candidates = [with_knob(params, knob, v) for v in values]
        self.stats: dict[int, LayerStats] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        call = node_call_of(func, args, kwargs)
        if call is not None and not call.role:  # a plain attention node (not a selection-sharing one)
            self.measure(call, out[0])
        return out

    def measure(self, call: NodeCall, exact: torch.Tensor) -> None:
        if call.q.shape[2] <= 1:  # decode steps: not what a perplexity budget tunes
            return
        site = call.node.site
        method = METHODS[self.knob.method]
        n = len(self.values)
        stats = self.stats.setdefault(site.layer, LayerStats([0.0] * n, [0.0] * n, [0.0] * n))
        ref = exact.float()
        norm = float(ref.pow(2).sum().clamp_min(1e-30))
        value_norm = float(call.v.float().pow(2).sum(-1).mean()) * ref.shape[0] * ref.shape[1] * ref.shape[2]
        value_norm = max(value_norm, 1e-30)
        for i, params in enumerate(self.candidates):
            if not call.plan(method, params).ran:  # exact attention here: nothing to gain or lose
                stats.density[i] += 1.0
                continue
            out, density = method.attention(call.q, call.k, call.v, call.mask, site, params, call.scale)
            sq = float((out.float() - ref).pow(2).sum())
            stats.err[i] += sq / norm
            stats.err_value[i] += sq / value_norm
            stats.density[i] += float(total(density).float().mean())
        stats.calls += 1


def sensitivity_table(stats: dict[int, LayerStats], error: str = "output"
                      ) -> dict[int, tuple[list[float], list[float]]]:
    """{layer: (mean error per candidate, mean density per candidate)} from summed stats; error "output"
    (relative to |out|) or "value" (relative to the value vectors' size)."""
    pick = (lambda s: s.err) if error == "output" else (lambda s: s.err_value)
    return {layer: ([e / s.calls for e in pick(s)], [d / s.calls for d in s.density])
            for layer, s in sorted(stats.items()) if s.calls}


class SubstituteMode(TorchDispatchMode):
    """Around the dense-policy compiled graph: the prefill attention nodes of the layers in `layers`
    return the method's output with the given params instead of exact attention (the same call the op
    makes, fallback rules included), so any per-layer allocation runs without recompiling."""

    def __init__(self, method: str, layers: dict[int, Any]) -> None:
        super().__init__()
        self.method, self.layers = method, layers

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        call = node_call_of(func, args, kwargs)
        params = None if call is None or call.role else self.layers.get(call.node.site.layer)
        if params is None or call.q.shape[2] <= 1:  # not a plain prefill attention node of a chosen layer
            return func(*args, **(kwargs or {}))
        method = METHODS[self.method]
        if not call.plan(method, params).ran:
            return func(*args, **(kwargs or {}))
        out, density = method.attention(call.q, call.k, call.v, call.mask, call.node.site, params, call.scale)
        # the dense node it stands in for returns a (B, H) density: the total of a factored one
        return out.contiguous(), total(density).float(), torch.zeros((), dtype=torch.int32, device=call.q.device)


def dense_graph_with(model: Any, mode: TorchDispatchMode) -> Any:
    """`torch.compile(model)` through the sparse backend with the dense policy, every graph call run
    inside `mode` (a TorchDispatchMode that sees the attention nodes' inputs)."""

    inner = sparse_compile.backend("dense", inner="eager")

    def capturing(gm: Any, example_inputs: Any, **kwargs: Any) -> Any:
        compiled = inner(gm, example_inputs, **kwargs)

        def run(*args: Any) -> Any:
            with mode:
                return compiled(*args)

        return run

    torch._dynamo.reset()
    return torch.compile(model, backend=capturing)


def check_direction(knob: Knob, values: tuple[float, ...], table: dict[int, tuple[list[float], list[float]]],
                    tolerance: float = 1e-3) -> None:
    """The mean density over layers must not rise along the ladder (densest -> sparsest); else the
    declared direction is wrong (or the knob does not control density). Raises ValueError."""
    if len(values) < 2 or not table:
        return
    mean = [sum(d[i] for _, d in table.values()) / len(table) for i in range(len(values))]
    rises = [(values[i], mean[i], values[i + 1], mean[i + 1]) for i in range(len(values) - 1)
             if mean[i + 1] > mean[i] + tolerance]
    if rises:
        a, da, b, db = rises[0]
        raise ValueError(f"quality knob {knob.describe()}: the declared direction looks wrong: mean density "
                         f"{da:.4f} at {a:g} but {db:.4f} at {b:g} (it should fall as the value moves away from "
                         f"{knob.exact_end():g}); fix the method's param(quality=...)")


# -- 2. allocation ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Allocation:
    """One option per layer: an index into the ladder, or -1 for dense."""

    choice: tuple[int, ...]
    predicted_error: float
    predicted_density: float


def options(table_row: tuple[list[float], list[float]]) -> list[tuple[int, float, float]]:
    """(option, error, density) of one layer: dense first, then the ladder."""
    err, dens = table_row
    return [(-1, 0.0, 1.0)] + [(i, err[i], dens[i]) for i in range(len(err))]


def allocate(table: dict[int, tuple[list[float], list[float]]], lam: float) -> Allocation:
    """Each layer's option minimising density + lam * error (ties: the denser option)."""
    choice, e_sum, d_sum = [], 0.0, 0.0
    for layer in sorted(table):
        best = min(options(table[layer]), key=lambda o: (o[2] + lam * o[1], -o[2]))
        choice.append(best[0])
        e_sum += best[1]
        d_sum += best[2]
    return Allocation(tuple(choice), e_sum, d_sum / max(1, len(table)))


def breakpoints(table: dict[int, tuple[list[float], list[float]]]) -> list[float]:
    """Every lam at which some layer's best option can change: (d_a - d_b) / (e_b - e_a) > 0 for each pair
    of a layer's options, sorted. Between two consecutive ones the allocation is constant."""
    found = set()
    for row in table.values():
        opts = options(row)
        for i, (_, ea, da) in enumerate(opts):
            for _, eb, db in opts[i + 1:]:
                if eb != ea and (da - db) / (eb - ea) > 0:
                    found.add((da - db) / (eb - ea))
    return sorted(found)


def allocation_path(table: dict[int, tuple[list[float], list[float]]]) -> list[Allocation]:
    """Distinct allocations along lam, sparsest first (lam -> 0), ending with all dense: one allocation
    between each pair of consecutive breakpoints, so consecutive entries differ in few layers."""
    points = breakpoints(table)
    lams = [0.0] + [math.sqrt(a * b) for a, b in zip(points, points[1:], strict=False)] + (
        [points[-1] * 2.0] if points else [])
    path: list[Allocation] = []
    for lam in lams:
        alloc = allocate(table, lam)
        if not path or alloc.choice != path[-1].choice:
            path.append(alloc)
    dense = Allocation(tuple(-1 for _ in table), 0.0, 1.0)
    if path[-1].choice != dense.choice:
        path.append(dense)
    return path


def uniform_candidates(table: dict[int, tuple[list[float], list[float]]], density: float) -> list[Allocation]:
    """The uniform allocations (one ladder value for every layer) predicted sparser than `density`, densest
    first: the order in which step 3b probes them."""
    layers = sorted(table)
    n_values = len(table[layers[0]][0])
    found = []
    for i in range(n_values):
        alloc = Allocation(tuple(i for _ in layers), sum(table[layer][0][i] for layer in layers),
                           sum(table[layer][1][i] for layer in layers) / len(layers))
        if alloc.predicted_density < density:
            found.append(alloc)
    return sorted(found, key=lambda a: -a.predicted_density)


def next_probe(path: list[Allocation], probes: list[tuple[int, float]], budget: float) -> int | None:
    """Index into `path` of the next allocation to measure, from (index, measured max ΔPPL %) so far.

    Secant on log ΔPPL vs log E aimed at TARGET_FRACTION of the budget, kept inside the bracket of
    the sparsest feasible (ΔPPL <= budget) and densest infeasible probes; None when nothing new is left.
    """
    feasible = [i for i, d in probes if d <= budget]
    infeasible = [i for i, d in probes if d > budget]
    lo = max(infeasible) + 1 if infeasible else 0  # sparsest index still allowed
    hi = min(feasible) - 1 if feasible else len(path) - 2  # denser than the best feasible is pointless
    if lo > hi:
        return None
    target = TARGET_FRACTION * budget
    pts = sorted(((path[i].predicted_error, max(d, 1e-6)) for i, d in probes if path[i].predicted_error > 0),
                 key=lambda p: p[0])
    if not pts:
        # first probe: the allocation closest (in log E) to the geometric middle of the path's errors
        errors = [path[i].predicted_error for i in range(lo, hi + 1) if path[i].predicted_error > 0]
        if not errors:
            return hi
        goal = math.sqrt(min(errors) * max(errors))
    elif len(pts) == 1:
        (e0, d0), = pts
        goal = e0 * target / d0  # ΔPPL proportional to E
    else:
        (e0, d0), (e1, d1) = pts[0], pts[-1]
        slope = (math.log(d1) - math.log(d0)) / (math.log(e1) - math.log(e0)) if e1 > e0 and d1 != d0 else 1.0
        slope = min(max(slope, 0.3), 3.0)
        anchor_e, anchor_d = min(pts, key=lambda p: abs(math.log(p[1] / target)))
        goal = anchor_e * (target / anchor_d) ** (1.0 / slope)
    tried = {i for i, _ in probes}
    candidates = [i for i in range(lo, hi + 1) if i not in tried]
    if not candidates:
        return None
    return min(candidates, key=lambda i: abs(math.log(max(path[i].predicted_error, 1e-30) / goal)))


# -- 3./4. perplexity through the compiled model ------------------------------------------------

@dataclass
class Measured:
    """ΔPPL % per length and mean density of one policy on a set of windows."""

    dppl_pct: dict[int, float]
    ppl: dict[int, float]
    density: dict[int, float]
    layer_density: dict[int, dict[int, float]] = field(default_factory=dict)

    def worst(self) -> float:
        return max(self.dppl_pct.values())

    def mean_density(self) -> float:
        return sum(self.density.values()) / len(self.density)


@dataclass
class Context:
    """What one calibration run shares: the evaluator (model, tokens, cache), windows, progress bar."""

    ev: Any
    lengths: tuple[int, ...]
    calibration: dict[int, list[tuple[int, torch.Tensor]]]
    holdout: dict[int, list[tuple[int, torch.Tensor]]]
    inner: str
    bar: Any

    def baseline_nll(self, windows: list[tuple[int, torch.Tensor]]) -> list[dict[str, Any]]:
        """Eager NLL summaries of the windows (cached like `eval`'s baseline)."""

        forward = logits_fn(self.ev.model, self.ev.config.torch_device())
        rows = []
        for _, ids in windows:
            key = self.ev.cache_key("ppl_window", ids)
            row = self.ev.cache.get(key)
            if row is None:
                t0 = time.perf_counter()
                row = {**nll_summary(window_nll(forward, ids)), "seconds": time.perf_counter() - t0}
                self.ev.cache.put(key, row)
            rows.append(row)
            self.bar.update(1)
        return rows

    def measure(self, policy: Any, which: dict[int, list[tuple[int, torch.Tensor]]]) -> Measured:
        """ΔPPL % (against the eager model) and density of `policy` on the windows `which`."""

        report = Report()
        compiled = compile_with_policy(self.ev.model, policy, report, self.inner)
        forward = logits_fn(compiled, self.ev.config.torch_device())
        result = Measured({}, {}, {})
        for length in self.lengths:
            rows, layers = [], []
            base = perplexity(self.baseline_nll(which[length]))
            for _, ids in which[length]:
                rows.append(nll_summary(window_nll(forward, ids)))
                layers.append(report.layer_density("prefill"))
                self.bar.update(1)
            ppl = perplexity(rows)
            per_layer = {layer: sum(d.get(layer, 1.0) for d in layers) / len(layers)
                         for layer in sorted({x for d in layers for x in d})}
            result.ppl[length] = ppl
            result.dppl_pct[length] = 100.0 * (ppl - base) / base
            result.density[length] = sum(per_layer.values()) / len(per_layer) if per_layer else 1.0
            result.layer_density[length] = per_layer
        torch._dynamo.reset()
        return result

    def needles(self, policy: Any, baseline: dict[str, Any]) -> dict[str, Any]:
        """The NIAH grid through `policy`: eval's result with `vs_eager` (the samples it lost and gained)."""
        return policy_niah(self.ev, policy, baseline, self.inner)

    def sensitivity(self, knob: Knob, values: tuple[float, ...], params: Any, error: str = "value",
                    windows: dict[int, list[tuple[int, torch.Tensor]]] | None = None
                    ) -> dict[int, tuple[list, list]]:
        """Per-layer error and density of every candidate, over `windows` (default: the calibration windows;
        step 1)."""

        windows = self.calibration if windows is None else windows
        probe = SensitivityProbe(knob, values, params)
        forward = logits_fn(dense_graph_with(self.ev.model, probe), self.ev.config.torch_device())
        with torch.no_grad():
            for length in windows:
                for _, ids in windows[length]:
                    forward(ids[None])
                    self.bar.update(1)
        torch._dynamo.reset()
        table = sensitivity_table(probe.stats, error)
        if not table:
            raise ValueError("no attention site was found in the model: nothing to calibrate")
        return table


# -- 5. the policy --------------------------------------------------------------------------------

def params_table(params: Any, knob: Knob) -> dict[str, Any]:
    """The params a policy table states: the knob fields and every field that differs from its default
    (an override's params start from the method's defaults, not from the phase's params)."""
    return {f.name: getattr(params, f.name) for f in dataclasses.fields(params)
            if f.name in knob.fields or getattr(params, f.name) != f.default}


def tuned_policy(base: Any, knob: Knob, values: tuple[float, ...], choice: dict[int, int], name: str,
                 description: str) -> Policy:
    """The tuned policy: the base policy's phases, the most common per-layer value as the prefill default,
    one override per other value (layers as compact ranges; option -1: dense). Validated like a file."""
    phase = base.prefill
    method_params = phase.params if phase.method == knob.method else METHODS[knob.method].Params()
    groups: dict[int, list[int]] = {}
    for layer, option in sorted(choice.items()):
        groups.setdefault(option, []).append(layer)
    sparse_groups = {o: ls for o, ls in groups.items() if o >= 0}
    default = max(sparse_groups, key=lambda o: (len(sparse_groups[o]), -o)) if sparse_groups else 0
    overrides = [{"layers": LayerSet.of(groups[o]).to_list(), "method": DENSE} if o == -1 else
                 {"layers": LayerSet.of(groups[o]).to_list(),
                  "params": params_table(with_knob(method_params, knob, values[o]), knob)}
                 for o in sorted(groups, key=lambda o: (o != -1, o)) if o != default]
    decode = base.decode
    if decode.overrides:
        raise ValueError("the base policy's decode overrides cannot be carried over; use a base policy without them")
    decode_params = ({f.name: getattr(decode.params, f.name) for f in dataclasses.fields(decode.params)
                      if getattr(decode.params, f.name) != f.default} if decode.params is not None else {})
    return Policy.from_mapping({
        "name": name, "description": description,
        "prefill": {"method": knob.method, "min_seq_len": phase.min_seq_len, "overrides": overrides,
                    "params": params_table(with_knob(method_params, knob, values[default]), knob)},
        "decode": {"method": decode.method, "min_seq_len": decode.min_seq_len, "params": decode_params},
    }, "<calibration>")


def base_policy(method: str, spec: str | None) -> Any:
    """The policy whose phases the tuned one keeps: `--base`, else the method's shipped name-only policy
    (`method` or `method-lossy`), else prefill = method (defaults, min_seq_len 0) with dense decode."""

    if spec is not None:
        policy = load_policy(spec)
    elif (generic := generic_policy_name(method)) is not None:
        policy = load_policy(generic)
    else:
        return Policy.from_mapping({"name": method, "prefill": {"method": method}}, source=f"<{method} defaults>")
    if policy.prefill.method != method:
        raise ValueError(f"--base {policy.source}: its prefill method is {policy.prefill.method!r}, not {method!r}")
    return policy


# -- the command -----------------------------------------------------------------------------------

def add_quality_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the generic search (the common ones come from `add_common_arguments`)."""
    parser.add_argument("--max-dppl", type=float, required=True, metavar="PCT",
                        help="perplexity budget: relative PPL increase over the eager model, in percent (e.g. 0.5), "
                             "at every length, on the calibration and on the held-out windows")
    parser.add_argument("--lengths", type=parse_lengths, default=(8192,), help="window lengths (default 8K)")
    parser.add_argument("--windows", type=positive_int, default=2, help="calibration windows per length (2)")
    parser.add_argument("--holdout-windows", type=positive_int, default=2,
                        help="held-out verification windows per length, at other text positions (2)")
    parser.add_argument("--values", type=parse_floats, help="candidate knob values (default: a ladder toward the "
                        "exact end, e.g. 0.998,0.995,0.99,0.98,0.97,0.95,0.9,0.8 for a [0, 1] knob)")
    parser.add_argument("--error", choices=("output", "value"), default="value",
                        help="sensitivity proxy: output error relative to the value vectors' size (default) or to "
                             "|out| (EVAL.md's proxy check ranks them against real dNLL)")
    parser.add_argument("--sensitivity-length", type=parse_length, metavar="N",
                        help="measure the one-pass sensitivity on N-token windows (e.g. 2K) instead of at every "
                             "--lengths value; the probes and the held-out check still run at --lengths")
    parser.add_argument("--uniform-probes", type=int, default=2, metavar="K",
                        help="after the per-layer search, measure up to K uniform values (one value for every "
                             "layer) and keep the sparsest within the budget (default 2; 0: none)")
    parser.add_argument("--max-probes", type=positive_int, default=4,
                        help="perplexity measurements of candidate allocations on the calibration windows (4)")
    parser.add_argument("--base", help="policy whose other settings are kept (default: the method's shipped name-only "
                        "policy, e.g. prism or pbs-lossy, else one built from the method's defaults)")
    parser.add_argument("--name", help="name of the written policy (default: the --out file's stem)")
    parser.add_argument("--report", metavar="FILE.json", help="also write the search's details as JSON: per-layer "
                        "error and density of every candidate, the probes, calibration and held-out numbers")
    parser.add_argument("--verify", metavar="POLICY", help="no search: measure POLICY on the held-out windows and "
                        "fail (exit 1) when its dPPL exceeds --max-dppl at any length")
    add_needle_arguments(parser, "--lengths", "denser allocations", "the winner",
                         " (the policy is then verified on perplexity only)")
    parser.add_argument("--inner", choices=("eager", "inductor"), default="eager",
                        help="inner compiler of the sparse backend (default eager)")
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads")


def split_windows(ev: Any, lengths: tuple[int, ...], n_cal: int, n_hold: int
                  ) -> tuple[dict[int, list], dict[int, list]]:
    """Calibration and held-out windows per length: n_cal + n_hold windows evenly spaced over the corpus,
    interleaved (held-out ones between calibration ones), so both cover the text and never share a start."""

    cal, hold = {}, {}
    for length in lengths:
        every = windows(ev.corpus_ids, length, n_cal + n_hold)
        order = interleave(n_cal, n_hold)
        cal[length] = [w for w, tag in zip(every, order, strict=True) if tag == "c"]
        hold[length] = [w for w, tag in zip(every, order, strict=True) if tag == "h"]
    return cal, hold


def interleave(n_cal: int, n_hold: int) -> list[str]:
    """"c"/"h" tags for n_cal + n_hold evenly spaced windows: held-out windows spread evenly among them."""
    total = n_cal + n_hold
    held = {round((i + 0.5) * total / n_hold - 0.5) for i in range(n_hold)}
    tags = ["h" if i in held else "c" for i in range(total)]
    while tags.count("h") < n_hold:  # rounding collisions (never for n_hold <= n_cal + 1)
        tags[tags.index("c")] = "h"
    return tags


def denser_steps(path: list[Allocation], winner: int, limit: int) -> list[int]:
    """The path indices a lost needle moves to, in order: allocations predicted denser than `winner`'s, least
    dense first, at most `limit` (the path's all-dense end included when it is among them)."""
    denser = [i for i, a in enumerate(path) if a.predicted_density > path[winner].predicted_density]
    return sorted(denser, key=lambda i: (path[i].predicted_density, i))[:max(0, limit)]


def run_quality(args: argparse.Namespace) -> int:
    """Run the generic search for `args.method` (see the module docstring); the exit status."""
    t_start = time.perf_counter()
    if not math.isfinite(args.max_dppl) or args.max_dppl < 0:
        raise ValueError(f"--max-dppl {args.max_dppl}: give a budget in percent >= 0 (e.g. 0.5)")
    verify = load_policy(args.verify) if getattr(args, "verify", None) else None
    if not args.out and verify is None:
        raise ValueError("give --out policy.toml (where the tuned policy goes)")
    out = Path(args.out or "unused.toml")
    if out.suffix != ".toml":
        raise ValueError(f"--out {args.out}: the policy file must end in .toml")
    if not out.parent.exists():
        raise ValueError(f"--out {args.out}: folder {out.parent} does not exist")
    knob = method_knob(args.method)
    values = ladder(knob, args.values)
    base = base_policy(args.method, args.base)
    skip_needles = getattr(args, "no_niah", False)
    n_needle_probes = needle_probes(args)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    config = EvalConfig(
        model=args.model, policies=(base,), corpus=args.corpus or default_corpus(), lengths=tuple(args.lengths),
        windows=args.windows + args.holdout_windows, tasks=("ppl",) if skip_needles else ("ppl", "niah"),
        cache_dir=cache_dir(args), progress=not args.no_progress, device=args.device, dtype=args.dtype,
        **({} if skip_needles else niah_fields(args, tuple(args.lengths))),
    )
    ev, _ = prepare(config)  # loads and checks everything (policy, corpus length, model) before any work
    cal, hold = split_windows(ev, config.lengths, args.windows, args.holdout_windows)
    n_cal, n_hold = sum(map(len, cal.values())), sum(map(len, hold.values()))
    sens_windows = None
    if getattr(args, "sensitivity_length", None):
        sens_windows = split_windows(ev, (args.sensitivity_length,), args.windows, args.holdout_windows)[0]
    uniform_probes = getattr(args, "uniform_probes", 0)
    if isinstance(uniform_probes, bool) or not isinstance(uniform_probes, int) or uniform_probes < 0:
        raise ValueError(f"--uniform-probes {uniform_probes!r}: give an int >= 0")

    n_sens = n_cal if sens_windows is None else args.windows
    total = n_sens + 2 * n_cal * (args.max_probes + uniform_probes) + 2 * n_hold  # sensitivity, probes, held-out
    bar = tqdm(total=total, desc=f"calibrate {args.method}", disable=args.no_progress, dynamic_ncols=True)
    ctx = Context(ev, config.lengths, cal, hold, args.inner, bar)
    if verify is not None:
        return verify_policy(ctx, verify, args.max_dppl, not skip_needles)
    params = base.prefill.params if base.prefill.method == args.method else METHODS[args.method].Params()

    table = ctx.sensitivity(knob, values, params, args.error, sens_windows)  # 1
    check_direction(knob, values, table)
    path = allocation_path(table)  # 2
    layers = sorted(table)

    def policy_of(alloc: Allocation) -> Any:
        choice = dict(zip(layers, alloc.choice, strict=True))
        return tuned_policy(base, knob, values, choice, "probe", "")

    probes: list[tuple[int, float]] = []  # 3
    measured: dict[int, Measured] = {}
    for _ in range(args.max_probes):
        index = next_probe(path, probes, args.max_dppl)
        if index is None:
            break
        measured[index] = ctx.measure(policy_of(path[index]), cal)
        probes.append((index, measured[index].worst()))
        bar.set_postfix_str(f"probe E={path[index].predicted_error:.2e} dPPL={probes[-1][1]:+.3f}%")
    feasible = [i for i, d in probes if d <= args.max_dppl]
    if feasible:
        best = min(feasible, key=lambda i: measured[i].mean_density())
    else:  # every probe was over budget: the next denser allocation is unmeasured; all dense is safe
        best = len(path) - 1
        bar.total += 2 * n_cal
        measured[best] = ctx.measure(policy_of(path[best]), cal)
    measured_choices = {path[i].choice: i for i in measured}
    uniform_left = uniform_probes
    for alloc in uniform_candidates(table, path[best].predicted_density):  # 3b
        if uniform_left == 0:
            break
        if alloc.choice in measured_choices:  # e.g. the sparsest end of the path is uniform
            index = measured_choices[alloc.choice]
            if measured[index].worst() > args.max_dppl:
                break
            continue
        uniform_left -= 1
        path.append(alloc)
        index = len(path) - 1
        measured[index] = ctx.measure(policy_of(alloc), cal)
        probes.append((index, measured[index].worst()))
        bar.set_postfix_str(f"uniform {values[alloc.choice[0]]:g} dPPL={probes[-1][1]:+.3f}%")
        if probes[-1][1] > args.max_dppl:
            break
        if measured[index].mean_density() < measured[best].mean_density():
            best = index
    winner = path[best]
    bar.total -= 2 * n_cal * uniform_left  # uniform probes not needed
    bar.refresh()
    held = ctx.measure(policy_of(winner), hold)  # 4
    ok = held.worst() <= args.max_dppl
    needles: dict[str, Any] = {}
    if ok and not skip_needles:  # 4b: a needle eager finds and the winner loses is over budget too
        baseline = ev.baseline_niah()
        runs: dict[int, dict[str, Any]] = {}

        def lost_by(index: int) -> int:
            runs[index] = ctx.needles(policy_of(path[index]), baseline)
            return len(runs[index]["vs_eager"]["lost"])

        steps = denser_steps(path, best, n_needle_probes)
        index, lost, tried = needle_search(best, steps, lost_by)
        if index != best:  # a denser allocation: measured and verified like the winner
            bar.total += 2 * (n_cal + n_hold)
            best, winner = index, path[index]
            measured.setdefault(best, ctx.measure(policy_of(winner), cal))
            held = ctx.measure(policy_of(winner), hold)
            ok = held.worst() <= args.max_dppl
        needles = needle_entry(baseline, runs[best]["vs_eager"]["lost"], ev.config.needle_lengths(),
                               denser_tried=tried)
        ok = ok and lost == 0
    bar.close()

    env = environment(getattr(args, "command_argv", None), config.torch_device(), config.torch_dtype())
    choice = dict(zip(layers, winner.choice, strict=True))
    header = make_header(args, env, ev, knob, values, table, choice, cal, hold, measured[best], held, probes, path,
                         time.perf_counter() - t_start, ok)
    if needles:
        at = next(i for i, line in enumerate(header) if line.startswith("Held-out:")) + 1
        header.insert(at, needle_line(needles["eager_found"], needles["samples"], needles["lost"],
                                      needles["denser_tried"], tuple(needles["lengths"])))
    name = args.name or out.stem
    policy = tuned_policy(base, knob, values, choice, name,
                          f"{args.method} tuned per layer to dPPL <= {args.max_dppl:g}% at "
                          f"{','.join(str(n) for n in config.lengths)} tokens on {ev.corpus.name} "
                          f"({'verified' if ok else 'FAILED verification'} on held-out windows)")
    text = policy_toml(policy, "\n".join(header))

    if parse_toml(text, str(out)).to_dict() != policy.to_dict():  # what is written loads back unchanged
        raise ValueError("internal error: the written policy does not load back to the calibrated one")
    target = out if ok else out.with_suffix(".unverified.toml")
    target.write_text(text)
    if getattr(args, "report", None):
        Path(args.report).write_text(json.dumps({
            "env": env, "knob": dataclasses.asdict(knob), "values": list(values), "budget_pct": args.max_dppl,
            "sensitivity": {str(layer): {"error": e, "density": d} for layer, (e, d) in table.items()},
            "path": [dataclasses.asdict(a) for a in path], "probes": [list(p) for p in probes],
            "probe_results": {str(i): dataclasses.asdict(m) for i, m in measured.items()}, "chosen": best,
            "heldout": dataclasses.asdict(held), "needles": needles, "verified": ok,
            "seconds": time.perf_counter() - t_start,
        }, indent=1, default=str) + "\n")
    summary = (f"{args.method}: held-out dPPL {', '.join(f'{L}: {d:+.3f}%' for L, d in held.dppl_pct.items())}, "
               f"mean density {held.mean_density():.3f} (calibration: "
               f"{', '.join(f'{L}: {d:+.3f}%' for L, d in measured[best].dppl_pct.items())}); "
               + (f"needles lost {needles['lost']} of {needles['eager_found']} eager finds; " if needles else "")
               + f"{time.perf_counter() - t_start:.0f} s")
    if needles and needles["lost"]:
        print(f"error: needle check FAILED: the policy loses {needles['lost']} needle(s) eager finds, also after "
              f"{needles['denser_tried']} denser allocation(s) ({summary}); the policy went to {target}, not {out}",
              file=sys.stderr)
        return 1
    if not ok:
        print(f"error: held-out verification FAILED: dPPL {held.worst():+.3f}% > budget {args.max_dppl:g}% "
              f"({summary}); the policy went to {target}, not {out}", file=sys.stderr)
        return 1
    print(f"wrote {target}: {summary}", file=sys.stderr)
    return 0


def verify_policy(ctx: Context, policy: Any, budget: float, needles: bool = True) -> int:
    """Measure `policy` on the held-out windows (and, with `needles`, the NIAH grid against eager): 0 when dPPL <=
    budget at every length and no needle eager finds is lost, else 1 (loudly)."""
    held = ctx.measure(policy, ctx.holdout)
    lost = []
    if needles:
        lost = ctx.needles(policy, ctx.ev.baseline_niah())["vs_eager"]["lost"]
    ctx.bar.close()
    numbers = ", ".join(f"{L}: dPPL {held.dppl_pct[L]:+.3f}% density {held.density[L]:.3f}" for L in ctx.lengths)
    windows = ", ".join(f"{L}: {[s for s, _ in ctx.holdout[L]]}" for L in ctx.lengths)
    if lost:
        where = ", ".join(f"L={r['length']} depth {r['depth']:g}" for r in lost)
        print(f"error: needle check FAILED for {policy.source}: loses {len(lost)} needle(s) eager finds ({where}); "
              f"{numbers}", file=sys.stderr)
        return 1
    if held.worst() > budget:
        print(f"error: held-out verification FAILED for {policy.source}: {numbers} (budget {budget:g}%; "
              f"held-out window starts {windows})", file=sys.stderr)
        return 1
    print(f"verified {policy.source}: {numbers} (budget {budget:g}%; held-out window starts {windows})",
          file=sys.stderr)
    return 0


def make_header(args: argparse.Namespace, env: dict[str, Any], ev: Any, knob: Knob, values: tuple[float, ...],
                table: dict[int, tuple[list, list]], choice: dict[int, int], cal: dict, hold: dict,
                cal_result: Measured, held: Measured, probes: list[tuple[int, float]], path: list[Allocation],
                seconds: float, ok: bool) -> list[str]:
    """The policy file's header comment: how it was made and what it achieved."""
    lengths = list(cal)
    layer_word = {-1: "dense"} | {i: f"{v:g}" for i, v in enumerate(values)}
    lines = [
        f"Made by `python -m sparse_compile calibrate {args.method} --max-dppl {args.max_dppl:g}` "
        f"({'verified' if ok else 'FAILED held-out verification'}).",
        f"Command: {env['command']}",
        f"Date {env['date']}; sparse_compile {env['sparse_compile_revision']}; torch {env['torch']}, transformers "
        f"{env['transformers']}; device {env.get('gpu', env['device'])}, dtype {env['dtype']}.",
        f"Model: {args.model} ({ev.model.config.num_hidden_layers} layers), fingerprint {ev.fingerprint[:16]}.",
        f"Corpus: {ev.corpus.name} (sha256 {ev.corpus.sha256[:16]}, {int(ev.corpus_ids.numel())} tokens).",
        f"Knob: {knob.describe()}; candidates {', '.join(f'{v:g}' for v in values)} or dense.",
        f"Calibration windows (token starts): {', '.join(f'{L}: {[s for s, _ in cal[L]]}' for L in lengths)}.",
        f"Held-out windows (token starts): {', '.join(f'{L}: {[s for s, _ in hold[L]]}' for L in lengths)}.",
        f"Search: per-layer output error ({getattr(args, 'error', 'value')}-relative) of each candidate on exact "
        "inputs (one pass per window), allocation",
        "minimising density + lam * error, lam fitted to the budget by measured dPPL "
        f"({len(probes)} probes of {len(path)} allocations, uniform values included); sensitivity at "
        f"{getattr(args, 'sensitivity_length', None) or 'the calibration lengths'}.",
        "Calibration: " + "; ".join(f"L={L} dPPL {cal_result.dppl_pct[L]:+.3f}% density {cal_result.density[L]:.3f}"
                                    for L in lengths) + ".",
        "Held-out:    " + "; ".join(f"L={L} dPPL {held.dppl_pct[L]:+.3f}% density {held.density[L]:.3f}"
                                    for L in lengths) + f"; mean density {held.mean_density():.3f}.",
        f"Wall time {seconds:.0f} s.",
        "",
        "layer: value (relative output error, density on the calibration windows)",
    ]
    row = []
    for layer, option in choice.items():
        err, dens = (0.0, 1.0) if option < 0 else (table[layer][0][option], table[layer][1][option])
        row.append(f"{layer}: {layer_word[option]} ({err:.1e}, {dens:.2f})")
    for i in range(0, len(row), 4):
        lines.append("  " + "; ".join(row[i:i + 4]))
    return lines


__all__ = ["Knob", "add_quality_arguments", "allocate", "allocation_path", "check_direction", "denser_steps",
           "ladder", "method_knob", "next_probe", "quality_knobs", "run_quality"]
