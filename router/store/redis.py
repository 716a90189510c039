"""Fleet state shared through Redis by every router process.

The request path never awaits Redis. Each process:

* **flushes** what it measured (outcome counts, latency samples, its in-flight
  per node) every ``state.flush_interval_s``, one Lua call per node that had
  traffic, pipelined. The script merges the batch into the shared decayed
  success counters and peak-EWMA latency atomically, so two replicas never lose
  each other's updates;
* **pulls** only what changed: every write bumps a sequence number and records
  ``node -> seq`` in a sorted set, so a process asks for the nodes changed since
  the last sequence it saw (``ZRANGEBYSCORE``) and reads just those hashes.
  Sync cost follows the rate of change, not the fleet size;
* is **woken** by pub/sub on urgent changes (join, drain, removal, expiry), and
  otherwise pulls every ``state.sync_interval_s``;
* **expires** self-registered nodes whose heartbeats stopped, through a sorted
  set of last-seen times (only the expired ones are read), and forgets them
  after ``registry.gone_retention_s`` through a second one;
* **heartbeats** itself every ``ROUTER_BEAT_S`` into a sorted set of live router
  processes; work done once for the fleet (probing the nodes of a model) goes to
  one of them by rendezvous hashing (:meth:`RedisStore.owns`), and a process
  silent for ``ROUTER_TTL_S`` (or stopped) hands its share to the others.

When Redis is unreachable the process keeps routing on its last snapshot,
reports itself degraded and keeps its unflushed measurements. When Redis comes
back (possibly empty, having restarted without persistence or been flushed:
detected through an epoch key) it re-publishes what it knows and resynchronises:
the nodes, the client keys and their revocations (a revoked key is never brought
back), and the usage totals, which never go back: each process keeps, for every
usage counter of the last ``FLOOR_DAYS`` days, what it counted itself and the
highest total it read, and restores them when Redis lost them, so a flush cannot
renew a budget (:data:`~router.store.scripts.RESTORE_USAGE` raises each counter to
the sum of every process's own counts, or the highest total read when more; it
never adds, so nothing is counted twice). A counter read lower than known (a
promoted replica that missed recent writes) is raised back.

Every key shares one hash tag (``{fleet}``) so that scripts and pipelines work
on Redis Cluster too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from datetime import date, timedelta
from hashlib import blake2b
from typing import TYPE_CHECKING, Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import RedisError

from router.config import Scoring, StateConfig
from router.fleet import Fleet, Node, NodeState, Source
from router.measure import Pending, Signals
from router.measure.merge import MERGE_LUA
from router.store import (
    add_rows,
    apply_heartbeat,
    codec,
    joined_by,
    joined_count,
    scripts,
    secret_in,
    utc_day,
)
from router.tasks import cancel_and_wait
from router.tenants import Keyring, Usage, period_days, period_of

if TYPE_CHECKING:
    from router.join_tokens import JoinTokens

log = logging.getLogger("ballast.store")

_ERRORS = (RedisError, OSError, TimeoutError)
PULL_CHUNK = 1000  # changed nodes read per round trip
PULL_CHUNKS_PER_TICK = 5
MAX_REPLAY = 10_000  # membership writes queued while Redis is away


USAGE_RETENTION_S = 400 * 86400  # a day's usage totals are kept this long
MAX_USAGE_DAYS = 400
BUDGET_SYNC_S = 1.0  # how often the tokens of budgeted keys are counted over all replicas
FLOOR_SYNC_S = 5.0  # how often today's usage totals are read, to be restored if lost
FLOOR_DAYS = 35  # days whose usage totals a process keeps, to restore them
ROUTER_BEAT_S = 1.0  # how often a router process says it is alive
ROUTER_TTL_S = 5.0  # silent this long: its share of the fleet's work moves to the others


def _weight(router: str, key: str) -> int:
    return int.from_bytes(blake2b(f"{router}\0{key}".encode(), digest_size=8).digest(), "big")


def make_client(cfg: StateConfig) -> Any:
    """A redis-py asyncio client for a URL, a Sentinel service or a Cluster."""
    t = cfg.timeout_s
    if cfg.sentinel is not None:
        hosts = [(h.rsplit(":", 1)[0], int(h.rsplit(":", 1)[1])) for h in cfg.sentinel.hosts]
        sentinel = Sentinel(hosts, socket_timeout=t, socket_connect_timeout=t)
        return sentinel.master_for(cfg.sentinel.service, socket_timeout=t)
    assert cfg.redis_url is not None
    if cfg.cluster:
        return RedisCluster.from_url(cfg.redis_url, socket_timeout=t, socket_connect_timeout=t)
    return aioredis.from_url(cfg.redis_url, socket_timeout=t, socket_connect_timeout=t)


class RedisStore:
    backend = "redis"

    def __init__(
        self,
        cfg: StateConfig,
        scoring: Scoring,
        heartbeat_ttl_s: float,
        *,
        verify: bool = True,
        retention_s: float = 3600.0,
        client: Any = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.scoring = scoring
        self.ttl = heartbeat_ttl_s
        self.verify = verify  # a node whose heartbeats resume is verified again
        self.retention_s = retention_s
        self.clock = clock
        self.wall = wall
        self.client = client if client is not None else make_client(cfg)
        self.replica = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        p = f"{cfg.key_prefix}{{fleet}}:"
        self.k_changes, self.k_seq, self.k_seen = p + "changes", p + "seq", p + "seen"
        self.k_gone = p + "gone"
        self.k_epoch, self.channel, self.k_node = p + "epoch", p + "events", p + "node:"
        self.k_policy, self.k_routers = p + "policy", p + "routers"
        self.k_keys, self.k_keys_version, self.k_usage = (
            p + "keys",
            p + "keys:version",
            p + "usage:",
        )
        self.k_revoked, self.k_restored = p + "keys:revoked", p + "usage-restored:"
        self.k_tokens, self.k_tokens_version = p + "jointokens", p + "jointokens:version"
        self.k_tokens_revoked = p + "jointokens:revoked"
        self._token_tombs: dict[str, bytes] = {}  # revoked join tokens' records, by id
        self.keyring: Keyring | None = None
        self.join_tokens: JoinTokens | None = None
        self._tokens_seen: bytes | None = None
        self._token_records: dict[str, bytes] = {}  # join token records by id, as loaded
        self._budgets_at = -float("inf")
        self._keys_seen: bytes | None = None
        # What this process knows of the tenancy state, to re-publish it when Redis
        # lost its data: the dynamic key records by id, the revoked ids, and for each
        # usage counter (day: field: count) what it counted itself and the highest
        # total it read.
        self._records: dict[str, bytes] = {}
        self._revoked: set[str] = set()
        self._mine: dict[str, dict[str, int]] = {}
        self._seen: dict[str, dict[str, int]] = {}
        self._seen_at = -float("inf")  # clock() of the last read of today's totals
        self.usage_retried = 0  # requests whose usage a failed flush left to the next
        self.routers: tuple[str, ...] = (self.replica,)  # live router processes
        self._routers_beat = -float("inf")
        self._owners: dict[str, str] = {}
        self.on_policy: Callable[[str, dict[str, Any]], None] | None = None
        self._policy_seen: bytes | None = None
        self._merge = self.client.register_script(MERGE_LUA)
        self._put = self.client.register_script(scripts.PUT)
        self._beat = self.client.register_script(scripts.BEAT)
        self._expire = self.client.register_script(scripts.EXPIRE)
        self._remove = self.client.register_script(scripts.REMOVE)
        self._republish_keys = self.client.register_script(scripts.REPUBLISH_KEYS)
        self._restore_usage = self.client.register_script(scripts.RESTORE_USAGE)
        self._raise_usage = self.client.register_script(scripts.RAISE_USAGE)
        self.fleet = Fleet()
        self.signals = Signals()
        self.last_seq = 0.0
        self.epoch: bytes | None = None
        self._ok = False
        self.errors = 0
        self.last_sync = 0.0  # clock() of the last successful sync
        self.commands_last_tick = 0
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._replay: list[Callable[[], Awaitable[Any]]] = []
        self._busy: set[Node] = set()  # nodes whose in-flight we last reported non-zero

    # -- lifecycle ------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return self._ok

    async def start(self, fleet: Fleet, signals: Signals) -> None:
        self.fleet = fleet
        self.signals = signals
        for node in fleet.nodes.values():
            node.stats.pending = node.stats.pending or Pending()
        loop = asyncio.get_running_loop()
        with contextlib.suppress(*_ERRORS):
            async with asyncio.timeout(self.cfg.timeout_s * 3):
                await self._tick()  # first picture of the fleet, if Redis answers now
        self._tasks = [loop.create_task(self._sync_loop()), loop.create_task(self._listen_loop())]

    async def close(self) -> None:
        # The flag as well as the cancel: on Python 3.11 a cancel that lands as an
        # asyncio.timeout() expires is turned into TimeoutError, which the loops
        # treat as a Redis error and survive.
        self._closing = True
        await cancel_and_wait(*self._tasks)
        with contextlib.suppress(*_ERRORS):
            async with asyncio.timeout(self.cfg.timeout_s):
                await self._flush_dirty()  # hand over what this process measured last
                await self._flush_usage()  # and the usage it counted since the last flush
                await self.client.zrem(self.k_routers, self.replica)  # and its share of work
        with contextlib.suppress(*_ERRORS):
            await self.client.aclose()

    # -- membership (admin and registration paths; these may await Redis) -----

    def _keys(self, node_id: str) -> list[str]:
        return [self.k_node + node_id, self.k_changes, self.k_seq, self.k_seen, self.k_gone]

    async def _write(self, node: Node, only_if_missing: bool, keep_state: bool) -> None:
        args = [node.id, self.channel, int(only_if_missing), int(keep_state), *codec.fields(node)]
        await self._put(keys=self._keys(node.id), args=args)

    async def _run_scripts(self, calls: list[tuple[Any, list[str], list[Any]]]) -> None:
        """Run (script, keys, args) calls in one round trip: a pipeline, or, on Redis
        Cluster (whose pipelines refuse scripts), concurrently."""
        if self.cfg.cluster:
            await asyncio.gather(*(script(keys=k, args=a) for script, k, a in calls))
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for script, keys, args in calls:
                await script(keys=keys, args=args, client=pipe)
            await pipe.execute()

    async def _guard(self, op: Callable[[], Awaitable[Any]]) -> None:
        """Run a membership write. If Redis is away the local change stands, and the
        write is replayed, in order, before the next successful sync."""
        if self._replay:  # keep the order of writes
            self._queue(op)
            return
        try:
            async with asyncio.timeout(self.cfg.timeout_s * 3):
                await op()
        except _ERRORS as e:
            self._failed(e)
            self._queue(op)

    def _queue(self, op: Callable[[], Awaitable[Any]]) -> None:
        if len(self._replay) >= MAX_REPLAY:
            log.error("state store away too long: dropping the oldest queued membership write")
            self._replay.pop(0)
        self._replay.append(op)

    async def _replay_writes(self) -> None:
        while self._replay:
            await self._replay[0]()
            self._replay.pop(0)

    async def register(self, node: Node) -> None:
        node.last_seen = self.wall()
        node.stats.pending = Pending()
        self.fleet.adopt(node)
        await self._guard(lambda: self._write(node, only_if_missing=False, keep_state=False))

    async def heartbeat(self, node_id: str, telemetry: dict[str, Any]) -> None:
        now = self.wall()
        node = self.fleet.nodes[node_id]
        apply_heartbeat(self.fleet, node, telemetry, now, self.verify)
        back, why = codec.returning(node, self.verify)
        args = [node_id, self.channel, repr(now), orjson.dumps(telemetry), back.value, why]
        await self._guard(lambda: self._beat(keys=self._keys(node_id), args=args))

    async def set_state(self, node_id: str, state: NodeState, reason: str) -> None:
        self.fleet.set_state(node_id, state, reason)
        node = self.fleet.nodes[node_id]
        args = [node_id, self.channel, 0, 0, "state", state.value, "reason", reason]
        args += ["until", repr(node.ejected_until), "ejections", node.ejections]
        args += ["drained", int(node.drained)]
        await self._guard(lambda: self._put(keys=self._keys(node_id), args=args))

    async def remove(self, node_id: str) -> None:
        self.fleet.remove(node_id)
        args = [node_id, self.channel]
        await self._guard(lambda: self._remove(keys=self._keys(node_id), args=args))

    async def publish_policy(self, name: str, params: dict[str, Any]) -> None:
        doc = orjson.dumps({"name": name, "params": params, "id": secrets.token_hex(6)})
        self._policy_seen = doc  # this process has it already

        async def write() -> None:
            await self.client.set(self.k_policy, doc)
            await self.client.publish(self.channel, "*policy")

        await self._guard(write)

    def joined_count(self) -> int:
        return joined_count(self.fleet)

    def joined_by(self, token: str) -> list[Node]:
        return joined_by(self.fleet, token)

    async def fetch(self, node_id: str) -> Node | None:
        node = self.fleet.nodes.get(node_id)
        if node is not None:
            return node
        try:
            async with asyncio.timeout(self.cfg.timeout_s * 3):
                h = await self.client.hgetall(self.k_node + node_id)
        except _ERRORS as e:
            self._failed(e)
            return None
        self._apply(node_id, h, self.wall(), self.clock())
        return self.fleet.nodes.get(node_id)

    async def secret_of(self, node_id: str) -> str | None:
        """Read from Redis for every id, whether this process knows it or not; only
        when Redis cannot answer, from the last snapshot."""
        try:
            async with asyncio.timeout(self.cfg.timeout_s * 3):
                stored = await self.client.hget(self.k_node + node_id, "secret")
        except _ERRORS as e:
            self._failed(e)
            return secret_in(self.fleet, node_id)
        return stored.decode() if stored else None

    # -- background sync --------------------------------------------------------

    async def _sync_loop(self) -> None:
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.cfg.flush_interval_s):
                    await self._wake.wait()
            self._wake.clear()
            try:
                async with asyncio.timeout(self.cfg.timeout_s * 3):
                    await self._tick()
            except _ERRORS as e:
                self._failed(e)

    async def _listen_loop(self) -> None:
        """Pub/sub: wake the sync loop at once on urgent changes."""
        backoff = 0.1
        while not self._closing:
            pubsub = self.client.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                backoff = 0.1
                while not self._closing:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5.0)
                    if msg is not None:
                        self._wake.set()
            except _ERRORS:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                with contextlib.suppress(*_ERRORS):
                    await pubsub.aclose()

    def _failed(self, e: BaseException) -> None:
        self.errors += 1
        if self._ok:
            log.warning("state store unreachable, routing on the last snapshot: %r", e)
        self._ok = False

    async def _tick(self) -> None:
        """One sync round: check the epoch (re-publish what Redis lost), flush, pull
        changes, expire."""
        epoch, policy, keys, tokens = await self.client.mget(
            self.k_epoch, self.k_policy, self.k_keys_version, self.k_tokens_version
        )
        commands = 1
        if epoch is None or epoch != self.epoch:
            commands += await self._republish() + 1
            keys = await self.client.get(self.k_keys_version)
        if keys != self._keys_seen:
            commands += await self._load_keys(keys)
        if tokens != self._tokens_seen:
            commands += await self._load_tokens(tokens)
        if policy is not None and policy != self._policy_seen:
            self._policy_seen = policy
            doc = orjson.loads(policy)
            if self.on_policy is not None:
                self.on_policy(doc["name"], doc["params"])
        commands += len(self._replay)
        await self._replay_writes()
        commands += await self._flush_dirty()
        commands += await self._pull()
        commands += await self._expire_silent()
        commands += await self._flush_usage()
        commands += await self._count_budgets()
        commands += await self._read_floor()
        if self.clock() - self._routers_beat >= ROUTER_BEAT_S:
            commands += await self._beat_routers()
        self.commands_last_tick = commands
        if not self._ok and self.errors:
            log.warning("state store reachable again")
        self._ok = True
        self.last_sync = self.clock()

    async def _beat_routers(self) -> int:
        """Say this process is alive; learn which others are."""
        now = self.wall()
        pipe = self.client.pipeline(transaction=False)
        pipe.zadd(self.k_routers, {self.replica: now})
        pipe.zremrangebyscore(self.k_routers, "-inf", now - ROUTER_TTL_S)
        pipe.zrange(self.k_routers, 0, -1)
        *_, live = await pipe.execute()
        routers = tuple(sorted({r.decode() for r in live} | {self.replica}))
        if routers != self.routers:
            log.info("router processes sharing the fleet: %d", len(routers))
            self.routers, self._owners = routers, {}
            if self.keyring is not None:
                self.keyring.set_share(1.0 / len(routers))
        self._routers_beat = self.clock()
        return 3

    def owns(self, key: str) -> bool:
        """Rendezvous hashing over the live router processes. While Redis cannot be
        reached, every process does everything (nothing it did could be shared)."""
        if not self._ok:
            return True
        owner = self._owners.get(key)
        if owner is None:
            owner = self._owners[key] = max(self.routers, key=lambda r: _weight(r, key))
        return owner == self.replica

    # -- client keys and usage (router.tenants) ----------------------------------------

    async def put_key(self, record: dict[str, Any]) -> None:
        await self._change_keys(
            lambda pipe: pipe.hset(self.k_keys, record["id"], orjson.dumps(record))
        )

    async def delete_key(self, key_id: str) -> None:
        """Revoke a key: gone from the keys, and kept among the revoked ids so that
        no re-publish after a loss of Redis's data brings it back."""
        self._revoked.add(key_id)
        await self._change_keys(
            lambda pipe: pipe.hdel(self.k_keys, key_id).sadd(self.k_revoked, key_id)
        )

    async def _change_keys(self, change: Callable[[Any], Any]) -> None:
        await self._change(change, self.k_keys_version, "*keys", self._load_keys)

    async def _change(
        self,
        change: Callable[[Any], Any],
        version: str,
        event: str,
        load: Callable[[bytes | None], Awaitable[int]],
    ) -> None:
        """Apply a change to the client keys or the join tokens; every replica reloads
        them (pub/sub wakes their sync at once), this one before answering."""
        pipe = self.client.pipeline(transaction=True)
        change(pipe)
        pipe.incr(version)
        await pipe.execute()
        await self.client.publish(self.channel, event)
        await load(await self.client.get(version))

    async def _load_keys(self, version: bytes | None) -> int:
        if version is None and self._records:
            # Keys were made, and their version is gone: Redis lost its data. They
            # stay as they are here, and are re-published at the next sync.
            self.epoch = None
            return 0
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(self.k_keys)
        pipe.smembers(self.k_revoked)
        records, revoked = await pipe.execute()
        self._keys_seen = version
        loaded = {kid.decode() for kid in revoked}
        known = self._revoked
        self._revoked = known | loaded
        self._records = {
            kid: raw for k, raw in records.items() if (kid := k.decode()) not in self._revoked
        }
        if len(self._records) < len(records) or not known <= loaded:
            # Redis came back with older data (a snapshot, a replica that missed
            # the last writes): the revocations this process knows stand.
            await self._change_keys(
                lambda pipe: pipe.hdel(self.k_keys, *known).sadd(self.k_revoked, *known)
            )
            return 2
        if self.keyring is not None:
            parsed = {}
            for kid, raw in self._records.items():
                with contextlib.suppress(orjson.JSONDecodeError):
                    parsed[kid] = orjson.loads(raw)
            self.keyring.adopt(parsed)
        return 1

    # -- scoped join tokens (router.join_tokens), kept as the keys are -----------------

    async def put_join_token(self, record: dict[str, Any]) -> None:
        """A token made, or revoked (its record a tombstone, and its id among the
        revoked: no re-publish after a loss of Redis's data brings it back)."""
        tid, raw = record["id"], orjson.dumps(record)
        if record.get("revoked_at") is None:
            await self._change_tokens(lambda pipe: pipe.hset(self.k_tokens, tid, raw))
        else:
            await self._change_tokens(
                lambda pipe: pipe.hset(self.k_tokens, tid, raw).sadd(self.k_tokens_revoked, tid)
            )

    async def delete_join_token(self, token_id: str) -> None:
        await self._change_tokens(lambda pipe: pipe.hdel(self.k_tokens, token_id))

    async def _change_tokens(self, change: Callable[[Any], Any]) -> None:
        await self._change(change, self.k_tokens_version, "*tokens", self._load_tokens)

    async def _load_tokens(self, version: bytes | None) -> int:
        commands = 1
        if version is None and self._token_records:
            # Tokens were made and their version is gone: Redis lost its data.
            commands += await self._republish_tokens()
            version = await self.client.get(self.k_tokens_version)
        records = await self.client.hgetall(self.k_tokens)
        self._tokens_seen = version
        loaded = {tid.decode(): raw for tid, raw in records.items()}
        parsed = {}
        for tid, raw in loaded.items():
            with contextlib.suppress(orjson.JSONDecodeError):
                parsed[tid] = orjson.loads(raw)
                if parsed[tid].get("revoked_at") is not None:
                    self._token_tombs[tid] = raw
        revived = {t: raw for t, raw in self._token_tombs.items() if loaded.get(t, raw) != raw}
        if revived:
            # Redis came back with older data: a token this process saw revoked is
            # live there again. Its revocation stands.
            await self._change_tokens(
                lambda pipe: pipe.hset(self.k_tokens, mapping=revived).sadd(
                    self.k_tokens_revoked, *revived
                )
            )
            return commands + 2
        self._token_records = loaded
        if self.join_tokens is not None:
            self.join_tokens.adopt(parsed)
        return commands

    async def _republish_tokens(self) -> int:
        """The join tokens this process knows, back into a Redis that lost them, as
        the keys are: the live ones unless revoked, and the tombstones of revoked
        ones over any live copy another process put back, whichever goes first."""
        live, tombs = {}, {}
        for tid, raw in self._token_records.items():
            revoked = orjson.loads(raw).get("revoked_at") is not None
            (tombs if revoked else live)[tid] = raw
        args: list[Any] = [len(live)]
        for tid, raw in live.items():
            args += [tid, raw]
        args += list(tombs)
        keys = [self.k_tokens, self.k_tokens_revoked, self.k_tokens_version]
        pipe = self.client.pipeline(transaction=True)
        await self._republish_keys(keys=keys, args=args, client=pipe)
        if tombs:
            pipe.hset(self.k_tokens, mapping=tombs).incr(self.k_tokens_version)
        await pipe.execute()
        return 2

    async def _flush_usage(self) -> int:
        """This process's usage since the last flush, added to the day's totals; kept
        for the next flush when Redis cannot take it. Counted in this process's own
        counts before it is sent, so no read in between shows less than it had."""
        if self.keyring is None or not self.keyring.usage.pending:
            return 0
        usage = self.keyring.usage
        taken = usage.take()
        day = utc_day(self.wall())
        key = self.k_usage + day
        counts = [
            (f"{name}\t{model}\t{field}", value)
            for (name, model), row in taken.items()
            for field, value in zip(Usage.FIELDS, row, strict=True)
            if value
        ]
        mine = self._mine.setdefault(day, {})
        pipe = self.client.pipeline(transaction=False)
        for f, value in counts:
            pipe.hincrby(key, f, value)
            mine[f] = mine.get(f, 0) + value
        pipe.expire(key, USAGE_RETENTION_S)
        try:
            await pipe.execute()
        except BaseException:
            usage.restore(taken)
            for f, value in counts:
                mine[f] -= value
            # Sent again with the next flush: counted twice if Redis applied it before
            # failing to answer (a master that died right then).
            self.usage_retried += sum(row[0] for row in taken.values())
            raise
        return 1

    async def _count_budgets(self) -> int:
        """Each budgeted key's tokens in its current day or month, over all replicas
        (this process's usage was flushed just before)."""
        budgeted = self.keyring.budgeted() if self.keyring is not None else {}
        if not budgeted or self.clock() - self._budgets_at < BUDGET_SYNC_S:
            return 0
        assert self.keyring is not None
        self._budgets_at = self.clock()
        wall = self.wall()
        days = sorted({d for p in set(budgeted.values()) for d in period_days(p, wall)})
        pipe = self.client.pipeline(transaction=False)
        for day in days:
            pipe.hgetall(self.k_usage + day)
        totals = dict.fromkeys(budgeted, 0)
        today = utc_day(wall)
        commands = len(days)
        for day, rows in zip(days, await pipe.execute(), strict=True):
            if day == today:  # past days no longer change: no floor to keep for them
                counters, restored = await self._note_totals(day, rows)
                commands += restored
            else:
                counters = {raw.decode(errors="replace"): int(v) for raw, v in rows.items()}
            for raw, value in counters.items():
                name, _, field = raw.partition("\t")
                # a daily budget counts today only; a monthly one every day so far
                daily = budgeted.get(name) == "day"
                if name in totals and field.endswith("_tokens") and (day == today or not daily):
                    totals[name] += value
        periods = {n: period_of(p, wall) for n, p in budgeted.items()}
        self.keyring.adopt_spent(totals, periods)
        return commands

    async def _read_floor(self) -> int:
        """Every ``FLOOR_SYNC_S``, today's usage totals (the first time, the last
        ``FLOOR_DAYS`` days'), to know what to restore should Redis lose them."""
        if self.keyring is None or self.clock() - self._seen_at < FLOOR_SYNC_S:
            return 0
        first, self._seen_at = self._seen_at < -1e300, self.clock()
        today = date.fromisoformat(utc_day(self.wall()))
        days = [(today - timedelta(days=d)).isoformat() for d in range(FLOOR_DAYS)]
        for known in (self._mine, self._seen):
            for old in [d for d in known if d < days[-1]]:
                del known[old]
        if not first:  # the past days' totals are known; only today's grow
            days = days[:1]
        pipe = self.client.pipeline(transaction=False)
        for day in days:
            pipe.hgetall(self.k_usage + day)
        commands = 1
        for day, rows in zip(days, await pipe.execute(), strict=True):
            commands += (await self._note_totals(day, rows))[1]
        return commands

    def _known(self, day: str) -> dict[str, int]:
        """The least each usage counter of ``day`` is: the highest total this process
        read, or its own count when more."""
        known = dict(self._seen.get(day, {}))
        for f, v in self._mine.get(day, {}).items():
            if v > known.get(f, 0):
                known[f] = v
        return known

    async def _note_totals(self, day: str, rows: dict[bytes, bytes]) -> tuple[dict[str, int], int]:
        """A day's usage counters as read from Redis, none lower than this process
        knew them (counters never go back), and the commands spent raising in Redis
        those it read lower. Only called in the sync round, after this process's
        flush: a read never misses this process's own counts."""
        counters = {raw.decode(errors="replace"): int(v) for raw, v in rows.items()}
        lower = {f: v for f, v in self._known(day).items() if counters.get(f, 0) < v}
        seen = self._seen.setdefault(day, {})
        for f, v in counters.items():
            if v > seen.get(f, 0):
                seen[f] = v
        if not lower:
            return counters, 0
        args: list[Any] = []
        for f, v in lower.items():
            args += [f, v, counters.get(f, 0)]
        await self._raise_usage(keys=[self.k_usage + day], args=args)
        counters.update(lower)
        return counters, 1

    async def read_usage(self, since: str) -> dict[tuple[str, str], list[int]]:
        first, last = date.fromisoformat(since), date.fromisoformat(utc_day(self.wall()))
        span = min((last - first).days + 1, MAX_USAGE_DAYS)
        days = [(first + timedelta(days=d)).isoformat() for d in range(span)]
        pipe = self.client.pipeline(transaction=False)
        for day in days:
            pipe.hgetall(self.k_usage + day)
        out: dict[tuple[str, str], list[int]] = {}
        for day, rows in zip(days, await pipe.execute(), strict=True):
            counters = {raw.decode(errors="replace"): int(v) for raw, v in rows.items()}
            for f, v in self._known(day).items():  # never lower than known
                if counters.get(f, 0) < v:
                    counters[f] = v
            for raw, value in counters.items():
                try:
                    name, model, field = raw.split("\t")
                    i = Usage.FIELDS.index(field)
                except ValueError:
                    continue
                out.setdefault((name, model), [0] * len(Usage.FIELDS))[i] += value
        if self.keyring is not None:
            add_rows(out, self.keyring.usage.pending)  # not flushed yet
        return out

    async def _republish(self) -> int:
        """Redis is new or lost its data: announce an epoch, re-publish what we know."""
        await self.client.set(self.k_epoch, secrets.token_hex(8), nx=True)
        self.epoch = await self.client.get(self.k_epoch)
        calls = []
        for node in self.fleet.nodes.values():
            static = node.source is Source.CONFIG
            args = [node.id, self.channel, int(not static), 1, *codec.fields(node)]
            calls.append((self._put, self._keys(node.id), args))
        await self._run_scripts(calls)
        self.last_seq = 0.0  # read everything once
        return 2 + len(self.fleet.nodes) + await self._republish_tenancy()

    async def _republish_tenancy(self) -> int:
        """The client keys, revocations and usage totals this process knows, back
        into a Redis that lost them (nothing, for a process that knows none)."""
        commands = 0
        if self._token_records:
            commands += await self._republish_tokens()
        if self._records or self._revoked:
            args: list[Any] = [len(self._records)]
            for kid, raw in self._records.items():
                args += [kid, raw]
            args += sorted(self._revoked)
            keys = [self.k_keys, self.k_revoked, self.k_keys_version]
            commands += 1
            if await self._republish_keys(keys=keys, args=args):
                log.warning("state store had lost its client keys: re-published them")
        for day in self._mine.keys() | self._seen.keys():
            mine, seen = self._mine.get(day, {}), self._seen.get(day, {})
            args: list[Any] = [USAGE_RETENTION_S, self.replica]
            for f in mine.keys() | seen.keys():
                args += [f, mine.get(f, 0), seen.get(f, 0)]
            if len(args) > 2:
                await self._restore_usage(
                    keys=[self.k_usage + day, self.k_restored + day], args=args
                )
                commands += 1
        return commands

    async def _flush_dirty(self) -> int:
        dirty = self.signals.take_for_store()
        # Take each node's pending outcomes before the first await: outcomes that
        # arrive while the batch is in flight go to a fresh Pending, not lost.
        batch: list[tuple[Node, Pending, int]] = []
        for node in dirty | self._busy:
            st = node.stats
            if st.pending is not None and node.id in self.fleet.nodes:
                batch.append((node, st.pending, st.in_flight))
                st.pending = Pending()
        if not batch:
            return 0
        now = repr(self.wall())
        half_life, tau = self.scoring.success_half_life_s, self.scoring.decay_s
        calls = []
        for node, p, in_flight in batch:
            mean = p.lat_sum / p.lat_n if p.lat_n else 0.0
            args = [node.id, now, self.replica, in_flight, p.attempts, p.successes]
            args += [repr(p.lat_max), repr(mean), half_life, tau]
            calls.append((self._merge, self._keys(node.id)[:3], args))
        try:
            await self._run_scripts(calls)
        except BaseException:
            for node, p, _ in batch:  # not sent: keep it for the next round
                if node.stats.pending is not None:
                    node.stats.pending.merge(p)
            self.signals.for_store |= dirty
            raise
        for node, _, _ in batch:
            if node.stats.in_flight:
                self._busy.add(node)
            else:
                self._busy.discard(node)
        return len(batch)

    async def _pull(self) -> int:
        """Read the nodes changed since the last sequence seen, in bounded chunks.

        A full resync (first start, Redis restarted) is spread over several ticks
        and yields to the event loop between chunks, so requests never stall on it.
        """
        commands = 0
        for _ in range(PULL_CHUNKS_PER_TICK):
            changed = await self.client.zrangebyscore(
                self.k_changes, f"({self.last_seq!r}", "+inf", start=0, num=PULL_CHUNK,
                withscores=True,
            )  # fmt: skip
            commands += 1
            if not changed:
                break
            async with self.client.pipeline(transaction=False) as pipe:
                for member, _ in changed:
                    pipe.hgetall(self.k_node + member.decode())
                hashes = await pipe.execute()
            commands += len(changed)
            now_w, now_m = self.wall(), self.clock()
            with self.fleet.batch():
                for (member, _), h in zip(changed, hashes, strict=True):
                    self._apply(member.decode(), h, now_w, now_m)
            self.last_seq = changed[-1][1]
            if len(changed) < PULL_CHUNK:
                break
            await asyncio.sleep(0)
        return commands

    async def _expire_silent(self) -> int:
        """Mark joined nodes silent past the TTL gone; forget those gone for the
        retention time."""
        limit = self.wall() - self.ttl
        old = await self.client.zrangebyscore(self.k_seen, "-inf", f"({limit!r}", start=0, num=500)
        forget_before = limit - self.retention_s
        forgotten = await self.client.zrangebyscore(
            self.k_gone, "-inf", f"({forget_before!r}", start=0, num=500
        )
        if not old and not forgotten:
            return 2
        reason = f"no heartbeat for {self.ttl:g}s"
        calls = []
        for member in old:
            nid = member.decode()
            calls.append((self._expire, self._keys(nid), [nid, self.channel, repr(limit), reason]))
        for member in forgotten:
            nid = member.decode()
            calls.append((self._remove, self._keys(nid), [nid, self.channel]))
        await self._run_scripts(calls)
        return 2 + len(calls)

    # -- applying shared state locally ---------------------------------------------

    def _apply(self, node_id: str, h: dict[bytes, bytes], now_w: float, now_m: float) -> None:
        fleet = self.fleet
        node = fleet.nodes.get(node_id)
        if not h:
            if node is not None:
                fleet.remove(node_id)
            return
        if node is None or not codec.same_claims(node, h):
            fresh = codec.from_hash(node_id, h, self.scoring)
            if fresh is None:
                return  # only statistics reached Redis for a node it no longer describes
            if node is not None:
                fresh.auth_header = node.auth_header  # a static node's key stays local
            fresh.stats.pending = Pending()
            fleet.adopt(fresh)
            node = fresh
        state = NodeState(codec.text(h.get(b"state"), node.state.value))
        reason = codec.text(h.get(b"reason"), node.state_reason)
        if state is not node.state or reason != node.state_reason:
            fleet.set_state(node_id, state, reason)
        node.ejected_until = codec.number(h.get(b"until"), node.ejected_until)
        node.ejections = int(h.get(b"ejections", node.ejections))
        node.drained = h.get(b"drained") == b"1"
        node.secret_hash = codec.text(h.get(b"secret"))
        node.last_seen = codec.number(h.get(b"seen"), 0.0)
        if b"tel" in h:
            node.telemetry = orjson.loads(h[b"tel"])
        self._apply_stats(node, h, now_w, now_m)

    def _apply_stats(self, node: Node, h: dict[bytes, bytes], now_w: float, now_m: float) -> None:
        num = codec.number
        fresh_after = now_w - 3 * self.cfg.flush_interval_s - 1.0
        remote = 0
        mine = ("if:" + self.replica).encode()
        for key, value in h.items():
            if key.startswith(b"if:") and key != mine:
                if num(h.get(b"ift:" + key[3:]), 0.0) >= fresh_after:
                    remote += int(value)
        node.stats.adopt_shared(codec.shared(h), now_m, now_w, remote)
