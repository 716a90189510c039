"""Priority classes at a model's capacity (router.gate), and caller deadlines."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson

from router.config import Scoring
from router.fleet import Fleet, Node, NodeState
from router.gate import BATCH, INTERACTIVE, Gate, ModelGate
from tests.conftest import MakeRouter, MakeSim, chat, node_entry
from tests.test_supply import until

FAR = 1e9  # a deadline that never comes


def gate_with(slots: int, share: float = 0.5) -> Gate:
    fleet = Fleet()
    labels = {"max_concurrency": str(slots)}
    node = Node(id="n", url="http://127.0.0.1:1", models=["m"], scoring=Scoring(), labels=labels)
    fleet.add(node)
    fleet.set_state("n", NodeState.SERVING, "test")
    return Gate(fleet, None, share, time.monotonic)


async def test_interactive_first_then_in_arrival_order() -> None:
    gate = gate_with(2)
    order: list[str] = []
    for _ in range(2):
        assert await gate.enter("m", INTERACTIVE, FAR) is True  # full

    async def wait(name: str, cls: str, deadline: float) -> None:
        assert await gate.enter("m", cls, deadline) is True
        order.append(name)

    waiters = [
        asyncio.create_task(wait("b3", BATCH, FAR - 3)),
        asyncio.create_task(wait("i-late", INTERACTIVE, FAR - 1)),
        asyncio.create_task(wait("i-soon", INTERACTIVE, FAR - 2)),
    ]
    await asyncio.sleep(0)  # all three queued
    assert order == []
    # A nearer deadline does not go ahead (tests/test_bounds.py).
    for expected in (["i-late"], ["i-late", "i-soon"], ["i-late", "i-soon", "b3"]):
        gate.leave("m", INTERACTIVE)
        await asyncio.sleep(0)
        assert order == expected
    await asyncio.gather(*waiters)


async def test_batch_keeps_to_its_share_while_interactive_is_there() -> None:
    gate = gate_with(4, share=0.5)
    assert await gate.enter("m", INTERACTIVE, FAR) is True
    assert await gate.enter("m", BATCH, FAR) is True
    assert await gate.enter("m", BATCH, FAR) is True
    third = asyncio.create_task(gate.enter("m", BATCH, FAR))
    await asyncio.sleep(0)
    assert not third.done()  # 3 of 4 in flight, but batch holds its share (2 of 4)
    gate.leave("m", INTERACTIVE)  # no interactive request left: batch may fill it all
    assert await third is True
    assert await gate.enter("m", BATCH, FAR) is True
    g = gate.models["m"]
    assert (g.in_flight, g.batch) == (4, 4)


async def test_batch_beyond_its_share_does_not_hold_interactive_back() -> None:
    gate = gate_with(4, share=0.5)
    for _ in range(4):  # no interactive traffic: batch may take it all
        assert await gate.enter("m", BATCH, FAR) is True
    assert await gate.enter("m", INTERACTIVE, FAR) is True  # the other half is theirs
    assert await gate.enter("m", INTERACTIVE, FAR) is True
    third = asyncio.create_task(gate.enter("m", INTERACTIVE, FAR))
    fifth_batch = asyncio.create_task(gate.enter("m", BATCH, FAR))
    await asyncio.sleep(0)
    assert not third.done() and not fifth_batch.done()
    gate.leave("m", BATCH)  # interactive ones hold their half already: no change
    await asyncio.sleep(0)
    assert not third.done()
    gate.leave("m", INTERACTIVE)
    assert await asyncio.wait_for(third, 1) is True
    assert not fifth_batch.done()  # 5 in flight of 4: batch waits
    fifth_batch.cancel()


async def test_no_declared_capacity_means_no_gate() -> None:
    fleet = Fleet()
    fleet.add(Node(id="n", url="http://127.0.0.1:1", models=["m"], scoring=Scoring()))
    fleet.set_state("n", NodeState.SERVING, "test")
    gate = Gate(fleet, None, 0.5, time.monotonic)
    assert await gate.enter("m", BATCH, FAR) is None
    assert gate.models == {}


async def test_through_the_router_interactive_overtakes_and_deadlines_hold(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    """One slot (a node that serves one request at once): queued batch requests
    wait while a later interactive one goes first; a request whose own deadline
    passes in the queue gets 504."""
    sim = await fleet("one", time_scale=1.0)  # H100: about 0.1 s per 8-token answer
    r = await make_router([node_entry(sim, labels={"max_concurrency": "1"})])
    finished: list[str] = []

    async def send(name: str, headers: dict[str, str]) -> int:
        body = orjson.dumps(chat(max_tokens=8))
        async with http.post(r.url + "/v1/chat/completions", data=body, headers=headers) as resp:
            await resp.read()
            finished.append(name)
            return resp.status

    batch = {"x-ballast-priority": "batch"}
    first = asyncio.create_task(send("b0", batch))
    await sim.arrived.wait()  # the slot is taken
    later = [asyncio.create_task(send(f"b{i}", batch)) for i in range(1, 4)]
    await until(lambda: r.router.proxy.gate.waiting == 3, within=5)  # batch ones queued
    urgent = asyncio.create_task(send("i", {}))
    expired = await send("late", {"x-ballast-deadline-ms": "50"})
    assert expired == 504
    assert await asyncio.gather(first, urgent, *later) == [200] * 5
    assert finished.index("i") < finished.index("b1")  # overtook every queued batch one
    async with http.post(
        r.url + "/v1/chat/completions", data=orjson.dumps(chat()),
        headers={"x-ballast-deadline-ms": "soon"},
    ) as resp:  # fmt: skip
        assert resp.status == 400


def test_nodes_keep_room_for_interactive_requests() -> None:
    """Per node: its own capacity, and batch below its share of it while
    interactive requests of the model are there."""
    gate = gate_with(4, share=0.5)
    (node,) = gate.fleet.candidates("m") or ()
    g = gate.models.setdefault("m", ModelGate())
    node.stats.in_flight, node.stats.batch_in_flight = 2, 2
    g.in_flight, g.batch = 3, 2  # one interactive request in flight elsewhere
    assert gate.free("m", BATCH, [node]) == []  # batch holds its half of this node
    assert gate.free("m", INTERACTIVE, [node]) == [node]
    g.in_flight = g.batch = 2  # no interactive request: batch may fill the node
    assert gate.free("m", BATCH, [node]) == [node]
    node.stats.in_flight = 4
    assert gate.free("m", INTERACTIVE, [node]) == []  # full


async def test_batch_keeps_to_its_share_through_a_gap_in_interactive_traffic() -> None:
    """An interactive request that came within interactive_quiet_s still counts: batch
    filling a momentary gap would hold the next interactive one back."""
    now = [0.0]
    fleet = Fleet()
    labels = {"max_concurrency": "4"}
    fleet.add(
        Node(id="n", url="http://127.0.0.1:1", models=["m"], scoring=Scoring(), labels=labels)
    )
    fleet.set_state("n", NodeState.SERVING, "test")
    gate = Gate(fleet, None, 0.5, lambda: now[0], quiet_s=5.0)
    assert await gate.enter("m", INTERACTIVE, FAR) is True
    gate.leave("m", INTERACTIVE)  # none in flight now, but one came at t=0
    now[0] = 4.0
    assert [await gate.enter("m", BATCH, 4.01) for _ in range(3)] == [True, True, False]
    now[0] = 5.5  # quiet for 5 s: batch may fill the rest
    assert await gate.enter("m", BATCH, FAR) is True
