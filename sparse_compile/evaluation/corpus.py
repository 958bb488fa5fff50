"""Real long text available offline, tokenised and cut into evaluation windows.

Named corpora (all public domain or freely redistributable, shipped by Debian, no network):

  jargon    The Jargon File 4.4.7 (Eric S. Raymond et al., public domain), 1.7 MB of English
            prose: `/usr/share/doc/jargon-text/jargon.txt.gz` from the Debian package
            `jargon-text` (`apt-get install jargon-text`). About 400K SmolLM2 tokens. The default
            when installed (`default_corpus()`; otherwise `licenses`).
  licenses  The license texts in `/usr/share/common-licenses` (Debian `base-files`, present on
            every Debian/Ubuntu system), regular files only (symlinks skipped), in sorted name
            order, joined by blank lines. About 60K tokens; the texts repeat each other (GPL-2 and
            GPL-3, LGPL versions), so long-range copying is rewarded. ANCHORS.md's Prism numbers
            were measured on this text.

Any other UTF-8 text file (`.txt`, or `.gz` holding text) is accepted by path.

Normalisation (the same for every source): each line is stripped of leading and trailing
whitespace and runs of blank lines collapse to one, so the Jargon File's indentation does not
turn into thousands of trivially predictable space tokens. Tokenisation adds no special tokens.

Windows: `count` windows of `length` tokens, evenly spaced over the whole token stream (window i
starts at floor(i * (N - length) / max(count - 1, 1))), so they are deterministic and cover the
text's variety instead of its first pages.
"""

from __future__ import annotations

import gzip
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

JARGON_PATH = Path("/usr/share/doc/jargon-text/jargon.txt.gz")
LICENSES_DIR = Path("/usr/share/common-licenses")


@dataclass(frozen=True)
class CorpusSource:
    """Where a named corpus lives and how to get it."""

    name: str
    path: Path
    install: str
    description: str


CORPORA: dict[str, CorpusSource] = {
    "jargon": CorpusSource(
        "jargon", JARGON_PATH, "apt-get install jargon-text",
        "The Jargon File 4.4.7 (public domain), Debian package jargon-text",
    ),
    "licenses": CorpusSource(
        "licenses", LICENSES_DIR, "apt-get install base-files (present on every Debian/Ubuntu system)",
        "license texts of /usr/share/common-licenses (regular files, sorted), Debian package base-files",
    ),
}
DEFAULT_CORPUS = "jargon"


def default_corpus() -> str:
    """"jargon" when its Debian package is installed, else "licenses" (present on every Debian system)."""
    return DEFAULT_CORPUS if CORPORA[DEFAULT_CORPUS].path.exists() else "licenses"


class CorpusError(FileNotFoundError):
    """A corpus that cannot be read; the message names the missing file and how to get it."""


@dataclass(frozen=True)
class Corpus:
    """A normalised text and where it came from. `sha256` identifies the text (cache keys)."""

    name: str
    source: str
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "chars": len(self.text), "sha256": self.sha256[:16]}


def normalize_text(text: str) -> str:
    """Strip every line and collapse runs of blank lines to one (see the module docstring)."""
    lines = [line.strip() for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def read_text_file(path: Path) -> str:
    """A UTF-8 text file, transparently gunzipped when its name ends in .gz."""
    if path.suffix == ".gz":
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return f.read()
    return path.read_text(encoding="utf-8")


def load_corpus(name_or_path: str | Path = DEFAULT_CORPUS) -> Corpus:
    """A named corpus (`jargon`, `licenses`) or a text file by path, normalised.

    Raises CorpusError naming the missing file and how to install it.
    """
    key = str(name_or_path)
    if key in CORPORA:
        src = CORPORA[key]
        if not src.path.exists():
            raise CorpusError(
                f"corpus '{key}' needs {src.path}, which does not exist: install it with `{src.install}`, "
                f"or pass a UTF-8 text file (.txt or .gz) by path instead"
            )
        if src.path.is_dir():
            files = sorted(p for p in src.path.iterdir() if p.is_file() and not p.is_symlink())
            if not files:
                raise CorpusError(f"corpus '{key}': {src.path} holds no text files; install them with `{src.install}`")
            text = "\n\n".join(read_text_file(p) for p in files)
        else:
            text = read_text_file(src.path)
        return Corpus(key, src.description, normalize_text(text))
    path = Path(key)
    if not path.is_file():
        raise CorpusError(
            f"corpus {key!r} is neither a named corpus ({', '.join(CORPORA)}) nor an existing file "
            f"(no such file: {path.resolve()})"
        )
    return Corpus(path.name, str(path.resolve()), normalize_text(read_text_file(path)))


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """The text's token ids, (N,) int64, without special tokens."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def window_starts(num_tokens: int, length: int, count: int) -> list[int]:
    """Start offsets of `count` windows of `length` tokens, evenly spaced over `num_tokens` tokens."""
    if length < 2:
        raise ValueError(f"window length must be >= 2 tokens, got {length}")
    if count < 1:
        raise ValueError(f"window count must be >= 1, got {count}")
    if num_tokens < length:
        raise ValueError(
            f"the corpus has {num_tokens} tokens, fewer than one window of {length}: use a larger corpus "
            f"(e.g. --corpus jargon) or a shorter length"
        )
    span = num_tokens - length
    if count == 1:
        return [0]
    return [i * span // (count - 1) for i in range(count)]


def windows(ids: torch.Tensor, length: int, count: int) -> list[tuple[int, torch.Tensor]]:
    """(start, ids[start:start + length]) for each window of `window_starts`."""
    return [(s, ids[s:s + length]) for s in window_starts(ids.numel(), length, count)]
