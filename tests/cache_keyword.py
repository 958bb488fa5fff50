"""The keyword the installed transformers' models take a KV cache by, for the tests' direct forward and generate calls:
`cache` where transformers renamed `past_key_values` (5.25 warns, 5.40 removes it), `past_key_values` before."""

from transformers import LlamaForCausalLM

from sparse_compile.cache import cache_argument, returned_cache  # noqa: F401 - re-exported for the tests

CACHE_ARG = cache_argument(LlamaForCausalLM)
