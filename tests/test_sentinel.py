"""Redis behind Sentinel, as the ``ha`` overlay runs it: real Debian ``redis-server``
processes (a master with AOF, two replicas) and three real ``redis-sentinel``
processes on private loopback ports, two routers using them through
``state.sentinel``. The master is killed (SIGKILL) under traffic; Sentinel promotes
a replica and the routers follow it without a failed request or a lost count."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from asyncio.subprocess import DEVNULL, Process
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from loadtest.common import free_port
from tests.conftest import MakeRouter, MakeSim, RouterHandle, chat, node_entry
from tests.test_supply import until

SCRIPT = Path(__file__).resolve().parent.parent / "deploy/k8s/overlays/ha/redis-ha.sh"
SERVICE = "ballast"  # the script's default master name, as the ha overlay's config has it
ADMIN = {"Authorization": "Bearer admin-token"}
DOWN_AFTER_MS = 1000  # Sentinel calls the master down after this much silence
FAILOVER_TIMEOUT_MS = 5000


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} missing: the test command installs it (see .ci/test)"
    return path


@dataclass
class Sentinelled:
    """Redis servers and the sentinels watching them, by port, each started by the
    ``ha`` overlay's entry script (``redis-ha.sh``) as a pod would be, with the
    script's names and timings overridden for loopback."""

    dir: Path
    redis_ports: list[int]
    sentinel_ports: list[int]
    servers: dict[int, Process] = field(default_factory=dict)
    sentinels: dict[int, Process] = field(default_factory=dict)

    @property
    def hosts(self) -> list[str]:
        return [f"127.0.0.1:{port}" for port in self.sentinel_ports]

    async def _run(self, role: str, port: int, **env: str) -> Process:
        env = {
            **os.environ,
            "REDIS_HOSTS": " ".join(f"127.0.0.1:{p}" for p in self.redis_ports),
            "SENTINEL_HOSTS": " ".join(self.hosts),
            "SELF": f"127.0.0.1:{port}",
            "DOWN_AFTER_MS": str(DOWN_AFTER_MS),
            "FAILOVER_TIMEOUT_MS": str(FAILOVER_TIMEOUT_MS),
            **env,
        }
        return await asyncio.create_subprocess_exec(
            "sh", str(SCRIPT), role, "--bind", "127.0.0.1", env=env, stdout=DEVNULL, stderr=DEVNULL
        )

    async def start_redis(self, port: int) -> None:
        """One Redis "pod" (its data directory kept across restarts, as its volume)."""
        data = self.dir / f"redis-{port}"
        data.mkdir(exist_ok=True)
        self.servers[port] = await self._run("redis", port, DATA_DIR=str(data))
        await until(lambda: answers(port), within=10)

    async def start_sentinel(self, port: int) -> None:
        conf = self.dir / f"sentinel-{port}"  # Sentinel rewrites its config: its own dir
        conf.mkdir()
        self.sentinels[port] = await self._run("sentinel", port, CONF_DIR=str(conf))

    async def kill(self, port: int) -> None:
        proc = self.servers.pop(port)
        proc.kill()  # SIGKILL: no shutdown, no last AOF write, no goodbye to replicas
        await proc.wait()

    async def masters(self) -> set[int]:
        """The master's port according to each sentinel."""
        ports = set()
        for port in self.sentinel_ports:
            client = aioredis.Redis(port=port, socket_timeout=1)
            try:
                _, master = await client.sentinel_get_master_addr_by_name(SERVICE)
                ports.add(int(master))
            finally:
                await client.aclose()
        return ports


async def info(port: int, section: str) -> dict[str, Any]:
    client = aioredis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1)
    try:
        return await client.info(section)
    except (aioredis.ConnectionError, aioredis.TimeoutError):
        return {}
    finally:
        await client.aclose()


async def answers(port: int) -> bool:
    return bool(await info(port, "server"))


@pytest.fixture
async def sentinelled(tmp_path: Path) -> AsyncIterator[Sentinelled]:
    """Started as the StatefulSets start them (pod 0 first) and settled: both
    replicas in sync, every sentinel knowing the two replicas and the two other
    sentinels (what a failover needs)."""
    for name in ("redis-server", "redis-sentinel", "redis-cli"):
        tool(name)
    ha = Sentinelled(tmp_path, [free_port() for _ in range(3)], [free_port() for _ in range(3)])
    master, *replicas = ha.redis_ports
    try:
        for port in ha.redis_ports:
            await ha.start_redis(port)
        for port in ha.sentinel_ports:
            await ha.start_sentinel(port)

        async def settled() -> bool:
            if (await info(master, "replication")).get("connected_slaves") != 2:
                return False
            for port in replicas:
                if (await info(port, "replication")).get("master_link_status") != "up":
                    return False
            for port in ha.sentinel_ports:
                client = aioredis.Redis(port=port, socket_timeout=1)
                try:
                    state = await client.sentinel_master(SERVICE)
                except (aioredis.ConnectionError, aioredis.TimeoutError, aioredis.ResponseError):
                    return False
                finally:
                    await client.aclose()
                if state["num-slaves"] != 2 or state["num-other-sentinels"] != 2:
                    return False
            return True

        await until(settled, within=30)  # sentinels meet through hellos every 2 s
        assert (await info(master, "persistence"))["aof_enabled"] == 1
        yield ha
    finally:
        for proc in (*ha.servers.values(), *ha.sentinels.values()):
            proc.kill()
            await proc.wait()


async def usage(http: aiohttp.ClientSession, r: RouterHandle) -> int | None:
    """Requests counted for key "team" over all replicas, or None while the store
    cannot answer."""
    async with http.get(r.url + "/admin/usage?key=team", headers=ADMIN) as resp:
        if resp.status != 200:
            return None
        return sum(row["requests"] for row in (await resp.json())["data"])


async def test_sentinel_failover_under_traffic_loses_no_request_key_or_count(
    sentinelled: Sentinelled,
    fleet: MakeSim,
    make_router: MakeRouter,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TEST_ADMIN_TOKEN", "admin-token")
    (old_master,) = await sentinelled.masters()
    sim = await fleet("a")
    common: dict[str, Any] = {
        "state": {"sentinel": {"hosts": sentinelled.hosts, "service": SERVICE}},
        "admin": {"token_env": "TEST_ADMIN_TOKEN"},
        "auth": {"required": True},
    }
    routers = [await make_router([node_entry(sim)], **common) for _ in range(2)]
    a, b = routers

    async def create_key(r: RouterHandle, name: str) -> dict[str, str]:
        async with http.post(r.url + "/admin/keys", json={"name": name}, headers=ADMIN) as resp:
            assert resp.status == 201, await resp.text()
            return await resp.json()

    key = (await create_key(a, "team"))["key"]
    done: list[float] = []  # when each request with key "team" was answered 200

    async def status(r: RouterHandle, key_: str) -> int:
        headers = {"Authorization": f"Bearer {key_}"}
        async with http.post(
            r.url + "/v1/chat/completions", data=orjson.dumps(chat()), headers=headers
        ) as resp:
            await resp.read()
        if resp.status == 200 and key_ == key:
            done.append(time.monotonic())
        return resp.status

    async def served_everywhere(k: str) -> bool:
        return all([await status(r, k) == 200 for r in routers])

    await until(lambda: served_everywhere(key), within=5)

    # Traffic on both routers from start to end; every failure is kept.
    failed: list[str] = []
    stop = asyncio.Event()

    async def traffic(r: RouterHandle) -> None:
        while not stop.is_set():
            try:
                code = await status(r, key)
            except aiohttp.ClientError as e:
                failed.append(repr(e))
                continue
            if code != 200:
                failed.append(f"{r.url}: {code}")

    clients = [asyncio.create_task(traffic(r)) for r in routers for _ in range(2)]
    try:

        async def counted(at_least: int) -> bool:
            return all([(await usage(http, r) or 0) >= at_least for r in routers])

        await until(lambda: counted(50), within=20)  # flushed to the master
        before = max([await usage(http, r) or 0 for r in routers])

        await sentinelled.kill(old_master)

        async def promoted() -> bool:
            masters = await sentinelled.masters()
            if len(masters) != 1 or old_master in masters:
                return False
            return (await info(next(iter(masters)), "replication")).get("role") == "master"

        await until(promoted, within=30)
        (new_master,) = await sentinelled.masters()
        promoted_wall = time.time()
        reads: list[int] = []  # every usage read after the failover

        async def both_write_to_new_master() -> bool:
            # Each router beats into {fleet}:routers every second: beats newer than
            # the promotion prove it found the new master through Sentinel.
            client = aioredis.Redis(port=new_master, socket_timeout=1)
            try:
                live = await client.zrangebyscore("ballast:{fleet}:routers", promoted_wall, "+inf")
            finally:
                await client.aclose()
            for r in routers:
                if (n := await usage(http, r)) is not None:
                    reads.append(n)
            return len(live) == 2

        await until(both_write_to_new_master, within=15)

        # Keys made and used across the failover: the old one on both routers, a
        # new one written through b (to the new master) and honoured by a.
        assert await served_everywhere(key)
        fresh = (await create_key(b, "team-after"))["key"]
        await until(lambda: served_everywhere(fresh), within=5)

        # The old master's pod comes back (its AOF kept): the entry script asks the
        # sentinels and starts it as a replica of the new master, never as a second
        # master, and it catches up with what was written since.
        await sentinelled.start_redis(old_master)
        returned = await info(old_master, "replication")
        assert returned["role"] == "slave" and returned["master_port"] == new_master
        marker = aioredis.Redis(port=new_master, socket_timeout=1)
        back = aioredis.Redis(port=old_master, socket_timeout=1)
        try:
            await marker.set("test:written-after-failover", "1")
            await until(lambda: back.exists("test:written-after-failover"), within=10)
        finally:
            await marker.aclose()
            await back.aclose()
        after_failover = len(done)
        await until(lambda: len(done) >= after_failover + 50, within=20)
    finally:
        stop.set()
        await asyncio.gather(*clients)

    assert failed == []  # the request path never waited on Redis
    sent = len(done)
    assert sent > 100

    async def all_counted() -> bool:
        now = [await usage(http, r) for r in routers]
        reads.extend(n for n in now if n is not None)
        return all(n is not None and n >= sent for n in now)

    await until(all_counted, within=10)  # nothing lost
    assert min(reads) >= before  # usage never read lower than before the failover
    # A batch the master applied but whose answer the kill cut off is sent again
    # (counted twice rather than lost): only requests answered just before the kill
    # can be in it.
    final = [await usage(http, r) for r in routers]
    assert final[0] == final[1]
    # Counted twice at most: the usage of flushes that failed unanswered and were sent again.
    retried = sum(r.router.store.usage_retried for r in routers)  # type: ignore[attr-defined]
    assert sent <= final[0] <= sent + retried  # type: ignore[operator]
