"""Round robin: each request starts one further along the candidate list.

Ignores load and latency entirely; the baseline every other policy must beat.
"""

from __future__ import annotations

from collections.abc import Sequence
from random import Random

from policies import C, RequestInfo


class RoundRobin:
    name = "round_robin"
    description = "Cycle through candidates in order; ignores load and latency."

    def __init__(self) -> None:
        self._next = 0

    def rank(
        self, req: RequestInfo, candidates: Sequence[C], k: int, rng: Random, now: float
    ) -> list[C]:
        n = len(candidates)
        if n == 0:
            return []
        start = self._next % n
        self._next = start + 1
        return [candidates[(start + i) % n] for i in range(min(k, n))]
