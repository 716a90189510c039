"""The embedded store's client keys and usage, kept in one SQLite file.

With ``state.path`` set and no Redis, :class:`~router.store.MemoryStore` writes
every dynamic client key and scoped join token record as it is made, changed or
revoked, and the usage counted each second, to this file, and reads them back at start: a
single-process deployment keeps its keys, usage and budgets across restarts.
SQLite in write-ahead-log mode with ``synchronous=NORMAL``: a write is a short
append to the log (no fsync per write), and a crash of the process loses
nothing written; a power loss can lose the writes of the last checkpoint
interval.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

import orjson

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS records (kind TEXT, id TEXT, record BLOB NOT NULL,"
    " PRIMARY KEY (kind, id))",
    "CREATE TABLE IF NOT EXISTS usage (day TEXT, name TEXT, model TEXT, requests INTEGER,"
    " errors INTEGER, prompt_tokens INTEGER, completion_tokens INTEGER,"
    " PRIMARY KEY (day, name, model))",
)
_ADD = (
    "INSERT INTO usage VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (day, name, model) DO UPDATE SET"
    " requests = requests + excluded.requests, errors = errors + excluded.errors,"
    " prompt_tokens = prompt_tokens + excluded.prompt_tokens,"
    " completion_tokens = completion_tokens + excluded.completion_tokens"
)
Rows = dict[tuple[str, str], list[int]]  # (key name, model) -> Usage.FIELDS
BUSY_S = 0.1  # the longest a write waits for the file's lock, on the event loop


class Ledger:
    def __init__(self, path: str) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))  # key hashes: owner only
        # Transactions are explicit; a write waits at most BUSY_S for a lock another
        # process holds (then fails, and is tried again at the next flush).
        self.db = sqlite3.connect(path, isolation_level=None, timeout=BUSY_S)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        for statement in _SCHEMA:
            self.db.execute(statement)

    def records(self, kind: str) -> dict[str, dict[str, Any]]:
        """Every record of ``kind`` ("key", "join_token"), by id."""
        rows = self.db.execute("SELECT id, record FROM records WHERE kind = ?", (kind,))
        return {rid: orjson.loads(raw) for rid, raw in rows}

    def put(self, kind: str, record: dict[str, Any]) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO records VALUES (?, ?, ?)",
            (kind, record["id"], orjson.dumps(record)),
        )

    def delete(self, kind: str, rid: str) -> None:
        self.db.execute("DELETE FROM records WHERE kind = ? AND id = ?", (kind, rid))

    def add_usage(self, days: dict[str, Rows]) -> None:
        """Add flushed counts to each day's totals, all in one transaction (all or
        nothing: sqlite3.Error when the file is locked or cannot be written)."""
        with self.db:
            self.db.execute("BEGIN")
            for day, rows in days.items():
                self.db.executemany(_ADD, [(day, *k, *row) for k, row in rows.items()])

    def usage(self) -> dict[str, Rows]:
        """Every day's totals: day -> (key name, model) -> counts (Usage.FIELDS)."""
        days: dict[str, Rows] = {}
        for day, name, model, *row in self.db.execute("SELECT * FROM usage"):
            days.setdefault(day, {})[(name, model)] = row
        return days

    def close(self) -> None:
        self.db.close()
