"""Tensor parallelism on the CPU: two gloo processes shard the attention heads of a tiny Llama and a tiny
Qwen3 with transformers' own plan (`from_pretrained(..., tp_plan="auto")`, DTensor underneath).

On each rank the backend rewrites both attention sites with the rank's local heads (H/2 = 2, Hkv/2 = 1,
the GQA ratio kept); the compiled dense model equals the eager one; and every sparse method's node output
equals the method run in this process on the same local heads: on the node's own inputs (no collective,
no state shared across ranks), and on the head slice of a single-process model's inputs wherever those
are the same tensors (the layers that nothing the method changed upstream reaches). Methods that share
or average across heads (LessIsMore's one token set, Token Sparse's head-mean scores) therefore compute
over the rank's local heads: a tensor-parallel run is not bit-identical to one process for them.

One spawn of two ranks serves every test (a module fixture); the ranks record what they saw and this
process asserts. The ranks are joined with a deadline and killed past it, so the file cannot hang.
"""

from __future__ import annotations

import os
import socket
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from cache_keyword import CACHE_ARG, returned_cache
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

import sparse_compile
from sparse_compile.ops import RAN, node_call_of, parse_config, run_node, run_node_sharing

WORLD = 2
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16
PROMPT_LEN = 200
DECODE_TOKENS = (5,)  # teacher-forced: every run, sharded or not, sees the same sequence
DEADLINE_S = 300  # the whole file takes ~65 s of CPU time (2 ranks + this process: 10 + 6 dynamo traces)

FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}

# min_seq_len 0 and small blocks, so that every sparse method runs on a 200-token prompt; two policies hold
# the five methods (each compile costs seconds of dynamo tracing on a CPU)
POLICIES = {
    "dense": "dense",
    "prism-pbs-lessismore": {
        "name": "tp-prism-pbs-lessismore",
        "prefill": {"method": "prism", "min_seq_len": 0,
                    "params": {"block_size": 64, "threshold_high": 0.5, "threshold_low": 0.5},
                    "overrides": [{"layers": [1], "method": "pbs",
                                   "params": {"block_size": 16, "segment_size": 32, "threshold": 0.3}}]},
        "decode": {"method": "lessismore", "min_seq_len": 0,
                   "params": {"budget": 32, "selection_layers": [0], "dense_layers": []}},
    },
    "token_sparse-fasa": {
        "name": "tp-token-sparse-fasa",
        "prefill": {"method": "token_sparse", "min_seq_len": 0,
                    "params": {"dropped_mass": 0.2, "min_keep": 16, "recent": 16}},
        "decode": {"method": "fasa", "min_seq_len": 0, "params": {"budget": 0.5, "dense_layers": []}},
    },
}
# Qwen3 (q/k norm before RoPE) runs the per-head prefill methods and LessIsMore; Token Sparse and FASA run on
# Llama only: each policy costs each process two dynamo traces of a few CPU seconds
FAMILY_POLICIES = {"llama": list(POLICIES), "qwen3": ["dense", "prism-pbs-lessismore"]}
# method -> (policy that runs it, phase)
METHOD_RUNS = {"prism": ("prism-pbs-lessismore", "prefill"), "pbs": ("prism-pbs-lessismore", "prefill"),
               "lessismore": ("prism-pbs-lessismore", "decode"), "token_sparse": ("token_sparse-fasa", "prefill"),
               "fasa": ("token_sparse-fasa", "decode")}


def tiny_model(family: str) -> torch.nn.Module:
    """2 layers, hidden 64, 4 heads / 2 KV heads of 16 dims; q/k weights sharpened (x6) so that attention is
    peaked and token/block selection matters (random weights attend almost uniformly)."""
    config_cls, model_cls = FAMILIES[family]
    torch.manual_seed(0)
    config = config_cls(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                        max_position_embeddings=512)
    model = model_cls(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
            layer.self_attn.k_proj.weight.mul_(6.0)
    return model


def prompt() -> torch.Tensor:
    return torch.randint(0, 128, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(1))


def run_steps(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Logits of a prefill and of one decode step per DECODE_TOKENS token (DynamicCache)."""
    out = model(ids, use_cache=True)
    logits = [out.logits]
    for token in DECODE_TOKENS:
        out = model(torch.tensor([[token]]), **{CACHE_ARG: returned_cache(out)}, use_cache=True)
        logits.append(out.logits)
    return logits


class NodeRecorder(TorchDispatchMode):
    """Records every fused attention node's arguments (by name) and outputs, as the graph runs them."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if node_call_of(func, args, kwargs) is not None:
            names = [a.name for a in func._schema.arguments]
            values = dict(zip(names, args, strict=False)) | dict(kwargs or {})
            self.calls.append({
                "op": func.overloadpacket.__name__,
                "dtensor": any(isinstance(v, DTensor) for v in values.values()),
                "args": {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in values.items()},
                "out": tuple(o.detach().clone() for o in out),
            })
        return out


def recorded_run(model, policy) -> dict:
    """Compile `model` with `policy` (eager inner compiler), run the steps with every graph inside a
    NodeRecorder, return the logits, the recorded node calls and what the report says."""
    torch._dynamo.reset()
    report = sparse_compile.Report()
    inner = sparse_compile.backend(policy=policy, inner="eager", report=report)
    recorder = NodeRecorder()

    def recording(gm, example_inputs, **kwargs):
        compiled = inner(gm, example_inputs, **kwargs)

        def run(*args):
            with recorder:
                return compiled(*args)

        return run

    with torch.no_grad():
        logits = run_steps(torch.compile(model, backend=recording), prompt())
    return {
        "logits": logits, "calls": recorder.calls, "text": str(report), "notes": list(report.notes),
        "sites": [(s.graph, s.layer, s.phase, s.method, s.num_heads, s.num_kv_heads) for s in report.sites],
        "rejected": [r.reason for r in report.rejected],
        "density": {phase: report.layer_density(phase) for phase in ("prefill", "decode")},
    }


def rank_main(rank: int, folder: str, port: int) -> None:
    """One tensor-parallel rank: load each tiny model with transformers' plan, run eager and every policy,
    then try a model whose KV heads do not divide by the world size; save what it saw to `folder`/rank<r>.pt.
    Process setup (the rendezvous) is environment, as under torchrun."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)  # tp_plan= is deprecated for distributed_config=
    results: dict = {}
    for family in FAMILIES:
        model = AutoModelForCausalLM.from_pretrained(f"{folder}/{family}", tp_plan="auto").eval()
        with torch.no_grad():
            results[family] = {"eager": run_steps(model, prompt())}
        for name in FAMILY_POLICIES[family]:
            results[family][name] = recorded_run(model, POLICIES[name])
    results["uneven"] = uneven_heads(f"{folder}/uneven")
    torch.save(results, f"{folder}/rank{rank}.pt")
    dist.destroy_process_group()


def uneven_heads(path: str) -> dict:
    """What happens to 6 heads / 3 KV heads on 2 ranks: transformers loads the plan without a word, and the
    model's own forward fails (1.5 KV heads per rank) eagerly and under the backend alike."""
    model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto").eval()
    errors = {}
    for name, run in (("eager", model), ("compiled", torch.compile(model, backend=sparse_compile.backend(
            policy="dense", inner="eager", report=(report := sparse_compile.Report()))))):
        torch._dynamo.reset()
        try:
            with torch.no_grad():
                run(prompt()[:, :8])
            errors[name] = ""
        except Exception as err:  # noqa: BLE001 - the message is the result
            errors[name] = f"{type(err).__name__}: {err}"
    errors["graphs"] = len(report.graphs)
    return errors


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """{"ranks": [rank 0's results, rank 1's], "single": {family: {"eager" or sparse policy: results}},
    "seconds": wall}. The single-process runs happen here while the ranks work."""
    folder = tmp_path_factory.mktemp("tp")
    for family in FAMILIES:
        tiny_model(family).save_pretrained(folder / family)
    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=6, num_key_value_heads=3, head_dim=16)).save_pretrained(
        folder / "uneven")
    start = time.monotonic()
    context = mp.start_processes(rank_main, args=(str(folder), free_port()), nprocs=WORLD, join=False,
                                 start_method="spawn")
    try:
        single = {}
        for family in FAMILIES:
            model = AutoModelForCausalLM.from_pretrained(folder / family).eval()
            with torch.no_grad():
                single[family] = {"eager": run_steps(model, prompt())}
            single[family].update({name: recorded_run(model, POLICIES[name])
                                   for name in FAMILY_POLICIES[family] if name != "dense"})
        while not context.join(timeout=1):
            if time.monotonic() - start > DEADLINE_S:
                raise TimeoutError(f"the {WORLD} tensor-parallel ranks did not finish in {DEADLINE_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    ranks = [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return {"ranks": ranks, "single": single, "seconds": time.monotonic() - start}


def head_slice(args: dict, rank: int) -> dict:
    """The node arguments of one process holding all heads, cut to the heads rank `rank` holds under the
    colwise plan (query heads rank*H/W.., KV heads rank*Hkv/W..: the GQA pairing is kept)."""
    h, hkv = HEADS // WORLD, KV_HEADS // WORLD
    cut = dict(args)
    cut["q"] = args["q"][:, rank * h:(rank + 1) * h]
    cut["k"] = args["k"][:, rank * hkv:(rank + 1) * hkv]
    cut["v"] = args["v"][:, rank * hkv:(rank + 1) * hkv]
    return cut


def run_in_process(args: dict) -> tuple[torch.Tensor, ...]:
    """The node's computation (method or fallback) run here, on these arguments."""
    if "role" in args:
        return run_node_sharing(**args)
    return run_node(**args)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_rank_rewrites_both_sites_with_its_local_heads(runs, family):
    for rank, results in enumerate(runs["ranks"]):
        for name in FAMILY_POLICIES[family]:
            run = results[family][name]
            assert not run["rejected"], (rank, name, run["text"])
            prefill = [s for s in run["sites"] if s[2] == "prefill"]
            assert [s[1] for s in prefill] == [0, 1], (rank, name, run["text"])
            assert {(s[4], s[5]) for s in run["sites"]} == {(HEADS // WORLD, KV_HEADS // WORLD)}, run["text"]
            assert f"torch.distributed rank {rank} of {WORLD}" in "\n".join(run["notes"]), run["text"]
            for call in run["calls"]:
                assert not call["dtensor"], "the node must see the rank's local tensors"
                assert call["args"]["q"].shape[1] == HEADS // WORLD and call["args"]["k"].shape[1] == KV_HEADS // WORLD


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_dense_equals_eager_on_every_rank(runs, family):
    for results in runs["ranks"]:
        eager, compiled = results[family]["eager"], results[family]["dense"]["logits"]
        for want, got in zip(eager, compiled, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # and the sharded model is the single-process model
    single = runs["single"][family]["eager"]
    for want, got in zip(single, runs["ranks"][0][family]["dense"]["logits"], strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def mismatch(got: tuple, want: tuple, atol: float) -> str:
    """"" when the node outputs agree (out, density, fallback code[, selection]), else assert_close's message."""
    try:
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, atol=atol, rtol=atol)
    except AssertionError as err:
        return str(err)
    return ""


def node_checks(runs: dict, family: str, name: str) -> list[list[dict]]:
    """Per rank, per recorded node of policy `name`: {"method", "decode", "sparse" (ran, density < 1),
    "own" (mismatch with the node run here on its recorded inputs), "sliced" (its inputs are the head slice of
    the single-process node's), "slice" (mismatch with the method run on that slice)}. Computed once per
    (family, policy): the method tests share it."""
    key = ("checks", family, name)
    if key in runs:
        return runs[key]
    single = runs["single"][family][name]["calls"]
    per_rank = []
    for rank, results in enumerate(runs["ranks"]):
        calls = results[family][name]["calls"]
        assert [c["op"] for c in calls] == [c["op"] for c in single], "the same nodes in the same order"
        selection = None  # the latest selection a select node made on the slice
        rows = []
        for call, whole in zip(calls, single, strict=True):
            args = call["args"]
            density = call["out"][1]
            density = density[..., 0] if density.dim() == 3 else density
            row = {"method": parse_config(args["config"]).method.name, "decode": args["q"].shape[2] == 1,
                   "sparse": int(call["out"][2]) == RAN and float(density.min()) < 1.0,
                   "own": mismatch(run_in_process(args), call["out"], 1e-6), "sliced": False, "slice": ""}
            cut = head_slice(whole["args"], rank)
            cut["config"] = args["config"]  # the site as this rank sees it (local head counts)
            if cut.get("role") == "reuse":
                cut["selection"] = selection
            row["sliced"] = (all(torch.allclose(cut[t], args[t], atol=1e-5, rtol=1e-5) for t in "qkv")
                             and not (cut.get("role") == "reuse" and selection is None))
            if row["sliced"]:
                want = run_in_process(cut)
                if cut.get("role") == "select":
                    selection = want[3]
                row["slice"] = mismatch(call["out"][:1], want[:1], 1e-4)
            rows.append(row)
        per_rank.append(rows)
    runs[key] = per_rank
    return per_rank


@pytest.mark.parametrize(("family", "method"), [(family, method) for family in FAMILIES for method, (name, _) in
                                                 METHOD_RUNS.items() if name in FAMILY_POLICIES[family]])
def test_each_method_runs_on_the_local_heads(runs, family, method):
    """Every node: output == the node run here on its own recorded inputs; where its inputs are the head
    slice of the single-process run's (same policy, same tokens), output == the method on that slice (a
    reuse node takes the selection its select node made on the slice). On each rank at least one node of
    the method ran sparsely (density < 1) on inputs equal to the slice."""
    name, phase = METHOD_RUNS[method]
    for rank, rows in enumerate(node_checks(runs, family, name)):
        text = runs["ranks"][rank][family][name]["text"]
        for row in rows:
            assert not row["own"], f"rank {rank}: {row['method']} node != the node run here\n{row['own']}"
            assert not row["slice"], f"rank {rank}: {row['method']} node != the method on the slice\n{row['slice']}"
        assert any(r["method"] == method and r["decode"] == (phase == "decode") and r["sparse"] and r["sliced"]
                   for r in rows), f"rank {rank}: no {method} node ran sparsely on inputs equal to the slice\n{text}"


@pytest.mark.parametrize("family", FAMILIES)
def test_methods_within_a_head_are_unchanged_by_sharding(runs, family):
    """Prism and PBS select per head: the sharded model's prefill logits equal the single process's with the
    same policy. (FASA too, per head, checked node by node above; Token Sparse and LessIsMore share across
    the rank's heads: EVAL.md shows how far their logits move.)"""
    single = runs["single"][family]["prism-pbs-lessismore"]["logits"][0]
    for results in runs["ranks"]:
        got = results[family]["prism-pbs-lessismore"]["logits"][0]
        torch.testing.assert_close(got, single, atol=1e-4, rtol=1e-4)


def test_heads_that_do_not_divide_fail_in_the_model_before_the_backend(runs):
    """6 heads / 3 KV heads on 2 ranks: transformers 5.x loads `tp_plan="auto"` without complaint (its
    generate() sizes caches with `get_kv_heads_per_rank`, None here), then the attention's own
    `.view(..., -1, head_dim)` of 1.5 KV heads fails, eagerly and under torch.compile alike, before dynamo
    hands the backend a graph: there is no site to fall back."""
    for results in runs["ranks"]:
        uneven = results["uneven"]
        assert "is invalid for input of size" in uneven["eager"], uneven
        assert "is invalid for input of size" in uneven["compiled"], uneven
        assert uneven["graphs"] == 0, uneven
