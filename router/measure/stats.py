"""One node's scoreboard: what Ballast measured about it from real traffic.

All updates are synchronous and local, and take ``now``: the request path
writes them through :class:`~router.measure.attempt.Attempt`, a shared store
merges other replicas' view in with :meth:`NodeStats.adopt_shared`, and nothing
else writes these fields.

The cost used by load-aware policies is peak-EWMA latency times the queue a new
request would join (tower's ``PeakEwma`` load)::

    cost = (latency + floor) * (in flight here + in flight on other replicas + 1)

``floor`` (``scoring.latency_floor_s``) keeps milliseconds of jitter from
deciding between two equal nodes: 1.6 ms and 2.3 ms are the same node speed.

A node never measured costs nothing while idle, so it gets one request and is
measured at once, and the configured default while that request is in flight,
so it is not flooded before its first answer (Finagle).

**The hung-node rule** (:meth:`NodeStats.silence` and :meth:`NodeStats.hung`):
while attempts wait for a first byte, the time since the node last produced one
is a latency sample in the making. It replaces the estimate when longer, so a
node that has started to hang loses traffic before its first timeout fires; and
a node silent for more than ``HUNG_AFTER`` times its estimate (and at least
``HUNG_FLOOR_S``) is *hung*: policies give it nothing new until it answers.
"""

from __future__ import annotations

from collections import deque

from router.config import Scoring
from router.measure.decayed_ratio import DecayedRatio
from router.measure.merge import Shared
from router.measure.outcome import FAILURES, Outcome
from router.measure.peak_ewma import PeakEwma

HUNG_AFTER = 3.0  # silent for this many times its latency estimate ...
HUNG_FLOOR_S = 1.0  # ... and at least this long: hung
TTFB_WINDOW = 64  # recent stream TTFBs kept for the p95
TTFB_MIN_SAMPLES = 20
TOKEN_GAP_ALPHA = 0.2  # weight of the newest stream in the usual time between tokens


class Pending:
    """Outcomes recorded locally since the last flush to a shared store."""

    __slots__ = ("failures", "lat_max", "lat_n", "lat_sum", "successes")

    def __init__(self) -> None:
        self.successes = 0
        self.failures = 0
        self.lat_max = 0.0
        self.lat_sum = 0.0
        self.lat_n = 0

    @property
    def attempts(self) -> int:
        return self.successes + self.failures

    def merge(self, other: Pending) -> None:
        self.successes += other.successes
        self.failures += other.failures
        self.lat_sum += other.lat_sum
        self.lat_n += other.lat_n
        self.lat_max = max(self.lat_max, other.lat_max)

    def add(self, ok: bool, latency_s: float) -> None:
        if ok:
            self.successes += 1
        else:
            self.failures += 1
        self.lat_sum += latency_s
        self.lat_n += 1
        if latency_s > self.lat_max:
            self.lat_max = latency_s


class NodeStats:
    """``pending`` is set when a shared store is in use: it accumulates what this
    process learned until the store flushes it. ``remote_in_flight`` is what other
    router processes have in flight to the node, as the store last saw."""

    __slots__ = (
        "affinity_hits",
        "awaiting",
        "awaiting_since",
        "batch_in_flight",
        "busy_share",
        "consecutive_failures",
        "consecutive_timeouts",
        "failures_total",
        "floor",
        "in_flight",
        "last_error",
        "latency",
        "outcomes",
        "paused_until",
        "pending",
        "remote_in_flight",
        "requests_total",
        "returned_at",
        "share_at",
        "slow_start_s",
        "success",
        "token_gap",
        "ttfb",
        "ttfb_recent",
    )

    def __init__(self, scoring: Scoring) -> None:
        self.latency = PeakEwma(scoring.decay_s, scoring.default_latency_s)
        self.ttfb = PeakEwma(scoring.decay_s, scoring.default_latency_s)
        self.success = DecayedRatio(scoring.success_half_life_s)
        self.floor = scoring.latency_floor_s
        self.in_flight = 0
        self.batch_in_flight = 0  # of which for batch-class requests (router.gate)
        self.affinity_hits = 0  # requests sent here as their affinity key's own node
        self.requests_total = 0
        self.failures_total = 0
        self.consecutive_failures = 0
        self.last_error = ""
        self.outcomes: dict[Outcome, int] = dict.fromkeys(Outcome, 0)
        self.pending: Pending | None = None
        self.remote_in_flight = 0
        self.consecutive_timeouts = 0
        self.awaiting = 0  # attempts sent that have no first byte yet
        self.awaiting_since = 0.0  # last first byte (or failure) while some were awaiting
        self.paused_until = 0.0  # a 429 with Retry-After asked for a pause until then
        self.ttfb_recent: deque[float] = deque(maxlen=TTFB_WINDOW)
        self.returned_at = -1e18  # back from an ejection at (slow start); far past: none
        self.slow_start_s = 0.0
        self.token_gap = -1.0  # usual seconds between a stream's tokens (EWMA); < 0: unknown
        # The node's busy time shared among the requests in flight (router.pools' cost,
        # for nodes priced by the hour): the integral of dt / in_flight (all replicas),
        # up to share_at.
        self.busy_share = 0.0
        self.share_at = -1.0  # < 0: not started

    def share(self, now: float) -> float:
        """Bring ``busy_share`` up to ``now`` (call before the in-flight count changes)."""
        n = self.in_flight + self.remote_in_flight
        if n > 0 and self.share_at >= 0:
            self.busy_share += (now - self.share_at) / n
        self.share_at = now
        return self.busy_share

    def record(self, outcome: Outcome, elapsed_s: float, now: float, penalty_s: float) -> None:
        """Record one finished attempt.

        ``elapsed_s`` is the time to the first byte (or to the failure). A failure
        enters the latency estimate as at least ``penalty_s``: a node that answers
        503 in a millisecond must look slow, not fast.
        """
        self.outcomes[outcome] += 1
        if outcome is Outcome.CANCELLED:
            return
        self.requests_total += 1
        ok = outcome not in FAILURES
        sample = elapsed_s if ok else max(elapsed_s, penalty_s)
        if outcome is Outcome.TIMEOUT:
            self.consecutive_timeouts += 1
        elif ok:
            self.consecutive_timeouts = 0
        if ok:
            self.consecutive_failures = 0
        else:
            self.failures_total += 1
            self.consecutive_failures += 1
            self.last_error = outcome.value
        self.success.record(ok, now)
        self.latency.observe(sample, now)
        if self.pending is not None:
            self.pending.add(ok, sample)

    def silence(self, now: float) -> float:
        """Seconds attempts have waited for a first byte with none arriving; 0 if none wait."""
        return now - self.awaiting_since if self.awaiting else 0.0

    def hung(self, now: float) -> bool:
        """Silent far longer than usual while attempts wait: probably hanging."""
        silent = self.silence(now)
        return silent > HUNG_FLOOR_S and silent > HUNG_AFTER * self.latency.value(now)

    def cost(self, now: float) -> float:
        """Expected latency times the queue a new request joins (see the module doc)."""
        lat = self.latency
        queued = self.in_flight + self.remote_in_flight
        if lat.estimate < 0.0 and queued == 0:
            return 0.0
        est = lat.value(now)
        if self.awaiting:
            est = max(est, now - self.awaiting_since)
        return (est + self.floor) * (queued + 1)

    def observe_ttfb(self, ttfb_s: float, now: float) -> None:
        self.ttfb.observe(ttfb_s, now)
        self.ttfb_recent.append(ttfb_s)

    def observe_token_gap(self, gap_s: float) -> None:
        """A whole stream's mean time between tokens: what this node usually delivers."""
        old = self.token_gap
        self.token_gap = gap_s if old < 0 else old + TOKEN_GAP_ALPHA * (gap_s - old)

    def ttfb_p95(self) -> float | None:
        """95th percentile of the recent stream TTFBs (None before enough samples)."""
        recent = self.ttfb_recent
        if len(recent) < TTFB_MIN_SAMPLES:
            return None
        return sorted(recent)[int(0.95 * (len(recent) - 1))]

    def start_slow(self, now: float, slow_start_s: float) -> None:
        """Back from an ejection: ramp the node's traffic up over ``slow_start_s``."""
        self.returned_at = now
        self.slow_start_s = slow_start_s

    def ramp(self, now: float) -> float:
        """Slow start: share of its normal traffic a node just back from ejection gets."""
        if self.slow_start_s <= 0:
            return 1.0
        return min(1.0, max(0.1, (now - self.returned_at) / self.slow_start_s))

    def forget_failures(self) -> None:
        """An ejection starts: the failures in a row that caused it are spent."""
        self.consecutive_failures = self.consecutive_timeouts = 0

    def adopt_shared(self, shared: Shared, now: float, wall: float, remote_in_flight: int) -> None:
        """Take the fleet-wide counters a shared store merged from every replica
        (stamped in wall time ``wall``; this process's clock reads ``now``)."""
        if shared.lat is not None:
            self.latency.estimate = shared.lat
            self.latency.stamp = now - (wall - (shared.lat_t or wall))
        if shared.sr_t is not None:
            self.success.successes, self.success.attempts = shared.ok, shared.n
            self.success.stamp = now - (wall - shared.sr_t)
            self.requests_total, self.failures_total = shared.req, shared.fail
        if remote_in_flight != self.remote_in_flight:
            self.share(now)
            self.remote_in_flight = remote_in_flight
