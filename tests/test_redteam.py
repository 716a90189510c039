"""What a hostile node (join token) or key holder tried against the bills, the cut
and the router's own budgets, and the guarantee that now holds for each.

Each test began as an attack that got through; its docstring tells the attack, its
assertions the bound. The hostile node is a small aiohttp server on a real socket
(the ``node`` fixture) and the router is real.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDict

from router.bill import PROMPT_SLACK, STOP_SLACK
from router.measure import Outcome
from tests.conftest import MakeRouter, Node, chat
from tests.test_integrity import (
    OTHER_KEY,
    TEAM,
    TEAM_KEY,
    answer,
    chunk,
    finished,
    forged,
    keyed,
    sse,
)
from tests.test_supply import until

URL = "/v1/chat/completions"


@pytest.fixture(autouse=True)
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEAM_KEY", TEAM_KEY)
    monkeypatch.setenv("OTHER_KEY", OTHER_KEY)


def content_events(body: bytes) -> int:
    """Content-bearing events as an SSE client (the openai SDK) reads them: the
    ``data:`` lines of each event, whatever other fields the event has."""
    n = 0
    for event in body.split(b"\n\n"):
        for line in event.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            try:
                doc = orjson.loads(line[5:])
            except orjson.JSONDecodeError:
                continue
            if not isinstance(doc, dict):
                continue
            for choice in doc.get("choices") or ():
                delta = choice.get("delta") or {}
                if any(delta.get(f) for f in ("content", "reasoning_content", "tool_calls")):
                    n += 1
    return n


# -- billing and the cut ---------------------------------------------------------------------


async def test_events_with_an_id_or_comment_line_are_counted_and_cut(
    node: Node, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    """``id: 7\\ndata: {...}`` is one valid SSE event (the openai SDK yields its data as
    a chunk). Relay.track sees an event that does not start with ``data:``, calls it
    an SSE field, passes it on unread: never counted, never cut, never billed."""

    async def ided(request: web.Request) -> web.StreamResponse:
        out = await sse(request)
        try:
            for i in range(300):
                await out.write(b"id: %d\n" % i + chunk("tok "))
            await out.write(b": x\n" + chunk(finish="stop") + b"data: [DONE]\n\n")
        except (ConnectionResetError, RuntimeError):
            pass
        return out

    r = await make_router([await node(ided)], **keyed())
    seen = finished(r)
    async with http.post(r.url + URL, json=chat(stream=True, max_tokens=5), headers=TEAM) as resp:
        assert resp.status == 200
        body = await resp.read()
    await until(lambda: len(seen) == 1, 5)
    delivered = content_events(body)
    assert delivered <= 5, f"max_tokens 5, the client read {delivered} content events"
    tokens = seen[0].tokens
    assert tokens is not None and tokens[1] >= min(delivered, 5), tokens


async def test_reasoning_and_tool_call_deltas_are_cut_at_max_tokens(
    node: Node, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    """The cut counts only ``content``/``text`` events: a node streaming
    ``reasoning_content`` (or tool-call argument) deltas is never cut and never
    stalled (its volume moves), for as long as the deadline allows."""
    sent = [0]

    async def thinker(request: web.Request) -> web.StreamResponse:
        out = await sse(request)
        try:
            for i in range(3000):
                if i % 2:
                    delta: dict[str, Any] = {"reasoning_content": "hmm "}
                else:
                    call = {"index": 0, "function": {"arguments": "{}"}}
                    delta = {"tool_calls": [call]}
                doc = {"id": "x", "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
                await out.write(b"data: " + orjson.dumps(doc) + b"\n\n")
                sent[0] += 1
            await out.write(chunk(finish="stop") + b"data: [DONE]\n\n")
        except (ConnectionResetError, RuntimeError):
            pass
        return out

    r = await make_router([await node(thinker)], **keyed())
    async with http.post(r.url + URL, json=chat(stream=True, max_tokens=5), headers=TEAM) as resp:
        body = await resp.read()
    delivered = content_events(body)
    assert delivered <= 5, f"max_tokens 5, the client read {delivered} deltas"
    # Cut: the node's part ended as more than it was asked for (its writes may all
    # have fit the socket's buffers before the router read them).
    assert r.router.fleet.nodes["bad"].stats.outcomes[Outcome.BAD_ANSWER] == 1


async def test_a_continuation_is_cut_at_max_tokens_too(
    node: Node, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    """Relay.rewrite's events are all written before ``delivered > cut`` is looked at:
    a continuing node that sends its answer in one chunk is not cut at max_tokens."""

    async def truncates(request: web.Request) -> web.StreamResponse:
        out = await sse(request)
        await out.write(chunk("a "))
        return out  # ends without a finish reason: continued elsewhere

    async def floods(request: web.Request) -> web.StreamResponse:
        out = await sse(request)
        events = b"".join(chunk("tok ") for _ in range(200))
        await out.write(events + chunk(finish="stop") + b"data: [DONE]\n\n")
        return out

    r = await make_router(
        [await node(truncates, id="first"), await node(floods, id="flood", engine="vllm")],
        policy={"name": "round_robin"},
    )
    seen = finished(r)
    counts = []
    for i in range(2):  # round robin: one of the two starts on "first"
        ask = chat(stream=True, max_tokens=5, messages=[{"role": "user", "content": f"q{i}"}])
        async with http.post(r.url + URL, json=ask) as resp:
            counts.append(content_events(await resp.read()))
    await until(lambda: len(seen) == 2, 5)
    assert any(ex.resumed for ex in seen)
    assert max(counts) <= 5, f"max_tokens 5, the client read {counts} content events"


async def test_events_never_delivered_are_not_billed(
    node: Node, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    """A chunk's events are tracked (counted) before a failure later in the same chunk
    drops them all unsent: the client gets no text, an 'ended' (exhausted) stream,
    and a bill for max_tokens."""

    async def bills_then_breaks(request: web.Request) -> web.StreamResponse:
        out = await sse(request)
        n = (await request.json())["max_tokens"]
        tokens = b"".join(chunk("tok ") for _ in range(n))
        await out.write(tokens + b'data: {"error": {"message": "oops"}}\n\n')
        return out

    r = await make_router([await node(bills_then_breaks, labels={"price_per_mtok": "1"})],
                          **keyed())  # fmt: skip
    seen = finished(r)
    async with http.post(r.url + URL, json=chat(stream=True, max_tokens=60), headers=TEAM) as resp:
        body = await resp.read()
    await until(lambda: len(seen) == 1, 5)
    delivered = content_events(body)
    tokens = seen[0].tokens
    assert tokens is not None
    assert tokens[1] <= delivered + STOP_SLACK, (
        f"billed {tokens[1]} completion tokens, the client received {delivered}: {body[-300:]!r}"
    )


async def test_a_length_field_the_router_does_not_read_cannot_dodge_the_bill(
    node: Node, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    """llama.cpp's server reads ``n_predict`` before ``max_tokens``. A key holder sends
    ``max_tokens: 1, n_predict: 2000`` to an honest llama.cpp node: the whole answer
    (2,000 tokens, honest usage) is billed at the limit Ballast read, 1 token; the
    tpm bucket and the budget are charged 1."""

    async def llamacpp(request: web.Request) -> web.Response:
        doc = await request.json()
        n = doc.get("n_predict", doc.get("max_tokens", 16))  # as llama.cpp's server reads it
        usage = {"prompt_tokens": 10, "completion_tokens": n, "total_tokens": n + 10}
        return web.json_response(answer("tok " * n, usage=usage))

    r = await make_router([await node(llamacpp, engine="llamacpp")], **keyed(tpm=4000))
    seen = finished(r)
    async with http.post(
        r.url + URL, json=chat(max_tokens=1, n_predict=2000), headers=TEAM
    ) as resp:
        assert resp.status == 200
        doc = await resp.json()
    received = doc["usage"]["completion_tokens"]
    await until(lambda: len(seen) == 1, 5)
    tokens = seen[0].tokens
    assert tokens is not None
    assert tokens[1] >= received, f"received {received} tokens, billed {tokens[1]}"


async def test_a_request_without_a_limit_cannot_overrun_a_budget(
    node: Node, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    """A request without max_tokens reserves DEFAULT_COMPLETION_TOKENS (256), but an
    engine generates up to its context: a burst of such requests on a 2,000-token
    budget is admitted ~7 times and billed 3,000 tokens each, with honest nodes."""
    release = asyncio.Event()
    arrived = [0]

    async def long_answers(request: web.Request) -> web.Response:
        arrived[0] += 1
        doc = await request.json()
        n = doc.get("max_tokens") or 3000  # no limit: as long as the context allows
        await release.wait()
        return web.json_response(answer("tok " * n, usage=forged(10, n)))

    r = await make_router([await node(long_answers)], **keyed(budget_tokens=2000))
    seen = finished(r)
    body = {k: v for k, v in chat().items() if k != "max_tokens"}
    estimate = len(orjson.dumps(body)) // 4 + 256

    async def one() -> int:
        async with http.post(r.url + URL, json=body, headers=TEAM) as resp:
            await resp.read()
            return resp.status

    tasks = [asyncio.create_task(one()) for _ in range(10)]
    await until(lambda: arrived[0] + sum(t.done() for t in tasks) == 10, 10)
    release.set()
    await asyncio.gather(*tasks)
    await until(lambda: len(seen) == 10, 5)
    billed = sum(ex.tokens[0] + ex.tokens[1] for ex in seen if ex.tokens)
    assert billed <= 2000 + estimate, f"a 2,000-token budget billed {billed} tokens"


async def test_a_request_without_a_limit_cannot_overrun_tpm(
    node: Node, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    """The same for tokens per minute: 10 limit-less requests at once on a 4,000 tpm key
    all pass (each debits 256 + prompt) and use 30,000 tokens within the minute."""
    release = asyncio.Event()
    arrived = [0]

    async def long_answers(request: web.Request) -> web.Response:
        arrived[0] += 1
        await release.wait()
        return web.json_response(answer("tok " * 3000, usage=forged(10, 3000)))

    r = await make_router([await node(long_answers)], **keyed(tpm=4000))
    seen = finished(r)
    body = {k: v for k, v in chat().items() if k != "max_tokens"}
    estimate = len(orjson.dumps(body)) // 4 + 256

    async def one() -> int:
        async with http.post(r.url + URL, json=body, headers=TEAM) as resp:
            await resp.read()
            return resp.status

    tasks = [asyncio.create_task(one()) for _ in range(10)]
    await until(lambda: arrived[0] + sum(t.done() for t in tasks) == 10, 10)
    release.set()
    statuses = await asyncio.gather(*tasks)
    await until(lambda: len(seen) == 10, 5)
    billed = sum(ex.tokens[0] + ex.tokens[1] for ex in seen if ex.tokens and ex.status == 200)
    assert billed <= 4000 + estimate, f"4,000 tpm, {statuses.count(200)} served, {billed} tokens"


async def test_a_prompt_bill_is_not_raised_by_the_words_image_url(
    node: Node, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    """prompt_bound counts b'"image_url"' anywhere in the body: a tool schema with an
    ``image_url`` property (no image at all) lets a node bill 16,384 more prompt
    tokens per mention, unflagged."""
    props = {"image_url": {"type": "string"}}
    params = {"type": "object", "properties": props}
    tool = {"type": "function", "function": {"name": "f", "parameters": params}}
    body = chat(max_tokens=5, tools=[tool, tool, tool])

    async def inflates(request: web.Request) -> web.Response:
        return web.json_response(answer("ok", usage=forged(40_000, 1)))

    r = await make_router([await node(inflates)], **keyed())
    seen = finished(r)
    async with http.post(r.url + URL, json=body, headers=TEAM) as resp:
        assert resp.status == 200
    await until(lambda: len(seen) == 1, 5)
    tokens = seen[0].tokens
    assert tokens is not None
    assert tokens[0] <= len(json.dumps(body)) + PROMPT_SLACK, tokens  # as aiohttp sends it
    assert r.router.fleet.nodes["bad"].stats.outcomes[Outcome.BAD_USAGE] == 1


# -- the router's own budgets --------------------------------------------------------------


async def test_a_continuations_refusal_gives_back_its_buffered_bytes(
    node: Node, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    """Proxy._continue opens ``replace(call, body=...)``: a copy. A continuing node's 4xx
    is read whole into the copy's ``buffered``, which nobody releases: two of them
    and the router answers 503 router_busy to every whole answer, for good."""
    pad = b" " * 480_000

    async def truncates(request: web.Request) -> web.StreamResponse:
        out = await sse(request)
        await out.write(chunk("a "))
        return out

    async def refuses_continuations(request: web.Request) -> web.StreamResponse:
        doc = await request.json()
        if doc.get("continue_final_message"):
            body = b'{"error": {"message": "no"}, "pad": "' + pad + b'"}'
            return web.Response(status=400, body=body, content_type="application/json")
        if doc.get("stream"):
            out = await sse(request)
            await out.write(chunk("ok") + chunk(finish="stop") + b"data: [DONE]\n\n")
            return out
        return web.json_response(answer())

    r = await make_router(
        [await node(truncates, id="first"),
         await node(refuses_continuations, id="second", engine="vllm")],
        policy={"name": "round_robin"},
        limits={"buffered_bytes": 6_000_000, "max_response_bytes": 600_000},
    )  # fmt: skip
    seen = finished(r)
    for i in range(4):
        ask = chat(stream=True, max_tokens=8, messages=[{"role": "user", "content": f"q{i}"}])
        async with http.post(r.url + URL, json=ask) as resp:
            await resp.read()
    await until(lambda: len(seen) == 4, 5)
    assert sum(bool(ex.resumed) for ex in seen) >= 2
    upstream = r.router.proxy.upstream
    assert upstream.buffered.used == 0, f"{upstream.buffered.used} bytes held after the end"
    async with http.post(r.url + URL, json=chat()) as resp:
        assert resp.status == 200, await resp.text()


# -- the stall and pace rules --------------------------------------------------------------


async def test_a_stream_far_behind_the_fleets_pace_is_moved_before_its_deadline(
    node: Node, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    """The pace is first judged after PACE_WINDOW (16) tokens: a node 100x slower than
    the fleet, never silent for stream_idle_s, holds its client to the deadline. With
    the defaults (stream_idle_s 60, total_s 600) a token every 59 s is never judged."""

    async def drip(request: web.Request) -> web.StreamResponse:
        out = await sse(request)
        try:
            for _ in range(100):
                await out.write(chunk("tok "))
                await asyncio.sleep(0.25)  # the node's pace under test, not a synchronisation
        except (ConnectionResetError, RuntimeError):
            pass
        return out

    async def fast(request: web.Request) -> web.StreamResponse:
        out = await sse(request)
        n = (await request.json())["max_tokens"]
        await out.write(b"".join(chunk("tok ") for _ in range(n)))
        await out.write(chunk(finish="stop") + b"data: [DONE]\n\n")
        return out

    peers = [await node(fast, id=f"peer{i}", engine="vllm") for i in range(3)]
    r = await make_router(
        [await node(drip, id="drip"), *peers],
        policy={"name": "round_robin"},
        timeouts={"stream_idle_s": 1.0, "total_s": 3.0},
    )
    for p in peers:  # the fleet's usual pace: a millisecond a token
        r.router.fleet.nodes[p["id"]].stats.observe_token_gap(0.001)
    seen = finished(r)
    async with http.post(r.url + URL, json=chat(stream=True, max_tokens=100)) as resp:
        body = await resp.read()
    await until(lambda: len(seen) == 1, 5)
    assert seen[0].resumed and seen[0].resumed[0][0] == "drip", seen[0].resumed
    assert body.endswith(b"data: [DONE]\n\n") and b"deadline_exceeded" not in body, body[-200:]


# -- only answers reach clients ------------------------------------------------------------


async def test_a_second_content_encoding_header_does_not_reach_the_client(
    node: Node, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    """encoding_of reads the first Content-Encoding; response_headers copies all of them.
    ``identity`` then ``gzip`` passes the check, and the client is told its plain
    answer is gzip (it cannot read it; the node is not blamed)."""

    async def two_encodings(request: web.Request) -> web.StreamResponse:
        headers = CIMultiDict(
            [("Content-Type", "text/event-stream"), ("Content-Encoding", "identity"),
             ("Content-Encoding", "gzip")]
        )  # fmt: skip
        out = web.StreamResponse(headers=headers)
        await out.prepare(request)
        await out.write(chunk("ok") + chunk(finish="stop") + b"data: [DONE]\n\n")
        return out

    r = await make_router([await node(two_encodings)])
    async with aiohttp.ClientSession(auto_decompress=False) as raw:
        async with raw.post(r.url + URL, json=chat(stream=True)) as resp:
            encodings = resp.headers.getall("Content-Encoding", [])
            await resp.read()
    assert all(e.strip().lower() == "identity" for e in encodings), encodings


async def test_a_node_refusing_the_routers_own_credentials_is_its_fault(
    node: Node, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    """A node's 401/403/407 passes to the client as that status (401: 'your key is
    wrong' to the openai SDK; 407: a proxy-auth prompt) and closes as CLIENT_ERROR:
    a node answering 403 to everything takes its share of traffic forever, unblamed."""

    async def forbidden(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "go away"}}, status=403)

    async def honest(request: web.Request) -> web.Response:
        return web.json_response(answer())

    r = await make_router(
        [await node(forbidden, id="bad"), await node(honest, id="good")],
        policy={"name": "round_robin"},
    )
    statuses = []
    for _ in range(4):
        async with http.post(r.url + URL, json=chat()) as resp:
            statuses.append(resp.status)
    assert statuses == [200] * 4, statuses


async def test_a_flood_of_comments_between_tokens_is_bounded(
    node: Node, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    """Bytes without progress are bounded only in time (stream_idle_s, 60 s by default):
    ``:\n\n`` comments, three bytes an event, each parsed in Python, pass for as long
    as a token comes every minute: one stream takes a core (issue 24 row 3 again)."""
    sent = [0]
    flood = b":\n\n" * (1 << 18)  # 768 KB, 262,144 events

    async def chatter(request: web.Request) -> web.StreamResponse:
        out = await sse(request)
        try:
            for _ in range(5):
                await out.write(chunk("tok "))
                for _ in range(4):  # 3 MB of comments after every token
                    await out.write(flood)
                    sent[0] += len(flood)
            await out.write(chunk(finish="stop") + b"data: [DONE]\n\n")
        except (ConnectionResetError, RuntimeError):
            pass
        return out

    r = await make_router([await node(chatter)], limits={"max_event_bytes": 64 * 1024})
    async with http.post(r.url + URL, json=chat(stream=True, max_tokens=100)) as resp:
        body = await resp.read()
    assert body.count(b":\n\n") <= 64 * 1024, f"{body.count(b':' + bytes([10]) * 2)} comments"
    assert sent[0] < 8 * 1024 * 1024, f"the node sent {sent[0]} bytes of comments unchecked"


async def test_a_stream_is_cut_at_max_tokens_with_resume_disabled(
    node: Node, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    """With resume.enabled false and no counting, Deliver._copy_bytes passes bytes
    unread: no cut at max_tokens, no max_event_bytes, no stall-on-bytes rule."""

    async def endless(request: web.Request) -> web.StreamResponse:
        out = await sse(request)
        try:
            for _ in range(2000):
                await out.write(chunk("tok "))
            await out.write(chunk(finish="stop") + b"data: [DONE]\n\n")
        except (ConnectionResetError, RuntimeError):
            pass
        return out

    r = await make_router([await node(endless)], resume={"enabled": False})
    async with http.post(r.url + URL, json=chat(stream=True, max_tokens=5)) as resp:
        delivered = content_events(await resp.read())
    assert delivered <= 5, f"max_tokens 5, the client read {delivered} content events"


async def test_usage_chunks_the_client_did_not_ask_for_never_reach_it(
    node: Node, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    """With a key, the node is asked for usage the client did not ask for and the
    usage-only chunk is hidden: but Relay.hidden holds one event per chunk, so of two
    usage-only events in one chunk the first reaches the client (``choices: []``,
    which clients indexing ``choices[0]`` crash on)."""
    usage = b'data: {"id":"x","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}\n\n'

    async def twice(request: web.Request) -> web.StreamResponse:
        out = await sse(request)
        await out.write(chunk("ok") + chunk(finish="stop") + usage + usage + b"data: [DONE]\n\n")
        return out

    r = await make_router([await node(twice)], **keyed())
    async with http.post(r.url + URL, json=chat(stream=True), headers=TEAM) as resp:
        body = await resp.read()
    assert b'"usage"' not in body, body
