"""What one hostile node costs everyone else: never-ending events and huge answers.

    python -m loadtest.bench_hostile [--seconds 10] [--streams 3]

Starts ``ballast serve`` (its defaults, probes off) in front of an honest
simulated node serving ``tiny-llama`` and a hostile node serving ``endless``
(a stream whose one event never ends, sent as fast as loopback takes it) and
``big-60``/``big-12`` (whole answers of 60 MB and 12 MB). The nodes run in a
process of their own (``--nodes``), so that the client measuring latency here
shares its event loop with neither them nor the router. Prints:

* the honest model's p50 and p99 latency alone, then while ``--streams``
  clients keep asking for ``endless`` streams, and their ratio;
* the router's resident memory (its peak, VmHWM) before and after 8 concurrent
  60 MB answers and 32 concurrent 12 MB answers, with what the clients got.

Everything listens on 127.0.0.1 and stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp
import orjson
from aiohttp import web

from loadtest.common import free_port, percentile, spawn, stop_all, wait_port
from loadtest.compare import start_router, stop
from loadtest.simnode import SimNode, sim_config

CHUNK = b"a" * 65536


async def endless(request: web.Request) -> web.StreamResponse:
    """A stream whose one event never ends."""
    out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await out.prepare(request)
    await out.write(b'data: {"choices": [{"index": 0, "delta": {"content": "')
    try:
        for _ in range(1 << 16):  # 4 GB at most: the bench stops it long before
            await out.write(CHUNK)
    except (ConnectionResetError, RuntimeError):
        pass
    return out


async def big(request: web.Request, mb: int) -> web.StreamResponse:
    """A valid whole answer of ``mb`` MB, padded."""
    out = web.StreamResponse(headers={"Content-Type": "application/json"})
    await out.prepare(request)
    try:
        await out.write(b'{"id": "x", "choices": [], "pad": "')
        for _ in range(mb * 16):
            await out.write(CHUNK)
        await out.write(b'"}')
    except (ConnectionResetError, RuntimeError):
        pass
    return out


async def hostile(request: web.Request) -> web.StreamResponse:
    model = (await request.json())["model"]
    return await (endless(request) if model == "endless" else big(request, int(model[4:])))


def pin(router: int, nodes: int) -> tuple[str, str]:
    """The router on the first core, the nodes and this process on the others (when
    there are two or more): the router's share of the machine is then its own."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return "shared", "shared"
    os.sched_setaffinity(router, {cores[0]})
    for pid in (nodes, 0):
        os.sched_setaffinity(pid, set(cores[1:]))
    return str(cores[0]), ",".join(map(str, cores[1:]))


def peak_rss_mb(pid: int) -> tuple[float, float]:
    """(resident now, peak resident) of a process, in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        fields[name] = value
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


async def latencies(http: aiohttp.ClientSession, url: str, seconds: float) -> list[float]:
    body = orjson.dumps(
        {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    )
    out: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.perf_counter()
        async with http.post(url + "/v1/chat/completions", data=body, headers=_JSON) as r:
            await r.read()
        out.append(time.perf_counter() - t0)
    return out


_JSON = {"Content-Type": "application/json"}


async def attack(http: aiohttp.ClientSession, url: str, until: float, got: Counter[str]) -> None:
    body = orjson.dumps(
        {"model": "endless", "messages": [{"role": "user", "content": "x"}], "stream": True}
    )
    while time.monotonic() < until:
        async with http.post(url + "/v1/chat/completions", data=body, headers=_JSON) as r:
            data = await r.read()
            got["error event" if b'"error"' in data else f"HTTP {r.status}"] += 1


async def ordinary(http: aiohttp.ClientSession, url: str, until: float, got: Counter[str]) -> None:
    """The control: a client streaming ordinary answers as fast as it can."""
    body = orjson.dumps(
        {"model": "tiny-llama", "messages": [{"role": "user", "content": "x"}], "stream": True,
         "max_tokens": 16}
    )  # fmt: skip
    while time.monotonic() < until:
        async with http.post(url + "/v1/chat/completions", data=body, headers=_JSON) as r:
            await r.read()
            got[f"HTTP {r.status}"] += 1


async def whole(http: aiohttp.ClientSession, url: str, model: str, n: int) -> Counter[str]:
    body = orjson.dumps({"model": model, "messages": [{"role": "user", "content": "x"}]})

    async def one() -> str:
        async with http.post(url + "/v1/chat/completions", data=body, headers=_JSON) as r:
            await r.read()
            if r.status == 200:
                return "200"
            return f"{r.status} {(await r.json())['error']['code']}"

    return Counter(await asyncio.gather(*(one() for _ in range(n))))


async def serve_nodes(honest_port: int, hostile_port: int) -> None:
    """The honest and the hostile node, until the process is stopped."""
    sim = SimNode(sim_config("honest", ["tiny-llama"], "H100", time_scale=0.0))
    await sim.start(honest_port)
    app = web.Application()
    app.router.add_post("/v1/chat/completions", hostile)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", hostile_port).start()
    await asyncio.Event().wait()


async def main_async(
    seconds: float, streams: int, nodes: subprocess.Popen[bytes], honest_port: int,
    hostile_port: int,
) -> str:  # fmt: skip
    lines: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = {
            "nodes": [
                {"id": "honest", "url": f"http://127.0.0.1:{honest_port}",
                 "models": ["tiny-llama"]},
                {"id": "hostile", "url": f"http://127.0.0.1:{hostile_port}",
                 "models": ["endless", "big-60", "big-12"]},
            ],
            "health": {"probe": False},
            "logging": {"level": "info", "access_log": False},
        }  # fmt: skip
        try:
            wait_port(honest_port, nodes)
            wait_port(hostile_port, nodes)
            proc, url = await start_router(cfg, Path(tmp))
        except BaseException:
            stop_all([nodes])
            raise
        assert proc.pid is not None
        pinned = pin(proc.pid, nodes.pid)
        try:
            timeout = aiohttp.ClientTimeout(total=120)
            async with aiohttp.ClientSession(timeout=timeout) as http:
                await latencies(http, url, 1.0)  # warm up
                alone = await latencies(http, url, seconds)
                figures = {}
                for name, client in (("endless", attack), ("ordinary", ordinary)):
                    got: Counter[str] = Counter()
                    until = time.monotonic() + seconds + 1
                    clients = [
                        asyncio.create_task(client(http, url, until, got)) for _ in range(streams)
                    ]
                    await asyncio.sleep(0.5)
                    figures[name] = (await latencies(http, url, seconds), dict(got))
                    await asyncio.gather(*clients)
                p50a = percentile(alone, 0.5)
                lines += [
                    f"cores: router {pinned[0]}, nodes and clients {pinned[1]}",
                    f"tiny-llama alone:       p50 {p50a * 1000:.2f} ms  p99 "
                    f"{percentile(alone, 0.99) * 1000:.2f} ms  ({len(alone)} requests)",
                ]
                for name, (lat, got) in figures.items():
                    p50 = percentile(lat, 0.5)
                    lines.append(
                        f"with {streams} {name:>8} streams: p50 {p50 * 1000:.2f} ms  p99 "
                        f"{percentile(lat, 0.99) * 1000:.2f} ms  ({len(lat)} requests); "
                        f"p50 ratio {p50 / p50a:.2f}; they got {got}"
                    )
                assert proc.pid is not None
                rss, hwm = peak_rss_mb(proc.pid)
                lines.append(f"router RSS before big answers: {rss:.0f} MB (peak {hwm:.0f} MB)")
                for model, n in (("big-60", 8), ("big-12", 32)):
                    answered = await whole(http, url, model, n)
                    rss, hwm = peak_rss_mb(proc.pid)
                    lines.append(
                        f"after {n} x {model}: {dict(answered)}; RSS {rss:.0f} MB, "
                        f"peak {hwm:.0f} MB"
                    )
        finally:
            await stop(proc)
            stop_all([nodes])
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--streams", type=int, default=3)
    p.add_argument("--nodes", type=int, nargs=2, metavar=("HONEST", "HOSTILE"),
                   help=argparse.SUPPRESS)  # fmt: skip
    a = p.parse_args()
    if a.nodes:
        asyncio.run(serve_nodes(*a.nodes))
        return
    honest_port, hostile_port = free_port(), free_port()
    nodes = spawn([sys.executable, "-m", "loadtest.bench_hostile", "--nodes",
                   str(honest_port), str(hostile_port)])  # fmt: skip
    print(asyncio.run(main_async(a.seconds, a.streams, nodes, honest_port, hostile_port)))


if __name__ == "__main__":
    main()
