"""Admission by priority class when a model's capacity is full.

A node may declare how many requests it serves at once (the label
``max_concurrency``, or ``priority.node_slots`` for every node); a model's
capacity is the sum over its routable nodes. While requests of a model in
flight (through this router process) are below its capacity, requests pass at
once. At capacity they wait, in two queues, each in arrival order (first come,
first served): when a slot frees, the longest-waiting ``interactive`` request
goes first; while interactive requests are in flight or waiting, or one came
within ``priority.interactive_quiet_s``, ``batch`` requests are admitted only
while they hold less than ``priority.batch_max_share`` of the capacity (batch
may fill it all when no interactive request has been there for that long, and
then the batch requests beyond their share do not count against interactive
ones: those always have the rest).
A request's deadline (its own ``x-ballast-deadline-ms`` or the request timeout)
bounds only its own wait: when it passes, that request leaves the queue (504);
it never moves the request ahead of others, or a caller could jump the queue by
naming a short deadline. One that waited ``queue.max_wait_s`` gets 503.

Each node is held to its own capacity too (:meth:`Gate.free`, :meth:`Gate.wait_node`):
an admitted request goes to nodes below their ``max_concurrency`` and, for batch
while interactive requests are there, with batch below its share of the node.

Without any declared capacity nothing is counted or queued here: requests then
wait only for supply (``Proxy._wait_for_supply``). Each router process gates its
own traffic (with N replicas, give each node's ``max_concurrency`` / N, or
accept that the engines queue what is beyond).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Sequence

from router.fleet import Fleet, Node

INTERACTIVE, BATCH = "interactive", "batch"


# Waiting requests in arrival order (an ordered set: one that gives up leaves at once).
Waiters = OrderedDict[asyncio.Future[None], None]


class ModelGate:
    __slots__ = (
        "batch", "batch_waiting", "in_flight", "interactive_at", "interactive_waiting",
        "node_waiting",
    )  # fmt: skip

    def __init__(self) -> None:
        self.in_flight = 0
        self.batch = 0  # of which batch
        self.interactive_at = -1e18  # clock() when the last interactive request arrived
        self.interactive_waiting: Waiters = OrderedDict()
        self.batch_waiting: Waiters = OrderedDict()
        # Admitted, but every node of the model is at its own capacity (requests that
        # came in before the capacity shrank, or failed over): interactive, batch.
        self.node_waiting: tuple[Waiters, Waiters] = (OrderedDict(), OrderedDict())


class Gate:
    def __init__(
        self,
        fleet: Fleet,
        node_slots: int | None,
        batch_max_share: float,
        clock: Callable[[], float],
        max_waiting: int = 1000,
        quiet_s: float = 0.0,
    ) -> None:
        self.fleet = fleet
        self.max_waiting = max_waiting  # queue.max_size: beyond, 503 at once
        # Batch goes beyond its share only after no interactive request for this long.
        self.quiet_s = quiet_s
        self.waiting = 0
        self.node_slots = node_slots
        self.share = batch_max_share
        self.clock = clock
        self.models: dict[str, ModelGate] = {}
        self._capacity: dict[str, int | None] = {}
        self._version = -1
        self._watch: asyncio.Task[None] | None = None

    def capacity(self, model: str) -> int | None:
        """Requests ``model``'s routable nodes serve at once; None: not declared."""
        if self._version != self.fleet.version:
            self._capacity, self._version = {}, self.fleet.version
        if model in self._capacity:
            return self._capacity[model]
        total: int | None = 0
        for node in self.fleet.candidates(model) or ():
            slots = node.max_concurrency or self.node_slots
            if slots is None:
                total = None
                break
            total = (total or 0) + slots
        if total == 0 and self.node_slots is None and not self._declared(model):
            total = None
        self._capacity[model] = total
        return total

    def _declared(self, model: str) -> bool:
        """Whether any node of the model (routable or not) declares a capacity."""
        return any(
            "max_concurrency" in n.labels for n in self.fleet.nodes.values() if model in n.models
        )

    def _admissible(self, g: ModelGate, cls: str, capacity: int) -> bool:
        batch_share = self.share * capacity
        if cls == INTERACTIVE:
            # Batch requests beyond their share (admitted while no interactive one
            # was there, or before the capacity shrank) do not hold interactive
            # ones back: those always have the rest of the capacity.
            interactive = g.in_flight - g.batch
            return interactive + min(g.batch, batch_share) < capacity
        if g.in_flight >= capacity:
            return False
        # Batch fills the whole capacity only while no interactive request is in
        # flight or waiting, nor came within quiet_s; otherwise it stops at its share.
        return g.batch < batch_share or not self._interactive(g)

    def _interactive(self, g: ModelGate) -> bool:
        """Whether interactive requests are there: in flight, waiting, or one came
        within ``quiet_s`` (Poisson arrivals leave gaps; batch filling a gap would
        hold the next one back for a whole batch answer)."""
        return (
            g.in_flight > g.batch
            or bool(g.interactive_waiting)
            or bool(g.node_waiting[0])
            or self.clock() - g.interactive_at < self.quiet_s
        )

    def _admit(self, g: ModelGate, cls: str) -> None:
        g.in_flight += 1
        g.batch += cls == BATCH

    async def enter(self, model: str, cls: str, until: float) -> bool | None:
        """Wait for a slot of ``model`` until ``until`` (clock time). True: admitted,
        leave() when done; None: not gated (no capacity declared); False: timed out."""
        capacity = self.capacity(model)
        if capacity is None:
            return None
        g = self.models.get(model)
        if g is None:
            g = self.models[model] = ModelGate()
        if cls == INTERACTIVE:
            g.interactive_at = self.clock()
        queue = g.interactive_waiting if cls == INTERACTIVE else g.batch_waiting
        if _first(queue) is None and self._admissible(g, cls, capacity):
            self._admit(g, cls)
            return True
        if self.waiting >= self.max_waiting:
            return False
        self.waiting += 1
        try:
            return await self._wait(queue, until, lambda: self.leave(model, cls))
        finally:
            self.waiting -= 1

    async def _wait(self, queue: Waiters, until: float, give_back: Callable[[], None]) -> bool:
        """Wait at the back of ``queue`` until woken: True; False at ``until``, the
        request's own deadline, which never moves it within the queue. When the wait
        ends otherwise (timeout, the client left) in the instant it was woken,
        ``give_back()`` hands on what it was given."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue[fut] = None
        self._watching()
        try:
            async with asyncio.timeout(until - self.clock()):
                await fut
            return True
        except BaseException as e:
            queue.pop(fut, None)  # gives up its place
            if fut.done() and not fut.cancelled():
                give_back()
            fut.cancel()  # a wake skips it
            if isinstance(e, TimeoutError):
                return False
            raise

    def leave(self, model: str, cls: str) -> None:
        g = self.models[model]
        g.in_flight -= 1
        g.batch -= cls == BATCH
        self._wake_one(g.node_waiting)  # a node slot is free: admitted requests first
        self._dispatch(model, g)

    def free(self, model: str, cls: str, nodes: Sequence[Node]) -> list[Node]:
        """The nodes that may take one more request of ``cls``: below their own
        capacity (this process's attempts on them) and, for batch while interactive
        requests of the model are in flight or waiting, with batch below its share
        of the node, so that interactive ones find room on every node."""
        default, share = self.node_slots, self.share
        g = self.models[model]
        crowded = cls == BATCH and self._interactive(g)
        out = []
        for node in nodes:
            slots = node.max_concurrency or default
            st = node.stats
            if slots is None or (
                st.in_flight < slots and not (crowded and st.batch_in_flight >= share * slots)
            ):
                out.append(node)
        return out

    async def wait_node(self, model: str, cls: str, until: float) -> bool:
        """An admitted request whose model's nodes are all at their capacity waits
        for one to free a slot (interactive first, then in arrival order); False: it
        waited until ``until``."""
        g = self.models[model]
        queue = g.node_waiting[0 if cls == INTERACTIVE else 1]
        return await self._wait(queue, until, lambda: self._wake_one(g.node_waiting))

    @staticmethod
    def _wake_one(queues: tuple[Waiters, Waiters]) -> None:
        for queue in queues:
            fut = _first(queue)
            if fut is not None:
                del queue[fut]
                fut.set_result(None)
                return

    def _dispatch(self, model: str, g: ModelGate) -> None:
        """Hand free slots to waiting requests: interactive first, then batch within
        its share (or beyond it while no interactive request waits)."""
        capacity = self.capacity(model)
        if capacity is None:
            capacity = 1 << 30  # no longer declared: let everyone through
        for cls, queue in ((INTERACTIVE, g.interactive_waiting), (BATCH, g.batch_waiting)):
            while (fut := _first(queue)) is not None and self._admissible(g, cls, capacity):
                del queue[fut]
                self._admit(g, cls)
                fut.set_result(None)

    def _watching(self) -> None:
        """While requests wait, a change of the fleet (a node back, a new one) may
        add capacity: look again then."""
        if self._watch is None or self._watch.done():
            self._watch = asyncio.get_running_loop().create_task(self._watch_fleet())

    async def _watch_fleet(self) -> None:
        def waiting() -> bool:
            return any(
                g.interactive_waiting or g.batch_waiting or any(g.node_waiting)
                for g in self.models.values()
            )

        while waiting():
            await self.fleet.changed()
            for model, g in list(self.models.items()):
                for queue in g.node_waiting:  # they look at the nodes again
                    while queue:
                        fut = queue.popitem(last=False)[0]
                        if not fut.done():
                            fut.set_result(None)
                self._dispatch(model, g)

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()


def _first(queue: Waiters) -> asyncio.Future[None] | None:
    """The longest-waiting request of ``queue`` that still waits; those cancelled in
    this instant (their client left) are dropped on the way."""
    while queue:
        fut = next(iter(queue))
        if not fut.done():
            return fut
        del queue[fut]
    return None
