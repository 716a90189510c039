"""``ballast demo``: the router on the embedded default with a local simulated fleet."""

from __future__ import annotations

import asyncio
import os
import secrets

from loadtest.simnode import SimNode, sim_config
from router.app import serve
from router.cli import command
from router.config import parse_config

DEMO_MODEL = "tiny-llama"
DEMO_FLEET = (
    ("h100-0", "H100"),
    ("a100-0", "A100"),
    ("rtx4090-0", "RTX 4090"),
    ("t4-0", "T4"),
)


async def run_demo(host: str, port: int) -> None:
    sims = [SimNode(sim_config(nid, [DEMO_MODEL], prof)) for nid, prof in DEMO_FLEET]
    for sim in sims:
        await sim.start()
    nodes = [
        {
            "id": sim.cfg.id,
            "url": sim.url,
            "models": sim.cfg.models,
            "gpu": sim.cfg.profile.name,
            "vram_gb": sim.cfg.profile.vram_gb,
            "labels": {"pool": "demo"},
        }
        for sim in sims
    ]
    # A throw-away admin token so `ballast nodes` works against the demo.
    token = os.environ.setdefault("BALLAST_ADMIN_TOKEN", secrets.token_urlsafe(16))
    cfg = parse_config(
        {
            "listen": {"host": host, "port": port},
            "nodes": nodes,
            "admin": {"token_env": "BALLAST_ADMIN_TOKEN"},
        }
    )

    def ready(bound: int) -> None:
        url = f"http://{host}:{bound}"
        print(f"Ballast demo: router on {url}, {len(sims)} simulated GPU nodes", flush=True)
        for sim in sims:
            print(f"  {sim.cfg.id:<10} {sim.cfg.profile.name:<9} {sim.url}", flush=True)
        print("Try:", flush=True)
        print(
            f"  curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' "
            f'-d \'{{"model": "{DEMO_MODEL}", "messages": [{{"role": "user", '
            f'"content": "Hello"}}], "max_tokens": 8}}\' -i',
            flush=True,
        )
        print(f"Fleet table:  BALLAST_ADMIN_TOKEN={token} {command()} nodes --router {url}")
        print(f"Status page:  {url}/ui  (admin token {token})")
        print(f"Metrics:      curl -s {url}/metrics")
        print("Press Ctrl-C to stop.", flush=True)

    try:
        await serve(cfg, ready=ready)
    finally:
        await asyncio.gather(*(sim.close() for sim in sims))
