"""Where fleet state lives: the seam between the scoreboard and a store.

The request path never talks to a store. It updates each node's
:class:`~router.nodes.NodeStats` in memory, synchronously; a store runs beside it
in the background. Membership changes (a node registers, heartbeats, is drained
or removed) go through the store, which applies them to the local registry and,
when shared, to every other router process.

:class:`MemoryStore` is the embedded default for a single process: the in-memory
registry *is* the state. :class:`router.redis_store.RedisStore` shares it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from router.nodes import Node, NodeState, Registry
from router.tasks import cancel_and_wait

log = logging.getLogger("ballast.store")

REGISTERED = "registered"  # Node.source of a node that joined through the API


class StateStore(Protocol):
    backend: str
    errors: int  # failed store operations since start

    @property
    def healthy(self) -> bool:
        """False while the store cannot be reached (requests still flow)."""
        ...

    async def start(self, registry: Registry) -> None: ...

    async def close(self) -> None: ...

    async def register(self, node: Node) -> None:
        """Add or replace a self-registered node (its ``secret_hash`` set)."""
        ...

    async def heartbeat(self, node_id: str, telemetry: dict[str, Any]) -> None: ...

    async def set_state(self, node_id: str, state: NodeState, reason: str) -> None: ...

    async def remove(self, node_id: str) -> None: ...

    async def fetch(self, node_id: str) -> Node | None:
        """The node, looked up in the shared state if this process has not seen it yet."""
        ...

    async def publish_policy(self, name: str, params: dict[str, Any]) -> None:
        """Make every router process switch to this policy (a no-op for one process)."""
        ...

    on_policy: Callable[[str, dict[str, Any]], None] | None


def adopt(registry: Registry, node: Node) -> None:
    """Put ``node`` in the registry, keeping what was measured about an earlier copy."""
    old = registry.nodes.get(node.id)
    if old is not None:
        node.stats = old.stats
    registry.add(node)


def apply_heartbeat(registry: Registry, node: Node, telemetry: dict[str, Any], now: float) -> None:
    node.last_seen = now
    node.telemetry = telemetry
    if node.state is NodeState.GONE:
        registry.set_state(node.id, NodeState.SERVING, "heartbeats resumed")


def expired(registry: Registry, ttl_s: float, now: float) -> list[Node]:
    """Self-registered nodes whose heartbeats stopped more than ``ttl_s`` ago."""
    limit = now - ttl_s
    return [
        n
        for n in registry.nodes.values()
        if n.source == REGISTERED and n.state is not NodeState.GONE and n.last_seen < limit
    ]


class MemoryStore:
    """Single-process state: nothing shared, always healthy; expires silent nodes."""

    backend = "memory"
    errors = 0
    on_policy: Callable[[str, dict[str, Any]], None] | None = None

    def __init__(self, heartbeat_ttl_s: float = 30.0, wall: Callable[[], float] = time.time):
        self.ttl = heartbeat_ttl_s
        self.wall = wall
        self.registry = Registry()
        self._task: asyncio.Task[None] | None = None

    @property
    def healthy(self) -> bool:
        return True

    async def start(self, registry: Registry) -> None:
        self.registry = registry
        self._task = asyncio.get_running_loop().create_task(self._expire_loop())

    async def close(self) -> None:
        await cancel_and_wait(self._task)

    async def register(self, node: Node) -> None:
        node.last_seen = self.wall()
        adopt(self.registry, node)

    async def heartbeat(self, node_id: str, telemetry: dict[str, Any]) -> None:
        apply_heartbeat(self.registry, self.registry.nodes[node_id], telemetry, self.wall())

    async def set_state(self, node_id: str, state: NodeState, reason: str) -> None:
        self.registry.set_state(node_id, state, reason)

    async def remove(self, node_id: str) -> None:
        self.registry.remove(node_id)

    async def fetch(self, node_id: str) -> Node | None:
        return self.registry.nodes.get(node_id)

    async def publish_policy(self, name: str, params: dict[str, Any]) -> None:
        return None

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.ttl / 4))
            for node in expired(self.registry, self.ttl, self.wall()):
                self.registry.set_state(node.id, NodeState.GONE, f"no heartbeat for {self.ttl:g}s")
