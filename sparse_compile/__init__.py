"""sparse_compile: a torch.compile backend that rewrites RoPE + SDPA attention into fused sparse nodes.

    fast = torch.compile(model, backend="sparse", options={"policy": "prism"})
    fast = torch.compile(model, backend=sparse_compile.backend(policy="prism"), mode="reduce-overhead")
    fast = sparse_compile.compile(model, "prism")                  # fast.sparse_report: what ran
    report = sparse_compile.explain(model, input_ids, policy="prism")
    cache = sparse_compile.SparseCache(model, max_cache_len=8192, policy="fasa")
    model.generate(**inputs, **sparse_compile.cache_kwargs(model, cache))  # cache= / past_key_values=
"""

from __future__ import annotations

import importlib
from typing import Any

# Public names and the module that defines each. Resolved on first use (PEP 562), so importing a
# submodule (`sparse_compile.kernels.prism`, say) does not load the compiler, the methods and the passes.
_PUBLIC = {
    "MODES": "sparse_compile.compiler",
    "backend": "sparse_compile.compiler",
    "compile": "sparse_compile.compiler",
    "explain": "sparse_compile.explain_graphs",
    "PolicyError": "sparse_compile.params",
    "Policy": "sparse_compile.policy",
    "load_policy": "sparse_compile.policy",
    "shipped_policies": "sparse_compile.policy",
    "Report": "sparse_compile.report",
    "Site": "sparse_compile.report",
    "SparseCache": "sparse_compile.cache",
    "cache_kwargs": "sparse_compile.cache",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'sparse_compile' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
