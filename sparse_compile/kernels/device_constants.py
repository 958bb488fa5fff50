"""Small constant tables (index lists, masks) for kernels, built once on the host and copied per call.

Under `mode="reduce-overhead"` a compiled graph's first call is a warm-up run whose allocations go to the
graph's private memory pool. A device tensor memoised during that run stays alive inside the pool and
fails its check ("tensors in the cudagraph pool not tracked as outputs"); memoising it on the device is
therefore wrong. Instead the table is memoised on the host, page-locked when CUDA is available, and each
call copies it to the device asynchronously: a captured graph records that copy (a host-to-device memcpy
node reading the same page-locked memory at every replay), and the device copy is an ordinary temporary.
"""

from __future__ import annotations

import torch
from torch import Tensor


def host_constant(table: Tensor) -> Tensor:
    """`table` (a CPU tensor) ready for `on_device`: page-locked when CUDA is available. Memoise the result."""
    return table.pin_memory() if torch.cuda.is_available() else table


def on_device(table: Tensor, device: str | torch.device) -> Tensor:
    """A host constant from `host_constant` on `device`: the table itself on the CPU, else a fresh
    asynchronous copy (capturable in a CUDA graph, as the table is page-locked and kept alive)."""
    device = torch.device(device)
    if device.type == "cpu":
        return table
    return table.to(device, non_blocking=True)
