"""The two budgets that keep extra attempts a small share of traffic.

* :class:`RetryBudget` (Envoy's retry budget): retries waiting for their
  node's answer stay below ``budget_percent`` of the requests in progress, but
  at least ``min_retry_concurrency`` are always allowed, so a quiet router
  still retries. A retry that finds the budget spent waits up to
  ``retries.budget_wait_s`` for a slot instead of failing at once: a node that
  leaves cuts all its streams in the same instant, and their continuations
  should queue for a moment, not fail.
* :class:`HedgeBudget`: a token bucket refilled by ``budget_percent`` of a token
  per request, holding at most ``BURST`` tokens; a hedge spends one. Over time
  hedges are at most that share of requests.
"""

from __future__ import annotations

import asyncio
import contextlib

BURST = 10.0  # hedges the budget may save up


class RetryBudget:
    __slots__ = ("_waiters", "active", "fraction", "minimum", "retrying", "wait_s")

    def __init__(self, budget_percent: float, min_concurrency: int, wait_s: float = 0.0) -> None:
        self.fraction = budget_percent / 100.0
        self.minimum = min_concurrency
        self.wait_s = wait_s
        self.active = 0  # client requests in progress
        self.retrying = 0  # of which currently on a retry attempt
        self._waiters: list[asyncio.Future[None]] = []

    def allows(self) -> bool:
        return self.retrying < max(self.minimum, self.active * self.fraction)

    async def acquire(self, time_left: float) -> bool:
        """Take a retry slot, waiting up to ``wait_s`` (and ``time_left``) for one."""
        if not self.allows():
            loop = asyncio.get_running_loop()
            until = loop.time() + min(self.wait_s, time_left)
            while not self.allows():
                remaining = until - loop.time()
                if remaining <= 0:
                    return False
                fut = loop.create_future()
                self._waiters.append(fut)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await fut
        self.retrying += 1
        return True

    def release(self) -> None:
        self.retrying -= 1
        while self._waiters:
            fut = self._waiters.pop(0)
            if not fut.done():
                fut.set_result(None)
                return


class HedgeBudget:
    __slots__ = ("rate", "tokens")

    def __init__(self, budget_percent: float) -> None:
        self.rate = budget_percent / 100.0
        self.tokens = 1.0

    def earn(self) -> None:
        """One request arrived."""
        if self.tokens < BURST:
            self.tokens += self.rate

    def has(self) -> bool:
        return self.tokens >= 1.0

    def spend(self) -> bool:
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True
