"""FX graph passes of sparse_compile (installed as `sparse_compile.passes`): find and rewrite attention sites."""
