"""Cache-aware routing: affinity keys, weighted rendezvous with bounded loads."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from random import Random

import aiohttp
import orjson

from loadtest.loadgen import _turn
from router.affinity import HIT, SPILL, affinity_key, order, place
from router.config import Scoring
from router.fleet import Node
from tests.conftest import MODEL, MakeRouter, MakeSim, chat, node_entry
from tests.test_observability import metric_value


def nodes(n: int, vram: float | None = 24.0) -> list[Node]:
    return [
        Node(id=f"n{i}", url=f"http://n{i}", models=[MODEL], scoring=Scoring(), vram_gb=vram)
        for i in range(n)
    ]


def keys(n: int, seed: int = 1) -> list[tuple[int, int]]:
    """Keys of sessions (group and conversation the same)."""
    rng = Random(seed)
    return [(k, k) for k in (rng.getrandbits(64) for _ in range(n))]


def test_keys_follow_the_conversation_not_the_turn() -> None:
    system = {"role": "system", "content": "You are a pirate. " * 50}
    first = {"role": "user", "content": "Where is the treasure?"}
    turn1 = {"messages": [system, first]}
    turn3 = {"messages": [system, first, {"role": "assistant", "content": "Arr"},
                          {"role": "user", "content": "And then?"}]}  # fmt: skip
    other = {"messages": [system, {"role": "user", "content": "Who are you?"}]}
    k1 = affinity_key(turn1, None, MODEL)
    assert k1 is not None and k1 == affinity_key(turn3, None, MODEL)
    assert affinity_key(other, None, MODEL) != k1  # same system prompt, another chat
    assert affinity_key(other, None, MODEL)[0] == k1[0]  # ... in the same group
    assert affinity_key(turn1, None, "other-model") != k1
    by_session = affinity_key(turn1, "s-42", MODEL)
    assert by_session == affinity_key(other, "s-42", MODEL) != k1
    assert affinity_key({**other, "user": "s-42"}, None, MODEL) == by_session
    assert affinity_key({"prompt": "x" * 5000}, None, MODEL) == affinity_key(
        {"prompt": "x" * 5000 + "more"}, None, MODEL
    )
    assert affinity_key({"input": "no messages"}, None, MODEL) is None


def test_removing_one_node_of_ten_moves_only_its_keys() -> None:
    fleet = nodes(10)
    before = {k: order(k, fleet)[0].id for k in keys(20_000)}
    after = {k: order(k, fleet[1:])[0].id for k in before}
    moved = [k for k in before if before[k] != after[k]]
    assert all(before[k] == "n0" for k in moved)  # only the removed node's keys move
    assert 0.08 <= len(moved) / len(before) <= 0.12  # about 1/N
    assert set(Counter(before.values())) == {n.id for n in fleet}


def test_conversations_of_one_system_prompt_share_its_home_nodes() -> None:
    fleet = nodes(8)
    group = 0x5EED
    homes = {order((group, c), fleet)[0].id for c in range(200)}
    assert len(homes) == 2  # a quarter of the fleet caches this system prompt
    assert len({order((g, g + 1), fleet)[0].id for g in range(200)}) == 8


def test_keys_follow_claimed_vram() -> None:
    fleet = nodes(3)
    fleet[0].vram_gb = 72.0  # three times the others
    share = Counter(order(k, fleet)[0].id for k in keys(30_000))
    assert 2.6 <= share["n0"] / share["n1"] <= 3.4
    fleet[0].vram_gb = 1_000_000.0  # a lie: weighs at most 4 times the median claim
    share = Counter(order(k, fleet)[0].id for k in keys(30_000))
    assert 3.4 <= share["n0"] / share["n1"] <= 4.6
    fleet[2].vram_gb = None  # a node claiming nothing: all weigh the same
    share = Counter(order(k, fleet)[0].id for k in keys(30_000))
    assert 0.9 <= share["n0"] / share["n1"] <= 1.1


def test_a_hot_key_spills_past_its_bound_and_returns() -> None:
    fleet = nodes(4)
    key = keys(1)[0]
    own = order(key, fleet)[0]
    node, how = place(key, fleet, 0.25, 0.0)
    assert node is own and how == HIT
    # Its node is over ceil(1.25 x its share of the load): the next in the key's order.
    own.stats.in_flight = 3
    node, how = place(key, fleet, 0.25, 0.0)
    assert node is order(key, fleet)[1] and how == SPILL
    for n in fleet:  # everyone busy: the bound grows with the mean
        n.stats.in_flight = 3
    node, how = place(key, fleet, 0.25, 0.0)
    assert node is own and how == HIT
    for n in fleet:  # no node qualifies (all failing): the policy decides
        for _ in range(10):
            n.stats.success.record(False, 0.0)
    assert place(key, fleet, 0.25, 0.0) == (None, SPILL)


def test_a_failing_or_slow_node_is_no_affinity_target() -> None:
    fleet = nodes(3)
    key = keys(1)[0]
    own = order(key, fleet)[0]
    for _ in range(10):
        own.stats.success.record(False, 0.0)
    node, how = place(key, fleet, 0.25, 0.0)
    assert node is not own and how == SPILL
    fleet = nodes(3)
    own = order(key, fleet)[0]
    for n in fleet:
        n.stats.token_gap = 0.01
    own.stats.token_gap = 0.04  # decodes four times slower than the fastest
    node, _ = place(key, fleet, 0.25, 0.0)
    assert node is not own


async def test_a_conversation_stays_on_its_node_and_replicas_agree(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    sims = [await fleet(f"s{i}", time_scale=0.0) for i in range(4)]
    entries = [node_entry(s) for s in sims]
    a, b = await make_router(entries, seed=1), await make_router(entries, seed=2)
    placed: dict[int, set[str]] = {}
    for conversation in range(12):
        for turn in range(3):
            messages = [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": f"conversation {conversation}"},
                *[{"role": "user", "content": f"turn {t}"} for t in range(turn)],
            ]
            for router in (a, b):
                body = orjson.dumps(chat(messages=messages))
                async with http.post(router.url + "/v1/chat/completions", data=body) as resp:
                    assert resp.status == 200
                    placed.setdefault(conversation, set()).add(resp.headers["x-ballast-node"])
    assert all(len(on) == 1 for on in placed.values())  # every turn, both replicas
    # one system prompt: its conversations spread over its home, half of four nodes
    assert len({next(iter(on)) for on in placed.values()}) == 2
    a.router.recorder.flush()
    async with http.get(a.url + "/metrics") as resp:
        text = await resp.text()
    assert metric_value(text, "ballast_affinity_total", model=MODEL, outcome="hit") == 36
    rows = {n.id: n for n in a.router.fleet.nodes.values()}
    assert sum(n.stats.affinity_hits for n in rows.values()) == 36


async def test_an_explicit_session_and_a_policy_without_affinity(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    sims = [await fleet(f"s{i}", time_scale=0.0) for i in range(3)]
    r = await make_router([node_entry(s) for s in sims])
    seen = set()
    for i in range(9):
        body = orjson.dumps(chat(messages=[{"role": "user", "content": f"unrelated {i}"}]))
        headers = {"x-session-id": "user-7"}
        async with http.post(r.url + "/v1/chat/completions", data=body, headers=headers) as rs:
            seen.add(rs.headers["x-ballast-node"])
    assert len(seen) == 1
    rr = await make_router([node_entry(s) for s in sims], policy={"name": "round_robin"})
    for _ in range(3):
        async with http.post(rr.url + "/v1/chat/completions", data=orjson.dumps(chat())) as rs:
            assert rs.status == 200
    rr.router.recorder.flush()
    async with http.get(rr.url + "/metrics") as resp:
        text = await resp.text()
    assert metric_value(text, "ballast_affinity_total", model=MODEL, outcome="none") == 3


async def test_the_simulator_caches_prefixes(fleet: MakeSim, http: aiohttp.ClientSession) -> None:
    sim = await fleet("c", time_scale=0.0, prefix_cache=True)
    messages = [{"role": "system", "content": "long instructions " * 200}]
    cached = []
    for turn in range(3):
        messages.append({"role": "user", "content": f"question {turn} " * 20})
        body = {"model": MODEL, "messages": messages, "max_tokens": 8, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        rec, answer = await _turn(http, sim.url, body, 0.0)
        assert rec.ok and answer
        cached.append((rec.cached_tokens, rec.prompt_tokens))
        messages.append({"role": "assistant", "content": answer})
    assert cached[0][0] == 0
    assert all(0.8 * p <= c < p for c, p in cached[1:])  # all but the newest turn
    assert sim.cache is not None and sim.cache.hit == sum(c for c, _ in cached)


def test_another_process_places_the_same_way() -> None:
    """Keys and orders are the same in every process (no per-process hash seed)."""
    script = (
        "from router.affinity import affinity_key, order\n"
        "from router.config import Scoring\n"
        "from router.fleet import Node\n"
        "ns = [Node(id=f'n{i}', url='http://n', models=['m'], scoring=Scoring(),"
        " vram_gb=24 + 8 * (i % 3)) for i in range(8)]\n"
        "for c in range(20):\n"
        "    doc = {'messages': [{'role': 'system', 'content': f'S{c % 3}'},"
        " {'role': 'user', 'content': f'U{c}'}]}\n"
        "    print(order(affinity_key(doc, None, 'm'), ns)[0].id)\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True
    ).stdout.split()
    ns = [
        Node(id=f"n{i}", url="http://n", models=["m"], scoring=Scoring(), vram_gb=24 + 8 * (i % 3))
        for i in range(8)
    ]
    here = []
    for c in range(20):
        doc = {"messages": [{"role": "system", "content": f"S{c % 3}"},
                            {"role": "user", "content": f"U{c}"}]}  # fmt: skip
        key = affinity_key(doc, None, "m")
        assert key is not None
        here.append(order(key, ns)[0].id)
    assert out == here
