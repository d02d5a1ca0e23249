"""A persistent verdict cache in SQLite.

Key: the normalised (ground truth, prediction) pair plus the verifier model and the
prompt's cache name. The key column is a SHA-256 of those four strings encoded as a
JSON list, so no choice of characters in a prediction can make two different pairs
share a key; the readable columns are kept beside it for inspection. Every query
is parameterised. Only the six verdicts are stored, never errors, and nothing about
the endpoint (URL, API key) is.

Concurrency: the database runs in WAL mode, so any number of processes may read while
one writes; writes are batched into one transaction per `put_many`. Keep the file on a
local disk: SQLite locking is unreliable on network file systems.
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping, Sequence

from speciarl_jax.rewards.categories import VERDICTS

_SCHEMA = """
CREATE TABLE IF NOT EXISTS verdicts (
    key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    prompt TEXT NOT NULL,
    ground_truth TEXT NOT NULL,
    prediction TEXT NOT NULL,
    category TEXT NOT NULL,
    created REAL NOT NULL
) WITHOUT ROWID
"""
_CHUNK = 500  # stays below SQLite's limit on bound parameters per statement


def cache_key(model: str, prompt: str, ground_truth: str, prediction: str) -> str:
    """Hex SHA-256 of the four strings as a JSON list (unambiguous, unlike joining them)."""
    encoded = json.dumps([model, prompt, ground_truth, prediction], ensure_ascii=False)
    return hashlib.sha256(encoded.encode("utf-8")).hexdigest()


class VerdictCache:
    """Verdicts for (ground truth, prediction) pairs under one model and prompt."""

    def __init__(self, path: str | os.PathLike, model: str, prompt: str, readonly: bool = False):
        self.path = os.fspath(path)
        self.model = model
        self.prompt = prompt
        self._lock = threading.Lock()
        if readonly:
            uri = f"file:{self.path}?mode=ro"
            self._db = sqlite3.connect(uri, uri=True, timeout=30.0, check_same_thread=False,
                                       isolation_level=None)
        else:
            directory = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(directory, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False,
                                       isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(_SCHEMA)
        self._db.execute("PRAGMA busy_timeout=30000")

    def _key(self, pair: tuple[str, str]) -> str:
        return cache_key(self.model, self.prompt, pair[0], pair[1])

    def get_many(self, pairs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], str]:
        """The cached verdict of each pair that has one."""
        by_key = {self._key(p): p for p in pairs}
        keys = list(by_key)
        found: dict[tuple[str, str], str] = {}
        with self._lock:
            for start in range(0, len(keys), _CHUNK):
                chunk = keys[start:start + _CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(
                    f"SELECT key, category FROM verdicts WHERE key IN ({marks})", chunk).fetchall()
                for key, category in rows:
                    found[by_key[key]] = category
        return found

    def put_many(self, verdicts: Mapping[tuple[str, str], str] | Iterable[tuple[tuple[str, str], str]]) -> None:
        """Stores verdicts in one transaction. Anything but the six labels is refused."""
        items = list(verdicts.items() if isinstance(verdicts, Mapping) else verdicts)
        now = time.time()
        rows = []
        for (truth, prediction), category in items:
            if category not in VERDICTS:
                raise ValueError(f"only the six verdicts may be cached, not {category!r}")
            rows.append((self._key((truth, prediction)), self.model, self.prompt, truth, prediction,
                         category, now))
        if not rows:
            return
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT OR REPLACE INTO verdicts VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
