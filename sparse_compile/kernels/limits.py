"""What the Triton kernels take: one home for the head_dim and dtype limits every launcher and method asks.

    MAX_HEAD_DIM    largest head_dim a kernel tile holds (256: Gemma's, and the largest real models use)
    KERNEL_DTYPES   dtypes the kernels compute in (float64 runs the PyTorch references)
    kernel_unsupported(head_dim, dtype)  the reason a kernel cannot take a call, or None
    triton_interpreting()  whether Triton runs kernels on the CPU (TRITON_INTERPRET=1, the tests' setting)
"""

from __future__ import annotations

import os

import torch

MAX_HEAD_DIM = 256
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def kernel_unsupported(head_dim: int, dtype: torch.dtype) -> str | None:
    """Why the Triton kernels cannot take this head_dim or dtype (the callers' fallback reason), or None."""
    if head_dim > MAX_HEAD_DIM:
        return f"head_dim {head_dim} > {MAX_HEAD_DIM}"
    if dtype not in KERNEL_DTYPES:
        return f"dtype {dtype} on CUDA (float16, bfloat16 or float32)"
    return None


def triton_interpreting() -> bool:
    """Whether Triton's interpreter runs the kernels (TRITON_INTERPRET=1): launchers then accept CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
