"""Evaluation of attention policies on real models: perplexity and needle retrieval vs density.

    from sparse_compile.evaluation import EvalConfig, run_eval, write_outputs
    results = run_eval(EvalConfig(policies=("dense", "prism"), lengths=(2048, 4096)))
    write_outputs(results, Path("results/eval"))

CLI: `python -m sparse_compile eval --help`. Modules: corpus (offline texts), models (SmolLM2
GGUF / local HF models), perplexity, needle (RULER-style NIAH), policies (sweeps), runner,
output (markdown/JSON), plots (PNG).
"""

from sparse_compile.evaluation.output import markdown, write_outputs
from sparse_compile.evaluation.runner import EvalConfig, compile_with_policy, run_eval

__all__ = ["EvalConfig", "compile_with_policy", "markdown", "run_eval", "write_outputs"]
