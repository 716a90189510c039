"""The two budgets that keep extra attempts a small share of traffic.

* :class:`RetryBudget` (Envoy's retry budget): retries in progress stay below
  ``budget_percent`` of the requests in progress, but at least
  ``min_retry_concurrency`` are always allowed, so a quiet router still retries.
* :class:`HedgeBudget`: a token bucket refilled by ``budget_percent`` of a token
  per request, holding at most ``BURST`` tokens; a hedge spends one. Over time
  hedges are at most that share of requests.
"""

from __future__ import annotations

BURST = 10.0  # hedges the budget may save up


class RetryBudget:
    __slots__ = ("active", "fraction", "minimum", "retrying")

    def __init__(self, budget_percent: float, min_concurrency: int) -> None:
        self.fraction = budget_percent / 100.0
        self.minimum = min_concurrency
        self.active = 0  # client requests in progress
        self.retrying = 0  # of which currently on a retry attempt

    def allows(self) -> bool:
        return self.retrying < max(self.minimum, self.active * self.fraction)


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
