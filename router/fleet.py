"""The fleet: which nodes exist, what they claim, and which may take traffic.

A :class:`Node` carries what the node *claims* (URL, models, GPU, VRAM, free-form
labels such as pool, region or price) next to what Ballast has *measured*
(:class:`~router.measure.NodeStats`, owned by the measurement layer). Nodes are
built in one place, :mod:`router.store.codec`, whatever their source.

The :class:`Fleet` is membership only: it keeps, per model, a ready-made tuple
of routable nodes, rebuilt when membership or state changes, never per request,
so finding the candidates for a request is one dict lookup.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from enum import StrEnum
from typing import TYPE_CHECKING

from router.config import Scoring, label_number
from router.measure import EngineLoad, NodeStats

if TYPE_CHECKING:
    from router.pools import Pool, Pools

log = logging.getLogger("ballast.fleet")


class NodeState(StrEnum):
    REGISTERED = "registered"  # claims only, not proven to serve
    VERIFIED = "verified"  # answered a real inference for each claimed model
    SERVING = "serving"  # verified and taking traffic
    EJECTED = "ejected"  # outlier, temporarily out of rotation
    DRAINING = "draining"  # finishing in-flight work, no new requests
    GONE = "gone"  # heartbeat expired or removed


ROUTABLE = frozenset({NodeState.VERIFIED, NodeState.SERVING})


class Source(StrEnum):
    """Where a node came from."""

    CONFIG = "config"  # a static node in the config file
    JOINED = "joined"  # registered itself through the API, keeps heartbeating


class Node:
    __slots__ = (
        "auth_header",
        "claimed_context",
        "context_length",
        "cost",
        "drained",
        "ejected_until",
        "ejections",
        "engine",
        "gpu",
        "gpus",
        "id",
        "join_token",
        "labels",
        "last_seen",
        "load",
        "max_concurrency",
        "models",
        "next_probe",
        "operator_pool",
        "pool",
        "price_per_hour",
        "price_per_mtok",
        "probe",
        "probe_failures",
        "secret_hash",
        "served",
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
        source: Source = Source.CONFIG,
        engine: str = "unknown",
        state: NodeState = NodeState.SERVING,
        state_reason: str = "static node from config",
    ) -> None:
        self.id = id
        self.url = url.rstrip("/")
        self.models = tuple(models)
        # model -> the name the node serves it under, where that is one of the
        # model's aliases (set by the Fleet: ``models`` holds the models' own names)
        self.served: dict[str, str] = {}
        self.gpu = gpu
        self.vram_gb = vram_gb
        self.gpus = gpus
        self.labels = dict(labels or {})
        # The labels Ballast reads as numbers (validated where nodes come in; an
        # invalid value here counts as absent).
        context = label_number(self.labels, "context_length")
        self.claimed_context = int(context) if context is not None else None
        self.price_per_mtok = label_number(self.labels, "price_per_mtok") or 0.0
        self.price_per_hour = label_number(self.labels, "price_per_hour") or 0.0
        self.pool: Pool | None = None  # with pools configured (set by the Fleet)
        # A joined node: the name of the join token that registered it ("shared" for
        # the shared one), and the pool that token gives it (the operator's word).
        self.join_token: str | None = None
        self.operator_pool: str | None = None
        self.cost = 0.0  # what this router process attributed to answers it served
        slots = label_number(self.labels, "max_concurrency")  # requests it serves at once
        self.max_concurrency = int(slots) if slots is not None else None
        self.auth_header = f"Bearer {api_key}" if api_key else None
        self.source = source
        self.state = state
        self.state_reason = state_reason
        self.stats = NodeStats(scoring)
        self.secret_hash = ""  # sha256 of a joined node's own secret
        self.last_seen = 0.0  # wall-clock time of the last heartbeat
        self.telemetry: dict[str, object] = {}
        self.engine = engine  # what the node runs (router.engines), configured or detected
        self.context_length: int | None = None  # tokens, as the node stated it
        self.load: EngineLoad | None = None  # from the node's own /metrics
        self.probe: dict[str, object] = {}  # the last active probe's findings
        self.probe_failures = 0
        self.next_probe = 0.0
        self.ejections = 0  # times ejected; sets the next back-off
        self.ejected_until = 0.0  # wall-clock end of the current ejection
        self.drained = False  # an operator drained it: it stays out until resumed

    def __repr__(self) -> str:
        return f"Node({self.id!r}, {self.state})"


def claimed_models(node: Node) -> list[str]:
    """The model names the node claims, as it serves them (its aliases kept)."""
    return [node.served.get(m, m) for m in node.models]


class Fleet:
    """All known nodes, and per model the tuple of nodes that may take traffic."""

    def __init__(
        self, slow_start_s: float = 0.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.slow_start_s = slow_start_s
        self.clock = clock
        self.nodes: dict[str, Node] = {}
        self._ejected: tuple[Node, ...] = ()
        self._routable: dict[str, tuple[Node, ...]] = {}
        self.pools: Pools | None = None  # set before nodes are added
        self._by_pool: dict[str, tuple[tuple[Node, ...], ...]] = {}
        self.priced = False  # some node has a price: answers' tokens are counted
        self.locality_label = "region"  # locality.label
        self.aliases: dict[str, str] = {}  # alias -> model (models.<name>.aliases)
        self.localized = False  # some node has that label: callers' regions matter
        self._models: frozenset[str] = frozenset()
        self.version = 0
        self._deferred = 0  # > 0 inside batch(): rebuild once at the end
        self._stale = False
        self._waiters: set[asyncio.Future[None]] = set()

    def add(self, node: Node) -> None:
        if self.aliases:
            self._name(node)
        self.nodes[node.id] = node
        self._rebuild()

    def _name(self, node: Node) -> None:
        """The node's claims by the models' own names; the aliases it serves them
        under in ``served`` (a request for the model is sent to it by that name)."""
        models: list[str] = []
        served: dict[str, str] = {}
        for claimed in claimed_models(node):
            model = self.aliases.get(claimed, claimed)
            if model not in models:
                models.append(model)
                if model != claimed:
                    served[model] = claimed
        node.models, node.served = tuple(models), served

    def adopt(self, node: Node) -> None:
        """Add ``node``, keeping what was measured about an earlier copy of it."""
        old = self.nodes.get(node.id)
        if old is not None:
            node.stats = old.stats
        self.add(node)

    def remove(self, node_id: str) -> Node | None:
        node = self.nodes.pop(node_id, None)
        if node is not None:
            self._rebuild()
        return node

    def set_state(self, node_id: str, state: NodeState, reason: str) -> None:
        node = self.nodes[node_id]
        changed = node.state is not state
        if node.state is NodeState.EJECTED and state in ROUTABLE:
            node.stats.start_slow(self.clock(), self.slow_start_s)
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

    def by_pool(self, model: str) -> tuple[tuple[Node, ...], ...]:
        """``model``'s routable nodes per pool, in ``pools.order`` (with pools configured)."""
        return self._by_pool.get(model, ())

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

    def supply_by_model(self) -> dict[str, dict[str, int]]:
        """Per model: nodes claiming it, and how many of them are routable."""
        out: dict[str, dict[str, int]] = {}
        for node in self.nodes.values():
            for model in node.models:
                row = out.setdefault(model, {"nodes": 0, "routable": 0})
                row["nodes"] += 1
                row["routable"] += node.state in ROUTABLE
        return dict(sorted(out.items()))

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
        self.priced = any(n.price_per_mtok or n.price_per_hour for n in self.nodes.values())
        self.localized = any(self.locality_label in n.labels for n in self.nodes.values())
        if self.pools is not None:
            for node in self.nodes.values():
                node.pool = self.pools.pool_of(node)
            self._by_pool = {m: self.pools.split(ns) for m, ns in self._routable.items()}
        self._ejected = tuple(n for n in self.nodes.values() if n.state is NodeState.EJECTED)
        self._models = frozenset(models)
        self.version += 1
        waiters, self._waiters = self._waiters, set()
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def changed(self) -> None:
        """Until the next membership or state change. A waiter that gives up (its
        deadline) leaves at once: a flood of them keeps nothing."""
        fut = asyncio.get_running_loop().create_future()
        self._waiters.add(fut)
        try:
            await fut
        finally:
            self._waiters.discard(fut)
