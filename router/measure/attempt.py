"""An attempt's lifecycle on a node, and the channel that reports it.

The request path opens an :class:`Attempt` for every try on a node
(``Meter.begin``), marks its first byte, and ends it once with an outcome. That
is the only way traffic writes a node's :class:`~router.measure.stats.NodeStats`:

* begin: the node has one more request in flight and one more awaiting a first
  byte (the hung-node rule counts silence from here);
* first byte: no longer awaiting; the node made progress;
* end: the outcome and the time to first byte (or to the failure) enter the
  scoreboard, and :class:`Signals` tell the health monitor (which nodes have
  news, and whether any failed, to wake it at once) and the state store (which
  nodes have measurements to share).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from router.measure.outcome import FAILURES, Outcome

if TYPE_CHECKING:
    from router.fleet import Node


class Bill(Protocol):
    cost: float


class Signals:
    """What the measurement layer tells the background tasks; read and reset by them."""

    __slots__ = ("failure", "for_health", "for_store")

    def __init__(self) -> None:
        self.for_store: set[Node] = set()  # nodes with measurements a shared store has not seen
        self.for_health: set[Node] = set()  # nodes with outcomes since health last looked
        self.failure = asyncio.Event()  # an attempt failed: health should look now

    def take_for_health(self) -> set[Node]:
        nodes, self.for_health = self.for_health, set()
        return nodes

    def take_for_store(self) -> set[Node]:
        nodes, self.for_store = self.for_store, set()
        return nodes


class Meter:
    """Opens attempts; holds the clock and the failure penalty they are measured with."""

    __slots__ = ("clock", "penalty_s", "signals")

    def __init__(self, clock: Callable[[], float], penalty_s: float) -> None:
        self.clock = clock
        self.penalty_s = penalty_s
        self.signals = Signals()

    def begin(self, node: Node, batch: bool = False, bill: Bill | None = None) -> Attempt:
        return Attempt(self, node, batch, bill)


class Attempt:
    """One try on one node: counted in flight from creation, recorded exactly once."""

    __slots__ = ("awaiting", "batch", "bill", "done", "meter", "node", "share0", "t0", "t_first")

    def __init__(
        self, meter: Meter, node: Node, batch: bool = False, bill: Bill | None = None
    ) -> None:
        self.meter = meter
        self.node = node
        self.batch = batch  # for a batch-class request (router.gate)
        self.bill = bill  # the request's: the node time this attempt used is added to it
        self.t_first = -1.0  # clock() at the first byte; < 0: none yet
        self.done = False
        st = node.stats
        self.t0 = meter.clock()
        # Node time shared by the requests in flight: kept for nodes priced by the hour.
        self.share0 = st.share(self.t0) if node.price_per_hour else -1.0
        if st.awaiting == 0:
            st.awaiting_since = self.t0
        st.awaiting += 1
        self.awaiting = True
        st.in_flight += 1
        st.batch_in_flight += batch
        if st.pending is not None:  # a shared store will report the in-flight count
            meter.signals.for_store.add(node)

    def first_byte(self) -> None:
        """The node answered."""
        now = self.meter.clock()
        if self.t_first < 0:
            self.t_first = now
        self._progress(now)

    def progress(self) -> None:
        """The node has begun to answer (its headers): no longer awaiting, though its
        latency runs on to :meth:`first_byte`."""
        self._progress(self.meter.clock())

    def _progress(self, now: float) -> None:
        if self.awaiting:
            self.awaiting = False
            st = self.node.stats
            st.awaiting -= 1
            st.awaiting_since = now

    def end(self, outcome: Outcome) -> None:
        if self.done:
            return
        self.done = True
        meter = self.meter
        now = meter.clock()
        self._progress(now)
        node = self.node
        st = node.stats
        if node.price_per_hour:
            share = st.share(now) - self.share0
            if self.bill is not None and self.share0 >= 0:  # (priced when it began)
                self.bill.cost += share * node.price_per_hour / 3600.0
        st.in_flight -= 1
        st.batch_in_flight -= self.batch
        elapsed = (self.t_first if self.t_first >= 0 else now) - self.t0
        st.record(outcome, elapsed, now, meter.penalty_s)
        signals = meter.signals
        signals.for_health.add(self.node)
        if st.pending is not None:
            signals.for_store.add(self.node)
        if outcome in FAILURES:
            signals.failure.set()
