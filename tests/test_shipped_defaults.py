"""The shipped name-only policies that claim to be safe (`dense`, `prism`, `fasa`) meet the quality budget of
issue 35 on the real SmolLM2-135M-Instruct (CPU, fp32), on a reduced grid: the checks `eval` prints
(`sparse_compile.evaluation.budget`), on numbers measured here against the eager model.

Per policy, one RULER-style needle prompt (`evaluation.needle`, depth 0.5, `licenses` text) of a length >=
each of its phases' `min_seq_len` (nothing in the shipped file is lowered: GRID), run through the compiled
model as the eager model runs it: a prefill, then (decode methods) the prompt's last tokens fed as decode
steps, then the answer decoded greedily. Checked:
  * the needle eager finds is still found;
  * ΔPPL <= 1%: the prefill window's (whole window: every token's output is computed) and, for a decode
    method, that of the tokens fed as decode steps;
  * the method really ran: the Report's density of its phase is < 1 and within the budget's limit (prefill
    block density <= 0.75, decode kept fraction <= 0.5), and no layer fell back to exact attention but those
    the policy lists as dense; the dense policy equals eager bit for bit.
`pbs-lossy`, `lessismore-lossy` and `token_sparse-lossy` are measured to fail this budget (EVAL.md) and say so.

Cost on 2 CPU cores, several minutes (the test is slow): the model load (~20 s), two dynamo traces of the
30-layer model per policy (prefill, decode: ~10 s each) and Prism's CPU path at 4K (its PyTorch reference
attends every query block to all keys: ~1 s per layer against SDPA's 0.15 s). After the prefill the cache's
length is marked dynamic, so the decode steps share one graph (the one `generate` reaches from its second
step on) instead of tracing a static first-step graph too.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cache_keyword import CACHE_ARG

import sparse_compile
from sparse_compile.evaluation import needle as niah
from sparse_compile.evaluation.budget import NA, PASS, budget_check
from sparse_compile.evaluation.corpus import load_corpus, tokenize
from sparse_compile.evaluation.models import load_model, smollm2_gguf_path
from sparse_compile.evaluation.runner import compare_niah, compile_with_policy
from sparse_compile.layers import in_layers
from sparse_compile.report import Report

pytestmark = pytest.mark.slow

DEPTH = 0.5
ANSWER_TOKENS = 9  # the answer's first tokens: the 7 digits of the value and what surrounds them
# Prompt length and decode steps per policy: lengths >= each phase's min_seq_len (prism 4096, fasa's decode
# 4096). FASA keeps 2048 tokens: at 4608 cached tokens 44% (the job check's <= 0.5 with layer 0 dense). The
# share-of-the-cache rule it replaced (25%) measured +2.6% to +4.5% dPPL over 64 steps of 2K and 4K needle
# prompts (EVAL.md), 2048 tokens +0.0% to +0.6% on the same prompts.
GRID = {"dense": (1024, 0), "prism": (4096, 0), "fasa": (4672, 64)}

@pytest.fixture(scope="module")
def smollm2():
    """(model, tokenizer, corpus ids, eager results by prompt length): SmolLM2-135M-Instruct in fp32, the
    `licenses` corpus (on every Debian system) and a cache of the eager model's runs."""
    try:
        smollm2_gguf_path()
    except Exception as err:
        pytest.fail(f"{err} (scripts/install.sh installs it)")
    model, tokenizer = load_model("smollm2")
    return model, tokenizer, tokenize(tokenizer, load_corpus("licenses").text), {}


def mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def layer_mean(report: Report, phase: str) -> float | None:
    return mean(report.layer_density(phase).values())


def decode_step(model, token: int, cache):
    return model(input_ids=torch.tensor([[token]]), **{CACHE_ARG: cache}, use_cache=True)


def prefill(model, config, ids: torch.Tensor):
    """(output, cache, per-token NLL of the window) of one prefill of `ids` through a DynamicCache; the cache's
    length is then marked dynamic (one decode graph for every step)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    out = model(input_ids=ids[None], **{CACHE_ARG: cache}, use_cache=True)
    nll = F.cross_entropy(out.logits[0, :-1].float(), ids[1:], reduction="none")
    for layer in cache.layers:
        torch._dynamo.maybe_mark_dynamic(layer.keys, 2)
        torch._dynamo.maybe_mark_dynamic(layer.values, 2)
    return out, cache, nll


def needle_run(model, tokenizer, ids: torch.Tensor, steps: int, report: Report | None = None) -> dict:
    """The needle prompt through `model`: a prefill of all but its last `steps` tokens (the prefill window's
    NLL and density), those tokens fed as decode steps (teacher forcing: their NLL), then the answer decoded
    greedily (mean decode density over every decode step)."""
    config = model.config
    eos = niah.eos_token_ids(tokenizer, config)
    densities, logits = [], []
    split = ids.numel() - steps
    with torch.no_grad():
        out, cache, nll = prefill(model, config, ids[:split])
        density = layer_mean(report, "prefill") if report is not None else None
        for t in range(split, ids.numel()):
            logits.append(out.logits[0, -1])
            out = decode_step(model, int(ids[t]), cache)
            densities.append(layer_mean(report, "decode") if report is not None else None)
        answer = []
        for step in range(ANSWER_TOKENS):
            answer.append(int(out.logits[0, -1].argmax()))
            if answer[-1] in eos or step == ANSWER_TOKENS - 1:
                break
            out = decode_step(model, answer[-1], cache)
            densities.append(layer_mean(report, "decode") if report is not None else None)
    step_nll = F.cross_entropy(torch.stack(logits).float(), ids[split:], reduction="none") if steps else None
    text = tokenizer.decode(answer, skip_special_tokens=True)
    return {"nll": nll, "step_nll": step_nll, "answer": answer, "text": text, "prefill_density": density,
            "decode_density": mean(densities)}


def ppl(nll: torch.Tensor) -> float:
    return float(nll.double().mean().exp())


def dppl_pct(nll: torch.Tensor, eager_nll: torch.Tensor) -> float:
    return 100.0 * (ppl(nll) / ppl(eager_nll) - 1.0)


@pytest.mark.parametrize("name", list(GRID))
def test_shipped_default_is_within_the_budget(smollm2, name):
    model, tokenizer, corpus, eager_runs = smollm2
    policy = sparse_compile.load_policy(name)
    assert not policy.warning, f"{name} carries a warning: it does not claim to be safe"
    length, steps = GRID[name]
    assert length - steps >= policy.prefill.min_seq_len and length - steps > policy.decode.min_seq_len
    assert steps or policy.decode.method == "dense", "a decode method is judged on its decode steps"
    sample = niah.make_sample(tokenizer, corpus, length, DEPTH)
    needle_ids = torch.tensor(sample.input_ids)

    if (length, steps) not in eager_runs:
        eager_runs[length, steps] = needle_run(model, tokenizer, needle_ids, steps)
    eager = eager_runs[length, steps]
    assert niah.score(eager["text"], sample.value) == 1.0, f"eager misses the needle {sample.value}: {eager['text']!r}"

    report = Report()
    compiled = compile_with_policy(model, policy, report)
    got = needle_run(compiled, tokenizer, needle_ids, steps, report)
    fallbacks = {phase: report.fallbacks(phase) for phase in ("prefill", "decode")}
    assert len({s.layer for s in report.sites}) == model.config.num_hidden_layers, str(report)
    torch._dynamo.reset()

    run = {"label": name, "policy": policy.to_dict(), "warning": policy.warning,
           "ppl": {str(length): {"dppl_pct": dppl_pct(got["nll"], eager["nll"]),
                                 "mean_density": got["prefill_density"]}}}
    if steps:
        run["decode"] = {str(length): {"dppl_pct": dppl_pct(got["step_nll"], eager["step_nll"]),
                                       "mean_density": got["decode_density"]}}
    row = {"length": length, "depth": DEPTH, "index": 0, "value": sample.value}
    found = {**row, "answer": got["text"], "score": niah.score(got["text"], sample.value)}
    run["niah"] = {"samples": [found], "mean_density": got["prefill_density"],
                   "decode_mean_density": got["decode_density"],
                   "vs_eager": compare_niah([{**row, "answer": eager["text"], "score": 1.0}], [found])}
    budget = budget_check(run, {"lengths": [length], "niah_lengths": [length]})
    detail = "; ".join(f"{c['check']} {c['status']}: {c['reason']}" for c in budget["checks"])
    print(f"\n{name} L={length}: {detail}; answer {got['text']!r} (eager {eager['text']!r})")
    # every check measured and passed; the dense policy has no job to check (exact attention)
    assert {c["check"]: c["status"] for c in budget["checks"]} == {
        "needles": PASS, "dppl": PASS, "job": NA if name == "dense" else PASS}, detail
    densities = {"prefill": got["prefill_density"], "decode": got["decode_density"]}
    for phase in ("prefill", "decode"):  # the method really ran: density < 1, no layer fell back
        if policy.phase(phase).method == "dense":
            continue
        assert densities[phase] is not None and densities[phase] < 1.0, (phase, densities[phase])
        listed_dense = getattr(policy.phase(phase).params, "dense_layers", ())
        assert all(in_layers(layer, listed_dense) for layer in fallbacks[phase]), fallbacks[phase]
    if name == "dense":
        assert densities == {"prefill": 1.0, "decode": 1.0}
        assert torch.equal(got["nll"], eager["nll"]) and got["answer"] == eager["answer"]
