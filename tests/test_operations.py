"""Operating a router: readiness, graceful drain on SIGTERM, and the CLI's errors."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from tests.conftest import MakeRouter, MakeSim, RedisServer, chat, free_port, node_entry
from tests.test_cli import run, spawn, stop, wait_for_line

ADMIN = {"Authorization": "Bearer admin-token"}


def write_config(tmp_path: Path, nodes: list[dict[str, Any]], **extra: Any) -> tuple[str, Path]:
    port = free_port()
    path = tmp_path / "ballast.yaml"
    doc = {
        "listen": {"host": "127.0.0.1", "port": port},
        "nodes": nodes,
        "shutdown": {"grace_s": 0},
        **extra,
    }
    path.write_text(yaml.safe_dump(doc))
    return f"http://127.0.0.1:{port}", path


async def read_stream(resp: aiohttp.ClientResponse) -> list[bytes]:
    """The SSE events of a streamed answer."""
    body = await resp.read()
    return [e for e in body.split(b"\n\n") if e.strip()]


async def test_sigterm_drains_without_failing_a_request(fleet: MakeSim, tmp_path: Path) -> None:
    """Clients behind a load balancer that follows /readyz see no failure across a
    SIGTERM: requests keep being accepted while readiness fails, and streams that
    were running finish."""
    sims = [await fleet(f"n{i}", time_scale=1.0) for i in range(2)]
    url, path = write_config(
        tmp_path, [node_entry(s) for s in sims], shutdown={"grace_s": 1.0, "drain_s": 20}
    )
    proc = await spawn("serve", "--config", str(path))
    outcomes: list[str] = []
    balancer_ready = asyncio.Event()
    balancer_ready.set()
    saw_draining = asyncio.Event()
    flowing = asyncio.Event()  # a dozen answers are in and streams are open
    try:
        await wait_for_line(proc, "listening on")

        async def balancer(http: aiohttp.ClientSession) -> None:
            """Polls readiness as a load balancer does, and takes the router out."""
            while True:
                async with http.get(url + "/readyz") as resp:
                    doc = await resp.json()
                if resp.status == 503:
                    assert doc["status"] == "draining"
                    balancer_ready.clear()
                    saw_draining.set()
                    return
                await asyncio.sleep(0.05)

        async def client(i: int, http: aiohttp.ClientSession) -> None:
            stream = i % 2 == 0
            while balancer_ready.is_set():
                body = orjson.dumps(chat(stream=stream, max_tokens=60 if stream else 4))
                async with http.post(url + "/v1/chat/completions", data=body) as resp:
                    if resp.status != 200:
                        outcomes.append(f"status {resp.status}")
                    elif stream:
                        events = await read_stream(resp)
                        done = events[-1] == b"data: [DONE]"
                        outcomes.append("ok" if done else f"cut: {events[-1][:200]!r}")
                    else:
                        await resp.read()
                        outcomes.append("ok")
                if len(outcomes) >= 12:
                    flowing.set()

        async with aiohttp.ClientSession() as http:
            lb = asyncio.create_task(balancer(http))
            clients = [asyncio.create_task(client(i, http)) for i in range(6)]
            await flowing.wait()
            proc.send_signal(signal.SIGTERM)
            await lb
            await asyncio.gather(*clients)
            before = len(outcomes)
            assert saw_draining.is_set()
        async with asyncio.timeout(30):
            assert await proc.wait() == 0
        assert before >= 12
        assert outcomes == ["ok"] * len(outcomes)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_stream_longer_than_the_drain_ends_with_an_error_event(
    fleet: MakeSim, tmp_path: Path
) -> None:
    sim = await fleet("slow", profile="T4", time_scale=1.0)  # 25 tokens/s
    url, path = write_config(tmp_path, [node_entry(sim)], shutdown={"grace_s": 0.2, "drain_s": 1.0})
    proc = await spawn("serve", "--config", str(path))
    try:
        await wait_for_line(proc, "listening on")
        async with aiohttp.ClientSession() as http:
            body = orjson.dumps(chat(stream=True, max_tokens=2000))
            async with http.post(url + "/v1/chat/completions", data=body) as resp:
                assert resp.status == 200
                await resp.content.readuntil(b"\n\n")  # the stream has begun
                proc.send_signal(signal.SIGTERM)
                events = await read_stream(resp)
        error = orjson.loads(events[-1].removeprefix(b"data: "))
        assert error["error"]["code"] == "router_stopped"
        async with asyncio.timeout(30):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_ready_without_supply_and_during_a_store_outage(
    fleet: MakeSim,
    make_router: MakeRouter,
    http: aiohttp.ClientSession,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Readiness is this process's, not the fleet's or the store's: a router with no
    routable node, or with its store down, stays in the Service and answers
    503 with Retry-After itself; `?verbose` shows the supply (to the admin token)."""
    monkeypatch.setenv("T_ADMIN", "admin-token")
    r = await make_router([], state={"redis_url": redis_server.url, "timeout_s": 0.2})
    async with http.get(r.url + "/readyz") as resp:
        assert resp.status == 200
        assert (await resp.json())["routable_nodes"] == 0
    sim = await fleet("a")
    r2 = await make_router(
        [node_entry(sim)],
        state={"redis_url": redis_server.url, "timeout_s": 0.2},
        admin={"token_env": "T_ADMIN"},
    )
    redis_server.kill()
    async with http.post(r2.url + "/v1/chat/completions", data=orjson.dumps(chat())) as resp:
        assert resp.status == 200
    for _ in range(100):
        async with http.get(r2.url + "/readyz?verbose", headers=ADMIN) as resp:
            doc = await resp.json()
        if doc["store"] == "redis:degraded":
            break
        await asyncio.sleep(0.05)
    assert resp.status == 200 and doc["status"] == "ready"
    assert doc["store"] == "redis:degraded"
    assert doc["models"] == {"tiny-llama": {"nodes": 1, "routable": 1}}


async def test_router_answers_say_so(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    r = await make_router([node_entry(await fleet("a"))])
    async with http.get(r.url + "/v1/models") as resp:
        assert resp.headers["x-ballast-node"] == "ballast"
    async with http.post(r.url + "/v1/chat/completions", data=b"{") as resp:
        assert resp.status == 400
        assert resp.headers["x-ballast-node"] == "ballast"


def test_check_config_builds_the_policy(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"policy": {"name": "score", "params": {"no_such": 1}}}))
    out = run("check-config", str(path))
    assert out.returncode == 2, out
    assert "policy.params.no_such: unknown parameter" in out.stderr
    assert "Traceback" not in out.stderr
    path.write_text(yaml.safe_dump({"state": {"sentinel": {"hosts": ["127.0.0.1:1"]}}}))
    out = run("check-config", str(path))
    assert out.returncode == 0 and "state redis sentinel" in out.stdout
    out = run("--version")
    assert out.returncode == 0 and out.stdout.startswith("ballast ")


async def test_busy_port_is_one_line(fleet: MakeSim, tmp_path: Path) -> None:
    url, path = write_config(tmp_path, [node_entry(await fleet("a"))])
    first = await spawn("serve", "--config", str(path))
    try:
        await wait_for_line(first, "listening on")
        port = url.rsplit(":", 1)[1]
        for args in (
            ("serve", "--config", str(path)),
            ("serve", "--config", str(path), "--workers", "2"),
            ("demo", "--port", port),
        ):
            out = run(*args)
            assert out.returncode == 1, out
            lines = out.stderr.strip().splitlines()
            assert len(lines) == 1 and "cannot listen on" in lines[0], out.stderr
            assert "--port" in lines[0]
        assert await stop(first, signal.SIGTERM) == 0
    finally:
        if first.returncode is None:
            first.kill()
            await first.wait()


async def test_sighup_names_what_needs_a_restart(fleet: MakeSim, tmp_path: Path) -> None:
    _, path = write_config(tmp_path, [node_entry(await fleet("a"))])
    proc = await spawn("serve", "--config", str(path))
    try:
        await wait_for_line(proc, "listening on")
        doc = yaml.safe_load(path.read_text())
        doc["policy"] = {"name": "round_robin"}
        doc["timeouts"] = {"total_s": 30}
        path.write_text(yaml.safe_dump(doc))
        proc.send_signal(signal.SIGHUP)
        line = await wait_for_line(proc, "reloaded")
        assert "policy round_robin applied" in line
        assert "applied only after a restart: timeouts" in line
        assert await stop(proc, signal.SIGTERM) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
