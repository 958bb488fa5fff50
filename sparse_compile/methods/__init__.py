"""The attention methods a fused node can run, found by looking, not by a list.

Every module of this package that defines `METHOD = Method(...)` (sparse_compile.method) is a
method, registered under `METHOD.name`. Adding a method adds files; it edits none.

    registry()      {name: Method}, discovered once (the modules are imported on first use)
    METHODS         the same, as a read-only mapping (`"prism" in METHODS`, `METHODS["prism"]`)
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Iterator, Mapping

from sparse_compile.method import Method


@functools.cache
def registry() -> dict[str, Method]:
    """{name: Method} of every module in sparse_compile/methods/ that defines METHOD, sorted by name.

    Raises ValueError when two modules declare the same name, or METHOD is not a Method."""
    found: dict[str, Method] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        method = getattr(module, "METHOD", None)
        if method is None:
            continue
        if not isinstance(method, Method):
            raise ValueError(f"{module.__name__}.METHOD must be a sparse_compile.method.Method, got {type(method)}")
        if method.name in found:
            raise ValueError(f"two modules declare method {method.name!r}: {module.__name__} and an earlier one")
        found[method.name] = method
    return dict(sorted(found.items()))


class _Registry(Mapping[str, Method]):
    """A read-only view of `registry()` (discovery happens on first access, not at import)."""

    def __getitem__(self, name: str) -> Method:
        return registry()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(registry())

    def __len__(self) -> int:
        return len(registry())

    def __repr__(self) -> str:
        return f"METHODS({', '.join(registry())})"


METHODS: Mapping[str, Method] = _Registry()
