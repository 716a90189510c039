"""The composite score: power of two choices over everything Ballast knows.

    cost = latency x load        peak-EWMA latency x (in flight here and elsewhere + 1),
                                 or the current silence of a node that stopped answering
         x reliability           (decayed success ratio / its prior, capped at 1 and floored
                                 at 0.05) ^ -reliability_weight: only evidence of failures
                                 costs, so a node with fewer requests is not penalised for
                                 having less evidence
         x memory headroom       1 + headroom_weight x KV-cache use (engine metrics)
         x queue                 1 + queue_weight x requests waiting in the node's engine
         x price                 1 + price_weight x the node's price_per_mtok label
         x hung                  1000 while the node looks hung (NodeStats.hung: silent
                                 far longer than its latency estimate while attempts wait)
         / slow start            share of traffic regained since an ejection ended

Engine metrics older than three scrape intervals count as saturated (KV use 1,
queue 10). A node never measured and idle costs 0, so it gets one request at
once; while that request runs it costs the default latency x 2, so it is not
flooded (the decayed success ratio also starts from a prior of 0.9).

Two candidates are sampled and the cheaper wins (not a global minimum, which
would herd every replica onto the same node). Each factor is reported per node
in ``GET /admin/nodes`` so an operator can see why a node gets traffic.
"""

from __future__ import annotations

from collections.abc import Sequence
from random import Random
from typing import Any

from policies import C, RequestInfo, p2c_rank

STALE_QUEUE = 10.0
HUNG = 1000.0  # cost factor of a node that looks hung


class Score:
    name = "score"
    uses_affinity = True  # the request path places requests by their affinity key first
    description = (
        "P2C on latency x load x reliability x memory headroom x queue x price, with slow start."
    )

    def __init__(
        self,
        reliability_weight: float = 2.0,
        headroom_weight: float = 1.0,
        queue_weight: float = 0.5,
        price_weight: float = 0.0,
    ) -> None:
        for name, v in (
            ("reliability_weight", reliability_weight),
            ("headroom_weight", headroom_weight),
            ("queue_weight", queue_weight),
            ("price_weight", price_weight),
        ):
            if not isinstance(v, int | float) or v < 0:
                raise TypeError(f"{name} must be a number >= 0")
        self.reliability_weight = float(reliability_weight)
        self.headroom_weight = float(headroom_weight)
        self.queue_weight = float(queue_weight)
        self.price_weight = float(price_weight)

    def factors(self, c: Any, now: float) -> dict[str, float]:
        """Each factor of the cost, for operators (``GET /admin/nodes``)."""
        st = c.stats
        kv, queue = _load(c, now)
        out = {
            "latency_load": st.cost(now),
            "reliability": _reliability(st, now) ** -self.reliability_weight,
            "headroom": 1.0 + self.headroom_weight * kv,
            "queue": 1.0 + self.queue_weight * queue,
            "price": 1.0 + self.price_weight * _price(c),
            "slow_start": st.ramp(now),
            "hung": HUNG if st.hung(now) else 1.0,
        }
        out["cost"] = (
            out["latency_load"]
            * out["reliability"]
            * out["headroom"]
            * out["queue"]
            * out["price"]
            * out["hung"]
            / out["slow_start"]
        )
        return out

    def cost(self, c: Any, now: float) -> float:
        """The same product as :meth:`factors`, without building a dict (hot path)."""
        st = c.stats
        cost = st.cost(now)
        if cost == 0.0:
            return 0.0
        ratio = _reliability(st, now)
        if ratio < 1.0:
            cost *= ratio**-self.reliability_weight
        kv, queue = _load(c, now)
        if kv:
            cost *= 1.0 + self.headroom_weight * kv
        if queue:
            cost *= 1.0 + self.queue_weight * queue
        if self.price_weight:
            cost *= 1.0 + self.price_weight * _price(c)
        if st.hung(now):
            cost *= HUNG
        return cost / st.ramp(now)

    def rank(
        self, req: RequestInfo, candidates: Sequence[C], k: int, rng: Random, now: float
    ) -> list[C]:
        return p2c_rank(candidates, k, rng, lambda c: self.cost(c, now))


def _load(c: Any, now: float) -> tuple[float, float]:
    """(KV-cache use, engine queue); stale engine metrics count as saturated."""
    engine = getattr(c, "load", None)
    if engine is None:
        return 0.0, 0.0
    if now > engine.fresh_until:
        return 1.0, STALE_QUEUE
    return engine.kv_usage or 0.0, engine.queue


def _price(c: Any) -> float:
    """The node's ``price_per_mtok`` label (validated and bounded on the way in)."""
    return getattr(c, "price_per_mtok", 0.0)


def _reliability(st: Any, now: float) -> float:
    """The success ratio relative to the prior a new node starts with, in [0.05, 1]."""
    success = st.success
    return min(1.0, max(success.value(now) / success.prior_ratio, 0.05))
