"""Streams that outlive their node: continuation on another node, word for word."""

from __future__ import annotations

import aiohttp
import openai
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loadtest.simnode import Fault
from tests.conftest import MODEL, MakeRouter, MakeSim, chat, node_entry

N = 10
WHOLE = "".join(f"t{i} " for i in range(N))


def events(body: bytes) -> list[bytes]:
    return [e for e in body.split(b"\n\n") if e]


def answer(body: bytes, chat_mode: bool = True) -> tuple[str, list[dict]]:
    """The text of a streamed answer and its JSON chunks (checks [DONE] comes last)."""
    evs = events(body)
    assert evs[-1] == b"data: [DONE]"
    docs = [orjson.loads(e.removeprefix(b"data: ")) for e in evs[:-1]]
    text = ""
    for d in docs:
        assert "error" not in d, d
        for c in d["choices"]:
            text += (c["delta"].get("content") or "") if chat_mode else c["text"]
    return text, docs


async def stream(http: aiohttp.ClientSession, url: str, body: dict, path: str = "chat") -> bytes:
    endpoint = "/v1/chat/completions" if path == "chat" else "/v1/completions"
    async with http.post(url + endpoint, data=orjson.dumps(body)) as resp:
        assert resp.status == 200
        return await resp.read()


async def resumes(http: aiohttp.ClientSession, url: str) -> dict[tuple[str, ...], float]:
    """ballast_stream_resumes_total from /metrics, by (model, reason, outcome)."""
    async with http.get(url + "/metrics") as resp:
        text = await resp.text()
    out = {}
    for fam in text_string_to_metric_families(text):
        if fam.name == "ballast_stream_resumes":
            for s in fam.samples:
                if s.name.endswith("_total") and s.value:
                    out[(s.labels["model"], s.labels["reason"], s.labels["outcome"])] = s.value
    return out


async def pair(fleet: MakeSim, fault: Fault, quirks: tuple[str, ...] = (), engine: str = "vllm"):
    bad = await fleet("bad", fault=fault, numbered=True, engine=engine)
    good = await fleet("good", numbered=True, engine=engine, quirks=quirks)
    return bad, good


def entries(*sims, engine: str = "vllm") -> list[dict]:
    return [node_entry(s, engine=engine) for s in sims]


@pytest.mark.parametrize("fault", [Fault(mode="midstream", after_tokens=3),
                                   Fault(mode="stall", after_tokens=3)])  # fmt: skip
async def test_a_stream_whose_node_fails_reaches_the_caller_whole(
    fault: Fault, fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    bad, good = await pair(fleet, fault)
    r = await make_router(entries(bad, good), policy={"name": "round_robin"},
                          timeouts={"stream_idle_s": 0.3})  # fmt: skip
    for _ in range(2):  # round robin: one of the two starts on the failing node
        text, docs = answer(await stream(http, r.url, chat(stream=True, max_tokens=N)))
        assert text == WHOLE
        assert len({d["id"] for d in docs}) == 1
        assert len({d["created"] for d in docs}) == 1
        assert sum("role" in c["delta"] for d in docs for c in d["choices"]) == 1
        assert docs[-1]["choices"][0]["finish_reason"] == "length"
    assert bad.requests == 1 and good.requests == 2
    reason = "reset" if fault.mode == "midstream" else "stalled"
    assert await resumes(http, r.url) == {(MODEL, reason, "continued"): 1}


async def test_a_node_gone_moves_its_streams_without_retry_budget(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    """With no retry budget at all, a stream whose node went away (reset) still moves
    on: it replaces the lost work. A stalled node's stream, which may be overload,
    does not."""
    bad, good = await pair(fleet, Fault(mode="midstream", after_tokens=3))
    no_budget = {"budget_percent": 0, "min_retry_concurrency": 0, "budget_wait_s": 0}
    r = await make_router(entries(bad, good), policy={"name": "round_robin"}, retries=no_budget,
                          timeouts={"stream_idle_s": 0.3})  # fmt: skip
    for _ in range(2):
        text, _ = answer(await stream(http, r.url, chat(stream=True, max_tokens=N)))
        assert text == WHOLE
    bad.set_fault(Fault(mode="stall", after_tokens=3))
    for _ in range(2):
        await stream(http, r.url, chat(stream=True, max_tokens=N))
    assert await resumes(http, r.url) == {
        (MODEL, "reset", "continued"): 1,
        (MODEL, "stalled", "budget"): 1,
    }


async def test_llamacpp_echoes_the_prefill_and_the_caller_sees_it_once(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    bad, good = await pair(fleet, Fault(mode="midstream", after_tokens=4), ("echo_prefill",),
                           engine="llamacpp")  # fmt: skip
    r = await make_router(entries(bad, good, engine="llamacpp"), policy={"name": "round_robin"})
    for _ in range(2):
        text, _ = answer(await stream(http, r.url, chat(stream=True, max_tokens=N)))
        assert text == WHOLE


async def test_a_completion_stream_is_continued_from_its_prompt(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    bad, good = await pair(fleet, Fault(mode="midstream", after_tokens=5))
    r = await make_router(entries(bad, good), policy={"name": "round_robin"})
    body = {"model": MODEL, "prompt": "Count:", "max_tokens": N, "stream": True}
    for _ in range(2):
        text, _ = answer(await stream(http, r.url, body, path="completions"), chat_mode=False)
        assert text == WHOLE


async def test_usage_counts_the_original_prompt_and_every_token_once(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    bad, good = await pair(fleet, Fault(mode="midstream", after_tokens=3))
    r = await make_router(entries(bad, good), policy={"name": "round_robin"})
    body = chat(stream=True, max_tokens=N, stream_options={"include_usage": True})
    usages = []
    for _ in range(2):
        _, docs = answer(await stream(http, r.url, body))
        usages.append([d["usage"] for d in docs if d.get("usage")])
    assert usages[0] == usages[1]  # continued or not, the same
    (usage,) = usages[0]
    assert usage["completion_tokens"] == N
    assert usage["total_tokens"] == usage["prompt_tokens"] + N


async def test_the_openai_sdk_sees_one_unbroken_stream(
    fleet: MakeSim, make_router: MakeRouter
) -> None:
    bad, good = await pair(fleet, Fault(mode="midstream", after_tokens=2))
    r = await make_router(entries(bad, good), policy={"name": "round_robin"})
    client = openai.AsyncOpenAI(base_url=r.url + "/v1", api_key="unused", max_retries=0)
    for _ in range(2):
        text = ""
        async for chunk in await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "count"}], max_tokens=N, stream=True
        ):
            text += chunk.choices[0].delta.content or "" if chunk.choices else ""
        assert text == WHOLE
    await client.close()


async def test_what_cannot_be_continued_honestly_ends_with_an_error_event(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    bad, good = await pair(fleet, Fault(mode="midstream", after_tokens=3))
    r = await make_router(entries(bad, good), policy={"name": "round_robin"})
    bodies = [await stream(http, r.url, chat(stream=True, max_tokens=N, logprobs=True))
              for _ in range(2)]  # fmt: skip
    # The one that started on the failing node ends with the error event.
    assert sum(b"upstream_error" in events(b)[-1] for b in bodies) == 1
    assert await resumes(http, r.url) == {(MODEL, "reset", "refused"): 1}


async def test_no_node_able_to_continue_ends_with_an_error_event(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    bad = await fleet("bad", fault=Fault(mode="midstream", after_tokens=3), numbered=True)
    other = await fleet("other", numbered=True)
    # Engines unknown: no node is known to continue an answer.
    r = await make_router([node_entry(bad), node_entry(other)], policy={"name": "round_robin"})
    bodies = [await stream(http, r.url, chat(stream=True, max_tokens=N)) for _ in range(2)]
    errors = [b for b in bodies if b"upstream_error" in events(b)[-1]]
    assert len(errors) == 1
    assert other.requests == 1  # the failed stream was not sent anywhere else


async def test_continuations_are_bounded_and_never_go_back_to_a_failed_node(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    sims = [await fleet(f"bad{i}", fault=Fault(mode="midstream", after_tokens=2), numbered=True,
                        engine="vllm") for i in range(4)]  # fmt: skip
    r = await make_router(entries(*sims), resume={"max_continuations": 2})
    body = await stream(http, r.url, chat(stream=True, max_tokens=N))
    last = orjson.loads(events(body)[-1].removeprefix(b"data: "))
    assert last["error"]["code"] == "upstream_error"
    assert sum(s.requests for s in sims) == 3  # the first node and two continuations
    assert all(s.requests <= 1 for s in sims)


async def test_a_straggler_far_behind_its_own_pace_moves_to_another_node(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    n = 40
    whole = "".join(f"t{i} " for i in range(n))
    slow = await fleet("slow", numbered=True, engine="vllm", time_scale=1.0)
    fast = await fleet("fast", numbered=True, engine="vllm", time_scale=1.0)
    r = await make_router(entries(slow, fast), policy={"name": "round_robin"})
    for _ in range(2):  # each node learns its own pace (8 ms a token)
        assert answer(await stream(http, r.url, chat(stream=True, max_tokens=n)))[0] == whole
    slow.set_fault(Fault(mode="throttle", after_tokens=20, factor=10))
    for _ in range(2):
        text, docs = answer(await stream(http, r.url, chat(stream=True, max_tokens=n)))
        assert text == whole
        assert len({d["id"] for d in docs}) == 1
    assert await resumes(http, r.url) == {(MODEL, "straggler", "continued"): 1}
    assert r.router.fleet.nodes["slow"].stats.failures_total == 0  # slow is not broken
