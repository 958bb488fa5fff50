"""backend="sparse" under tensor parallelism: transformers shards the attention heads across processes
(`tp_plan="auto"`, DTensor underneath), each process compiles its own graph, and the backend rewrites every
attention site with the heads that process holds.

    torchrun --nproc-per-node 2 examples/tensor_parallel.py                       # tiny random Llama, CPU or GPUs
    torchrun --nproc-per-node 2 examples/tensor_parallel.py --policy demo:lessismore --compare
    torchrun --nproc-per-node 4 examples/tensor_parallel.py --model PATH --policy prism --prompt-len 8192
    torchrun --nproc-per-node 3 examples/tensor_parallel.py --model M.gguf --policy examples/lessismore_512.toml \
        --compare --text /usr/share/common-licenses/GPL-3 --prompt-len 2048 --new-tokens 16

torchrun starts the processes; transformers initialises torch.distributed on the first `from_pretrained`
(gloo on the CPU, nccl on CUDA GPUs, one GPU per process). Each rank compiles `model.forward` with
backend="sparse", generates a few tokens (the same on every rank: the logits are gathered), and prints its
report: H and Hkv in the table are the rank's own heads. Nothing crosses processes inside an attention node,
so a method that shares or averages across heads (LessIsMore's one token set, Token Sparse's head-mean
scores) does it over the rank's heads: its output can differ from a single process's. `--compare` scores a
teacher-forced continuation with the sharded model and, on rank 0, with the unsharded one under the same
policy and eagerly, and prints the perplexities and how far the logits moved.

The model's heads and KV heads must divide by the number of processes: transformers loads any plan, but a
model with 1.5 KV heads per process fails in its own attention (`.view`), eagerly and compiled alike.
SmolLM2-135M (9 heads / 3 KV heads) therefore shards on 3 processes, not on 2.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import sparse_compile
from sparse_compile.cache import cache_kwargs, returned_cache

# Each method with min_seq_len 0 and small blocks, so that it runs on the tiny model's short prompt.
DEMO = {
    "prism": {"prefill": {"method": "prism", "min_seq_len": 0,
                          "params": {"block_size": 64, "threshold_high": 0.5, "threshold_low": 0.5}}},
    "pbs": {"prefill": {"method": "pbs", "min_seq_len": 0,
                        "params": {"block_size": 16, "segment_size": 32, "threshold": 0.3}}},
    "token_sparse": {"prefill": {"method": "token_sparse", "min_seq_len": 0,
                                 "params": {"dropped_mass": 0.2, "min_keep": 16, "recent": 16}}},
    "fasa": {"decode": {"method": "fasa", "min_seq_len": 0, "params": {"budget": 0.5, "dense_layers": []}}},
    "lessismore": {"decode": {"method": "lessismore", "min_seq_len": 0,
                              "params": {"budget": 32, "selection_layers": [0], "dense_layers": []}}},
}


# The prompt perplexity scores the prompt's last SCORED tokens: queries every prefill method keeps (Token
# Sparse's `recent`; its dropped rows are zeros by design, as in EVAL.md's continuation PPL).
SCORED = 128


def policy_of(name: str):
    """A policy sparse_compile accepts (shipped name, TOML path), or `demo:<method>` (DEMO)."""
    if name.startswith("demo:"):
        method = name.removeprefix("demo:")
        if method not in DEMO:
            raise SystemExit(f"--policy {name}: demo methods are {', '.join(DEMO)}")
        return {"name": name, **DEMO[method]}
    return name


def tiny_llama(folder: str) -> str:
    """A random 2-layer Llama (8 heads / 4 KV heads of 16 dims, sharp attention), the same on every rank
    (fixed seed), saved to `folder`."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256,
                                         num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
                                         head_dim=16, max_position_embeddings=1024))
    with torch.no_grad():
        for layer in model.model.layers:  # random weights attend almost uniformly: sharpen q.k
            layer.self_attn.q_proj.weight.mul_(6.0)
            layer.self_attn.k_proj.weight.mul_(6.0)
    model.save_pretrained(folder)
    return folder


def load(path: str, world: int, sharded: bool):
    """The model (a folder, or a .gguf file: dequantized to float32), its heads sharded over the `world`
    processes by transformers' own plan (or whole)."""
    kwargs = {"dtype": torch.float32}
    if path.endswith(".gguf"):
        path, kwargs["gguf_file"] = os.path.split(path)
    if sharded:  # transformers >= 5.2x: distributed_config; earlier 5.x: tp_plan="auto"
        if hasattr(transformers, "DistributedConfig"):
            kwargs["distributed_config"] = transformers.DistributedConfig(tp_size=world)
        else:
            kwargs["tp_plan"] = "auto"
    return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


def in_rank_order(rank: int, world: int, text: str) -> None:
    """Print `text` from every rank, rank 0 first."""
    for r in range(world):
        if r == rank:
            print(text, flush=True)
        dist.barrier()


def prompt_ids(args, path: str, vocab: int) -> torch.Tensor:
    """(1, prompt_len + new_tokens) token ids: the start of --text (tokenized by the model's tokenizer), or
    random ids (the same on every rank)."""
    n = args.prompt_len + args.new_tokens
    if not args.text:
        return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(0))
    folder, gguf = os.path.split(path) if path.endswith(".gguf") else (path, None)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    ids = tokenizer(open(args.text, errors="ignore").read(), return_tensors="pt").input_ids
    if ids.shape[1] < n:
        raise SystemExit(f"--text {args.text} has {ids.shape[1]} tokens, fewer than {n}")
    return ids[:, :n]


def score(model, ids: torch.Tensor, prompt_len: int) -> tuple[list[torch.Tensor], float, float]:
    """Teacher-forced: prefill ids[:, :prompt_len], then one decode step per following token (DynamicCache).
    Returns (the logits of every step, prompt perplexity (the prefill's predictions of the prompt's last
    SCORED tokens), continuation perplexity (the decode steps', each predicting the next token))."""
    out = model(ids[:, :prompt_len].clone(memory_format=torch.contiguous_format), use_cache=True)
    logits = [out.logits[:, -1]]
    first = max(prompt_len - SCORED, 1)
    prompt_nll = torch.nn.functional.cross_entropy(out.logits[0, first - 1:-1].float(), ids[0, first:prompt_len])
    nll = [torch.nn.functional.cross_entropy(out.logits[0, -1:].float(), ids[0, prompt_len:prompt_len + 1])]
    for t in range(prompt_len, ids.shape[1] - 1):
        # a fresh contiguous tensor, as generate() passes: a view's storage offset or stride would become a
        # symbolic input of the decode graph, which DTensor's sharding propagation cannot hash (torch 2.13)
        token = ids[:, t:t + 1].clone(memory_format=torch.contiguous_format)
        out = model(token, **cache_kwargs(model, returned_cache(out)), use_cache=True)
        logits.append(out.logits[:, -1])
        nll.append(torch.nn.functional.cross_entropy(out.logits[0, -1:].float(), ids[0, t + 1:t + 2]))
    return logits, float(prompt_nll.exp()), float(torch.stack(nll).mean().exp())


def densities(report: sparse_compile.Report) -> str:
    """'mean density prefill x, decode y' of the latest calls (over layers, batch and heads)."""
    means = {phase: report.mean_density(phase) for phase in ("prefill", "decode")}
    return "mean density " + ", ".join(f"{phase} {'-' if m is None else f'{m:.3f}'}" for phase, m in means.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a local model folder (save_pretrained output) or .gguf file; default: a "
                                        "tiny random Llama made on each rank")
    parser.add_argument("--policy", default="demo:token_sparse",
                        help="shipped policy name, TOML path, or demo:<method> (the method at min_seq_len 0: "
                             f"{', '.join(DEMO)}); default demo:token_sparse")
    parser.add_argument("--prompt-len", type=int, default=256, help="prompt tokens (default 256)")
    parser.add_argument("--new-tokens", type=int, default=8, help="tokens to generate (default 8)")
    parser.add_argument("--inner", default="auto", choices=["auto", "inductor", "eager"],
                        help="compiler after the rewrite (auto: inductor on CUDA, eager on CPU)")
    parser.add_argument("--compare", action="store_true",
                        help="instead of generating, score --new-tokens teacher-forced continuation tokens with the "
                             "sharded model and (on rank 0) the unsharded one, same policy, and with the unsharded "
                             "eager model: perplexities and the largest logits difference")
    parser.add_argument("--text", help="with --compare: a text file whose start is the prompt and continuation "
                                       "(default: random tokens)")
    args = parser.parse_args()
    if "RANK" not in os.environ:
        raise SystemExit("start it with torchrun: torchrun --nproc-per-node 2 examples/tensor_parallel.py")
    world = int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    with tempfile.TemporaryDirectory() as scratch:
        path = args.model or tiny_llama(scratch)
        model = load(path, world, sharded=True)  # initialises torch.distributed (gloo on CPU, nccl on CUDA)
        rank = dist.get_rank()
        device = next(model.parameters()).device
        inner = args.inner if args.inner != "auto" else ("inductor" if device.type == "cuda" else "eager")
        ids = prompt_ids(args, path, model.config.vocab_size).to(device)
        prompt = ids[:, :args.prompt_len]

        report = sparse_compile.Report()
        # compile forward, as transformers documents for generate(); each rank traces its own shard
        model.forward = torch.compile(model.forward, backend=sparse_compile.backend(
            policy=policy_of(args.policy), inner=inner, report=report))
        with torch.no_grad():
            if not args.compare:
                out = model.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False, disable_compile=True)
                text = [f"=== rank {rank} of {world} ({device}): generated {out[0, args.prompt_len:].tolist()}"]
            else:
                logits, prompt_ppl, ppl = score(model, ids, args.prompt_len)
                text = [f"=== rank {rank} of {world} ({device}): sharded, {args.policy}: prompt perplexity "
                        f"{prompt_ppl:.4f}, continuation perplexity {ppl:.4f}; {densities(report)}"]
        text.append(str(report))
        if args.compare and rank == 0:  # the unsharded model is the same on every rank: rank 0 runs it
            whole = load(path, world, sharded=False).to(device)
            whole_report = sparse_compile.Report()
            with torch.no_grad():
                _, eager_prompt_ppl, eager_ppl = score(whole, ids, args.prompt_len)
                whole.forward = torch.compile(whole.forward, backend=sparse_compile.backend(
                    policy=policy_of(args.policy), inner=inner, report=whole_report))
                ref, ref_prompt_ppl, ref_ppl = score(whole, ids, args.prompt_len)
            diff = max(float((a - b).abs().max()) for a, b in zip(logits, ref, strict=True))
            agree = sum(int(a.argmax() == b.argmax()) for a, b in zip(logits, ref, strict=True))
            text.append(f"unsharded, {args.policy}: prompt perplexity {ref_prompt_ppl:.4f}, continuation perplexity "
                        f"{ref_ppl:.4f}; largest |logits difference| to the sharded model {diff:.3g}, same argmax "
                        f"at {agree}/{len(ref)} steps; {densities(whole_report)}")
            text.append(f"unsharded, eager (exact): prompt perplexity {eager_prompt_ppl:.4f}, continuation perplexity "
                        f"{eager_ppl:.4f}")
        in_rank_order(rank, world, "\n".join(text))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
