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

``mode: conversations`` runs chat conversations instead (:func:`run_conversations`):
conversations start at Poisson arrivals of ``rate`` per second; each sends
``turns`` streamed requests one after another, every one repeating the whole
conversation so far, with a system prompt drawn from ``system_prompts`` long
ones (``system_words`` words each) shared by all conversations:

    load:
      mode: conversations
      conversations: 200
      turns: 6
      rate: 8
      system_prompts: 4
      system_words: 1500
      user_words: [20, 80]
      max_tokens: [16, 48]
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
    prompt_tokens: int = 0  # from the answer's usage, when it has one
    cached_tokens: int = 0  # of them, served from the node's prefix cache


@dataclass
class LoadSpec:
    mode: str = "requests"  # or "conversations"
    rate: float = 20.0
    stream_fraction: float = 0.5
    prompt_tokens: tuple[int, ...] = (50, 500)
    max_tokens: tuple[int, ...] = (16, 64)
    model: str = "tiny-llama"
    timeout_s: float = 30.0
    conversations: int = 200
    turns: int = 6
    system_prompts: int = 4
    system_words: int = 1500
    user_words: tuple[int, ...] = (20, 80)
    headers: dict[str, str] | None = None  # sent with every request (a client key, a class)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoadSpec:
        d = dict(d)
        for key in ("prompt_tokens", "max_tokens", "user_words"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


async def _one(
    http: aiohttp.ClientSession,
    urls: list[str],
    i: int,
    body: dict[str, Any],
    t0: float,
    headers: dict[str, str] | None = None,
) -> Record:
    stream = bool(body["stream"])
    start = time.monotonic()
    rec = Record(start - t0, 0, 0.0, -1.0, "", stream, False)
    try:
        async with http.post(
            urls[i % len(urls)] + "/v1/chat/completions", data=orjson.dumps(body), headers=headers
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
            # Each request its own conversation: a prompt no other request shares.
            prompt = f"request {i}: " + "word " * rng.choice(spec.prompt_tokens)
            body = {
                "model": spec.model,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": rng.choice(spec.max_tokens),
                "stream": rng.random() < spec.stream_fraction,
            }
            tasks.append(asyncio.create_task(_one(http, urls, i, body, t0, spec.headers)))
            i += 1
        return list(await asyncio.gather(*tasks))


def _words(rng: Random, n: int) -> str:
    return " ".join(rng.choice(_VOCAB) for _ in range(n))


_VOCAB = tuple(
    "the a river stone quiet light morning road paper window garden storm letter "
    "market winter bridge lantern harbour meadow candle mirror orchard".split()
)


async def _turn(
    http: aiohttp.ClientSession, url: str, body: dict[str, Any], t0: float
) -> tuple[Record, str]:
    """One streamed chat turn: its record and the answer's text."""
    start = time.monotonic()
    rec = Record(start - t0, 0, 0.0, -1.0, "", True, False)
    text: list[str] = []
    try:
        async with http.post(url + "/v1/chat/completions", data=orjson.dumps(body)) as resp:
            rec.status = resp.status
            rec.node = resp.headers.get("x-ballast-node", "")
            buf = b""
            async for chunk in resp.content.iter_any():
                if rec.ttfb < 0:
                    rec.ttfb = time.monotonic() - start
                buf += chunk
            events = [e[6:] for e in buf.split(b"\n\n") if e.startswith(b"data: {")]
            for raw in events:
                doc = orjson.loads(raw)
                for choice in doc.get("choices") or ():
                    text.append((choice.get("delta") or {}).get("content") or "")
                usage = doc.get("usage")
                if isinstance(usage, dict):
                    rec.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                    details = usage.get("prompt_tokens_details") or {}
                    rec.cached_tokens = int(details.get("cached_tokens") or 0)
            rec.ok = 200 <= resp.status < 300 and buf.rstrip().endswith(b"data: [DONE]")
            if not rec.ok:
                rec.error = f"http_{resp.status}" if resp.status >= 300 else "stream_broken"
    except (aiohttp.ClientError, TimeoutError, OSError) as e:
        rec.error = type(e).__name__
    rec.latency = time.monotonic() - start
    return rec, "".join(text)


async def run_conversations(urls: list[str], spec: LoadSpec, seed: int = 0) -> list[Record]:
    """``spec.conversations`` conversations of ``spec.turns`` turns (see the module)."""
    rng = Random(seed)
    systems = [_words(rng, spec.system_words) for _ in range(spec.system_prompts)]
    timeout = aiohttp.ClientTimeout(total=spec.timeout_s)
    records: list[Record] = []

    async def conversation(http: aiohttp.ClientSession, i: int, t0: float) -> None:
        crng = Random(seed * 1_000_003 + i)
        messages = [{"role": "system", "content": crng.choice(systems)}]
        url = urls[i % len(urls)]
        for _ in range(spec.turns):
            question = f"conversation {i}: " + _words(crng, crng.choice(spec.user_words))
            messages.append({"role": "user", "content": question})
            body = {
                "model": spec.model,
                "messages": messages,
                "max_tokens": crng.choice(spec.max_tokens),
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            rec, answer = await _turn(http, url, body, t0)
            records.append(rec)
            if not rec.ok:
                return
            messages = [*messages, {"role": "assistant", "content": answer}]

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
        t0 = time.monotonic()
        tasks = []
        next_at = 0.0
        for i in range(spec.conversations):
            next_at += rng.expovariate(spec.rate)
            delay = t0 + next_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(conversation(http, i, t0)))
        await asyncio.gather(*tasks)
    return records
