"""What the router shows, and to whom; and the names and addresses it accepts.

Closed by default when keys are required: the model list needs a client key,
``/readyz?verbose`` the admin token, an open ``/metrics`` is warned about at
start, and a heartbeat refusal does the same work for any id. Names from outside
(node ids, model names, labels, key names) carry no invisible or layout
characters, and node addresses are judged by the IPv4 address they embed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import signal
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
import yaml

from loadtest.common import free_port
from router.addresses import AddressRules, GuardedResolver
from router.config import ROUTER_ID, ConfigError, parse_config
from router.errors import NODE_HEADER, ROUTER_NODE
from tests.conftest import MODEL, MakeRouter, MakeSim, RedisServer, node_entry
from tests.test_cli import spawn, stop, wait_for_line
from tests.test_supply import until

JOIN = {"Authorization": "Bearer join-token"}
ADMIN = {"Authorization": "Bearer admin-token"}
TEAM_KEY = "sk-bal-exposure-team-key-for-tests-0123456789"
NODE = {"id": "a", "url": "http://127.0.0.1:9001", "models": ["m"]}
# Characters that change how a name looks, or hide in it.
INVISIBLE = [
    "\u200b", "\u200c", "\u200d", "\u200e", "\u200f",  # zero-width, direction marks
    "\u202a", "\u202b", "\u202c", "\u202d", "\u202e",  # bidi embeddings and overrides
    "\u2066", "\u2067", "\u2068", "\u2069",  # bidi isolates
    "\u2028", "\u2029", "\ufeff", "\u00ad", "\x85",  # separators, BOM, soft hyphen, NEL
]  # fmt: skip


@pytest.fixture(autouse=True)
def tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("T_JOIN", "join-token")
    monkeypatch.setenv("T_ADMIN", "admin-token")
    monkeypatch.setenv("T_METRICS", "metrics-token")
    monkeypatch.setenv("T_TEAM", TEAM_KEY)


def joinable(**registry: Any) -> dict[str, Any]:
    reg = {"join_token_env": "T_JOIN", "allowed_networks": ["127.0.0.0/8"], **registry}
    return {"registry": reg, "admin": {"token_env": "T_ADMIN"}}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def get(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    async with http.get(url, headers=headers or {}) as resp:
        return resp.status, orjson.loads(await resp.read())


async def register(
    http: aiohttp.ClientSession, router: str, body: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    async with http.post(router + "/v1/nodes/register", json=body, headers=JOIN) as resp:
        return resp.status, await resp.json()


# -- the model list, readiness detail and metrics --------------------------------------------


async def test_the_model_list_needs_a_key_when_keys_are_required(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    a, b = await fleet("a", models=("m1",)), await fleet("b", models=("secret-model",))
    keys = [{"name": "team", "key_env": "T_TEAM", "models": ["m1"]}]
    r = await make_router([node_entry(a), node_entry(b)], auth={"required": True, "keys": keys})
    for headers in ({}, bearer("sk-bal-wrong"), bearer("placeholder"), {"Authorization": TEAM_KEY}):
        async with http.get(r.url + "/v1/models", headers=headers) as resp:
            body = await resp.read()
            assert resp.status == 401, headers
            assert resp.headers["x-ballast-node"] == "ballast"
        doc = orjson.loads(body)
        assert doc["error"]["code"] == "invalid_api_key"
        assert doc["error"]["type"] == "invalid_request_error"
        assert b"m1" not in body and b"secret-model" not in body
    # A key sees the models it may use.
    status, doc = await get(http, r.url + "/v1/models", bearer(TEAM_KEY))
    assert status == 200 and [m["id"] for m in doc["data"]] == ["m1"]

    # Without required keys the list stays open (clients list models before they ask).
    r2 = await make_router([node_entry(a), node_entry(b)])
    status, doc = await get(http, r2.url + "/v1/models")
    assert status == 200 and {m["id"] for m in doc["data"]} == {"m1", "secret-model"}


async def test_readiness_detail_needs_the_admin_token(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    sim = await fleet("a")
    plain = {"status", "routable_nodes", "store"}
    r = await make_router([node_entry(sim)], admin={"token_env": "T_ADMIN"})
    for headers in ({}, bearer("wrong"), bearer("metrics-token")):
        status, doc = await get(http, r.url + "/readyz?verbose", headers)
        assert status == 200 and set(doc) == plain, headers  # load balancers still get ready
    status, doc = await get(http, r.url + "/readyz?verbose", ADMIN)
    assert status == 200 and set(doc) == plain | {"routers", "models"}
    assert doc["models"] == {MODEL: {"nodes": 1, "routable": 1}}

    closed = await make_router([node_entry(sim)])  # no admin token: never the detail
    for headers in ({}, ADMIN):
        status, doc = await get(http, closed.url + "/readyz?verbose", headers)
        assert status == 200 and set(doc) == plain


async def served_output(tmp_path: Path, metrics: dict[str, Any]) -> str:
    """What ``ballast serve`` prints from its start to its stop, with this metrics
    section."""
    port = free_port()
    path = tmp_path / f"ballast-{port}.yaml"
    doc = {"listen": {"host": "127.0.0.1", "port": port}, "metrics": metrics}
    path.write_text(yaml.safe_dump({**doc, "shutdown": {"grace_s": 0}}))
    proc = await spawn("serve", "--config", str(path))
    try:
        await wait_for_line(proc, "listening on")
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                status = resp.status
        assert await stop(proc, signal.SIGINT) == 0
        assert proc.stdout is not None
        return f"{status}\n" + (await proc.stdout.read()).decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_open_metrics_are_warned_about_at_start(tmp_path: Path) -> None:
    out = await served_output(tmp_path, {})
    assert out.startswith("200\n")
    [line] = [x for x in out.splitlines() if "/metrics is open" in x]
    assert '"level":"warning"' in line and "metrics.token_env" in line
    for closed, status in (({"token_env": "T_METRICS"}, "401"), ({"enabled": False}, "404")):
        out = await served_output(tmp_path, closed)
        assert out.startswith(status + "\n")
        assert "/metrics is open" not in out


# -- heartbeats: the same work for every id ---------------------------------------------------


class Commands:
    """Every command a Redis server runs, as MONITOR reports them."""

    def __init__(self, url: str) -> None:
        self.client = aioredis.from_url(url)
        self.seen: list[str] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Commands:
        started = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._watch(started))
        await started.wait()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self.client.aclose()

    async def _watch(self, started: asyncio.Event) -> None:
        async with self.client.monitor() as monitor:
            started.set()
            async for command in monitor.listen():
                self.seen.append(command["command"])

    async def during(self, action: Awaitable[None]) -> list[str]:
        """The commands run while ``action`` (a coroutine) ran."""
        mark = f"mark-{len(self.seen)}-"
        await self.client.echo(mark + "start")
        await action
        await self.client.echo(mark + "end")
        await until(lambda: f"ECHO {mark}end" in self.seen, 5)
        start = self.seen.index(f"ECHO {mark}start")
        return self.seen[start + 1 : self.seen.index(f"ECHO {mark}end")]


async def test_a_heartbeat_refusal_does_the_same_work_for_every_id(
    fleet: MakeSim,
    make_router: MakeRouter,
    http: aiohttp.ClientSession,
    redis_server: RedisServer,
) -> None:
    static, joined = await fleet("static"), await fleet("joined")
    r = await make_router([node_entry(static)], state={"redis_url": redis_server.url}, **joinable())
    status, doc = await register(
        http, r.url, {"id": "joined", "url": joined.url, "models": [MODEL]}
    )
    assert status == 201
    secret = doc["secret"]
    # Once this router has pulled the registration, nothing else reads the node's hash.
    red = redis_server.client()
    seq = red.zscore("ballast:{fleet}:changes", "joined")
    assert seq is not None
    await until(lambda: r.router.store.last_seq >= seq, 5)

    answers: dict[str, tuple[int, bytes, dict[str, str]]] = {}

    async def beat(node_id: str, headers: dict[str, str]) -> None:
        url = f"{r.url}/v1/nodes/{node_id}/heartbeat"
        async with http.post(url, json={}, headers=headers) as resp:
            body = await resp.read()
            kept = {k: v for k, v in resp.headers.items() if k.lower() != "date"}
            answers[node_id + str(sorted(headers.items()))] = (resp.status, body, kept)

    work: dict[str, list[str]] = {}
    async with Commands(redis_server.url) as commands:
        for node_id, headers in (
            ("joined", bearer("not-the-secret")),  # a known id, a wrong secret
            ("joined", {}),  # a known id, no secret
            ("no-such-node", bearer("not-the-secret")),  # an unknown id
            ("static", bearer("not-the-secret")),  # a static node (no secret at all)
        ):
            done = await commands.during(beat(node_id, headers))
            key = node_id + str(sorted(headers.items()))
            work[key] = [c.replace(node_id, "<id>") for c in done if f":node:{node_id}" in c]
        accepted = await commands.during(beat("joined", bearer(secret)))

    assert len(set(map(tuple, work.values()))) == 1, work  # the same commands, every id
    assert next(iter(work.values())) == ["HGET ballast:{fleet}:node:<id> secret"]
    refusals = {(s, b, tuple(sorted(h.items()))) for s, b, h in answers.values() if s != 200}
    assert len(refusals) == 1, refusals  # the same answer, byte for byte
    status, body, _ = next(iter(answers.values()))
    assert status == 401
    assert orjson.loads(body)["error"]["message"] == "unknown node or wrong node secret"
    # The node's own secret still works, after the same first read.
    assert answers["joined" + str(sorted(bearer(secret).items()))][0] == 200
    first = next(c for c in accepted if ":node:joined" in c)
    assert first == "HGET ballast:{fleet}:node:joined secret"


# -- names: no trailing newline, no invisible characters --------------------------------------


async def test_names_with_a_trailing_newline_are_refused(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    sim = await fleet("n")
    r = await make_router([], **joinable())
    base = {"id": "n", "url": sim.url, "models": [MODEL]}
    for extra in (
        {"id": "n\n"},
        {"models": [MODEL + "\n"]},
        {"labels": {"region\n": "eu"}},
        {"labels": {"region": "eu\n"}},
        {"gpu": "H100\n"},
    ):
        status, doc = await register(http, r.url, {**base, **extra})
        assert status == 400 and doc["error"]["code"] == "invalid_node", extra
    assert r.router.fleet.nodes == {}
    for doc in (
        {"nodes": [{**NODE, "id": "a\n"}]},
        {"nodes": [{**NODE, "labels": {"pool\n": "spot"}}]},
        {"nodes": [{**NODE, "labels": {"pool": "spot\n"}}]},
        {"auth": {"keys": [{"name": "team\n", "key_env": "T_TEAM"}]}},
        {"pools": {"label": "pool\n", "order": ["spot"]}},
        {"pools": {"order": ["spot\n"]}},
        {"locality": {"label": "region\n"}},
        {"logging": {"level": "info\n"}},
    ):
        with pytest.raises(ConfigError):
            parse_config(doc)
    status, doc = await register(http, r.url, base)
    assert status == 201  # the same names without it are fine
    url, own = r.url + "/v1/nodes/n/heartbeat", bearer(doc["secret"])
    for engine, expected in (({"vllm:num_requests_running\n": 1}, 400), ({"vllm:x": 1}, 200)):
        async with http.post(url, json={"engine": engine}, headers=own) as resp:
            assert resp.status == expected, engine


@pytest.mark.parametrize("char", INVISIBLE, ids=[f"U+{ord(c):04X}" for c in INVISIBLE])
async def test_invisible_and_bidi_characters_are_refused_in_names(
    char: str, fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    sim = await fleet("n")
    r = await make_router([], auth={"required": True}, **joinable())
    base = {"id": "n", "url": sim.url, "models": [MODEL]}
    for extra in (
        {"id": f"n{char}"},
        {"models": [f"tiny{char}-llama"]},
        {"gpu": f"H100{char}"},
        {"labels": {f"re{char}gion": "eu"}},
        {"labels": {"region": f"eu{char}-west"}},
    ):
        status, doc = await register(http, r.url, {**base, **extra})
        assert status == 400 and doc["error"]["code"] == "invalid_node", extra
    assert r.router.fleet.nodes == {}

    for spec in (
        {"name": f"team{char}"},
        {"name": "team", "models": [f"m{char}1"]},
        {"name": "team", "region": f"eu{char}"},
    ):
        async with http.post(r.url + "/admin/keys", json=spec, headers=ADMIN) as resp:
            assert resp.status == 400, spec
            assert (await resp.json())["error"]["code"] == "invalid_key_request"
    async with http.get(r.url + "/admin/keys", headers=ADMIN) as resp:
        assert (await resp.json())["data"] == []

    for doc in (
        {"nodes": [{**NODE, "models": [f"m{char}"]}]},
        {"nodes": [{**NODE, "gpu": f"A100{char}"}]},
        {"nodes": [{**NODE, "labels": {"pool": f"spot{char}"}}]},
        {"models": {f"m{char}": {"context_length": 4096}}},
        {"registry": {"allowed_models": [f"m{char}"]}},
        {"auth": {"keys": [{"name": "team", "key_env": "T_TEAM", "models": [f"m{char}"]}]}},
    ):
        with pytest.raises(ConfigError):
            parse_config(doc)


def test_ordinary_names_still_pass() -> None:
    cfg = parse_config(
        {
            "nodes": [
                {**NODE, "models": ["Qwen/Qwen2.5-7B-Instruct", "模型-δ"], "gpu": "RTX 4090",
                 "labels": {"region": "eu-west", "note": ""}},
                {**NODE, "id": "ballast-reserve-1"},
            ]
        }
    )  # fmt: skip
    assert cfg.nodes[0].models == ["Qwen/Qwen2.5-7B-Instruct", "模型-δ"]
    assert cfg.nodes[1].id == "ballast-reserve-1"  # the operator's own name, not the router's


# -- URLs and addresses -----------------------------------------------------------------------


@pytest.mark.parametrize("url", ["http://127.0.0.1\t:{port}", "http://127.0.0.1:{port}/v\n1",
                                 "http://127.0.0.1:{port}/ v1", "http://127.0.0.1:{port}\x00",
                                 "http://127.0.0.1:{port}/\u2028"])  # fmt: skip
async def test_urls_with_whitespace_or_controls_are_refused(
    url: str, fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    sim = await fleet("n")
    r = await make_router([], **joinable())
    port = sim.url.rsplit(":", 1)[1]
    status, doc = await register(
        http, r.url, {"id": "n", "url": url.format(port=port), "models": [MODEL]}
    )
    assert status == 403 and doc["error"]["code"] == "url_not_allowed"
    assert "whitespace or control" in doc["error"]["message"]
    assert r.router.fleet.nodes == {}
    with pytest.raises(ConfigError, match="whitespace or control"):
        parse_config({"nodes": [{**NODE, "url": url.format(port=port)}]})


TRANSITION = [
    "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
    "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
    "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
    "64:ff9b:1::808:808",  # local-use NAT64: no IPv4 to read
    "2002:7f00:1::1",  # 6to4 of 127.0.0.1
    "2002:a9fe:a9fe::1",  # 6to4 of 169.254.169.254
    "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo, client 127.0.0.1
    "::7f00:1",  # IPv4-compatible 127.0.0.1
    "::a9fe:a9fe",  # IPv4-compatible 169.254.169.254
    "::ffff:0:7f00:1",  # IPv4-translated 127.0.0.1
    "::ffff:7f00:1",  # IPv4-mapped 127.0.0.1
]


def test_ipv6_transition_addresses_are_judged_by_their_ipv4() -> None:
    rules = AddressRules([], own_port=8080)
    for addr in TRANSITION:
        assert rules.refused(ipaddress.ip_address(addr), 80) is not None, addr
    for public in ("64:ff9b::808:808", "2002:808:808::1", "::ffff:808:808", "2606:4700::1111"):
        assert rules.refused(ipaddress.ip_address(public), 80) is None, public
    # With allowed networks, the embedded address is what must lie in one.
    inside = AddressRules(["10.0.0.0/8"])
    assert inside.refused(ipaddress.ip_address("64:ff9b::a00:1"), 80) is None
    assert inside.refused(ipaddress.ip_address("64:ff9b::7f00:1"), 80) is not None
    assert inside.refused(ipaddress.ip_address("2002:a9fe:a9fe::1"), 80) is not None


async def test_transition_addresses_are_refused_at_registration_and_connection(
    make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    r = await make_router([], registry={"join_token_env": "T_JOIN"})
    for addr in TRANSITION:
        body = {"id": "x", "url": f"http://[{addr}]:8000", "models": [MODEL]}
        status, doc = await register(http, r.url, body)
        assert status == 403 and doc["error"]["code"] == "url_not_allowed", addr
    assert r.router.fleet.nodes == {}
    guard = GuardedResolver(AddressRules([]), [])
    try:
        for addr in TRANSITION:
            with pytest.raises(OSError, match="may not have"):
                await guard.resolve(addr, 8000, family=0)
        assert (await guard.resolve("64:ff9b::808:808", 8000, family=0))[0]["port"] == 8000
    finally:
        await guard.close()


# -- the router's own name ----------------------------------------------------------------------


async def test_a_node_cannot_take_the_routers_name(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    assert ROUTER_NODE[NODE_HEADER] == ROUTER_ID  # what the router's own answers carry
    sim = await fleet("n")
    r = await make_router([], **joinable())
    for node_id in ("ballast", "Ballast", "BALLAST"):
        body = {"id": node_id, "url": sim.url, "models": [MODEL]}
        status, doc = await register(http, r.url, body)
        assert status == 400 and doc["error"]["code"] == "invalid_node", node_id
        assert "the router's own" in doc["error"]["message"]
    assert r.router.fleet.nodes == {}
    # A host named ballast-gpu-1 (the agent's default id is its host name) may join.
    status, _ = await register(
        http, r.url, {"id": "ballast-gpu-1", "url": sim.url, "models": [MODEL]}
    )
    assert status == 201
    for node_id in ("ballast", "Ballast"):
        with pytest.raises(ConfigError, match="reserved"):
            parse_config({"nodes": [{**NODE, "id": node_id}]})
    status, _ = await register(http, r.url, {"id": "my-ballast", "url": sim.url, "models": [MODEL]})
    assert status == 201
