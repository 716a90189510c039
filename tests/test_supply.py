"""Supply truth and routing around bad supply: real nodes on loopback, real timers."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable

import aiohttp
import orjson

from loadtest.simnode import Fault
from router.fleet import NodeState
from router.measure import parse_engine_metrics
from tests.conftest import MODEL, MakeRouter, MakeSim, RouterHandle, chat, node_entry

PROBING = {"probe": True, "verify_static": True, "probe_interval_s": 0.2, "probe_timeout_s": 2}


async def until(check: Callable[[], bool | Awaitable[bool]], within: float) -> None:
    """Until ``check()`` holds (looked at every 10 ms); fails after ``within`` seconds."""
    async with asyncio.timeout(within):
        while True:
            result = check()
            if result if isinstance(result, bool) else await result:
                return
            await asyncio.sleep(0.01)


async def send(http: aiohttp.ClientSession, r: RouterHandle, body: object) -> tuple[int, str]:
    async with http.post(r.url + "/v1/chat/completions", data=orjson.dumps(body)) as resp:
        await resp.read()
        return resp.status, resp.headers.get("x-ballast-node", "")


async def test_a_node_lying_about_its_model_is_never_verified(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    honest = await fleet("honest")
    liar = await fleet("liar", models=("other",))
    r = await make_router(
        [node_entry(honest), {"id": "liar", "url": liar.url, "models": [MODEL]}], health=PROBING
    )
    nodes = r.router.fleet.nodes
    assert nodes["liar"].state is NodeState.REGISTERED  # claims only, at first
    await until(lambda: nodes["honest"].state is NodeState.VERIFIED, 5)
    await until(lambda: "does not list" in nodes["liar"].state_reason, 5)
    assert nodes["honest"].probe["ok"] and nodes["honest"].probe["ttfb_ms"] > 0
    served = Counter([(await send(http, r, chat()))[1] for _ in range(20)])
    assert served == {"honest": 20}
    assert nodes["liar"].state is NodeState.REGISTERED
    await until(lambda: nodes["honest"].state is NodeState.SERVING, 2)  # serving real traffic


async def test_a_black_hole_costs_one_first_byte_timeout(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    hole = await fleet("hole", fault=Fault(mode="hang"))
    good = await fleet("good")
    r = await make_router(
        [node_entry(hole), node_entry(good)],
        policy={"name": "round_robin"},  # alone, it would keep sending every other request
        timeouts={"first_byte_s": 0.5},
    )
    slow = 0
    for _ in range(12):
        t0 = time.monotonic()
        status, node = await send(http, r, chat())
        assert (status, node) == (200, "good")
        slow += time.monotonic() - t0 >= 0.5
    assert slow == 1
    hole_node = r.router.fleet.nodes["hole"]
    assert hole_node.state is NodeState.EJECTED and "timeout" in hole_node.state_reason
    await asyncio.wait_for(hole.cancel_seen.wait(), 5)  # its request was not left hanging


async def test_a_node_failing_fast_loses_its_traffic(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    fast_fail = await fleet("fails-fast", fault=Fault(mode="error", status=503))
    good = await fleet("good", profile="T4")  # slower than the failing node's 1 ms errors
    r = await make_router([node_entry(fast_fail), node_entry(good)])
    for _ in range(50):
        assert await send(http, r, chat()) == (200, "good")
    assert fast_fail.requests <= 5  # a 1 ms 503 counts as a slow answer, not a fast one


async def test_a_flapping_node_backs_off_longer_each_time_and_ramps_back(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    flappy = await fleet("flappy", fault=Fault(mode="error", status=500))
    steady = await fleet("steady")
    r = await make_router(
        [node_entry(flappy), node_entry(steady)],
        policy={"name": "round_robin"},
        health={"probe": False, "consecutive_failures": 2, "base_ejection_s": 0.3,
                "max_ejection_s": 5, "slow_start_s": 2},
    )  # fmt: skip
    node = r.router.fleet.nodes["flappy"]
    durations = []
    for n in (1, 2):
        while node.state is not NodeState.EJECTED:
            assert (await send(http, r, chat()))[0] == 200
        assert node.ejections == n
        durations.append(node.ejected_until - time.time())
        if n == 2:
            flappy.set_fault(Fault())  # it recovers while ejected
        await until(lambda: node.state is NodeState.SERVING, 5)  # back after its back-off
    assert 0.15 < durations[0] <= 0.3 < durations[1] <= 0.6
    assert node.stats.ramp(time.monotonic()) < 0.5  # slow start: a small share at first
    policy = r.router.proxy.policy
    assert policy.name == "round_robin"  # ramp is used by score; round robin ignores it
    r.router.swap_policy("score", {})
    served = Counter([(await send(http, r, chat()))[1] for _ in range(30)])
    assert served["flappy"] < served["steady"]


async def test_a_request_too_large_for_a_small_card_never_goes_there(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    small, big = await fleet("small", profile="T4"), await fleet("big", profile="H100")
    r = await make_router(
        [node_entry(small, vram_gb=16), node_entry(big, vram_gb=80)],
        models={MODEL: {"kv_bytes_per_token": 2_000_000, "weights_gb": 6}},  # 5k vs 37k tokens
        policy={"name": "round_robin"},
    )

    def words(n: int) -> dict:
        return {"model": MODEL, "messages": [{"role": "user", "content": "word " * n}],
                "max_tokens": 16}  # fmt: skip

    long = [await send(http, r, words(4_000)) for _ in range(10)]  # ~5,000+ tokens
    assert long == [(200, "big")] * 10
    short = Counter([(await send(http, r, words(10)))[1] for _ in range(10)])
    assert short == {"small": 5, "big": 5}
    async with http.post(r.url + "/v1/chat/completions", json=words(40_000)) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "context_length_exceeded"


async def test_a_supply_dip_of_three_seconds_loses_no_queued_request(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    sims = [await fleet(f"n{i}") for i in range(3)]
    r = await make_router(
        [node_entry(s) for s in sims],
        health={"probe": True, "verified_probe_interval_s": 60},
        queue={"max_wait_s": 5},
        timeouts={"connect_s": 0.5, "total_s": 30},
    )
    assert (await send(http, r, chat()))[0] == 200
    for s in sims:
        await s.stop()

    async def during_dip(delay: float) -> int:
        await asyncio.sleep(delay)  # arrivals spread over the dip
        return (await send(http, r, chat()))[0]

    requests = [asyncio.create_task(during_dip(i * 0.2)) for i in range(10)]
    await asyncio.sleep(3.0)  # the length of the dip
    for s in sims:
        await s.start()
    assert await asyncio.gather(*requests) == [200] * 10
    metrics = await (await http.get(r.url + "/metrics")).text()
    assert 'ballast_queue_wait_seconds_count{priority="interactive"} 10.0' in metrics


async def test_hedging_takes_the_first_answer_and_cancels_the_other(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    slow = await fleet("slow", fault=Fault(mode="hang"))
    fast = await fleet("fast")
    r = await make_router(
        [node_entry(slow), node_entry(fast)],
        policy={"name": "round_robin"},
        hedge={"after_ms": 100, "budget_percent": 100},
        timeouts={"first_byte_s": 10},
    )
    t0 = time.monotonic()
    assert await send(http, r, chat(stream=True)) == (200, "fast")
    assert time.monotonic() - t0 < 5  # did not wait for the hung primary
    await asyncio.wait_for(slow.cancel_seen.wait(), 5)  # the loser was cancelled
    proxy = r.router.proxy
    assert (proxy.hedging.sent, proxy.hedging.won) == (1, 1)


def test_engine_metrics_of_vllm_sglang_and_llamacpp() -> None:
    vllm = (
        'vllm:num_requests_waiting{model_name="m"} 3\n'
        'vllm:num_requests_running{model_name="m"} 5\n'
        'vllm:kv_cache_usage_perc{model_name="m"} 0.75\n'
    )
    sglang = "sglang:num_queue_reqs 2\nsglang:num_running_reqs 4\nsglang:token_usage 0.5\n"
    llamacpp = "llamacpp:requests_processing 1\nllamacpp:requests_deferred 6\n"
    assert parse_engine_metrics(vllm) == (3, 5, 0.75)
    assert parse_engine_metrics(sglang) == (2, 4, 0.5)
    assert parse_engine_metrics(llamacpp) == (6, 1, None)


async def test_hedging_with_a_primary_that_fails_at_once_is_plain_failover(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    broken = await fleet("broken", fault=Fault(mode="error", status=500))
    fast = await fleet("fast")
    r = await make_router(
        [node_entry(broken), node_entry(fast)],
        policy={"name": "round_robin"},
        hedge={"after_ms": 500, "budget_percent": 100},
    )
    assert await send(http, r, chat()) == (200, "fast")
    assert (broken.requests, fast.requests) == (1, 1)
    assert r.router.proxy.hedging.sent == 0
    assert all(n.stats.in_flight == 0 for n in r.router.fleet.nodes.values())
