"""Nothing a user created or paid for is lost when Redis loses its data, or when the
router restarts on its embedded store (real Redis, real sockets)."""

from __future__ import annotations

from random import Random
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from router.app import ROUTER, Router, Runner, create_app
from router.config import parse_config
from tests.conftest import MakeRouter, MakeSim, RedisServer, RouterHandle, chat, node_entry
from tests.test_supply import until

ADMIN = {"Authorization": "Bearer admin-token"}


@pytest.fixture(autouse=True)
def admin_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DURABLE_ADMIN", "admin-token")


async def create_key(http: aiohttp.ClientSession, url: str, **spec: Any) -> str:
    async with http.post(url + "/admin/keys", json=spec, headers=ADMIN) as resp:
        assert resp.status == 201, await resp.text()
        return str((await resp.json())["key"])


async def ask(http: aiohttp.ClientSession, url: str, key: str) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {key}"}
    async with http.post(url + "/v1/chat/completions", json=chat(), headers=headers) as resp:
        doc = await resp.json()
        return resp.status, (doc.get("error") or {}).get("code", "")


async def names(http: aiohttp.ClientSession, url: str) -> set[str]:
    async with http.get(url + "/admin/keys", headers=ADMIN) as resp:
        return {k["name"] for k in (await resp.json())["data"]}


async def tokens_used(http: aiohttp.ClientSession, url: str) -> dict[str, int]:
    async with http.get(url + "/admin/usage", headers=ADMIN) as resp:
        rows = (await resp.json())["data"]
    out: dict[str, int] = {}
    for row in rows:
        out[row["key"]] = out.get(row["key"], 0) + row["prompt_tokens"] + row["completion_tokens"]
    return out


async def spend(http: aiohttp.ClientSession, url: str, key: str) -> None:
    """Use ``key`` until its token budget refuses it."""
    for _ in range(200):
        status, code = await ask(http, url, key)
        if status == 429:
            assert code == "insufficient_quota"
            return
        assert status == 200
    raise AssertionError("the budget never ran out")


async def tenancy(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession, redis_url: str
) -> tuple[list[RouterHandle], str, str, str]:
    """Two replicas on one Redis with three keys: one serving, one whose budget is
    used up, one revoked."""
    sim = await fleet("a")
    common: dict[str, Any] = {
        "state": {"redis_url": redis_url},
        "admin": {"token_env": "DURABLE_ADMIN"},
    }
    routers = [await make_router([node_entry(sim)], **common) for _ in range(2)]
    a, b = (r.url for r in routers)
    serving = await create_key(http, a, name="serving")
    spent = await create_key(http, a, name="spent", budget_tokens=60)
    revoked = await create_key(http, a, name="revoked")
    async with http.delete(a + "/admin/keys/revoked", headers=ADMIN) as resp:
        assert resp.status in (200, 204), await resp.text()

    async def served_on_b() -> bool:
        return (await ask(http, b, serving))[0] == 200

    await until(served_on_b, 5)
    for _ in range(3):
        assert await ask(http, b, serving) == (200, "")
    await spend(http, a, spent)

    async def both_refuse_spent() -> bool:
        return all([await ask(http, u, spent) == (429, "insufficient_quota") for u in (a, b)])

    await until(both_refuse_spent, 5)

    async def flushed() -> bool:  # both replicas' usage is in Redis
        return (await tokens_used(http, a)).keys() == {"serving", "spent"}

    await until(flushed, 5)
    return routers, serving, spent, revoked


async def assert_nothing_lost(
    http: aiohttp.ClientSession,
    routers: list[RouterHandle],
    keys: tuple[str, str, str],
    before: dict[str, int],
    redis: RedisServer,
) -> None:
    serving, spent, revoked = keys
    urls = [r.url for r in routers]

    async def back_in_redis() -> bool:
        stored = redis.client().hgetall("ballast:{fleet}:keys")
        return len(stored) == 2

    await until(back_in_redis, 5)
    for url in urls:
        assert await ask(http, url, serving) == (200, "")
        assert await ask(http, url, spent) == (429, "insufficient_quota")
        assert (await ask(http, url, revoked))[0] == 401
        assert await names(http, url) == {"serving", "spent"}
        used = await tokens_used(http, url)
        assert all(used.get(k, 0) >= v for k, v in before.items()), (used, before)
    # The revocation is back in Redis too, so no later re-publish revives the key.
    assert "ballast:{fleet}:keys:revoked" in {k.decode() for k in redis.client().keys()}


async def test_keys_usage_and_budgets_survive_a_flushall(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession, redis_server: RedisServer
) -> None:
    routers, *keys = await tenancy(fleet, make_router, http, redis_server.url)
    before = await tokens_used(http, routers[0].url)
    assert before["spent"] >= 60 and before["serving"] > 0
    redis_server.client().flushall()
    await assert_nothing_lost(http, routers, (keys[0], keys[1], keys[2]), before, redis_server)


async def test_keys_usage_and_budgets_survive_a_redis_restart_without_persistence(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession, redis_server: RedisServer
) -> None:
    routers, *keys = await tenancy(fleet, make_router, http, redis_server.url)
    before = await tokens_used(http, routers[1].url)
    redis_server.kill()
    for _ in range(3):  # served on the last snapshot while Redis is away
        assert await ask(http, routers[0].url, keys[0]) == (200, "")
    redis_server.start()
    await assert_nothing_lost(http, routers, (keys[0], keys[1], keys[2]), before, redis_server)


async def start(cfg: dict[str, Any]) -> tuple[Router, web.AppRunner, str]:
    config = parse_config(cfg)
    app = create_app(config, rng=Random(1))
    runner = Runner(app, config)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return app[ROUTER], runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def test_the_embedded_store_keeps_keys_usage_and_budgets_across_a_restart(
    fleet: MakeSim, http: aiohttp.ClientSession, tmp_path: Any
) -> None:
    sim = await fleet("a")
    cfg = {
        "nodes": [node_entry(sim)],
        "health": {"probe": False},
        "admin": {"token_env": "DURABLE_ADMIN"},
        "state": {"path": str(tmp_path / "state" / "ballast.db")},
    }
    _, runner, url = await start(cfg)
    try:
        serving = await create_key(http, url, name="serving")
        spent = await create_key(http, url, name="spent", budget_tokens=60)
        revoked = await create_key(http, url, name="revoked")
        async with http.delete(url + "/admin/keys/revoked", headers=ADMIN) as resp:
            assert resp.status in (200, 204)
        assert await ask(http, url, serving) == (200, "")
        await spend(http, url, spent)
        before = await tokens_used(http, url)
    finally:
        await runner.cleanup()
    _, runner, url = await start(cfg)
    try:
        assert await ask(http, url, serving) == (200, "")
        assert await ask(http, url, spent) == (429, "insufficient_quota")
        assert (await ask(http, url, revoked))[0] == 401
        assert await names(http, url) == {"serving", "spent"}
        used = await tokens_used(http, url)
        assert used["spent"] == before["spent"] and used["serving"] > before["serving"]
    finally:
        await runner.cleanup()
