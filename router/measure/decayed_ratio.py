"""Exponentially decayed success ratio with a prior.

Two counters, successes and attempts, each decay with half-life ``half_life``
(seconds), so old outcomes fade and a node that recovered is believed again.
The ratio carries a Beta-style prior of ``prior_weight`` pseudo-attempts at
``prior_ratio`` so that one lucky or unlucky request does not decide a new
node's fate::

    ratio = (successes + prior_ratio * prior_weight) / (attempts + prior_weight)

Decay is applied lazily on each update or read, from the time stamp of the last
update; reads do not mutate.
"""

from __future__ import annotations

import math


class DecayedRatio:
    __slots__ = ("attempts", "prior_ratio", "prior_weight", "rate", "stamp", "successes")

    def __init__(
        self, half_life_s: float, prior_ratio: float = 0.9, prior_weight: float = 2.0
    ) -> None:
        self.rate = math.log(2.0) / half_life_s
        self.prior_ratio = prior_ratio
        self.prior_weight = prior_weight
        self.successes = 0.0
        self.attempts = 0.0
        self.stamp = 0.0

    def record(self, ok: bool, now: float) -> None:
        w = math.exp(-(now - self.stamp) * self.rate) if self.attempts else 1.0
        self.successes = self.successes * w + (1.0 if ok else 0.0)
        self.attempts = self.attempts * w + 1.0
        self.stamp = now

    def value(self, now: float) -> float:
        w = math.exp(-max(0.0, now - self.stamp) * self.rate) if self.attempts else 1.0
        pw = self.prior_weight
        return (self.successes * w + self.prior_ratio * pw) / (self.attempts * w + pw)
