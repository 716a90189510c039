"""The node registry and each node's scoreboard.

A :class:`Node` carries what the node *claims* (URL, models, GPU, VRAM, free-form
labels such as pool, region or price) next to what Ballast has *measured*
(:class:`NodeStats`). The :class:`Registry` keeps, per model, a ready-made tuple
of routable nodes; it is rebuilt when membership or state changes, never per
request, so finding the candidates for a request is one dict lookup.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from enum import StrEnum

from router.config import NodeConfig, Scoring
from router.peak_ewma import PeakEwma
from router.success_ratio import DecayedRatio

log = logging.getLogger("ballast.nodes")


class NodeState(StrEnum):
    REGISTERED = "registered"  # claims only, not proven to serve
    VERIFIED = "verified"  # answered a real inference for each claimed model
    SERVING = "serving"  # verified and taking traffic
    EJECTED = "ejected"  # outlier, temporarily out of rotation
    DRAINING = "draining"  # finishing in-flight work, no new requests
    GONE = "gone"  # heartbeat expired or removed


ROUTABLE = frozenset({NodeState.VERIFIED, NodeState.SERVING})


class Outcome(StrEnum):
    OK = "ok"
    CLIENT_ERROR = "client_error"  # 4xx other than 429: the node works, the request was bad
    CONNECT_ERROR = "connect_error"
    TIMEOUT = "timeout"
    HTTP_5XX = "http_5xx"
    HTTP_429 = "http_429"
    HTTP_404 = "http_404"  # the node does not know a model (or path) it claims
    STREAM_ERROR = "stream_error"  # failed after the first byte
    CANCELLED = "cancelled"  # the client went away; says nothing about the node


FAILURES = frozenset(
    {
        Outcome.CONNECT_ERROR,
        Outcome.TIMEOUT,
        Outcome.HTTP_5XX,
        Outcome.HTTP_429,
        Outcome.HTTP_404,
        Outcome.STREAM_ERROR,
    }
)


class Pending:
    """Outcomes recorded locally since the last flush to a shared store."""

    __slots__ = ("attempts", "failures", "lat_max", "lat_n", "lat_sum", "requests", "successes")

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.attempts = 0
        self.successes = 0
        self.requests = 0
        self.failures = 0
        self.lat_max = 0.0
        self.lat_sum = 0.0
        self.lat_n = 0

    def merge(self, other: Pending) -> None:
        self.attempts += other.attempts
        self.successes += other.successes
        self.requests += other.requests
        self.failures += other.failures
        self.lat_sum += other.lat_sum
        self.lat_n += other.lat_n
        self.lat_max = max(self.lat_max, other.lat_max)

    def add(self, ok: bool, latency_s: float) -> None:
        self.attempts += 1
        self.requests += 1
        if ok:
            self.successes += 1
        else:
            self.failures += 1
        self.lat_sum += latency_s
        self.lat_n += 1
        if latency_s > self.lat_max:
            self.lat_max = latency_s


class NodeStats:
    """What Ballast measured about one node, from real traffic.

    All updates are synchronous and local; a shared store reads them in the
    background. ``now`` is always passed in, so tests run on an injected clock.
    ``pending`` is set when a shared store is in use: it accumulates what this
    process learned until the store flushes it. ``remote_in_flight`` is what
    other router processes have in flight to the node, as the store last saw.
    """

    __slots__ = (
        "awaiting",
        "awaiting_since",
        "consecutive_failures",
        "consecutive_timeouts",
        "failures_total",
        "in_flight",
        "last_error",
        "latency",
        "outcomes",
        "paused_until",
        "pending",
        "remote_in_flight",
        "requests_total",
        "returned_at",
        "slow_start_s",
        "success",
        "ttfb",
        "ttfb_recent",
    )

    def __init__(self, scoring: Scoring) -> None:
        self.latency = PeakEwma(scoring.decay_s, scoring.default_latency_s)
        self.ttfb = PeakEwma(scoring.decay_s, scoring.default_latency_s)
        self.success = DecayedRatio(scoring.success_half_life_s)
        self.in_flight = 0
        self.requests_total = 0
        self.failures_total = 0
        self.consecutive_failures = 0
        self.last_error = ""
        self.outcomes: dict[Outcome, int] = dict.fromkeys(Outcome, 0)
        self.pending: Pending | None = None
        self.remote_in_flight = 0
        self.consecutive_timeouts = 0
        self.awaiting = 0  # attempts sent that have no first byte yet
        self.awaiting_since = 0.0  # last first byte (or failure) while some were awaiting
        self.paused_until = 0.0  # a 429 with Retry-After asked for a pause until then
        self.ttfb_recent: deque[float] = deque(maxlen=64)
        self.returned_at = -1e18  # back from an ejection at (slow start); far past: none
        self.slow_start_s = 0.0

    def record(self, outcome: Outcome, elapsed_s: float, now: float, penalty_s: float) -> None:
        """Record one finished attempt.

        ``elapsed_s`` is the time to the first byte (or to the failure). A failure
        enters the latency estimate as at least ``penalty_s``: a node that answers
        503 in a millisecond must look slow, not fast.
        """
        self.outcomes[outcome] += 1
        if outcome is Outcome.CANCELLED:
            return
        self.requests_total += 1
        ok = outcome not in FAILURES
        sample = elapsed_s if ok else max(elapsed_s, penalty_s)
        if outcome is Outcome.TIMEOUT:
            self.consecutive_timeouts += 1
        elif ok:
            self.consecutive_timeouts = 0
        if ok:
            self.consecutive_failures = 0
        else:
            self.failures_total += 1
            self.consecutive_failures += 1
            self.last_error = outcome.value
        self.success.record(ok, now)
        self.latency.observe(sample, now)
        if self.pending is not None:
            self.pending.add(ok, sample)

    def cost(self, now: float) -> float:
        """Peak-EWMA cost: expected latency times the queue this request joins.

        A node never measured costs nothing while idle, so it gets one request
        and is measured at once, and the configured default while that request
        is in flight, so it is not flooded before its first answer (Finagle).
        While attempts wait for a first byte and the node has produced none for
        longer than its estimate, that silence is the estimate: a node that has
        started to hang loses traffic before its first timeout fires.
        """
        lat = self.latency
        queued = self.in_flight + self.remote_in_flight
        if lat.estimate < 0.0 and queued == 0:
            return 0.0
        est = lat.value(now)
        if self.awaiting:
            est = max(est, now - self.awaiting_since)
        return est * (queued + 1)

    def observe_ttfb(self, ttfb_s: float, now: float) -> None:
        self.ttfb.observe(ttfb_s, now)
        self.ttfb_recent.append(ttfb_s)

    def ttfb_p95(self) -> float | None:
        """95th percentile of the last 64 stream TTFBs (None before 20 samples)."""
        recent = self.ttfb_recent
        if len(recent) < 20:
            return None
        return sorted(recent)[int(0.95 * (len(recent) - 1))]

    def ramp(self, now: float) -> float:
        """Slow start: share of its normal traffic a node just back from ejection gets."""
        if self.slow_start_s <= 0:
            return 1.0
        return min(1.0, max(0.1, (now - self.returned_at) / self.slow_start_s))


class EngineLoad:
    """Load as the node's inference engine reports it (vLLM, SGLang, llama.cpp)."""

    __slots__ = ("fresh_until", "kv_usage", "queue", "running")

    def __init__(
        self, queue: float, running: float, kv_usage: float | None, fresh_until: float
    ) -> None:
        self.queue = queue
        self.running = running
        self.kv_usage = kv_usage
        self.fresh_until = fresh_until  # clock() after which it counts as saturated


class Node:
    __slots__ = (
        "auth_header",
        "ejected_until",
        "ejections",
        "engine",
        "gpu",
        "gpus",
        "id",
        "labels",
        "last_seen",
        "models",
        "next_probe",
        "probe",
        "probe_failures",
        "secret_hash",
        "source",
        "state",
        "state_reason",
        "stats",
        "telemetry",
        "url",
        "vram_gb",
    )

    def __init__(
        self,
        *,
        id: str,
        url: str,
        models: Iterable[str],
        scoring: Scoring,
        gpu: str | None = None,
        vram_gb: float | None = None,
        gpus: int = 1,
        labels: dict[str, str] | None = None,
        api_key: str | None = None,
        source: str = "config",
        state: NodeState = NodeState.SERVING,
        state_reason: str = "static node from config",
    ) -> None:
        self.id = id
        self.url = url.rstrip("/")
        self.models = tuple(models)
        self.gpu = gpu
        self.vram_gb = vram_gb
        self.gpus = gpus
        self.labels = dict(labels or {})
        self.auth_header = f"Bearer {api_key}" if api_key else None
        self.source = source
        self.state = state
        self.state_reason = state_reason
        self.stats = NodeStats(scoring)
        self.secret_hash = ""  # sha256 of a self-registered node's own secret
        self.last_seen = 0.0  # wall-clock time of the last heartbeat
        self.telemetry: dict[str, object] = {}
        self.engine: EngineLoad | None = None  # from the node's own /metrics
        self.probe: dict[str, object] = {}  # the last active probe's findings
        self.probe_failures = 0
        self.next_probe = 0.0
        self.ejections = 0  # times ejected; sets the next back-off
        self.ejected_until = 0.0  # wall-clock end of the current ejection

    @classmethod
    def from_config(
        cls, nc: NodeConfig, scoring: Scoring, env: dict[str, str] | None = None
    ) -> Node:
        env = os.environ if env is None else env
        key = env.get(nc.api_key_env) if nc.api_key_env else None
        return cls(
            id=nc.id,
            url=nc.url,
            models=nc.models,
            gpu=nc.gpu,
            vram_gb=nc.vram_gb,
            gpus=nc.gpus,
            labels=nc.labels,
            api_key=key,
            scoring=scoring,
        )

    def spec(self) -> dict[str, object]:
        """The node's claims, as shared between router processes (no secrets)."""
        return {
            "url": self.url,
            "models": list(self.models),
            "gpu": self.gpu,
            "gpus": self.gpus,
            "vram_gb": self.vram_gb,
            "labels": self.labels,
            "source": self.source,
        }

    def __repr__(self) -> str:
        return f"Node({self.id!r}, {self.state})"


class Registry:
    """All known nodes, and per model the tuple of nodes that may take traffic."""

    def __init__(
        self, on_change: Callable[[], None] | None = None, slow_start_s: float = 0.0
    ) -> None:
        self.slow_start_s = slow_start_s
        self.nodes: dict[str, Node] = {}
        self._ejected: tuple[Node, ...] = ()
        self._routable: dict[str, tuple[Node, ...]] = {}
        self._models: frozenset[str] = frozenset()
        self._on_change = on_change
        self.version = 0
        self.dirty: set[Node] = set()  # nodes with news for a shared store
        self.touched: set[Node] = set()  # nodes with outcomes since health last looked
        self.failure_seen = asyncio.Event()  # set by the request path on a failed attempt
        self._deferred = 0  # > 0 inside batch(): rebuild once at the end
        self._stale = False
        self._waiters: list[asyncio.Future[None]] = []

    def add(self, node: Node) -> None:
        self.nodes[node.id] = node
        self._rebuild()

    def remove(self, node_id: str) -> Node | None:
        node = self.nodes.pop(node_id, None)
        if node is not None:
            self._rebuild()
        return node

    def set_state(self, node_id: str, state: NodeState, reason: str) -> None:
        node = self.nodes[node_id]
        changed = node.state is not state
        if node.state is NodeState.EJECTED and state in ROUTABLE:
            node.stats.returned_at = time.monotonic()  # slow start from now
            node.stats.slow_start_s = self.slow_start_s
        node.state = state
        node.state_reason = reason
        if changed:
            if state is NodeState.EJECTED or state is NodeState.GONE:
                log.warning("node %s is %s: %s", node_id, state.value, reason)
            else:
                log.info("node %s is %s: %s", node_id, state.value, reason)
            self._rebuild()

    def candidates(self, model: str) -> tuple[Node, ...] | None:
        """Routable nodes for ``model``; ``None`` when no node claims the model at all."""
        found = self._routable.get(model)
        if found is None and model in self._models:
            return ()
        return found

    def served_models(self) -> list[str]:
        """Models that at least one routable node serves."""
        return sorted(self._routable)

    def ejected(self) -> tuple[Node, ...]:
        return self._ejected

    def knows(self, model: str) -> bool:
        """Whether any node (in any state) claims ``model``: bounds metric labels."""
        return model in self._models

    def routable_count(self) -> int:
        return sum(1 for n in self.nodes.values() if n.state in ROUTABLE)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Apply many changes with one index rebuild at the end."""
        self._deferred += 1
        try:
            yield
        finally:
            self._deferred -= 1
            if not self._deferred and self._stale:
                self._rebuild()

    def _rebuild(self) -> None:
        if self._deferred:
            self._stale = True
            return
        self._stale = False
        routable: dict[str, list[Node]] = {}
        models: set[str] = set()
        for node in self.nodes.values():
            models.update(node.models)
            if node.state in ROUTABLE:
                for m in node.models:
                    routable.setdefault(m, []).append(node)
        self._routable = {m: tuple(ns) for m, ns in routable.items()}
        self._ejected = tuple(n for n in self.nodes.values() if n.state is NodeState.EJECTED)
        self._models = frozenset(models)
        self.version += 1
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)
        if self._on_change is not None:
            self._on_change()

    async def changed(self) -> None:
        """Until the next membership or state change."""
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        await fut
