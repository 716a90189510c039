"""Uniform random: a random permutation prefix of the candidates."""

from __future__ import annotations

from collections.abc import Sequence
from random import Random

from policies import C, RequestInfo


class RandomChoice:
    name = "random"
    description = "Pick uniformly at random; failover to other random nodes."

    def rank(
        self, req: RequestInfo, candidates: Sequence[C], k: int, rng: Random, now: float
    ) -> list[C]:
        return rng.sample(candidates, min(k, len(candidates)))
