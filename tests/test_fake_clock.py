"""Health, slow start, hedging, queueing and probe scheduling on a fake clock.

Health and slow start run on a hand-advanced clock. Hedging and queueing wait
on timers, so they run on looptime's fake event-loop clock: a ten-second wait
takes no real time, and the loop's clock is the one every component reads.
"""

from __future__ import annotations

import asyncio
from random import Random
from typing import cast

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from policies import RequestInfo, build_policy
from router.bill import Sizes
from router.budgets import RetryBudget
from router.call import Call, Exchange, Failed
from router.config import HealthConfig, Scoring, parse_config
from router.fleet import Fleet, Node, NodeState
from router.health import HealthMonitor
from router.hedge import Hedging
from router.measure import Meter, Outcome
from router.prober import DIP_PROBE_INTERVAL_S, Prober
from router.proxy import Proxy
from router.store import MemoryStore
from router.upstream import Opened, Upstream


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_fleet(n: int, clock: Clock, slow_start_s: float = 0.0) -> Fleet:
    fleet = Fleet(slow_start_s=slow_start_s, clock=clock)
    with fleet.batch():
        for i in range(n):
            fleet.add(Node(id=f"n{i}", url=f"http://n{i}", models=["m"], scoring=Scoring()))
    return fleet


async def monitored(n: int, cfg: HealthConfig, clock: Clock) -> tuple[Fleet, Meter, HealthMonitor]:
    fleet = make_fleet(n, clock, cfg.slow_start_s)
    meter = Meter(clock, penalty_s=5.0)
    store = MemoryStore(wall=clock)
    store.fleet = fleet
    return fleet, meter, HealthMonitor(cfg, fleet, meter.signals, store, clock, wall=clock)


def fail(meter: Meter, node: Node, times: int, outcome: Outcome = Outcome.HTTP_5XX) -> None:
    for _ in range(times):
        meter.begin(node).end(outcome)


async def test_ejection_backs_off_longer_each_time_up_to_the_cap() -> None:
    clock = Clock()
    cfg = HealthConfig(consecutive_failures=3, base_ejection_s=30, max_ejection_s=70)
    fleet, meter, health = await monitored(4, cfg, clock)
    node = fleet.nodes["n0"]
    lengths = []
    for _ in range(4):
        fail(meter, node, 3)
        await health.check()
        assert node.state is NodeState.EJECTED
        lengths.append(node.ejected_until - clock())
        clock.t = node.ejected_until - 0.001
        await health.check()
        assert node.state is NodeState.EJECTED  # not a moment early
        clock.t = node.ejected_until
        await health.check()
        assert node.state is NodeState.SERVING
    assert lengths == pytest.approx([30, 60, 70, 70])


async def test_two_failures_then_a_success_is_not_an_ejection() -> None:
    clock = Clock()
    fleet, meter, health = await monitored(2, HealthConfig(consecutive_failures=3), clock)
    node = fleet.nodes["n0"]
    fail(meter, node, 2)
    meter.begin(node).end(Outcome.OK)
    fail(meter, node, 2)
    await health.check()
    assert node.state is NodeState.SERVING


async def test_slow_start_ramps_a_returning_node_over_the_configured_time() -> None:
    clock = Clock()
    cfg = HealthConfig(consecutive_failures=1, base_ejection_s=10, slow_start_s=20)
    fleet, meter, health = await monitored(2, cfg, clock)
    node = fleet.nodes["n0"]
    fail(meter, node, 1)
    await health.check()
    clock.t += 10
    await health.check()
    assert node.state is NodeState.SERVING
    ramp = []
    for _ in range(5):
        ramp.append(node.stats.ramp(clock()))
        clock.t += 5
    assert ramp == pytest.approx([0.1, 0.25, 0.5, 0.75, 1.0])


async def test_max_ejection_percent_keeps_half_the_fleet() -> None:
    clock = Clock()
    cfg = HealthConfig(consecutive_failures=1, max_ejection_percent=50)
    fleet, meter, health = await monitored(4, cfg, clock)
    for node in fleet.nodes.values():
        fail(meter, node, 1)
    await health.check()
    ejected = [n for n in fleet.nodes.values() if n.state is NodeState.EJECTED]
    assert len(ejected) == 2


# -- hedging and queueing: on looptime's fake event-loop clock ------------------------


def _call(now: float) -> Call:
    """A call with no client request behind it: these steps never read it."""
    info = RequestInfo(model="m", stream=True)
    ex = Exchange("rid", "rid", now)
    sizes = Sizes(stream=True, limit=None, n=1, changed=False)
    return Call(cast(web.Request, None), ex, info, {}, b"{}", CIMultiDict(), now + 600, sizes)


class FakeOpen:
    """Opens that answer after a set delay (None: never) or fail at once."""

    def __init__(self, delays: dict[str, float | None], fail: set[str] = frozenset()) -> None:
        self.delays = delays
        self.fail = fail
        self.cancelled: list[str] = []

    async def __call__(self, call: Call, node: Node) -> Opened:
        if node.id in self.fail:
            raise Failed(Outcome.HTTP_5XX, "HTTP 500")
        delay = self.delays[node.id]
        try:
            await asyncio.sleep(1e9 if delay is None else delay)
        except asyncio.CancelledError:
            self.cancelled.append(node.id)
            raise
        return cast(Opened, _Answer(node))


class _Answer:
    """Stands in for an opened upstream answer: the race reads only these two."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def close(self, outcome: Outcome) -> None:
        pass


@pytest.mark.looptime
async def test_hedge_after_the_delay_and_the_first_answer_wins() -> None:
    loop = asyncio.get_running_loop()
    cfg = parse_config({"hedge": {"after_ms": 200, "budget_percent": 100}})
    hedging = Hedging(cfg)
    fleet = make_fleet(2, Clock())
    primary, backup = fleet.nodes["n0"], fleet.nodes["n1"]
    assert hedging.delay("m", primary) == pytest.approx(0.2)
    opens = FakeOpen({"n0": None, "n1": 0.05})
    t0 = loop.time()
    call = _call(t0)
    winner, hedged = await hedging.race(call, opens, primary, backup, 0.2)
    assert winner is not None and winner.node is backup
    assert hedged and call.ex.hedged
    assert loop.time() - t0 == pytest.approx(0.25)  # the delay, then the backup's answer
    assert opens.cancelled == ["n0"]
    assert (hedging.sent, hedging.won) == (1, 1)


@pytest.mark.looptime
async def test_a_primary_answering_before_the_delay_sends_no_hedge() -> None:
    cfg = parse_config({"hedge": {"after_ms": 200, "budget_percent": 100}})
    hedging = Hedging(cfg)
    fleet = make_fleet(2, Clock())
    opens = FakeOpen({"n0": 0.1, "n1": 0.0})
    call = _call(0.0)
    winner, hedged = await hedging.race(call, opens, fleet.nodes["n0"], fleet.nodes["n1"], 0.2)
    assert winner is not None and winner.node.id == "n0"
    assert not hedged and hedging.sent == 0


def test_hedge_budget_limits_hedges_to_a_share_of_requests() -> None:
    cfg = parse_config({"hedge": {"after_ms": 10, "budget_percent": 10}})
    hedging = Hedging(cfg)
    node = make_fleet(1, Clock()).nodes["n0"]
    sent = 0
    for _ in range(1000):
        hedging.budget.earn()
        if hedging.delay("m", node) is not None and hedging.budget.spend():
            sent += 1
    assert 95 <= sent <= 111  # 10% of requests, plus the initial token and the burst


def test_hedge_after_the_nodes_own_p95_ttfb() -> None:
    cfg = parse_config({"hedge": {"use_p95_ttfb": True}})
    hedging = Hedging(cfg)
    node = make_fleet(1, Clock()).nodes["n0"]
    assert hedging.delay("m", node) == pytest.approx(2.0)  # too few samples: the upper bound
    for i in range(100):
        node.stats.observe_ttfb(0.01 * (i + 1), i)
    # The p95 of the last 64 samples (0.37 s .. 1.00 s).
    assert hedging.delay("m", node) == pytest.approx(0.96)
    assert hedging.delay("m", node, stream=False) is None  # whole answers: no early signal
    for _ in range(64):
        node.stats.observe_ttfb(0.001, 200)
    assert hedging.delay("m", node) == pytest.approx(0.05)  # the lower bound


@pytest.mark.looptime
async def test_a_queued_request_waits_for_supply_and_gives_up_at_max_wait() -> None:
    loop = asyncio.get_running_loop()
    cfg = parse_config({"queue": {"max_wait_s": 10}})
    fleet = Fleet(clock=loop.time)
    meter = Meter(loop.time, 5.0)
    async with aiohttp.ClientSession() as session:
        upstream = Upstream(cfg, session, meter)
        proxy = Proxy(cfg, fleet, build_policy("score"), upstream, rng=Random(1))
        call = _call(loop.time())
        t0 = loop.time()
        assert not await proxy._wait_for_supply(call, t0 + 10)
        assert loop.time() - t0 == pytest.approx(10)
        assert call.ex.queued_s == pytest.approx(10)

        async def supply_arrives() -> None:
            await asyncio.sleep(3)
            fleet.add(Node(id="late", url="http://late", models=["m"], scoring=Scoring()))

        task = asyncio.create_task(supply_arrives())
        t0 = loop.time()
        assert proxy.queued == 0
        assert await proxy._wait_for_supply(call, t0 + 10)
        assert loop.time() - t0 == pytest.approx(3)
        assert proxy.queued == 0
        await task


def test_the_prober_visits_only_due_nodes() -> None:
    clock = Clock(0.0)
    fleet = make_fleet(1000, clock)
    cfg = HealthConfig(verified_probe_interval_s=30)
    prober = Prober(cfg, fleet, MemoryStore(), None, clock, Random(1))  # type: ignore[arg-type]
    assert len(prober.due(0.0)) == 1000  # all due at start
    assert prober.due(1.0) == []
    later = prober.due(45.0)  # every one within 30 s +- 50% jitter
    assert len(later) == 1000
    # An ejection that leaves the model without supply makes its node a dip probe.
    with fleet.batch():
        for node in fleet.nodes.values():
            if node.id != "n0":
                fleet.set_state(node.id, NodeState.DRAINING, "test")
        fleet.set_state("n0", NodeState.EJECTED, "test")
    assert [n.id for n in prober.due(45.1)] == ["n0"]
    assert [n.id for n in prober.due(45.1 + DIP_PROBE_INTERVAL_S * 1.5)] == ["n0"]


@pytest.mark.looptime
async def test_a_retry_waits_for_a_slot_of_the_budget_then_gives_up() -> None:
    loop = asyncio.get_running_loop()
    budget = RetryBudget(budget_percent=0, min_concurrency=1, wait_s=1.0)
    assert await budget.acquire(time_left=60)  # the one slot
    t0 = loop.time()

    async def release_later() -> None:
        await asyncio.sleep(0.3)
        budget.release()

    task = asyncio.create_task(release_later())
    assert await budget.acquire(time_left=60)  # waited for the release
    assert loop.time() - t0 == pytest.approx(0.3)
    await task
    t0 = loop.time()
    assert not await budget.acquire(time_left=60)  # nobody releases: give up after wait_s
    assert loop.time() - t0 == pytest.approx(1.0)
    assert not await budget.acquire(time_left=0.2)  # never past the request's deadline
    assert budget.retrying == 1
