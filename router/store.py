"""Where shared fleet state lives: the seam between the scoreboard and a store.

The request path never talks to a store. It updates each node's
:class:`~router.nodes.NodeStats` in memory, synchronously; a store runs beside it
in the background, publishing local changes and folding in what other router
processes learned. :class:`MemoryStore` is the embedded default for a single
process: the in-memory registry *is* the state, so there is nothing to sync.
A shared store (Redis) implements the same protocol.
"""

from __future__ import annotations

from typing import Protocol

from router.nodes import Registry


class StateStore(Protocol):
    backend: str

    @property
    def healthy(self) -> bool:
        """False while the store cannot be reached (requests still flow)."""
        ...

    async def start(self, registry: Registry) -> None: ...

    async def close(self) -> None: ...


class MemoryStore:
    """Single-process state: nothing shared, nothing to sync, always healthy."""

    backend = "memory"

    @property
    def healthy(self) -> bool:
        return True

    async def start(self, registry: Registry) -> None:
        self.registry = registry

    async def close(self) -> None:
        return None
