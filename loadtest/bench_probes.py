"""Probe load on the GPUs against the number of router replicas.

    python -m loadtest.bench_probes --nodes 12 --replicas 1,3 --seconds 20

For each replica count, starts that many ``ballast serve`` processes sharing a
private Redis, in front of the same simulated nodes (one model each, probes
every second), lets them run, and counts the requests each node received (no
traffic is sent, so every request is a probe). Prints probes per node per
minute and the ratio against the first replica count, measured in the same run.
Without probe splitting the ratio would be the replica ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from loadtest.compare import start_redis, start_router, stop
from loadtest.simnode import SimNode, sim_config


async def probes_per_node_minute(nodes: list[SimNode], replicas: int, seconds: float) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        redis_proc, url = await start_redis(Path(tmp))
        cfg = {
            "nodes": [{"id": s.cfg.id, "url": s.url, "models": s.cfg.models} for s in nodes],
            "state": {"redis_url": url},
            "health": {"probe_interval_s": 1.0, "verified_probe_interval_s": 1.0},
            "logging": {"level": "info", "access_log": False},
        }
        routers = [await start_router(cfg, Path(tmp)) for _ in range(replicas)]
        await asyncio.sleep(3.0)  # the replicas find each other (1 s heartbeats)
        for s in nodes:
            s.requests = 0
        began = time.monotonic()
        await asyncio.sleep(seconds)
        total = sum(s.requests for s in nodes)
        elapsed = time.monotonic() - began
        for proc, _ in routers:
            await stop(proc)
        redis_proc.terminate()
        await redis_proc.wait()
    return total / len(nodes) / elapsed * 60


async def main(args: argparse.Namespace) -> None:
    nodes = [
        SimNode(sim_config(f"n{i}", [f"m{i}"], "H100", time_scale=0.1)) for i in range(args.nodes)
    ]
    for s in nodes:
        await s.start()
    counts = [int(x) for x in args.replicas.split(",")]
    rates = [await probes_per_node_minute(nodes, n, args.seconds) for n in counts]
    for s in nodes:
        await s.close()
    print(f"{'replicas':>8}  {'probes/node/min':>15}  {'vs ' + str(counts[0]):>8}")
    for n, rate in zip(counts, rates, strict=True):
        print(f"{n:>8}  {rate:>15.1f}  {rate / rates[0]:>8.2f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--nodes", type=int, default=12)
    ap.add_argument("--replicas", default="1,3")
    ap.add_argument("--seconds", type=float, default=20.0)
    asyncio.run(main(ap.parse_args()))
