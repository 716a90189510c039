"""Router replicas sharing fleet state through a real Redis (private, per test)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis
import redis.asyncio
import yaml

from loadtest.simnode import SimNode
from tests.conftest import (
    MODEL,
    MakeSim,
    RedisServer,
    chat,
    cluster_ports,
    free_port,
    node_entry,
)
from tests.test_cli import spawn, wait_for_line

ADMIN = {"Authorization": "Bearer admin-token"}
JOIN = {"Authorization": "Bearer join-token"}

Replica = tuple[asyncio.subprocess.Process, str]
StartReplica = Callable[..., Awaitable[Replica]]


@pytest.fixture
async def replica(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[StartReplica]:
    """Start ``ballast serve`` processes; each gets its own port and config."""
    monkeypatch.setenv("TEST_ADMIN_TOKEN", "admin-token")
    monkeypatch.setenv("TEST_JOIN_TOKEN", "join-token")
    procs: list[asyncio.subprocess.Process] = []

    async def start(
        redis_url: str | None,
        nodes: list[dict[str, Any]] | None = None,
        workers: int = 1,
        **cfg: Any,
    ) -> Replica:
        port = free_port()
        doc = {
            "listen": {"host": "127.0.0.1", "port": port},
            "nodes": nodes or [],
            "state": {"redis_url": redis_url, "timeout_s": 0.5},
            "admin": {"token_env": "TEST_ADMIN_TOKEN"},
            "registry": {
                "join_token_env": "TEST_JOIN_TOKEN",
                "allowed_networks": ["127.0.0.0/8"],
            },
            "logging": {"level": "info", "access_log": False},
            "health": {"probe": False},
            "shutdown": {"grace_s": 0},
            **cfg,
        }
        path = tmp_path / f"ballast-{port}.yaml"
        path.write_text(yaml.safe_dump(doc))
        proc = await spawn("serve", "--config", str(path), "--workers", str(workers))
        procs.append(proc)
        await wait_for_line(proc, "listening on")
        return proc, f"http://127.0.0.1:{port}"

    yield start
    for proc in procs:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            async with asyncio.timeout(20):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def register(http: aiohttp.ClientSession, router: str, sim: SimNode, **extra: Any) -> dict:
    body = {"id": sim.cfg.id, "url": sim.url, "models": list(sim.cfg.models), **extra}
    async with http.post(router + "/v1/nodes/register", json=body, headers=JOIN) as resp:
        assert resp.status == 201, await resp.text()
        return await resp.json()


async def served_by(http: aiohttp.ClientSession, router: str) -> str | None:
    async with http.post(router + "/v1/chat/completions", data=orjson.dumps(chat())) as resp:
        await resp.read()
        return resp.headers.get("x-ballast-node") if resp.status == 200 else None


async def until(check: Callable[[], Awaitable[bool]], within: float) -> float:
    """Seconds until ``check()`` (a look at another process) holds; fails after ``within``."""
    start = time.monotonic()
    async with asyncio.timeout(within):
        while not await check():  # noqa: ASYNC110 - pacing looks at another process
            await asyncio.sleep(0.01)
    return time.monotonic() - start


async def fleet_doc(http: aiohttp.ClientSession, router: str) -> dict:
    async with http.get(router + "/admin/nodes", headers=ADMIN) as resp:
        assert resp.status == 200
        return await resp.json()


async def test_node_registered_on_one_replica_is_routed_by_the_other(
    fleet: MakeSim, redis_server: RedisServer, replica: StartReplica
) -> None:
    sim = await fleet("joiner")
    _, a = await replica(redis_server.url)
    _, b = await replica(redis_server.url)
    async with aiohttp.ClientSession() as http:
        async with http.post(b + "/v1/chat/completions", data=orjson.dumps(chat())) as resp:
            assert resp.status == 404  # nobody serves the model yet
        await register(http, a, sim, gpu="RTX 4090", vram_gb=24)

        async def b_routes_to_it() -> bool:
            return await served_by(http, b) == "joiner"

        assert await until(b_routes_to_it, within=1.0) < 1.0


async def test_drain_on_one_replica_is_honoured_by_the_other(
    fleet: MakeSim, redis_server: RedisServer, replica: StartReplica
) -> None:
    one, two = await fleet("one"), await fleet("two")
    nodes = [node_entry(one), node_entry(two)]
    _, a = await replica(redis_server.url, nodes)
    _, b = await replica(redis_server.url, nodes)
    async with aiohttp.ClientSession() as http:
        async with http.post(a + "/admin/nodes/one/drain", headers=ADMIN) as resp:
            assert resp.status == 200

        async def b_sees_it_drained() -> bool:
            states = {n["id"]: n["state"] for n in (await fleet_doc(http, b))["nodes"]}
            return states["one"] == "draining"

        assert await until(b_sees_it_drained, within=1.0) < 1.0
        assert {await served_by(http, b) for _ in range(20)} == {"two"}
        async with http.delete(a + "/admin/nodes/two", headers=ADMIN) as resp:
            assert resp.status == 200

        async def b_has_no_node_left() -> bool:
            return [n["id"] for n in (await fleet_doc(http, b))["nodes"]] == ["one"]

        await until(b_has_no_node_left, within=1.0)


async def test_counts_from_both_replicas_add_up(
    fleet: MakeSim, redis_server: RedisServer, replica: StartReplica
) -> None:
    sim = await fleet("shared", time_scale=0.0)
    nodes = [node_entry(sim)]
    _, a = await replica(redis_server.url, nodes)
    _, b = await replica(redis_server.url, nodes)
    async with aiohttp.ClientSession() as http:

        async def burst(router: str) -> None:
            for _ in range(150):
                assert await served_by(http, router) == "shared"

        await asyncio.gather(*(burst(r) for r in (a, b, a, b)))  # 600 concurrent-ish requests
        r = redis_server.client()

        async def flushed() -> bool:
            total = r.hget("ballast:{fleet}:node:shared", "req")
            return total is not None and int(total) >= 600

        await until(flushed, within=5.0)
        assert int(r.hget("ballast:{fleet}:node:shared", "req")) == 600
        assert sim.requests == 600

        async def both_see_600() -> bool:
            docs = [await fleet_doc(http, x) for x in (a, b)]
            return all(d["nodes"][0]["requests"] == 600 for d in docs)

        await until(both_see_600, within=5.0)


async def test_redis_outage_loses_no_request_and_state_converges(
    fleet: MakeSim, redis_server: RedisServer, replica: StartReplica
) -> None:
    sim = await fleet("steady")
    _, a = await replica(redis_server.url, [node_entry(sim)])
    async with aiohttp.ClientSession() as http:
        statuses = []
        for i in range(200):
            if i == 50:
                redis_server.kill()
            if i == 150:
                redis_server.start()  # a new, empty Redis on the same port
            async with http.post(a + "/v1/chat/completions", data=orjson.dumps(chat())) as resp:
                statuses.append(resp.status)
            if i == 120:  # the store notices at its next sync or flush (every 0.5 s at most)

                async def degraded() -> bool:
                    async with http.get(a + "/readyz") as resp:
                        return (await resp.json())["store"] == "redis:degraded"

                await until(degraded, within=5.0)
                async with http.get(a + "/metrics") as resp:
                    text = await resp.text()
                assert 'ballast_store_up{backend="redis"} 0.0' in text
                assert "ballast_store_errors_total" in text
        assert statuses == [200] * 200

        r = redis_server.client()

        async def republished() -> bool:
            async with http.get(a + "/readyz") as resp:
                ok = (await resp.json())["store"] == "redis:ok"
            return ok and r.hget("ballast:{fleet}:node:steady", "spec") is not None

        await until(republished, within=10.0)


async def test_registration_is_guarded(
    fleet: MakeSim, redis_server: RedisServer, replica: StartReplica
) -> None:
    sim = await fleet("honest")
    _, a = await replica(redis_server.url, registry={"join_token_env": "TEST_JOIN_TOKEN"})
    body = {"id": "x", "url": sim.url, "models": [MODEL]}
    async with aiohttp.ClientSession() as http:
        for headers in ({}, {"Authorization": "Bearer nope"}):
            async with http.post(a + "/v1/nodes/register", json=body, headers=headers) as resp:
                assert resp.status == 401
        # default allowed networks: loopback, link-local and metadata are refused
        for url in (sim.url, "http://169.254.169.254/latest", "http://[::1]:80"):
            async with http.post(
                a + "/v1/nodes/register", json={**body, "url": url}, headers=JOIN
            ) as resp:
                assert resp.status == 403, url
                assert (await resp.json())["error"]["code"] == "url_not_allowed"
        assert (await fleet_doc(http, a))["nodes"] == []
        r = redis_server.client()
        assert r.keys("ballast:{fleet}:node:*") == []


async def test_heartbeats_are_per_node_and_expire(
    fleet: MakeSim, redis_server: RedisServer, replica: StartReplica
) -> None:
    sim, other = await fleet("n1"), await fleet("n2")
    _, a = await replica(redis_server.url, registry={
        "join_token_env": "TEST_JOIN_TOKEN",
        "allowed_networks": ["127.0.0.0/8"],
        "heartbeat_ttl_s": 1.0,
    })  # fmt: skip
    async with aiohttp.ClientSession() as http:
        one = await register(http, a, sim)
        two = await register(http, a, other)
        beat = {"free_vram_gb": 10.5, "gpu_util": 40, "queue_len": 2}
        forged = {"Authorization": f"Bearer {one['secret']}"}
        async with http.post(a + "/v1/nodes/n2/heartbeat", json=beat, headers=forged) as resp:
            assert resp.status == 401
        async with http.post(a + "/v1/nodes/ghost/heartbeat", json=beat, headers=forged) as resp:
            assert resp.status == 401  # as for a wrong secret: which ids exist is not told
        again = {"id": "n2", "url": sim.url, "models": [MODEL]}
        async with http.post(a + "/v1/nodes/register", json=again, headers=JOIN) as resp:
            assert resp.status == 409  # hijacking an id needs that node's secret
        own = {"Authorization": f"Bearer {two['secret']}"}
        async with http.post(a + "/v1/nodes/n2/heartbeat", json=beat, headers=own) as resp:
            assert resp.status == 200

        async def n1_gone() -> bool:
            states = {n["id"]: n for n in (await fleet_doc(http, a))["nodes"]}
            return states["n1"]["state"] == "gone"

        await until(n1_gone, within=5.0)
        async with http.post(a + "/v1/nodes/n1/heartbeat", json=beat, headers=forged) as resp:
            assert resp.status == 200 and (await resp.json())["state"] == "serving"


async def test_workers_share_one_port_state_and_metrics(
    fleet: MakeSim, redis_server: RedisServer, replica: StartReplica
) -> None:
    sim = await fleet("w", time_scale=0.0)
    _, url = await replica(redis_server.url, [node_entry(sim)], workers=2)
    connector = aiohttp.TCPConnector(force_close=True)  # new connections spread over workers
    async with aiohttp.ClientSession(connector=connector) as http:
        for _ in range(100):
            assert await served_by(http, url) == "w"
        r = redis_server.client()

        async def both_workers_reported() -> bool:
            fields = r.hkeys("ballast:{fleet}:node:w")
            return len([f for f in fields if f.startswith(b"if:")]) == 2

        await until(both_workers_reported, within=5.0)
        async with http.get(url + "/metrics") as resp:
            text = await resp.text()
        line = next(x for x in text.splitlines() if x.startswith("ballast_requests_total{"))
        assert float(line.rsplit(" ", 1)[1]) == 100  # summed over both workers

        # Per-node counters live in each worker's scoreboard: copied into the shared
        # files, any worker's scrape reports their sum, and it never goes back.
        attempts = 'ballast_upstream_attempts_total{node="w",outcome="ok"}'

        async def scrape() -> dict[str, float]:
            async with http.get(url + "/metrics") as resp:
                text = await resp.text()
            return {
                k: float(v)
                for k, _, v in (x.rpartition(" ") for x in text.splitlines())
                if k and not k.startswith("#")
            }

        async def all_attempts_counted() -> bool:
            return (await scrape()).get(attempts) == 100

        await until(all_attempts_counted, within=5.0)
        cpu = []
        for _ in range(8):
            seen = await scrape()
            assert seen[attempts] == 100
            assert "process_cpu_seconds_total" not in seen  # one process's; here misleading
            cpu.append(seen["ballast_process_cpu_seconds_total"])
        assert cpu == sorted(cpu) and cpu[0] > 0


async def test_agent_registers_and_keeps_the_node_alive(
    fleet: MakeSim, make_router: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TEST_JOIN_TOKEN", "join-token")
    sim = await fleet("gpu-box")
    r = await make_router(
        [],
        registry={
            "join_token_env": "TEST_JOIN_TOKEN",
            "allowed_networks": ["127.0.0.0/8"],
            "heartbeat_ttl_s": 2,
        },
    )
    secret_file = tmp_path / "node.secret"
    agent = await spawn(
        "agent", "--router", r.url, "--node-url", sim.url, "--id", "gpu-box",
        "--join-token", "join-token", "--gpu", "RTX 4090", "--vram-gb", "24",
        "--interval", "0.2", "--secret-file", str(secret_file),
    )  # fmt: skip
    try:
        await wait_for_line(agent, "registered gpu-box")
        node = r.router.fleet.nodes["gpu-box"]
        assert node.models == (MODEL,)  # discovered from the node's /v1/models
        assert node.gpu == "RTX 4090" and node.vram_gb == 24
        assert secret_file.read_text() and node.secret_hash
        async with aiohttp.ClientSession() as http:
            assert await served_by(http, r.url) == "gpu-box"
        first_seen = node.last_seen

        async def beating() -> bool:
            return node.last_seen > first_seen

        await until(beating, within=5.0)
    finally:
        agent.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            assert await agent.wait() == 0


async def test_a_hung_redis_hangs_nothing(
    fleet: MakeSim, redis_server: RedisServer, replica: StartReplica
) -> None:
    sim, joiner = await fleet("steady"), await fleet("late")
    _, a = await replica(redis_server.url, [node_entry(sim)], queue={"max_wait_s": 0.2})
    assert redis_server.proc is not None
    redis_server.proc.send_signal(signal.SIGSTOP)  # accepts connections, never answers
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(20):
                assert await served_by(http, a) == "steady"

            async def degraded() -> bool:
                async with http.get(a + "/readyz") as resp:
                    return (await resp.json())["store"] == "redis:degraded"

            await until(degraded, within=10.0)
            # Membership calls are bounded by state.timeout_s. A new id cannot be
            # checked for conflicts: 503. A drain applies now and reaches Redis later.
            async with asyncio.timeout(10):
                body = {"id": "late", "url": joiner.url, "models": [MODEL]}
                async with http.post(a + "/v1/nodes/register", json=body, headers=JOIN) as resp:
                    assert resp.status == 503 and resp.headers["Retry-After"] == "5"
                async with http.post(a + "/admin/nodes/steady/drain", headers=ADMIN) as resp:
                    assert resp.status == 200
            async with http.post(a + "/v1/chat/completions", data=orjson.dumps(chat())) as resp:
                assert resp.status == 503  # drained locally at once
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    r = redis_server.client()
    async with aiohttp.ClientSession() as http:

        async def recovered() -> bool:
            async with http.get(a + "/readyz") as resp:
                ok = (await resp.json())["store"] == "redis:ok"
            return ok and r.hget("ballast:{fleet}:node:steady", "state") == b"draining"

        await until(recovered, within=10.0)  # the drain was replayed into Redis


async def test_policy_swap_reaches_every_replica_without_dropping_requests(
    fleet: MakeSim, redis_server: RedisServer, replica: StartReplica
) -> None:
    sim = await fleet("p", profile="T4", time_scale=1.0)  # 25 tokens/s: a stream lasts a while
    _, a = await replica(redis_server.url, [node_entry(sim)])
    _, b = await replica(redis_server.url, [node_entry(sim)])
    async with aiohttp.ClientSession() as http:

        async def long_stream() -> bytes:
            body = orjson.dumps(chat(stream=True, max_tokens=15))
            async with http.post(a + "/v1/chat/completions", data=body) as resp:
                return await resp.read()

        in_flight = asyncio.create_task(long_stream())
        await asyncio.wait_for(sim.arrived.wait(), 5)
        bad = {"name": "fastest"}
        async with http.put(a + "/admin/policy", json=bad, headers=ADMIN) as resp:
            assert (
                resp.status == 400 and "unknown policy" in (await resp.json())["error"]["message"]
            )
        swap = {"name": "round_robin", "params": {}}
        async with http.put(a + "/admin/policy", json=swap, headers=ADMIN) as resp:
            assert resp.status == 200

        async def b_switched() -> bool:
            async with http.get(b + "/admin/policy", headers=ADMIN) as resp:
                return (await resp.json())["policy"] == "round_robin"

        assert await until(b_switched, within=1.0) < 1.0
        assert (await in_flight).endswith(b"data: [DONE]\n\n")  # not dropped by the swap


@contextlib.asynccontextmanager
async def redis_process(directory: Path, *args: str) -> AsyncIterator[None]:
    """A private ``redis-server`` (no persistence) for the duration of the block."""
    proc = await asyncio.create_subprocess_exec(
        "redis-server", *args, "--save", "", "--appendonly", "no", "--dir", str(directory),
        stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield
    finally:
        proc.terminate()
        await proc.wait()


async def redis_answers(url: str) -> bool:
    try:
        async with redis.asyncio.Redis.from_url(url) as client:
            return bool(await client.ping())
    except (redis.ConnectionError, OSError):
        return False


async def replicas_share_a_registration(
    fleet: MakeSim, replica: StartReplica, url: str | None, node_id: str, **cfg: Any
) -> None:
    """Two replicas on one store: a node registered on one is routed by the other
    within a second."""
    sim = await fleet(node_id)
    _, a = await replica(url, **cfg)
    _, b = await replica(url, **cfg)
    async with aiohttp.ClientSession() as http:
        await register(http, a, sim)

        async def b_routes_to_it() -> bool:
            return await served_by(http, b) == node_id

        assert await until(b_routes_to_it, within=1.0) < 1.0


async def test_replicas_through_redis_sentinel(
    fleet: MakeSim, redis_server: RedisServer, replica: StartReplica, tmp_path: Path
) -> None:
    port = free_port()
    conf = tmp_path / "sentinel.conf"  # sentinel rewrites its own config file
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\nsentinel monitor ballast 127.0.0.1 {redis_server.port} 1\n"
    )
    async with redis_process(tmp_path, str(conf), "--sentinel"):

        async def sentinel_knows_the_master() -> bool:
            try:
                async with redis.asyncio.Redis(port=port) as client:
                    return bool(await client.sentinel_get_master_addr_by_name("ballast"))
            except redis.ConnectionError:
                return False

        await until(sentinel_knows_the_master, within=10.0)
        state = {"sentinel": {"hosts": [f"127.0.0.1:{port}"], "service": "ballast"}}
        await replicas_share_a_registration(fleet, replica, None, "via-sentinel", state=state)
        assert redis_server.client().hget("ballast:{fleet}:node:via-sentinel", "spec")


async def test_replicas_through_redis_cluster(
    fleet: MakeSim, replica: StartReplica, tmp_path: Path
) -> None:
    ports = cluster_ports(3)
    async with contextlib.AsyncExitStack() as servers:
        for port in ports:
            d = tmp_path / str(port)
            d.mkdir()
            await servers.enter_async_context(
                redis_process(
                    d,
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    str(d / "nodes.conf"),
                )
            )

        async def all_up() -> bool:
            try:
                for port in ports:
                    async with redis.asyncio.Redis(port=port) as client:
                        await client.ping()
            except (redis.ConnectionError, OSError):
                return False
            return True

        await until(all_up, within=10.0)
        create = await asyncio.create_subprocess_exec(
            "redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
            "--cluster-replicas", "0", "--cluster-yes",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        assert await create.wait() == 0

        async def cluster_ok() -> bool:  # every node agrees the slots are served
            for port in ports:
                async with redis.asyncio.Redis(port=port) as client:
                    info = (await client.execute_command("CLUSTER", "INFO")).decode()
                if "cluster_state:ok" not in info:
                    return False
            return True

        await until(cluster_ok, within=30.0)
        url = f"redis://127.0.0.1:{ports[0]}/0"
        sim = await fleet("via-cluster")
        _, a = await replica(url, state={"redis_url": url, "cluster": True})
        _, b = await replica(url, state={"redis_url": url, "cluster": True})
        async with aiohttp.ClientSession() as http:

            async def both_connected() -> bool:
                for r in (a, b):
                    async with http.get(r + "/readyz") as resp:
                        if (await resp.json())["store"] != "redis:ok":
                            return False
                return True

            await until(both_connected, within=10.0)
            await register(http, a, sim)

            async def b_routes_to_it() -> bool:
                return await served_by(http, b) == "via-cluster"

            assert await until(b_routes_to_it, within=1.0) < 1.0


async def test_replicas_over_tls_rediss(
    fleet: MakeSim, replica: StartReplica, tmp_path: Path
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    made = await asyncio.create_subprocess_exec(
        "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
        "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
        "-addext", "subjectAltName=IP:127.0.0.1",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert await made.wait() == 0
    port = free_port()
    url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={cert}"
    async with redis_process(
        tmp_path, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
        "--tls-cert-file", str(cert), "--tls-key-file", str(key),
        "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
    ):  # fmt: skip
        await until(lambda: redis_answers(url), within=10.0)
        await replicas_share_a_registration(fleet, replica, url, "via-tls")


async def test_replicas_over_a_unix_socket(
    fleet: MakeSim, replica: StartReplica, tmp_path: Path
) -> None:
    path = tmp_path / "redis.sock"
    url = f"unix://{path}?db=0"
    async with redis_process(tmp_path, "--port", "0", "--unixsocket", str(path)):
        await until(lambda: redis_answers(url), within=10.0)
        await replicas_share_a_registration(fleet, replica, url, "via-unix")


async def test_replicas_split_the_probes_and_take_over(
    fleet: MakeSim, redis_server: RedisServer, replica: StartReplica
) -> None:
    """Each node is probed by one live replica (rendezvous over the replicas that
    heartbeat in Redis), so probe load per node does not grow with the number of
    routers; when a replica dies the survivor takes its nodes over."""
    sims = [await fleet(f"n{i}", models=(f"m{i}",)) for i in range(8)]
    health = {"probe_interval_s": 0.3, "verified_probe_interval_s": 0.3, "challenges": False}
    nodes = [node_entry(s) for s in sims]
    a_proc, a = await replica(redis_server.url, nodes, health=health)
    _, b = await replica(redis_server.url, nodes, health=health)
    async with aiohttp.ClientSession() as http:

        async def both_routable_and_known() -> bool:
            for url in (a, b):
                async with http.get(url + "/readyz?verbose", headers=ADMIN) as resp:
                    doc = await resp.json()
                if doc["routable_nodes"] != len(sims) or doc["routers"] != 2:
                    return False
            return True

        await until(both_routable_and_known, within=15.0)

    async def probed_again(times: int) -> bool:
        return all(sum(s.callers.values()) >= times for s in sims)

    for times in (1, 3):  # the first round may hold probes sent before both knew
        for sim in sims:
            sim.callers.clear()
        await until(lambda n=times: probed_again(n), within=15.0)
    owners = {s.cfg.id: set(s.callers) for s in sims}
    assert all(len(o) == 1 for o in owners.values()), owners  # one prober per node

    a_proc.kill()  # no goodbye: its share moves once its heartbeat is stale
    await a_proc.wait()
    for sim in sims:
        sim.callers.clear()

    async def survivor_probes_all() -> bool:
        return all(s.callers for s in sims)

    await until(survivor_probes_all, within=15.0)
    survivors = {c for s in sims for c in s.callers}
    assert len(survivors) == 1  # every node, including the dead replica's, by b
