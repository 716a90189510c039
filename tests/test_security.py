"""Nodes are untrusted input: each hostile behaviour, on real sockets.

A hostile node is a small aiohttp server in the test (or a simulated node with a
fault); the router runs in-process with its real connection handling.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loadtest.common import free_port
from loadtest.simnode import Fault
from router.addresses import AddressRules, GuardedResolver
from router.challenges import Challenges
from router.cli import render_fleet
from router.config import Scoring
from router.fleet import ROUTABLE, Node, NodeState
from router.measure import Outcome
from router.store import codec
from router.view import fleet_view
from tests.conftest import MODEL, MakeRouter, MakeSim, RedisServer, chat, node_entry
from tests.test_supply import PROBING, until

JOIN = {"Authorization": "Bearer join-token"}
ADMIN = {"Authorization": "Bearer admin-token"}
ANSWER = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}]}
Routes = dict[tuple[str, str], Callable[[web.Request], Awaitable[web.StreamResponse]]]


@pytest.fixture(autouse=True)
def tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("T_JOIN", "join-token")
    monkeypatch.setenv("T_ADMIN", "admin-token")
    monkeypatch.setenv("T_METRICS", "metrics-token")


def joinable(**registry: Any) -> dict[str, Any]:
    """Config sections for a router nodes can join (from loopback, as in the tests)."""
    reg = {"join_token_env": "T_JOIN", "allowed_networks": ["127.0.0.0/8"], **registry}
    return {"registry": reg, "admin": {"token_env": "T_ADMIN"}}


@pytest.fixture
async def hostile() -> AsyncIterator[Callable[[Routes], Awaitable[str]]]:
    runners: list[web.AppRunner] = []

    async def make(routes: Routes) -> str:
        app = web.Application()
        for (method, path), handler in routes.items():
            app.router.add_route(method, path, handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    yield make
    for runner in runners:
        await runner.cleanup()


async def models_list(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})


async def sse_answer(request: web.Request, text: str = "hello there") -> web.StreamResponse:
    out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await out.prepare(request)
    for i, word in enumerate(text.split()):
        delta = {"content": word + " "} if i else {"role": "assistant", "content": word + " "}
        chunk = {"id": "x", "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
        await out.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
    end = {"id": "x", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    await out.write(b"data: " + orjson.dumps(end) + b"\n\ndata: [DONE]\n\n")
    return out


async def register(
    http: aiohttp.ClientSession, router: str, body: dict[str, Any], **headers: str
) -> tuple[int, dict[str, Any]]:
    async with http.post(
        router + "/v1/nodes/register", json=body, headers={**JOIN, **headers}
    ) as resp:
        return resp.status, await resp.json()


# -- 1, 11, 14: claims are validated at the door -----------------------------------------


async def test_invalid_claims_are_refused_and_never_break_a_model(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    sim = await fleet("good")
    models = {MODEL: {"kv_bytes_per_token": 1000}}
    r = await make_router([node_entry(sim)], models=models, **joinable(max_models_per_node=4))
    base = {"id": "bad", "url": sim.url, "models": [MODEL]}
    refused = [
        {"labels": {"context_length": "abc"}},
        {"labels": {"context_length": "-5"}},
        {"labels": {"price_per_mtok": "-1000"}},
        {"labels": {"price_per_mtok": "nan"}},
        {"labels": {"bad key!": "x"}},
        {"labels": {"region": "\u001b[31mRED"}},
        {"labels": {f"k{i}": "v" for i in range(40)}},
        {"price_per_mtok": -1},
        {"gpu": "\u001b]0;pwned\u0007\u001b[31mRED"},
        {"models": ["a\nb"]},
        {"models": ["x" * 300]},
        {"models": [f"m{i}" for i in range(5)]},
        {"id": "../../etc"},
    ]
    for extra in refused:
        status, doc = await register(http, r.url, {**base, **extra})
        assert status == 400, (extra, doc)
        assert doc["error"]["code"] == "invalid_node"
        assert len(orjson.dumps(doc)) < 1000
    assert set(r.router.fleet.nodes) == {"good"}

    # A node carrying invalid labels anyway (an older version wrote them to the shared
    # store) has them counted as absent; the model keeps serving.
    odd = Node(
        id="odd", url="http://127.0.0.1:9", models=[MODEL], scoring=Scoring(),
        labels={"context_length": "abc", "price_per_mtok": "-1000"},
    )  # fmt: skip
    assert odd.claimed_context is None and odd.price_per_mtok == 0.0
    r.router.fleet.add(odd)
    for _ in range(5):
        async with http.post(r.url + "/v1/chat/completions", json=chat()) as resp:
            assert resp.status == 200


# -- 2, 7: probes read bounded answers and follow no redirect --------------------------------


async def test_a_huge_model_list_fails_the_probe_unread(
    hostile: Callable[[Routes], Awaitable[str]], make_router: MakeRouter
) -> None:
    sent = 0

    async def huge(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        out = web.StreamResponse(headers={"Content-Type": "application/json"})
        await out.prepare(request)
        chunk = b" " * 65536
        try:
            while sent < 300 << 20:  # 300 MB, unless the reader goes away
                await out.write(chunk)
                sent += len(chunk)
        except ConnectionError:
            pass
        return out

    url = await hostile({("GET", "/v1/models"): huge})
    r = await make_router([{"id": "big", "url": url, "models": [MODEL]}], health=PROBING)
    node = r.router.fleet.nodes["big"]
    await until(lambda: node.probe.get("ok") is False, 10)
    assert "larger than" in str(node.probe["error"])
    assert node.state is NodeState.REGISTERED
    assert sent < 64 << 20


async def test_the_prober_follows_no_redirect(
    hostile: Callable[[Routes], Awaitable[str]], make_router: MakeRouter
) -> None:
    canary: list[str] = []

    async def record(request: web.Request) -> web.Response:
        canary.append(request.path)
        return await models_list(request)

    inside = await hostile({("GET", "/v1/models"): record})

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(inside + "/v1/models")

    url = await hostile({("GET", "/v1/models"): redirect})
    r = await make_router([{"id": "r", "url": url, "models": [MODEL]}], health=PROBING)
    node = r.router.fleet.nodes["r"]
    await until(lambda: node.probe.get("ok") is False, 10)
    assert "302" in str(node.probe["error"])
    assert canary == []


# -- 3: registrations and metric labels are bounded; /metrics off the loop -------------------


async def test_registrations_and_metric_labels_are_bounded(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    sims = [await fleet(f"n{i}") for i in range(3)]
    r = await make_router(
        [],
        metrics={"max_models": 2, "max_nodes": 1, "token_env": "T_METRICS"},
        **joinable(max_nodes=2, max_models_per_node=4),
    )
    status, _ = await register(
        http, r.url, {"id": "n0", "url": sims[0].url, "models": [MODEL, "ma", "mb", "mc"]}
    )
    assert status == 201
    status, _ = await register(http, r.url, {"id": "n1", "url": sims[1].url, "models": [MODEL]})
    assert status == 201
    status, doc = await register(http, r.url, {"id": "n2", "url": sims[2].url, "models": [MODEL]})
    assert status == 429 and doc["error"]["code"] == "registry_full"
    async with http.post(r.url + "/v1/chat/completions", json=chat(model="z" * 200)) as resp:
        assert resp.status == 404

    async with http.get(r.url + "/metrics") as resp:
        assert resp.status == 401
    async with http.get(
        r.url + "/metrics", headers={"Authorization": "Bearer metrics-token"}
    ) as r2:
        assert r2.status == 200
        text = await r2.text()
    labels = set()
    for line in text.splitlines():
        if line.startswith(("ballast_supply_nodes{", "ballast_requests_total{")):
            labels.add(line.split('model="', 1)[1].split('"', 1)[0])
    assert MODEL in labels and "other" in labels
    assert len(labels - {"other"}) <= 2
    assert "ballast_node_series_omitted 1.0" in text
    assert (
        len({x.split('node="')[1].split('"')[0] for x in text.splitlines() if 'node="' in x}) == 1
    )


# -- 4, 8: addresses, at registration and at every connection; loops ---------------------------


def test_address_rules() -> None:
    import ipaddress

    rules = AddressRules([], own_port=8080)
    refused = [
        "169.254.169.254", "fd00:ec2::254", "100.100.100.200", "168.63.129.16", "192.0.0.192",
        "127.0.0.1", "::1", "10.1.2.3", "192.168.1.1", "172.16.0.1", "100.64.0.1", "fc00::1",
        "0.0.0.0", "224.0.0.1", "255.255.255.255", "::ffff:127.0.0.1",
    ]  # fmt: skip
    for addr in refused:
        assert rules.refused(ipaddress.ip_address(addr), 80) is not None, addr
    assert rules.refused(ipaddress.ip_address("8.8.8.8"), 80) is None
    inside = AddressRules(["10.0.0.0/8", "127.0.0.0/8"], own_port=8080)
    assert inside.refused(ipaddress.ip_address("10.1.2.3"), 80) is None
    assert inside.refused(ipaddress.ip_address("127.0.0.1"), 8080) == "this router's own address"
    assert inside.refused(ipaddress.ip_address("169.254.169.254"), 80) is not None
    assert inside.refused(ipaddress.ip_address("192.168.1.1"), 80) is not None


async def test_registration_refuses_metadata_private_and_own_addresses(
    make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    port = free_port()
    r = await make_router([], listen={"port": port}, **joinable())
    open_router = await make_router([], registry={"join_token_env": "T_JOIN"})
    for router, url in (
        (open_router.url, "http://[fd00:ec2::254]"),
        (open_router.url, "http://100.100.100.200"),
        (open_router.url, "http://169.254.169.254/latest"),
        (open_router.url, "http://10.1.2.3:8000"),
        (open_router.url, "http://localhost:8000"),
        (r.url, f"http://127.0.0.1:{port}"),
    ):
        status, doc = await register(http, router, {"id": "x", "url": url, "models": [MODEL]})
        assert status == 403, url
        assert doc["error"]["code"] == "url_not_allowed"


async def test_a_name_resolving_to_loopback_later_is_refused_at_connect_time(
    hostile: Callable[[Routes], Awaitable[str]],
    fleet: MakeSim,
    make_router: MakeRouter,
    http: aiohttp.ClientSession,
) -> None:
    hits: list[str] = []

    async def internal(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.json_response(ANSWER)

    url = await hostile({("POST", "/v1/chat/completions"): internal})
    honest = await fleet("honest")
    r = await make_router([node_entry(honest)])
    # The name passed its check at registration; now "localhost" resolves to loopback.
    claims = {"id": "rebound", "url": f"http://localhost:{urlsplit(url).port}", "models": [MODEL]}
    node = codec.from_registration(claims, Scoring(), False, "-")
    await r.router.store.register(node)
    for _ in range(10):
        async with http.post(r.url + "/v1/chat/completions", json=chat()) as resp:
            assert resp.status == 200 and resp.headers["x-ballast-node"] == "honest"
    assert hits == []
    assert node.stats.outcomes[Outcome.CONNECT_ERROR] >= 1
    with pytest.raises(OSError):
        await GuardedResolver(AddressRules([]), []).resolve("localhost", 80)


async def test_a_node_pointing_back_at_the_router_makes_no_loop(
    make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    port = free_port()
    me = {"id": "me", "url": f"http://127.0.0.1:{port}", "models": [MODEL]}
    r = await make_router([me], listen={"port": port})
    async with http.post(r.url + "/v1/chat/completions", json=chat()) as resp:
        assert resp.status == 508
        error = (await resp.json())["error"]
        # The copy that came back was refused; the client reads it as the node's answer.
        assert error["code"] == "upstream_rejected"
        assert "came back to a router it already passed" in error["message"]
        assert resp.headers["x-ballast-node"] == "me"
    r.router.recorder.flush()
    assert sum(1 for _ in r.router.fleet.nodes) == 1
    async with http.get(r.url + "/metrics") as resp:
        text = await resp.text()
    handled = sum(
        float(x.rsplit(" ", 1)[1])
        for x in text.splitlines()
        if x.startswith("ballast_requests_total{")
    )
    assert handled == 2  # the client's request, and its one copy that came back


# -- 5, 13: coming back means verifying again; drains hold; gone nodes are forgotten ----------


async def test_a_returning_node_is_verified_again_and_a_drain_holds(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    sim = await fleet("back")
    r = await make_router([], health=PROBING, **joinable(heartbeat_ttl_s=0.3))
    body = {"id": "back", "url": sim.url, "models": [MODEL]}
    status, doc = await register(http, r.url, body)
    assert status == 201
    own = {"Authorization": f"Bearer {doc['secret']}"}
    nodes = r.router.fleet.nodes

    async def beat() -> str:
        async with http.post(r.url + "/v1/nodes/back/heartbeat", json={}, headers=own) as resp:
            assert resp.status == 200
            return (await resp.json())["state"]

    await until(lambda: nodes["back"].state in ROUTABLE, 5)
    await until(lambda: nodes["back"].state is NodeState.GONE, 5)
    assert await beat() == "registered"  # not serving: verified again first
    await until(lambda: nodes["back"].state in ROUTABLE, 5)

    async with http.post(r.url + "/admin/nodes/back/drain", headers=ADMIN) as resp:
        assert resp.status == 200
    await until(lambda: nodes["back"].state is NodeState.GONE, 5)
    assert await beat() == "draining"
    status, _ = await register(http, r.url, body, **{"X-Node-Secret": doc["secret"]})
    assert status == 200 and nodes["back"].state is NodeState.DRAINING
    async with http.post(r.url + "/admin/nodes/back/resume", headers=ADMIN) as resp:
        assert (await resp.json())["state"] == "registered"
    await until(lambda: nodes["back"].state in ROUTABLE, 5)

    # Ejection back-off survives re-registration: no probe before it ends.
    node = nodes["back"]
    node.ejections, node.ejected_until = 3, time.time() + 60
    await r.router.store.set_state("back", NodeState.EJECTED, "test: ejected")
    assert await beat() == "ejected"
    status, _ = await register(http, r.url, body, **{"X-Node-Secret": doc["secret"]})
    again = nodes["back"]
    assert again is not node and again.ejections == 3 and again.state is NodeState.REGISTERED
    prober = r.router.prober
    assert prober is not None
    await until(lambda: again.next_probe > r.router.clock() + 30, 5)
    assert again.state is NodeState.REGISTERED


async def test_gone_nodes_are_forgotten_and_ids_are_not_revealed(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    sim = await fleet("brief")
    r = await make_router([], **joinable(heartbeat_ttl_s=0.2, gone_retention_s=0.2))
    status, doc = await register(http, r.url, {"url": sim.url, "models": [MODEL]})
    assert status == 201 and doc["id"].startswith("node-")  # no id given: the router picks
    nid = doc["id"]
    wrong = {"Authorization": "Bearer not-the-secret"}
    for target in (nid, "no-such-node"):
        async with http.post(f"{r.url}/v1/nodes/{target}/heartbeat", json={}, headers=wrong) as rs:
            assert rs.status == 401
            assert (await rs.json())["error"]["message"] == "unknown node or wrong node secret"
    await until(lambda: nid not in r.router.fleet.nodes, 5)


async def test_the_shared_store_keeps_drains_and_forgets_gone_nodes(
    fleet: MakeSim,
    make_router: MakeRouter,
    http: aiohttp.ClientSession,
    redis_server: RedisServer,
) -> None:
    sim = await fleet("shared")
    r = await make_router(
        [],
        state={"redis_url": redis_server.url, "flush_interval_s": 0.05},
        health=PROBING,
        **joinable(heartbeat_ttl_s=0.3, gone_retention_s=0.5),
    )
    body = {"id": "shared", "url": sim.url, "models": [MODEL]}
    _, doc = await register(http, r.url, body)
    own = {"Authorization": f"Bearer {doc['secret']}"}
    key = "ballast:{fleet}:node:shared"
    red = redis_server.client()
    async with http.post(r.url + "/admin/nodes/shared/drain", headers=ADMIN) as resp:
        assert resp.status == 200
    await until(lambda: red.hget(key, "state") == b"gone", 5)
    async with http.post(r.url + "/v1/nodes/shared/heartbeat", json={}, headers=own) as resp:
        assert resp.status == 200
    assert red.hget(key, "state") == b"draining" and red.hget(key, "drained") == b"1"
    async with http.post(r.url + "/admin/nodes/shared/resume", headers=ADMIN) as resp:
        assert resp.status == 200
    await until(lambda: red.hget(key, "state") == b"gone", 5)
    async with http.post(r.url + "/v1/nodes/shared/heartbeat", json={}, headers=own) as resp:
        assert resp.status == 200
    assert red.hget(key, "state") == b"registered"  # back from gone: verified again
    await until(lambda: not red.exists(key), 10)  # silent again, then forgotten
    await until(lambda: "shared" not in r.router.fleet.nodes, 5)


# -- 6: probes look like traffic; answers are checked; substitutes are caught ----------------


async def test_probes_look_like_traffic(
    hostile: Callable[[Routes], Awaitable[str]],
    make_router: MakeRouter,
    http: aiohttp.ClientSession,
) -> None:
    seen: list[tuple[frozenset[str], str]] = []

    async def answer(request: web.Request) -> web.StreamResponse:
        doc = await request.json()
        seen.append((frozenset(k.lower() for k in request.headers), doc["messages"][-1]["content"]))
        return await sse_answer(request)

    url = await hostile(
        {("POST", "/v1/chat/completions"): answer, ("GET", "/v1/models"): models_list}
    )
    fast = {**PROBING, "verified_probe_interval_s": 0.02}
    r = await make_router([{"id": "h", "url": url, "models": [MODEL]}], health=fast)
    await until(lambda: len(seen) >= 12, 10)
    probes = list(seen)
    headers = {"User-Agent": "OpenAI/Python 1.50", "Content-Type": "application/json"}
    async with http.post(r.url + "/v1/chat/completions", json=chat(stream=True), headers=headers):
        pass
    traffic = next(h for h, prompt in reversed(seen) if prompt == "hello")
    assert all(h == traffic for h, _ in probes)
    assert "user-agent" not in traffic
    assert len({prompt for _, prompt in probes}) >= 4


async def test_a_node_answering_garbage_with_200_loses_the_request(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    bad = await fleet("bad", fault=Fault("garbage"))
    good = await fleet("good")
    r = await make_router([node_entry(bad), node_entry(good)])
    for stream in (False, True, False, True):
        for i in range(5):
            body = chat(stream=stream, messages=[{"role": "user", "content": f"q{i}"}])
            async with http.post(r.url + "/v1/chat/completions", json=body) as rs:
                assert rs.status == 200 and rs.headers["x-ballast-node"] == "good"
                body = await rs.read()
                assert b"lorem" not in body
    assert r.router.fleet.nodes["bad"].stats.outcomes[Outcome.BAD_ANSWER] >= 1


async def test_garbage_in_the_middle_of_a_stream_is_continued_elsewhere(
    hostile: Callable[[Routes], Awaitable[str]],
    fleet: MakeSim,
    make_router: MakeRouter,
    http: aiohttp.ClientSession,
) -> None:
    async def rotten(request: web.Request) -> web.StreamResponse:
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        delta = {"role": "assistant", "content": "tok "}
        chunk = {"id": "x", "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
        await out.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        await out.write(b"GARBAGE GARBAGE\n\n")
        return out

    url = await hostile({("POST", "/v1/chat/completions"): rotten})
    good = await fleet("good")
    rotten = {"id": "rotten", "url": url, "models": [MODEL]}
    r = await make_router([rotten, node_entry(good, engine="vllm")])
    rotten_first = 0
    for i in range(20):
        ask = chat(stream=True, messages=[{"role": "user", "content": f"q{i}"}])
        async with http.post(r.url + "/v1/chat/completions", json=ask) as resp:
            body = await resp.read()
        assert b"GARBAGE" not in body and body.endswith(b"data: [DONE]\n\n")
        rotten_first += resp.headers["x-ballast-node"] == "rotten"
    assert rotten_first >= 1
    assert r.router.fleet.nodes["rotten"].stats.outcomes[Outcome.BAD_ANSWER] == rotten_first


async def test_a_substitute_model_loses_verified(fleet: MakeSim, make_router: MakeRouter) -> None:
    honest = [await fleet(f"h{i}") for i in range(3)]
    sub = await fleet("sub", serves_as="tiny-distilled")
    fast = {**PROBING, "verified_probe_interval_s": 0.02}
    r = await make_router([node_entry(s) for s in [*honest, sub]], health=fast)
    nodes = r.router.fleet.nodes

    def caught() -> bool:
        return nodes["sub"].state not in ROUTABLE and "substitution" in nodes["sub"].state_reason

    await until(caught, 10)
    assert all(nodes[s.cfg.id].state in ROUTABLE for s in honest)


def test_challenges_judge_only_by_a_strict_majority() -> None:
    c = Challenges(min_nodes=3, words=3, strikes_to_unverify=2)
    c.record("m", "vllm", 0, "a", "The sea is blue and calm")
    c.record("m", "vllm", 0, "b", "the  sea IS blue today")
    assert c.suspect("a", verified=True) is None  # two answers: too few to judge
    c.record("m", "vllm", 0, "x", "Potato potato potato")
    assert c.suspect("x", verified=False) is not None  # one strike keeps it unverified
    assert c.suspect("x", verified=True) is None  # ... but does not unverify it yet
    c.record("m", "vllm", 1, "a", "one two three")
    c.record("m", "vllm", 1, "b", "four five six")
    c.record("m", "vllm", 1, "x", "seven eight nine")
    assert c.strikes.get("a", set()) == set()  # no majority on prompt 1
    for nid in ("a", "b"):
        c.record("m", "vllm", 2, nid, "same words here")
    c.record("m", "vllm", 2, "x", "other words here")
    assert "substitution" in str(c.suspect("x", verified=True))
    c.record("m", "llama-cpp-python", 2, "y", "its own template, its own words")
    assert c.suspect("y", verified=False) is None  # compared within its engine only


# -- 9: slow clients -----------------------------------------------------------------------


async def test_slow_clients_are_cut_off(fleet: MakeSim, make_router: MakeRouter) -> None:
    sim = await fleet("n")
    r = await make_router([node_entry(sim)], limits={"idle_timeout_s": 0.3, "body_timeout_s": 0.3})
    host, port = "127.0.0.1", urlsplit(r.url).port
    # Headers that never end: the connection is closed.
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    async with asyncio.timeout(5):
        assert await reader.read() == b""
    writer.close()
    # A body that never ends: 408 in the envelope; it was never a request in flight.
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
    server = r.runner.server
    assert server is not None
    await until(lambda: server.requests_count == 1, 5)
    assert r.router.proxy.active == 0
    async with asyncio.timeout(5):
        answer = await reader.read()
    assert answer.startswith(b"HTTP/1.1 408") and b'"request_timeout"' in answer
    writer.close()
    # An idle keep-alive connection is closed too.
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    async with asyncio.timeout(5):
        data = await reader.read()  # the answer, then the close
    assert data.startswith(b"HTTP/1.1 200")
    writer.close()


# -- 10: headers ----------------------------------------------------------------------------


async def test_only_allowed_headers_cross_the_router(
    hostile: Callable[[Routes], Awaitable[str]],
    make_router: MakeRouter,
) -> None:
    got: list[dict[str, str]] = []

    async def answer(request: web.Request) -> web.StreamResponse:
        got.append({k.lower(): v for k, v in request.headers.items()})
        if (await request.json()).get("stream"):
            return await sse_answer(request)
        return web.json_response(ANSWER, headers=spoofed)

    # A node's answer may not pose as the router: which node served, the client's limits.
    spoofed = {
        "Set-Cookie": "session=node",
        "x-ballast-node": "someone-else",
        "x-ballast-fallback": "other-model",
        "x-ratelimit-remaining-requests": "999999",
    }
    url = await hostile({("POST", "/v1/chat/completions"): answer})
    r = await make_router([{"id": "h", "url": url, "models": [MODEL]}])
    sent = {
        "Authorization": "Bearer client-secret",
        "api-key": "client-secret",
        "x-api-key": "client-secret",
        "OpenAI-Organization": "org-1",
        "Cookie": "a=b",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "tracestate": "k=v",
        "Connection": "keep-alive, tracestate",
    }
    async with aiohttp.ClientSession(skip_auto_headers=("Accept-Encoding",)) as plain:
        async with plain.post(r.url + "/v1/chat/completions", json=chat(), headers=sent) as resp:
            assert resp.status == 200 and "Set-Cookie" not in resp.headers
            assert resp.headers.getall("x-ballast-node") == ["h"]
            assert "x-ballast-fallback" not in resp.headers
            assert "x-ratelimit-remaining-requests" not in resp.headers
        async with plain.post(
            r.url + "/v1/chat/completions", json=chat(), headers={"Accept-Encoding": "gzip"}
        ) as resp:
            assert resp.status == 200
        async with plain.post(
            r.url + "/v1/chat/completions",
            json=chat(stream=True),
            headers={"Accept-Encoding": "gzip"},
        ) as resp:
            assert resp.status == 200
    first, compressed, streamed = got
    for name in ("authorization", "api-key", "x-api-key", "openai-organization", "cookie",
                 "tracestate", "user-agent", "accept-encoding"):  # fmt: skip
        assert name not in first, name
    assert first["traceparent"] == sent["traceparent"]
    assert compressed["accept-encoding"] == "gzip"
    assert "accept-encoding" not in streamed


# -- 12, 15: malformed input gets a short envelope, never a traceback ----------------------------


async def raw(url: str, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    writer.write(head + b"\r\nHost: x\r\nConnection: close\r\n")
    writer.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
    async with asyncio.timeout(10):
        data = await reader.read()
    writer.close()
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), rest.split(b"\r\n\r\n", 1)[1]


async def test_malformed_input_gets_a_short_envelope(
    fleet: MakeSim, make_router: MakeRouter, caplog: pytest.LogCaptureFixture
) -> None:
    sim = await fleet("n")
    r = await make_router([node_entry(sim)], **joinable())
    caplog.set_level(logging.INFO)
    huge = b"x" * 100_000
    cases = [
        (b"POST /v1/nodes/register HTTP/1.1\r\nAuthorization: Bearer \xff", b"{}", 401),
        (b"POST /v1/nodes/n/heartbeat HTTP/1.1\r\nAuthorization: Bearer \xff", b"{}", 401),
        (b"POST /v1/chat/completions HTTP/1.1\r\nX-Big: " + huge, b"{}", 400),
        (b"GET /" + huge + b" HTTP/1.1", b"", 400),
        (b"POST /v1/chat/completions HTTP/1.1", orjson.dumps(chat(model="m" * 1_000_000)), 400),
        (b"POST /v1/chat/completions HTTP/1.1", orjson.dumps(chat(model="m" * 250)), 404),
        (b"GET /nowhere/" + b"y" * 4000 + b" HTTP/1.1", b"", 404),
    ]
    for head, body, status in cases:
        got, answer = await raw(r.url, head, body)
        assert got == status, head[:60]
        doc = orjson.loads(answer)
        assert isinstance(doc["error"], dict) and len(answer) < 1000
    # An existing id, re-registered with an undecodable secret
    sim2 = await fleet("n2")
    reg = orjson.dumps({"id": "n2", "url": sim2.url, "models": [MODEL]})
    auth = b"POST /v1/nodes/register HTTP/1.1\r\nAuthorization: Bearer join-token"
    assert (await raw(r.url, auth, reg))[0] == 201
    got, answer = await raw(r.url, auth + b"\r\nX-Node-Secret: \xff", reg)
    assert got == 409 and orjson.loads(answer)["error"]["code"] == "id_taken"
    assert not [rec for rec in caplog.records if rec.exc_info or rec.levelno >= logging.ERROR]


# -- 14: terminal output ----------------------------------------------------------------------


def test_the_fleet_table_escapes_control_characters() -> None:
    node = Node(
        id="evil", url="http://203.0.113.9", models=["m\u001b[2J"], scoring=Scoring(),
        gpu="\u001b]0;pwned\u0007\u001b[31mRED",
    )  # fmt: skip
    node.state_reason = "said \u009b31m"
    table = render_fleet(fleet_view([node], None, 0.0))
    assert "\u001b" not in table and "\u0007" not in table and "\u009b" not in table
    assert "\\x1b]0;pwned\\x07" in table


# -- fuzz: the request surface ------------------------------------------------------------------

_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=40)
)
_MESSAGES = st.one_of(
    st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "system", "assistant", "tool", ""])},
            optional={"content": st.one_of(st.text(max_size=60), _VALUES)},
        ),
        max_size=3,
    ),
    _VALUES,
)
_DOCS = st.fixed_dictionaries(
    {},
    optional={
        "model": st.one_of(st.just(MODEL), _VALUES, st.text(max_size=300)),
        "messages": _MESSAGES,
        "prompt": st.one_of(st.text(max_size=60), _VALUES),
        "input": st.one_of(st.text(max_size=60), _VALUES),
        "stream": st.one_of(st.booleans(), _VALUES),
        "max_tokens": st.one_of(st.integers(-5, 32), st.integers(10**6, 2**63), _VALUES),
        "n": _VALUES,
        "logprobs": _VALUES,
        "stream_options": st.one_of(_VALUES, st.just({"include_usage": True})),
    },
)
_BODIES = st.one_of(st.binary(max_size=300), _DOCS.map(lambda d: json.dumps(d).encode()))
_HEADER_VALUE = st.binary(max_size=200).map(
    lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\x00", b"")
)
_HEADERS = st.lists(
    st.tuples(
        st.sampled_from(
            ["Authorization", "Content-Type", "x-request-id", "x-ballast-via", "Connection",
             "Accept-Encoding", "traceparent", "X-Node-Secret", "Transfer-Encoding-X", "api-key"]
        ),
        _HEADER_VALUE,
    ),
    max_size=4,
)  # fmt: skip
_PATHS = st.sampled_from(
    ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/nodes/register",
     "/v1/nodes/n/heartbeat", "/admin/nodes/n/drain", "/v1/models", "/x%00y"]
)  # fmt: skip


def fuzz(port: int) -> None:
    """Malformed bodies and headers: every answer bounded, every error in the envelope."""

    @settings(
        max_examples=250, deadline=None, derandomize=True, database=None,
        suppress_health_check=list(HealthCheck),
    )  # fmt: skip
    @given(path=_PATHS, body=_BODIES, headers=_HEADERS)
    def one(path: str, body: bytes, headers: list[tuple[str, bytes]]) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.putrequest("POST", path, skip_accept_encoding=True)
            for name, value in headers:
                conn.putheader(name, value)
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        assert len(data) < 1 << 20
        assert resp.status != 500, data  # the router's own failure: a bug
        if resp.status >= 400:
            doc = orjson.loads(data)
            assert isinstance(doc["error"], dict) and isinstance(doc["error"]["message"], str)
        else:
            assert resp.status == 200

    one()


async def test_fuzzed_requests_get_bounded_envelope_errors(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    sim = await fleet("n", time_scale=0.0)
    r = await make_router([node_entry(sim)], **joinable())
    await asyncio.to_thread(fuzz, urlsplit(r.url).port or 0)
    async with http.post(r.url + "/v1/chat/completions", json=chat()) as resp:
        assert resp.status == 200  # still serving
    assert set(r.router.fleet.nodes) == {"n"}
