"""`explain(model, *args, policy=...)`: what the backend would rewrite, without computing anything.

Dynamo captures the graph(s) exactly as `torch.compile` would; the pass runs on each; the
captured graphs are then executed on fake tensors only (shapes, no arithmetic), and the model
receives empty tensors of the right shapes as outputs. So `explain` costs a trace, not a
forward pass, even at 128K tokens.

Like `torch._dynamo.explain`, it calls `torch._dynamo.reset()` before and after capturing, so its
graphs never count against the recompile limit of models you compile yourself (those simply
recompile on their next call).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from sparse_compile.compiler import rewrite_graph
from sparse_compile.policy import Policy, load_policy
from sparse_compile.report import Report


def run_on_fake_tensors(gm: fx.GraphModule, n_outputs: int | None) -> Callable:
    """A stand-in for a compiled graph: propagates shapes on fake tensors, returns empty tensors for the graph's
    own n_outputs (None: one) outputs, without the records the pass appended."""

    def run(*args: Any) -> Any:
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with mode:
            outs = gm(*fake_args)
        outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
        outs = outs[: n_outputs if n_outputs is not None else 1]
        real = [
            torch.empty(o.shape, dtype=o.dtype, device=o.device) if isinstance(o, torch.Tensor) else o for o in outs
        ]
        return real if n_outputs is not None else real[0]

    return run


def explain(model: Any, *args: Any, policy: str | Policy | None = None, **kwargs: Any) -> Report:
    """Capture `model(*args, **kwargs)`'s graphs, run the attention pass, compute nothing.

    Returns a Report: `.sites` (one per rewritten attention call, with layer, phase, RoPE layout,
    rotary_dim, heads, head_dim, mask, method, ...), `.rejected` (calls left alone, with the
    reason), `.graphs`; `str(report)` is a table. Runs under `torch.no_grad()`.
    """
    chosen = load_policy(policy)
    report = Report()
    report.policy = f"{chosen.name} ({chosen.fingerprint()})"
    report.warning = chosen.warning

    def backend(gm: fx.GraphModule, example_inputs: list) -> Callable:
        gm, n_outputs, layers = rewrite_graph(gm, example_inputs, chosen, report)
        return run_on_fake_tensors(gm, n_outputs)

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            torch.compile(model, backend=backend)(*args, **kwargs)
    finally:
        torch._dynamo.reset()
    if not report.graphs:
        report.notes.append("dynamo captured no graph (the call ran eagerly): nothing could be rewritten")
    if kwargs.get("use_cache") is False or "position_ids" in kwargs:
        report.notes.append(
            "traced with " + " and ".join(k for k in ("use_cache=False", "position_ids") if
                                          (k == "position_ids" and k in kwargs) or (k == "use_cache=False"
                                          and kwargs.get("use_cache") is False))
            + ": model(ids) and generate() build their masks differently; explain(model, ids) shows the usual call")
    return report
