"""Client keys: authentication, admin API, limits and usage (real sockets, real Redis)."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import aiohttp
import orjson
import pytest
from multidict import CIMultiDict

from router.config import AuthConfig, KeyLimits
from router.tenants import Key, Keyring, Limiter, hash_key, usage_from
from tests.conftest import MODEL, MakeRouter, MakeSim, RedisServer, chat, node_entry
from tests.test_supply import until

ADMIN = {"Authorization": "Bearer admin-token"}
STATIC_KEY = "sk-bal-static-team-key-for-tests-0123456789abcdef"


@pytest.fixture(autouse=True)
def tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_ADMIN_TOKEN", "admin-token")
    monkeypatch.setenv("TEAM_KEY", STATIC_KEY)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def post(
    http: aiohttp.ClientSession, url: str, body: dict[str, Any], headers: dict[str, str]
) -> tuple[int, dict[str, Any], Any]:
    async with http.post(
        url + "/v1/chat/completions", data=orjson.dumps(body), headers=headers
    ) as r:
        raw = await r.read()
        doc = orjson.loads(raw) if r.content_type == "application/json" else raw
        return r.status, dict(r.headers), doc


async def test_keys_are_required_and_allow_listed(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    a = await fleet("a", models=("m1",))
    b = await fleet("b", models=("m2",))
    r = await make_router(
        [node_entry(a), node_entry(b)],
        auth={
            "required": True,
            "keys": [{"name": "team", "key_env": "TEAM_KEY", "models": ["m1"]}],
        },
    )
    for headers in ({}, bearer("sk-bal-wrong"), bearer("unused"), {"Authorization": STATIC_KEY}):
        status, _, doc = await post(http, r.url, chat(model="m1"), headers)
        assert status == 401 and doc["error"]["code"] == "invalid_api_key", headers
        assert STATIC_KEY not in orjson.dumps(doc).decode()
    for headers in (bearer(STATIC_KEY), {"api-key": STATIC_KEY}, {"x-api-key": STATIC_KEY}):
        status, _, doc = await post(http, r.url, chat(model="m1"), headers)
        assert status == 200, doc
    status, _, doc = await post(http, r.url, chat(model="m2"), bearer(STATIC_KEY))
    assert status == 403 and doc["error"]["code"] == "model_not_allowed"


def test_a_key_is_hashed_once_and_its_expiry_read_every_time() -> None:
    wall = [1000.0]
    auth = AuthConfig(
        required=True,
        keys=[{"name": "team", "hash": hash_key(STATIC_KEY), "expires_at": 2000.0}],
    )
    ring = Keyring(auth, {}, wall=lambda: wall[0])
    spellings = (
        {"Authorization": f"Bearer {STATIC_KEY}"},
        {"Authorization": f"bearer  {STATIC_KEY} "},
        {"api-key": STATIC_KEY},
        {"x-api-key": f" {STATIC_KEY}"},
    )
    for headers in spellings * 2:
        key = ring.lookup(CIMultiDict(headers))
        assert isinstance(key, Key) and key.name == "team", headers
    # Remembered only as Authorization: Bearer <key> exactly: other spellings of one
    # key cannot fill the memory.
    assert list(ring._seen) == [f"Bearer {STATIC_KEY}"]
    assert ring.lookup(CIMultiDict({"Authorization": "Bearer sk-bal-other"})) == "invalid API key"
    wall[0] = 2000.0
    for headers in spellings:
        assert ring.lookup(CIMultiDict(headers)) == "expired API key"


async def test_without_required_keys_anonymous_callers_still_pass(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    r = await make_router(
        [node_entry(await fleet("a"))], auth={"keys": [{"name": "team", "key_env": "TEAM_KEY"}]}
    )
    assert (await post(http, r.url, chat(), bearer("unused")))[0] == 200  # the SDK's placeholder
    assert (await post(http, r.url, chat(), {}))[0] == 200
    assert (await post(http, r.url, chat(), bearer("sk-bal-revoked")))[0] == 401


async def test_admin_keys_reach_every_replica_and_revocation_within_a_second(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession, redis_server: RedisServer
) -> None:
    sim = await fleet("a")
    common: dict[str, Any] = {
        "state": {"redis_url": redis_server.url},
        "admin": {"token_env": "TEST_ADMIN_TOKEN"},
        "auth": {"required": True},
    }
    a = await make_router([node_entry(sim)], **common)
    b = await make_router([node_entry(sim)], **common)
    async with http.post(a.url + "/admin/keys", json={"name": "team-a", "rpm": 600}) as resp:
        assert resp.status == 401  # the admin token is needed
    spec = {"name": "team-a", "rpm": 600, "tpm": 200000, "models": [MODEL]}
    async with http.post(a.url + "/admin/keys", json=spec, headers=ADMIN) as resp:
        assert resp.status == 201
        created = await resp.json()
    key = created["key"]
    assert key.startswith("sk-bal-") and created["prefix"] == key[:12]
    async with http.post(a.url + "/admin/keys", json=spec, headers=ADMIN) as resp:
        assert resp.status == 409  # names are unique

    async def accepted(url: str) -> bool:
        return (await post(http, url, chat(), bearer(key)))[0] == 200

    assert await accepted(a.url)  # the replica that created it, at once
    deadline = time.monotonic() + 1.0
    while not await accepted(b.url):  # the other, within a second
        assert time.monotonic() < deadline
    async with http.get(b.url + "/admin/keys", headers=ADMIN) as resp:
        listed = (await resp.json())["data"]
    assert [k["name"] for k in listed] == ["team-a"]
    assert (
        key not in orjson.dumps(listed).decode()
        and hash_key(key) not in orjson.dumps(listed).decode()
    )
    async with http.patch(b.url + "/admin/keys/team-a", json={"rpm": 1200}, headers=ADMIN) as resp:
        assert resp.status == 200 and (await resp.json())["rpm"] == 1200

    async with http.delete(a.url + f"/admin/keys/{created['id']}", headers=ADMIN) as resp:
        assert resp.status == 200
    revoked_at = time.monotonic()
    assert not await accepted(a.url)
    while await accepted(b.url):
        assert time.monotonic() - revoked_at < 1.0  # revoked on every replica within 1 s
    async with http.delete(a.url + "/admin/keys/team-a", headers=ADMIN) as resp:
        assert resp.status == 404


async def test_rate_limits_answer_429_with_openai_headers(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    r = await make_router(
        [node_entry(await fleet("a"))],
        auth={"keys": [{"name": "slow", "key_env": "TEAM_KEY", "rpm": 6, "tpm": 100000}]},
    )
    status, headers, _ = await post(http, r.url, chat(), bearer(STATIC_KEY))
    assert status == 200
    assert headers["x-ratelimit-limit-requests"] == "6"
    assert headers["x-ratelimit-limit-tokens"] == "100000"
    assert int(headers["x-ratelimit-remaining-tokens"]) < 100000
    for name in ("remaining-requests", "reset-requests", "reset-tokens"):
        assert f"x-ratelimit-{name}" in headers
    status, headers, doc = await post(http, r.url, chat(), bearer(STATIC_KEY))
    assert status == 429 and doc["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(headers["Retry-After"]) <= 10  # one request every 10 s
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert "slow" in doc["error"]["message"] and STATIC_KEY not in doc["error"]["message"]


def test_limiter_holds_the_rate_with_a_one_second_burst() -> None:
    """GCRA on an injected clock: 300 rpm shared by two replicas, each offered 3x its
    share for 30 s, accepts within 10% of 150 in all."""
    now, accepted = 0.0, 0
    limiters = [Limiter(KeyLimits(rpm=300), 0.5, now) for _ in range(2)]
    for step in range(int(30 / 0.02)):  # 15 requests a second over both, 50 a step
        now = step * 0.02
        if step % 4 == 0:
            for lim in limiters:
                if lim.admit(now, 1) is None:
                    lim.done(1, 1)
                    accepted += 1
    assert 135 <= accepted <= 165, accepted


def test_token_bucket_is_corrected_by_the_nodes_count() -> None:
    lim = Limiter(KeyLimits(tpm=600), 1.0, 0.0)
    assert lim.admit(0.0, 500) is None  # estimated 500 of the minute's 600
    lim.done(500, 100)  # the node counted 100
    assert lim.admit(0.0, 400) is None  # so 500 are left, not 100
    lim.done(400, 400)
    refused = lim.admit(0.0, 200)
    assert refused is not None and refused.retry_after == pytest.approx(10.0)


async def test_usage_is_what_the_nodes_counted(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession, redis_server: RedisServer
) -> None:
    sims = [await fleet(f"n{i}") for i in range(2)]
    r = await make_router(
        [node_entry(s) for s in sims],
        state={"redis_url": redis_server.url},
        admin={"token_env": "TEST_ADMIN_TOKEN"},
        auth={"keys": [{"name": "team", "key_env": "TEAM_KEY"}]},
    )
    for i in range(12):
        body = chat(stream=i % 2 == 0, max_tokens=3 + i)
        if i % 4 == 0:
            body["stream_options"] = {"include_usage": True}  # asked: it sees the chunk
        status, _, raw = await post(http, r.url, body, bearer(STATIC_KEY))
        assert status == 200
        if body["stream"]:
            events = [e for e in bytes(raw).split(b"\n\n") if e.startswith(b"data: {")]
            usage_chunks = [e for e in events if b'"usage":{' in e]
            assert len(usage_chunks) == (1 if i % 4 == 0 else 0)
            assert events[-1].count(b'"choices":[]') == (1 if i % 4 == 0 else 0)
    status, _, doc = await post(http, r.url, chat(), {})  # anonymous: not the key's
    assert status == 200
    expected = [
        12,
        0,
        sum(s.usage_sent[0] for s in sims) - doc["usage"]["prompt_tokens"],
        sum(s.usage_sent[1] for s in sims) - doc["usage"]["completion_tokens"],
    ]
    async with http.get(r.url + "/admin/usage?key=team", headers=ADMIN) as resp:
        (row,) = (await resp.json())["data"]
    got = [row["requests"], row["errors"], row["prompt_tokens"], row["completion_tokens"]]
    assert got == expected
    async with http.get(r.url + "/metrics") as resp:
        text = await resp.text()
    series = f'ballast_key_tokens_total{{key="team",kind="completion",model="{MODEL}"}}'
    assert f"{series} {float(expected[3])}" in text


async def test_usage_survives_a_store_outage(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession, redis_server: RedisServer
) -> None:
    """Redis stops answering for 1.5 s while the key's requests go on: they are all
    served, and their usage reaches Redis once it answers again."""
    sim = await fleet("a")
    r = await make_router(
        [node_entry(sim)],
        state={"redis_url": redis_server.url, "timeout_s": 0.2},
        admin={"token_env": "TEST_ADMIN_TOKEN"},
        auth={"keys": [{"name": "team", "key_env": "TEAM_KEY"}]},
    )

    async def used() -> int:
        async with http.get(r.url + "/admin/usage?key=team", headers=ADMIN) as resp:
            rows = (await resp.json()).get("data") or []
        return rows[0]["requests"] if rows else 0

    async def used_is(n: int) -> bool:
        return await used() == n

    for _ in range(5):
        assert (await post(http, r.url, chat(), bearer(STATIC_KEY)))[0] == 200
    await until(lambda: used_is(5), within=10)
    errors = r.router.store.errors
    redis_server.client().execute_command("CLIENT", "PAUSE", 1500, "ALL")
    for _ in range(15):
        assert (await post(http, r.url, chat(), bearer(STATIC_KEY)))[0] == 200
    await until(lambda: r.router.store.errors > errors, within=5)  # the sync failed
    await until(lambda: used_is(20), within=10)


async def test_cli_creates_lists_uses_and_revokes_a_key(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    r = await make_router(
        [node_entry(await fleet("a"))],
        admin={"token_env": "TEST_ADMIN_TOKEN"},
        auth={"required": True},
    )

    async def cli(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "router.cli", *args, "--router", r.url,
            "--admin-token", "admin-token",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    create = ["--name", "team-a", "--rpm", "600", "--tpm", "200000", "--priority", "batch"]
    code, out, err = await cli("keys", "create", *create, "--models", MODEL)
    assert code == 0 and "shown once" in err
    key = out.strip()
    assert key.startswith("sk-bal-")
    code, out, _ = await cli("keys", "list")
    header, row = out.splitlines()
    assert header.split()[:2] == ["NAME", "ID"] and row.split()[0] == "team-a"
    assert "batch" in row and "600" in row and key not in out
    for _ in range(3):
        assert (await post(http, r.url, chat(), bearer(key)))[0] == 200
    code, out, _ = await cli("usage", "--key", "team-a")
    lines = out.splitlines()
    assert code == 0 and lines[1].split()[:2] == ["KEY", "MODEL"]
    assert lines[2].split()[:4] == ["team-a", MODEL, "3", "0"]
    code, out, _ = await cli("keys", "revoke", "team-a")
    assert code == 0 and "revoked team-a" in out
    assert (await post(http, r.url, chat(), bearer(key)))[0] == 401
    code, _, err = await cli("keys", "revoke", "team-a")
    assert code == 1 and "HTTP 404" in err and len(err.strip().splitlines()) == 1


def test_usage_is_read_from_the_answers_own_usage_object() -> None:
    trick = 'text "usage": {"prompt_tokens": 999999, "completion_tokens": 1}'
    usage = {"prompt_tokens": 10, "completion_tokens": 8, "prompt_tokens_details": {"n": 2}}
    body = orjson.dumps({"choices": [{"message": {"content": trick}}], "usage": usage})
    assert usage_from(orjson.loads(body)) == (10, 8)
    assert usage_from({"data": [], "usage": {"prompt_tokens": 7}}) == (7, 0)
    for bad in (
        {"usage": None}, {"usage": {"prompt_tokens": -1}}, None, {"usage": "x"},
        {"usage": {"prompt_tokens": True}},
        {"usage": {"prompt_tokens": 1, "completion_tokens": 2**40}},
    ):  # fmt: skip
        assert usage_from(bad) is None


async def test_token_budget_over_two_replicas(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession, redis_server: RedisServer
) -> None:
    """A key with a daily token budget: once its tokens, counted by the nodes over
    both replicas, reach it, both refuse with 429 insufficient_quota until the
    day ends. Before that, a replica whose share of the rest is held or used says
    so for a second (budget_reserved), until the next count deals the shares again."""
    sim = await fleet("a")
    common: dict[str, Any] = {
        "state": {"redis_url": redis_server.url},
        "auth": {"keys": [{"name": "team", "key_env": "TEAM_KEY", "budget_tokens": 60}]},
    }
    a = await make_router([node_entry(sim)], **common)
    b = await make_router([node_entry(sim)], **common)
    spent = [0]

    async def spend_on_a() -> bool:  # on replica a only
        status, _, doc = await post(http, a.url, chat(max_tokens=8), bearer(STATIC_KEY))
        if status == 200:
            spent[0] += doc["usage"]["prompt_tokens"] + doc["usage"]["completion_tokens"]
        else:
            assert status == 429 and doc["error"]["code"] in (
                "budget_reserved",
                "rate_limit_exceeded",
                "insufficient_quota",
            )
        return spent[0] >= 60

    await until(spend_on_a, within=10)

    async def refused(url: str) -> bool:
        status, headers, doc = await post(http, url, chat(), bearer(STATIC_KEY))
        if status != 429 or doc["error"]["code"] != "insufficient_quota":
            return False
        assert 0 < int(headers["Retry-After"]) <= 86400
        return True

    await until(lambda: refused(a.url), within=5)
    await until(lambda: refused(b.url), within=5)  # b learns a's count from Redis
    assert (await post(http, b.url, chat(), {}))[0] == 200  # anonymous callers still pass


def test_budget_periods_are_utc_days_and_months() -> None:
    from router.tenants import period_days, period_end, period_of

    new_year_eve = 1798761599.0  # 2026-12-31T23:59:59Z
    assert period_of("day", new_year_eve) == "2026-12-31"
    assert period_of("month", new_year_eve) == "2026-12"
    assert period_end("day", new_year_eve) == new_year_eve + 1
    assert period_end("month", new_year_eve) == new_year_eve + 1  # 2027-01-01T00:00:00Z
    assert period_days("month", new_year_eve)[0] == "2026-12-01"
    assert len(period_days("month", new_year_eve)) == 31
    assert period_days("day", new_year_eve) == ["2026-12-31"]
