"""``ballast agent``: runs next to a GPU inference server and keeps it registered.

It registers the node with a router (join token), then sends heartbeats with
the GPU's free memory and utilisation, read from ``nvidia-smi`` when present
and from flags otherwise. If the router forgets the node (restart, removal,
expiry) it registers again with the node's own secret, kept in memory and, with
``--secret-file``, on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

log = logging.getLogger("ballast.agent")


@dataclass
class GpuFacts:
    name: str | None = None
    count: int = 1
    vram_gb: float | None = None
    free_vram_gb: float | None = None
    util: float | None = None


def read_nvidia_smi() -> GpuFacts | None:
    """Facts summed over the machine's GPUs, or None without nvidia-smi."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,memory.total,memory.free,utilization.gpu",
             "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    rows = [[c.strip() for c in line.split(",")] for line in out.splitlines() if line.strip()]
    if not rows:
        return None
    try:
        return GpuFacts(
            name=rows[0][0],
            count=len(rows),
            vram_gb=sum(float(r[1]) for r in rows) / 1024,
            free_vram_gb=sum(float(r[2]) for r in rows) / 1024,
            util=sum(float(r[3]) for r in rows) / len(rows),
        )
    except (ValueError, IndexError):
        return None


@dataclass
class AgentConfig:
    router: str
    node_url: str
    node_id: str
    join_token: str
    models: list[str]
    gpu: str | None = None
    gpus: int = 1
    vram_gb: float | None = None
    interval_s: float = 5.0
    secret_file: Path | None = None


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.router = cfg.router.rstrip("/")
        self.secret: str | None = None
        if cfg.secret_file is not None and cfg.secret_file.exists():
            self.secret = cfg.secret_file.read_text().strip() or None

    def facts(self) -> GpuFacts:
        found = read_nvidia_smi()
        if found is not None:
            return found
        c = self.cfg
        return GpuFacts(name=c.gpu, count=c.gpus, vram_gb=c.vram_gb)

    async def models(self, http: aiohttp.ClientSession) -> list[str]:
        if self.cfg.models:
            return self.cfg.models
        async with http.get(self.cfg.node_url.rstrip("/") + "/v1/models") as resp:
            resp.raise_for_status()
            return [m["id"] for m in (await resp.json())["data"]]

    async def register(self, http: aiohttp.ClientSession) -> None:
        f = self.facts()
        body: dict[str, Any] = {
            "id": self.cfg.node_id,
            "url": self.cfg.node_url,
            "models": await self.models(http),
            "gpu": f.name,
            "gpus": f.count,
            "vram_gb": f.vram_gb,
        }
        headers = {"Authorization": f"Bearer {self.cfg.join_token}"}
        if self.secret:
            headers["X-Node-Secret"] = self.secret
        async with http.post(self.router + "/v1/nodes/register", json=body, headers=headers) as r:
            doc = await r.json()
            if r.status not in (200, 201):
                raise RuntimeError(
                    f"registration refused: HTTP {r.status}: {doc['error']['message']}"
                )
        if "secret" in doc:
            self.secret = doc["secret"]
            if self.cfg.secret_file is not None:
                self.cfg.secret_file.write_text(self.secret)
                self.cfg.secret_file.chmod(0o600)
        log.warning("registered %s with %s", self.cfg.node_id, self.router)

    async def heartbeat(self, http: aiohttp.ClientSession) -> int:
        f = self.facts()
        body = {
            k: v
            for k, v in (("free_vram_gb", f.free_vram_gb), ("gpu_util", f.util))
            if v is not None
        }
        headers = {"Authorization": f"Bearer {self.secret}"}
        url = f"{self.router}/v1/nodes/{self.cfg.node_id}/heartbeat"
        async with http.post(url, json=body, headers=headers) as resp:
            await resp.read()
            return resp.status

    async def run(self, stop: asyncio.Event) -> None:
        timeout = aiohttp.ClientTimeout(total=10)
        backoff = 1.0
        async with aiohttp.ClientSession(timeout=timeout) as http:
            registered = False
            while not stop.is_set():
                try:
                    if not registered:
                        await self.register(http)
                        registered = True
                    status = await self.heartbeat(http)
                    if status in (401, 404):
                        registered = False  # the router forgot us: register again
                        continue
                    backoff = 1.0
                    wait = self.cfg.interval_s
                except (aiohttp.ClientError, TimeoutError, RuntimeError, KeyError) as e:
                    log.warning("router unreachable or refused (%s); retrying", e)
                    wait = backoff
                    backoff = min(backoff * 2, 60.0)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await stop.wait()


async def run_agent(cfg: AgentConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await Agent(cfg).run(stop)
