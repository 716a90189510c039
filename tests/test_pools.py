"""Pools, spillover, costs, model fallbacks and locality (router.pools)."""

from __future__ import annotations

import asyncio
from collections import Counter
from random import Random
from typing import Any

import aiohttp
import pytest

from loadtest.simnode import Fault, SimNode
from router.config import PoolsConfig, Scoring
from router.fleet import Node, Source
from router.measure import Meter, Outcome
from router.pools import Pools, prefer_local
from tests.conftest import MakeRouter, MakeSim, RouterHandle, chat, node_entry
from tests.test_observability import metric_value, scrape
from tests.test_tenants import post

SLO = {"ttfb_p95_ms": 200, "error_rate": 0.2}


def pools_cfg(**kw: Any) -> PoolsConfig:
    return PoolsConfig.model_validate(
        {"order": ["spot", "reserved"], "slo": SLO, "window_s": 10, "min_requests": 5,
         "recover_s": 5, "trickle": 0.0, **kw}
    )  # fmt: skip


def node(id: str, pool: str | None = None, **labels: str) -> Node:
    if pool is not None:
        labels["pool"] = pool
    return Node(id=id, url="http://127.0.0.1:1", models=["m"], scoring=Scoring(), labels=labels)


def test_spill_at_once_return_after_recover_s_without_flapping() -> None:
    pools = Pools(pools_cfg(), Random(1))
    spot = pools.pools[0]
    now = 100.0
    for _ in range(10):
        spot.add(now, 0.05, False)
    pools.judge(now)
    assert not spot.spilling and spot.p95_ms is not None and 50 <= spot.p95_ms <= 63
    for _ in range(10):  # p95 now 0.5 s: the SLO (200 ms) is broken
        spot.add(now, 0.5, False)
    pools.judge(now + 1)
    assert spot.spilling and pools.changes == 1
    # Good again from t=102, but the slow samples stay in the 10 s window until t=110
    # (the last breach is judged at t=109), and then recover_s (5 s) must pass without
    # a breach: back at t=114, not before.
    states = {}
    for t in range(102, 118):
        for _ in range(5):
            spot.add(t, 0.05, False)
        pools.judge(t)
        states[t] = spot.spilling
    assert all(states[t] for t in range(102, 114))
    assert not any(states[t] for t in range(114, 118))
    assert pools.changes == 2  # one spill, one return: nothing in between


def test_failures_break_the_error_rate_and_too_few_requests_say_nothing() -> None:
    pools = Pools(pools_cfg(), Random(1))
    spot = pools.pools[0]
    for failed in (True, True, False):
        spot.add(50.0, 0.01, failed)
    pools.judge(50.0)
    assert not spot.spilling  # 3 requests: below min_requests (5), no verdict
    for _ in range(3):
        spot.add(50.0, 0.01, False)
    pools.judge(51.0)
    assert spot.spilling and spot.error_rate == pytest.approx(2 / 6)


def test_pool_of_a_node_and_the_request_header() -> None:
    pools = Pools(pools_cfg(), Random(1))
    assert pools.pool_of(node("a", "reserved")).name == "reserved"
    assert pools.pool_of(node("b")).name == "reserved"  # unlabelled: the last pool
    assert pools.pool_of(node("c", "mars")).name == "reserved"
    joined = node("d", "reserved")
    joined.source = Source.JOINED  # its label is its own claim: the first pool
    assert pools.pool_of(joined).name == "spot"
    trusting = Pools(pools_cfg(trust_joined_labels=True))
    assert trusting.pool_of(joined).name == "reserved"
    assert pools.parse("reserved, spot") == (1, 0)
    assert "unknown pool 'x'" in str(pools.parse("x"))


def test_node_time_is_shared_among_the_requests_in_flight() -> None:
    """price_per_hour: each second of the node's time is split equally among the
    requests in flight to it; idle time is nobody's."""
    now = [0.0]
    meter = Meter(lambda: now[0], 0.0)
    n = node("n", price_per_hour="3600")  # one unit of currency per second

    class Bill:
        cost = 0.0

    a, b = Bill(), Bill()
    first = meter.begin(n, bill=a)  # t=0: alone for 1 s
    now[0] = 1.0
    second = meter.begin(n, bill=b)  # t=1..3: two in flight
    now[0] = 3.0
    first.end(Outcome.OK)  # 1 + 2/2
    now[0] = 4.0
    second.end(Outcome.OK)  # 2/2 + 1
    now[0] = 10.0  # idle
    third_bill = Bill()
    third = meter.begin(n, bill=third_bill)
    now[0] = 10.5
    third.end(Outcome.OK)
    assert (a.cost, b.cost, third_bill.cost) == (2.0, 2.0, 0.5)


def test_locality_breaks_ties_only() -> None:
    near, far, far2 = node("near", region="eu"), node("far", region="us"), node("far2")
    costs = {"near": 1.04, "far": 1.0, "far2": 1.0}
    assert prefer_local([far, near], "eu", "region", lambda n: costs[n.id])[0] is near
    costs["near"] = 1.5  # clearly worse: the ranking stands
    assert prefer_local([far, far2, near], "eu", "region", lambda n: costs[n.id])[0] is far


# -- through the router -------------------------------------------------------------------


async def spot_and_reserved(
    fleet: MakeSim, make_router: MakeRouter, n_spot: int = 2, auth: Any = None, **pools: Any
) -> tuple[list[SimNode], SimNode, RouterHandle]:
    spot = [await fleet(f"spot-{i}", profile="RTX 4090") for i in range(n_spot)]
    reserved = await fleet("reserved-0", profile="A100")
    nodes = [
        *(node_entry(s, labels={"pool": "spot", "price_per_mtok": "0.5"}) for s in spot),
        node_entry(reserved, labels={"pool": "reserved", "price_per_hour": "3.6"}),
    ]
    cfg = {"order": ["spot", "reserved"], "slo": SLO, "window_s": 2, "min_requests": 5,
           "recover_s": 1, "trickle": 0.0, **pools}  # fmt: skip
    r = await make_router(
        nodes, pools=cfg,
        health={"probe": False, "base_ejection_s": 0.3, "max_ejection_s": 0.3},
        timeouts={"connect_s": 1, "first_byte_s": 5, "total_s": 20},
        **({"auth": auth} if auth else {}),
    )  # fmt: skip
    return spot, reserved, r


async def test_spot_first_all_spot_killed_reserved_serves_spot_back_returns(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    spot, _, r = await spot_and_reserved(fleet, make_router)
    served: Counter[str] = Counter()

    async def burst(n: int) -> None:
        for status, headers, doc in await asyncio.gather(
            *(post(http, r.url, chat(stream=i % 2 == 0, max_tokens=8), {}) for i in range(n))
        ):
            assert status == 200, doc
            served[headers["x-ballast-node"]] += 1

    await burst(20)
    assert set(served) <= {"spot-0", "spot-1"}  # healthy spot takes everything
    served.clear()
    killing = asyncio.gather(*(s.stop() for s in spot))  # mid-traffic
    await asyncio.gather(burst(30), killing)  # not one request failed
    await burst(20)
    assert served["reserved-0"] >= 20
    for s in spot:
        await s.start()
    # Back once their ejection (0.3 s) ends, and, had the failures broken the error-rate
    # SLO, once they left the 2 s window and 1 s more passed without a breach.
    async with asyncio.timeout(10):
        while True:
            served.clear()
            await burst(10)
            if set(served) <= {"spot-0", "spot-1"}:
                break


async def test_a_pool_breaking_its_ttfb_slo_spills(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    spot, _, r = await spot_and_reserved(fleet, make_router)
    for s in spot:  # a few ms a request at time_scale 0.01: 200x is well over 200 ms
        s.set_fault(Fault(mode="slow", factor=200))
    served: Counter[str] = Counter()
    async with asyncio.timeout(15):
        while not r.router.proxy.pools.pools[0].spilling:  # type: ignore[union-attr]
            for status, _, _ in await asyncio.gather(
                *(post(http, r.url, chat(max_tokens=8), {}) for _ in range(5))
            ):
                assert status == 200
    for _ in range(10):
        status, headers, _ = await post(http, r.url, chat(max_tokens=8), {})
        served[headers["x-ballast-node"]] += 1
    assert served == {"reserved-0": 10}
    # Pinned to spot, a request still goes there (it may not spill).
    status, headers, _ = await post(http, r.url, chat(max_tokens=8), {"x-ballast-pool": "spot"})
    assert status == 200 and headers["x-ballast-node"].startswith("spot-")
    # Fast again: with no trickle the pool's window empties (2 s) and after recover_s
    # (1 s) without a breach it takes its traffic back.
    for s in spot:
        s.set_fault(Fault())
    async with asyncio.timeout(10):
        while True:
            status, headers, _ = await post(http, r.url, chat(max_tokens=8), {})
            if headers["x-ballast-node"].startswith("spot-"):
                break
            await asyncio.sleep(0.05)  # paced: the window must empty, not fill with reserved
    assert r.router.proxy.pools.changes == 2  # type: ignore[union-attr]


async def test_cost_counters_equal_the_formula(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession, monkeypatch: Any
) -> None:
    """price_per_mtok: tokens (as the node counted them) x price / 1e6, by pool, and
    by client key."""
    keys = {"keys": [{"name": "team", "key_env": "KEY_TEAM"}]}
    monkeypatch.setenv("KEY_TEAM", "sk-bal-" + "t" * 43)
    spot, _, r = await spot_and_reserved(fleet, make_router, n_spot=1, auth=keys)
    team = {"Authorization": "Bearer sk-bal-" + "t" * 43}
    for i in range(12):
        headers = team if i >= 9 else {}
        status, _, _ = await post(http, r.url, chat(stream=i % 3 == 0, max_tokens=5 + i), headers)
        assert status == 200
    sent = spot[0].usage_sent
    text = await scrape(http, r.url)
    prompt = metric_value(text, "ballast_tokens_total", pool="spot", kind="prompt")
    completion = metric_value(text, "ballast_tokens_total", pool="spot", kind="completion")
    assert [prompt, completion] == sent
    cost = metric_value(text, "ballast_cost_total", pool="spot")
    assert cost == pytest.approx(sum(sent) * 0.5 / 1e6)
    keyed = sum(metric_value(text, "ballast_key_tokens_total", key="team", kind=k)
                for k in ("prompt", "completion"))  # fmt: skip
    assert 0 < keyed < sum(sent)
    assert metric_value(text, "ballast_key_cost_total", key="team") == pytest.approx(
        keyed * 0.5 / 1e6
    )
    # Pinned to reserved (priced per hour): its cost is its node time, not nothing.
    pinned = {"x-ballast-pool": "reserved"}
    status, headers, doc = await post(http, r.url, chat(max_tokens=8), pinned)
    assert status == 200 and headers["x-ballast-node"] == "reserved-0"
    text = await scrape(http, r.url)
    assert 0 < metric_value(text, "ballast_cost_total", pool="reserved") < 3.6 / 3600 * 5
    status, _, doc = await post(http, r.url, chat(), {"x-ballast-pool": "moon"})
    assert status == 400 and doc["error"]["code"] == "invalid_pool"  # type: ignore[index]


async def test_a_fallback_model_answers_when_the_primary_has_no_supply(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    big = await fleet("big-0", models=("big",))
    small = await fleet("small-0", models=("small",))
    r = await make_router(
        [node_entry(big), node_entry(small)],
        models={"big": {"fallbacks": ["small"]}, "gone": {"fallbacks": ["small"]}},
        health={"probe": False, "base_ejection_s": 30},
        timeouts={"connect_s": 1, "first_byte_s": 5, "total_s": 10},
        queue={"max_wait_s": 0.5},
    )  # fmt: skip
    status, headers, doc = await post(http, r.url, {**chat(), "model": "big"}, {})
    assert status == 200 and "x-ballast-fallback" not in headers  # the primary serves
    await big.stop()
    for stream in (False, True, False):  # a refused attempt, then no supply at all
        status, headers, doc = await post(http, r.url, {**chat(stream=stream), "model": "big"}, {})
        assert status == 200, doc
        assert headers["x-ballast-fallback"] == "small"
        assert headers["x-ballast-node"] == "small-0"
        if not stream:
            assert doc["model"] == "small"  # type: ignore[index]
        else:
            assert b'"model":"small"' in doc  # type: ignore[operator]
    # A model no node claims, with a fallback configured: served, not 404.
    status, headers, doc = await post(http, r.url, {**chat(), "model": "gone"}, {})
    assert status == 200 and headers["x-ballast-fallback"] == "small"
    text = await scrape(http, r.url)
    assert metric_value(text, "ballast_fallbacks_total", model="big", fallback="small") == 3
    assert metric_value(text, "ballast_fallbacks_total", model="gone", fallback="small") == 1


async def test_a_key_pinned_to_a_pool_and_a_region_preferred(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession, monkeypatch: Any
) -> None:
    spot = await fleet("spot-eu", profile="RTX 4090")
    spot_us = await fleet("spot-us", profile="RTX 4090")
    reserved = await fleet("reserved-0", profile="A100")
    monkeypatch.setenv("KEY_CHEAP", "sk-bal-" + "c" * 43)
    r = await make_router(
        [node_entry(spot, labels={"pool": "spot", "region": "eu"}),
         node_entry(spot_us, labels={"pool": "spot", "region": "us"}),
         node_entry(reserved, labels={"pool": "reserved"})],
        pools={"order": ["spot", "reserved"]}, queue={"max_wait_s": 0.2},
        auth={"keys": [{"name": "cheap", "key_env": "KEY_CHEAP", "pools": ["spot"],
                        "max_parallel": 1}]},
    )  # fmt: skip
    cheap = {"Authorization": "Bearer sk-bal-" + "c" * 43}
    for _ in range(2):  # refused before the key's limits count it: no slot is kept
        status, _, doc = await post(http, r.url, chat(), {**cheap, "x-ballast-pool": "reserved"})
        assert status == 403 and doc["error"]["code"] == "pool_not_allowed"
    await spot.stop()
    await spot_us.stop()
    status, _, doc = await post(http, r.url, chat(), cheap)  # spot only: nothing to spill to
    assert status == 502 and doc["error"]["code"] == "upstream_failed"
    status, headers, _ = await post(http, r.url, chat(), {})  # anonymous: reserved takes it
    assert status == 200 and headers["x-ballast-node"] == "reserved-0"
    await spot.start()
    await spot_us.start()
    served: Counter[str] = Counter()
    for _ in range(20):  # equal nodes: the region decides
        status, headers, _ = await post(http, r.url, chat(), {"x-ballast-region": "us"})
        served[headers["x-ballast-node"]] += 1
    assert served["spot-us"] >= 15
