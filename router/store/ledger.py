"""The embedded store's client keys and usage, kept in one SQLite file.

With ``state.path`` set and no Redis, :class:`~router.store.MemoryStore` writes
every dynamic key record as it is made, changed or revoked, and the usage
counted each second, to this file, and reads them back at start: a
single-process deployment keeps its keys, usage and budgets across restarts.
SQLite in write-ahead-log mode with ``synchronous=NORMAL``: a write is a short
append to the log (no fsync per write), and a crash of the process loses
nothing written; a power loss can lose the writes of the last checkpoint
interval.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import orjson

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS keys (id TEXT PRIMARY KEY, record BLOB NOT NULL)",
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


class Ledger:
    def __init__(self, path: str) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None)  # transactions are explicit
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        for statement in _SCHEMA:
            self.db.execute(statement)

    def keys(self) -> dict[str, dict[str, Any]]:
        return {kid: orjson.loads(raw) for kid, raw in self.db.execute("SELECT * FROM keys")}

    def put_key(self, record: dict[str, Any]) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO keys VALUES (?, ?)", (record["id"], orjson.dumps(record))
        )

    def delete_key(self, key_id: str) -> None:
        self.db.execute("DELETE FROM keys WHERE id = ?", (key_id,))

    def add_usage(self, day: str, rows: Rows) -> None:
        """Add a flush's counts to the day's totals, in one transaction."""
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany(_ADD, [(day, *k, *row) for k, row in rows.items()])

    def usage(self) -> dict[str, Rows]:
        """Every day's totals: day -> (key name, model) -> counts (Usage.FIELDS)."""
        days: dict[str, Rows] = {}
        for day, name, model, *row in self.db.execute("SELECT * FROM usage"):
            days.setdefault(day, {})[(name, model)] = row
        return days

    def close(self) -> None:
        self.db.close()
