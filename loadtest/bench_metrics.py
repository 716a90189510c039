"""How ``/metrics`` behaves with a huge fleet: render time, size, and what a scrape
costs the requests served meanwhile (event-loop lag).

A fleet of ``--nodes`` nodes (each claiming ``--models-per-node`` of
``--models`` model names, most of them verified and measured) is scraped
through the router's :class:`~router.metrics.Metrics` as ``/metrics`` does it
(rendered in a worker thread), and, for comparison in the same run, rendered on
the event loop. A ticker on the loop records its lag every millisecond; the
baseline is the same ticker with no scrape.

    python -m loadtest.bench_metrics [--nodes 25000] [--scrapes 5]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
from random import Random

from prometheus_client import generate_latest

from router.app import GC_GEN0
from router.config import MetricsConfig, Scoring
from router.fleet import Fleet, Node, NodeState
from router.measure import Outcome
from router.metrics import Metrics
from router.store import MemoryStore


def build_fleet(n: int, models: int, per_node: int, rng: Random) -> Fleet:
    fleet = Fleet()
    scoring = Scoring()
    names = [f"model-{i}" for i in range(models)]
    with fleet.batch():
        for i in range(n):
            node = Node(
                id=f"node-{i}",
                url=f"http://203.0.113.{i % 250}:{8000 + i % 1000}",
                models=rng.sample(names, per_node),
                scoring=scoring,
                gpu="RTX 4090",
                vram_gb=24,
                state=NodeState.SERVING if rng.random() < 0.8 else NodeState.REGISTERED,
            )
            for _ in range(rng.randrange(1, 20)):
                node.stats.outcomes[Outcome.OK] += 1
            node.stats.outcomes[Outcome.TIMEOUT] += rng.randrange(3)
            fleet.add(node)
    return fleet


async def lag_during(work: asyncio.Future[object] | None, seconds: float) -> list[float]:
    """Event-loop lag (ms) sampled every millisecond until ``work`` is done (or for
    ``seconds`` when there is none)."""
    lags: list[float] = []
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while (work is not None and not work.done()) or (work is None and loop.time() < end):
        t = loop.time()
        await asyncio.sleep(0.001)
        lags.append((loop.time() - t - 0.001) * 1e3)
    return lags


async def run(nodes: int, models: int, per_node: int, scrapes: int) -> None:
    rng = Random(1)
    fleet = build_fleet(nodes, models, per_node, rng)
    # As `ballast serve` does after start-up: what exists now is kept out of the
    # cyclic collector, which runs less often.
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0, 20, 20)
    metrics = Metrics(fleet, MemoryStore(), lambda: 0, MetricsConfig())
    base = await lag_during(None, 1.0)
    threaded: list[float] = []
    lag_threaded: list[float] = []
    size = 0
    for _ in range(scrapes):
        t0 = time.perf_counter()
        task = asyncio.ensure_future(metrics.render())
        lag_threaded += await lag_during(task, 0)
        size = len(task.result())
        threaded.append(time.perf_counter() - t0)
    on_loop: list[float] = []
    for _ in range(scrapes):
        t0 = time.perf_counter()
        generate_latest(metrics.collectors)  # blocks the loop for its whole duration
        on_loop.append(time.perf_counter() - t0)

    def p(xs: list[float], q: float) -> float:
        return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))]

    print(f"fleet: {nodes} nodes, {models} model names, {per_node} per node")
    print(f"exposition: {size / 1e6:.2f} MB per scrape")
    print(
        f"scrape wall time, rendered in a thread: median {statistics.median(threaded) * 1e3:.0f} ms"
    )
    print(
        f"event-loop lag, no scrape: p99 {p(base, 0.99):.2f} ms, max {max(base):.2f} ms "
        f"({len(base)} samples)"
    )
    print(
        f"event-loop lag during threaded scrapes: p99 {p(lag_threaded, 0.99):.2f} ms, "
        f"max {max(lag_threaded):.2f} ms ({len(lag_threaded)} samples); "
        f"max vs no-scrape max: {max(lag_threaded) / max(max(base), 0.01):.1f}x"
    )
    print(
        f"rendered on the loop instead: the loop stalls {statistics.median(on_loop) * 1e3:.0f} ms "
        f"per scrape ({statistics.median(on_loop) * 1e3 / max(max(lag_threaded), 0.01):.0f}x "
        "the worst threaded lag)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=25_000)
    ap.add_argument("--models", type=int, default=2_000)
    ap.add_argument("--models-per-node", type=int, default=4)
    ap.add_argument("--scrapes", type=int, default=5)
    args = ap.parse_args()
    asyncio.run(run(args.nodes, args.models, args.models_per_node, args.scrapes))


if __name__ == "__main__":
    main()
