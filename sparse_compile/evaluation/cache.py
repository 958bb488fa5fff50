"""A content-addressed JSON cache for baseline results (eager model runs).

Entries are keyed by a dict (model fingerprint, torch version, sha256 of the exact input ids, ...)
hashed to a file name, so a cached value can only be reused for the very same computation.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from sparse_compile.params import canonical_json

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "sparse_compile" / "eval"


def ids_digest(ids: Any) -> str:
    """sha256 of a sequence of token ids (tensor or list)."""
    values = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    return hashlib.sha256(json.dumps(values).encode()).hexdigest()


class ResultCache:
    """`get(key)` / `put(key, value)` of JSON values under `directory`; `directory=None` disables it."""

    def __init__(self, directory: Path | str | None) -> None:
        self.directory = Path(directory) if directory is not None else None

    def path(self, key: dict[str, Any]) -> Path | None:
        if self.directory is None:
            return None
        digest = hashlib.sha256(canonical_json(key).encode()).hexdigest()
        return self.directory / f"{digest[:32]}.json"

    def get(self, key: dict[str, Any]) -> Any | None:
        """The cached value for `key`, or None (also when the file is unreadable or for another key)."""
        path = self.path(key)
        if path is None or not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return entry["value"] if entry.get("key") == json.loads(canonical_json(key)) else None

    def put(self, key: dict[str, Any], value: Any) -> None:
        """Store `value` for `key` (atomically: written to a temporary file, then renamed)."""
        path = self.path(key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"key": key, "value": value}, sort_keys=True))
        tmp.replace(path)
