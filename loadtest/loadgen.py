"""Open-loop load generator: Poisson arrivals at a target rate.

Arrivals do not wait for earlier requests to finish (a closed loop would slow
down exactly when the router does, hiding the problem), so queueing shows up
in the latencies. The run is bounded by a duration and a request count; each
request is bounded by a timeout. Every request is recorded, errors included.

    load:
      rate: 40                       # requests per second (mean)
      stream_fraction: 0.5
      prompt_tokens: [50, 500, 2000] # drawn uniformly
      max_tokens: [16, 64]
      model: tiny-llama
      timeout_s: 30
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from random import Random
from typing import Any

import aiohttp
import orjson


@dataclass
class Record:
    t: float  # seconds since the run started, at send time
    status: int  # 0: no HTTP answer (connection error or timeout)
    latency: float
    ttfb: float
    node: str
    stream: bool
    ok: bool  # 2xx and, for streams, ended with [DONE] and no error event
    error: str = ""


@dataclass
class LoadSpec:
    rate: float = 20.0
    stream_fraction: float = 0.5
    prompt_tokens: tuple[int, ...] = (50, 500)
    max_tokens: tuple[int, ...] = (16, 64)
    model: str = "tiny-llama"
    timeout_s: float = 30.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoadSpec:
        d = dict(d)
        for key in ("prompt_tokens", "max_tokens"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


async def _one(
    http: aiohttp.ClientSession, urls: list[str], i: int, body: dict[str, Any], t0: float
) -> Record:
    stream = bool(body["stream"])
    start = time.monotonic()
    rec = Record(start - t0, 0, 0.0, -1.0, "", stream, False)
    try:
        async with http.post(
            urls[i % len(urls)] + "/v1/chat/completions", data=orjson.dumps(body)
        ) as resp:
            rec.status = resp.status
            rec.node = resp.headers.get("x-ballast-node", "")
            first = await resp.content.readany()
            rec.ttfb = time.monotonic() - start
            rest = await resp.read()
            data = first + rest
            rec.ok = 200 <= resp.status < 300
            if stream and rec.ok:
                rec.ok = data.rstrip().endswith(b"data: [DONE]") and b'"error"' not in data
                if not rec.ok:
                    rec.error = "stream_broken"
            elif not rec.ok:
                rec.error = f"http_{resp.status}"
    except (aiohttp.ClientError, TimeoutError, OSError) as e:
        rec.error = type(e).__name__
    rec.latency = time.monotonic() - start
    return rec


async def run_load(
    urls: list[str], spec: LoadSpec, duration_s: float, seed: int = 0, max_requests: int = 100_000
) -> list[Record]:
    """Send Poisson arrivals for ``duration_s``; requests alternate over ``urls``."""
    rng = Random(seed)
    timeout = aiohttp.ClientTimeout(total=spec.timeout_s)
    connector = aiohttp.TCPConnector(limit=0)
    tasks: list[asyncio.Task[Record]] = []
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
        t0 = time.monotonic()
        next_at = 0.0
        i = 0
        while i < max_requests:
            next_at += rng.expovariate(spec.rate)
            if next_at >= duration_s:
                break
            delay = t0 + next_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            prompt = "word " * rng.choice(spec.prompt_tokens)
            body = {
                "model": spec.model,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": rng.choice(spec.max_tokens),
                "stream": rng.random() < spec.stream_fraction,
            }
            tasks.append(asyncio.create_task(_one(http, urls, i, body, t0)))
            i += 1
        return list(await asyncio.gather(*tasks))
