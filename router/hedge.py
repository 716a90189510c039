"""Hedged requests: when the primary has no first byte after a delay, ask a second node.

The delay is, in order: the model's ``models.<name>.hedge_after_ms``, then
``hedge.after_ms``, then, for streams and with ``hedge.use_p95_ttfb`` (the
default), the primary's own p95 time to first token, bounded to
[``p95_min_ms``, ``p95_max_ms``] (the upper bound while the node has too few
streams for a p95: a new black hole is hedged after it, not after
``timeouts.first_byte_s``). Non-streamed answers arrive whole, so their first
byte says nothing early; they are hedged only with an explicit delay. A hedge
spends a token of the :class:`~router.budgets.HedgeBudget`.
Whichever copy answers first wins; the other is cancelled (its attempt ends as
``cancelled``, which says nothing about that node). If both fail, both
failures are recorded and the request moves on past both nodes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from router.budgets import HedgeBudget
from router.call import Call, Failed
from router.config import Config
from router.fleet import Node
from router.measure import Outcome
from router.upstream import Opened

Open = Callable[[Call, Node], Awaitable[Opened]]


class Hedging:
    def __init__(self, cfg: Config) -> None:
        h = cfg.hedge
        self.default = h.after_ms / 1e3 if h.after_ms else None
        self.per_model = {
            m: mc.hedge_after_ms / 1e3 for m, mc in cfg.models.items() if mc.hedge_after_ms
        }
        self.use_p95 = h.use_p95_ttfb
        self.p95_min = h.p95_min_ms / 1e3
        self.p95_max = h.p95_max_ms / 1e3
        self.enabled = bool(self.default or self.per_model or self.use_p95)
        self.budget = HedgeBudget(h.budget_percent)
        self.sent = 0
        self.won = 0

    def delay(self, model: str, node: Node, stream: bool = True) -> float | None:
        """Seconds to wait for ``node``'s first byte before hedging, or None: no hedge."""
        if not self.enabled:
            return None
        after = self.per_model.get(model, self.default)
        if after is None and self.use_p95 and stream:
            p95 = node.stats.ttfb_p95()
            after = self.p95_max if p95 is None else min(max(p95, self.p95_min), self.p95_max)
        if after is None or not self.budget.has():
            return None
        return after

    async def race(
        self, call: Call, open_: Open, primary: Node, backup: Node, delay: float
    ) -> tuple[Opened | None, bool]:
        """The first of ``primary`` and (after ``delay``) ``backup`` to answer; None when
        every copy failed (recorded on ``call``). Also whether the backup was sent."""
        tasks = {asyncio.ensure_future(open_(call, primary))}
        done, _ = await asyncio.wait(tasks, timeout=delay)
        hedged = not done and self.budget.spend()
        if hedged:
            self.sent += 1
            call.ex.attempts += 1
            call.ex.hedged = True
            tasks.add(asyncio.ensure_future(open_(call, backup)))
        pending = tasks
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                winner: Opened | None = None
                for task in done:
                    exc = task.exception()
                    if exc is None:
                        if winner is None:
                            winner = task.result()
                        else:  # both answered in the same instant: one is enough
                            task.result().close(Outcome.CANCELLED)
                    elif isinstance(exc, Failed):
                        call.failed(exc)
                    else:
                        raise exc
                if winner is not None:
                    if winner.node is backup:
                        self.won += 1
                    return winner, hedged
            return None, hedged
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
