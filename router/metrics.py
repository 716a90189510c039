"""Prometheus metrics (``/metrics``), all prefixed ``ballast_``.

Per-request work is a few dict lookups and two histogram observations: label
children are cached per (model, code). Every label is bounded, whatever nodes
claim (:class:`ModelLabels`): ``model`` takes the configured models, then those
with the most routable nodes, up to ``metrics.max_models``; any other name is
``model="other"`` (``none`` when a request named none). Per-node series cover at
most ``metrics.max_nodes`` nodes, routable ones first. Everything per node
(scoreboard, attempts by outcome, state) and the supply picture are read from
the fleet at scrape time by :class:`FleetCollector`, so they cost nothing per
request however large the fleet; a scrape renders in a worker thread, one at a
time, so the event loop keeps serving while it runs.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import sys
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Sequence

from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from policies import Policy
from router.call import Exchange
from router.config import MetricsConfig
from router.errors import error_response
from router.fleet import ROUTABLE, Fleet, Node, NodeState
from router.health import HealthMonitor
from router.prober import Prober
from router.proxy import Proxy
from router.store import StateStore
from router.tasks import cancel_and_wait
from router.view import node_rows

# LLM latencies: tens of milliseconds (a cached embedding) to minutes (long generations).
LATENCY_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600,
)  # fmt: skip
GIB = 1024**3
PAGE = os.sysconf("SC_PAGE_SIZE")
MIRROR_INTERVAL_S = 1.0  # with --workers: how often a worker copies its per-process series
RENDER_SWITCH_S = 0.0005
RESUME_REASONS = ("reset", "stalled", "error_event", "garbage", "truncated")

disable_created_metrics()  # no *_created series: they double the series count for nothing


class ModelLabels:
    """The ``model`` label of a model name: configured models, then the models with
    the most routable nodes, up to ``limit`` values; anything else is ``other``.
    Recomputed when the fleet changes, never per request."""

    def __init__(self, fleet: Fleet, configured: Iterable[str], limit: int) -> None:
        self.fleet = fleet
        self.configured = list(configured)[:limit]
        self.limit = limit
        self._version = -1
        self._known: frozenset[str] = frozenset()

    @property
    def known(self) -> frozenset[str]:
        if self._version != self.fleet.version:
            count: Tally[str] = Tally()
            for node in list(self.fleet.nodes.values()):
                if node.state in ROUTABLE:
                    count.update(node.models)
            chosen = dict.fromkeys(self.configured)
            for model, _ in count.most_common():
                if len(chosen) >= self.limit:
                    break
                chosen[model] = None
            self._known = frozenset(chosen)
            self._version = self.fleet.version
        return self._known

    def __call__(self, model: str) -> str:
        if model in self.known:
            return model
        return "other" if model else "none"


class FleetCollector:
    """Per-node scoreboard and supply: the fleet view's rows, read at scrape time."""

    def __init__(
        self,
        fleet: Fleet,
        clock: Callable[[], float],
        policy: Callable[[], Policy | None],
        labels: ModelLabels,
        max_nodes: int,
    ) -> None:
        self.fleet = fleet
        self.clock = clock
        self.policy = policy
        self.labels = labels
        self.max_nodes = max_nodes
        self._version = -1
        self._shown: list[Node] = []
        self._omitted = 0
        self._supplied: list[Metric] = []

    def collect(self) -> Iterator[Metric]:
        version = self.fleet.version
        if version != self._version:
            # Which nodes get series, and the supply picture, change only with the
            # fleet (membership, state, claims): computed once per change.
            nodes = list(self.fleet.nodes.values())
            shown = nodes
            if len(nodes) > self.max_nodes:
                shown = sorted(nodes, key=lambda n: (n.state not in ROUTABLE, n.id))
                shown = shown[: self.max_nodes]
            self._shown, self._omitted = shown, len(nodes) - len(shown)
            self._supplied = list(self._supply(nodes))
            self._version = version
        shown = self._shown
        omitted = GaugeMetricFamily(
            "ballast_node_series_omitted",
            "Nodes without per-node series (beyond metrics.max_nodes)",
        )
        omitted.add_metric([], self._omitted)
        yield omitted
        rows = node_rows(shown, self.policy(), self.clock())
        attempts = CounterMetricFamily(
            "ballast_upstream_attempts",
            "Attempts sent to nodes, by outcome",
            labels=["node", "outcome"],
        )
        gauges = [
            (GaugeMetricFamily(name, doc, labels=["node"]), key, scale)
            for name, doc, key, scale in (
                ("ballast_node_latency_seconds", "Peak-EWMA latency estimate", "latency_ms", 1e-3),
                ("ballast_node_ttfb_seconds", "Peak-EWMA time to first byte (streams)", "ttfb_ms",
                 1e-3),
                ("ballast_node_success_ratio", "Decayed success ratio", "success_ratio", 1.0),
                ("ballast_node_in_flight", "Requests in flight to the node", "in_flight", 1.0),
                ("ballast_node_cost", "Routing cost under the current policy; lower is preferred",
                 "cost", 1.0),
            )
        ]  # fmt: skip
        state = GaugeMetricFamily(
            "ballast_node_state", "1 for the node's current state", labels=["node", "state"]
        )
        for row in rows:
            nid = row["id"]
            for outcome, n in row["outcomes"].items():
                attempts.add_metric([nid, outcome], n)
            for fam, key, scale in gauges:
                fam.add_metric([nid], row[key] * scale)
            for s in NodeState:
                state.add_metric([nid, s.value], 1.0 if row["state"] == s.value else 0.0)
        yield attempts
        yield from (fam for fam, _, _ in gauges)
        yield state
        yield from self._supplied

    def _supply(self, nodes: list[Node]) -> Iterator[Metric]:
        count: Tally[tuple[str, str]] = Tally()
        gpus: Tally[tuple[str, str]] = Tally()
        vram: Tally[tuple[str, str]] = Tally()
        models: set[str] = set()
        label = self.labels
        for node in nodes:
            for m in {label(m) for m in node.models}:
                models.add(m)
                key = (m, node.state.value)
                count[key] += 1
                gpus[key] += node.gpus
                vram[key] += (node.vram_gb or 0) * GIB
        families = (
            ("ballast_supply_nodes", "Nodes claiming each model, by state", count),
            ("ballast_supply_gpus", "Claimed GPUs per model, by node state", gpus),
            ("ballast_supply_vram_bytes", "Claimed VRAM per model, by node state", vram),
        )
        for name, doc, tally in families:
            fam = GaugeMetricFamily(name, doc, labels=["model", "state"])
            for m in sorted(models):
                for s in NodeState:
                    fam.add_metric([m, s.value], tally[(m, s.value)])
            yield fam


class RouterCollector:
    """Ejections, probes, hedges and the supply queue, read at scrape time."""

    def __init__(self, proxy: Proxy, health: HealthMonitor, prober: Prober | None) -> None:
        self.proxy = proxy
        self.health = health
        self.prober = prober

    def collect(self) -> Iterator[Metric]:
        ej = CounterMetricFamily("ballast_ejections", "Nodes ejected by passive health checks")
        ej.add_metric([], self.health.ejections_total)
        yield ej
        probes = CounterMetricFamily(
            "ballast_probes", "Active probes of nodes, by outcome", labels=["outcome"]
        )
        for outcome in ("ok", "failed"):
            probes.add_metric([outcome], self.prober.outcomes[outcome] if self.prober else 0)
        yield probes
        sent = CounterMetricFamily("ballast_hedges", "Hedged copies sent to a second node")
        sent.add_metric([], self.proxy.hedging.sent)
        yield sent
        won = CounterMetricFamily("ballast_hedges_won", "Hedged copies that answered first")
        won.add_metric([], self.proxy.hedging.won)
        yield won
        queue = GaugeMetricFamily("ballast_queue_length", "Requests waiting for supply")
        queue.add_metric([], self.proxy.queued)
        yield queue
        if self.proxy.pools is not None:
            spilling = GaugeMetricFamily(
                "ballast_pool_spilling",
                "1 while this router process sends a pool's traffic to the next pool (its "
                "SLO broken); summed over --workers",
                labels=["pool"],
            )
            for pool in self.proxy.pools.pools:
                spilling.add_metric([pool.name], float(pool.spilling))
            yield spilling


class StoreCollector:
    """State store health and errors, read at scrape time."""

    def __init__(self, store: StateStore) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "ballast_store_up", "1 when the state store is reachable", labels=["backend"]
        )
        up.add_metric([self.store.backend], 1.0 if self.store.healthy else 0.0)
        yield up
        errors = CounterMetricFamily(
            "ballast_store_errors", "Failed state store operations", labels=["backend"]
        )
        errors.add_metric([self.store.backend], self.store.errors)
        yield errors


class OwnProcessCollector:
    """This process's CPU time and resident memory under Ballast's own names, so one
    dashboard query is right with and without ``--workers`` (where prometheus-client's
    process series are absent)."""

    def collect(self) -> Iterator[Metric]:
        t = os.times()
        cpu = CounterMetricFamily("ballast_process_cpu_seconds", "CPU time of router processes")
        cpu.add_metric([], t.user + t.system)
        yield cpu
        rss = GaugeMetricFamily(
            "ballast_process_resident_memory_bytes", "Resident memory of router processes"
        )
        rss.add_metric([], _rss_bytes())
        yield rss


def _rss_bytes() -> float:
    try:
        with open("/proc/self/statm") as f:
            return float(f.read().split()[1]) * PAGE
    except OSError:
        return 0.0


# Per-process values (counters, and gauges that add up over processes): with
# --workers they are copied into prometheus-client's shared files (see Mirror).
PER_PROCESS = frozenset(
    {
        "ballast_upstream_attempts",
        "ballast_node_in_flight",
        "ballast_ejections",
        "ballast_probes",
        "ballast_hedges",
        "ballast_hedges_won",
        "ballast_queue_length",
        "ballast_pool_spilling",
        "ballast_process_cpu_seconds",
        "ballast_process_resident_memory_bytes",
    }
)


class Without:
    """A collector's families but those named in ``names``."""

    def __init__(self, collector: Collector, names: frozenset[str]) -> None:
        self.collector = collector
        self.names = names

    def collect(self) -> Iterator[Metric]:
        return (f for f in self.collector.collect() if f.name not in self.names)


class Mirror:
    """With ``serve --workers N``: this worker's per-process series, copied into the
    files all workers share, so any worker's ``/metrics`` reports their sum.
    Counters grow by what this process added since the last copy (a node forgotten
    and seen again restarts its local count; the shared one never goes back);
    gauges are summed over live workers. Copied every ``MIRROR_INTERVAL_S`` and
    before a scrape, off the request path."""

    def __init__(self, sources: Sequence[Collector], registry: CollectorRegistry) -> None:
        self.sources = sources
        self.registry = registry
        self._metrics: dict[str, Counter | Gauge] = {}
        self._last: dict[tuple[str, tuple[str, ...]], float] = {}

    def sync(self) -> None:
        for source in self.sources:
            for fam in source.collect():
                if fam.name not in PER_PROCESS:
                    continue
                for sample in fam.samples:
                    labels = tuple(sample.labels.values())
                    metric = self._metric(fam, list(sample.labels))
                    child = metric.labels(*labels) if labels else metric
                    if isinstance(child, Gauge):
                        child.set(sample.value)
                        continue
                    key = (fam.name, labels)
                    delta = sample.value - self._last.get(key, 0.0)
                    self._last[key] = sample.value
                    if delta > 0:
                        child.inc(delta)

    def _metric(self, fam: Metric, labels: list[str]) -> Counter | Gauge:
        metric = self._metrics.get(fam.name)
        if metric is None:
            if fam.type == "counter":
                metric = Counter(fam.name, fam.documentation, labels, registry=self.registry)
            else:
                metric = Gauge(
                    fam.name, fam.documentation, labels, registry=self.registry,
                    multiprocess_mode="livesum",
                )  # fmt: skip
            self._metrics[fam.name] = metric
        return metric


Sums = dict[tuple[str, str], list[float]]  # (prompt tokens, completion tokens, cost) by pair


def _add(sums: Sums, pair: tuple[str, str], tokens: tuple[float, float], cost: float) -> None:
    row = sums.get(pair)
    if row is None:
        sums[pair] = [tokens[0], tokens[1], cost]
    else:
        row[0] += tokens[0]
        row[1] += tokens[1]
        row[2] += cost


def _child(cache: dict[tuple[str, ...], Counter], metric: Counter, *labels: str) -> Counter:
    """``metric``'s child for ``labels``, looked up once and kept in ``cache``."""
    child = cache.get(labels)
    if child is None:
        child = cache[labels] = metric.labels(*labels)
    return child


class Metrics:
    """The process's metrics; ``observe`` takes finished requests in batches."""

    def __init__(
        self,
        fleet: Fleet,
        store: StateStore,
        active: Callable[[], float],
        cfg: MetricsConfig,
        configured_models: Iterable[str] = (),
        clock: Callable[[], float] = time.monotonic,
        proxy: Proxy | None = None,
        health: HealthMonitor | None = None,
        prober: Prober | None = None,
    ) -> None:
        self.fleet = fleet
        self.active = active
        self.model_label = ModelLabels(fleet, configured_models, cfg.max_models)
        self.token = os.environ.get(cfg.token_env) if cfg.token_env else None
        self._rendering: asyncio.Future[bytes] | None = None
        # With `serve --workers N` (PROMETHEUS_MULTIPROC_DIR set before the fork),
        # counters and histograms live in files shared by all workers and any
        # worker's /metrics reports their sum; fleet and store series are that
        # worker's view (shared through Redis), process series are left out.
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.collectors = CollectorRegistry(auto_describe=True)
        if self.multiprocess:
            MultiProcessCollector(self.collectors)
            reg = CollectorRegistry()  # the metric objects below write to the shared files
        else:
            reg = self.collectors
            ProcessCollector(registry=reg)
            PlatformCollector(registry=reg)
            GCCollector(registry=reg)
        self.requests = Counter(
            "ballast_requests",
            "Client requests by model and status",
            ["model", "code"],
            registry=reg,
        )
        self.duration = Histogram(
            "ballast_request_duration_seconds",
            "Client request duration",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.ttfb = Histogram(
            "ballast_ttfb_seconds",
            "Time from request arrival to the node's first byte",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.retries = Counter(
            "ballast_retries", "Attempts beyond the first, over all requests", registry=reg
        )
        self.in_flight = Gauge(
            "ballast_in_flight",
            "Client requests in progress",
            registry=reg,
            multiprocess_mode="livesum",
        )
        if not self.multiprocess:
            self.in_flight.set_function(active)
        self.resumes = Counter(
            "ballast_stream_resumes",
            "Streams whose node failed mid-answer, by why and by what happened: continued "
            "on another node, ended (nothing left to ask for), or not continued (refused, "
            "no_node, deadline, budget, failed: the stream ended with an error event)",
            ["model", "reason", "outcome"],
            registry=reg,
        )
        for model in {self.model_label(m) for node in fleet.nodes.values() for m in node.models}:
            for reason in RESUME_REASONS:  # zero series from the start, so rate() sees the first
                self.resumes.labels(model, reason, "continued")
        self.affinity = Counter(
            "ballast_affinity",
            "Requests placed by their affinity key: hit (the key's own node), spill "
            "(another node: the key's was over its load bound), none (no key, or a policy "
            "without affinity)",
            ["model", "outcome"],
            registry=reg,
        )
        self._affinity: dict[tuple[str, ...], Counter] = {}
        self.queue_wait = Histogram(
            "ballast_queue_wait_seconds",
            "Time requests waited for supply or capacity (only those that waited), by class",
            ["priority"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        for priority in ("interactive", "batch"):  # series from the start
            self.queue_wait.labels(priority)

        def policy() -> Policy | None:
            return proxy.policy if proxy is not None else None

        local: list[Collector] = [
            FleetCollector(fleet, clock, policy, self.model_label, cfg.max_nodes),
            OwnProcessCollector(),
        ]
        if proxy is not None and health is not None:
            local.append(RouterCollector(proxy, health, prober))
        self.mirror: Mirror | None = None
        if self.multiprocess:
            self.mirror = Mirror(local, reg)
            local = [Without(c, PER_PROCESS) for c in local]
        for collector in local:
            self.collectors.register(collector)
        self.collectors.register(StoreCollector(store))
        self.key_requests = Counter(
            "ballast_key_requests",
            "Client requests made with a client key, by key name, model and status "
            "(429 with rate_limited: over the key's limits)",
            ["key", "model", "code"],
            registry=reg,
        )
        self.key_tokens = Counter(
            "ballast_key_tokens",
            "Tokens used with a client key, as the nodes counted them (kind: prompt, completion)",
            ["key", "model", "kind"],
            registry=reg,
        )
        self.key_limited = Counter(
            "ballast_key_rate_limited",
            "Requests refused over their client key's rpm, tpm or parallel limit",
            ["key"],
            registry=reg,
        )
        self.tokens = Counter(
            "ballast_tokens",
            "Tokens of answers, as the nodes counted them, by the serving node's pool "
            "(kind: prompt, completion); counted once pools are configured or a node has "
            "a price",
            ["model", "pool", "kind"],
            registry=reg,
        )
        self.cost = Counter(
            "ballast_cost",
            "What answers cost, in the currency of the nodes' prices (router.pools), by "
            "the serving node's pool",
            ["model", "pool"],
            registry=reg,
        )
        self.key_cost = Counter(
            "ballast_key_cost",
            "What a client key's answers cost, in the currency of the nodes' prices",
            ["key", "model"],
            registry=reg,
        )
        self.fallbacks = Counter(
            "ballast_fallbacks",
            "Requests a fallback model served (model: the one asked for)",
            ["model", "fallback"],
            registry=reg,
        )
        self._key_children: dict[tuple[str, ...], Counter] = {}
        # Tokens (three labels) and cost (two) by (model, pool), and by (key, model).
        self._pooled: dict[tuple[str, ...], Counter] = {}
        self._per_key: dict[tuple[str, ...], Counter] = {}
        self._key_label: dict[str, str] = {}
        self.max_keys = cfg.max_keys
        self._mirroring: asyncio.Task[None] | None = None
        self._requests: dict[tuple[str, ...], Counter] = {}
        self._by_model: dict[str, tuple[Histogram, Histogram]] = {}

    def start(self) -> None:
        if self.mirror is not None:
            self._mirroring = asyncio.get_running_loop().create_task(self._mirror(self.mirror))

    async def stop(self) -> None:
        await cancel_and_wait(self._mirroring)
        if self.mirror is not None:
            self.mirror.sync()  # what this worker counted last outlives it

    async def _mirror(self, mirror: Mirror) -> None:
        while True:
            await asyncio.sleep(MIRROR_INTERVAL_S)
            try:
                mirror.sync()
            except RuntimeError:  # a node table changed mid-read: next time
                pass

    def observe(self, batch: Sequence[Exchange]) -> None:
        """Count a batch of finished requests (from the Recorder)."""
        label, requests, by_model = self.model_label, self._requests, self._by_model
        retries = 0
        # Summed over the batch, then one increment per series: requests by model and
        # status, and by model and placement; per client key; tokens and cost per
        # (model, pool) and per (key, model).
        counted: dict[tuple[str, str], int] = {}
        placed: dict[tuple[str, str], int] = {}
        keyed: dict[tuple[str, str, str, bool], list[float]] = {}
        pooled: Sums = {}
        per_key: Sums = {}
        by_pool = self.fleet.pools is not None or self.fleet.priced  # tokens by pool, cost
        for ex in batch:
            model, code = label(ex.model), str(ex.status)
            counted[(model, code)] = counted.get((model, code), 0) + 1
            hists = by_model.get(model)
            if hists is None:
                hists = by_model[model] = (self.duration.labels(model), self.ttfb.labels(model))
            hists[0].observe(ex.duration)
            if ex.ttfb >= 0:
                hists[1].observe(ex.ttfb)
            retries += max(0, ex.attempts - 1)
            if ex.attempts:
                placed[(model, ex.affinity)] = placed.get((model, ex.affinity), 0) + 1
            if ex.queued_s:
                self.queue_wait.labels(ex.priority).observe(ex.queued_s)
            for _, reason, outcome in ex.resumed:
                self.resumes.labels(model, reason, outcome).inc()
            if ex.fallback:
                self.fallbacks.labels(label(ex.fallback), model).inc()
            if by_pool and ex.tokens is not None:
                _add(pooled, (model, ex.pool or "none"), ex.tokens, ex.cost)
            if ex.key:  # by the key's name here; by its label below, once per batch
                series = (ex.key, model, code, ex.limited)
                row = keyed.get(series)
                if row is None:
                    row = keyed[series] = [0, 0, 0, 0.0]
                row[0] += 1
                if ex.tokens is not None:
                    row[1] += ex.tokens[0]
                    row[2] += ex.tokens[1]
                    row[3] += ex.cost
        for pair, n in counted.items():
            _child(requests, self.requests, *pair).inc(n)
        for pair, n in placed.items():
            _child(self._affinity, self.affinity, *pair).inc(n)
        for (name, model, code, limited), (n, prompt, completion, spent) in keyed.items():
            key = self._key_name(name)
            _child(self._key_children, self.key_requests, key, model, code).inc(n)
            if limited:
                self.key_limited.labels(key).inc(n)
            _add(per_key, (key, model), (prompt, completion), spent)
        for sums, cache, tokens, cost in (
            (pooled, self._pooled, self.tokens, self.cost),
            (per_key, self._per_key, self.key_tokens, self.key_cost),
        ):
            for pair, (prompt, completion, spent) in sums.items():
                if prompt or completion:
                    _child(cache, tokens, *pair, "prompt").inc(prompt)
                    _child(cache, tokens, *pair, "completion").inc(completion)
                if spent:
                    _child(cache, cost, *pair).inc(spent)
        if retries:
            self.retries.inc(retries)
        if self.multiprocess:  # each worker's share; summed over live workers
            self.in_flight.set(self.active())

    def _key_name(self, name: str) -> str:
        """A client key's label: its name for the first ``metrics.max_keys`` names
        seen, then "other"."""
        key = self._key_label.get(name)
        if key is None:
            key = name if len(self._key_label) < self.max_keys else "other"
            self._key_label[name] = key
        return key

    def denied(self, request: web.Request) -> web.Response | None:
        """With ``metrics.token_env`` set, a scrape needs that bearer token."""
        if self.token is None:
            return None
        given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        if hmac.compare_digest(given, f"Bearer {self.token}".encode()):
            return None
        return error_response(
            401, "missing or wrong metrics token", "authentication_error", "invalid_metrics_token"
        )

    async def render(self) -> bytes:
        """The exposition, rendered in a worker thread; scrapes arriving meanwhile
        share that rendering."""
        if self._rendering is None:
            if self.mirror is not None:
                self.mirror.sync()
            self._rendering = asyncio.ensure_future(asyncio.to_thread(self._render))
            self._rendering.add_done_callback(self._rendered)
        return await asyncio.shield(self._rendering)

    def _rendered(self, _: asyncio.Future[bytes]) -> None:
        self._rendering = None

    def _render(self) -> bytes:
        # While it renders, this thread hands the interpreter back to the event loop
        # every RENDER_SWITCH_S instead of every 5 ms, so requests wait at most that.
        switch = sys.getswitchinterval()
        sys.setswitchinterval(RENDER_SWITCH_S)
        try:
            return generate_latest(self.collectors)
        except RuntimeError:  # the loop changed a node's table mid-read: read again
            return generate_latest(self.collectors)
        finally:
            sys.setswitchinterval(switch)
