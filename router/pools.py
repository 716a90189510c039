"""Pools: cheap supply first, reserved capacity as the guarantee, and what each answer cost.

With ``pools`` configured, every node belongs to one pool, named by its label
``pools.label`` (a node without it, or naming no configured pool, is in the last
pool; a self-registered node is in the first pool unless
``pools.trust_joined_labels``, or its scoped join token names its pool: the
operator's word). A request tries the pools in order (its key's
``pools`` or its ``x-ballast-pool`` header may narrow and reorder them) and goes
to the first pool that

* has a routable node that can hold it;
* is not *spilling* (below), except for a ``pools.trickle`` share of requests
  that keeps measuring it;
* has a node with a free slot (under declared capacity, ``router.gate``) within
  ``pools.spill_after_ms``.

Failover may cross pools: of a request's attempts, the last goes to the next
pool's best node.

**The spill rule.** Each router process keeps, per pool, the requests of the last
``pools.window_s`` seconds that tried the pool first: their time to first byte
as the caller saw it (retries included), and whether the pool failed them (the
request failed, or the next pool served it; a node failing once while another
node of the pool serves the retry is the pool serving), judged once a second. A
pool *breaches* when the window holds at least ``pools.min_requests`` such
requests and their TTFB p95 exceeds ``slo.ttfb_p95_ms`` or the share it failed
exceeds ``slo.error_rate``. A serving pool that breaches is spilling at once; a
spilling pool serves again once it has not breached for ``pools.recover_s`` in a
row (a window too thin for a verdict is no breach). The window still holds the
samples that caused the breach, so traffic returns at the earliest
``recover_s`` after the pool recovered, and a pool changes state at most twice
per ``recover_s``: no flapping.

**Cost.** A node's price is its label ``price_per_mtok`` (per million tokens,
prompt plus completion) or ``price_per_hour`` (for the whole node). An answer's
cost is ``tokens x price_per_mtok / 1e6`` on the node that served it, plus, on
nodes priced per hour, the node time its attempts used: each second of a node's
time is shared equally by the requests in flight to it at that moment (from
every router process, as the shared store last reported), so
``cost = price_per_hour / 3600 x integral of dt / in_flight(t)`` over the
attempt. A node's idle time is nobody's answer and is not counted.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from random import Random

from policies import TIE
from router.config import PoolsConfig
from router.fleet import Node, Source

log = logging.getLogger("ballast.pools")

POOL_HEADER = "x-ballast-pool"  # the pools a request may use, in order: "spot,reserved"
REGION_HEADER = "x-ballast-region"  # the caller's locality (``locality.label``)
FALLBACK_HEADER = "x-ballast-fallback"  # on an answer a fallback model gave: that model
JUDGE_EVERY_S = 1.0
_BUCKETS = 128  # TTFB histogram: bucket i holds GROWTH ** i to GROWTH ** (i + 1) ms
_GROWTH = 1.1
_LOG_GROWTH = math.log(_GROWTH)


def _bucket(ms: float) -> int:
    if ms <= 1.0:
        return 0
    return min(_BUCKETS - 1, int(math.log(ms) / _LOG_GROWTH))


class Pool:
    """One pool's recent requests (a ring of one-second slots) and its state."""

    __slots__ = (
        "clear_since",
        "error_rate",
        "errors",
        "hist",
        "index",
        "n",
        "name",
        "p95_ms",
        "samples",
        "secs",
        "spilling",
    )

    def __init__(self, name: str, index: int, window_s: int) -> None:
        self.name = name
        self.index = index
        self.secs = [-1] * window_s  # the second each slot holds
        self.n = [0] * window_s
        self.errors = [0] * window_s
        self.hist = [[0] * _BUCKETS for _ in range(window_s)]
        self.spilling = False
        self.clear_since = 0.0  # spilling: since when it has not breached
        # The last judgement's view of the window (also for /admin/status and metrics).
        self.samples = 0
        self.p95_ms: float | None = None
        self.error_rate = 0.0

    def add(self, now: float, ttfb_s: float, failed: bool) -> None:
        """One request that tried this pool first: its time to first byte, and whether
        the pool failed it (it failed, or another pool served it)."""
        sec = int(now)
        i = sec % len(self.secs)
        if self.secs[i] != sec:
            self.secs[i] = sec
            self.n[i] = self.errors[i] = 0
            self.hist[i] = [0] * _BUCKETS
        self.n[i] += 1
        if failed:
            self.errors[i] += 1
        else:
            self.hist[i][_bucket(ttfb_s * 1e3)] += 1

    def window(self, now: float) -> tuple[int, int, float | None]:
        """Requests, failures and the TTFB p95 (ms, within 10%: interpolated in its
        bucket) of the window."""
        oldest = int(now) - len(self.secs)
        n = errors = 0
        hist = [0] * _BUCKETS
        for i, sec in enumerate(self.secs):
            if sec > oldest:
                n += self.n[i]
                errors += self.errors[i]
                for b, c in enumerate(self.hist[i]):
                    if c:
                        hist[b] += c
        ok = n - errors
        if not ok:
            return n, errors, None
        rank, seen = 0.95 * ok, 0
        for b, c in enumerate(hist):
            if c and seen + c >= rank:
                return n, errors, _GROWTH ** (b + (rank - seen) / c)
            seen += c
        return n, errors, None  # unreachable: the counts add up to ok


class Pools:
    def __init__(self, cfg: PoolsConfig, rng: Random | None = None) -> None:
        self.cfg = cfg
        self.label = cfg.label
        self.pools = tuple(Pool(name, i, cfg.window_s) for i, name in enumerate(cfg.order))
        self.by_name = {p.name: p for p in self.pools}
        self.order: tuple[int, ...] = tuple(range(len(self.pools)))  # the default order
        self.rng = rng or Random()
        self.next_judgement = 0.0
        self.changes = 0  # spills and returns so far

    def pool_of(self, node: Node) -> Pool:
        if node.operator_pool is not None:  # its scoped join token's pool (router.join_tokens)
            return self.by_name.get(node.operator_pool, self.pools[-1])
        if node.source is Source.JOINED and not self.cfg.trust_joined_labels:
            return self.pools[0]
        return self.by_name.get(node.labels.get(self.label, ""), self.pools[-1])

    def split(self, nodes: Sequence[Node]) -> tuple[tuple[Node, ...], ...]:
        """``nodes`` by pool (each placed with :meth:`pool_of`), in the pools' order."""
        out: list[list[Node]] = [[] for _ in self.pools]
        for node in nodes:
            out[self.pool_of(node).index].append(node)
        return tuple(tuple(x) for x in out)

    def parse(self, value: str) -> tuple[int, ...] | str:
        """An ``x-ballast-pool`` header (or a key's list): pool indexes in order, or
        what is wrong with it."""
        names = [v.strip() for v in value.split(",") if v.strip()]
        if not names or len(names) > len(self.pools):
            return f"{POOL_HEADER} must name 1 to {len(self.pools)} pools"
        out: list[int] = []
        for name in names:
            pool = self.by_name.get(name)
            if pool is None:
                known = ", ".join(self.by_name)
                return f"{POOL_HEADER}: unknown pool {name[:64]!r} (known: {known})"
            if pool.index not in out:
                out.append(pool.index)
        return tuple(out)

    def judge(self, now: float) -> None:
        """Once a second: each pool's window against the SLO, with the spill rule."""
        if now < self.next_judgement:
            return
        self.next_judgement = now + JUDGE_EVERY_S
        slo, cfg = self.cfg.slo, self.cfg
        for pool in self.pools:
            n, errors, p95 = pool.window(now)
            pool.samples, pool.p95_ms = n, p95
            pool.error_rate = errors / n if n else 0.0
            breach = n >= cfg.min_requests and (
                (slo.ttfb_p95_ms is not None and p95 is not None and p95 > slo.ttfb_p95_ms)
                or (slo.error_rate is not None and pool.error_rate > slo.error_rate)
            )
            if breach:
                if not pool.spilling:
                    pool.spilling = True
                    self.changes += 1
                    log.warning(
                        "pool %s spills to the next pool: TTFB p95 %s ms, %.1f%% failed, "
                        "of %d requests in %d s", pool.name,
                        "-" if p95 is None else f"{p95:.0f}", pool.error_rate * 100, n,
                        cfg.window_s,
                    )  # fmt: skip
                pool.clear_since = now
            elif pool.spilling and now - pool.clear_since >= cfg.recover_s:
                pool.spilling = False
                self.changes += 1
                log.info("pool %s serves again: within its SLO for %g s", pool.name, cfg.recover_s)

    def takes(self, pool: Pool) -> bool:
        """Whether this request may go to ``pool`` first (a spilling pool: a trickle)."""
        return not pool.spilling or self.rng.random() < self.cfg.trickle

    def state(self) -> list[dict[str, object]]:
        return [
            {
                "pool": p.name,
                "state": "spilling" if p.spilling else "serving",
                "requests": p.samples,
                "ttfb_p95_ms": None if p.p95_ms is None else round(p.p95_ms, 1),
                "error_rate": round(p.error_rate, 4),
            }
            for p in self.pools
        ]


def prefer_local(
    ranked: list[Node], region: str, label: str, cost: Callable[[Node], float]
) -> list[Node]:
    """Locality as a tie-breaker: a node in ``region`` among the ranked ones whose
    cost is within the policy's tie margin of the first's goes first."""
    if not ranked or ranked[0].labels.get(label) == region:
        return ranked
    best = cost(ranked[0]) * (1.0 + TIE)
    for i, node in enumerate(ranked[1:], 1):
        if node.labels.get(label) == region and cost(node) <= best:
            return [node, *ranked[:i], *ranked[i + 1 :]]
    return ranked
