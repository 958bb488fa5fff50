"""Where and in what precision an evaluation runs: `--device cpu|cuda` and `--dtype fp32|bf16|fp16`.

    device = resolve_device("cuda")   # torch.device; ValueError naming the problem when there is no GPU
    dtype = resolve_dtype("bf16")     # torch.bfloat16

The CPU in float32 is the reference: numbers from any other device/dtype are compared against it
in EVAL.md, and the eager baseline is cached separately per (device, dtype).
"""

from __future__ import annotations

from typing import Any

import torch

DEVICES = ("cpu", "cuda")
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float": "fp32"}


def default_device() -> str:
    """"cuda" when a CUDA GPU is available, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(name: str | None) -> torch.device:
    """`cpu`, `cuda` or `cuda:N` (None: `default_device()`); ValueError when it is not usable here."""
    text = (name or default_device()).strip().lower()
    kind, _, index = text.partition(":")
    if kind not in DEVICES or (index and (kind != "cuda" or not index.isdigit())):
        raise ValueError(f"device {name!r}: choose cpu or cuda (or cuda:N)")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: no CUDA GPU is available here (torch {torch.__version__}); "
                             "use --device cpu")
        if index and int(index) >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return torch.device(text)


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype:
    """fp32 (default), bf16 or fp16 (also float32/bfloat16/float16/half); ValueError otherwise."""
    if isinstance(name, torch.dtype):
        if name in DTYPES.values():
            return name
        raise ValueError(f"dtype {name}: choose {', '.join(DTYPES)}")
    text = (name or "fp32").strip().lower()
    text = DTYPE_ALIASES.get(text, text)
    if text not in DTYPES:
        raise ValueError(f"dtype {name!r}: choose {', '.join(DTYPES)}")
    return DTYPES[text]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bf16" (the short names the CLI takes)."""
    return {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype).removeprefix("torch."))


def device_description(device: torch.device) -> dict[str, Any]:
    """What the results header records about the device: kind, GPU name and capability, CUDA version."""
    info: dict[str, Any] = {"device": str(device)}
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        info.update({"gpu": props.name, "capability": f"{props.major}.{props.minor}",
                     "gpu_memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda})
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:  # pragma: no cover - triton is a dependency
            pass
    return info


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (so wall times measure the work, not its launch)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
