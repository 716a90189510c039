"""Two tenants over a fleet that dips: does the interactive one keep its service?

    python -m loadtest.tenants [--scenario loadtest/scenarios/tenants.yaml] [--duration 30]

Runs the scenario's fleet (with its faults) three times, each with a fresh
router and the same seeds: the interactive tenant alone; both tenants with the
nodes' capacity declared (priority classes at work); both tenants without
declared capacity (nothing to give priority over: only the keys' limits).
Each tenant has its own client key (``auth.required``); the batch tenant sends
at 5x its key's ``rpm``. With ``--fleet-process`` the simulated nodes run in a process of their own
(by default they share the load generators' process and event loop). Prints,
per run and tenant: requests, success,
rate-limited (429), TTFB p50/p99 and latency p99; and the interactive tenant's
success and p99 against running alone, measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from loadtest.compare import pct, start_router, stop
from loadtest.fleet import Fleet
from loadtest.loadgen import LoadSpec, Record, run_load

DEFAULT = Path(__file__).parent / "scenarios" / "tenants.yaml"


class FleetProcess:
    """The scenario's fleet in a process of its own (``python -m loadtest.fleet``), so
    that the load generators do not share an event loop with the simulated nodes."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.proc: asyncio.subprocess.Process | None = None
        self.nodes: list[dict[str, Any]] = []

    async def start(self) -> None:
        path = Path(tempfile.mkstemp(suffix=".yaml")[1])
        await asyncio.to_thread(path.write_text, yaml.safe_dump(self.spec))
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "loadtest.fleet", str(path), stdout=asyncio.subprocess.PIPE
        )
        claims = {n["id"]: n for n in Fleet(self.spec).router_nodes()}
        assert self.proc.stdout is not None
        for _ in claims:
            node_id, *_, url = (await self.proc.stdout.readline()).decode().split()
            self.nodes.append({**claims[node_id], "url": url})

    def router_nodes(self) -> list[dict[str, Any]]:
        return self.nodes

    async def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            await self.proc.wait()


async def run(
    scenario: dict[str, Any],
    tenants: list[dict[str, Any]],
    duration: float,
    capacity: bool,
    separate: bool = False,
) -> dict[str, list[Record]]:
    fleet_spec = {**scenario["fleet"], "duration_s": duration}
    if not capacity:
        fleet_spec["nodes"] = [
            {k: v for k, v in n.items() if k != "declare_capacity"} for n in fleet_spec["nodes"]
        ]
    fleet: Fleet | FleetProcess = FleetProcess(fleet_spec) if separate else Fleet(fleet_spec)
    keys = {t["name"]: "sk-bal-" + secrets.token_urlsafe(32) for t in tenants}
    for t in tenants:
        os.environ[f"LOADTEST_KEY_{t['name'].upper().replace('-', '_')}"] = keys[t["name"]]
    cfg: dict[str, Any] = {
        **scenario.get("router", {}),
        "auth": {
            "required": True,
            "keys": [
                {
                    "name": t["name"],
                    "key_env": f"LOADTEST_KEY_{t['name'].upper().replace('-', '_')}",
                    "priority": t.get("priority", "interactive"),
                    **({"rpm": t["rpm"]} if "rpm" in t else {}),
                }
                for t in tenants
            ],
        },
        "logging": {"level": "info", "access_log": False},
    }
    with tempfile.TemporaryDirectory() as tmp:
        await fleet.start()
        proc = None
        try:
            proc, url = await start_router({**cfg, "nodes": fleet.router_nodes()}, Path(tmp))
            seed = int(scenario.get("seed", 0))
            loads = []
            for i, t in enumerate(tenants):
                spec = LoadSpec.from_dict(t["load"])
                spec.headers = {"Authorization": f"Bearer {keys[t['name']]}"}
                loads.append(run_load([url], spec, duration, seed=seed + i))
            results = await asyncio.gather(*loads)
        finally:
            if proc is not None:
                await stop(proc)
            await fleet.close()
    return {t["name"]: r for t, r in zip(tenants, results, strict=True)}


def stats(records: list[Record]) -> dict[str, Any]:
    served = [r for r in records if r.status != 429]
    ok = [r for r in served if r.ok]
    return {
        "requests": len(records),
        "rate_limited": len(records) - len(served),
        "success": len(ok) / len(served) if served else float("nan"),
        "ttfb_p50": pct([r.ttfb for r in ok], 0.5),
        "ttfb_p99": pct([r.ttfb for r in ok], 0.99),
        "latency_p99": pct([r.latency for r in ok], 0.99),
    }


def ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"  # pct() answers milliseconds


async def main_async(scenario: dict[str, Any], duration: float, separate: bool = False) -> str:
    tenants = scenario["tenants"]
    interactive = tenants[0]
    runs = {
        "interactive alone": await run(scenario, [interactive], duration, True, separate),
        "both, capacity declared (priority)": await run(
            scenario, tenants, duration, True, separate
        ),
        "both, no capacity declared": await run(scenario, tenants, duration, False, separate),
    }
    lines = [
        f"{scenario['name']}: {duration:.0f} s per run",
        "",
        "| run | tenant | requests | 429 | success (of not 429) | TTFB p50 ms | TTFB p99 ms "
        "| latency p99 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    summary: dict[str, dict[str, Any]] = {}
    for run_name, by_tenant in runs.items():
        for tenant, records in by_tenant.items():
            s = stats(records)
            summary[f"{run_name}/{tenant}"] = s
            lines.append(
                f"| {run_name} | {tenant} | {s['requests']} | {s['rate_limited']} | "
                f"{s['success'] * 100:.2f}% | {ms(s['ttfb_p50'])} | {ms(s['ttfb_p99'])} | "
                f"{ms(s['latency_p99'])} |"
            )
    alone = summary[f"interactive alone/{interactive['name']}"]
    lines.append("")
    for run_name in list(runs)[1:]:
        s = summary[f"{run_name}/{interactive['name']}"]
        lines.append(
            f"{run_name}: {interactive['name']} success {s['success'] / alone['success']:.3f}x, "
            f"TTFB p99 {s['ttfb_p99'] / alone['ttfb_p99']:.2f}x, "
            f"latency p99 {s['latency_p99'] / alone['latency_p99']:.2f}x of running alone"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--scenario", type=Path, default=DEFAULT)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument(
        "--fleet-process", action="store_true",
        help="run the simulated nodes in a process of their own, apart from the load",
    )  # fmt: skip
    args = ap.parse_args()
    scenario = yaml.safe_load(args.scenario.read_text())
    print(asyncio.run(main_async(scenario, args.duration, args.fleet_process)))


if __name__ == "__main__":
    main()
