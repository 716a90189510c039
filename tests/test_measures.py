"""Peak-EWMA, decayed success ratio and the shared merge, on an injected clock."""

from __future__ import annotations

import math

import pytest

from router.config import Scoring
from router.measure import NodeStats, Outcome, Pending
from router.measure.decayed_ratio import DecayedRatio
from router.measure.merge import MERGE_LUA, Batch, Shared, merge
from router.measure.peak_ewma import PeakEwma
from tests.conftest import RedisServer


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
    stats = NodeStats(Scoring(latency_floor_s=0))
    stats.record(Outcome.OK, elapsed_s=0.2, now=0, penalty_s=5.0)
    stats.in_flight = 3
    assert math.isclose(stats.cost(0), 0.8)


def test_new_node_gets_one_request_then_waits_for_its_answer() -> None:
    stats = NodeStats(Scoring(default_latency_s=1.0, latency_floor_s=0))
    assert stats.cost(0) == 0.0  # idle and never measured: try it
    stats.in_flight = 1
    assert stats.cost(0) == 2.0  # its first request is out: not flooded meanwhile


MERGE_CASES = [
    # (shared fields before, batch, seconds since the shared update)
    ({}, Batch(attempts=3, successes=2, lat_max=0.4, lat_mean=0.2), 0.0),
    (
        {"ok": 10.0, "n": 12.0, "lat": 0.5},
        Batch(attempts=4, successes=4, lat_max=0.3, lat_mean=0.1),
        7.5,
    ),
    (
        {"ok": 3.0, "n": 9.0, "lat": 0.2},
        Batch(attempts=2, successes=0, lat_max=5.0, lat_mean=5.0),
        45.0,
    ),
    ({"ok": 1.0, "n": 1.0, "lat": 1.0}, Batch(attempts=0, successes=0, lat_max=0, lat_mean=0), 3),
]


@pytest.mark.parametrize(("before", "batch", "age"), MERGE_CASES)
def test_lua_merge_agrees_with_its_python_twin(
    redis_server: RedisServer, before: dict[str, float], batch: Batch, age: float
) -> None:
    client = redis_server.client()
    script = client.register_script(MERGE_LUA)
    now, half_life, tau = 1_700_000_000.0, 30.0, 10.0
    shared = Shared(req=5, fail=1)
    fields: dict[str, float] = {"req": 5, "fail": 1, "spec": 1}
    if before:
        shared = Shared(
            before["ok"], before["n"], now - age, before["lat"], now - age, req=5, fail=1
        )
        fields.update(before, sr_t=now - age, lat_t=now - age)
    client.hset("n", mapping=fields)
    args = ["n", repr(now), "r1", 2, batch.attempts, batch.successes]
    args += [repr(batch.lat_max), repr(batch.lat_mean), half_life, tau]
    assert script(keys=["n", "changes", "seq"], args=args) == 1
    got = {k.decode(): float(v) for k, v in client.hgetall("n").items()}
    want = merge(shared, batch, now, half_life, tau)
    for name in ("ok", "n", "lat", "req", "fail"):
        if getattr(want, name) is not None and (name in got or batch.attempts):
            assert got[name] == pytest.approx(getattr(want, name), rel=1e-12), name
    assert got["if:r1"] == 2
    client.close()


def test_merge_of_one_replica_matches_its_local_estimators() -> None:
    stats = NodeStats(Scoring(success_half_life_s=30, decay_s=10))
    stats.pending = Pending()
    for i, (ok, lat) in enumerate([(True, 0.2), (False, 5.0), (True, 0.1)]):
        stats.record(Outcome.OK if ok else Outcome.HTTP_5XX, lat, float(i), 5.0)
    p = stats.pending
    merged = merge(Shared(), Batch(p.attempts, p.successes, p.lat_max, p.lat_sum / p.lat_n), 2.0,
                   30, 10)  # fmt: skip
    assert (merged.ok, merged.n, merged.req, merged.fail) == (2, 3, 3, 1)
    # A batch keeps no order, so its slowest sample is the shared peak: never more
    # optimistic than the local estimate, which had begun to decay after it.
    assert merged.lat == 5.0 >= stats.latency.estimate > 4.5


def test_the_latency_floor_makes_jitter_no_reason_to_prefer_a_node() -> None:
    a, b = NodeStats(Scoring()), NodeStats(Scoring())
    a.record(Outcome.OK, elapsed_s=0.0016, now=0, penalty_s=5.0)
    b.record(Outcome.OK, elapsed_s=0.0023, now=0, penalty_s=5.0)
    assert b.cost(0) / a.cost(0) < 1.05  # within the policies' tie: the random pick stands
    a.in_flight = 1
    assert a.cost(0) > b.cost(0)  # but load still counts
