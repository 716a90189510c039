"""A simulated fleet from a fleet file: many :class:`SimNode` on loopback, with
faults on a schedule or at random, churn, and nodes that lie.

Fleet file (YAML)::

    seed: 7
    time_scale: 1.0                 # multiply every simulated delay
    models: [tiny-llama]            # default models of every node
    prefix_cache: true              # nodes keep recent prompts' KV (prefill skips them)
    nodes:
      - id: h100                    # with count > 1: h100-0, h100-1, ...
        profile: H100               # H100, A100, L40S, RTX 4090, RTX 3090, T4
        count: 2
      - id: cheap
        profile: RTX 3090
        count: 4
        claims: [tiny-llama, big-model]   # lying: claims a model it does not serve
        claimed_vram_gb: 80               # lying: claims VRAM it lacks
        serves_as: small-model            # substitute: greedy answers are another model's
        join_at: 5                        # not up until t=5 s
        leave_at: 20                      # crashes for good at t=20 s
        faults:
          - {mode: error, status: 503, rate: 0.5, retry_after: 2, at: 5, for: 10}
          - {mode: hang, at: 3, for: 4}      # accepts, never answers
          - {mode: slow, factor: 4, at: 10}  # no "for": until the end
          - {mode: midstream, rate: 0.3, after_tokens: 2}
          - {mode: crash, at: 8, for: 4}     # connection refused
          - {mode: flap, period: 2, at: 0, for: 20}  # crash and recover every period
          - {mode: garbage, at: 5}           # 200 with a body that is no answer
    random_faults:                  # on top: faults on a share of nodes at random times
      labels: {pool: spot}          # only among nodes with these labels (nodes[].labels)
      fraction: 0.3
      modes: [crash, hang, error, slow, midstream, flap]
      duration_s: [2, 6]
    churn:                          # every_s, a share of the nodes leaves or rejoins
      labels: {pool: spot}          # only among nodes with these labels
      every_s: 3
      fraction: 0.2

``python -m loadtest.fleet FILE`` runs a fleet until interrupted and prints each
node's URL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from random import Random
from typing import Any

import yaml

from loadtest.simnode import PROFILES, Fault, SimNode, sim_config
from router.tasks import cancel_and_wait

FAULT_MODES = ("crash", "hang", "error", "slow", "midstream", "flap", "garbage")


@dataclass(order=True)
class Event:
    at: float
    node: str = field(compare=False)
    action: str = field(compare=False)  # fault mode, "recover", "join", "leave"
    params: dict[str, Any] = field(default_factory=dict, compare=False)


class Fleet:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.rng = Random(spec.get("seed", 0))
        scale = float(spec.get("time_scale", 1.0))
        default_models = list(spec.get("models", ["tiny-llama"]))
        self.sims: dict[str, SimNode] = {}
        self.claims: dict[str, dict[str, Any]] = {}
        self.events: list[Event] = []
        for entry in spec.get("nodes", []):
            count = int(entry.get("count", 1))
            for i in range(count):
                nid = entry["id"] if count == 1 else f"{entry['id']}-{i}"
                models = list(entry.get("models", default_models))
                profile = PROFILES[entry.get("profile", "RTX 4090")]
                cfg = sim_config(
                    nid, models, profile, time_scale=scale, seed=self.rng.randrange(1 << 30),
                    serves_as=entry.get("serves_as"),
                    prefix_cache=bool(spec.get("prefix_cache", False)),
                )  # fmt: skip
                self.sims[nid] = SimNode(cfg)
                self.claims[nid] = {
                    "models": list(entry.get("claims", models)),
                    "vram_gb": entry.get("claimed_vram_gb", profile.vram_gb),
                    "gpu": profile.name,
                }
                labels = {k: str(v) for k, v in entry.get("labels", {}).items()}
                if entry.get("declare_capacity"):  # what the engine runs at once
                    labels["max_concurrency"] = str(profile.max_seqs)
                if labels:
                    self.claims[nid]["labels"] = labels
                self._schedule(nid, entry)
        self._random_faults(spec.get("random_faults"))
        self._churn(spec.get("churn"), float(spec.get("duration_s", 600)))
        self.events.sort()
        self.log: list[tuple[float, str, str]] = []  # (t, node, what happened)
        self.t0 = 0.0
        self._task: asyncio.Task[None] | None = None
        self.progress = asyncio.Condition()  # notified after each applied event

    # -- building the schedule ----------------------------------------------------

    def _schedule(self, nid: str, entry: dict[str, Any]) -> None:
        if "join_at" in entry:
            self.events.append(Event(0.0, nid, "leave"))
            self.events.append(Event(float(entry["join_at"]), nid, "join"))
        if "leave_at" in entry:
            self.events.append(Event(float(entry["leave_at"]), nid, "leave"))
        for f in entry.get("faults", []):
            self._fault(nid, dict(f))

    def _fault(self, nid: str, f: dict[str, Any]) -> None:
        mode = f.pop("mode")
        if mode not in FAULT_MODES:
            raise ValueError(f"node {nid}: unknown fault mode {mode!r}")
        at = float(f.pop("at", 0.0))
        length = f.pop("for", None)
        if mode == "flap":
            period = float(f.pop("period", 2.0))
            end = at + float(length) if length is not None else at + 3600
            t, up = at, False
            while t < end:
                self.events.append(Event(t, nid, "recover" if up else "crash"))
                t, up = t + period / 2, not up
            if up:  # the last toggle was a crash: come back at the end
                self.events.append(Event(end, nid, "recover"))
            return
        self.events.append(Event(at, nid, mode, f))
        if length is not None:
            self.events.append(Event(at + float(length), nid, "recover"))

    def _random_faults(self, spec: dict[str, Any] | None) -> None:
        if not spec:
            return
        ids = self._matching(spec)
        chosen = self.rng.sample(ids, round(len(ids) * float(spec.get("fraction", 0.3))))
        modes = list(spec.get("modes", FAULT_MODES))
        lo, hi = spec.get("duration_s", [2, 6])
        window = float(spec.get("window_s", 20))
        for nid in chosen:
            mode = self.rng.choice(modes)
            f: dict[str, Any] = {
                "mode": mode,
                "at": round(self.rng.uniform(0, window), 2),
                "for": round(self.rng.uniform(lo, hi), 2),
            }
            if mode == "error":
                f |= {"status": self.rng.choice([500, 503, 429]), "rate": 0.7, "retry_after": 1}
            elif mode == "midstream":
                f |= {"rate": 0.5}
            elif mode == "flap":
                f |= {"period": 1.0}
            self._fault(nid, f)

    def _matching(self, spec: dict[str, Any]) -> list[str]:
        """The nodes whose labels include every one of ``spec["labels"]`` (all without)."""
        want = {k: str(v) for k, v in spec.get("labels", {}).items()}
        return sorted(
            nid for nid, claims in self.claims.items()
            if all(claims.get("labels", {}).get(k) == v for k, v in want.items())
        )  # fmt: skip

    def _churn(self, spec: dict[str, Any] | None, horizon: float) -> None:
        if not spec:
            return
        every = float(spec.get("every_s", 3))
        share = float(spec.get("fraction", 0.2))
        ids = self._matching(spec)
        away: set[str] = set()
        t = every
        while t < horizon:
            for nid in self.rng.sample(ids, max(1, round(len(ids) * share))):
                self.events.append(Event(t, nid, "join" if nid in away else "leave"))
                away ^= {nid}
            t += every

    # -- running ------------------------------------------------------------------

    async def start(self) -> None:
        """Bind every node (so URLs are known), then play the schedule."""
        for sim in self.sims.values():
            await sim.start()
        self.t0 = time.monotonic()
        self._task = asyncio.get_running_loop().create_task(self._play())

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        await asyncio.gather(*(sim.close() for sim in self.sims.values()))

    def router_nodes(self) -> list[dict[str, Any]]:
        """Static node entries for a router config: what each node *claims*."""
        return [{"id": nid, "url": sim.url, **self.claims[nid]} for nid, sim in self.sims.items()]

    async def _play(self) -> None:
        down: set[str] = set()
        for ev in self.events:
            delay = ev.at - (time.monotonic() - self.t0)
            if delay > 0:
                await asyncio.sleep(delay)
            sim = self.sims[ev.node]
            if ev.action in ("crash", "leave"):
                if ev.node not in down:
                    await sim.stop()
                    down.add(ev.node)
            elif ev.action == "join" or (ev.action == "recover" and ev.node in down):
                sim.set_fault(Fault())
                if ev.node in down:
                    await sim.start()
                    down.discard(ev.node)
            elif ev.action == "recover":
                sim.set_fault(Fault())
            else:
                sim.set_fault(Fault(mode=ev.action, **ev.params))
            self.log.append((round(time.monotonic() - self.t0, 3), ev.node, ev.action))
            async with self.progress:
                self.progress.notify_all()

    async def wait_events(self, n: int) -> None:
        """Until ``n`` scheduled events have been applied."""
        async with self.progress:
            await self.progress.wait_for(lambda: len(self.log) >= n)


def load_fleet(path: str | Path) -> Fleet:
    return Fleet(yaml.safe_load(Path(path).read_text()))


async def _serve(path: str) -> None:
    fleet = load_fleet(path)
    await fleet.start()
    for entry in fleet.router_nodes():
        print(f"{entry['id']:<16} {entry['gpu']:<9} {entry['url']}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await fleet.close()


def main() -> None:
    p = argparse.ArgumentParser(description="Run a simulated fleet from a fleet file.")
    p.add_argument("fleet", help="fleet file (YAML)")
    args = p.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.fleet))


if __name__ == "__main__":
    main()
