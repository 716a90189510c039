"""Probe load on the GPUs against the number of router replicas.

    python -m loadtest.bench_probes --nodes 12 --replicas 1,3,3u --seconds 20

For each replica count, starts that many ``ballast serve`` processes sharing a
private Redis, in front of the same simulated nodes (one model each, probes
every second), lets them run, and counts the requests each node received (no
traffic is sent, so every request is a probe). Prints probes per node per
minute and the ratio against the first replica count, measured in the same run.
``3u`` runs 3 replicas that share nothing (each probes every node: the
ratio without splitting) as a same-run baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from loadtest.compare import start_redis, start_router, stop
from loadtest.simnode import SimNode, sim_config


async def probes_per_node_minute(
    nodes: list[SimNode], replicas: int, seconds: float, shared: bool
) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        redis_proc, url = await start_redis(Path(tmp))
        cfg = {
            "nodes": [{"id": s.cfg.id, "url": s.url, "models": s.cfg.models} for s in nodes],
            "state": {"redis_url": url if shared else None},
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
    runs = args.replicas.split(",")  # "3u": 3 replicas each with its own state
    rates = [
        await probes_per_node_minute(nodes, int(r.rstrip("u")), args.seconds, "u" not in r)
        for r in runs
    ]
    for s in nodes:
        await s.close()
    print(f"{'replicas':<22}  {'probes/node/min':>15}  {'vs first':>8}")
    for r, rate in zip(runs, rates, strict=True):
        what = f"{r.rstrip('u')}, " + ("own state each" if "u" in r else "sharing Redis")
        print(f"{what:<22}  {rate:>15.1f}  {rate / rates[0]:>8.2f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--nodes", type=int, default=12)
    ap.add_argument("--replicas", default="1,3,3u")
    ap.add_argument("--seconds", type=float, default=20.0)
    asyncio.run(main(ap.parse_args()))
