"""Bills no node can forge and no client can dodge; no answer can take the router.

Each test plays a hostile node (a small aiohttp server here) or a hostile client
against a router on real sockets, and asserts the bound that holds.
"""

from __future__ import annotations

import asyncio
import gzip
import http.client
import zlib
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.bill import LIMIT_FIELDS, STOP_SLACK, Sizes, bill, prompt_bound, read_sizes
from router.call import Exchange
from router.measure import Outcome
from router.relay import Relay
from tests.conftest import (
    MakeRouter,
    MakeSim,
    Node,
    RedisServer,
    RouterHandle,
    chat,
    node_entry,
)
from tests.test_supply import until

TEAM_KEY = "sk-bal-integrity-team-key-for-tests-0123456789ab"
OTHER_KEY = "sk-bal-integrity-other-key-for-tests-0123456789a"
TEAM = {"Authorization": f"Bearer {TEAM_KEY}"}
OTHER = {"Authorization": f"Bearer {OTHER_KEY}"}


@pytest.fixture(autouse=True)
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEAM_KEY", TEAM_KEY)
    monkeypatch.setenv("OTHER_KEY", OTHER_KEY)


def finished(r: RouterHandle) -> list[Exchange]:
    """The router's finished requests, as they finish."""
    seen: list[Exchange] = []
    r.router.recorder.immediate.append(seen.extend)
    return seen


def chunk(content: str | None = None, finish: str | None = None, **extra: Any) -> bytes:
    delta = {"content": content} if content is not None else {}
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return b"data: " + orjson.dumps({"id": "x", "choices": [choice], **extra}) + b"\n\n"


def answer(content: str = "ok", **extra: Any) -> dict[str, Any]:
    message = {"role": "assistant", "content": content}
    return {"id": "x", "choices": [{"index": 0, "message": message}], **extra}


async def sse(request: web.Request, headers: dict[str, str] | None = None) -> web.StreamResponse:
    out = web.StreamResponse(headers={"Content-Type": "text/event-stream", **(headers or {})})
    await out.prepare(request)
    return out


def forged(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion}


def keyed(**limits: Any) -> dict[str, Any]:
    team = {"name": "team", "key_env": "TEAM_KEY", **limits}
    return {"auth": {"keys": [team, {"name": "other", "key_env": "OTHER_KEY", "tpm": 4000}]}}


# -- 1: a node's usage is a claim, bounded by what it delivered ------------------------------


async def test_a_node_cannot_set_a_keys_bill(
    node: Node, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    async def liar(request: web.Request) -> web.Response:
        return web.json_response(answer("four words of text", usage=forged(2**39, 2**39)))

    bad = await node(liar, labels={"price_per_mtok": "1"})
    r = await make_router([bad], **keyed(tpm=4000, budget_tokens=10**12))
    seen = finished(r)
    body = chat(max_tokens=5)
    for _ in range(3):  # the key keeps being served: its bucket is not emptied by a claim
        async with http.post(r.url + "/v1/chat/completions", json=body, headers=TEAM) as resp:
            assert resp.status == 200
            assert int(resp.headers["x-ratelimit-remaining-tokens"]) > 2000
    sent = len(orjson.dumps(body))
    for ex in seen:
        assert ex.tokens is not None
        assert ex.tokens[0] <= prompt_bound(b"x" * sent) + 64 and ex.tokens[1] <= 5
        assert ex.cost < 0.01
    stats = r.router.fleet.nodes["bad"].stats
    assert stats.outcomes[Outcome.BAD_USAGE] == 3
    async with http.post(r.url + "/v1/chat/completions", json=body, headers=OTHER) as resp:
        assert resp.status == 200  # another key's bill is untouched by the first key's


async def test_a_stream_is_cut_at_max_tokens_times_n_and_billed_by_what_it_delivered(
    node: Node, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    sent: list[int] = []

    async def endless(request: web.Request) -> web.StreamResponse:
        out = await sse(request)
        sent.append(0)
        try:
            for _ in range(100_000):  # far past any max_tokens: a node that never stops
                await out.write(chunk("tok ", usage=forged(1, 10**9)))
                sent[-1] += 1
        except (ConnectionResetError, RuntimeError):
            pass
        return out

    r = await make_router([await node(endless)], **keyed())
    seen = finished(r)
    for n in (1, 3):
        body = chat(stream=True, max_tokens=5, n=n)
        async with http.post(r.url + "/v1/chat/completions", json=body, headers=TEAM) as resp:
            assert resp.status == 200
            events = (await resp.read()).split(b"\n\n")
        contents = [e for e in events if b'"content":"tok "' in e]
        assert len(contents) == 5 * n
        assert b'"finish_reason":"length"' in events[-3] and events[-2] == b"data: [DONE]"
        await until(lambda n=n: len(seen) == (n > 1) + 1, 5)
        tokens = seen[-1].tokens
        assert tokens is not None and tokens[1] <= 5 * n
    assert max(sent) < 100_000  # the node was cut off, not read to its end
    assert r.router.fleet.nodes["bad"].stats.outcomes[Outcome.BAD_ANSWER] == 2


def test_the_bill_is_bounded_by_limit_delivery_and_prompt() -> None:
    body = orjson.dumps(chat(max_tokens=100))
    sizes = read_sizes(orjson.loads(body))
    honest = (12, 40)
    assert bill(sizes, body, honest, 40, 160) == (honest, False)
    assert bill(sizes, body, (12, 41), 40, 40) == ((12, 41), False)  # the stop token
    (prompt, completion), over = bill(sizes, body, (10**9, 10**9), 40, 160)
    assert over and prompt == prompt_bound(body) and completion == 100
    (_, completion), over = bill(sizes, body, (12, 90), 3, 12)
    assert over and completion == 12 + STOP_SLACK  # three short events cannot be 90 tokens
    assert bill(sizes, body, None, 7, 30) == ((len(body) // 4, 7), False)
    whole = Sizes(stream=False, limit=None, n=1, changed=False)
    assert bill(whole, body, None, None, 400) == ((len(body) // 4, 100), False)


# -- 2: a client that leaves is billed what it was sent ----------------------------------


async def test_a_client_leaving_before_the_usage_chunk_is_billed_what_it_was_sent(
    node: Node, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    usage_may_go = asyncio.Event()

    asked: list[int] = []

    async def slow_usage(request: web.Request) -> web.StreamResponse:
        out = await sse(request)
        n = (await request.json())["max_tokens"]  # lowered to the budget's rest, the 3rd time
        asked.append(n)
        await out.write(b"".join(chunk("tok ") for _ in range(n)) + chunk(finish="stop"))
        await usage_may_go.wait()  # the usage chunk comes later; the client is gone by then
        try:
            await out.write(b'data: {"id":"x","choices":[],"usage":' + b"{}}\n\n")
        except (ConnectionResetError, RuntimeError):
            pass
        return out

    r = await make_router([await node(slow_usage)], **keyed(budget_tokens=3000))
    seen = finished(r)
    body = chat(stream=True, max_tokens=1200)
    for i in range(3):
        async with http.post(r.url + "/v1/chat/completions", json=body, headers=TEAM) as resp:
            assert resp.status == 200
            async for line in resp.content:
                if b'"finish_reason":"stop"' in line:
                    break  # and leave, before the usage chunk
        await until(lambda i=i: len(seen) == i + 1, 5)
        tokens = seen[i].tokens
        assert seen[i].status == 499 and tokens is not None
        assert tokens[0] > 0 and tokens[1] == asked[i]
    usage_may_go.set()
    async with http.post(r.url + "/v1/chat/completions", json=body, headers=TEAM) as resp:
        assert resp.status == 429  # the 3,000-token budget was used by what was delivered
        assert (await resp.json())["error"]["code"] == "insufficient_quota"
    assert asked[:2] == [1200, 1200] and asked[2] < 1200


# -- 3: no stream can stall the router ----------------------------------------------------


def test_the_framer_is_linear_and_bounds_a_pending_event() -> None:
    relay = Relay(chat=True, max_event=64 * 1024)
    relay.feed(b'data: {"x": "')
    for _ in range(15):  # 15 x 4 KB: within the bound, held without being copied again
        assert relay.feed(b"a" * 4096) == [] and relay.failure is None
    assert len(relay.buf) == 13 + 15 * 4096
    relay.feed(b"a" * 8192)
    assert relay.failure == "garbage" and len(relay.buf) == 0
    relay = Relay(chat=True)
    events = [relay.feed(piece) for piece in (b"data: {}\n", b"\ndata: [DO", b"NE]\n\n")]
    assert events == [[], [b"data: {}"], [b"data: [DONE]"]]
    assert relay.feed(b"data:{}\n\n: c\n\ndata: ") == [b"data:{}", b": c"]


async def test_a_never_ending_event_is_cut_and_the_stream_continues_elsewhere(
    node: Node, fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    sent = [0]

    async def endless_event(request: web.Request) -> web.StreamResponse:
        out = await sse(request)
        await out.write(chunk("tok "))
        await out.write(b'data: {"choices": [{"delta": {"content": "')
        try:
            for _ in range(4096):  # 256 MB if nobody stops it
                await out.write(b"a" * 65536)
                sent[0] += 65536
        except (ConnectionResetError, RuntimeError):
            pass
        return out

    good = await fleet("good")
    r = await make_router(
        [await node(endless_event), node_entry(good, engine="vllm")],
        limits={"max_event_bytes": 256 * 1024},
        policy={"name": "round_robin"},
    )
    for i in range(2):
        ask = chat(stream=True, max_tokens=8, messages=[{"role": "user", "content": f"q{i}"}])
        async with http.post(r.url + "/v1/chat/completions", json=ask) as resp:
            body = await resp.read()
            assert resp.status == 200 and body.endswith(b"data: [DONE]\n\n")
            assert b"aaaa" not in body
    assert r.router.fleet.nodes["bad"].stats.outcomes[Outcome.BAD_ANSWER] >= 1
    assert sent[0] < 64 * 1024 * 1024


# -- 4: answers read whole share one budget ------------------------------------------------


async def test_answers_read_whole_share_one_budget_of_memory(
    node: Node, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    release = asyncio.Event()
    part = b" " * 400_000

    async def big(request: web.Request) -> web.StreamResponse:
        out = web.StreamResponse(headers={"Content-Type": "application/json"})
        await out.prepare(request)
        try:
            await out.write(b'{"id": "x", "choices": [], "pad": "' + part)
            await release.wait()
            await out.write(b'"}')
        except (ConnectionResetError, RuntimeError):
            pass
        return out

    r = await make_router(
        # Two 400 kB answers, counted six times each (router.upstream.Held), fit.
        [await node(big)],
        limits={"buffered_bytes": 6_000_000, "max_response_bytes": 600_000},
    )
    upstream = r.router.proxy.upstream

    async def ask() -> tuple[int, dict[str, Any]]:
        async with http.post(r.url + "/v1/chat/completions", json=chat()) as resp:
            return resp.status, await resp.json()

    held = [asyncio.create_task(ask()) for _ in range(2)]
    await until(lambda: upstream.buffered.used >= 4_800_000, 5)
    status, doc = await ask()  # a third would take the router past its budget
    assert status == 503 and doc["error"]["code"] == "router_busy"
    assert upstream.buffered.used <= upstream.buffered.limit
    release.set()
    assert [(await t)[0] for t in held] == [200, 200]
    assert upstream.buffered.used == 0
    stats = r.router.fleet.nodes["bad"].stats
    assert stats.failures_total == 0  # the router's own budget is not the node's fault


# -- 5, 6: sizes are read as the engines read them; budgets are hard caps --------------------


async def test_sizes_are_coerced_as_engines_coerce_them_or_refused(
    node: Node, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    received: list[dict[str, Any]] = []

    async def echo(request: web.Request) -> web.StreamResponse:
        doc = await request.json()
        received.append(doc)
        if doc.get("stream"):
            out = await sse(request)
            await out.write(chunk("ok") + chunk(finish="stop") + b"data: [DONE]\n\n")
            return out
        return web.json_response(answer())

    r = await make_router([await node(echo)])
    url = r.url + "/v1/chat/completions"
    async with http.post(url, json={**chat(), "stream": "true", "max_tokens": "5"}) as resp:
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        assert (await resp.read()).endswith(b"data: [DONE]\n\n")
    assert received[-1]["stream"] is True and received[-1]["max_tokens"] == 5
    async with http.post(url, json={**chat(), "max_tokens": 7.0, "n": "2"}) as resp:
        assert resp.status == 200
    assert received[-1]["max_tokens"] == 7 and received[-1]["n"] == 2
    for field, value in (
        ("max_tokens", 5.5), ("max_tokens", "many"), ("max_tokens", -1), ("max_tokens", True),
        ("max_completion_tokens", [1]), ("n", 0), ("n", 1000), ("stream", "maybe"),
        ("stream_options", "x"), ("stream_options", {"include_usage": "perhaps"}),
    ):  # fmt: skip
        async with http.post(url, json={**chat(), field: value}) as resp:
            doc = await resp.json()
            assert resp.status == 400, (field, value)
            assert doc["error"]["code"] == "invalid_value" and doc["error"]["param"] in (
                field, "include_usage",
            ), doc  # fmt: skip
    assert r.router.fleet.nodes["bad"].stats.failures_total == 0
    sizes = read_sizes({"max_tokens": 1, "max_completion_tokens": 1500, "n": 8})
    assert sizes.limit == 1500 and sizes.completion_estimate == 12_000


async def held_answers(node: Node) -> tuple[dict[str, Any], asyncio.Event, list[int]]:
    """A node that holds every answer until released; the count it received, then
    the tokens each could use (its body's bytes over 4, plus max_tokens)."""
    release = asyncio.Event()
    arrived = [0]

    async def hold(request: web.Request) -> web.Response:
        arrived[0] += 1
        body = await request.read()
        doc = orjson.loads(body)
        arrived.append(len(body) // 4 + max(doc.get(f, 0) for f in LIMIT_FIELDS))
        await release.wait()
        return web.json_response(answer(usage=forged(10, 5)))

    return await node(hold), release, arrived


async def burst(
    http: aiohttp.ClientSession, urls: list[str], body: dict[str, Any], n: int
) -> list[asyncio.Task[int]]:
    async def one(url: str) -> int:
        async with http.post(url + "/v1/chat/completions", json=body, headers=TEAM) as resp:
            await resp.read()
            return resp.status

    return [asyncio.create_task(one(urls[i % len(urls)])) for i in range(n)]


async def test_a_burst_cannot_overrun_a_token_budget_or_a_tpm_limit(
    node: Node, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    held, release, arrived = await held_answers(node)
    r = await make_router([held], **keyed(budget_tokens=2000))
    body = chat(max_tokens=500)
    estimate = len(orjson.dumps(body)) // 4 + 500
    seen = finished(r)
    tasks = await burst(http, [r.url], body, 40)
    await until(lambda: len(seen) + arrived[0] == 40, 10)
    assert sum(arrived[1:]) <= 2000 + estimate  # what the admitted ones may use
    assert sum(arrived[1:]) >= 2000 - estimate  # and the budget is used, not wasted
    release.set()
    statuses = [await t for t in tasks]
    assert statuses.count(200) == arrived[0] and statuses.count(429) == 40 - arrived[0]

    held, release, arrived = await held_answers(node)
    r = await make_router([held], **keyed(tpm=4000))
    seen = finished(r)
    body = chat(max_tokens=1, max_completion_tokens=1500)
    estimate = len(orjson.dumps(body)) // 4 + 1500
    tasks = await burst(http, [r.url], body, 4)
    await until(lambda: len(seen) + arrived[0] == 4, 10)
    # 1,500 tokens each, not 1: two whole, a third lowered to what the bucket held
    assert arrived[1] == arrived[2] >= estimate > arrived[3]  # (json= sends spaces: 3 more)
    assert sum(arrived[1:]) <= 4000
    release.set()
    assert sorted([await t for t in tasks]) == [200, 200, 200, 429]


async def test_two_replicas_each_hold_their_share_of_a_budget(
    node: Node, make_router: MakeRouter, http: aiohttp.ClientSession, redis_server: RedisServer
) -> None:
    held, release, arrived = await held_answers(node)
    common = {"state": {"redis_url": redis_server.url}, **keyed(budget_tokens=4000)}
    a = await make_router([held], **common)
    b = await make_router([held], **common)
    rings = [a.router.proxy.keys, b.router.proxy.keys]
    await until(lambda: all(k.share == 0.5 for k in rings), 10)
    body = chat(max_tokens=500)
    estimate = len(orjson.dumps(body)) // 4 + 500
    seen = finished(a), finished(b)
    tasks = await burst(http, [a.url, b.url], body, 40)
    await until(lambda: len(seen[0]) + len(seen[1]) + arrived[0] == 40, 10)
    assert sum(arrived[1:]) <= 4000 + 2 * estimate
    release.set()
    assert [await t for t in tasks].count(200) == arrived[0]


async def test_embeddings_are_sized_as_embeddings(
    make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    """An embeddings request generates nothing: sent without a completion limit (a
    strict engine refuses unknown fields), and reserving no completion tokens."""
    received: list[dict[str, Any]] = []

    async def embed(request: web.Request) -> web.Response:
        received.append(await request.json())
        usage = {"prompt_tokens": 3, "total_tokens": 3}
        return web.json_response({"data": [{"embedding": [0.1], "index": 0}], "usage": usage})

    app = web.Application()
    app.router.add_post("/v1/embeddings", embed)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        r = await make_router([{"id": "e", "url": url, "models": ["emb"]}], **keyed(tpm=4000))
        body = {"model": "emb", "input": "hello"}
        async with http.post(r.url + "/v1/embeddings", json=body, headers=TEAM) as resp:
            assert resp.status == 200
            remaining = int(resp.headers["x-ratelimit-remaining-tokens"])
        assert received == [body]  # as the client sent it
        assert remaining > 4000 - 64  # its prompt's estimate, no completion reserved
    finally:
        await runner.cleanup()


# -- 7: latency is what the caller waits for ---------------------------------------------


async def test_a_whole_answer_is_timed_to_its_last_byte_and_a_drip_is_a_stall(
    node: Node, fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    async def late_body(request: web.Request) -> web.StreamResponse:
        out = web.StreamResponse(headers={"Content-Type": "application/json"})
        await out.prepare(request)  # headers at once ...
        await asyncio.sleep(0.3)  # ... the answer later: the node's behaviour under test
        await out.write(orjson.dumps(answer()))
        return out

    r = await make_router([await node(late_body)])
    async with http.post(r.url + "/v1/chat/completions", json=chat()) as resp:
        assert resp.status == 200
    assert r.router.fleet.nodes["bad"].stats.latency.estimate >= 0.3

    async def drip(request: web.Request) -> web.StreamResponse:
        out = await sse(request)
        await out.write(chunk("tok "))
        try:
            for _ in range(2000):  # a byte at a time: never an event, never silent
                await out.write(b" ")
                await asyncio.sleep(0.01)
        except (ConnectionResetError, RuntimeError):
            pass
        return out

    good = await fleet("good")
    r = await make_router(
        [await node(drip, id="drip"), node_entry(good, engine="vllm")],
        timeouts={"stream_idle_s": 0.3},
        policy={"name": "round_robin"},
    )
    for i in range(2):
        ask = chat(stream=True, max_tokens=8, messages=[{"role": "user", "content": f"q{i}"}])
        async with http.post(r.url + "/v1/chat/completions", json=ask) as resp:
            assert (await resp.read()).endswith(b"data: [DONE]\n\n")
    assert r.router.fleet.nodes["drip"].stats.outcomes[Outcome.TIMEOUT] == 1


# -- 8, 9: only answers reach clients ------------------------------------------------------


HOSTILE_HEADERS = {
    "Content-Type": "text/html",
    "Set-Cookie": "session=stolen",
    "Access-Control-Allow-Origin": "*",
    "Cache-Control": "public, max-age=86400",
    "Refresh": "0; url=http://evil.example/",
    "Strict-Transport-Security": "max-age=31536000",
    "X-Request-ID": "node-chosen",
    "X-Frame-Options": "ALLOWALL",
}


async def test_only_an_answer_and_ballasts_own_headers_reach_the_client(
    node: Node, fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    async def html(request: web.Request) -> web.StreamResponse:
        if (await request.json()).get("stream"):
            out = await sse(request, HOSTILE_HEADERS)
            await out.write(chunk("ok") + chunk(finish="stop") + b"data: [DONE]\n\n")
            return out
        return web.Response(body=orjson.dumps(answer()), headers=HOSTILE_HEADERS)

    r = await make_router([await node(html)])
    for stream in (False, True):
        async with http.post(r.url + "/v1/chat/completions", json=chat(stream=stream)) as resp:
            assert resp.status == 200
            want = "text/event-stream" if stream else "application/json"
            assert resp.headers["Content-Type"].startswith(want)
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
            assert resp.headers["x-request-id"] != "node-chosen"
            for name in HOSTILE_HEADERS:
                if name not in ("Content-Type", "Cache-Control", "X-Request-ID"):
                    assert name not in resp.headers, name
            if not stream:
                assert "Cache-Control" not in resp.headers

    statuses = iter([307, 600, 999, 302])

    async def odd(request: web.Request) -> web.Response:
        status = next(statuses, 200)
        return web.Response(
            status=status, body=orjson.dumps(answer()), headers={"Location": "http://evil/"}
        )

    good = await fleet("good")
    r = await make_router(
        [await node(odd, id="odd"), node_entry(good)], policy={"name": "round_robin"}
    )
    outcomes = r.router.fleet.nodes["odd"].stats.outcomes
    for _ in range(60):  # until the odd node has given each of its statuses
        async with http.post(r.url + "/v1/chat/completions", json=chat()) as resp:
            assert resp.status == 200 and resp.headers["x-ballast-node"] == "good"
            assert "Location" not in resp.headers
        if outcomes[Outcome.BAD_ANSWER] == 4:
            break
    assert outcomes[Outcome.BAD_ANSWER] == 4


async def test_compression_only_as_the_client_asked_and_never_a_bomb(
    node: Node, fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    plain = orjson.dumps(answer(usage=forged(3, 1)))
    bomb = gzip.compress(b'{"choices": [' + b" " * 20_000_000, compresslevel=9)
    deflated = zlib.compress(plain)
    answers = {
        "gzip": gzip.compress(plain), "bomb": bomb, "x-whatever": plain, "deflate": deflated,
        "two-members": gzip.compress(plain) + gzip.compress(b"<html>"),  # clients read both
    }  # fmt: skip

    async def packed(request: web.Request) -> web.StreamResponse:
        kind = request.headers["traceparent"]  # the one client header a node sees
        enc = "gzip" if kind in ("bomb", "two-members") else kind
        return web.Response(body=answers[kind], headers={"Content-Encoding": enc, **_JSON})

    good = await fleet("good")
    for kind, accept, by_packed in (
        ("gzip", "identity", False),  # the client asked for no compression
        ("gzip", "gzip", True),
        ("deflate", "gzip, deflate", True),
        ("bomb", "gzip", False),  # inflates past max_response_bytes
        ("two-members", "gzip", False),  # a valid answer, then a page
        ("x-whatever", "x-whatever, gzip", False),  # not one Ballast can check
    ):
        bad = await node(packed, id="packed")
        r = await make_router(
            [bad, node_entry(good)],
            limits={"max_response_bytes": 1_000_000},
            policy={"name": "round_robin"},
        )
        served = []
        for _ in range(2):
            headers = {"traceparent": kind, "Accept-Encoding": accept}
            async with http.post(
                r.url + "/v1/chat/completions", json=chat(), headers=headers
            ) as resp:
                assert resp.status == 200 and (await resp.json())["choices"]
                served.append(resp.headers["x-ballast-node"])
        assert ("packed" in served) is by_packed, kind
        outcomes = r.router.fleet.nodes["packed"].stats.outcomes
        assert outcomes[Outcome.BAD_ANSWER] == (0 if by_packed else 1), kind


_JSON = {"Content-Type": "application/json"}


# -- 13: the node's own words never pass as Ballast's ---------------------------------------


async def test_a_nodes_error_is_wrapped_and_data_without_a_space_is_sse(
    node: Node, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    async def impostor(request: web.Request) -> web.StreamResponse:
        if (await request.json()).get("stream"):
            out = await sse(request)
            await out.write(
                chunk("ok").replace(b"data: ", b"data:") + b"data:[DONE]\n\n"
            )  # no space after the colon: valid SSE
            return out
        envelope = {"message": "quota\u202e gone", "type": "insufficient_quota",
                    "code": "router_busy", "param": "model"}  # fmt: skip
        return web.json_response({"error": envelope}, status=400)

    r = await make_router([await node(impostor)])
    async with http.post(r.url + "/v1/chat/completions", json=chat()) as resp:
        error = (await resp.json())["error"]
        assert resp.status == 400 and resp.headers["x-ballast-node"] == "bad"
        assert error["code"] == "upstream_rejected" and error["type"] == "invalid_request_error"
        assert error["message"] == "the node rejected the request (HTTP 400): quota  gone"
    async with http.post(r.url + "/v1/chat/completions", json=chat(stream=True)) as resp:
        assert resp.status == 200
        assert b'"content":"ok"' in await resp.read()
    assert r.router.fleet.nodes["bad"].stats.failures_total == 0


# -- the answer surface, fuzzed: whatever a node sends, the client gets an answer or an envelope --

_STATUSES = st.sampled_from([200, 201, 204, 301, 302, 307, 400, 404, 418, 422, 429, 501, 600, 999])
_NODE_HEADERS = st.lists(
    st.tuples(
        st.sampled_from(
            ["Content-Type", "Set-Cookie", "Location", "X-Request-ID", "x-ballast-node",
             "Access-Control-Allow-Origin", "Refresh", "x-ratelimit-remaining-tokens"]
        ),
        st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
    ),
    max_size=3,
)  # fmt: skip
_EVENTS = st.lists(
    st.one_of(
        st.binary(max_size=60),
        st.builds(lambda c: chunk(c).rstrip(b"\n"), st.text(max_size=8)),
        st.just(b"data: [DONE]"),
        st.just(b'data: {"error": {"message": "x"}}'),
        st.just(b'data: {"choices": [], "usage": {"prompt_tokens": 99999999}}'),
    ),
    max_size=6,
)
_BODIES = st.one_of(
    st.binary(max_size=200),
    st.just(orjson.dumps(answer(usage=forged(2**39, 2**39)))),
    _EVENTS.map(lambda events: b"\n\n".join(events) + b"\n\n"),
)
_ENCODINGS = st.sampled_from([None, "gzip", "deflate", "br", "x-junk"])


def fuzz_answers(port: int, spec: dict[str, Any]) -> None:
    """Hostile answers (statuses, headers, encodings, SSE): every answer the client
    gets is a checked answer or an error in the envelope, never a node's headers."""

    @settings(
        max_examples=150, deadline=None, derandomize=True, database=None,
        suppress_health_check=list(HealthCheck),
    )  # fmt: skip
    @given(
        status=_STATUSES, headers=_NODE_HEADERS, body=_BODIES, encoding=_ENCODINGS,
        stream=st.booleans(), accept=st.sampled_from(["identity", "gzip"]), keyed=st.booleans(),
    )  # fmt: skip
    def one(
        status: int, headers: list[tuple[str, str]], body: bytes, encoding: str | None,
        stream: bool, accept: str, keyed: bool,
    ) -> None:  # fmt: skip
        if encoding in ("gzip", "deflate"):
            body = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)
        spec.update(status=status, headers=headers, body=body, encoding=encoding)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            ask = orjson.dumps(chat(stream=stream, max_tokens=4))
            sent = {"Content-Type": "application/json", "Accept-Encoding": accept}
            conn.request("POST", "/v1/chat/completions", ask, {**sent, **(TEAM if keyed else {})})
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        assert resp.status in (200, 400, 404, 418, 422, 501, 502, 503, 504), resp.status
        for name in ("Set-Cookie", "Location", "Access-Control-Allow-Origin", "Refresh"):
            assert resp.getheader(name) is None, name
        assert resp.getheader("X-Content-Type-Options") == "nosniff"
        kind = resp.getheader("Content-Type", "")
        if resp.status >= 400:
            assert isinstance(orjson.loads(data)["error"]["message"], str)
        elif stream:
            assert kind.startswith("text/event-stream")
            assert data.endswith(b"data: [DONE]\n\n") or b'"error"' in data.rsplit(b"data:")[-1]
        else:
            assert kind == "application/json"
            if resp.getheader("Content-Encoding") == "gzip":
                data = gzip.decompress(data)
            assert isinstance(orjson.loads(data)["choices"], list)

    one()


async def test_fuzzed_node_answers_reach_clients_only_as_answers_or_envelopes(
    node: Node, fleet: MakeSim, make_router: MakeRouter
) -> None:
    spec: dict[str, Any] = {}

    async def anything(request: web.Request) -> web.StreamResponse:
        headers = [(k, v) for k, v in spec["headers"] if k != "Content-Type"]
        headers.append(("Content-Type", dict(spec["headers"]).get("Content-Type", "")))
        if spec["encoding"]:
            headers.append(("Content-Encoding", spec["encoding"]))
        return web.Response(status=spec["status"], body=spec["body"], headers=headers)

    good = await fleet("good", time_scale=0.0)
    r = await make_router(
        [await node(anything), node_entry(good, engine="vllm")],
        policy={"name": "round_robin"},
        health={"probe": False, "max_ejection_percent": 0},
        **keyed(),
    )
    await asyncio.to_thread(fuzz_answers, urlsplit(r.url).port or 0, spec)
    assert r.router.fleet.nodes["good"].stats.failures_total == 0
