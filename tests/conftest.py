"""Shared fixtures: simulated nodes and routers on real loopback sockets."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from random import Random
from typing import Any

import aiohttp
import pytest
import redis
import yaml
from aiohttp import web

from loadtest.common import free_port
from loadtest.simnode import Fault, Profile, SimNode, sim_config
from router.app import ROUTER, Router, Runner, create_app
from router.config import parse_config

MODEL = "tiny-llama"


def cluster_ports(n: int) -> list[int]:
    """``n`` ports whose Redis Cluster bus ports (port + 10000) are free too."""
    chosen: list[int] = []
    for port in range(21000 + os.getpid() % 4000, 30000):
        pair = [socket.socket(), socket.socket()]
        try:
            for s, p in zip(pair, (port, port + 10000), strict=True):
                s.bind(("127.0.0.1", p))
        except OSError:
            continue
        finally:
            for s in pair:
                s.close()
        chosen.append(port)
        if len(chosen) == n:
            return chosen
    raise RuntimeError("no free port pairs for a Redis Cluster")


def dead_url() -> str:
    """A loopback URL where nothing listens: connections are refused."""
    return f"http://127.0.0.1:{free_port()}"


def node_entry(sim: SimNode, **extra: Any) -> dict[str, Any]:
    return {"id": sim.cfg.id, "url": sim.url, "models": list(sim.cfg.models), **extra}


@dataclass
class RouterHandle:
    url: str
    app: web.Application
    runner: web.AppRunner

    @property
    def router(self) -> Router:
        return self.app[ROUTER]


MakeSim = Callable[..., Awaitable[SimNode]]
MakeRouter = Callable[..., Awaitable[RouterHandle]]


@pytest.fixture
async def fleet() -> AsyncIterator[MakeSim]:
    sims: list[SimNode] = []

    async def make(
        id: str,
        models: tuple[str, ...] = (MODEL,),
        profile: str | Profile = "H100",
        fault: Fault | None = None,
        time_scale: float = 0.01,
        **kw: Any,
    ) -> SimNode:
        sim = SimNode(sim_config(id, list(models), profile, time_scale=time_scale, **kw), fault)
        await sim.start()
        sims.append(sim)
        return sim

    yield make
    for sim in sims:
        await sim.close()


@pytest.fixture
async def make_router() -> AsyncIterator[MakeRouter]:
    runners: list[web.AppRunner] = []

    async def make(nodes: list[dict[str, Any]], seed: int = 1, **cfg: Any) -> RouterHandle:
        # Active probes would add requests to the simulated nodes that tests count;
        # the tests of health and verification turn them on.
        cfg.setdefault("health", {"probe": False})
        config = parse_config({"nodes": nodes, **cfg})
        app = create_app(config, rng=Random(seed))
        runner = Runner(app, config)
        await runner.setup()
        port = config.listen.port if "listen" in cfg else 0
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        return RouterHandle(f"http://127.0.0.1:{runner.addresses[0][1]}", app, runner)

    yield make
    for runner in runners:
        await runner.cleanup()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Node = Callable[..., Awaitable[dict[str, Any]]]


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    """A hand-written node (a hostile one, or an engine's quirk) on a real socket:
    ``await node(handler, id="bad", **entry)`` serves chat completions with
    ``handler`` and gives its config entry."""
    runners: list[web.AppRunner] = []

    async def make(handler: Handler, id: str = "bad", **extra: Any) -> dict[str, Any]:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", handler)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        return {"id": id, "url": url, "models": [MODEL], **extra}

    yield make
    for runner in runners:
        await runner.cleanup()


StartPrometheus = Callable[[dict[str, Any]], Awaitable[str]]


@pytest.fixture
async def prometheus(tmp_path: Any) -> AsyncIterator[StartPrometheus]:
    """Start a real Prometheus on a free port with a config (files it names go in
    ``tmp_path`` too); answers its query API URL. Stopped after the test."""
    binary = shutil.which("prometheus")
    assert binary, "prometheus missing: the test command installs Debian's prometheus"
    procs: list[asyncio.subprocess.Process] = []

    async def start(config: dict[str, Any]) -> str:
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        procs.append(
            await asyncio.create_subprocess_exec(
                binary,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
        )
        return f"http://127.0.0.1:{port}/api/v1/query"

    yield start
    for proc in procs:
        proc.terminate()
        await proc.wait()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def chat(stream: bool = False, max_tokens: int = 4, **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": max_tokens,
        "stream": stream,
        **extra,
    }


@pytest.fixture
def rng() -> Random:
    return Random(42)


@dataclass
class RedisServer:
    """A private redis-server on a free loopback port, for one test."""

    port: int
    dir: str
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:  # the server answers PING once it accepts commands
            try:
                if client.ping():
                    break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.02)
        client.close()

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)


@pytest.fixture
def redis_server(tmp_path: Any) -> Iterator[RedisServer]:
    server = RedisServer(free_port(), str(tmp_path))
    server.start()
    yield server
    server.kill()
