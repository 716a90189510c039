"""Passive health: ejecting outliers from real traffic, and bringing them back.

Runs in the background every ``health.check_interval_s``, looking only at the
nodes that had outcomes since its last look (the measurement layer's
:class:`~router.measure.Signals` name them, and wake it at once on a failure).
Modelled on Envoy's outlier detection:

* **consecutive failures**: ``health.consecutive_failures`` failures in a row
  (connection errors, 5xx, 429, broken streams), or ``consecutive_timeouts``
  first-byte timeouts in a row (default 1: a black hole costs callers one
  timeout, then it is out);
* **success rate**: every 10 s, among a model's nodes with at least
  ``success_rate_min_requests`` (decayed) attempts, a node whose success ratio is
  below ``mean - success_rate_stdev_factor x stdev`` (and 5 points below the
  mean), or below ``1 - failure_ratio_threshold``, is ejected;
* **Retry-After**: a 429 carrying Retry-After pauses the node for that long.

Ejection lasts ``base_ejection_s x n`` for the n-th ejection, capped at
``max_ejection_s``. No more than ``max_ejection_percent`` of a model's nodes are
ejected at once, except nodes that are plainly down (connection refused).
On return, a node's traffic share ramps up over ``slow_start_s``.

All state changes go through the store, so every router replica sees them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import time
from collections import deque
from collections.abc import Callable

from router.config import HealthConfig
from router.fleet import ROUTABLE, Fleet, Node, NodeState
from router.measure import Outcome, Signals
from router.store import StateStore
from router.tasks import cancel_and_wait

log = logging.getLogger("ballast.health")

SWEEP_INTERVAL_S = 10.0
RECENT_EJECTIONS = 50  # kept for the status page


class HealthMonitor:
    def __init__(
        self,
        cfg: HealthConfig,
        fleet: Fleet,
        signals: Signals,
        store: StateStore,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.fleet = fleet
        self.signals = signals
        self.store = store
        self.clock = clock
        self.wall = wall
        self.ejections_total = 0
        self.recent: deque[dict[str, object]] = deque(maxlen=RECENT_EJECTIONS)
        self._next_sweep = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._next_sweep = self.clock() + SWEEP_INTERVAL_S
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def _run(self) -> None:
        wake = self.signals.failure
        while True:
            # A failure wakes the check at once, so an ejection lands before the
            # next request; otherwise look every check_interval_s.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.cfg.check_interval_s):
                    await wake.wait()
            wake.clear()
            try:
                await self.check()
            except Exception:  # a bug here must not stop health checking
                log.exception("health check failed")

    async def check(self) -> None:
        now, wall = self.clock(), self.wall()
        for node in self.signals.take_for_health():
            if node.id in self.fleet.nodes:
                await self._passive(node, now)
        for node in self.fleet.ejected():
            if wall >= node.ejected_until:
                await self._return(node)
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_INTERVAL_S
            for node, reason in self.success_rate_outliers(now):
                if self._may_eject(node):
                    await self.eject(node, reason)

    async def _passive(self, node: Node, now: float) -> None:
        if node.state not in ROUTABLE:
            return
        st = node.stats
        c = self.cfg
        if st.paused_until > now:
            pause = st.paused_until - now
            st.paused_until = 0.0
            await self.eject(node, f"asked for a pause (Retry-After {pause:.3g}s)", pause)
            return
        if st.consecutive_timeouts >= c.consecutive_timeouts:
            reason = f"{st.consecutive_timeouts} first-byte timeout(s) in a row"
        elif st.consecutive_failures >= c.consecutive_failures:
            reason = f"{st.consecutive_failures} failures in a row (last: {st.last_error})"
        else:
            if node.state is NodeState.VERIFIED and st.consecutive_failures == 0:
                await self.store.set_state(node.id, NodeState.SERVING, "serving real traffic")
            return
        down = st.last_error == Outcome.CONNECT_ERROR.value
        if down or self._may_eject(node):
            await self.eject(node, reason)

    def success_rate_outliers(self, now: float) -> list[tuple[Node, str]]:
        """Envoy-style success-rate outliers and nodes failing most of their requests."""
        c = self.cfg
        by_model: dict[str, list[tuple[Node, float]]] = {}
        for node in self.fleet.nodes.values():
            st = node.stats
            if node.state in ROUTABLE and st.success.attempts >= c.success_rate_min_requests:
                ratio = st.success.value(now)
                for m in node.models:
                    by_model.setdefault(m, []).append((node, ratio))
        out: dict[str, tuple[Node, str]] = {}
        for group in by_model.values():
            for node, ratio in group:
                if ratio < 1.0 - c.failure_ratio_threshold:
                    out[node.id] = (node, f"success ratio {ratio:.2f}")
            if len(group) < c.success_rate_min_nodes:
                continue
            ratios = [r for _, r in group]
            mean, stdev = statistics.fmean(ratios), statistics.pstdev(ratios)
            limit = min(mean - c.success_rate_stdev_factor * stdev, mean - 0.05)
            for node, ratio in group:
                if ratio < limit:
                    why = f"success ratio {ratio:.2f}, far below the fleet's {mean:.2f}"
                    out[node.id] = (node, why)
        return list(out.values())

    def _may_eject(self, node: Node) -> bool:
        """Keep at least (100 - max_ejection_percent)% of each model's nodes."""
        cap = self.cfg.max_ejection_percent / 100.0
        for model in node.models:
            total = ejected = 0
            for other in self.fleet.nodes.values():
                if model in other.models and other.state not in (
                    NodeState.GONE,
                    NodeState.DRAINING,
                ):
                    total += 1
                    ejected += other.state is NodeState.EJECTED
            if total and (ejected + 1) / total > cap:
                log.warning("not ejecting %s: %d of %d nodes for %s already out", node.id,
                            ejected, total, model)  # fmt: skip
                return False
        return True

    async def eject(self, node: Node, reason: str, for_s: float | None = None) -> None:
        c = self.cfg
        if for_s is None:  # a real ejection: back-off grows with each one
            node.ejections += 1
            for_s = min(c.base_ejection_s * node.ejections, c.max_ejection_s)
            why = f"{reason}; ejection #{node.ejections} for {for_s:g}s"
        else:
            why = reason
        node.ejected_until = self.wall() + for_s
        node.stats.forget_failures()
        self.ejections_total += 1
        self.recent.append({"time": self.wall(), "node": node.id, "reason": why})
        await self.store.set_state(node.id, NodeState.EJECTED, why)

    async def _return(self, node: Node) -> None:
        await self.store.set_state(node.id, NodeState.SERVING, "ejection over; slow start")
