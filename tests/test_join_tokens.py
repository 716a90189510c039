"""``ballast agent`` saying what its node is, and scoped join tokens (router.join_tokens).

Everything runs for real: agents and ``ballast`` commands as subprocesses,
routers on loopback sockets, simulated nodes, and a private Redis shared by two
``ballast serve`` processes.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from loadtest.common import free_port
from loadtest.simnode import SimNode
from tests.conftest import MODEL, MakeRouter, MakeSim, RedisServer, dead_url
from tests.test_cli import BALLAST, spawn, wait_for_line
from tests.test_supply import until

ADMIN_TOKEN = "admin-token"
SHARED_TOKEN = "shared-join-token"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
REGISTRY = {"join_token_env": "TEST_JOIN_TOKEN", "allowed_networks": ["127.0.0.0/8"]}


@pytest.fixture(autouse=True)
def _tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_ADMIN_TOKEN", ADMIN_TOKEN)
    monkeypatch.setenv("TEST_JOIN_TOKEN", SHARED_TOKEN)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def cli(*args: str) -> tuple[int, str, str]:
    """``ballast ARGS`` to its end: (exit status, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *BALLAST, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def admin_cli(r: str, *args: str) -> tuple[int, str, str]:
    return await cli(*args, "--router", r, "--admin-token", ADMIN_TOKEN)


async def register(
    http: aiohttp.ClientSession, router: str, token: str, sim: SimNode, **extra: Any
) -> tuple[int, dict[str, Any]]:
    body = {"id": sim.cfg.id, "url": sim.url, "models": list(sim.cfg.models), **extra}
    async with http.post(router + "/v1/nodes/register", json=body, headers=bearer(token)) as r:
        return r.status, await r.json()


async def admin(
    http: aiohttp.ClientSession, router: str, path: str, method: str = "GET", body: Any = None
) -> tuple[int, Any]:
    async with http.request(method, router + path, json=body, headers=ADMIN) as resp:
        return resp.status, await resp.json()


async def nodes_of(http: aiohttp.ClientSession, router: str) -> dict[str, dict[str, Any]]:
    status, doc = await admin(http, router, "/admin/nodes")
    assert status == 200
    return {n["id"]: n for n in doc["nodes"]}


def agent_args(r: str, sim: SimNode, token: str, *extra: str) -> list[str]:
    return [
        "agent", "--router", r, "--node-url", sim.url, "--id", sim.cfg.id,
        "--join-token", token, "--interval", "0.2", *extra,
    ]  # fmt: skip


async def stop_agent(agent: asyncio.subprocess.Process) -> str:
    """SIGTERM the agent; what it printed after the lines already read."""
    agent.send_signal(signal.SIGTERM)
    assert agent.stdout is not None
    async with asyncio.timeout(20):
        rest = await agent.stdout.read()
        assert await agent.wait() == 0
    return rest.decode()


# -- the agent says what its node is -------------------------------------------------


async def test_agent_node_lands_in_its_pool_with_its_price_and_engine(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """Labels from the agent's flags and file reach the router (pools trust them
    here), in the first registration and in the one after the router forgot it."""
    sim = await fleet("spot-box")
    r = await make_router(
        [],
        registry=REGISTRY,
        admin={"token_env": "TEST_ADMIN_TOKEN"},
        pools={"order": ["reserved", "spot"], "trust_joined_labels": True},
    )
    claims = tmp_path / "node.yaml"
    claims.write_text(
        yaml.safe_dump(
            {"labels": {"pool": "reserved", "rack": 7}, "price_per_hour": 1.5,
             "region": "eu-west", "max_concurrency": 4}
        )
    )  # fmt: skip
    agent = await spawn(
        *agent_args(
            r.url, sim, SHARED_TOKEN, "--file", str(claims), "--label", "pool=spot",
            "--price-per-mtok", "0.2", "--engine", "llamacpp",
        )
    )  # fmt: skip
    try:
        await wait_for_line(agent, "registered spot-box")
        node = r.router.fleet.nodes["spot-box"]
        assert node.pool is not None and node.pool.name == "spot"  # the flag beat the file
        assert node.price_per_mtok == 0.2 and node.price_per_hour == 1.5
        assert node.engine == "llamacpp" and node.max_concurrency == 4
        assert node.labels["region"] == "eu-west" and node.labels["rack"] == "7"
        row = (await nodes_of(http, r.url))["spot-box"]
        assert row["pool"] == "spot" and row["price_per_mtok"] == 0.2
        assert row["engine"] == "llamacpp" and row["join_token"] == "shared"
        code, out, _ = await admin_cli(r.url, "nodes")
        header, line = out.splitlines()[:2]
        assert code == 0 and "TOKEN" in header.split() and "PRICE" in header.split()
        assert "shared" in line.split() and "0.2/Mtok" in line.split()

        # Forgotten by the router: the agent registers again, saying the same.
        assert (await admin(http, r.url, "/admin/nodes/spot-box", "DELETE"))[0] == 200
        await wait_for_line(agent, "registered spot-box")
        again = r.router.fleet.nodes["spot-box"]
        assert again is not node and again.pool is not None and again.pool.name == "spot"
        assert again.price_per_mtok == 0.2 and again.engine == "llamacpp"
    finally:
        await stop_agent(agent)


async def test_invalid_agent_input_exits_2_with_one_line(tmp_path: Path) -> None:
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("labels: [unclosed\n")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("price_per_mtok: 0.1\nprise_per_hour: 2\n")
    nested = tmp_path / "nested.yaml"
    nested.write_text("labels: {pool: {deep: 1}}\n")
    base = ["agent", "--router", dead_url(), "--node-url", dead_url(), "--join-token", "t"]
    cases = {
        ("--price-per-mtok", "-1"): "price_per_mtok (--price-per-mtok)",
        ("--price-per-hour", "cheap"): "price_per_hour (--price-per-hour)",
        ("--engine", "warp-drive"): "unknown engine 'warp-drive'",
        ("--label", "spot"): "give it as key=value",
        ("--label", "bad key=1"): "label key 'bad key'",
        ("--max-concurrency", "0"): "label max_concurrency: must be a number",
        ("--label", "price_per_mtok=free"): "label price_per_mtok: must be a number",
        ("--gpus", "two"): "gpus (--gpus)",
        ("--file", str(bad_yaml)): "not valid YAML (line 2)",
        ("--file", str(unknown)): "unknown key 'prise_per_hour'",
        ("--file", str(nested)): "label pool: must be a string or a number",
        ("--file", str(tmp_path / "missing.yaml")): "cannot read",
    }
    results = await asyncio.gather(*(cli(*base, *args) for args in cases))
    for (args, expected), (code, out, err) in zip(cases.items(), results, strict=True):
        lines = err.strip().splitlines()
        assert code == 2 and out == "", (args, code, err)
        assert len(lines) == 1 and lines[0].startswith("ballast agent: "), (args, err)
        assert expected in lines[0], (args, lines[0])
    code, _, err = await cli("agent", "--router", dead_url(), "--node-url", dead_url())
    assert code == 2 and "--join-token" in err and len(err.strip().splitlines()) == 1


# -- scoped join tokens on one router ------------------------------------------------


async def test_scoped_tokens_through_the_cli_and_the_admin_api(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    """Create, list and revoke; a token's models, pool, node count and expiry hold
    at registration; the shared join token keeps working."""
    sims = {n: await fleet(n) for n in ("acme-1", "acme-2", "other-model", "beta-1", "plain")}
    other = await fleet("wide", models=(MODEL, "big-model"))
    r = await make_router(
        [],
        registry=REGISTRY,
        admin={"token_env": "TEST_ADMIN_TOKEN"},
        pools={"order": ["spot", "reserved"]},  # joined nodes' own labels not trusted
    )
    code, out, err = await admin_cli(
        r.url, "tokens", "create", "--name", "acme", "--models", MODEL, "--pool", "reserved",
        "--max-nodes", "1", "--expires-in", "30d",
    )  # fmt: skip
    acme = out.strip()
    assert code == 0 and acme.startswith("jt-bal-") and "shown once" in err
    status, made = await admin(http, r.url, "/admin/join-tokens", "POST", {"name": "beta"})
    assert status == 201 and made["token"].startswith("jt-bal-") and "hash" not in made
    beta = made["token"]
    status, _ = await admin(
        http, r.url, "/admin/join-tokens", "POST", {"name": "old", "expires_at": time.time() - 1}
    )
    assert status == 201
    status, made = await admin(
        http, r.url, "/admin/join-tokens", "POST", {"name": "old", "models": [MODEL]}
    )
    assert status == 409 and made["error"]["code"] == "join_token_exists"
    for bad in (
        {"name": "x", "pool": "nowhere"},
        {"name": "shared"},
        {"name": "x", "max_nodes": 0},
    ):
        assert (await admin(http, r.url, "/admin/join-tokens", "POST", bad))[0] == 400

    # Models, pool (the operator's word over the node's claim), max nodes.
    status, doc = await register(http, r.url, acme, sims["acme-1"], labels={"pool": "spot"})
    assert status == 201, doc
    status, doc = await register(http, r.url, acme, other)
    assert status == 403 and doc["error"]["code"] == "join_token_models"
    assert "'big-model' is not allowed by join token acme" in doc["error"]["message"]
    status, doc = await register(http, r.url, acme, sims["acme-2"])
    assert status == 429 and doc["error"]["code"] == "join_token_full"
    node = r.router.fleet.nodes["acme-1"]
    assert node.join_token == "acme" and node.labels["pool"] == "reserved"
    assert node.pool is not None and node.pool.name == "reserved"
    status, doc = await register(http, r.url, beta, sims["beta-1"], labels={"pool": "reserved"})
    assert status == 201
    beta_node = r.router.fleet.nodes["beta-1"]
    assert beta_node.pool is not None and beta_node.pool.name == "spot"  # its claim: untrusted
    status, doc = await register(http, r.url, SHARED_TOKEN, sims["plain"])
    assert status == 201 and r.router.fleet.nodes["plain"].join_token == "shared"
    for wrong in ("jt-bal-" + "x" * 43, "nonsense", ""):
        status, doc = await register(http, r.url, wrong, sims["acme-2"])
        assert status == 401 and doc["error"]["code"] == "invalid_join_token"

    # Expiry: "old" was made already expired.
    code, out, _ = await admin_cli(r.url, "tokens", "list")
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert code == 0 and out.split()[:4] == ["NAME", "ID", "PREFIX", "STATE"]
    assert rows["acme"][3] == "active" and rows["acme"][4] == MODEL
    assert rows["acme"][5:8] == ["reserved", "1", "1"]
    assert rows["old"][3] == "expired" and rows["shared"][6] == "1"
    assert acme not in out and beta not in out
    status, listed = await admin(http, r.url, "/admin/join-tokens")
    assert status == 200 and all("hash" not in t and "token" not in t for t in listed["data"])
    assert acme not in str(listed) and beta not in str(listed)

    # Which token registered each node: /admin/nodes, ballast nodes, the status page.
    rows_by_id = await nodes_of(http, r.url)
    assert {i: n["join_token"] for i, n in rows_by_id.items()} == {
        "acme-1": "acme", "beta-1": "beta", "plain": "shared",
    }  # fmt: skip
    status, page = await admin(http, r.url, "/admin/status")
    assert {n["id"]: n["join_token"] for n in page["nodes"]}["acme-1"] == "acme"
    code, out, _ = await admin_cli(r.url, "nodes")
    token_col = out.splitlines()[0].split().index("TOKEN")
    assert code == 0 and any(
        line.split()[0] == "acme-1" and "acme" in line.split()[token_col - 1 :]
        for line in out.splitlines()[1:]
    )

    # Revoke: its node drained and forgotten, its heartbeats and registrations refused.
    status, doc = await admin(http, r.url, "/admin/join-tokens", "POST", {"name": "gamma"})
    gamma = doc["token"]
    status, doc = await register(http, r.url, gamma, sims["acme-2"])
    assert status == 201
    secret = doc["secret"]
    code, out, err = await admin_cli(r.url, "tokens", "revoke", "gamma")
    assert code == 0 and "revoked gamma" in out and "1 node(s) drained and forgotten" in out
    assert "acme-2" not in r.router.fleet.nodes
    async with http.post(
        r.url + "/v1/nodes/acme-2/heartbeat", json={}, headers=bearer(secret)
    ) as resp:
        assert resp.status == 401
    status, doc = await register(http, r.url, gamma, sims["acme-2"])
    assert status == 401
    code, out, err = await admin_cli(r.url, "tokens", "revoke", "gamma")
    assert code == 1 and "HTTP 404" in err and len(err.strip().splitlines()) == 1
    code, out, _ = await admin_cli(r.url, "tokens", "list")
    assert [line.split()[3] for line in out.splitlines() if line.startswith("gamma ")] == [
        "revoked"
    ]
    status, doc = await admin(http, r.url, "/admin/join-tokens/shared", "DELETE")
    assert status == 400
    assert set(r.router.fleet.nodes) == {"acme-1", "beta-1", "plain"}
    # A token may be minted again under a revoked one's name.
    status, doc = await admin(http, r.url, "/admin/join-tokens", "POST", {"name": "gamma"})
    assert status == 201
    status, doc = await register(http, r.url, doc["token"], sims["acme-2"])
    assert status == 201 and r.router.fleet.nodes["acme-2"].join_token == "gamma"


async def test_expired_token_refuses_joining_and_keeps_nodes_in(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    """Expiry ends joining, not the membership of nodes already in."""
    a, b = await fleet("early"), await fleet("late")
    r = await make_router([], registry=REGISTRY, admin={"token_env": "TEST_ADMIN_TOKEN"})
    status, doc = await admin(http, r.url, "/admin/join-tokens", "POST", {"name": "brief"})
    token, tid = doc["token"], doc["id"]
    status, joined = await register(http, r.url, token, a)
    assert status == 201
    # The operator moves its expiry to the past (as a record the store holds).
    record = dict(r.router.membership.tokens.by_id[tid].record)
    await r.router.store.put_join_token({**record, "expires_at": time.time() - 1})
    status, doc = await register(http, r.url, token, b)
    assert status == 401 and doc["error"]["code"] == "expired_join_token"
    async with http.post(
        r.url + "/v1/nodes/early/heartbeat", json={}, headers=bearer(joined["secret"])
    ) as resp:
        assert resp.status == 200
    assert "early" in r.router.fleet.nodes


async def test_scoped_tokens_alone_open_registration(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    """Without a shared join token, registration is off until a token is minted."""
    sim = await fleet("solo")
    registry = {"allowed_networks": ["127.0.0.0/8"]}
    r = await make_router([], registry=registry, admin={"token_env": "TEST_ADMIN_TOKEN"})
    status, doc = await register(http, r.url, "anything", sim)
    assert status == 404 and doc["error"]["code"] == "off"
    status, doc = await admin(http, r.url, "/admin/join-tokens", "POST", {"name": "p"})
    status, _ = await register(http, r.url, "anything", sim)
    assert status == 401
    status, _ = await register(http, r.url, doc["token"], sim)
    assert status == 201
    status, listed = await admin(http, r.url, "/admin/join-tokens")
    assert [t["name"] for t in listed["data"]] == ["p"]  # no shared token to list


# -- two replicas sharing a Redis ---------------------------------------------------


Replica = tuple[asyncio.subprocess.Process, str]


@pytest.fixture
async def replicas(
    tmp_path: Path,
) -> AsyncIterator[tuple[Callable[[str], Awaitable[str]], list[str]]]:
    """Start ``ballast serve`` processes on a Redis URL; everything they print is
    kept (drained as it comes) in the list handed out with the starter."""
    procs: list[asyncio.subprocess.Process] = []
    output: list[str] = []
    readers: list[asyncio.Task[None]] = []

    async def drain(proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            output.append(line.decode(errors="replace"))

    async def start(redis_url: str) -> str:
        port = free_port()
        doc = {
            "listen": {"host": "127.0.0.1", "port": port},
            "state": {"redis_url": redis_url, "timeout_s": 0.5},
            "admin": {"token_env": "TEST_ADMIN_TOKEN"},
            "registry": {**REGISTRY, "heartbeat_ttl_s": 30},
            "logging": {"level": "info", "access_log": True},
            "health": {"probe": False},
            "shutdown": {"grace_s": 0},
        }
        path = tmp_path / f"ballast-{port}.yaml"
        path.write_text(yaml.safe_dump(doc))
        proc = await spawn("serve", "--config", str(path))
        procs.append(proc)
        output.append(await wait_for_line(proc, "listening on"))
        readers.append(asyncio.get_running_loop().create_task(drain(proc)))
        return f"http://127.0.0.1:{port}"

    yield start, output
    for proc in procs:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        async with asyncio.timeout(20):
            await proc.wait()
    await asyncio.gather(*readers)


async def test_revoked_token_nodes_forgotten_on_both_replicas_within_2s(
    fleet: MakeSim,
    redis_server: RedisServer,
    replicas: tuple[Callable[[str], Awaitable[str]], list[str]],
    http: aiohttp.ClientSession,
) -> None:
    start, output = replicas
    a, b = await start(redis_server.url), await start(redis_server.url)
    by_agent, on_b, plain = await fleet("agent-box"), await fleet("b-box"), await fleet("plain")
    moved = await fleet("moved")
    status, made = await admin(
        http, a, "/admin/join-tokens", "POST", {"name": "provider", "pool": "spot"}
    )
    assert status == 201
    token = made["token"]

    async def on_b_token_known() -> bool:
        _, listed = await admin(http, b, "/admin/join-tokens")
        return any(t["name"] == "provider" for t in listed["data"])

    await until(on_b_token_known, within=5)
    agent = await spawn(*agent_args(a, by_agent, token, "--label", "pool=reserved"))
    agent_output = ""
    try:
        agent_output += await wait_for_line(agent, "registered agent-box")
        status, joined = await register(http, b, token, on_b)
        assert status == 201
        status, _ = await register(http, b, SHARED_TOKEN, plain)
        assert status == 201
        # Joined with the shared token on one replica, then with the provider's on
        # the other: every replica then counts it the provider's.
        status, first = await register(http, b, SHARED_TOKEN, moved)
        assert status == 201
        async with http.post(
            a + "/v1/nodes/register",
            json={"id": "moved", "url": moved.url, "models": [MODEL]},
            headers={**bearer(token), "X-Node-Secret": first["secret"]},
        ) as resp:
            assert resp.status == 200
        mine = {"agent-box", "b-box", "moved"}

        async def both_see_all() -> bool:
            for r in (a, b):
                rows = await nodes_of(http, r)
                if not mine | {"plain"} <= rows.keys():
                    return False
                if any(rows[n]["join_token"] != "provider" for n in mine):
                    return False
                if any(rows[n]["labels"].get("pool") != "spot" for n in mine):
                    return False
            return True

        await until(both_see_all, within=5)
        status, revoked = await admin(http, a, "/admin/join-tokens/provider", "DELETE")
        assert status == 200 and revoked["revoked"] and revoked["name"] == "provider"

        async def forgotten_on_both() -> bool:
            for r in (a, b):
                rows = await nodes_of(http, r)
                if mine & rows.keys() or "plain" not in rows:
                    return False
            return True

        await until(forgotten_on_both, within=2.0)
        async with http.post(
            b + "/v1/nodes/b-box/heartbeat", json={}, headers=bearer(joined["secret"])
        ) as resp:
            assert resp.status == 401
        for r in (a, b):
            assert (await register(http, r, token, on_b))[0] == 401
        # The agent keeps trying to join again, and is refused: nothing comes back.
        agent_output += await wait_for_line(agent, "HTTP 401")
        assert mine.isdisjoint((await nodes_of(http, a)).keys() | (await nodes_of(http, b)))
    finally:
        agent_output += await stop_agent(agent)

    # After its creation, the token appears in no log and no answer.
    responses = [await admin(http, r, p) for r in (a, b) for p in ("/admin/join-tokens",
                 "/admin/nodes", "/admin/status")]  # fmt: skip
    assert token not in str(responses)
    assert token not in agent_output and "registered agent-box" in agent_output
    for r in (a, b):
        async with http.get(r + "/metrics") as resp:
            assert token not in await resp.text()
    logs = "".join(output)
    assert "provider" in logs and token not in logs and token[7:20] not in logs
    assert os.environ["TEST_ADMIN_TOKEN"] not in logs


async def test_a_token_made_on_one_replica_registers_on_the_other(
    fleet: MakeSim,
    redis_server: RedisServer,
    replicas: tuple[Callable[[str], Awaitable[str]], list[str]],
    http: aiohttp.ClientSession,
) -> None:
    """The records are in the store: a replica started later knows them, and the
    node count of a token spans replicas."""
    start, _ = replicas
    a = await start(redis_server.url)
    status, made = await admin(
        http, a, "/admin/join-tokens", "POST", {"name": "p", "max_nodes": 1, "models": [MODEL]}
    )
    assert status == 201
    b = await start(redis_server.url)
    first, second = await fleet("first"), await fleet("second")
    status, _ = await register(http, b, made["token"], first)
    assert status == 201

    async def a_counts_it() -> bool:
        return "first" in await nodes_of(http, a)

    await until(a_counts_it, within=5)
    status, doc = await register(http, a, made["token"], second)
    assert status == 429 and doc["error"]["code"] == "join_token_full"
    code, out, _ = await admin_cli(a, "tokens", "list")
    assert code == 0 and [ln.split()[6] for ln in out.splitlines() if ln.startswith("p ")] == ["1"]


async def test_tokens_come_back_when_redis_loses_its_data(
    fleet: MakeSim,
    redis_server: RedisServer,
    replicas: tuple[Callable[[str], Awaitable[str]], list[str]],
    http: aiohttp.ClientSession,
) -> None:
    """A FLUSHALL takes the token records with it: the replicas put back the ones
    they know (a revocation with them), so a replica started afterwards knows them."""
    start, _ = replicas
    a = await start(redis_server.url)
    _, live = await admin(http, a, "/admin/join-tokens", "POST", {"name": "kept"})
    _, gone = await admin(http, a, "/admin/join-tokens", "POST", {"name": "gone"})
    assert (await admin(http, a, "/admin/join-tokens/gone", "DELETE"))[0] == 200
    client = redis_server.client()
    client.flushall()

    async def put_back() -> bool:
        return sorted(client.hkeys("ballast:{fleet}:jointokens")) == sorted(
            [live["id"].encode(), gone["id"].encode()]
        )

    await until(put_back, within=5)
    b = await start(redis_server.url)
    _, listed = await admin(http, b, "/admin/join-tokens")
    assert {t["name"]: t["state"] for t in listed["data"]} == {
        "shared": "active", "kept": "active", "gone": "revoked",
    }  # fmt: skip
    assert (await register(http, b, live["token"], await fleet("back")))[0] == 201
    assert (await register(http, b, gone["token"], await fleet("not-back")))[0] == 401
    client.close()
