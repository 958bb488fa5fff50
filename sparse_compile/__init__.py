"""sparse_compile: a torch.compile backend that rewrites RoPE + SDPA attention into fused sparse nodes.

    fast = torch.compile(model, backend="sparse", options={"policy": "prism"})
    fast = torch.compile(model, backend=sparse_compile.backend(policy="prism"), mode="reduce-overhead")
    fast = sparse_compile.compile(model, "prism")                  # fast.sparse_report: what ran
    report = sparse_compile.explain(model, input_ids, policy="prism")
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sparse_compile.compiler import MODES, SparseBackend
from sparse_compile.explain import explain
from sparse_compile.params import PolicyError
from sparse_compile.policy import Policy, load_policy, shipped_policies
from sparse_compile.report import Report, Site

__all__ = ["MODES", "Policy", "PolicyError", "Report", "Site", "backend", "compile", "explain", "load_policy",
           "shipped_policies"]


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
            mode: str | None = None, inductor: Mapping[str, Any] | None = None, **compile_kwargs: Any) -> Any:
    """`torch.compile(model, backend=sparse_compile.backend(policy, ...), **compile_kwargs)` with its Report
    attached as `.sparse_report`. Validates everything first (PolicyError). compile_kwargs: dynamic,
    fullgraph, ... (not backend/options/mode)."""
    import torch

    for key in ("backend", "options"):
        if key in compile_kwargs:
            raise PolicyError(f"sparse_compile.compile: {key!r} is set by sparse_compile; give policy/inner/mode/"
                              "inductor instead")
    chosen = backend(policy, inner=inner, mode=mode, inductor=inductor)
    compiled = torch.compile(model, backend=chosen, **compile_kwargs)
    compiled.sparse_report = chosen.report
    return compiled
