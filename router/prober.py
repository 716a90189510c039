"""Active probes: supply is what has proved it serves.

A node that joined (or a static node with ``health.verify_static``) is
``registered``: claims only. The prober asks its ``/v1/models`` and then runs a
real small inference (a streamed, greedy chat completion of a prompt drawn from
:data:`router.challenges.PROMPTS`; embeddings for embedding models) for every
model it claims. Only when every claimed model answers, and its answers agree
with those of the other nodes serving the model (:mod:`router.challenges`), is
the node ``verified`` and a candidate. A model the node does not list, or an
inference that fails, keeps it out, with the reason. A node in ejection
back-off (kept across re-registration) is first probed when its back-off ends.

Probes look like traffic: sent like proxied requests (``Upstream.send``), with
no user agent of their own, varied prompts and jittered timing.

Verified nodes keep being probed at a slower pace (``verified_probe_interval_s``)
and what they deliver (time to first token, tokens/s) is recorded next to what
they claim; ``probe_failures_to_unverify`` failed probes in a row send a node
back to ``registered``. When a model has no routable node left (a supply dip),
its ejected nodes are probed every half second and return as soon as they
answer, instead of waiting out their back-off.

Probes run with bounded concurrency, jittered intervals and their own timeout;
no answer is read beyond a bound, and no redirect is followed. With several
router processes sharing a store, each node is probed by one of them (chosen by
:func:`probe_key` and the store's rendezvous hashing) and the verdict reaches the
others through the store, so the probe load on a node does not grow with the
number of routers.

Optionally (``health.scrape_engine_metrics``) the nodes' own ``/metrics`` are
scraped: vLLM, SGLang and llama.cpp queue depth, running requests and KV-cache
use feed the ``score`` policy.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections import Counter
from collections.abc import Callable
from random import Random

import aiohttp
import orjson
from aiohttp import ClientResponse

from router import engines
from router.addresses import VIA_HEADER
from router.challenges import PROMPTS, Challenges
from router.config import HealthConfig
from router.fleet import ROUTABLE, Fleet, Node, NodeState
from router.measure import EngineLoad, parse_engine_metrics
from router.relay import Relay
from router.store import StateStore
from router.tasks import cancel_and_wait
from router.upstream import Upstream

log = logging.getLogger("ballast.prober")

DIP_PROBE_INTERVAL_S = 0.5
IDLE_TICK_S = 0.25  # longest sleep of the scheduler
MAX_MODELS_BYTES = 1 << 20  # a /v1/models (or probe) answer larger than this fails the probe
MAX_METRICS_BYTES = 4 << 20  # a /metrics page larger than this is not read


Answers = dict[str, tuple[int, str]]  # model -> (challenge prompt, the node's answer)


def probe_key(node: Node) -> str:
    """Which router process probes a node (:meth:`StateStore.owns`): all nodes whose
    first model is the same go to one process, so that its challenges compare
    their answers with each other."""
    return min(node.models, default="")


class ProbeFailed(Exception):
    """A failed probe. ``definitive``: the node contradicts its claims (a model it
    does not list or cannot serve), as opposed to a timeout or a 5xx that may pass."""

    def __init__(self, message: str, definitive: bool = False) -> None:
        super().__init__(message)
        self.definitive = definitive


class Prober:
    def __init__(
        self,
        cfg: HealthConfig,
        fleet: Fleet,
        store: StateStore,
        upstream: Upstream,
        clock: Callable[[], float] = time.monotonic,
        rng: Random | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.fleet = fleet
        self.wall = wall
        self.store = store
        self.upstream = upstream
        self.clock = clock
        self.rng = rng or Random()
        self.timeout = aiohttp.ClientTimeout(total=cfg.probe_timeout_s)
        self.outcomes: Counter[str] = Counter()  # probes by outcome (ok, failed)
        self.challenges = (
            Challenges(cfg.challenge_min_nodes, cfg.challenge_words, cfg.challenge_strikes)
            if cfg.challenges
            else None
        )
        self._slots = asyncio.Semaphore(cfg.probe_concurrency)
        self._busy: set[str] = set()
        self._due: list[tuple[float, str]] = []  # (when, node id): a heap
        self._first_round: set[str] = set()  # nodes waiting for their first probe at start
        self.settled = asyncio.Event()  # every node waiting at start has had its first probe
        self._fleet_version = -1
        self._tasks: list[asyncio.Task[None]] = []
        self._running: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        """Probe at once, concurrently, every node that waits for verification."""
        self._first_round = {
            n.id for n in self.fleet.nodes.values() if n.state is NodeState.REGISTERED
        }
        if not self._first_round:
            self.settled.set()
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._schedule()))
        if self.cfg.scrape_engine_metrics:
            self._tasks.append(loop.create_task(self._scrape_loop()))

    async def stop(self) -> None:
        await cancel_and_wait(*self._tasks, *self._running)

    # -- scheduling ----------------------------------------------------------------

    def _interval(self, base: float) -> float:
        return base * self.rng.uniform(0.5, 1.5)

    def _pace(self, node: Node, dip: set[str]) -> float | None:
        """Seconds between probes of ``node`` in its current state; None: not probed."""
        if node.state is NodeState.REGISTERED:
            return self.cfg.probe_interval_s
        if node.state in ROUTABLE:
            return self.cfg.verified_probe_interval_s
        if node.state is NodeState.EJECTED and not dip.isdisjoint(node.models):
            return DIP_PROBE_INTERVAL_S
        return None

    def _reschedule(self, now: float) -> None:
        """The fleet changed: put every node on the heap at its current pace (its
        earlier entry, if later, is then skipped when it comes up)."""
        self._fleet_version = self.fleet.version
        if self.challenges is not None:  # removed nodes' answers go with them
            self.challenges.forget_absent(self.fleet.nodes)
        dip = self._dip()
        for node in self.fleet.nodes.values():
            pace = self._pace(node, dip)
            if pace is None:
                continue
            # Due, or scheduled further out than its current pace allows.
            if not (now < node.next_probe <= now + pace):
                node.next_probe = now
            heapq.heappush(self._due, (node.next_probe, node.id))

    def _dip(self) -> set[str]:
        """Models with ejected nodes and no routable one."""
        ejected = {m for n in self.fleet.ejected() for m in n.models}
        return ejected - set(self.fleet.served_models()) if ejected else set()

    def due(self, now: float) -> list[Node]:
        """Nodes to probe now; each gets its next time. Costs O(due nodes) unless
        the fleet changed since the last call."""
        if self.fleet.version != self._fleet_version:
            self._reschedule(now)
        out: list[Node] = []
        due = self._due
        dip: set[str] | None = None
        while due and due[0][0] <= now:
            when, node_id = heapq.heappop(due)
            node = self.fleet.nodes.get(node_id)
            if node is None or when != node.next_probe:
                continue  # removed, or a stale entry
            if node_id in self._busy:  # still being probed: look again shortly
                node.next_probe = now + IDLE_TICK_S
                heapq.heappush(due, (node.next_probe, node_id))
                continue
            if dip is None:
                dip = self._dip()
            pace = self._pace(node, dip)
            if pace is None:
                continue
            if not self.store.owns(probe_key(node)):  # another router process probes it
                self._first_round.discard(node.id)
                if not self._first_round:
                    self.settled.set()
                node.next_probe = now + self._interval(pace)
                heapq.heappush(due, (node.next_probe, node_id))
                continue
            backoff = node.ejected_until - self.wall()
            if node.state is NodeState.REGISTERED and backoff > 0:
                node.next_probe = now + backoff  # re-registered while ejected: wait it out
                heapq.heappush(due, (node.next_probe, node_id))
                continue
            node.next_probe = now + self._interval(pace)
            heapq.heappush(due, (node.next_probe, node_id))
            out.append(node)
        return out

    async def _schedule(self) -> None:
        while True:
            now = self.clock()
            for node in self.due(now):
                self._busy.add(node.id)
                task = asyncio.get_running_loop().create_task(self._probe_one(node))
                self._running.add(task)
                task.add_done_callback(self._running.discard)
            wait = self._due[0][0] - self.clock() if self._due else IDLE_TICK_S
            await asyncio.sleep(min(max(wait, 0.0), IDLE_TICK_S))

    async def _probe_one(self, node: Node) -> None:
        try:
            async with self._slots:
                state_before = node.state
                try:
                    findings, answers = await self.probe(node)
                except ProbeFailed as e:
                    self.outcomes["failed"] += 1
                    await self._failed(node, state_before, str(e), e.definitive)
                else:
                    await self._passed(node, state_before, findings, answers)
        except Exception:
            log.exception("probe of %s failed unexpectedly", node.id)
        finally:
            self._busy.discard(node.id)
            if node.id in self._first_round:
                self._first_round.discard(node.id)
                if not self._first_round:
                    self.settled.set()

    async def _passed(
        self, node: Node, before: NodeState, findings: dict[str, object], answers: Answers
    ) -> None:
        # A node removed while it was probed leaves no answers behind.
        if self.challenges is not None and node.id in self.fleet.nodes:
            self.challenges.retain(node.id, node.engine, node.models)
            for model, (prompt, text) in answers.items():
                self.challenges.record(model, node.engine, prompt, node.id, text)
            why = self.challenges.suspect(node.id, verified=before in ROUTABLE)
            if why is not None:
                self.outcomes["failed"] += 1
                await self._failed(node, before, why, definitive=True)
                return
        self.outcomes["ok"] += 1
        node.probe = {"ok": True, "at": self.wall(), **findings}
        node.probe_failures = 0
        if node.id not in self.fleet.nodes or node.state is not before:
            return  # changed meanwhile (drained, removed, ejected): leave it
        if before is NodeState.REGISTERED:
            why = "answered a real inference for every claimed model"
            await self.store.set_state(node.id, NodeState.VERIFIED, why)
        elif before is NodeState.EJECTED:
            why = "answered a probe while its model had no supply; slow start"
            await self.store.set_state(node.id, NodeState.SERVING, why)

    async def _failed(self, node: Node, before: NodeState, why: str, definitive: bool) -> None:
        node.probe = {"ok": False, "at": self.wall(), "error": why}
        node.probe_failures += 1
        if node.id not in self.fleet.nodes or node.state is not before:
            return
        if before is NodeState.REGISTERED and node.state_reason != f"not verified: {why}":
            await self.store.set_state(node.id, NodeState.REGISTERED, f"not verified: {why}")
        elif before in ROUTABLE and (
            definitive or node.probe_failures >= self.cfg.probe_failures_to_unverify
        ):
            reason = f"failed {node.probe_failures} probes in a row: {why}"
            log.warning("node %s is no longer verified: %s", node.id, reason)
            await self.store.set_state(node.id, NodeState.REGISTERED, reason)

    # -- one probe -------------------------------------------------------------------

    def _get_headers(self, node: Node) -> dict[str, str]:
        h = {"x-request-id": self.upstream.ids.new(), VIA_HEADER: self.upstream.router_id}
        if node.auth_header:
            h["Authorization"] = node.auth_header
        return h

    async def probe(self, node: Node) -> tuple[dict[str, object], Answers]:
        """Check every claimed model with a real tiny inference; raise ProbeFailed.
        Returns what was measured and the node's answers to the challenges.

        The inference is built and sent like proxied traffic (``Upstream.send``:
        the same headers, request id, key and connection handling), so a node
        that cannot serve traffic cannot pass it."""
        try:
            async with asyncio.timeout(self.cfg.probe_timeout_s):
                listed = await self._listed_models(node)
                per_model: dict[str, dict[str, float]] = {}
                answers: Answers = {}
                for model in node.models:
                    if listed is not None and node.served.get(model, model) not in listed:
                        raise ProbeFailed(
                            f"claims {model[:64]!r} but its /v1/models does not list it",
                            definitive=True,
                        )
                    per_model[model], answer = await self._tiny_inference(node, model)
                    if answer is not None:
                        answers[model] = answer
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise ProbeFailed(f"{type(e).__name__} {e}"[:300].strip()) from None
        first = next(iter(per_model.values()), {})
        return {**first, "models": per_model}, answers

    async def _listed_models(self, node: Node) -> set[str] | None:
        """The models the node lists; also what it tells of its engine and context."""
        async with self.upstream.session.get(
            node.url + "/v1/models", headers=self._get_headers(node), timeout=self.timeout,
            allow_redirects=False,
        ) as resp:  # fmt: skip
            if resp.status == 404:
                return None  # no model list: the inference decides
            if resp.status != 200:
                raise ProbeFailed(f"/v1/models answered HTTP {resp.status}")
            raw = await self.upstream.read_body(resp, MAX_MODELS_BYTES)
            try:
                doc = orjson.loads(raw)
                listed = {m["id"] for m in doc["data"]}
            except (orjson.JSONDecodeError, KeyError, TypeError) as e:
                raise ProbeFailed("/v1/models is not an OpenAI model list") from e
            if node.engine == engines.UNKNOWN:  # a configured engine is kept
                node.engine = engines.detect(doc, resp.headers.get("Server"))
            for model in node.models:
                n_ctx = engines.context_length_of(node.engine, doc, node.served.get(model, model))
                if n_ctx is not None:
                    node.context_length = n_ctx
            return listed

    async def _post(self, node: Node, path: str, doc: dict[str, object]) -> ClientResponse:
        headers = self.upstream.headers({}, self.upstream.ids.new())
        deadline = self.clock() + self.cfg.probe_timeout_s
        return await self.upstream.send(node, path, orjson.dumps(doc), headers, deadline)

    async def _tiny_inference(
        self, node: Node, model: str
    ) -> tuple[dict[str, float], tuple[int, str] | None]:
        """(TTFB and tokens/s, (prompt index, answer text)) of a greedy challenge."""
        # Nodes probed in the same window mostly get the same two prompts, so their
        # answers can be compared at once; the prompts change from window to window.
        window = int(self.wall() / self.cfg.verified_probe_interval_s)
        prompt = (2 * window + self.rng.randrange(2)) % len(PROMPTS)
        body = {
            "model": node.served.get(model, model),
            "messages": [{"role": "user", "content": PROMPTS[prompt]}],
            "max_tokens": 16,
            "temperature": 0,
            "stream": True,
        }
        t0 = self.clock()
        stamps: list[float] = []
        relay = Relay(chat=True)
        async with await self._post(node, "/v1/chat/completions", body) as resp:
            if resp.status in (400, 404):  # maybe an embedding model
                return await self._tiny_embedding(node, model, resp.status), None
            if resp.status != 200:
                raise ProbeFailed(f"inference on {model[:64]!r}: HTTP {resp.status}")
            size = 0
            while chunk := await resp.content.readany():
                size += len(chunk)
                if size > MAX_MODELS_BYTES:
                    raise ProbeFailed(f"inference on {model[:64]!r}: answer too large")
                for event in relay.feed(chunk):
                    relay.track(event)
                    if event.startswith(b"data: {"):
                        stamps.append(self.clock())
                if relay.failure:
                    raise ProbeFailed(f"inference on {model[:64]!r}: {relay.failure}")
        if not stamps:  # an empty answer (an end of sequence at once) is an answer
            raise ProbeFailed(f"inference on {model[:64]!r}: no answer")
        out = {"ttfb_ms": round((stamps[0] - t0) * 1e3, 1)}
        if len(stamps) > 1 and stamps[-1] > stamps[0]:
            out["tokens_per_s"] = round((len(stamps) - 1) / (stamps[-1] - stamps[0]), 1)
        return out, (prompt, "".join(relay.text))

    async def _tiny_embedding(self, node: Node, model: str, chat_status: int) -> dict[str, float]:
        t0 = self.clock()
        ask = {"model": node.served.get(model, model), "input": "ok"}
        async with await self._post(node, "/v1/embeddings", ask) as r:
            if r.status != 200:
                raise ProbeFailed(f"inference on {model[:64]!r}: HTTP {chat_status}", True)
            await self.upstream.read_body(r, MAX_MODELS_BYTES)
        return {"ttfb_ms": round((self.clock() - t0) * 1e3, 1)}

    # -- engine metrics --------------------------------------------------------------

    async def _scrape_loop(self) -> None:
        interval = self.cfg.engine_metrics_interval_s
        while True:
            nodes = [n for n in self.fleet.nodes.values() if n.state in ROUTABLE]
            await asyncio.gather(*(self._scrape(n, interval) for n in nodes))
            await asyncio.sleep(self._interval(interval))

    async def _scrape(self, node: Node, interval: float) -> None:
        async with self._slots:
            try:
                async with self.upstream.session.get(
                    node.url + "/metrics", headers=self._get_headers(node), timeout=self.timeout,
                    allow_redirects=False,
                ) as resp:  # fmt: skip
                    if resp.status != 200:
                        return
                    raw = await self.upstream.read_body(resp, MAX_METRICS_BYTES)
                    text = raw.decode("utf-8", "replace")
                queue, running, kv = parse_engine_metrics(text)
            except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
                return  # stale metrics count as saturated once fresh_until passes
            node.load = EngineLoad(queue, running, kv, self.clock() + 3 * interval)
