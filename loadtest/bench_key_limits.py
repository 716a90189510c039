"""A key's rate limit held over two replicas sharing Redis.

    python -m loadtest.bench_key_limits [--rpm 300] [--factor 3] [--seconds 30]

Two ``ballast serve`` replicas share a private Redis; one client key has
``rpm``. Requests with that key are sent at ``factor`` times the limit for
``seconds``, alternating between the replicas (as a load balancer spreads them).
Prints how many were accepted against the limit's allowance for that time
(rpm x seconds / 60): each replica enforces half, with no store round trip per
request.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson

from loadtest.compare import start_redis, start_router, stop
from loadtest.simnode import SimNode, sim_config


async def main_async(rpm: int, factor: float, seconds: float) -> str:
    sim = SimNode(sim_config("node", ["tiny-llama"], "H100", time_scale=0.01))
    await sim.start()
    key = "sk-bal-" + secrets.token_urlsafe(32)
    os.environ["BENCH_LIMITED_KEY"] = key
    statuses: list[int] = []
    with tempfile.TemporaryDirectory() as tmp:
        redis, url = await start_redis(Path(tmp))
        cfg = {
            "nodes": [{"id": "node", "url": sim.url, "models": ["tiny-llama"]}],
            "state": {"redis_url": url},
            "auth": {"required": True, "keys": [
                {"name": "limited", "key_env": "BENCH_LIMITED_KEY", "rpm": rpm}]},
            "logging": {"level": "info", "access_log": False},
        }  # fmt: skip
        routers = [await start_router(cfg, Path(tmp)) for _ in range(2)]
        await asyncio.sleep(2.5)  # the replicas see each other (1 s heartbeats)
        body = orjson.dumps(
            {
                "model": "tiny-llama",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 4,
            }
        )
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        interval = 60.0 / (rpm * factor)

        async def one(http: aiohttp.ClientSession, target: str) -> None:
            async with http.post(target + "/v1/chat/completions", data=body, headers=headers) as r:
                await r.read()
                statuses.append(r.status)

        async with aiohttp.ClientSession() as http:
            t0, tasks, i = time.monotonic(), [], 0
            while (now := time.monotonic() - t0) < seconds:
                tasks.append(asyncio.create_task(one(http, routers[i % 2][1])))
                i += 1
                await asyncio.sleep(max(0.0, i * interval - now))
            await asyncio.gather(*tasks)
        for proc, _ in routers:
            await stop(proc)
        redis.terminate()
        await redis.wait()
    await sim.close()
    accepted, allowance = statuses.count(200), rpm * seconds / 60
    return (
        f"{len(statuses)} requests in {seconds:.0f} s ({factor:g}x {rpm} rpm) over 2 replicas: "
        f"{accepted} accepted, {statuses.count(429)} refused (429); allowance "
        f"{allowance:.0f}: accepted/allowance {accepted / allowance:.3f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rpm", type=int, default=300)
    ap.add_argument("--factor", type=float, default=3.0)
    ap.add_argument("--seconds", type=float, default=30.0)
    args = ap.parse_args()
    print(asyncio.run(main_async(args.rpm, args.factor, args.seconds)))


if __name__ == "__main__":
    main()
