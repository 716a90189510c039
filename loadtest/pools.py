"""Spot and reserved: cheap unreliable supply first, reserved capacity as the guarantee.

    python -m loadtest.pools [--scenario loadtest/scenarios/spot-reserved.yaml] \\
        [--duration 60] [--out out/pools]

Plays the scenario's fleet (the same seeds, so the same churn and faults) three
times, each with a fresh ``ballast serve`` and the same load:

* (a) spot + reserved, with the scenario's ``pools`` (spillover);
* (b) reserved only: the router knows only the reserved nodes;
* (c) spot only: the router knows only the spot nodes.

Per run: requests, success, TTFB p50/p99, the share of tokens the spot pool
served and the cost per million tokens, both read from the router's own
``ballast_tokens_total`` and ``ballast_cost_total`` (router.pools states the cost
formula), and the ratios of (a) to (b). Writes ``DIR/report.md`` and
``DIR/share_by_pool.png`` (run (a): the share of answers each pool served per
second, with the fleet's events marked).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from prometheus_client.parser import text_string_to_metric_families

from loadtest.compare import pct, start_router, stop
from loadtest.fleet import Fleet
from loadtest.loadgen import LoadSpec, Record, run_load

DEFAULT = Path(__file__).parent / "scenarios" / "spot-reserved.yaml"
RUNS = {
    "a: spot + reserved": ("spot", "reserved"),
    "b: reserved only": ("reserved",),
    "c: spot only": ("spot",),
}


async def scrape(url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as resp:
        text = await resp.text()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def by_pool(samples: dict[tuple[tuple[str, str], ...], float]) -> Counter[str]:
    out: Counter[str] = Counter()
    for labels, value in samples.items():
        out[dict(labels)["pool"]] += value
    return out


async def run(
    scenario: dict[str, Any], pools: tuple[str, ...], duration: float
) -> tuple[list[Record], list[tuple[float, str, str]], dict[str, str], Counter[str], Counter[str]]:
    """One run: records, the fleet's event log, node -> pool, tokens and cost by pool."""
    fleet = Fleet({**scenario["fleet"], "duration_s": duration})
    pool_of = {n["id"]: n["labels"]["pool"] for n in fleet.router_nodes()}
    cfg = {
        **scenario.get("router", {}),
        "pools": scenario["pools"],
        "logging": {"level": "info", "access_log": False},
    }
    with tempfile.TemporaryDirectory() as tmp:
        await fleet.start()
        proc = None
        try:
            nodes = [n for n in fleet.router_nodes() if pool_of[n["id"]] in pools]
            proc, url = await start_router({**cfg, "nodes": nodes}, Path(tmp))
            spec = LoadSpec.from_dict(scenario["load"])
            records = await run_load([url], spec, duration, seed=int(scenario.get("seed", 0)))
            metrics = await scrape(url)
        finally:
            if proc is not None:
                await stop(proc)
            await fleet.close()
    tokens = by_pool(metrics.get("ballast_tokens_total", {}))
    cost = by_pool(metrics.get("ballast_cost_total", {}))
    return records, list(fleet.log), pool_of, tokens, cost


def summary(records: list[Record], tokens: Counter[str], cost: Counter[str]) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    all_tokens = sum(tokens.values())
    return {
        "requests": len(records),
        "success": len(ok) / len(records) if records else float("nan"),
        "ttfb_p50": pct([r.ttfb for r in ok], 0.5),
        "ttfb_p99": pct([r.ttfb for r in ok], 0.99),
        "spot_tokens": tokens["spot"] / all_tokens if all_tokens else 0.0,
        "tokens": all_tokens,
        "cost_per_mtok": sum(cost.values()) / all_tokens * 1e6 if all_tokens else float("nan"),
    }


def plot(
    path: Path,
    records: list[Record],
    events: list[tuple[float, str, str]],
    pool_of: dict[str, str],
    duration: float,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = max(1, int(duration))
    per_bin: list[Counter[str]] = [Counter() for _ in range(bins)]
    for r in records:
        if r.ok:
            per_bin[min(bins - 1, int(r.t))][pool_of.get(r.node, "?")] += 1
    fig, ax = plt.subplots(figsize=(10, 4.5))
    xs = [b + 0.5 for b in range(bins)]
    shares = {
        pool: [c[pool] / (sum(c.values()) or 1) for c in per_bin] for pool in ("spot", "reserved")
    }
    ax.stackplot(xs, shares["spot"], shares["reserved"], labels=["spot", "reserved"],
                 colors=["#4c9be8", "#f08a4b"], alpha=0.9)  # fmt: skip
    failed = [sum(1 for r in records if not r.ok and int(r.t) == b) for b in range(bins)]
    ax.bar(xs, [f / max(1, sum(c.values()) + f) for f, c in zip(failed, per_bin, strict=True)],
           bottom=0, color="black", width=0.8, label="failed")  # fmt: skip
    down = Counter(int(t) for t, _, what in events if what in ("crash", "leave"))
    for t, n in sorted(down.items()):
        if t < duration:
            ax.axvline(t, color="black", alpha=min(0.8, 0.15 + 0.04 * n), linewidth=0.8)
    ax.set_xlim(0, bins)
    ax.set_ylim(0, 1)
    ax.set_xlabel("seconds (vertical lines: spot nodes crashing or leaving; darker: more)")
    ax.set_ylabel("share of answers")
    ax.set_title("Spot and reserved with spillover: who served each second")
    ax.legend(loc="lower left")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


async def main_async(scenario: dict[str, Any], duration: float) -> tuple[str, Any]:
    """The report, and what the plot of run (a) needs."""
    results = {}
    for name, pools in RUNS.items():
        records, events, pool_of, tokens, cost = await run(scenario, pools, duration)
        results[name] = summary(records, tokens, cost)
        if name.startswith("a"):
            timeline = (records, events, pool_of)
    slo = scenario["pools"]["slo"]["ttfb_p95_ms"]
    lines = [
        f"{scenario['name']}: {duration:.0f} s per run, pools.slo.ttfb_p95_ms {slo}",
        "",
        "| run | requests | success | TTFB p50 ms | TTFB p99 ms | tokens from spot "
        "| cost per million tokens |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in results.items():
        lines.append(
            f"| {name} | {s['requests']} | {s['success'] * 100:.2f}% | {ms(s['ttfb_p50'])} | "
            f"{ms(s['ttfb_p99'])} | {s['spot_tokens'] * 100:.1f}% | {s['cost_per_mtok']:.4f} |"
        )
    a, b = results["a: spot + reserved"], results["b: reserved only"]
    lines += [
        "",
        f"(a) vs (b): cost per million tokens {a['cost_per_mtok'] / b['cost_per_mtok']:.2f}x, "
        f"success {a['success'] / b['success']:.4f}x; (a) TTFB p99 {ms(a['ttfb_p99'])} ms "
        f"against the SLO's {slo} ms",
    ]
    return "\n".join(lines), timeline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--scenario", type=Path, default=DEFAULT)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--out", type=Path, default=Path("out/pools"))
    args = ap.parse_args()
    scenario = yaml.safe_load(args.scenario.read_text())
    report, (records, events, pool_of) = asyncio.run(main_async(scenario, args.duration))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.md").write_text(report + "\n")
    plot(args.out / "share_by_pool.png", records, events, pool_of, args.duration)
    print(report)


if __name__ == "__main__":
    main()
