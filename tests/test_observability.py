"""Metrics, access log, admin API and the fleet table."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import orjson
import pytest

from tests.conftest import (
    MODEL,
    MakeRouter,
    MakeSim,
    StartPrometheus,
    chat,
    dead_url,
    node_entry,
)
from tests.test_cli import serve_config, spawn

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy/grafana/ballast-dashboard.json"
ALERTS = ROOT / "deploy/prometheus/alerts.yml"


def sample_names(exposition: str) -> set[str]:
    return {
        line.split("{", 1)[0].split(" ", 1)[0]
        for line in exposition.splitlines()
        if line and not line.startswith("#")
    }


def series(exposition: str) -> set[str]:
    return {
        line.rsplit(" ", 1)[0] for line in exposition.splitlines() if line.startswith("ballast_")
    }


async def scrape(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url + "/metrics") as resp:
        assert resp.status == 200
        return await resp.text()


def metric_value(exposition: str, name: str, **labels: str) -> float:
    for line in exposition.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{labels} not in /metrics")


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    exprs += [v["query"] for v in doc["templating"]["list"] if v["type"] == "query"]
    return exprs


def concrete(expr: str) -> str:
    """Grafana variables replaced the way Grafana would for 'All'."""
    expr = expr.replace("$__rate_interval", "1m")
    expr = expr.replace("label_values(ballast_requests_total, job)", "ballast_requests_total")
    expr = expr.replace("label_values(ballast_supply_nodes, model)", "ballast_supply_nodes")
    return re.sub(r"\$\w+", ".*", expr)


async def test_request_and_node_metrics(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    a = await fleet("a")
    r = await make_router([node_entry(a)])
    for _ in range(3):
        async with http.post(r.url + "/v1/chat/completions", data=orjson.dumps(chat())) as resp:
            assert resp.status == 200
    async with http.post(r.url + "/v1/chat/completions", data=b'{"model": "ghost"}') as resp:
        assert resp.status == 404
    async with http.post(r.url + "/v1/chat/completions", data=b"{") as resp:
        assert resp.status == 400
    text = await scrape(http, r.url)
    assert metric_value(text, "ballast_requests_total", model=MODEL, code="200") == 3
    assert metric_value(text, "ballast_requests_total", model="other", code="404") == 1
    assert metric_value(text, "ballast_requests_total", model="none", code="400") == 1
    assert metric_value(text, "ballast_request_duration_seconds_count", model=MODEL) == 3
    assert metric_value(text, "ballast_ttfb_seconds_count", model=MODEL) == 3
    assert metric_value(text, "ballast_upstream_attempts_total", node="a", outcome="ok") == 3
    assert metric_value(text, "ballast_supply_nodes", model=MODEL, state="serving") == 1
    assert metric_value(text, "ballast_node_state", node="a", state="serving") == 1
    assert metric_value(text, "ballast_in_flight") == 0
    assert metric_value(text, "ballast_store_up", backend="memory") == 1
    assert "process_cpu_seconds_total" in text


async def test_distinct_request_ids_and_models_add_no_series(
    fleet: MakeSim, make_router: MakeRouter
) -> None:
    a = await fleet("a", time_scale=0.0)
    r = await make_router([node_entry(a)], logging={"access_log": False})
    connector = aiohttp.TCPConnector(limit=32)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def send(i: int) -> None:
            body = chat(max_tokens=1) if i % 2 else {"model": f"ghost-{i}"}
            headers = {"x-request-id": f"req-{i}-{secrets.token_hex(4)}"}
            async with http.post(
                r.url + "/v1/chat/completions", data=orjson.dumps(body), headers=headers
            ) as resp:
                assert resp.status == (200 if i % 2 else 404)
                await resp.read()

        await asyncio.gather(*(send(i) for i in range(4)))  # every code path once
        before = series(await scrape(http, r.url))
        sem = asyncio.Semaphore(32)

        async def bounded(i: int) -> None:
            async with sem:
                await send(i)

        await asyncio.gather(*(bounded(i) for i in range(4, 10_000)))
        after_text = await scrape(http, r.url)
    assert series(after_text) == before
    assert metric_value(after_text, "ballast_requests_total", model="other", code="404") == 5000


def test_dashboard_is_importable_with_a_datasource_variable() -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] and doc["title"] == "Ballast"
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    for panel in doc["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}"
            assert panel["targets"], panel["title"]


async def test_dashboard_metric_names_exist_in_live_metrics(
    fleet: MakeSim,
    make_router: MakeRouter,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DASH_KEY", "sk-bal-dashboard")
    a = await fleet("a")
    r = await make_router(
        [node_entry(a, labels={"pool": "spot", "price_per_mtok": "1"})],
        auth={"keys": [{"name": "team", "key_env": "DASH_KEY", "rpm": 1}]},
        pools={"order": ["spot"]},
        models={"ghost": {"fallbacks": [MODEL]}},
    )
    async with http.post(
        r.url + "/v1/chat/completions", data=orjson.dumps(chat(model="ghost"))
    ) as resp:
        assert resp.status == 200  # served by the fallback model
    for status in (200, 429):  # a key's request, then one over its limit
        async with http.post(
            r.url + "/v1/chat/completions",
            data=orjson.dumps(chat()),
            headers={"Authorization": "Bearer sk-bal-dashboard"},
        ) as resp:
            assert resp.status == status
    live = sample_names(await scrape(http, r.url))
    used: set[str] = set()
    for expr in dashboard_exprs():
        names = set(re.findall(r"\b((?:ballast|process)_[a-z_]+)\b", expr))
        assert names, f"no metric in {expr!r}"
        used |= names
    missing = used - live
    assert not missing, f"dashboard uses metrics /metrics does not expose: {missing}"


def test_alert_rules_pass_promtool() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: the test command installs Debian's prometheus"
    out = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


async def test_prometheus_scrapes_the_router_and_sees_the_traffic(
    fleet: MakeSim,
    make_router: MakeRouter,
    http: aiohttp.ClientSession,
    prometheus: StartPrometheus,
) -> None:
    # H100 profile: about 80 ms per 8-token request, clear of the 50 and 100 ms bucket
    # bounds (4 tokens took 45 to 50 ms: a slow machine put the median on the 50 ms bound)
    a = await fleet("a", time_scale=1.0)
    r = await make_router([node_entry(a)])
    api = await prometheus(
        {
            "global": {"scrape_interval": "1s"},
            "scrape_configs": [
                {
                    "job_name": "ballast",
                    "static_configs": [{"targets": [r.url.removeprefix("http://")]}],
                }
            ],
        }
    )
    latencies = []
    for _ in range(30):
        t0 = time.perf_counter()
        body = orjson.dumps(chat(max_tokens=8))
        async with http.post(r.url + "/v1/chat/completions", data=body) as resp:
            assert resp.status == 200
            await resp.read()
        latencies.append(time.perf_counter() - t0)

    async def query(expr: str) -> list[dict]:
        async with http.get(api, params={"query": expr}) as resp:
            doc = await resp.json()
        assert doc["status"] == "success", (expr, doc)
        return doc["data"]["result"]

    async def until_scraped() -> list[dict]:
        async with asyncio.timeout(60):  # Prometheus start-up plus a scrape
            while True:
                try:
                    found = await query('sum(ballast_requests_total{code="200"})')
                except aiohttp.ClientError:
                    found = []
                if found and float(found[0]["value"][1]) >= 30:
                    return found
                await asyncio.sleep(0.2)  # polling an external process's state

    found = await until_scraped()
    assert float(found[0]["value"][1]) == 30
    p50 = await query(
        "histogram_quantile(0.5, sum by (le) (ballast_request_duration_seconds_bucket))"
    )
    estimate = float(p50[0]["value"][1])
    median = statistics.median(latencies)
    buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
    bucket = next(b for b in buckets if median <= b)
    lower = buckets[buckets.index(bucket) - 1]
    assert lower <= estimate <= bucket, (estimate, median)
    for expr in dashboard_exprs():  # every dashboard query parses and runs
        await query(concrete(expr))


async def test_admin_api_and_fleet_table(
    fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession, monkeypatch
) -> None:
    a = await fleet("a")
    off = await make_router([node_entry(a)])
    async with http.get(off.url + "/admin/nodes") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "admin_off"

    monkeypatch.setenv("TEST_ADMIN_TOKEN", "s3cret-admin")
    r = await make_router(
        [node_entry(a, gpu="H100", vram_gb=80, gpus=2)], admin={"token_env": "TEST_ADMIN_TOKEN"}
    )
    async with http.post(r.url + "/v1/chat/completions", data=orjson.dumps(chat())) as resp:
        assert resp.status == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-admin"}):
        async with http.get(r.url + "/admin/nodes", headers=headers) as resp:
            assert resp.status == 401
            body = await resp.text()
            assert "s3cret-admin" not in body
    auth = {"Authorization": "Bearer s3cret-admin"}
    async with http.get(r.url + "/admin/nodes", headers=auth) as resp:
        doc = await resp.json()
    (row,) = doc["nodes"]
    assert row["id"] == "a" and row["state"] == "serving" and row["requests"] == 1
    assert row["share"] == 1.0 and 0 < row["success_ratio"] <= 1
    assert doc["summary"]["claimed"] == {"nodes": 1, "gpus": 2, "vram_gb": 80}

    env = {**os.environ, "BALLAST_ADMIN_TOKEN": "s3cret-admin"}
    cli = [sys.executable, "-m", "router.cli", "nodes", "--router", r.url]
    for extra in ([], ["--json"]):
        proc = await asyncio.create_subprocess_exec(
            *cli, *extra, env=env, stdout=asyncio.subprocess.PIPE
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0
        text = out.decode()
        if extra:
            assert orjson.loads(out)["nodes"][0]["id"] == "a"
        else:
            assert text.splitlines()[0].split()[:3] == ["NODE", "GPU", "STATE"]
            assert "a " in text and "H100" in text and "100.0%" in text
            assert "claimed 1 nodes / 2 GPUs / 80 GB" in text
    proc = await asyncio.create_subprocess_exec(
        *cli, "--admin-token", "nope", stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1 and b"HTTP 401" in err and b"Traceback" not in err
    assert b"BALLAST_ADMIN_TOKEN" in err and len(err.strip().splitlines()) == 1
    proc = await asyncio.create_subprocess_exec(
        *cli[:-1], dead_url(), stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1 and b"is the router running?" in err
    assert len(err.strip().splitlines()) == 1


async def test_access_log_lines(fleet: MakeSim, tmp_path: Path) -> None:
    port, cfg = serve_config(tmp_path, await fleet("a"))
    proc = await spawn("serve", "--config", str(cfg), stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None and proc.stdout is not None
    async with asyncio.timeout(30):
        while b"listening on" not in (first := await proc.stderr.readline()):
            pass
    assert orjson.loads(first)["level"] == "info"  # the process log is JSON
    prompt = "my very private prompt"
    async with aiohttp.ClientSession() as http:
        body = orjson.dumps(
            {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 2}
        )
        headers = {"x-request-id": "log-test-1", "Authorization": "Bearer client-secret"}
        async with http.post(
            f"http://127.0.0.1:{port}/v1/chat/completions", data=body, headers=headers
        ) as resp:
            assert resp.status == 200
    proc.terminate()
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    lines = [orjson.loads(line) for line in out.splitlines()]
    (line,) = [x for x in lines if x["request_id"] == "log-test-1"]
    assert line["status"] == 200 and line["node"] == "a" and line["attempts"] == 1
    assert line["duration_ms"] >= line["ttfb_ms"] > 0
    assert line["model"] == MODEL
    everything = out + err
    assert prompt.encode() not in everything and b"client-secret" not in everything
    for x in err.splitlines():
        assert orjson.loads(x)["level"]
