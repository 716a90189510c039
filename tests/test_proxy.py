"""The proxy path end to end: real sockets, simulated nodes, the router in-process."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import aiohttp
import orjson
import pytest
from aiohttp import web

from loadtest.simnode import PROFILES, Fault
from tests.conftest import MODEL, MakeRouter, MakeSim, chat, dead_url, node_entry


async def post(http: aiohttp.ClientSession, url: str, body: object) -> aiohttp.ClientResponse:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    return await http.post(url + "/v1/chat/completions", data=data)


def assert_error(doc: dict, code: str) -> None:
    err = doc["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == code and err["message"]


async def test_pass_through_with_ids(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    sim = await fleet("a")
    r = await make_router([node_entry(sim)])
    async with await post(http, r.url, chat()) as resp:
        assert resp.status == 200
        assert resp.headers["x-ballast-node"] == "a"
        assert len(resp.headers["x-request-id"]) >= 16
        doc = await resp.json()
    assert doc["choices"][0]["message"]["content"] == "tok " * 4
    async with await http.post(
        r.url + "/v1/chat/completions", data=orjson.dumps(chat()), headers={"x-request-id": "abc-1"}
    ) as resp:
        assert resp.headers["x-request-id"] == "abc-1"


async def test_client_authorization_is_not_forwarded_node_key_is(
    make_router: MakeRouter, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str | None] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        assert "Connection" not in request.headers or request.headers["Connection"] != "upgrade"
        return web.json_response({"choices": [{"index": 0, "message": {"content": "ok"}}]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    monkeypatch.setenv("NODE_KEY", "node-secret")
    try:
        r = await make_router(
            [
                {"id": "k", "url": url, "models": [MODEL], "api_key_env": "NODE_KEY"},
            ]
        )
        async with await http.post(
            r.url + "/v1/chat/completions",
            data=orjson.dumps(chat()),
            headers={"Authorization": "Bearer client-secret"},
        ) as resp:
            assert resp.status == 200
            assert "node-secret" not in str(resp.headers)
    finally:
        await runner.cleanup()
    assert seen == ["Bearer node-secret"]


async def test_stream_is_passed_through_as_it_arrives(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    # 20 tokens at 0.5 s each: the node is still generating when the first chunk arrives.
    sim = await fleet("slow", time_scale=1.0, profile=replace(PROFILES["T4"], tokens_per_s=2))
    r = await make_router([node_entry(sim)])
    async with await post(http, r.url, chat(stream=True, max_tokens=20)) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        first = await resp.content.readline()
        assert first.startswith(b"data: ")
        assert sim.running == 1  # generation is still under way
    # closing early cancelled the upstream request at once
    await asyncio.wait_for(sim.cancel_seen.wait(), 5)
    assert sim.running == 0


async def test_full_stream_ends_with_done(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    sim = await fleet("a")
    r = await make_router([node_entry(sim)])
    async with await post(http, r.url, chat(stream=True, max_tokens=5)) as resp:
        body = await resp.read()
    events = [e for e in body.split(b"\n\n") if e]
    assert len(events) == 6 and events[-1] == b"data: [DONE]"


async def test_failover_300_sequential_requests_all_succeed(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    good = await fleet("good")
    flaky = await fleet("flaky", fault=Fault(mode="error", rate=0.5, status=500), seed=3)
    r = await make_router(
        [
            {"id": "refusing", "url": dead_url(), "models": [MODEL]},
            node_entry(flaky),
            node_entry(good),
        ]
    )
    served: dict[str, int] = {}
    for i in range(300):  # conversations of their own: affinity keys spread over the nodes
        body = chat(max_tokens=1, messages=[{"role": "user", "content": f"q{i}"}])
        async with await post(http, r.url, body) as resp:
            assert resp.status == 200, await resp.text()
            served[resp.headers["x-ballast-node"]] = (
                served.get(resp.headers["x-ballast-node"], 0) + 1
            )
    assert "refusing" not in served
    stats = r.router.fleet.nodes["refusing"].stats
    assert stats.failures_total == stats.requests_total >= 1
    assert served["good"] > served.get("flaky", 0)


async def test_stream_failover_before_first_byte(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    bad = await fleet("bad", fault=Fault(mode="error", status=503))
    good = await fleet("good")
    r = await make_router([node_entry(bad), node_entry(good)], policy={"name": "round_robin"})
    for _ in range(4):
        async with await post(http, r.url, chat(stream=True)) as resp:
            assert resp.status == 200
            assert resp.headers["x-ballast-node"] == "good"
            assert (await resp.read()).endswith(b"data: [DONE]\n\n")


async def test_mid_stream_failure_ends_with_sse_error(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    sim = await fleet("dies", fault=Fault(mode="midstream", after_tokens=2))
    r = await make_router([node_entry(sim)])
    async with await post(http, r.url, chat(stream=True, max_tokens=10)) as resp:
        assert resp.status == 200
        body = await resp.read()
    events = [e for e in body.split(b"\n\n") if e]
    assert len(events) == 3
    last = orjson.loads(events[-1].removeprefix(b"data: "))
    assert last["error"]["code"] == "upstream_error"
    assert r.router.fleet.nodes["dies"].stats.failures_total == 1


async def test_deadline_gives_504(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    hole = await fleet("hole", fault=Fault(mode="hang"))
    r = await make_router([node_entry(hole)], timeouts={"first_byte_s": 5, "total_s": 0.3})
    async with await post(http, r.url, chat()) as resp:
        assert resp.status == 504
        assert_error(await resp.json(), "deadline_exceeded")


async def test_all_nodes_failing_gives_502_and_429_is_kept(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    a = await fleet("a", fault=Fault(mode="error", status=500))
    b = await fleet("b", fault=Fault(mode="error", status=429, retry_after=7))
    r = await make_router([node_entry(a), node_entry(b)])
    async with await post(http, r.url, chat()) as resp:
        assert resp.status == 502
        assert_error(await resp.json(), "upstream_failed")
    r2 = await make_router([node_entry(b)])
    async with await post(http, r2.url, chat()) as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "7"


async def test_client_errors_pass_through_without_retry(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    sim = await fleet("a", fault=Fault(mode="error", status=400))
    other = await fleet("b", fault=Fault(mode="error", status=400))
    r = await make_router([node_entry(sim), node_entry(other)])
    async with await post(http, r.url, chat()) as resp:
        assert resp.status == 400  # the node's own verdict on the request, passed through
        assert resp.headers["x-ballast-node"] in ("a", "b")
    assert sim.requests + other.requests == 1  # not retried elsewhere


async def test_a_node_not_knowing_a_model_it_claims_is_retried_elsewhere(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    liar = await fleet("liar", models=("other",))
    good = await fleet("good")
    r = await make_router(
        [{"id": "liar", "url": liar.url, "models": [MODEL]}, node_entry(good)],
        policy={"name": "round_robin"},
    )
    for _ in range(4):
        async with await post(http, r.url, chat()) as resp:
            assert resp.status == 200 and resp.headers["x-ballast-node"] == "good"
    r2 = await make_router([{"id": "liar", "url": liar.url, "models": [MODEL]}])
    async with await post(http, r2.url, chat()) as resp:
        assert resp.status == 404
        assert_error(await resp.json(), "model_not_found")


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"not json", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_json"),
        (b'{"messages": []}', 400, "missing_model"),
        (b'{"model": 7}', 400, "missing_model"),
        (b'{"model": "nope"}', 404, "model_not_found"),
        (b'{"model": "' + b"x" * (10 * 1024 * 1024) + b'"}', 413, "request_too_large"),
    ],
)
async def test_bad_input(
    body: bytes,
    status: int,
    code: str,
    fleet: MakeSim,
    make_router: MakeRouter,
    http: aiohttp.ClientSession,
) -> None:
    sim = await fleet("a")
    r = await make_router([node_entry(sim)])
    async with await post(http, r.url, body) as resp:
        assert resp.status == status
        assert_error(await resp.json(), code)
    async with await post(http, r.url, chat()) as resp:  # still serving
        assert resp.status == 200
    assert sim.requests == 1


async def test_chunked_oversize_body_is_refused(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    sim = await fleet("a")
    r = await make_router([node_entry(sim)], limits={"max_body_bytes": 4096})

    async def gen():  # no Content-Length: the limit applies while reading
        for _ in range(10):
            yield b"x" * 1024

    async with http.post(r.url + "/v1/chat/completions", data=gen()) as resp:
        assert resp.status == 413
        assert_error(await resp.json(), "request_too_large")


async def test_no_routable_node_is_503_with_retry_after(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    from router.fleet import NodeState

    sim = await fleet("a")
    r = await make_router([node_entry(sim)], queue={"max_wait_s": 0.2})
    r.router.fleet.set_state("a", NodeState.DRAINING, "test")
    async with await post(http, r.url, chat()) as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "1"
        assert_error(await resp.json(), "no_capacity")
    async with http.get(r.url + "/readyz") as resp:  # ready: it answers, with 503s
        assert resp.status == 200 and (await resp.json())["routable_nodes"] == 0


async def test_models_health_and_unknown_paths(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    a = await fleet("a", models=("m1", "m2"))
    b = await fleet("b", models=("m2", "m3"))
    r = await make_router([node_entry(a), node_entry(b)])
    async with http.get(r.url + "/v1/models") as resp:
        doc = await resp.json()
    assert doc["object"] == "list"
    assert [m["id"] for m in doc["data"]] == ["m1", "m2", "m3"]
    async with http.get(r.url + "/healthz") as resp:
        assert resp.status == 200
    async with http.get(r.url + "/readyz") as resp:
        ready = await resp.json()
        assert resp.status == 200 and ready["routable_nodes"] == 2
        assert ready["store"] == "memory:ok"
    async with http.get(r.url + "/v1/chat/completions") as resp:
        assert resp.status == 405
        assert_error(await resp.json(), "bad_method")
    async with http.get(r.url + "/v2/whatever") as resp:
        assert resp.status == 404
        assert_error(await resp.json(), "unknown_url")


async def test_client_disconnect_while_waiting_cancels_upstream(
    fleet: MakeSim, make_router: MakeRouter
) -> None:
    hole = await fleet("hole", fault=Fault(mode="hang"))
    r = await make_router([node_entry(hole)])
    async with aiohttp.ClientSession() as own:
        task = asyncio.create_task(post(own, r.url, chat()))
        await asyncio.wait_for(hole.arrived.wait(), 5)  # the node holds the request
        task.cancel()
    await asyncio.wait_for(hole.cancel_seen.wait(), 5)
    stats = r.router.fleet.nodes["hole"].stats
    assert stats.in_flight == 0 and stats.failures_total == 0


async def test_a_bug_in_a_policy_answers_500_in_the_envelope(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    class BrokenPolicy:  # a user-written policy with a bug
        name = "broken"
        description = "raises"

        def rank(self, *args: object) -> list:
            raise ZeroDivisionError("oops")

    sim = await fleet("a")
    r = await make_router([node_entry(sim)])
    good = r.router.proxy.policy
    r.router.proxy.policy = BrokenPolicy()
    async with await post(http, r.url, chat()) as resp:
        assert resp.status == 500
        assert "x-request-id" in resp.headers
        body = await resp.text()
        assert_error(orjson.loads(body), "internal_error")
        assert "Traceback" not in body and "oops" not in body
    r.router.proxy.policy = good
    async with await post(http, r.url, chat()) as resp:
        assert resp.status == 200
