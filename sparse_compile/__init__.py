"""sparse_compile: a torch.compile backend that rewrites RoPE + SDPA attention into fused sparse nodes.

    fast = torch.compile(model, backend="sparse", options={"policy": "prism"})
    report = sparse_compile.explain(model, input_ids, policy="prism")
"""

from __future__ import annotations

from typing import Any

from sparse_compile.explain import explain
from sparse_compile.params import PolicyError
from sparse_compile.policy import Policy, load_policy, shipped_policies
from sparse_compile.report import Report, Site

__all__ = ["Policy", "PolicyError", "Report", "Site", "compile", "explain", "load_policy", "shipped_policies"]


def compile(model: Any, policy: Any = None, *, inner: str = "inductor", **compile_kwargs: Any) -> Any:
    """`torch.compile(model, backend="sparse", ...)` with a fresh Report attached as `.sparse_report`."""
    import torch

    report = Report()
    compiled = torch.compile(
        model, backend="sparse", options={"policy": load_policy(policy), "inner": inner, "report": report},
        **compile_kwargs,
    )
    compiled.sparse_report = report
    return compiled
