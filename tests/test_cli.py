"""The ``ballast`` command as a real subprocess."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import orjson
import yaml

from loadtest.simnode import SimNode
from tests.conftest import MODEL, MakeSim, chat, free_port, node_entry

BALLAST = [sys.executable, "-m", "router.cli"]


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BALLAST, *args], capture_output=True, text=True, timeout=timeout)


def test_policies_lists_each_with_a_description() -> None:
    out = run("policies")
    assert out.returncode == 0
    lines = out.stdout.strip().splitlines()
    names = [line.split()[0] for line in lines]
    assert names == sorted(["least_outstanding", "p2c_peak_ewma", "random", "round_robin", "score"])
    assert all(len(line.split(None, 1)[1]) > 10 for line in lines)


def test_check_config(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(
        yaml.safe_dump({"nodes": [{"id": "a", "url": "http://127.0.0.1:1", "models": ["m"]}]})
    )
    out = run("check-config", str(good))
    assert out.returncode == 0 and "ok" in out.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("retries: {max_attempts: 0}\nlisten: {prot: 1}\n")
    out = run("check-config", str(bad))
    assert out.returncode == 2
    assert "retries.max_attempts" in out.stderr and "listen.prot: unknown key" in out.stderr
    assert "Traceback" not in out.stderr
    out = run("check-config", str(tmp_path / "missing.yaml"))
    assert out.returncode == 2 and "cannot read" in out.stderr


async def spawn(*args: str, stderr: int = asyncio.subprocess.STDOUT) -> asyncio.subprocess.Process:
    """``ballast ARGS`` as a child process; stderr joins stdout unless told otherwise."""
    return await asyncio.create_subprocess_exec(
        *BALLAST,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=stderr,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


async def wait_for_line(proc: asyncio.subprocess.Process, marker: str) -> str:
    """Read the child's output until it prints ``marker``; return that line."""
    assert proc.stdout is not None
    async with asyncio.timeout(30):
        while line := (await proc.stdout.readline()).decode():
            if marker in line:
                return line
    raise AssertionError(f"process exited before printing {marker!r}")


async def stop(proc: asyncio.subprocess.Process, sig: int) -> int:
    proc.send_signal(sig)
    async with asyncio.timeout(20):
        return await proc.wait()


def serve_config(tmp_path: Path, sim: SimNode) -> tuple[int, Path]:
    """A config file routing to ``sim`` on a free port; returns (port, path)."""
    port = free_port()
    cfg = tmp_path / "ballast.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "listen": {"host": "127.0.0.1", "port": port},
                "nodes": [node_entry(sim)],
                "shutdown": {"grace_s": 0},
            }
        )
    )
    return port, cfg


async def test_serve_proxies_and_stops_on_sigterm(fleet: MakeSim, tmp_path: Path) -> None:
    port, cfg = serve_config(tmp_path, await fleet("a"))
    proc = await spawn("serve", "--config", str(cfg))
    try:
        await wait_for_line(proc, "listening on")
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"http://127.0.0.1:{port}/v1/chat/completions", data=orjson.dumps(chat())
            ) as resp:
                assert resp.status == 200
                assert resp.headers["x-ballast-node"] == "a"
        # SIGHUP swaps the policy from the file; a broken file keeps the old one.
        doc = yaml.safe_load(cfg.read_text())
        cfg.write_text(yaml.safe_dump({**doc, "policy": {"name": "round_robin"}}))
        proc.send_signal(signal.SIGHUP)
        assert "policy round_robin" in await wait_for_line(proc, "reloaded")
        cfg.write_text(yaml.safe_dump({**doc, "policy": {"name": "no_such_policy"}}))
        proc.send_signal(signal.SIGHUP)
        assert "unknown policy" in await wait_for_line(proc, "reload failed")
        assert await stop(proc, signal.SIGTERM) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_demo_answers_at_once() -> None:
    port = free_port()
    started = time.monotonic()
    proc = await spawn("demo", "--port", str(port))
    try:
        table = await wait_for_line(proc, "Fleet table:")
        await wait_for_line(proc, "Press Ctrl-C")
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"http://127.0.0.1:{port}/v1/chat/completions", data=orjson.dumps(chat())
            ) as resp:
                assert resp.status == 200
                doc = await resp.json()
            assert doc["model"] == MODEL
            async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                assert (await resp.json())["routable_nodes"] == 4
        # The fleet-table line it printed works as printed.
        shown = await asyncio.create_subprocess_shell(
            table.split(":", 1)[1].strip(), stdout=asyncio.subprocess.PIPE
        )
        out, _ = await asyncio.wait_for(shown.communicate(), 30)
        assert shown.returncode == 0 and out.decode().startswith("NODE")
        assert time.monotonic() - started < 30
        assert await stop(proc, signal.SIGINT) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_fleet_table_shows_no_score_for_untried_nodes() -> None:
    from router.cli import render_fleet

    row = {
        "id": "new", "gpu": "T4", "state": "verified", "reason": "probed", "models": ["m"],
        "engine": "vllm", "in_flight": 0, "latency_ms": 1000.0, "success_ratio": 1.0,
        "cost": 0.0, "share": 0.0, "affinity_share": 0.0, "requests": 0,
    }  # fmt: skip
    summary = {"claimed": {"nodes": 1, "gpus": 1, "vram_gb": 16}}
    lines = render_fleet({"nodes": [row], "summary": summary}).splitlines()
    header, cells = lines[0].split(), lines[1].split()
    for column in ("LAT_MS", "SUCCESS", "ROUTE_COST"):
        assert cells[header.index(column)] == "-"  # not 0, which would read as the best
    tried = render_fleet({"nodes": [{**row, "requests": 3}], "summary": summary})
    assert tried.splitlines()[1].split()[header.index("ROUTE_COST")] == "0"
    priced = {**row, "requests": 3, "pool": "spot", "price_per_mtok": 0.4, "spent_share": 0.25}
    cells = render_fleet({"nodes": [priced], "summary": summary}).splitlines()[1].split()
    assert [cells[header.index(c)] for c in ("POOL", "PRICE", "SPEND")] == [
        "spot",
        "0.4/Mtok",
        "25.0%",
    ]
