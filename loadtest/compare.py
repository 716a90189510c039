"""Policy comparison: the same seeded scenario against each policy, one report.

    python -m loadtest.compare --scenario loadtest/scenarios/flaky.yaml \\
        --policies round_robin,least_outstanding,p2c_peak_ewma --duration 20 --out out/flaky

For each policy: a fresh simulated fleet from the scenario (same seed, so the
same faults at the same times), a fresh ``ballast serve`` process (two sharing a
private Redis with ``--redis``), and the scenario's open-loop load. Writes

* ``DIR/summary.json``: per policy requests, success_rate, latency and TTFB
  percentiles, goodput, retries, per-node share, status and error counts;
* ``DIR/report.md``: the table;
* ``DIR/latency_cdf.png`` and ``DIR/share_<policy>.png`` (traffic share per node
  over time, fault events marked).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import orjson
import yaml

from loadtest.common import free_port, percentile
from loadtest.fleet import Fleet
from loadtest.loadgen import LoadSpec, Record, run_conversations, run_load
from loadtest.simnode import PROFILES


def pct(xs: list[float], q: float) -> float | None:
    """The ``q`` quantile of ``xs`` (seconds) in milliseconds; None when empty."""
    return round(percentile(xs, q) * 1e3, 1) if xs else None


async def start_redis(tmp: Path) -> tuple[asyncio.subprocess.Process, str]:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "no", "--dir", str(tmp),
        stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    async with asyncio.timeout(10):
        while True:
            try:
                _, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                break
            except OSError:
                await asyncio.sleep(0.05)
    return proc, f"redis://127.0.0.1:{port}/0"


async def start_router(
    cfg: dict[str, Any], tmp: Path, access_log: Path | None = None
) -> tuple[asyncio.subprocess.Process, str]:
    """``ballast serve`` on a free port; its access log (stdout) into ``access_log``."""
    port = free_port()
    cfg = {**cfg, "listen": {"host": "127.0.0.1", "port": port}, "shutdown": {"grace_s": 0}}
    path = tmp / f"router-{port}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = access_log.open("ab") if access_log is not None else asyncio.subprocess.DEVNULL
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "router.cli", "serve", "--config", str(path),
        stdout=out, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert proc.stderr is not None
    async with asyncio.timeout(30):
        while b"listening on" not in await proc.stderr.readline():
            if proc.returncode is not None:
                raise RuntimeError("router exited during start-up")
    asyncio.get_running_loop().create_task(_drain(proc.stderr))
    return proc, f"http://127.0.0.1:{port}"


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


async def scrape_retries(url: str) -> float:
    reader, writer = await asyncio.open_connection(*url.removeprefix("http://").split(":"))
    writer.write(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
    text = (await reader.read()).decode()
    writer.close()
    for line in text.splitlines():
        if line.startswith("ballast_retries_total "):
            return float(line.split()[1])
    return 0.0


async def stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(30):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def run_policy(
    scenario: dict[str, Any],
    policy: str,
    duration: float,
    redis: bool,
    tmp: Path,
    access_log: Path | None = None,
) -> tuple[list[Record], list[tuple[float, str, str]], float]:
    fleet = Fleet({**scenario["fleet"], "duration_s": duration})
    procs: list[asyncio.subprocess.Process] = []
    try:
        await fleet.start()
        # "<policy>-noaffinity": the policy with cache-aware placement off
        name = policy.removesuffix("-noaffinity")
        cfg: dict[str, Any] = {
            **scenario.get("router", {}),
            "nodes": fleet.router_nodes(),
            "policy": {"name": name},
            "logging": {"level": "info", "access_log": access_log is not None},
        }
        if policy.endswith("-noaffinity"):
            cfg["affinity"] = {"enabled": False}
        if redis:
            proc, url = await start_redis(tmp)
            procs.append(proc)
            cfg["state"] = {"redis_url": url}
        urls = []
        for _ in range(2 if redis else 1):
            proc, url = await start_router(cfg, tmp, access_log)
            procs.append(proc)
            urls.append(url)
        spec = LoadSpec.from_dict(scenario.get("load", {}))
        seed = int(scenario.get("seed", 0))
        if spec.mode == "conversations":
            records = await run_conversations(urls, spec, seed)
        else:
            records = await run_load(urls, spec, duration, seed=seed)
        retries = sum([await scrape_retries(u) for u in urls])
        return records, list(fleet.log), retries
    finally:
        for proc in reversed(procs):
            await stop(proc)
        await fleet.close()


def fleet_size(scenario: dict[str, Any]) -> int:
    return sum(int(n.get("count", 1)) for n in scenario.get("fleet", {}).get("nodes", []))


def vram_shares(scenario: dict[str, Any]) -> dict[str, float]:
    """Each simulated node's share of the fleet's VRAM (node ids as the fleet names them)."""
    vram: dict[str, float] = {}
    for entry in scenario.get("fleet", {}).get("nodes", []):
        count = int(entry.get("count", 1))
        gb = PROFILES[entry.get("profile", "RTX 4090")].vram_gb
        for i in range(count):
            vram[entry["id"] if count == 1 else f"{entry['id']}-{i}"] = gb
    total = sum(vram.values()) or 1.0
    return {n: gb / total for n, gb in vram.items()}


def cache_hit_rate(records: list[Record]) -> float | None:
    """Share of the successful answers' prompt tokens served from the nodes' prefix
    caches (answers that report usage); None without any."""
    ok = [r for r in records if r.ok]
    prompt = sum(r.prompt_tokens for r in ok)
    return round(sum(r.cached_tokens for r in ok) / prompt, 4) if prompt else None


def summarize(
    records: list[Record],
    duration: float,
    retries: float,
    nodes: int = 0,
    vram: dict[str, float] | None = None,
) -> dict[str, Any]:
    vram = vram or {}
    ok = [r for r in records if r.ok]
    share = Counter(r.node for r in ok)
    mean_load = len(ok) / max(nodes, len(share), 1)
    return {
        "cache_hit_rate": cache_hit_rate(ok),
        # the busiest node's answers over the mean per node of the fleet, and over its
        # share of the fleet's VRAM
        "max_load_over_mean": round(max(share.values()) / mean_load, 2) if share else None,
        "max_load_over_vram_share": round(
            max(c / (len(ok) * vram[n]) for n, c in share.items() if n in vram), 2
        )
        if share and vram
        else None,
        "requests": len(records),
        "ok": len(ok),
        "success_rate": round(len(ok) / len(records), 4) if records else None,
        "latency_ms": {q: pct([r.latency for r in ok], v) for q, v in PCTS},
        "ttfb_ms": {q: pct([r.ttfb for r in ok if r.ttfb >= 0], v) for q, v in PCTS},
        "goodput_rps": round(len(ok) / duration, 2),
        "retries": retries,
        "per_node_share": {n: round(c / len(ok), 4) for n, c in sorted(share.items())},
        "per_node_requests": dict(sorted(share.items())),
        # seconds into the run of each node's last good answer (when it left rotation)
        "per_node_last_s": {n: round(max(r.t for r in ok if r.node == n), 2) for n in share},
        "statuses": dict(sorted(Counter(str(r.status) for r in records).items())),
        "errors": dict(sorted(Counter(r.error for r in records if r.error).items())),
    }


PCTS = (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))


def report_md(scenario: str, duration: float, summary: dict[str, dict[str, Any]]) -> str:
    lines = [
        f"# {scenario}: {duration:g} s per policy",
        "",
        "| policy | requests | success | p50 ms | p95 ms | p99 ms | TTFB p50 ms | TTFB p99 ms "
        "| goodput req/s | retries |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        lat, ttfb = s["latency_ms"], s["ttfb_ms"]
        lines.append(
            f"| {name} | {s['requests']} | {s['success_rate'] * 100:.1f}% | {lat['p50']} "
            f"| {lat['p95']} | {lat['p99']} | {ttfb['p50']} | {ttfb['p99']} "
            f"| {s['goodput_rps']} | {s['retries']:g} |"
        )
    if any(s["cache_hit_rate"] is not None for s in summary.values()):
        lines += [
            "",
            "| policy | TTFT p50 ms | TTFT p99 ms | prefix cache hit rate | max node load / mean "
            "| max node load / its VRAM share |",
            "|---|---|---|---|---|---|",
        ]
        for name, s in summary.items():
            hit = s["cache_hit_rate"]
            lines.append(
                f"| {name} | {s['ttfb_ms']['p50']} | {s['ttfb_ms']['p99']} "
                f"| {'-' if hit is None else f'{hit * 100:.1f}%'} | {s['max_load_over_mean']} "
                f"| {s['max_load_over_vram_share']} |"
            )
    return "\n".join(lines) + "\n"


def plot(
    out: Path,
    runs: dict[str, tuple[list[Record], list[tuple[float, str, str]], float]],
    duration: float,
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def cdf(
        name: str, curves: list[tuple[str, list[float], int]], x: str, y: str, title: str
    ) -> None:
        """One CDF plot: per curve a label, its values in ms and the count they are a share of."""
        fig, ax = plt.subplots(figsize=(8, 5))
        for label, values, of in curves:
            if values:
                values = sorted(values)
                ax.step(values, [(i + 1) / of for i in range(len(values))], where="post",
                        label=label)  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        path = out / name
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)

    written: list[Path] = []
    cdf(
        "latency_cdf.png",
        [
            (p, [r.latency * 1e3 for r in recs if r.ok], len(recs))
            for p, (recs, _, _) in runs.items()
        ],
        "latency (ms, log scale)",
        "share of all requests answered successfully",
        "Latency CDF per policy (failed requests never reach the top)",
    )
    if any(r.prompt_tokens for records, _, _ in runs.values() for r in records):
        curves = []  # answers with usage: prefix caching at work
        for name, (records, _, _) in runs.items():
            ttft = [r.ttfb * 1e3 for r in records if r.ok and r.ttfb >= 0]
            hit = cache_hit_rate(records) or 0.0
            curves.append((f"{name} (prefix cache hits {hit:.0%})", ttft, len(ttft)))
        cdf("ttft_cdf.png", curves, "time to first token (ms, log scale)", "share of requests",
            "Time to first token per policy")  # fmt: skip

    for name, (records, events, _) in runs.items():
        bins = max(1, int(duration))
        per_bin: list[Counter[str]] = [Counter() for _ in range(bins)]
        for r in records:
            if r.ok:
                per_bin[min(bins - 1, int(r.t))][r.node] += 1
        nodes = sorted({n for c in per_bin for n in c})
        series = defaultdict(list)
        for c in per_bin:
            total = sum(c.values()) or 1
            for n in nodes:
                series[n].append(c[n] / total)
        fig, ax = plt.subplots(figsize=(10, 5))
        if nodes:
            colors = [plt.get_cmap("tab20")(i % 20) for i in range(len(nodes))]
            xs = [b + 0.5 for b in range(bins)]
            ax.stackplot(xs, [series[n] for n in nodes], labels=nodes, colors=colors, alpha=0.9)
        for t, node, action in events:
            if t > duration:
                continue
            if action in ("recover", "join"):  # back: a dotted green line, no label
                ax.axvline(t, color="green", alpha=0.3, linewidth=0.8, linestyle=":")
                continue
            ax.axvline(t, color="black", alpha=0.3, linewidth=0.8)
            ax.text(t, 1.01, f"{node}:{action}", rotation=90, fontsize=6, va="bottom")
        ax.set_xlim(0, bins)
        ax.set_ylim(0, 1)
        ax.set_xlabel("seconds")
        ax.set_ylabel("share of successful requests")
        ax.set_title(
            f"Traffic share per node over time: {name} (black: fault/leave, green: back)",
            pad=70,
        )
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
        path = out / f"share_{name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


async def run_all(
    scenario: dict[str, Any],
    policies: list[str],
    duration: float,
    redis: bool,
    logs: Path | None = None,
) -> dict[str, tuple[list[Record], list[tuple[float, str, str]], float]]:
    tmp = Path(tempfile.mkdtemp(prefix="ballast-compare-"))
    runs = {}
    try:
        for policy in policies:
            log = logs / f"access-{policy}.jsonl" if logs is not None else None
            runs[policy] = await run_policy(scenario, policy, duration, redis, tmp, log)
            s = summarize(
                runs[policy][0], duration, runs[policy][2], fleet_size(scenario),
                vram_shares(scenario),
            )  # fmt: skip
            print(
                f"{policy}: {s['requests']} requests, success {s['success_rate']}, "
                f"p99 {s['latency_ms']['p99']} ms",
                file=sys.stderr,
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return runs


def compare(
    scenario_path: Path, policies: list[str], duration: float, out: Path, redis: bool
) -> dict[str, dict[str, Any]]:
    """Run every policy on the scenario and write the summary, report and plots."""
    scenario = yaml.safe_load(scenario_path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    runs = asyncio.run(run_all(scenario, policies, duration, redis, out))
    n, vram = fleet_size(scenario), vram_shares(scenario)
    summary = {p: summarize(r, duration, retries, n, vram) for p, (r, _, retries) in runs.items()}
    doc = {
        "scenario": scenario.get("name", scenario_path.stem),
        "duration_s": duration,
        "redis": redis,
        "policies": summary,
        "fault_events": {p: ev for p, (_, ev, _) in runs.items()},
    }
    (out / "summary.json").write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    (out / "report.md").write_text(report_md(doc["scenario"], duration, summary))
    plot(out, runs, duration)
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--scenario", required=True, type=Path)
    p.add_argument("--policies", default="round_robin,least_outstanding,p2c_peak_ewma")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load per policy")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--redis", action="store_true", help="two router replicas sharing Redis")
    args = p.parse_args()
    policies = [x for x in args.policies.split(",") if x]
    compare(args.scenario, policies, args.duration, args.out, args.redis)
    print((args.out / "report.md").read_text())


if __name__ == "__main__":
    main()
