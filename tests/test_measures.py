"""Peak-EWMA and decayed success ratio on an injected clock."""

from __future__ import annotations

import math

from router.config import Scoring
from router.measure import NodeStats, Outcome
from router.measure.decayed_ratio import DecayedRatio
from router.measure.peak_ewma import PeakEwma


def test_peak_ewma_defaults_until_measured() -> None:
    e = PeakEwma(tau_s=10, default_s=1.0)
    assert e.value(now=100) == 1.0


def test_peak_ewma_jumps_to_slower_sample_at_once() -> None:
    e = PeakEwma(tau_s=10, default_s=1.0)
    e.observe(0.1, now=0)
    e.observe(2.0, now=0.001)
    assert e.value(now=0.001) == 2.0


def test_peak_ewma_decays_toward_faster_samples_with_time_constant() -> None:
    e = PeakEwma(tau_s=10, default_s=1.0)
    e.observe(1.0, now=0)
    e.observe(0.0, now=10)  # one time constant later: weight e^-1 on the old value
    assert math.isclose(e.value(now=10), math.exp(-1))


def test_peak_ewma_read_decays_without_mutating() -> None:
    e = PeakEwma(tau_s=10, default_s=1.0)
    e.observe(2.0, now=0)
    assert math.isclose(e.value(now=20), 2.0 * math.exp(-2))
    assert e.estimate == 2.0


def test_decayed_ratio_prior_then_evidence() -> None:
    r = DecayedRatio(half_life_s=30, prior_ratio=0.9, prior_weight=2)
    assert math.isclose(r.value(0), 0.9)
    for i in range(20):
        r.record(False, now=i * 0.01)
    assert r.value(0.2) < 0.1


def test_decayed_ratio_forgets_with_half_life() -> None:
    r = DecayedRatio(half_life_s=10, prior_ratio=1.0, prior_weight=0.001)
    r.record(False, now=0)
    r.record(True, now=10)  # the failure now weighs one half
    assert math.isclose(r.value(10), 1 / 1.5, rel_tol=1e-3)


def test_fast_failures_look_slow() -> None:
    stats = NodeStats(Scoring(failure_penalty_s=5.0))
    stats.record(Outcome.HTTP_5XX, elapsed_s=0.001, now=0, penalty_s=5.0)
    assert stats.latency.value(0) == 5.0
    assert stats.consecutive_failures == 1
    stats.record(Outcome.OK, elapsed_s=0.05, now=1, penalty_s=5.0)
    assert stats.consecutive_failures == 0


def test_cancelled_attempts_say_nothing_about_the_node() -> None:
    stats = NodeStats(Scoring())
    stats.record(Outcome.CANCELLED, elapsed_s=9.0, now=0, penalty_s=5.0)
    assert stats.requests_total == 0
    assert stats.latency.estimate < 0


def test_cost_grows_with_in_flight() -> None:
    stats = NodeStats(Scoring())
    stats.record(Outcome.OK, elapsed_s=0.2, now=0, penalty_s=5.0)
    stats.in_flight = 3
    assert math.isclose(stats.cost(0), 0.8)


def test_new_node_gets_one_request_then_waits_for_its_answer() -> None:
    stats = NodeStats(Scoring(default_latency_s=1.0))
    assert stats.cost(0) == 0.0  # idle and never measured: try it
    stats.in_flight = 1
    assert stats.cost(0) == 2.0  # its first request is out: not flooded meanwhile
