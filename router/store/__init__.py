"""Where fleet state lives: the seam between the fleet, the scoreboard and a store.

The request path never talks to a store. It updates each node's
:class:`~router.measure.NodeStats` in memory, synchronously; a store runs beside
it in the background. Membership changes (a node joins, heartbeats, is drained
or removed) go through the store, which applies them to the local
:class:`~router.fleet.Fleet` and, when shared, to every other router process.

* :class:`MemoryStore` (here) is the embedded default for a single process: the
  in-memory fleet *is* the state; with ``state.path`` its client keys and usage
  are kept in a SQLite file (:mod:`router.store.ledger`) across restarts;
* :class:`router.store.redis.RedisStore` shares it through Redis, with its Lua
  scripts in :mod:`router.store.scripts`;
* :mod:`router.store.codec` is the only place a node is built, whatever its
  source (config, registration, a Redis hash).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from router.fleet import Fleet, Node, NodeState, Source
from router.measure import Signals
from router.store import codec
from router.store.ledger import Ledger
from router.tasks import cancel_and_wait
from router.tenants import Keyring, period_days, period_of

if TYPE_CHECKING:
    from router.join_tokens import JoinTokens

log = logging.getLogger("ballast.store")


class StateStore(Protocol):
    backend: str
    fleet: Fleet  # the process's own snapshot, which the store keeps
    errors: int  # failed store operations since start
    routers: tuple[str, ...]  # live router processes sharing the fleet (ids)

    @property
    def healthy(self) -> bool:
        """False while the store cannot be reached (requests still flow)."""
        ...

    async def start(self, fleet: Fleet, signals: Signals) -> None: ...

    async def close(self) -> None: ...

    async def register(self, node: Node) -> None:
        """Add or replace a joined node (its ``secret_hash`` set)."""
        ...

    async def heartbeat(self, node_id: str, telemetry: dict[str, Any]) -> None: ...

    async def set_state(self, node_id: str, state: NodeState, reason: str) -> None: ...

    async def remove(self, node_id: str) -> None: ...

    async def fetch(self, node_id: str) -> Node | None:
        """The node, looked up in the shared state if this process has not seen it yet."""
        ...

    async def secret_of(self, node_id: str) -> str | None:
        """The SHA-256 of a self-registered node's secret; None for an unknown id or a
        node without one. The same work for every id, known here or not (with Redis,
        one read of the shared state), so the time it takes tells nothing."""
        ...

    def joined_count(self) -> int:
        """Self-registered nodes known (in any state, until forgotten)."""
        ...

    def joined_by(self, token: str) -> list[Node]:
        """Self-registered nodes known that the join token named ``token`` registered."""
        ...

    async def publish_policy(self, name: str, params: dict[str, Any]) -> None:
        """Make every router process switch to this policy (a no-op for one process)."""
        ...

    on_policy: Callable[[str, dict[str, Any]], None] | None

    def owns(self, key: str) -> bool:
        """Whether this process does the shared work for ``key`` (probing the nodes
        of a model): one live router process per key."""
        ...

    # Client keys and their usage (router.tenants). The store hands ``keyring`` every
    # dynamic key record whenever they change (on any replica), its share of the
    # keys' limits when the number of live router processes changes, and each
    # budgeted key's count for its period; it flushes the keyring's usage in the
    # background.
    keyring: Keyring | None

    async def put_key(self, record: dict[str, Any]) -> None: ...

    async def delete_key(self, key_id: str) -> None: ...

    async def read_usage(self, since: str) -> dict[tuple[str, str], list[int]]:
        """Usage per (key name, model) from UTC day ``since`` (YYYY-MM-DD) on."""
        ...

    # Scoped join tokens (router.join_tokens), kept as the client keys are: the store
    # hands ``join_tokens`` every record whenever they change (on any replica).
    join_tokens: JoinTokens | None

    async def put_join_token(self, record: dict[str, Any]) -> None: ...

    async def delete_join_token(self, token_id: str) -> None: ...


def apply_heartbeat(
    fleet: Fleet, node: Node, telemetry: dict[str, Any], now: float, verify: bool
) -> None:
    node.last_seen = now
    node.telemetry = telemetry
    if node.state is NodeState.GONE:
        fleet.set_state(node.id, *codec.returning(node, verify))


def secret_in(fleet: Fleet, node_id: str) -> str | None:
    """A self-registered node's secret hash in a process's own snapshot, or None."""
    node = fleet.nodes.get(node_id)
    if node is None or node.source is not Source.JOINED:
        return None
    return node.secret_hash or None


def joined_count(fleet: Fleet) -> int:
    return sum(1 for n in fleet.nodes.values() if n.source is Source.JOINED)


def joined_by(fleet: Fleet, token: str) -> list[Node]:
    return [n for n in fleet.nodes.values() if n.source is Source.JOINED and n.join_token == token]


def health(store: StateStore) -> str:
    """``backend:ok`` or ``backend:degraded``, as /readyz and the status page show it."""
    return f"{store.backend}:{'ok' if store.healthy else 'degraded'}"


def utc_day(wall: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(wall))


def add_rows(
    into: dict[tuple[str, str], list[int]], rows: dict[tuple[str, str], list[int]]
) -> None:
    for k, row in rows.items():
        mine = into.setdefault(k, [0] * len(row))
        for i, v in enumerate(row):
            mine[i] += v


class MemoryStore:
    """Single-process state: nothing shared, always healthy; expires silent nodes.
    With ``path``, client keys and usage (flushed every second) persist there."""

    backend = "memory"
    errors = 0
    routers = ("local",)
    on_policy: Callable[[str, dict[str, Any]], None] | None = None
    keyring: Keyring | None = None  # one process: its own counts are the whole counts
    join_tokens: JoinTokens | None = None

    def __init__(
        self,
        heartbeat_ttl_s: float = 30.0,
        wall: Callable[[], float] = time.time,
        *,
        verify: bool = True,
        retention_s: float = 3600.0,
        path: str | None = None,
    ) -> None:
        self.ttl = heartbeat_ttl_s
        self.wall = wall
        self.verify = verify  # a node whose heartbeats resume is verified again
        self.retention_s = retention_s
        self.fleet = Fleet()
        self._task: asyncio.Task[None] | None = None
        self.keys: dict[str, dict[str, Any]] = {}
        self.join_token_records: dict[str, dict[str, Any]] = {}
        self.days: dict[str, dict[tuple[str, str], list[int]]] = {}  # usage by UTC day
        self.ledger = Ledger(path) if path else None
        self._unwritten: dict[str, dict[tuple[str, str], list[int]]] = {}  # not in the ledger yet

    @property
    def healthy(self) -> bool:
        return True

    async def put_key(self, record: dict[str, Any]) -> None:
        self._put("key", self.keys, record)
        if self.keyring is not None:
            self.keyring.adopt(self.keys)

    async def delete_key(self, key_id: str) -> None:
        self._delete("key", self.keys, key_id)
        if self.keyring is not None:
            self.keyring.adopt(self.keys)

    def _put(self, kind: str, records: dict[str, dict[str, Any]], record: dict[str, Any]) -> None:
        """A client key's or join token's record, here and in the ledger."""
        records[record["id"]] = record
        if self.ledger is not None:
            self.ledger.put(kind, record)

    def _delete(self, kind: str, records: dict[str, dict[str, Any]], rid: str) -> None:
        records.pop(rid, None)
        if self.ledger is not None:
            self.ledger.delete(kind, rid)

    def flush_usage(self) -> None:
        """The keyring's usage since the last flush into the day's totals (and the
        ledger)."""
        keyring = self.keyring
        if keyring is None or not (keyring.usage.pending or self._unwritten):
            return
        taken = keyring.usage.take()
        day = utc_day(self.wall())
        add_rows(self.days.setdefault(day, {}), taken)
        if self.ledger is None:
            return
        add_rows(self._unwritten.setdefault(day, {}), taken)
        try:
            self.ledger.add_usage(self._unwritten)
        except sqlite3.Error as e:  # kept, and written with the next flush
            log.warning("cannot write usage to state.path (%s): kept for the next flush", e)
            return
        self._unwritten = {}

    def _load(self) -> None:
        """At start, from the ledger: the keys, the join tokens, the usage, and each
        budgeted key's tokens in its current period (so a restart renews no budget)."""
        assert self.ledger is not None
        self.keys, self.days = self.ledger.records("key"), self.ledger.usage()
        self.join_token_records = self.ledger.records("join_token")
        if self.join_tokens is not None:
            self.join_tokens.adopt(self.join_token_records)
        keyring = self.keyring
        if keyring is None:
            return
        keyring.adopt(self.keys)
        wall = self.wall()
        budgeted = keyring.budgeted()
        totals = dict.fromkeys(budgeted, 0)
        for name, period in budgeted.items():
            for day in period_days(period, wall):
                for (key, _), row in self.days.get(day, {}).items():
                    if key == name:
                        totals[name] += row[2] + row[3]
        keyring.adopt_spent(totals, {n: period_of(p, wall) for n, p in budgeted.items()})

    async def put_join_token(self, record: dict[str, Any]) -> None:
        self._put("join_token", self.join_token_records, record)
        if self.join_tokens is not None:
            self.join_tokens.adopt(self.join_token_records)

    async def delete_join_token(self, token_id: str) -> None:
        self._delete("join_token", self.join_token_records, token_id)
        if self.join_tokens is not None:
            self.join_tokens.adopt(self.join_token_records)

    async def read_usage(self, since: str) -> dict[tuple[str, str], list[int]]:
        self.flush_usage()
        out: dict[tuple[str, str], list[int]] = {}
        for day, rows in self.days.items():
            if day >= since:
                add_rows(out, rows)
        return out

    async def start(self, fleet: Fleet, signals: Signals) -> None:
        self.fleet = fleet
        if self.ledger is not None:
            self._load()
        self._task = asyncio.get_running_loop().create_task(self._expire_loop())

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self.flush_usage()
        if self.ledger is not None:
            self.ledger.close()

    async def register(self, node: Node) -> None:
        node.last_seen = self.wall()
        self.fleet.adopt(node)

    async def heartbeat(self, node_id: str, telemetry: dict[str, Any]) -> None:
        apply_heartbeat(self.fleet, self.fleet.nodes[node_id], telemetry, self.wall(), self.verify)

    async def set_state(self, node_id: str, state: NodeState, reason: str) -> None:
        self.fleet.set_state(node_id, state, reason)

    async def remove(self, node_id: str) -> None:
        self.fleet.remove(node_id)

    async def fetch(self, node_id: str) -> Node | None:
        return self.fleet.nodes.get(node_id)

    async def secret_of(self, node_id: str) -> str | None:
        return secret_in(self.fleet, node_id)

    def joined_count(self) -> int:
        return joined_count(self.fleet)

    def joined_by(self, token: str) -> list[Node]:
        return joined_by(self.fleet, token)

    async def publish_policy(self, name: str, params: dict[str, Any]) -> None:
        return None

    def owns(self, key: str) -> bool:
        return True

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.ttl / 4))
            self.expire(self.wall())
            if self.ledger is not None:
                self.flush_usage()

    def expire(self, now: float) -> None:
        """Joined nodes silent for the heartbeat TTL are gone; gone for the
        retention time, forgotten."""
        gone_before = now - self.ttl
        forget_before = gone_before - self.retention_s
        for node in [n for n in self.fleet.nodes.values() if n.source is Source.JOINED]:
            if node.last_seen >= gone_before:
                continue
            if node.state is not NodeState.GONE:
                self.fleet.set_state(node.id, NodeState.GONE, f"no heartbeat for {self.ttl:g}s")
            elif node.last_seen < forget_before:
                self.fleet.remove(node.id)
