"""Triton kernels of sparse_compile (installed as `sparse_compile.kernels`), each with its reference."""

if __name__ != "sparse_compile.kernels":
    # Imported as a top-level `kernels` because a clone's root is on sys.path (`python -m ...` run from
    # it). transformers probes for the Hugging Face package named `kernels` and imports whatever has that
    # name; looking like an empty namespace package (no __file__, no __version__) makes it conclude the
    # package is absent instead of trying to load hub kernels from here.
    __file__ = None  # noqa: A001
else:
    from sparse_compile.kernels.block_mask import BlockList
    from sparse_compile.kernels.block_sparse_attention import (
        block_sparse_attention,
        block_sparse_attention_reference,
    )

    __all__ = ["BlockList", "block_sparse_attention", "block_sparse_attention_reference"]
