"""sparse_compile: a torch.compile backend that rewrites RoPE + SDPA attention into fused sparse nodes."""
