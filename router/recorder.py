"""Finished requests, handed to observers in batches, off the request path.

The request path appends each finished :class:`~router.call.Exchange` to a list
(one append). Every ``interval`` seconds, or as soon as ``max_batch`` are
waiting, the batch goes to each observer (the metrics, the access log) in one
call, so their per-request work runs in one tight loop instead of inside every
request. ``/metrics`` drains the batch before it renders, so a scrape sees
every request that finished before it. With ``serve --workers N`` a scrape
reaches one worker and cannot drain the others' batches, so there the metrics
are an ``immediate`` observer, called as each request finishes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from router.call import Exchange
from router.tasks import cancel_and_wait

log = logging.getLogger("ballast.recorder")

Observer = Callable[[Sequence[Exchange]], None]


class Recorder:
    def __init__(self, interval: float = 0.2, max_batch: int = 4096) -> None:
        self.interval = interval
        self.max_batch = max_batch
        self.observers: list[Observer] = []  # called with batches
        self.immediate: list[Observer] = []  # called with each finished request
        self._batch: list[Exchange] = []
        self._task: asyncio.Task[None] | None = None

    def __call__(self, ex: Exchange) -> None:
        for observe in self.immediate:
            observe((ex,))
        self._batch.append(ex)
        if len(self._batch) >= self.max_batch:
            self.flush()

    def flush(self) -> None:
        batch = self._batch
        if not batch:
            return
        self._batch = []
        for observe in self.observers:
            try:
                observe(batch)
            except Exception:  # an observer's bug must not lose the others' records
                log.exception("observer %r failed", observe)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self.flush()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.flush()
