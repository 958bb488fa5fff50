"""Triton kernels of sparse_compile, each with the PyTorch reference it must equal."""

from sparse_compile.kernels.block_mask import BlockList
from sparse_compile.kernels.block_sparse_attention import (
    block_sparse_attention,
    block_sparse_attention_reference,
)

__all__ = ["BlockList", "block_sparse_attention", "block_sparse_attention_reference"]
