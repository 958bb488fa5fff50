"""The `sparse` torch.compile backend: options -> policy -> rewrite pass -> inner compiler.

    torch.compile(model, backend="sparse")                                    # shipped "dense" policy
    torch.compile(model, backend="sparse", options={"policy": "prism"})       # shipped policy by name
    torch.compile(model, backend="sparse", options={"policy": "my.toml", "inner": "eager", "report": report})

Options:
  policy: shipped name, path to a TOML file, a mapping or a `Policy` (default "dense").
  inner:  "inductor" (default) or "eager": what compiles the rewritten graph.
  report: a `Report` to fill: sites at compile time, densities at every call.
  debug:  True prints each graph before and after the rewrite.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx

from sparse_compile.params import PolicyError
from sparse_compile.policy import load_policy
from sparse_compile.report import GraphRecord, Report

OPTION_KEYS = ("policy", "inner", "report", "debug")
INNER_COMPILERS = ("inductor", "eager")


def check_options(options: dict[str, Any] | None) -> dict[str, Any]:
    options = dict(options or {})
    for key in options:
        if key not in OPTION_KEYS:
            raise PolicyError(f"backend='sparse': unknown option '{key}'; allowed options: {', '.join(OPTION_KEYS)}")
    inner = options.get("inner", "inductor")
    if inner not in INNER_COMPILERS:
        raise PolicyError(f"backend='sparse': option 'inner' = {inner!r}; allowed: {', '.join(INNER_COMPILERS)}")
    report = options.get("report")
    if report is not None and not isinstance(report, Report):
        raise PolicyError(
            f"backend='sparse': option 'report' must be a sparse_compile.Report, got {type(report).__name__}"
        )
    return options


def grads_needed(example_inputs: Sequence[Any]) -> bool:
    return torch.is_grad_enabled() and any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs
    )


def rewrite_graph(gm: fx.GraphModule, example_inputs: Sequence[Any], policy, report: Report, debug: bool = False):
    """Run the attention pass on one dynamo graph, record it in `report`. Returns (gm, n_outputs, layers)."""
    from sparse_compile.passes.rewrite import rewrite_attention
    from sparse_compile.report import Rejection

    index = len(report.graphs)
    nodes_before = len(gm.graph.nodes)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    n_outputs = len(output.args[0]) if isinstance(output.args[0], (tuple, list)) else None
    if debug:
        print(f"[sparse_compile] graph {index} before:\n{gm.code}")
    if grads_needed(example_inputs):
        from sparse_compile.passes.sites import find_sites

        matches, candidates = find_sites(gm)
        for node in [m.sdpa for m in matches] + [c.sdpa for c in candidates]:
            report.rejected.append(Rejection(
                index, None, node.name, "gradients are enabled: sparse_compile rewrites inference graphs only "
                "(run under torch.no_grad() or torch.inference_mode())"))
        report.graphs.append(GraphRecord(index, "unknown", len(matches) + len(candidates), 0, nodes_before,
                                         nodes_before, policy.name))
        return gm, n_outputs, []
    gm, sites, rejections, layers = rewrite_attention(gm, policy, index)
    report.sites.extend(sites)
    report.rejected.extend(rejections)
    phase = sites[0].phase if sites else "unknown"
    n_calls = len(sites) + sum(1 for r in rejections if not r.reason.startswith("mask not recognised"))
    report.graphs.append(GraphRecord(index, phase, n_calls, len(sites), nodes_before, len(gm.graph.nodes), policy.name))
    if debug:
        print(f"[sparse_compile] graph {index} after:\n{gm.code}")
    return gm, n_outputs, layers


def with_density_outputs(compiled: Callable, n_outputs: int | None, layers: list[int], report: Report,
                         graph_index: int) -> Callable:
    """Wrap a compiled graph whose last outputs are the sites' densities: strip and record them."""
    if not layers:
        return compiled

    def run(*args: Any) -> Any:
        outs = compiled(*args)
        cut = len(outs) - len(layers)
        report.record_densities(graph_index, layers, outs[cut:])
        kept = outs[:cut]
        return kept if n_outputs is not None else kept[0]

    return run


def sparse_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Callable:
    """The torch.compile backend registered as "sparse" (entry point `torch_dynamo_backends`)."""
    options = check_options(kwargs.get("options"))
    policy = load_policy(options.get("policy"))
    report = options.get("report") or Report()
    report.policy = f"{policy.name} ({policy.fingerprint()})"
    index = len(report.graphs)
    gm, n_outputs, layers = rewrite_graph(gm, example_inputs, policy, report, bool(options.get("debug")))
    if options.get("inner", "inductor") == "eager":
        compiled = gm.forward
    else:
        from torch._inductor.compile_fx import compile_fx

        compiled = compile_fx(gm, example_inputs)
    return with_density_outputs(compiled, n_outputs, layers, report, index)
