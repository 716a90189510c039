"""Fleet-state benchmark: a replica's Redis sync cost and the routing decision at scale.

1. Writes ``--nodes`` self-registered nodes (default 25,000) into a private
   Redis (or ``--redis-url``), as router processes would.
2. Starts a replica's store on an empty fleet and times its first, full sync.
3. For ``--seconds``, another writer changes ``--change-per-min`` percent of the
   fleet per minute (state flips), and the replica runs its sync tick every
   ``state.sync_interval_s``; it prints the tick time and Redis commands per
   tick, next to a tick with no changes at all: sync work follows the changes.
4. Times the routing decision (candidate lookup + policy ranking of 3 nodes)
   over the 25,000-node snapshot against a 10-node one, for each policy.

    python -m loadtest.bench_fleet_sync --nodes 25000 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import tempfile
import time
from random import Random

import redis as sync_redis

from loadtest.common import free_port, percentile
from policies import POLICIES, RequestInfo, build_policy
from router.config import Scoring, StateConfig
from router.fleet import Fleet, Node, NodeState, Source
from router.measure import Outcome
from router.store.redis import RedisStore

MODEL = "bench-model"


def make_fleet(n: int, scoring: Scoring, rng: Random) -> Fleet:
    reg = Fleet()
    with reg.batch():
        for i in range(n):
            reg.add(_node(i, scoring, rng))
    return reg


def _node(i: int, scoring: Scoring, rng: Random) -> Node:
    node = Node(
        id=f"node-{i:05d}",
        url=f"http://10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}:8000",
        models=[MODEL],
        gpu=rng.choice(["RTX 4090", "RTX 3090", "A100", "H100", "L40S", "T4"]),
        vram_gb=rng.choice([16, 24, 48, 80]),
        scoring=scoring,
        source=Source.JOINED,
    )
    node.last_seen = time.time() + 3600  # no expiry during the run
    return node


async def sync_bench(url: str, args: argparse.Namespace) -> Fleet:
    scoring = Scoring()
    state = StateConfig(redis_url=url, key_prefix="bench:", timeout_s=30)
    rng = Random(1)

    writer = RedisStore(state, scoring, heartbeat_ttl_s=3600)
    writer.fleet = make_fleet(args.nodes, scoring, rng)
    t0 = time.perf_counter()
    await writer._republish()
    print(f"wrote {args.nodes} nodes in {time.perf_counter() - t0:.2f} s")

    replica = RedisStore(state, scoring, heartbeat_ttl_s=3600)
    replica.fleet = Fleet()
    t0 = time.perf_counter()
    ticks = commands_total = 0
    longest = 0.0
    while len(replica.fleet.nodes) < args.nodes:  # a full sync spreads over ticks
        t1 = time.perf_counter()
        await replica._tick()
        longest = max(longest, time.perf_counter() - t1)
        ticks += 1
        commands_total += replica.commands_last_tick
    full = time.perf_counter() - t0
    print(
        f"replica first sync (every node): {full * 1e3:.0f} ms over {ticks} ticks "
        f"(longest {longest * 1e3:.0f} ms), {commands_total} Redis commands"
    )
    t0 = time.perf_counter()
    await replica._tick()
    idle = time.perf_counter() - t0
    print(f"tick with no changes: {idle * 1e3:.2f} ms, {replica.commands_last_tick} Redis commands")

    ids = list(writer.fleet.nodes)
    interval = state.sync_interval_s
    per_tick = args.nodes * args.change_per_min / 100 / 60 * interval
    carry = 0.0
    times: list[float] = []
    commands: list[int] = []
    changed: list[int] = []
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        tick_start = time.monotonic()
        carry += per_tick
        k, carry = int(carry), carry - int(carry)
        for nid in rng.sample(ids, k):
            node = writer.fleet.nodes[nid]
            flip = NodeState.DRAINING if node.state is NodeState.SERVING else NodeState.SERVING
            await writer.set_state(nid, flip, "benchmark churn")
        t0 = time.perf_counter()
        await replica._tick()
        times.append(time.perf_counter() - t0)
        commands.append(replica.commands_last_tick)
        changed.append(k)
        await asyncio.sleep(max(0.0, interval - (time.monotonic() - tick_start)))
    print(
        f"churn {args.change_per_min}%/min of {args.nodes} nodes, {len(times)} ticks "
        f"of {interval}s: {statistics.mean(changed):.1f} changed nodes/tick, "
        f"tick p50 {percentile(times, 0.5) * 1e3:.2f} ms "
        f"p99 {percentile(times, 0.99) * 1e3:.2f} ms, "
        f"{statistics.mean(commands):.1f} Redis commands/tick"
    )
    mismatched = sum(
        1
        for nid, node in writer.fleet.nodes.items()
        if replica.fleet.nodes[nid].state is not node.state
    )
    print(f"replica agrees with the writer on every node's state: {mismatched == 0}")
    await writer.client.aclose()
    await replica.client.aclose()
    return replica.fleet


def decision_bench(fleet: Fleet, calls: int) -> None:
    small = Fleet()
    for node in list(fleet.nodes.values())[:10]:
        small.add(node)
    rng, now = Random(3), time.monotonic()
    for node in fleet.nodes.values():  # give the scoreboard realistic spread
        node.stats.record(Outcome.OK, rng.uniform(0.05, 2.0), now, 5.0)
        node.stats.in_flight = rng.randrange(0, 4)
    print(f"\nrouting decision (lookup + rank 3), {calls} calls each:")
    print("| policy | routable candidates | p50 µs | p99 µs |")
    print("|---|---|---|---|")
    for name in sorted(POLICIES):
        policy = build_policy(name)
        for reg in (small, fleet):
            samples = []
            clock = time.perf_counter_ns
            for _ in range(calls):
                t0 = clock()
                cands = reg.candidates(MODEL)
                assert cands is not None
                policy.rank(RequestInfo(model=MODEL), cands, 3, rng, now)
                samples.append((clock() - t0) / 1e3)
            n = len(reg.candidates(MODEL) or ())
            p50, p99 = percentile(samples, 0.5), percentile(samples, 0.99)
            print(f"| {name} | {n} | {p50:.1f} | {p99:.1f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--nodes", type=int, default=25_000)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--change-per-min", type=float, default=10.0, help="percent of the fleet")
    p.add_argument("--calls", type=int, default=20_000, help="routing decisions per case")
    p.add_argument("--redis-url", help="use this Redis (keys under bench:), not a private one")
    args = p.parse_args()
    proc = None
    url = args.redis_url
    tmp = tempfile.mkdtemp(prefix="ballast-bench-redis-")
    if url is None:
        port = free_port()
        proc = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", tmp],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        url = f"redis://127.0.0.1:{port}/0"
        client = sync_redis.Redis(port=port)
        for _ in range(200):
            try:
                client.ping()
                break
            except sync_redis.ConnectionError:
                time.sleep(0.05)
    try:
        fleet = asyncio.run(sync_bench(url, args))
        decision_bench(fleet, args.calls)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
