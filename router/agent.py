"""``ballast agent``: runs next to a GPU inference server and keeps it registered.

It registers the node with a router (join token), then sends heartbeats with
the GPU's free memory and utilisation, read from ``nvidia-smi`` when present
and from flags otherwise. If the router forgets the node (restart, removal,
expiry) it registers again with the node's own secret, kept in memory and, with
``--secret-file``, on disk.

It says what the node is: labels (``--label k=v``: its pool, ``--region``, which
``locality.label`` reads, ``--max-concurrency``, any others), prices
(``--price-per-mtok``, ``--price-per-hour``) and engine (``--engine``), from
flags or a small YAML file (``--file``; flags win). They are checked at start
with the model registration checks them with
(:class:`router.registration.NodeClaims`), so a mistake ends the agent at once
with one line, and sent in every registration.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from pydantic import ValidationError

from router.registration import NodeClaims

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


class AgentError(Exception):
    """Invalid agent input, in one line (the CLI exits 2 with it)."""


# What the file may hold: the claims, and two labels with their own flag.
LABEL_FIELDS = ("region", "max_concurrency")  # labels of these names (router.pools, router.gate)
FILE_KEYS = frozenset(NodeClaims.model_fields) - {"id"} | set(LABEL_FIELDS)


def _label_text(key: str, value: object) -> str:
    """A label's value as YAML may give it (a number, a word) as the text it is."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return str(value)
    raise AgentError(f"label {key}: must be a string or a number")


def read_file(path: Path) -> dict[str, Any]:
    """The agent's YAML file: a mapping of claims (``FILE_KEYS``)."""
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as e:
        raise AgentError(f"cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise AgentError(f"{path}: not valid YAML{where}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise AgentError(f"{path}: must be a mapping of {', '.join(sorted(FILE_KEYS))}")
    unknown = sorted(str(k) for k in doc if k not in FILE_KEYS)
    if unknown:
        raise AgentError(
            f"{path}: unknown key {unknown[0]!r} (known: {', '.join(sorted(FILE_KEYS))})"
        )
    return doc


def node_claims(
    file: Mapping[str, Any], flags: Mapping[str, Any], labels: Sequence[str] = ()
) -> NodeClaims:
    """The node's claims from its file, then its flags (``None``: not given) and
    ``--label key=value`` items, validated as registration validates them."""
    found = file.get("labels") or {}
    if not isinstance(found, dict):
        raise AgentError("labels: must be a mapping of name: value")
    merged = {str(k): _label_text(str(k), v) for k, v in found.items()}
    doc = {k: v for k, v in file.items() if k != "labels" and k not in LABEL_FIELDS}
    for key in LABEL_FIELDS:  # region, max_concurrency: labels with keys of their own
        if file.get(key) is not None:
            merged[key] = _label_text(key, file[key])
    for item in labels:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise AgentError(f"--label {item[:64]!r}: give it as key=value")
        merged[key] = value
    for key, value in flags.items():
        if value is None:
            continue
        if key in LABEL_FIELDS:
            merged[key] = _label_text(key, value)
        else:
            doc[key] = value
    try:
        return NodeClaims.model_validate({**doc, "labels": merged})
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p)[:64] for p in first["loc"]) or "claims"
        flag = f" (--{where.replace('_', '-')})" if where in NodeClaims.model_fields else ""
        message = str(first["msg"]).removeprefix("Value error, ")
        raise AgentError(f"{where}{flag}: {message}"[:300]) from None


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
    # What the node says it is besides its hardware: labels, prices, engine
    # (NodeClaims fields, validated; sent in every registration).
    claims: dict[str, Any] = field(default_factory=dict)


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
            **self.cfg.claims,
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
