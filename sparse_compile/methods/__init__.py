"""The attention methods a fused node can run, by name.

Each method module exposes:
  PHASES: tuple of the phases it runs in ("prefill", "decode").
  Params: a frozen dataclass of its parameters (see sparse_compile.params).
  attention(q, k, v, mask, site, params, scale) -> (out (B, H, Lq, D), density (B, H) float32).
"""

from __future__ import annotations

from types import ModuleType

from sparse_compile.methods import dense, prism

METHODS: dict[str, ModuleType] = {"dense": dense, "prism": prism}
