"""Redis misbehaving, hostile token and key holders, against durable tenancy state,
scoped join tokens and aliases: each test tells an attack that once got through and
asserts the guarantee that now holds (real Redis, real sockets). A FLUSHALL "at an
awkward moment" is made deterministic by wrapping one step of a router's sync
round: the FLUSHALL itself is real, and the store code around it runs unchanged."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from random import Random
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from router.app import ROUTER, Router, Runner, create_app
from router.config import parse_config
from router.store import MemoryStore
from router.store.redis import RedisStore
from tests.conftest import (
    MODEL,
    MakeRouter,
    MakeSim,
    RedisServer,
    RouterHandle,
    chat,
    node_entry,
)
from tests.test_supply import until

ADMIN = {"Authorization": "Bearer admin-token"}
REGISTRY = {"allowed_networks": ["127.0.0.0/8"]}
USAGE = "ballast:{fleet}:usage:"


@pytest.fixture(autouse=True)
def admin_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RT_ADMIN", "admin-token")


def common(redis_url: str | None = None, **state: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {"admin": {"token_env": "RT_ADMIN"}, "registry": REGISTRY}
    cfg["state"] = {"redis_url": redis_url, **state} if redis_url else state
    return cfg


async def create_key(http: aiohttp.ClientSession, url: str, **spec: Any) -> str:
    async with http.post(url + "/admin/keys", json=spec, headers=ADMIN) as resp:
        assert resp.status == 201, await resp.text()
        return str((await resp.json())["key"])


async def ask(http: aiohttp.ClientSession, url: str, key: str) -> int:
    headers = {"Authorization": f"Bearer {key}"}
    async with http.post(url + "/v1/chat/completions", json=chat(), headers=headers) as resp:
        await resp.read()
        return resp.status


async def requests_used(http: aiohttp.ClientSession, url: str) -> dict[str, int]:
    """Requests per key name, as ``GET /admin/usage`` answers them."""
    async with http.get(url + "/admin/usage", headers=ADMIN) as resp:
        assert resp.status == 200, await resp.text()
        rows = (await resp.json())["data"]
    out: dict[str, int] = {}
    for row in rows:
        out[row["key"]] = out.get(row["key"], 0) + row["requests"]
    return out


def redis_requests(redis: RedisServer, name: str) -> int:
    """Requests of key ``name`` in Redis's usage hashes, every day summed."""
    client = redis.client()
    total = 0
    for k in client.keys(USAGE + "*"):
        for f, v in client.hgetall(k).items():
            if f.decode().split("\t")[0::2] == [name, "requests"]:
                total += int(v)
    client.close()
    return total


def store_of(r: RouterHandle) -> RedisStore:
    store = r.router.store
    assert isinstance(store, RedisStore)
    return store


async def ticks(store: RedisStore, n: int = 2) -> None:
    """Until ``n`` more sync rounds of ``store`` have completed."""
    for _ in range(n):
        mark = store.clock()

        def after(mark: float = mark) -> bool:
            return store.healthy and store.last_sync > mark

        await until(after, 10)


def flushall_before(
    store: RedisStore, step: str, redis: RedisServer, when: Callable[[], bool]
) -> list[bool]:
    """FLUSHALL once, right before the sync round's ``step`` runs while ``when()``
    holds: after the round read the epoch, before that step. Answers a list that
    holds True once the FLUSHALL happened."""
    original = getattr(store, step)
    done: list[bool] = []

    async def wrapped() -> int:
        if not done and when():
            client = redis.client()
            client.flushall()
            client.close()
            done.append(True)
        return int(await original())

    setattr(store, step, wrapped)
    return done


# -- 1. A revocation undone by a Redis that comes back with older data -------------


async def test_revoked_client_key_stays_revoked_when_redis_comes_back_from_an_older_snapshot(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession, redis_server: RedisServer
) -> None:
    """Redis restarts from its last RDB snapshot (or a replica that missed the last
    writes is promoted): the epoch is the same, the keys' version is older, and the
    router adopts the stale keys hash, in which the revoked key is live again."""
    sim = await fleet("a")
    r = await make_router([node_entry(sim)], **common(redis_server.url))
    await create_key(http, r.url, name="keeper")  # keys stay on when the victim goes
    key = await create_key(http, r.url, name="victim")
    assert await ask(http, r.url, key) == 200
    redis_server.client().save()  # the snapshot a restart or a promoted replica has
    async with http.delete(r.url + "/admin/keys/victim", headers=ADMIN) as resp:
        assert resp.status in (200, 204)
    assert await ask(http, r.url, key) == 401
    redis_server.kill()
    redis_server.start()  # loads dump.rdb: the state from before the revocation
    await ticks(store_of(r), 3)
    assert await ask(http, r.url, key) == 401, "a revoked key serves again"


async def test_revoked_join_token_stays_revoked_when_redis_comes_back_from_an_older_snapshot(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession, redis_server: RedisServer
) -> None:
    """The tombstone record replaced the live one; the older snapshot has the live
    one, with its hash, and every router adopts it: the provider joins again."""
    r = await make_router([], **common(redis_server.url))
    async with http.post(
        r.url + "/admin/join-tokens", json={"name": "provider"}, headers=ADMIN
    ) as resp:
        assert resp.status == 201
        token = (await resp.json())["token"]
    redis_server.client().save()
    async with http.delete(r.url + "/admin/join-tokens/provider", headers=ADMIN) as resp:
        assert resp.status in (200, 204)
    redis_server.kill()
    redis_server.start()
    await ticks(store_of(r), 3)
    sim = await fleet("comeback")
    body = {"id": "comeback", "url": sim.url, "models": [MODEL]}
    headers = {"Authorization": f"Bearer {token}"}
    async with http.post(r.url + "/v1/nodes/register", json=body, headers=headers) as resp:
        # refused (404 once no token is left at all: self-registration is off)
        assert resp.status in (401, 404), "a revoked join token registers nodes again"


# -- 2. Usage written into an emptied Redis before the restore: counted twice -------


async def test_usage_raised_into_a_flushed_redis_is_not_restored_on_top(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession, redis_server: RedisServer
) -> None:
    """FLUSHALL after a sync round read the epoch and before it read the day's
    totals: the read finds them lower than known and RAISE_USAGE writes them back;
    the next round sees the epoch gone and RESTORE_USAGE adds the same totals again
    (its bookkeeping hash knows nothing of the raise). Every key's usage doubles."""
    sim = await fleet("a")
    r = await make_router([node_entry(sim)], **common(redis_server.url))
    store = store_of(r)
    key = await create_key(http, r.url, name="tenant")
    for _ in range(5):
        assert await ask(http, r.url, key) == 200

    async def in_redis() -> bool:
        return redis_requests(redis_server, "tenant") == 5

    await until(in_redis, 5)
    await ticks(store)  # this router has read the totals (its floor is 5)
    # The next time the floor is due (every FLOOR_SYNC_S), Redis is flushed first.
    done = flushall_before(store, "_read_floor", redis_server, lambda: True)
    store._seen_at = -1e299  # due at once (not the first read: today's totals only)
    await until(lambda: bool(done), 10)
    await ticks(store, 3)  # the round that raised, and the one that restored
    assert await requests_used(http, r.url) == {"tenant": 5}
    assert redis_requests(redis_server, "tenant") == 5, "usage counted twice"


async def test_usage_flushed_into_a_flushed_redis_in_the_same_round_is_not_counted_twice(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession, redis_server: RedisServer
) -> None:
    """FLUSHALL after a round read the epoch and before it flushed usage: the flush's
    HINCRBY lands in the empty hash and is added to this router's own counts; the
    next round's RESTORE_USAGE adds those own counts (flush included) on top."""
    sim = await fleet("a")
    # state.flush_interval_s 60: no round runs unless something wakes it; the
    # floor is not due again either, so only the flush meets the empty Redis.
    r = await make_router([node_entry(sim)], **common(redis_server.url, flush_interval_s=60))
    store = store_of(r)
    key = await create_key(http, r.url, name="tenant")
    for _ in range(3):
        assert await ask(http, r.url, key) == 200
    keyring = store.keyring
    assert keyring is not None
    done = flushall_before(store, "_flush_usage", redis_server, lambda: bool(keyring.usage.pending))
    store._wake.set()
    await until(lambda: bool(done), 10)
    store._wake.set()
    await ticks(store, 1)
    store._wake.set()
    await ticks(store, 1)  # re-published: the epoch was gone
    assert redis_requests(redis_server, "tenant") == 3, "usage counted twice"
    assert await requests_used(http, r.url) == {"tenant": 3}


async def test_the_epoch_key_lost_alone_does_not_restore_usage_on_top_of_itself(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession, redis_server: RedisServer
) -> None:
    """The epoch key gone while the usage hashes stay (evicted under a maxmemory
    allkeys-* policy, deleted by hand, or the keys' version gone: _load_keys sets
    epoch None): the router re-publishes, and RESTORE_USAGE adds every counter it
    knows on top of the intact totals."""
    sim = await fleet("a")
    r = await make_router([node_entry(sim)], **common(redis_server.url))
    store = store_of(r)
    key = await create_key(http, r.url, name="tenant")
    for _ in range(4):
        assert await ask(http, r.url, key) == 200

    async def in_redis() -> bool:
        return redis_requests(redis_server, "tenant") == 4

    await until(in_redis, 5)
    await ticks(store)
    redis_server.client().delete("ballast:{fleet}:epoch")
    await ticks(store, 3)
    assert redis_requests(redis_server, "tenant") == 4, "usage counted twice"


# -- 3. A graceful stop does not flush usage -----------------------------------------


async def test_a_graceful_stop_flushes_the_usage_counted_since_the_last_flush(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession, redis_server: RedisServer
) -> None:
    """docs/operations.md: "a graceful stop flushes". RedisStore.close() flushes
    the nodes' measurements (_flush_dirty) but not the keys' usage."""
    sim = await fleet("a")
    r = await make_router([node_entry(sim)], **common(redis_server.url, flush_interval_s=60))
    key = await create_key(http, r.url, name="tenant")
    await ticks(store_of(r), 1)  # the round the key's creation woke is over
    for _ in range(3):
        assert await ask(http, r.url, key) == 200
    keyring = store_of(r).keyring
    assert keyring is not None and keyring.usage.pending  # not flushed yet
    await r.runner.cleanup()  # a rolling update's SIGTERM ends here
    assert redis_requests(redis_server, "tenant") == 3, "usage lost by a graceful stop"


# -- 4. The embedded store's SQLite ledger --------------------------------------------


async def start(cfg: dict[str, Any]) -> tuple[Router, web.AppRunner, str]:
    config = parse_config(cfg)
    app = create_app(config, rng=Random(1))
    runner = Runner(app, config)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return app[ROUTER], runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def test_a_busy_ledger_does_not_kill_the_embedded_store_or_lose_usage(
    fleet: MakeSim, http: aiohttp.ClientSession, tmp_path: Any
) -> None:
    """Anything holding the SQLite file's write lock for a while (the sqlite3 shell
    in a transaction, a backup, a second `ballast serve` on the same state.path, as
    `--workers N` starts) makes ``add_usage`` raise "database is locked" after its
    5 s busy wait, which blocks the event loop meanwhile. The exception ends
    MemoryStore._expire_loop for good (no node expires any more, no usage is ever
    written again) and the usage taken for that flush is gone from the ledger."""
    sim = await fleet("a")
    path = tmp_path / "ballast.db"
    cfg = {"nodes": [node_entry(sim)], "health": {"probe": False}, **common(path=str(path))}
    router, runner, url = await start(cfg)
    try:
        store = router.store
        assert isinstance(store, MemoryStore) and store.keyring is not None
        key = await create_key(http, url, name="tenant")
        holder = sqlite3.connect(str(path), isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        assert await ask(http, url, key) == 200
        usage = store.keyring.usage
        await until(lambda: not usage.pending, 10)  # taken by a flush, which was refused
        holder.execute("ROLLBACK")
        holder.close()
        await asyncio.sleep(0)
        assert store._task is not None and not store._task.done(), "the expire loop died"
    finally:
        await runner.cleanup()
    router, runner, url = await start(cfg)
    try:
        assert await requests_used(http, url) == {"tenant": 1}, "usage lost"
    finally:
        await runner.cleanup()


async def test_scoped_join_tokens_survive_an_embedded_store_restart(
    fleet: MakeSim, http: aiohttp.ClientSession, tmp_path: Any
) -> None:
    """state.path keeps client keys and usage, not join tokens: after a restart
    every provider's token is gone (its agents get 401 for ever), and a revoked
    token's tombstone is gone too."""
    cfg = {"nodes": [], "health": {"probe": False}, **common(path=str(tmp_path / "b.db"))}
    _, runner, url = await start(cfg)
    try:
        async with http.post(
            url + "/admin/join-tokens", json={"name": "provider"}, headers=ADMIN
        ) as resp:
            assert resp.status == 201
            token = (await resp.json())["token"]
    finally:
        await runner.cleanup()
    _, runner, url = await start(cfg)
    try:
        sim = await fleet("after-restart")
        body = {"id": "after-restart", "url": sim.url, "models": [MODEL]}
        headers = {"Authorization": f"Bearer {token}"}
        async with http.post(url + "/v1/nodes/register", json=body, headers=headers) as resp:
            assert resp.status == 201, "the provider's join token was lost by a restart"
    finally:
        await runner.cleanup()


# -- 5. Scoped token limits ------------------------------------------------------------


async def test_max_nodes_holds_against_concurrent_registrations(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession, redis_server: RedisServer
) -> None:
    """The node count is checked, then ``store.fetch`` awaits Redis for the new id,
    then the node is adopted: registrations sent at once all pass the check."""
    r = await make_router([], **common(redis_server.url))
    async with http.post(
        r.url + "/admin/join-tokens", json={"name": "small", "max_nodes": 1}, headers=ADMIN
    ) as resp:
        assert resp.status == 201
        token = (await resp.json())["token"]
    sims = [await fleet(f"n{i}") for i in range(8)]
    headers = {"Authorization": f"Bearer {token}"}

    async def register(i: int) -> int:
        body = {"id": f"n{i}", "url": sims[i].url, "models": [MODEL]}
        async with http.post(r.url + "/v1/nodes/register", json=body, headers=headers) as resp:
            await resp.read()
            return resp.status

    statuses = await asyncio.gather(*(register(i) for i in range(8)))
    assert statuses.count(201) == 1, statuses
    joined = [n for n in r.router.fleet.nodes.values() if n.join_token == "small"]
    assert len(joined) == 1, [n.id for n in joined]


# -- 6. Aliases and a key's allow-list --------------------------------------------------


async def test_a_key_allowed_a_model_by_its_alias_may_use_the_name_it_lists(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    """A key whose allow-list names a model by an alias: /v1/models lists the alias
    to that key, and a request by that very name is refused 403 (admission checks
    the model's own name against the list, which holds the alias); a key allowed
    the model's own name is not shown its aliases."""
    sim = await fleet("a", models=("canon",))
    r = await make_router([node_entry(sim)], models={"canon": {"aliases": ["nick"]}}, **common())
    by_alias = await create_key(http, r.url, name="by-alias", models=["nick"])
    by_name = await create_key(http, r.url, name="by-name", models=["canon"])

    async def listed(key: str) -> list[str]:
        headers = {"Authorization": f"Bearer {key}"}
        async with http.get(r.url + "/v1/models", headers=headers) as resp:
            return [m["id"] for m in (await resp.json())["data"]]

    assert await listed(by_alias) == ["canon", "nick"]  # the model, by each of its names
    headers = {"Authorization": f"Bearer {by_alias}"}
    body = chat(model="nick")
    async with http.post(r.url + "/v1/chat/completions", json=body, headers=headers) as resp:
        assert resp.status == 200, "the model the key is shown is refused to it"
    assert await listed(by_name) == ["canon", "nick"]
