"""The request path, as the steps of one request.

:meth:`Proxy.handle` takes a client request through:

1. **admit** (:meth:`Proxy._admit`): body within ``limits.max_body_bytes``,
   parsed once with orjson for ``model``, ``stream``, ``max_tokens``; an unknown
   model or a request no node could ever hold is answered here;
2. **candidates** (:meth:`Proxy._candidates`): the model's routable nodes (one
   dict lookup in the :class:`~router.fleet.Fleet`) that can hold the request
   (:mod:`router.fit`), computed once and again only after the supply changed;
3. **attempts** (:meth:`Proxy._attempts`): the policy ranks the candidates; the
   first is opened (:meth:`~router.upstream.Upstream.open`), hedged when
   :class:`~router.hedge.Hedging` says so; a failure before any byte reached the
   client moves on to the next, within the deadline and the
   :class:`~router.budgets.RetryBudget`. With no candidate, or every one down,
   the request waits for supply (:meth:`Proxy._wait_for_supply`) up to
   ``queue.max_wait_s``;
4. **deliver** (:class:`~router.deliver.Deliver`): the node's answer passes
   through; streams chunk by chunk;
5. **record**: each attempt ends once with its outcome on the node's scoreboard
   (:class:`~router.measure.Attempt`), which signals health and the store; the
   finished :class:`~router.call.Exchange` goes to the
   :class:`~router.recorder.Recorder`, which hands batches to the metrics and
   the access log.

Nothing here awaits a shared store, and every time is read from one clock.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace
from math import ceil
from random import Random

import orjson
from aiohttp import web

from policies import Policy, RequestInfo, node_cost
from router.addresses import VIA_HEADER, via_refused
from router.affinity import HIT, affinity_key, place
from router.bill import PROMPT_BYTES_PER_TOKEN, Invalid, limit_to, media_parts, read_sizes
from router.budgets import RetryBudget
from router.call import Call, Exchange, Failed
from router.config import AuthConfig, Config
from router.deliver import Deliver
from router.engines import ENGINES, NO_ENGINE, context_error
from router.errors import (
    BUSY,
    NODE_HEADER,
    NOSNIFF,
    error_body,
    error_response,
    exhausted,
    invalid_key,
    no_capacity,
    node_error,
)
from router.fit import Fit
from router.fleet import Fleet, Node
from router.gate import BATCH, Gate
from router.hedge import Hedging
from router.measure import Outcome
from router.pools import FALLBACK_HEADER, POOL_HEADER, REGION_HEADER, Pools, prefer_local
from router.relay import Relay
from router.tenants import Key, Keyring, Refusal
from router.upstream import Opened, Upstream

log = logging.getLogger("ballast.proxy")
MAX_MODEL_NAME = 256


DEADLINE_HEADER = "x-ballast-deadline-ms"  # the caller's own deadline, from now
PRIORITY_HEADER = "x-ballast-priority"  # "batch" lowers a request's class
GATE_WAITED_S = 0.001  # an admission slower than this waited for capacity
PACE_PEERS = 3  # nodes with a known pace needed before a stream is judged by theirs
MIN_ROOM = 16  # completion tokens a keyed request is cut to at the least; fewer: 429
MAX_PACES = 4096  # models whose pace is remembered


def _bad_request(message: str, code: str, param: str | None = None) -> web.Response:
    return error_response(400, message, "invalid_request_error", code, param)


class Proxy:
    def __init__(
        self,
        cfg: Config,
        fleet: Fleet,
        policy: Policy,
        upstream: Upstream,
        *,
        rng: Random | None = None,
        record: Callable[[Exchange], None] = lambda ex: None,
        keys: Keyring | None = None,
    ) -> None:
        self.fleet = fleet
        # client keys (router.tenants); by default none, and nobody is asked for one
        self.keys = keys or Keyring(AuthConfig(), {}, upstream.clock)
        self.gate = Gate(
            fleet, cfg.priority.node_slots, cfg.priority.batch_max_share, upstream.clock,
            max_waiting=cfg.queue.max_size, quiet_s=cfg.priority.interactive_quiet_s,
        )  # fmt: skip
        self.policy = policy
        self.clock = upstream.clock
        self.rng = rng or Random()
        self.record = record  # where finished requests go (the Recorder)
        self.upstream = upstream
        self.deliver = Deliver(
            cfg.timeouts.stream_idle_s,
            self.clock,
            self._resume,
            straggler_factor=cfg.resume.straggler_factor,
            max_event=cfg.limits.max_event_bytes,
            slow_factor=cfg.resume.slow_factor,
            fleet_pace=self._fleet_pace,
        )
        self._paces: dict[str, tuple[float, float]] = {}  # model: (until, median token gap)
        self.resume_enabled = cfg.resume.enabled
        self.max_continuations = cfg.resume.max_continuations
        self.hedging = Hedging(cfg)
        r = cfg.retries
        self.retries = RetryBudget(r.budget_percent, r.min_retry_concurrency, r.budget_wait_s)
        self.fit = Fit(cfg, fleet)
        self.total_s = cfg.timeouts.total_s
        self.max_attempts = cfg.retries.max_attempts
        self.max_body = cfg.limits.max_body_bytes
        self.body_timeout_s = cfg.limits.body_timeout_s
        self.affinity = cfg.affinity.enabled
        self.epsilon = cfg.affinity.epsilon
        self.queue_max = cfg.queue.max_size
        self.queue_wait_s = cfg.queue.max_wait_s
        self.queued = 0  # requests waiting for supply
        self.pools: Pools | None = fleet.pools
        self.spill_after_s = cfg.pools.spill_after_ms / 1000 if cfg.pools else 0.0
        self.locality = fleet.locality_label
        self.fallbacks = {m: tuple(c.fallbacks) for m, c in cfg.models.items() if c.fallbacks}
        self.aliases = cfg.aliases  # alias -> model
        self.aliased = frozenset(self.aliases.values())  # models known by other names

    @property
    def active(self) -> int:
        """Client requests in progress."""
        return self.retries.active

    async def handle(self, request: web.Request) -> web.StreamResponse:
        ex = Exchange(*self.upstream.ids.of(request), self.clock())
        try:
            resp = await self._serve(request, ex)
            ex.status = resp.status
            resp.headers["x-request-id"] = ex.request_id
            return resp
        except asyncio.CancelledError:
            ex.status = 499  # client closed the connection (nginx's convention)
            raise
        except Exception:  # a bug must still answer in the API's envelope, not a traceback
            log.exception("internal error on request %s", ex.request_id)
            ex.status = 500
            resp = error_response(
                500, "internal error in the router", "server_error", "internal_error"
            )
            resp.headers["x-request-id"] = ex.request_id
            return resp
        finally:
            ex.duration = self.clock() - ex.start
            ex.finished_at = time.time()
            self.record(ex)

    async def _serve(self, request: web.Request, ex: Exchange) -> web.StreamResponse:
        call = await self._admit(request, ex)
        if isinstance(call, web.Response):
            return call
        # In progress from here: a body still arriving is not a request in flight.
        self.retries.active += 1
        if self.hedging.enabled:
            self.hedging.budget.earn()
        status = 500
        try:
            if call.info.model in self.fallbacks:
                call.fallbacks = self._fallbacks(call)
            while True:  # the request's model, then its fallbacks while none serves it
                model, cls = call.info.model, call.ex.priority
                gated = None
                if self.gate.capacity(model) is not None:  # declared: admission by class
                    t0 = self.clock()
                    gated = await self.gate.enter(
                        model, cls, min(call.deadline, t0 + self.queue_wait_s)
                    )
                    if (waited := self.clock() - t0) > GATE_WAITED_S:
                        call.ex.queued_s += waited
                call.gated = gated is True
                try:
                    resp = await self._route(call) if gated is not False else None
                finally:
                    if gated:
                        self.gate.leave(model, cls)
                if resp is not None or not call.fallbacks or call.deadline <= self.clock():
                    break
                self._fall_back(call, call.fallbacks[0])
                call.fallbacks = call.fallbacks[1:]
            if resp is None:  # no node of any of its models could serve it
                resp = self._unserved(call)
            status = resp.status
            return resp
        except asyncio.CancelledError:
            status = 499
            raise
        finally:
            self.retries.active -= 1
            if call.count:
                self._count(call, status)
            if call.first_pool is not None:
                self._judged(call, status)

    def _fleet_pace(self, model: str) -> float:
        """The median of the usual seconds between tokens of ``model``'s nodes (< 0:
        fewer than three nodes have one), worked out at most once a second."""
        now = self.clock()
        known = self._paces.get(model)
        if known is not None and known[0] > now:
            return known[1]
        gaps = sorted(g for n in self.fleet.candidates(model) or () if (g := n.stats.token_gap) > 0)
        pace = gaps[len(gaps) // 2] if len(gaps) >= PACE_PEERS else -1.0
        if known is None and len(self._paces) >= MAX_PACES:
            self._paces.clear()
        self._paces[model] = (now + 1.0, pace)
        return pace

    def _judged(self, call: Call, status: int) -> None:
        """What the request says of the pool it tried first (router.pools): its time to
        first byte, or that the pool failed it (failed, or another pool served it).
        A client's own error or departure says nothing."""
        if status == 499 or (400 <= status < 500 and status != 429):
            return
        pool, node, ex = call.first_pool, call.served_by, call.ex
        assert pool is not None
        failed = status >= 500 or node is None or node.pool is not pool
        pool.add(self.clock(), ex.ttfb, failed)

    def _unserved(self, call: Call) -> web.Response:
        """No node could serve the request: why, in the API's envelope."""
        if not call.failures:
            if call.deadline - self.clock() <= 0:
                return error_response(
                    504, "the request's deadline passed while it waited for capacity",
                    "timeout_error", "deadline_exceeded",
                )  # fmt: skip
            return no_capacity(call.info.model)
        return exhausted(call.failures, call.deadline - self.clock() <= 0)

    def _fallbacks(self, call: Call) -> tuple[str, ...]:
        """The models configured to serve ``call``'s when none of its nodes can, that its
        key may use."""
        allowed = call.key.models if call.key is not None else None
        return tuple(m for m in self.fallbacks[call.info.model] if not allowed or m in allowed)

    def _fall_back(self, call: Call, model: str) -> None:
        """Send ``call`` to ``model`` instead; the answer says so (x-ballast-fallback)."""
        call.ex.fallback = call.ex.fallback or call.info.model
        call.ex.model = model
        call.doc = {**call.doc, "model": model}
        call.body = orjson.dumps(call.doc)
        call.info = replace(call.info, model=model)
        call.asked = model if model in self.aliased else None  # named by its own name
        call.need = self.fit.need_tokens(call.info)
        call.answer_headers = {**(call.answer_headers or {}), FALLBACK_HEADER: model}

    def _count(self, call: Call, status: int) -> None:
        """The answer's tokens as billed (router.bill: the node's count within what it
        delivered, however the request ended; none when no answer was delivered), its
        cost (router.pools), and with a key: the key's usage, token bucket and budget."""
        tokens = call.tokens or (0, 0)
        ex = call.ex
        ex.tokens = tokens
        node = call.served_by
        if node is not None and (node.price_per_mtok or ex.cost):
            ex.cost += (tokens[0] + tokens[1]) * node.price_per_mtok / 1e6
            node.cost += ex.cost
        if call.key is not None:
            self.keys.settle(call.key, ex.model, status, tokens, call.estimate)

    # -- 1. admit -------------------------------------------------------------------

    async def _admit(self, request: web.Request, ex: Exchange) -> Call | web.Response:
        key = None
        if self.keys.active:
            found = self.keys.lookup(request.headers)
            if isinstance(found, str):
                return invalid_key(found)
            key = found
            if key is not None:
                ex.key = key.name
        via = request.headers.get(VIA_HEADER)
        if via is not None and via_refused(via, self.upstream.router_id):
            return error_response(
                508, "the request came back to a router it already passed (a node points "
                "at a router)", "invalid_request_error", "loop_detected",
            )  # fmt: skip
        if request.content_length is not None and request.content_length > self.max_body:
            return self._too_large()
        try:
            if request.content.is_eof():  # all arrived with the headers: no timer needed
                body = await request.read()
            else:
                async with asyncio.timeout(self.body_timeout_s):
                    body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._too_large()
        except TimeoutError:
            resp = error_response(
                408, f"the request body did not arrive within {self.body_timeout_s:g}s",
                "invalid_request_error", "request_timeout",
            )  # fmt: skip
            resp.force_close()  # the rest of the body is not waited for
            return resp
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as e:
            return _bad_request(f"request body is not valid JSON: {e}", "invalid_json")
        if not isinstance(doc, dict):
            return _bad_request("request body must be a JSON object", "invalid_json")
        model = doc.get("model")
        if not isinstance(model, str) or not model:
            return _bad_request("you must provide a model parameter", "missing_model", "model")
        if len(model) > MAX_MODEL_NAME:
            return _bad_request(
                f"model must be at most {MAX_MODEL_NAME} characters", "invalid_model", "model"
            )
        asked, model = model, self.aliases.get(model, model)
        ex.model = model
        if self.fleet.candidates(model) is None and model not in self.fallbacks:
            return error_response(
                404, f"the model {model[:64]!r} does not exist or no node serves it",
                "invalid_request_error", "model_not_found", "model",
            )  # fmt: skip
        try:
            sizes = read_sizes(doc, generates=not request.path.endswith("/embeddings"))
        except Invalid as e:
            return _bad_request(str(e), "invalid_value", e.param)
        if asked != model:  # by the model's own name (a node may serve it by an alias)
            doc["model"] = model
        ex.stream = stream = sizes.stream
        info = RequestInfo(
            model=model, stream=stream, max_tokens=sizes.limit, prompt_bytes=len(body)
        )
        need = self.fit.need_tokens(info)
        if need is not None and not self.fit.possible(model, need):
            return _bad_request(
                f"the request needs about {need} tokens of context and KV cache; "
                f"no node serving {model!r} can hold that",
                "context_length_exceeded",
                "messages",
            )
        # Answers read whole may come compressed, as the client asked, unless their
        # tokens are counted (for a key's usage, or for costs).
        count = key is not None or self.pools is not None or self.fleet.priced
        compress = not stream and not count and model not in self.aliased
        headers = self.upstream.headers(request.headers, ex.upstream_id, compress=compress)
        affinity = None
        if self.affinity and getattr(self.policy, "uses_affinity", False):
            affinity = affinity_key(doc, request.headers.get("x-session-id"), model)
        deadline = self.clock() + self.total_s
        wanted = request.headers.get(DEADLINE_HEADER)
        if wanted is not None:
            try:
                ms = float(wanted)
                if not 0 < ms < 1e9:
                    raise ValueError
            except ValueError:
                return _bad_request(
                    f"{DEADLINE_HEADER} must be a number of milliseconds", "invalid_deadline"
                )
            deadline = min(deadline, self.clock() + ms / 1000)
        if key is not None and key.limits.priority == BATCH:
            ex.priority = BATCH  # a key's class is the highest its requests get
        elif request.headers.get(PRIORITY_HEADER) == BATCH:
            ex.priority = BATCH  # a request may lower its own class
        call = Call(request, ex, info, doc, body, headers, deadline, sizes, need, affinity)
        if model in self.aliased:  # the answer names the model as the client did
            call.asked = asked
        if count:  # the tokens, estimated now: the body's bytes over 4, plus limit x n
            call.count = True
            sizes.media = media_parts(doc.get("messages"))  # what the prompt may bill
            if key is not None and sizes.generates:
                refused = self._within_allowance(call, key)
                if refused is not None:
                    return self._refused(ex, refused)
            call.estimate = len(call.body) // PROMPT_BYTES_PER_TOKEN + sizes.completion_estimate
        # The pools first: a key's limits count the request once it passed them.
        if self.pools is not None or self.fleet.localized:
            refused = self._admit_pools(call, key)
            if refused is not None:
                return refused
        if key is not None:
            admitted = self.keys.admit(key, model, call.estimate)
            if isinstance(admitted, Refusal):
                return self._refused(ex, admitted)
            call.answer_headers = admitted
            call.key = key
        if count and stream:
            self._ask_usage(call)
        # Sent as the engine reads it and as it is billed: coerced sizes, a key's
        # limit, the usage asked for, the model's own name. One encoding, at the end.
        if sizes.changed or call.hide_usage or asked != model:
            call.body = orjson.dumps(doc)
        return call

    def _within_allowance(self, call: Call, key: Key) -> Refusal | None:
        """Limit the request to what its key may still use (its token bucket, its
        budget share): a request without ``max_tokens``, or with more than that, is
        sent with ``max_tokens`` lowered, so that it cannot overrun the key's caps;
        with less than ``MIN_ROOM`` tokens left for it in a bucket that refills or a
        share that frees, it is refused (429) instead; the last of a budget is spent."""
        allowance = self.keys.allowance(key)
        if allowance is None:
            return None
        most, last = allowance
        sizes = call.sizes
        room = (most - len(call.body) // PROMPT_BYTES_PER_TOKEN) // sizes.n
        if sizes.limit is not None and sizes.limit <= room:
            return None
        if room < min(sizes.limit or MIN_ROOM, MIN_ROOM):
            if not last:
                return self.keys.no_room(key)
            room = max(room, 1)
        limit_to(call.doc, sizes, room)  # the body is encoded once admitted (_admit)
        call.info.max_tokens = room
        return None

    def _admit_pools(self, call: Call, key: Key | None) -> web.Response | None:
        """The pools the request may use (its key's, narrowed by ``x-ballast-pool``) and
        its locality (``x-ballast-region``, else its key's)."""
        headers = call.request.headers
        region = headers.get(REGION_HEADER) or (key.limits.region if key else None)
        if region is not None:
            call.region = region[:128]
        pools = self.pools
        if pools is None:
            return None
        allowed = pools.order
        if key is not None and key.limits.pools:  # a dynamic key's may name unknown pools
            allowed = tuple(pools.by_name[n].index for n in key.limits.pools if n in pools.by_name)
            if not allowed:
                return error_response(
                    403, "none of this key's pools is configured", "invalid_request_error",
                    "pool_not_allowed",
                )  # fmt: skip
        wanted = headers.get(POOL_HEADER)
        if wanted is None:
            call.pools = allowed
            return None
        found = pools.parse(wanted)
        if isinstance(found, str):
            return _bad_request(found, "invalid_pool")
        if not set(found) <= set(allowed):
            return error_response(
                403, f"this key may not use the pools {wanted[:64]!r}", "invalid_request_error",
                "pool_not_allowed",
            )  # fmt: skip
        call.pools = found
        return None

    @staticmethod
    def _refused(ex: Exchange, refused: Refusal) -> web.Response:
        """A key's request refused (router.tenants), in the API's envelope."""
        ex.limited = refused.code == "rate_limit_exceeded"
        headers = dict(refused.headers or {})
        if refused.retry_after is not None:
            headers["Retry-After"] = str(ceil(refused.retry_after))
        param = "model" if refused.code == "model_not_allowed" else None
        return error_response(
            refused.status, refused.message, refused.type, refused.code, param, headers=headers
        )

    def _ask_usage(self, call: Call) -> None:
        """A stream whose tokens are counted asks the node for its usage (the client
        does not see that chunk unless it asked for it too)."""
        doc = call.doc
        options = doc.get("stream_options")
        if not (isinstance(options, dict) and options.get("include_usage")):
            doc["stream_options"] = {**(options or {}), "include_usage": True}
            call.hide_usage = True

    # -- 2. candidates ----------------------------------------------------------------

    def _candidates(self, call: Call) -> Sequence[Node]:
        candidates = self.fleet.candidates(call.info.model) or ()
        if call.need is not None and candidates:
            candidates = self.fit.filter(candidates, call.info.model, call.need)
        return candidates

    # -- 3. attempts, and waiting for supply ---------------------------------------------

    def _groups(self, call: Call) -> list[Sequence[Node]]:
        """The nodes that can hold the request, in groups tried in order: one group, or
        with pools the pools' (the request's order, spilling pools last unless this
        request is their trickle)."""
        pools = self.pools
        if pools is None:
            candidates = self._candidates(call)
            return [candidates] if candidates else []
        pools.judge(self.clock())
        by_pool = self.fleet.by_pool(call.info.model)
        if not by_pool:
            return []
        serving: list[Sequence[Node]] = []
        spilling: list[Sequence[Node]] = []
        for i in call.pools or pools.order:
            nodes: Sequence[Node] = by_pool[i]
            if nodes and call.need is not None:
                nodes = self.fit.filter(nodes, call.info.model, call.need)
            if nodes:
                (serving if pools.takes(pools.pools[i]) else spilling).append(nodes)
        return serving + spilling

    async def _route(self, call: Call) -> web.StreamResponse | None:
        """Rank, try, and when no node can take the request, wait for supply (or, with
        fallback models, give up at once when the model has none); None: no node of
        the model could serve it."""
        queue_until: float | None = None
        spill_until: float | None = None
        left = self.max_attempts
        model, cls = call.info.model, call.ex.priority
        while True:
            groups = self._groups(call)
            if call.gated and groups:
                free = [self.gate.free(model, cls, g) for g in groups]
                if not any(free):  # every node at its own capacity: wait for a slot
                    until = min(call.deadline, self.clock() + self.queue_wait_s)
                    if not await self.gate.wait_node(model, cls, until):
                        return None
                    continue
                if not free[0] and self.spill_after_s:  # the preferred pool is full
                    now = self.clock()
                    if spill_until is None:
                        spill_until = min(call.deadline, now + self.spill_after_s)
                    if now < spill_until:
                        await self.gate.wait_node(model, cls, spill_until)
                        continue
                groups = [f for f in free if f]
            if groups and left > 0:
                ranked = self._rank(call, groups, left)
                before = call.ex.attempts
                # After a wait for supply the first attempt is a new start, not a retry.
                resp = await self._attempts(call, ranked, first_is_retry=queue_until is None)
                if resp is not None:
                    return resp
                left -= call.ex.attempts - before
                # Nodes that are down (refused, reset) soon leave the candidates:
                # anything else ends the request now.
                if not all(f.outcome is Outcome.CONNECT_ERROR for f in call.failures):
                    return None
            elif not groups and call.fallbacks:
                return None  # no supply: a fallback model serves without waiting
            if queue_until is None:
                queue_until = min(call.deadline, self.clock() + self.queue_wait_s)
            if not await self._wait_for_supply(call, queue_until):
                return None
            left = max(left, 1)  # the supply changed: at least one more attempt

    def _rank(self, call: Call, groups: list[Sequence[Node]], left: int) -> list[Node]:
        """The nodes to try, best first: the policy's ranking of the first group (the
        affinity key's node first, a local node first among equals), then, for the
        last attempt, the next group's best (failover crosses pools)."""
        now = self.clock()
        first = groups[0]
        spill = groups[1] if len(groups) > 1 and left > 1 else None
        ranked = self.policy.rank(call.info, first, left - (spill is not None), self.rng, now)
        if call.affinity is not None and not call.ex.attempts:
            ranked = self._place(call, first, ranked)
        if call.region is not None:
            policy = self.policy
            ranked = prefer_local(
                ranked, call.region, self.locality, lambda n: node_cost(policy, n, now)
            )
        if spill is not None:
            ranked += self.policy.rank(call.info, spill, left - len(ranked), self.rng, now)
        if call.first_pool is None and ranked:
            call.first_pool = ranked[0].pool
        return ranked

    def _place(self, call: Call, candidates: Sequence[Node], ranked: list[Node]) -> list[Node]:
        """Put the affinity key's node first (``router.affinity``); the policy's
        ranking follows for retries."""
        assert call.affinity is not None
        node, call.ex.affinity = place(call.affinity, candidates, self.epsilon, self.clock())
        if node is None:
            return ranked
        if call.ex.affinity == HIT:
            node.stats.affinity_hits += 1
        rest = [n for n in ranked if n is not node]
        return [node, *rest[: len(ranked) - 1]]

    async def _attempts(
        self, call: Call, ranked: list[Node], first_is_retry: bool
    ) -> web.StreamResponse | None:
        """Try ``ranked`` in order (hedging where configured); None when all failed."""
        ex = call.ex
        left = deque(ranked)
        first = True
        while left:
            node = left.popleft()
            retry = ex.attempts > 0 and (first_is_retry or not first)
            first = False
            time_left = call.deadline - self.clock()
            if time_left <= 0 or (retry and not await self.retries.acquire(time_left)):
                break
            opened = await self._open(call, node, left, retry)
            if opened is None:
                if call.failures and call.failures[-1].detail == BUSY:
                    break  # the router's own memory is short: another node would not help
                continue
            if opened.status < 400:
                if call.rejected is not None:  # another node served what it refused
                    call.rejected.close(Outcome.REJECTED)
                    call.rejected = None
                return await self.deliver(call, opened)
            after = self._after_rejection(call, opened)
            if after is None:
                return self._rejection(call, opened)
            left = deque(after)
            first = True
        if call.rejected is not None:
            return self._rejection(call, call.rejected)
        return None

    async def _open(self, call: Call, node: Node, left: deque[Node], retry: bool) -> Opened | None:
        """One attempt on ``node`` (raced against ``left[0]`` when hedging says so); a
        retry holds the slot it took from the retry budget until its node has answered."""
        call.ex.attempts += 1
        call.tried.add(node.id)
        try:
            delay = self.hedging.delay(call.ex.model, node, call.info.stream) if left else None
            if delay is None:
                try:
                    return await self.upstream.open(call, node)
                except Failed as f:
                    call.failed(f)
                    return None
            found, hedged = await self.hedging.race(call, self.upstream.open, node, left[0], delay)
            if hedged:
                call.tried.add(left.popleft().id)
            return found
        finally:
            if retry:
                self.retries.release()

    def _after_rejection(self, call: Call, opened: Opened) -> list[Node] | None:
        """A node answered 4xx: the nodes to try next, or None to answer the caller.

        A context-length error goes to a node with a longer context, if any. A
        400/422 that no other node has given is tried once on a node of another
        kind (engine or context length): if that node serves it, the first node
        was at fault (``rejected``); if it refuses too, the caller was.
        """
        node = opened.node
        candidates = self._candidates(call)
        n_ctx = context_error(opened.status, opened.first)
        if n_ctx is not None:
            if n_ctx:
                node.context_length = n_ctx
            limit = node.context_length or 0
            longer = [
                c for c in candidates
                if c.id not in call.tried and (c.context_length is None or c.context_length > limit)
            ]  # fmt: skip
            if not longer or not self.retries.allows():
                return None
            self._settle(call, opened)
            return self.policy.rank(call.info, longer, len(longer), self.rng, self.clock())
        if opened.status not in (400, 422) or call.rejected is not None:
            return None
        kind = (node.engine, node.context_length)
        others = [
            c for c in candidates if c.id not in call.tried and (c.engine, c.context_length) != kind
        ]
        if not others or not self.retries.allows():
            return None
        call.rejected = opened
        return self.policy.rank(call.info, others, 1, self.rng, self.clock())

    def _settle(self, call: Call, opened: Opened) -> None:
        """The 4xx was the caller's (or the request's) doing: close it, and any 4xx
        held back, as such."""
        held, call.rejected = call.rejected, None
        if held is not None and held is not opened:
            held.close(Outcome.CLIENT_ERROR)
        opened.close(Outcome.CLIENT_ERROR)

    def _rejection(self, call: Call, opened: Opened) -> web.Response:
        """Answer the caller with a node's 4xx, in OpenAI's error envelope."""
        status, body, node = opened.status, opened.first, opened.node
        self._settle(call, opened)
        call.ex.node = node.id
        headers = {NODE_HEADER: node.id, NOSNIFF: "nosniff"}
        if context_error(status, body) is not None:
            return error_response(
                400,
                f"the request is longer than the context of every node serving "
                f"{call.info.model!r} that was tried",
                "invalid_request_error", "context_length_exceeded", "messages", headers=headers,
            )  # fmt: skip
        # The node's own words, in Ballast's envelope: a node's error never passes as
        # one of Ballast's, whatever its type and code say.
        message, param = node_error(body)
        text = f"the node rejected the request (HTTP {status})"
        type_ = "invalid_request_error" if status < 500 else "upstream_error"
        return web.Response(
            status=status,
            body=error_body(f"{text}: {message}" if message else text, type_,
                            "upstream_rejected", param),
            content_type="application/json",
            headers=headers,
        )  # fmt: skip

    # -- 4. deliver: continuing a stream whose node failed ---------------------------------

    async def _resume(self, call: Call, relay: Relay, failed: Node, reason: str) -> Opened | str:
        """Ask another node to continue ``call``'s stream after ``failed`` failed mid-answer
        (for ``reason``): the new attempt, or why there is none, counted: ended (no token
        left to ask for), refused (not resumable), no_node, deadline, budget, failed."""
        may = self._may_resume(call, relay)
        found = await self._continue(call, relay, failed, reason) if may else "refused"
        outcome = "continued" if isinstance(found, Opened) else found
        call.ex.resumed.append((failed.id, reason, outcome))
        return found

    def _may_resume(self, call: Call, relay: Relay) -> bool:
        """Only what can be continued honestly: one choice, no log-probabilities, no
        tool calls, within the deadline and ``resume.max_continuations``."""
        return (
            self.resume_enabled
            and relay.resumable
            and call.sizes.n == 1
            and not call.doc.get("logprobs")
            and relay.continued < self.max_continuations
            and call.deadline - self.clock() > 0
        )

    async def _continue(self, call: Call, relay: Relay, failed: Node, reason: str) -> Opened | str:
        """The continuing attempt, or why there is none: ended (nothing left to ask
        for), no_node, deadline, budget or failed (every able node failed to open).
        Able nodes are tried in the order of the request's pools. After the node went
        away (``reset``, ``truncated``) the continuation replaces its lost work and
        takes no retry budget: when a pool's nodes vanish together, every one of
        their streams moves on at once."""
        call.tried.add(failed.id)
        if relay.exhausted:
            return "ended"
        ranked: list[Node] = []
        for group in self._groups(call):
            able = [
                c for c in group
                if c.id not in call.tried and ENGINES.get(c.engine, NO_ENGINE).continuation
            ]  # fmt: skip
            ranked += self.policy.rank(call.info, able, len(able), self.rng, self.clock())
        if not ranked:
            return "no_node"
        budgeted = reason not in ("reset", "truncated")
        for node in ranked:
            style = ENGINES[node.engine].continuation
            assert style is not None
            doc = relay.continuation(call.doc, style)
            time_left = call.deadline - self.clock()
            if time_left <= 0:
                return "deadline"
            if budgeted and not await self.retries.acquire(time_left):
                return "budget"
            opened = await self._open(
                replace(call, doc=doc, body=orjson.dumps(doc)), node, deque(), budgeted
            )
            if opened is None:
                continue
            if opened.status >= 400 or opened.whole:
                # A 4xx refuses a request Ballast built from another node's text: no fault.
                opened.close(Outcome.CLIENT_ERROR if opened.status < 500 else Outcome.HTTP_5XX)
                continue
            relay.continued_by(style)
            call.ex.node = node.id
            call.served_by = node
            return opened
        return "failed"

    async def _wait_for_supply(self, call: Call, until: float) -> bool:
        """Wait for the fleet to change, until ``until``; False: give up."""
        t0 = self.clock()
        if until - t0 <= 0 or self.queued >= self.queue_max:
            return False
        self.queued += 1
        try:
            async with asyncio.timeout(until - t0):
                await self.fleet.changed()
            return True
        except TimeoutError:
            return False
        finally:
            self.queued -= 1
            call.ex.queued_s += self.clock() - t0

    def _too_large(self) -> web.Response:
        return error_response(
            413, f"request body exceeds {self.max_body} bytes", "invalid_request_error",
            "request_too_large",
        )  # fmt: skip
