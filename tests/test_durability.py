"""Nothing a user created or paid for is lost when Redis loses its data, or when the
router restarts on its embedded store (real Redis, real sockets)."""

from __future__ import annotations

from random import Random
from typing import Any

import aiohttp
import orjson
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
    """Use ``key`` until its token budget is used up (a share held by requests in
    progress, or a request with no room left, only delays)."""

    async def used_up() -> bool:
        status, code = await ask(http, url, key)
        assert status == 200 or code in (
            "insufficient_quota",
            "budget_reserved",
            "rate_limit_exceeded",
        )
        return code == "insufficient_quota"

    await until(used_up, 10)


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


async def test_the_embedded_store_keeps_keys_tokens_usage_and_budgets_across_a_restart(
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
        for name in ("provider", "gone"):
            async with http.post(url + "/admin/join-tokens", json={"name": name}, headers=ADMIN):
                pass
        async with http.delete(url + "/admin/join-tokens/gone", headers=ADMIN) as resp:
            assert resp.status in (200, 204)
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
        async with http.get(url + "/admin/join-tokens", headers=ADMIN) as resp:
            live = {t["name"] for t in (await resp.json())["data"] if t.get("state") != "revoked"}
        assert "provider" in live and "gone" not in live
    finally:
        await runner.cleanup()


async def test_a_revoked_join_token_stays_revoked_whoever_re_publishes_first(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession, redis_server: RedisServer
) -> None:
    sim = await fleet("a")
    common: dict[str, Any] = {
        "state": {"redis_url": redis_server.url},
        "admin": {"token_env": "DURABLE_ADMIN"},
        "registry": {"allowed_networks": ["127.0.0.0/8"]},
    }
    a, b = [await make_router([node_entry(sim)], **common) for _ in range(2)]
    async with http.post(a.url + "/admin/join-tokens", json={"name": "acme"}, headers=ADMIN) as r:
        made = await r.json()
    tid, token = made["id"], made["token"]
    tokens = "ballast:{fleet}:jointokens"
    live = redis_server.client().hget(tokens, tid)
    await until(lambda: b.router.store._token_records.get(tid) == live, 5)
    async with http.delete(a.url + "/admin/join-tokens/acme", headers=ADMIN) as r:
        assert r.status in (200, 204)
    await until(lambda: b.router.store._token_records.get(tid) != live, 5)
    # Replica b missed the revocation (it was cut off), and re-publishes first.
    b.router.store._token_records[tid] = live
    redis_server.client().flushall()
    await b.router.store._load_tokens(None)

    def revoked_in_redis() -> bool:
        raw = redis_server.client().hget(tokens, tid)
        return raw is not None and orjson.loads(raw).get("revoked_at") is not None

    await until(revoked_in_redis, 5)
    await until(lambda: b.router.store._token_records.get(tid) != live, 5)
    claims = {"url": sim.url, "models": ["tiny-llama"]}
    for url in (a.url, b.url):
        headers = {"Authorization": f"Bearer {token}"}
        async with http.post(url + "/v1/nodes/register", json=claims, headers=headers) as r:
            assert r.status in (401, 404), await r.text()  # refused (404: no token left)
