"""Routing policies: pure functions under a seeded RNG and an injected clock."""

from __future__ import annotations

from collections import Counter
from random import Random

import pytest

from policies import POLICIES, PolicyError, RequestInfo, build_policy
from router.config import Scoring
from router.fleet import Node
from router.measure import Outcome

REQ = RequestInfo(model="m")


def nodes(n: int) -> list[Node]:
    return [Node(id=f"n{i}", url=f"http://n{i}", models=["m"], scoring=Scoring()) for i in range(n)]


def measured(latencies: list[float], now: float = 0.0) -> list[Node]:
    out = nodes(len(latencies))
    for node, lat in zip(out, latencies, strict=True):
        node.stats.record(Outcome.OK, lat, now, 5.0)
    return out


def test_registry_names() -> None:
    assert {"round_robin", "random", "least_outstanding", "p2c_peak_ewma", "score"} <= set(POLICIES)
    for cls in POLICIES.values():
        assert cls.description


def test_unknown_policy_and_bad_params() -> None:
    with pytest.raises(PolicyError, match="unknown policy"):
        build_policy("nope")
    with pytest.raises(PolicyError, match="invalid params"):
        build_policy("round_robin", {"bogus": 1})


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_returns_k_distinct_candidates(name: str, rng: Random) -> None:
    policy = build_policy(name)
    cands = nodes(5)
    for _ in range(50):
        ranked = policy.rank(REQ, cands, 3, rng, 0.0)
        assert len(ranked) == 3
        assert len({n.id for n in ranked}) == 3
        assert all(n in cands for n in ranked)
    assert policy.rank(REQ, cands[:2], 3, rng, 0.0) != []
    assert len(policy.rank(REQ, cands[:2], 3, rng, 0.0)) == 2
    assert policy.rank(REQ, [], 3, rng, 0.0) == []


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_policies_are_deterministic_under_seed(name: str) -> None:
    cands = measured([0.1, 0.2, 0.3, 0.4])

    def run() -> list[str]:
        policy, r = build_policy(name), Random(7)
        return [policy.rank(REQ, cands, 2, r, 1.0)[0].id for _ in range(30)]

    assert run() == run()


def test_round_robin_cycles() -> None:
    policy, cands = build_policy("round_robin"), nodes(3)
    firsts = [policy.rank(REQ, cands, 2, Random(0), 0)[0].id for _ in range(6)]
    assert firsts == ["n0", "n1", "n2", "n0", "n1", "n2"]
    assert [n.id for n in policy.rank(REQ, cands, 3, Random(0), 0)] == ["n0", "n1", "n2"]


def test_least_outstanding_prefers_idle(rng: Random) -> None:
    cands = nodes(4)
    for i, n in enumerate(cands):
        n.stats.in_flight = [5, 0, 3, 1][i]
    ranked = build_policy("least_outstanding").rank(REQ, cands, 4, rng, 0)
    assert [n.id for n in ranked] == ["n1", "n3", "n2", "n0"]


def test_p2c_never_picks_the_worst_as_primary(rng: Random) -> None:
    cands = measured([0.05, 0.1, 0.2, 2.0])
    policy = build_policy("p2c_peak_ewma")
    firsts = Counter(policy.rank(REQ, cands, 3, rng, 0.0)[0].id for _ in range(2000))
    assert firsts["n3"] == 0  # the slowest loses every pair it is in
    assert firsts["n0"] > firsts["n1"] > firsts["n2"] > 0  # yet traffic is spread


def test_p2c_accounts_for_in_flight(rng: Random) -> None:
    cands = measured([0.1, 0.1])
    cands[0].stats.in_flight = 4
    policy = build_policy("p2c_peak_ewma")
    assert all(policy.rank(REQ, cands, 2, rng, 0.0)[0].id == "n1" for _ in range(20))


def test_p2c_failover_order_is_by_cost(rng: Random) -> None:
    cands = measured([0.3, 0.1, 0.2])
    ranked = build_policy("p2c_peak_ewma").rank(REQ, cands, 3, rng, 0.0)
    rest = ranked[1:]
    assert [n.stats.cost(0) for n in rest] == sorted(n.stats.cost(0) for n in rest)


def test_p2c_retries_a_slow_node_once_its_estimate_decays(rng: Random) -> None:
    cands = measured([0.1, 5.0])
    policy = build_policy("p2c_peak_ewma")
    assert policy.rank(REQ, cands, 1, rng, now=0.0)[0].id == "n0"
    # 40 s later (4 time constants) the slow node's estimate is below the fast one's
    # last sample only if it decayed; both decay, so the ratio stays: n0 still wins.
    assert policy.rank(REQ, cands, 1, rng, now=40.0)[0].id == "n0"
    cands[0].stats.record(Outcome.OK, 0.2, 40.0, 5.0)  # n0 got slower just now
    assert policy.rank(REQ, cands, 1, rng, now=40.0)[0].id == "n1"


def test_score_prefers_reliable_nodes_at_equal_latency(rng: Random) -> None:
    cands = measured([0.1, 0.1, 0.1])
    for i in range(10):  # n2 failed half its recent requests
        cands[2].stats.record(Outcome.HTTP_5XX if i % 2 else Outcome.OK, 0.1, 0.0, 0.1)
    score = build_policy("score")
    firsts = Counter(score.rank(REQ, cands, 2, rng, 0.0)[0].id for _ in range(300))
    assert firsts["n2"] == 0


def test_score_counts_stale_engine_metrics_as_saturated(rng: Random) -> None:
    from router.measure import EngineLoad

    cands = measured([0.1, 0.1])
    cands[0].load = EngineLoad(queue=0, running=1, kv_usage=0.1, fresh_until=10.0)
    cands[1].load = EngineLoad(queue=0, running=1, kv_usage=0.1, fresh_until=10.0)
    score = build_policy("score")
    f = score.factors(cands[0], 5.0)
    assert f["headroom"] == 1.1 and f["queue"] == 1.0
    cands[0].load = EngineLoad(queue=0, running=1, kv_usage=0.1, fresh_until=4.0)  # stale
    assert score.factors(cands[0], 5.0)["headroom"] == 2.0
    assert all(score.rank(REQ, cands, 2, rng, 5.0)[0].id == "n1" for _ in range(20))


def test_score_slow_start_ramps_a_returning_node(rng: Random) -> None:
    cands = measured([0.1, 0.1])
    st = cands[0].stats
    st.returned_at, st.slow_start_s = 100.0, 30.0
    score = build_policy("score")
    assert score.factors(cands[0], 101.0)["slow_start"] == 0.1
    assert score.factors(cands[0], 115.0)["slow_start"] == 0.5
    assert score.factors(cands[0], 200.0)["slow_start"] == 1.0
    early = Counter(score.rank(REQ, cands, 1, rng, 101.0)[0].id for _ in range(100))
    assert early["n0"] == 0  # ten times the cost of its peer just after returning


def test_score_tries_a_new_node_once_but_does_not_flood_it(rng: Random) -> None:
    cands = measured([0.1, 0.1])
    new = nodes(3)[2]
    cands.append(new)
    score = build_policy("score")
    assert score.cost(new, 0.0) == 0.0  # idle and never measured: worth one try
    new.stats.in_flight = 1
    assert score.cost(new, 0.0) > score.cost(cands[0], 0.0)  # not more until it answers


def test_score_price_weight_prefers_cheap_supply(rng: Random) -> None:
    cands = measured([0.1, 0.1])
    cands[0].price_per_mtok = 2.0
    cands[1].price_per_mtok = 0.2
    score = build_policy("score", {"price_weight": 1.0})
    assert all(score.rank(REQ, cands, 1, rng, 0.0)[0].id == "n1" for _ in range(20))
    with pytest.raises(PolicyError):
        build_policy("score", {"price_weight": -1})


def test_score_stops_sending_to_a_node_that_went_silent(rng: Random) -> None:
    cands = measured([0.2, 0.3])
    st = cands[0].stats
    st.in_flight, st.awaiting, st.awaiting_since = 1, 1, 10.0  # one request, no answer yet
    score = build_policy("score")
    assert score.factors(cands[0], 10.5)["hung"] == 1.0  # not yet: within 1 s
    assert score.factors(cands[0], 12.0)["hung"] == 1000.0
    assert all(score.rank(REQ, cands, 1, rng, 12.0)[0].id == "n1" for _ in range(20))
