"""GPU smoke check of the compiled paths: a small random Llama in bf16 on CUDA, compiled with the
dense and prism policies, with and without mode="reduce-overhead"; logits vs eager and the report.

    python scripts/gpu_smoke.py
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import sparse_compile


def main() -> None:
    cfg = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, 1000, (2, 2048), device="cuda")
    prism = {"name": "prism-smoke", "prefill": {"method": "prism", "min_seq_len": 0, "params": {"block_size": 64}}}
    pbs_exact = {"name": "pbs-exact", "prefill": {"method": "pbs", "min_seq_len": 0, "params": {"threshold": 1.0}}}
    pbs = {"name": "pbs-smoke", "prefill": {"method": "pbs", "min_seq_len": 0}}
    with torch.no_grad():
        ref = model(ids).logits.float()
        for policy in ("dense", prism, pbs_exact, pbs):
            for mode in (None, "reduce-overhead"):
                torch._dynamo.reset()
                fast = sparse_compile.compile(model, policy, mode=mode)
                for _ in range(3):
                    torch.compiler.cudagraph_mark_step_begin()
                    out = fast(ids).logits.float()
                err = (out - ref).abs().max().item()
                name = policy if isinstance(policy, str) else policy["name"]
                print(f"policy {name} mode {mode}: max |compiled - eager| logits {err:.4f}, "
                      f"mean density {fast.sparse_report.mean_density('prefill')}, "
                      f"fallbacks {fast.sparse_report.fallbacks('prefill')}")
                if mode is None:
                    print(fast.sparse_report)


if __name__ == "__main__":
    main()
