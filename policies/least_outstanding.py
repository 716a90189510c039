"""Least outstanding requests: the nodes with the fewest requests in flight.

Ties are broken at random so that idle nodes share traffic evenly. Scans all
candidates (O(n) per request); blind to how fast each node is.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from random import Random

from policies import C, RequestInfo


class LeastOutstanding:
    name = "least_outstanding"
    description = "Fewest in-flight requests first, random tie-break; ignores speed."

    def rank(
        self, req: RequestInfo, candidates: Sequence[C], k: int, rng: Random, now: float
    ) -> list[C]:
        rnd = rng.random
        keyed = [(c.stats.in_flight, rnd(), i) for i, c in enumerate(candidates)]
        return [candidates[i] for _, _, i in heapq.nsmallest(k, keyed)]
