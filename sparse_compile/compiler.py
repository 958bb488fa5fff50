"""The `sparse` torch.compile backend: options -> policy -> rewrite pass -> inner compiler.

Three ways in, one implementation (`SparseBackend`):

    torch.compile(model, backend="sparse")                                    # shipped "dense" policy
    torch.compile(model, backend="sparse", mode="reduce-overhead")            # a mode, the default policy
    torch.compile(model, backend="sparse", options={"policy": "prism", "mode": "max-autotune"})
    torch.compile(model, backend=sparse_compile.backend(policy="prism"), mode="reduce-overhead")
    sparse_compile.compile(model, "prism", mode="reduce-overhead")            # + .sparse_report

torch.compile refuses `mode=` together with `options=`, so the options take a "mode" key too.
`sparse_compile.backend(...)` and `sparse_compile.compile(...)` validate everything when called and
raise `PolicyError` there; through `options=` torch defers the backend to the first call, where an
error arrives wrapped in torch._dynamo's `BackendCompilerFailed` (its `.inner_exception` is ours).

Options (keywords of `backend(...)`, keys of `options=`):
  policy:   shipped name, path to a TOML file, a mapping or a `Policy` (default "dense").
  inner:    "inductor" (default) or "eager": what compiles the rewritten graph.
  mode:     Inductor's mode, one of MODES: "reduce-overhead" captures CUDA graphs (methods that cannot
            be captured run between the captured parts; the Report says which).
  inductor: a dict of Inductor config patches (what `torch.compile(options=...)` would pass Inductor).
  report:   a `Report` to fill: sites at compile time, densities and fallbacks at every call.
  debug:    True prints each graph before and after the rewrite.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx

from sparse_compile.params import PolicyError
from sparse_compile.passes.rewrite import rewrite_attention
from sparse_compile.passes.sites import find_sites
from sparse_compile.policy import Policy, load_policy
from sparse_compile.report import GraphRecord, Rejection, Report

OPTION_KEYS = ("policy", "inner", "mode", "inductor", "report", "debug")
INNER_COMPILERS = ("inductor", "eager")
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
GRADIENTS_REASON = ("gradients are enabled: sparse_compile rewrites inference graphs only "
                    "(run under torch.no_grad() or torch.inference_mode())")


class SparseBackend:
    """A validated `sparse` backend: pass it as `torch.compile(model, backend=SparseBackend(...))`.

    Every argument is checked here (PolicyError names the bad one); compiling a graph then cannot fail
    on configuration. `mode` may also come from `torch.compile(..., mode=...)`; the two must agree.
    """

    def __init__(
        self,
        policy: str | Policy | Mapping[str, Any] | None = None,
        *,
        inner: str = "inductor",
        mode: str | None = None,
        inductor: Mapping[str, Any] | None = None,
        report: Report | None = None,
        debug: bool = False,
    ) -> None:
        if not isinstance(inner, str) or inner not in INNER_COMPILERS:
            raise PolicyError(f"backend='sparse': option 'inner' = {inner!r}; allowed: {', '.join(INNER_COMPILERS)}")
        check_mode(mode)
        if inductor is not None and not (isinstance(inductor, Mapping) and all(isinstance(k, str) for k in inductor)):
            raise PolicyError(f"backend='sparse': option 'inductor' must be a dict of Inductor config patches, "
                              f"got {type(inductor).__name__}")
        if inner == "eager" and (mode not in (None, "default") or inductor):
            raise PolicyError("backend='sparse': options 'mode' and 'inductor' configure the Inductor inner compiler; "
                              "they do not apply with inner='eager'")
        if report is not None and not isinstance(report, Report):
            raise PolicyError(f"backend='sparse': option 'report' must be a sparse_compile.Report, "
                              f"got {type(report).__name__}")
        if not isinstance(debug, bool):
            raise PolicyError(f"backend='sparse': option 'debug' must be True or False, got {debug!r}")
        self.policy = load_policy(policy)
        if self.policy.warning:
            warnings.warn(f"sparse_compile policy {self.policy.name!r}: {self.policy.warning}", stacklevel=3)
        self.inner = inner
        self.mode = mode
        self.inductor = dict(inductor or {})
        self.report = report if report is not None else Report()
        self.debug = debug
        self.__name__ = "sparse"  # what dynamo prints for the backend

    def __repr__(self) -> str:
        return (f"sparse_compile.backend(policy={self.policy.name!r}, inner={self.inner!r}, mode={self.mode!r}, "
                f"inductor={self.inductor!r})")

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Callable:
        unknown = set(kwargs) - {"mode", "options"}
        if unknown:
            raise PolicyError(f"backend='sparse': unexpected arguments {sorted(unknown)}")
        if kwargs.get("options"):
            raise PolicyError("backend='sparse': give options to sparse_compile.backend(...), not to torch.compile "
                              "as well")
        mode = kwargs.get("mode")
        check_mode(mode)
        if mode not in (None, "default") and self.mode not in (None, "default", mode):
            raise PolicyError(f"backend='sparse': torch.compile(mode={mode!r}) contradicts the backend's mode "
                              f"{self.mode!r}")
        return self.compile_graph(gm, example_inputs, mode if mode not in (None, "default") else self.mode)

    def compile_graph(self, gm: fx.GraphModule, example_inputs: Sequence[Any], mode: str | None) -> Callable:
        report = self.report
        report.policy = f"{self.policy.name} ({self.policy.fingerprint()})"
        report.warning = self.policy.warning
        index = len(report.graphs)
        gm, n_outputs, layers = rewrite_graph(gm, example_inputs, self.policy, report, self.debug)
        if self.inner == "eager":
            compiled = gm.forward
        else:
            from torch._inductor import list_mode_options
            from torch._inductor.compile_fx import compile_fx

            patches = dict(list_mode_options(mode)) if mode not in (None, "default") else {}
            patches.update(self.inductor)
            compiled = compile_fx(gm, example_inputs, config_patches=patches)
        copy = bool(mode in ("reduce-overhead", "max-autotune") or self.inductor.get("triton.cudagraphs"))
        report.cuda_graphs = report.cuda_graphs or copy
        return with_call_records(compiled, n_outputs, layers, report, index, copy_records=copy)


def check_mode(mode: Any) -> None:
    if mode is not None and (not isinstance(mode, str) or mode not in MODES):
        raise PolicyError(f"backend='sparse': mode {mode!r} is not an Inductor mode; allowed: {', '.join(MODES)}")


def backend_from_options(options: Any, mode: str | None = None) -> SparseBackend:
    """A SparseBackend from `torch.compile(..., options=...)` (a dict) and its `mode=`."""
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise PolicyError(f"backend='sparse': options must be a dict with keys {', '.join(OPTION_KEYS)}, got "
                          f"{type(options).__name__} {options!r} (a policy goes in options={{'policy': ...}})")
    for key in options:
        if key not in OPTION_KEYS:
            raise PolicyError(f"backend='sparse': unknown option {key!r}; allowed options: {', '.join(OPTION_KEYS)}")
    kwargs = dict(options)
    check_mode(mode)
    if mode not in (None, "default"):
        if kwargs.get("mode") not in (None, "default", mode):
            raise PolicyError(f"backend='sparse': mode={mode!r} contradicts options['mode'] = {kwargs['mode']!r}")
        kwargs["mode"] = mode
    return SparseBackend(kwargs.pop("policy", None), **kwargs)


def sparse_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Callable:
    """The torch.compile backend registered as "sparse" (entry point `torch_dynamo_backends`)."""
    unknown = set(kwargs) - {"mode", "options"}
    if unknown:
        raise PolicyError(f"backend='sparse': unexpected arguments {sorted(unknown)}")
    chosen = backend_from_options(kwargs.get("options"), kwargs.get("mode"))
    return chosen.compile_graph(gm, example_inputs, chosen.mode)


def grads_needed(example_inputs: Sequence[Any]) -> bool:
    return torch.is_grad_enabled() and any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs
    )


def rewrite_graph(gm: fx.GraphModule, example_inputs: Sequence[Any], policy: Policy, report: Report,
                  debug: bool = False) -> tuple[fx.GraphModule, int | None, list[int]]:
    """Run the attention pass on one dynamo graph, record it in `report`. Returns (gm, n_outputs, layers):
    n_outputs of the original graph (None: a single output), and the layers whose (density, fallback)
    outputs the pass appended."""
    index = len(report.graphs)
    nodes_before = len(gm.graph.nodes)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    n_outputs = len(output.args[0]) if isinstance(output.args[0], (tuple, list)) else None
    if debug:
        print(f"[sparse_compile] graph {index} before:\n{gm.code}")
    if grads_needed(example_inputs):
        matches, candidates = find_sites(gm)
        calls = [m.sdpa for m in matches] + [c.sdpa for c in candidates]
        for node in calls:
            report.rejected.append(Rejection(index, None, node.name, GRADIENTS_REASON))
        if calls:
            warnings.warn(f"sparse_compile: graph {index} left unchanged ({len(calls)} attention calls): "
                          f"{GRADIENTS_REASON}", stacklevel=2)
        report.graphs.append(GraphRecord(index, "unknown", len(calls), 0, nodes_before, nodes_before, policy.name))
        return gm, n_outputs, []
    gm, sites, rejections, layers = rewrite_attention(gm, policy, index)
    report.sites.extend(sites)
    report.rejected.extend(rejections)
    note = distributed_note()
    if sites and note and note not in report.notes:
        report.notes.append(note)
    phase = sites[0].phase if sites else "unknown"
    n_calls = len(sites) + sum(1 for r in rejections if not r.site_rewritten)
    report.graphs.append(GraphRecord(index, phase, n_calls, len(sites), nodes_before, len(gm.graph.nodes), policy.name))
    if debug:
        print(f"[sparse_compile] graph {index} after:\n{gm.code}")
    return gm, n_outputs, layers


def distributed_note() -> str | None:
    """The Report's line for a process of a torch.distributed group of several processes: under tensor
    parallelism (transformers' `tp_plan`) each process traces its own graph, whose attention sites hold only
    its shard of the heads. Nothing crosses processes inside a node."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    world = torch.distributed.get_world_size()
    if world == 1:
        return None
    return (f"torch.distributed rank {torch.distributed.get_rank()} of {world}: each site's H and Hkv are the heads "
            f"this process holds (under tensor parallelism, its shard); a method that shares or averages across "
            f"heads (lessismore's token set, token_sparse's head-mean scores) does so over these heads only")


def with_call_records(compiled: Callable, n_outputs: int | None, layers: list[int], report: Report,
                      graph_index: int, copy_records: bool = False) -> Callable:
    """Wrap a compiled graph: count its calls in `report`, strip the (density, fallback) outputs the pass
    appended for `layers` (per layer, or stacked: passes/rewrite.py) and record them. copy_records: clone them
    first (CUDA graphs reuse their output buffers on the next replay)."""

    def run(*args: Any) -> Any:
        outs = compiled(*args)
        if not layers:
            report.calls[graph_index] = report.calls.get(graph_index, 0) + 1
            return outs
        cut = n_outputs if n_outputs is not None else 1  # the graph's own outputs come first
        records = [o.clone() for o in outs[cut:]] if copy_records else outs[cut:]
        report.record_call(graph_index, layers, records)
        kept = outs[:cut]
        return kept if n_outputs is not None else kept[0]

    return run


def backend(
    policy: str | Policy | Mapping[str, Any] | None = None,
    *,
    inner: str = "inductor",
    mode: str | None = None,
    inductor: Mapping[str, Any] | None = None,
    report: Report | None = None,
    debug: bool = False,
) -> SparseBackend:
    """The `sparse` backend as an object, validated now: `torch.compile(model, backend=sparse_compile.backend(
    policy="prism"), mode="reduce-overhead")`. Raises PolicyError naming a bad argument before any tracing.

    policy: shipped name, TOML path, mapping or Policy (default "dense"); inner: "inductor" | "eager";
    mode: one of MODES (or give it to torch.compile); inductor: Inductor config patches; report: a Report
    to fill (the backend's `.report` otherwise); debug: print graphs before/after the rewrite.
    """
    return SparseBackend(policy, inner=inner, mode=mode, inductor=inductor, report=report, debug=debug)


def compile(model: Any, policy: str | Policy | Mapping[str, Any] | None = None, *, inner: str = "inductor",
            mode: str | None = None, inductor: Mapping[str, Any] | None = None, report: Report | None = None,
            debug: bool = False, **compile_kwargs: Any) -> Any:
    """`torch.compile(model, backend=sparse_compile.backend(policy, ...), **compile_kwargs)` with its Report
    attached as `.sparse_report`. Validates everything first (PolicyError). report: a Report to fill (a new
    one otherwise); debug: print graphs before/after the rewrite; compile_kwargs: dynamic, fullgraph, ...
    (not backend/options/mode)."""
    for key in ("backend", "options"):
        if key in compile_kwargs:
            raise PolicyError(f"sparse_compile.compile: {key!r} is set by sparse_compile; give policy/inner/mode/"
                              "inductor instead")
    chosen = backend(policy, inner=inner, mode=mode, inductor=inductor, report=report, debug=debug)
    compiled = torch.compile(model, backend=chosen, **compile_kwargs)
    compiled.sparse_report = chosen.report
    return compiled
