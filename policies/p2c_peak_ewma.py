"""Power of two choices over peak-EWMA cost (Finagle / tower ``p2c`` + ``PeakEwma``).

Sample two distinct candidates at random and prefer the one with the lower cost
``latency_estimate * (in_flight + 1)``. Sampling instead of taking the global
minimum keeps many router replicas, each with a slightly stale view, from all
herding onto the same "best" node, and it is O(1) in the fleet size.

Failover nodes come from the same random sample (``k + 1`` nodes in all): after
the primary, the rest of the sample in order of cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from random import Random

from policies import C, RequestInfo, p2c_rank


class P2CPeakEwma:
    name = "p2c_peak_ewma"
    description = "Power of two choices on peak-EWMA latency x (in-flight + 1)."

    def rank(
        self, req: RequestInfo, candidates: Sequence[C], k: int, rng: Random, now: float
    ) -> list[C]:
        return p2c_rank(candidates, k, rng, lambda c: c.stats.cost(now))
