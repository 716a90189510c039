"""What a caller or a node cannot grow or reorder: the priority gate's queues
(router.gate) and the challenge answers kept per model (router.challenges).

The gate runs on looptime's fake event-loop clock, which is also the gate's
clock: an admitted request holds its slot for a set time of that clock, and a
deadline passes exactly when it says, in no real time.
"""

from __future__ import annotations

import asyncio
from random import Random

import pytest

from router.challenges import MAX_ANSWERS, MAX_GROUPS, PROMPTS, Challenges
from router.config import HealthConfig, Scoring
from router.fleet import Fleet, Node, NodeState, Source
from router.gate import BATCH, INTERACTIVE, Gate
from router.prober import Prober
from router.store import MemoryStore
from tests.test_fake_clock import Clock

HOLD_S = 0.02  # how long each admitted request holds the model's one slot
FAR = 3600.0  # a deadline (from the start) that never comes within a test


def one_slot_gate() -> Gate:
    """A gate for model ``m`` on the loop's clock: one node that serves one request
    at once."""
    loop_time = asyncio.get_running_loop().time
    fleet = Fleet(clock=loop_time)
    labels = {"max_concurrency": "1"}
    fleet.add(Node(id="n", url="http://n", models=["m"], scoring=Scoring(), labels=labels))
    return Gate(fleet, None, 0.5, loop_time)


class Served:
    """Requests of model ``m`` through ``gate``: each one that is admitted is
    served for HOLD_S; what happened to each, in the order it happened."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.loop = asyncio.get_running_loop()
        self.t0 = self.loop.time()
        self.log: list[tuple[str, bool | None, float]] = []  # (name, admitted, at)

    async def request(self, name: str, cls: str, deadline: float) -> None:
        admitted = await self.gate.enter("m", cls, self.t0 + deadline)
        self.log.append((name, admitted, round(self.loop.time() - self.t0, 6)))
        if admitted:
            await asyncio.sleep(HOLD_S)  # served: the answer takes HOLD_S
            self.gate.leave("m", cls)

    def arrive(self, *arrivals: tuple[str, str, float]) -> list[asyncio.Task[None]]:
        """Requests arriving in this order (each joins its queue in its first step,
        and tasks take their first step in the order they were created)."""
        return [self.loop.create_task(self.request(*a)) for a in arrivals]

    def admitted(self) -> list[str]:
        return [name for name, ok, _ in self.log if ok]


# -- row 12: a caller's deadline drops its own request, never reorders others -----------


@pytest.mark.looptime
async def test_a_short_deadline_does_not_jump_the_queue() -> None:
    """Seven arrivals at a full gate, the last with a deadline shorter than the wait
    ahead of it: served in arrival order; the last leaves (False: 504) exactly when
    its own deadline passes, and the others are served as if it never came."""
    gate = one_slot_gate()
    served = Served(gate)
    first = served.arrive(("holder", INTERACTIVE, FAR))
    queued = served.arrive(*[(f"a{i}", INTERACTIVE, FAR) for i in range(1, 7)])
    short = served.arrive(("a7", INTERACTIVE, 0.05))  # 6 requests of 20 ms are ahead
    await asyncio.gather(*first, *queued, *short)
    assert served.admitted() == ["holder", "a1", "a2", "a3", "a4", "a5", "a6"]
    assert ("a7", False, 0.05) in served.log  # at its deadline, not before, not served
    assert [at for name, _, at in served.log if name != "a7"] == pytest.approx(
        [0.0, 0.02, 0.04, 0.06, 0.08, 0.10, 0.12]
    )  # the ones ahead of it were not held back by it either
    assert gate.waiting == 0 and not gate.models["m"].interactive_waiting


@pytest.mark.looptime
async def test_within_each_class_arrival_order_interactive_first() -> None:
    """Nearer deadlines that do not pass change nothing: interactive requests go
    first, each class in the order it came."""
    served = Served(one_slot_gate())
    tasks = served.arrive(
        ("holder", BATCH, FAR),
        ("b1", BATCH, FAR),
        ("b2", BATCH, FAR),
        ("i1", INTERACTIVE, FAR),
        ("b3", BATCH, 60.0),
        ("i2", INTERACTIVE, 60.0),
        ("b4", BATCH, 30.0),
    )
    await asyncio.gather(*tasks)
    assert served.admitted() == ["holder", "i1", "i2", "b1", "b2", "b3", "b4"]


@pytest.mark.looptime
async def test_requests_that_give_up_leave_the_queue_at_once() -> None:
    """A flood of short deadlines behind one long waiter: each timed-out request
    leaves its queue as it gives up, so the queue holds only those still waiting."""
    loop = asyncio.get_running_loop()
    gate = one_slot_gate()
    assert await gate.enter("m", INTERACTIVE, loop.time() + FAR) is True  # the slot
    patient = loop.create_task(gate.enter("m", INTERACTIVE, loop.time() + FAR))
    t0 = loop.time()
    flood = [gate.enter("m", cls, t0 + 0.01) for cls in (INTERACTIVE, BATCH) * 200]
    assert await asyncio.gather(*flood) == [False] * 400
    g = gate.models["m"]
    assert gate.waiting == 1
    assert (len(g.interactive_waiting), len(g.batch_waiting)) == (1, 0)
    gate.leave("m", INTERACTIVE)
    assert await patient is True  # it kept its place at the head


# -- row 10: challenge answers are freed with their nodes, and capped -----------------


def joined(node_id: str, models: list[str]) -> Node:
    return Node(
        id=node_id, url=f"http://{node_id}", models=models, scoring=Scoring(),
        source=Source.JOINED, engine="vllm", state=NodeState.REGISTERED,
    )  # fmt: skip


def total_answers(c: Challenges) -> int:
    return sum(len(a) for prompts in c.groups.values() for a in prompts.values())


async def test_answers_go_with_the_nodes_that_gave_them() -> None:
    """Four waves of 120 nodes, each wave claiming 16 new model names, every node
    answering every model (a few of them wrongly, for strikes): after each wave is
    deleted (half by the admin API's removal, half forgotten after their gone
    retention), nothing of it is kept."""
    clock = Clock(0.0)
    rng = Random(7)
    store = MemoryStore(heartbeat_ttl_s=30.0, wall=clock, retention_s=3600.0)
    fleet = store.fleet
    prober = Prober(HealthConfig(), fleet, store, None, clock, rng, wall=clock)  # type: ignore[arg-type]
    c = prober.challenges
    assert c is not None
    for wave in range(4):
        models = [f"w{wave}-model-{j}" for j in range(16)]
        nodes = [joined(f"w{wave}-n{i}", models) for i in range(120)]
        for node in nodes:
            await store.register(node)
        prober.due(clock())
        for prompt in (0, None):  # two probe rounds: all on prompt 0, then any prompt
            for node in nodes:
                p = rng.randrange(len(PROMPTS)) if prompt is None else prompt
                text = "a different model" if node.id.endswith("7") else "the honest answer"
                answers = {m: (p, text) for m in models}
                await prober._passed(node, node.state, {}, answers)
        assert len(c.groups) == 16
        assert max(len(a) for p in c.groups.values() for a in p.values()) == MAX_ANSWERS
        assert c.strikes  # the wrong ones were caught
        for node in nodes[:60]:
            await store.remove(node.id)  # DELETE /admin/nodes/{id}
        clock.t += 31.0
        store.expire(clock())  # silent: gone
        clock.t += 3601.0
        store.expire(clock())  # gone past the retention: forgotten
        assert fleet.nodes == {}
        prober.due(clock())
        assert (c.groups, c.answered, c.strikes) == ({}, {}, {})


async def test_a_node_that_changes_its_claims_keeps_no_old_answers() -> None:
    clock = Clock(0.0)
    store = MemoryStore(wall=clock)
    prober = Prober(HealthConfig(), store.fleet, store, None, clock, Random(1), wall=clock)  # type: ignore[arg-type]
    c = prober.challenges
    assert c is not None
    await store.register(joined("x", ["old-a", "old-b"]))
    await prober._passed(store.fleet.nodes["x"], NodeState.REGISTERED, {}, {"old-a": (0, "hi")})
    assert set(c.groups) == {("old-a", "vllm")}
    again = joined("x", ["new"])  # re-registered with other claims
    await store.register(again)
    await prober._passed(again, NodeState.REGISTERED, {}, {"new": (0, "hello")})
    assert set(c.groups) == {("new", "vllm")}
    assert c.answered == {"x": {("new", "vllm")}}
    c.retain("x", "sglang", ["new"])  # the same model under another engine
    assert (c.groups, c.answered) == ({}, {})


def test_a_flood_of_model_names_keeps_at_most_max_groups() -> None:
    """One node answering for ten times MAX_GROUPS distinct names keeps MAX_GROUPS
    groups; a group still answered by its nodes is the last to go (least recently
    used first), and a group that goes takes its answers and strikes with it."""
    rng = Random(3)
    c = Challenges(min_nodes=3, words=6, strikes_to_unverify=2)
    for nid in ("h1", "h2", "sub"):  # a substitute caught on the honest model
        c.record("real", "vllm", 0, nid, "fake words" if nid == "sub" else "real words")
    c.record("doomed", "vllm", 0, "h1", "x")
    c.record("doomed", "vllm", 0, "h2", "x")
    c.record("doomed", "vllm", 0, "odd", "y")
    assert c.strikes == {"sub": {("real", "vllm", 0)}, "odd": {("doomed", "vllm", 0)}}
    for i in range(10 * MAX_GROUPS):
        c.record(f"flood-{i}", "vllm", rng.randrange(len(PROMPTS)), "flooder", f"{i}")
        if i % (MAX_GROUPS // 2) == 0:  # the honest nodes keep being probed
            for nid in ("h1", "h2", "sub"):
                text = "fake words" if nid == "sub" else "real words"
                c.record("real", "vllm", 0, nid, text)
        assert len(c.groups) <= MAX_GROUPS
    assert len(c.groups) == MAX_GROUPS
    assert ("real", "vllm") in c.groups and ("doomed", "vllm") not in c.groups
    assert c.strikes == {"sub": {("real", "vllm", 0)}}  # odd's strike went with "doomed"
    assert "odd" not in c.answered
    assert len(c.answered["flooder"]) == MAX_GROUPS - 1  # every kept group but "real"
    assert total_answers(c) == MAX_GROUPS - 1 + 3
    assert all(g in c.groups for groups in c.answered.values() for g in groups)
    assert all(len(d) == 8 for p in c.groups.values() for a in p.values() for d in a.values())
    c.forget("flooder")
    assert set(c.groups) == {("real", "vllm")} and set(c.answered) == {"h1", "h2", "sub"}


async def test_waiters_for_supply_that_give_up_leave_nothing_behind() -> None:
    fleet = Fleet(clock=asyncio.get_running_loop().time)
    for _ in range(400):  # a flood of requests whose deadline passes before supply comes
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(fleet.changed(), 0)
    assert not fleet._waiters
    waiting = asyncio.create_task(fleet.changed())
    await asyncio.sleep(0)  # it is waiting
    fleet.add(Node(id="n", url="http://n", models=["m"], scoring=Scoring()))
    await waiting  # a change still wakes a patient waiter
    assert not fleet._waiters
