"""Triton kernels of sparse_compile (installed as `sparse_compile.kernels`), each with its reference."""

from sparse_compile.kernels.block_mask import BlockList
from sparse_compile.kernels.block_sparse_attention import (
    block_sparse_attention,
    block_sparse_attention_reference,
)

__all__ = ["BlockList", "block_sparse_attention", "block_sparse_attention_reference"]
