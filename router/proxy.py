"""The request path: parse once, rank candidates, try nodes, pass bytes through.

One request, top to bottom:

1. read the body (bounded by ``limits.max_body_bytes``) and parse it once with
   orjson, taking only ``model``, ``stream`` and ``max_tokens``;
2. look up the routable nodes serving that model (one dict lookup);
3. ask the policy for up to ``retries.max_attempts`` nodes in order;
4. try them in turn. Connection errors, first-byte timeouts, 5xx and 429 are
   retried on the next node while nothing has been sent to the client, within
   the request deadline and the retry budget;
5. pass the node's answer through unchanged; a stream is flushed chunk by chunk
   as it arrives, and a failure after the first byte ends it with an SSE error
   event;
6. record the attempt's outcome on the node's scoreboard (synchronous, local).

Nothing here awaits a shared store.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from random import Random

import orjson
from aiohttp import ClientError, ClientResponse, ClientSession, ClientTimeout, web
from multidict import CIMultiDict

from policies import Policy, RequestInfo
from router.config import Config
from router.errors import error_response, sse_error_event
from router.fit import Fit
from router.nodes import FAILURES, Node, Outcome, Registry

log = logging.getLogger("ballast.proxy")

# Headers that describe one hop, not the message (RFC 9110 §7.6.1), plus those
# Ballast sets itself or must not leak to a node.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_DROP_REQUEST = _HOP_BY_HOP | {"host", "content-length", "authorization", "cookie"}
_DROP_RESPONSE = _HOP_BY_HOP | {"content-length"}
# 404 too: a node that claims the model but does not know it is broken for this
# request, and another node may well serve it.
_RETRYABLE_STATUS = frozenset({404, 429, 500, 502, 503, 504})
_OUTCOME_OF = {404: Outcome.HTTP_404, 429: Outcome.HTTP_429}
HEDGE_BURST = 10.0  # hedges the budget may save up


class Exchange:
    """What happened to one client request; handed to observers when it ends."""

    __slots__ = (
        "attempts",
        "duration",
        "hedged",
        "model",
        "node",
        "outcomes",
        "queued_s",
        "request_id",
        "start",
        "status",
        "stream",
        "ttfb",
    )

    def __init__(self, request_id: str, start: float) -> None:
        self.request_id = request_id
        self.start = start
        self.model = ""
        self.stream = False
        self.node = ""
        self.attempts = 0
        self.status = 0
        self.ttfb = -1.0  # request arrival to the node's first byte; < 0: none
        self.duration = 0.0
        self.queued_s = 0.0  # time spent waiting for supply
        self.hedged = False
        self.outcomes: list[Outcome] = []


class _Opened:
    """One attempt on one node: counted in flight from creation, recorded once."""

    __slots__ = ("awaiting", "done", "first", "node", "proxy", "t0", "t_first", "upstream")

    def __init__(self, proxy: Proxy, node: Node) -> None:
        self.proxy = proxy
        self.node = node
        self.upstream: ClientResponse | None = None
        self.first = b""
        self.t_first = -1.0  # clock() at the first byte; < 0: none yet
        self.done = False
        st = node.stats
        self.t0 = proxy.clock()
        if st.awaiting == 0:
            st.awaiting_since = self.t0
        st.awaiting += 1
        self.awaiting = True
        st.in_flight += 1
        if st.pending is not None:  # a shared store will report it
            proxy.registry.dirty.add(node)

    def first_byte(self) -> None:
        """The node answered: no longer waiting on it (progress for the stall rule)."""
        if self.awaiting:
            self.awaiting = False
            st = self.node.stats
            st.awaiting -= 1
            st.awaiting_since = self.proxy.clock()

    def finish(self, outcome: Outcome) -> None:
        if self.done:
            return
        self.done = True
        self.first_byte()
        st = self.node.stats
        st.in_flight -= 1
        if self.upstream is not None:
            if outcome is Outcome.OK or outcome is Outcome.CLIENT_ERROR:
                self.upstream.release()
            else:
                self.upstream.close()
        now = self.proxy.clock()
        elapsed = (self.t_first if self.t_first >= 0 else now) - self.t0
        st.record(outcome, elapsed, now, self.proxy.penalty_s)
        reg = self.proxy.registry
        reg.touched.add(self.node)  # health looks at nodes with new outcomes
        if outcome in FAILURES:
            reg.failure_seen.set()


class _Failed(Exception):
    """An attempt failed before anything reached the client: try another node."""

    def __init__(self, outcome: Outcome, detail: str, retry_after: str | None = None) -> None:
        self.outcome = outcome
        self.detail = detail
        self.retry_after = retry_after


def _request_id(request: web.Request) -> str:
    rid = request.headers.get("x-request-id")
    if rid and len(rid) <= 128 and rid.isprintable() and rid.isascii():
        return rid
    return secrets.token_hex(12)


class Proxy:
    def __init__(
        self,
        cfg: Config,
        registry: Registry,
        policy: Policy,
        session: ClientSession,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: Random | None = None,
        observers: list[Callable[[Exchange], None]] | None = None,
    ) -> None:
        self.registry = registry
        self.policy = policy
        self.session = session
        self.clock = clock
        self.rng = rng or Random()
        self.observers = observers if observers is not None else []
        t = cfg.timeouts
        self.first_byte_s = t.first_byte_s
        self.total_s = t.total_s
        self.max_attempts = cfg.retries.max_attempts
        self.budget_fraction = cfg.retries.budget_percent / 100.0
        self.min_retry_concurrency = cfg.retries.min_retry_concurrency
        self.max_body = cfg.limits.max_body_bytes
        self.max_response = cfg.limits.max_response_bytes
        self.penalty_s = cfg.scoring.failure_penalty_s
        self.connect_s = t.connect_s
        self.stream_idle_s = t.stream_idle_s
        self.client_timeout = ClientTimeout(
            total=None, sock_connect=t.connect_s, sock_read=t.first_byte_s
        )
        self.active = 0  # client requests in progress
        self.active_retries = 0  # of which currently on a retry attempt
        self.fit = Fit(cfg, registry)
        self.queue_max = cfg.queue.max_size
        self.queue_wait_s = cfg.queue.max_wait_s
        self.queued = 0  # requests waiting for supply
        h = cfg.hedge
        self.hedge_default = h.after_ms / 1e3 if h.after_ms else None
        self.hedge_after = {
            m: mc.hedge_after_ms / 1e3 for m, mc in cfg.models.items() if mc.hedge_after_ms
        }
        self.hedge_p95 = h.use_p95_ttfb
        self.hedging = bool(self.hedge_default or self.hedge_after or self.hedge_p95)
        # Hedge budget: a token bucket refilled by budget_percent of each request.
        self.hedge_rate = h.budget_percent / 100.0
        self.hedge_tokens = 1.0
        self.hedges_sent = 0
        self.hedges_won = 0

    # -- entry point -------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        ex = Exchange(_request_id(request), self.clock())
        self.active += 1
        if self.hedging and self.hedge_tokens < HEDGE_BURST:
            self.hedge_tokens += self.hedge_rate
        try:
            resp = await self._handle(request, ex)
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
            self.active -= 1
            ex.duration = self.clock() - ex.start
            for observe in self.observers:
                observe(ex)

    async def _handle(self, request: web.Request, ex: Exchange) -> web.StreamResponse:
        if request.content_length is not None and request.content_length > self.max_body:
            return self._too_large()
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._too_large()
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as e:
            return error_response(
                400, f"request body is not valid JSON: {e}", "invalid_request_error", "invalid_json"
            )
        if not isinstance(doc, dict):
            return error_response(
                400, "request body must be a JSON object", "invalid_request_error", "invalid_json"
            )
        model = doc.get("model")
        if not isinstance(model, str) or not model:
            return error_response(
                400,
                "you must provide a model parameter",
                "invalid_request_error",
                "missing_model",
                "model",
            )
        stream = doc.get("stream") is True
        max_tokens = doc.get("max_tokens") or doc.get("max_completion_tokens")
        ex.model = model
        ex.stream = stream

        if self.registry.candidates(model) is None:
            return error_response(
                404,
                f"the model {model!r} does not exist or no node serves it",
                "invalid_request_error",
                "model_not_found",
                "model",
            )
        info = RequestInfo(
            model=model,
            stream=stream,
            max_tokens=max_tokens if isinstance(max_tokens, int) else None,
            prompt_bytes=len(body),
        )
        need = self.fit.need_tokens(info)
        if need is not None and not self.fit.possible(model, need):
            return error_response(
                400,
                f"the request needs about {need} tokens of context and KV cache; "
                f"no node serving {model!r} can hold that",
                "invalid_request_error",
                "context_length_exceeded",
                "messages",
            )
        headers = self._upstream_headers(request, ex.request_id)
        deadline = asyncio.get_running_loop().time() + self.total_s
        return await self._route(request, ex, info, need, body, headers, deadline)

    # -- routing, queueing, failover ----------------------------------------------

    async def _route(
        self,
        request: web.Request,
        ex: Exchange,
        info: RequestInfo,
        need: int | None,
        body: bytes,
        headers: CIMultiDict[str],
        deadline: float,
    ) -> web.StreamResponse:
        """Rank, try, and when no node can take the request, wait for capacity."""
        loop = asyncio.get_running_loop()
        failures: list[_Failed] = []
        queue_until: float | None = None
        left = self.max_attempts
        while True:
            candidates = self.registry.candidates(info.model) or ()
            if need is not None:
                candidates = self.fit.filter(candidates, info.model, need)
            if candidates and left > 0:
                ranked = self.policy.rank(info, candidates, left, self.rng, self.clock())
                before = ex.attempts
                # After a wait for supply the first attempt is a new start, not a retry.
                resp = await self._attempts(
                    request, ex, ranked, body, headers, deadline, failures, queue_until is None
                )
                if resp is not None:
                    return resp
                left -= ex.attempts - before
                # Nothing reached the client. Nodes that are down (refused, reset)
                # are soon out of the candidate set: wait for the supply to change.
                if not all(f.outcome is Outcome.CONNECT_ERROR for f in failures):
                    break
            if queue_until is None:
                queue_until = min(deadline, loop.time() + self.queue_wait_s)
            if not await self._wait_for_supply(ex, queue_until):
                break
            left = max(left, 1)  # the supply changed: at least one more attempt
        if not failures:
            return error_response(
                503,
                f"no node can serve model {info.model!r} right now",
                "service_unavailable",
                "no_capacity",
                headers={"Retry-After": "1"},
            )
        return self._exhausted(failures, deadline - loop.time() <= 0)

    async def _wait_for_supply(self, ex: Exchange, until: float) -> bool:
        """Queue: wait for the candidate set to change, until ``until``; False: give up."""
        loop = asyncio.get_running_loop()
        if until - loop.time() <= 0 or self.queued >= self.queue_max:
            return False
        self.queued += 1
        t0 = loop.time()
        try:
            async with asyncio.timeout_at(until):
                await self.registry.changed()
            return True
        except TimeoutError:
            return False
        finally:
            self.queued -= 1
            ex.queued_s += loop.time() - t0

    async def _attempts(
        self,
        request: web.Request,
        ex: Exchange,
        ranked: list[Node],
        body: bytes,
        headers: CIMultiDict[str],
        deadline: float,
        failures: list[_Failed],
        first_may_retry: bool = True,
    ) -> web.StreamResponse | None:
        """Try ``ranked`` in order (hedging the first); None when all failed.

        Attempts after a request's first one are retries and need the budget;
        with ``first_may_retry`` false the first attempt here does not."""
        loop = asyncio.get_running_loop()
        stream = ex.stream
        retrying = False
        try:
            i = 0
            while i < len(ranked):
                if ex.attempts > 0 and (i > 0 or first_may_retry):
                    if not self._retry_allowed():
                        break
                    if not retrying:
                        retrying = True
                        self.active_retries += 1
                if deadline - loop.time() <= 0:
                    break
                node = ranked[i]
                hedge_s = (
                    self._hedge_delay(ex.model, node)
                    if self.hedging and i + 1 < len(ranked)
                    else None
                )
                try:
                    if hedge_s is None:
                        ex.attempts += 1
                        opened = await self._open(request, node, body, headers, stream, deadline)
                        i += 1
                    else:
                        found, i = await self._hedged(
                            request, ex, ranked, i, hedge_s, body, headers, deadline, failures
                        )
                        if found is None:
                            continue
                        opened = found
                except _Failed as f:
                    ex.outcomes.append(f.outcome)
                    failures.append(f)
                    i += 1
                    continue
                ex.node = opened.node.id
                return await self._deliver(request, ex, opened, deadline)
        finally:
            if retrying:
                self.active_retries -= 1
        return None

    def _retry_allowed(self) -> bool:
        """Envoy-style retry budget: concurrent retries stay below a share of traffic."""
        cap = max(self.min_retry_concurrency, self.active * self.budget_fraction)
        return self.active_retries < cap

    # -- hedging ------------------------------------------------------------------

    def _hedge_delay(self, model: str, node: Node) -> float | None:
        """Seconds to wait for the primary's first byte before hedging, or None."""
        after = self.hedge_after.get(model, self.hedge_default)
        if after is None and self.hedge_p95:
            after = node.stats.ttfb_p95()
        if after is None or self.hedge_tokens < 1.0:
            return None
        return after

    async def _hedged(
        self,
        request: web.Request,
        ex: Exchange,
        ranked: list[Node],
        i: int,
        hedge_s: float,
        body: bytes,
        headers: CIMultiDict[str],
        deadline: float,
        failures: list[_Failed],
    ) -> tuple[_Opened | None, int]:
        """Primary ``ranked[i]``; if it has no first byte after ``hedge_s``, a copy to
        ``ranked[i + 1]``. The first to answer wins; the other is cancelled. Returns
        the winner (None when every copy failed, recorded in ``failures``) and the
        index of the next untried node."""
        stream = ex.stream
        ex.attempts += 1
        tasks = {
            asyncio.ensure_future(self._open(request, ranked[i], body, headers, stream, deadline))
        }
        next_i = i + 1
        done, _ = await asyncio.wait(tasks, timeout=hedge_s)
        if not done and self.hedge_tokens >= 1.0:
            self.hedge_tokens -= 1.0
            self.hedges_sent += 1
            ex.attempts += 1
            ex.hedged = True
            tasks.add(
                asyncio.ensure_future(
                    self._open(request, ranked[next_i], body, headers, stream, deadline)
                )
            )
            next_i += 1
        pending = tasks
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                winner: _Opened | None = None
                for task in done:
                    exc = task.exception()
                    if exc is None:
                        if winner is None:
                            winner = task.result()
                        else:  # both answered in the same instant: one is enough
                            task.result().finish(Outcome.CANCELLED)
                    elif isinstance(exc, _Failed):
                        ex.outcomes.append(exc.outcome)
                        failures.append(exc)
                    else:
                        raise exc
                if winner is not None:
                    if ex.hedged and winner.node is ranked[i + 1]:
                        self.hedges_won += 1
                    return winner, next_i
            return None, next_i
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    # -- one attempt: open (retryable) then deliver (committed) -------------------

    async def _open(
        self,
        request: web.Request,
        node: Node,
        body: bytes,
        headers: CIMultiDict[str],
        stream: bool,
        deadline: float,
    ) -> _Opened:
        """Send the request to ``node`` and wait for its first byte (or, without
        streaming, its whole body). Every failure here is retryable: _Failed."""
        att = _Opened(self, node)
        if node.auth_header is not None:
            headers = CIMultiDict(headers)
            headers["Authorization"] = node.auth_header
        try:
            # The first-byte timeout is aiohttp's socket read timeout: no extra timer.
            upstream = await self.session.post(
                node.url + request.path,
                data=body,
                headers=headers,
                timeout=self._attempt_timeout(deadline),
                allow_redirects=False,
            )
            att.upstream = upstream
            status = upstream.status
            if status in _RETRYABLE_STATUS:
                outcome = _OUTCOME_OF.get(status, Outcome.HTTP_5XX)
                retry_after = upstream.headers.get("Retry-After")
                if retry_after is not None and status == 429:
                    node.stats.paused_until = self.clock() + _seconds(retry_after)
                raise _Failed(outcome, f"HTTP {status}", retry_after)
            att.first = await upstream.content.readany() if stream else b""
            att.t_first = self.clock()
            att.first_byte()
            if not stream:
                att.first = await self._read_body(upstream, deadline)
        except _Failed as f:
            att.finish(f.outcome)
            raise
        except TimeoutError:
            att.finish(Outcome.TIMEOUT)
            detail = "body not complete in time" if att.t_first >= 0 else "no first byte in time"
            raise _Failed(Outcome.TIMEOUT, detail) from None
        except (ClientError, OSError) as e:
            outcome = Outcome.STREAM_ERROR if att.t_first >= 0 else Outcome.CONNECT_ERROR
            att.finish(outcome)
            raise _Failed(outcome, type(e).__name__) from None
        except BaseException:
            att.finish(Outcome.CANCELLED)
            raise
        return att

    async def _deliver(
        self, request: web.Request, ex: Exchange, att: _Opened, deadline: float
    ) -> web.StreamResponse:
        """Send the node's answer to the client: from here on the attempt is committed."""
        upstream = att.upstream
        assert upstream is not None
        outcome = Outcome.CANCELLED
        try:
            ex.ttfb = att.t_first - ex.start
            status = upstream.status
            ok = Outcome.OK if status < 400 else Outcome.CLIENT_ERROR
            resp_headers = CIMultiDict(
                (k, v) for k, v in upstream.headers.items() if k.lower() not in _DROP_RESPONSE
            )
            resp_headers["x-ballast-node"] = att.node.id
            if not ex.stream:
                outcome = ok
                return web.Response(status=status, body=att.first, headers=resp_headers)
            att.node.stats.observe_ttfb(att.t_first - att.t0, att.t_first)
            out = web.StreamResponse(status=status, headers=resp_headers)
            outcome = await self._pump(request, upstream, out, att.first, ok, deadline)
            return out
        finally:
            att.finish(outcome)

    def _attempt_timeout(self, deadline: float) -> ClientTimeout:
        """Socket timeouts for one attempt: first byte within min(first_byte_s, time left)."""
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining >= self.first_byte_s:
            return self.client_timeout
        return ClientTimeout(
            total=None,
            sock_connect=min(self.connect_s, remaining),
            sock_read=max(remaining, 0.001),
        )

    async def _pump(
        self,
        request: web.Request,
        upstream: ClientResponse,
        out: web.StreamResponse,
        first: bytes,
        ok: Outcome,
        deadline: float,
    ) -> Outcome:
        """Copy a stream to the client as it arrives; return the attempt's outcome.

        Between chunks the node may be silent for ``stream_idle_s``; the request
        deadline is checked as each chunk arrives.
        """
        conn = upstream.connection
        if conn is not None and conn.protocol is not None:
            conn.protocol.read_timeout = self.stream_idle_s
        time = asyncio.get_running_loop().time
        content = upstream.content
        chunk = first
        try:
            await out.prepare(request)
            while chunk:
                await out.write(chunk)
                if time() > deadline:
                    await self._end_stream(out, "request deadline exceeded", "deadline_exceeded")
                    return Outcome.CANCELLED  # the node was working; the deadline ran out
                try:
                    chunk = await content.readany()
                except TimeoutError:  # stream_idle_s passed without a byte
                    await self._end_stream(out, "node stopped sending", "upstream_stalled")
                    return Outcome.TIMEOUT
                except (ClientError, OSError):
                    await self._end_stream(out, "node failed mid-stream", "upstream_error")
                    return Outcome.STREAM_ERROR
            await out.write_eof()
        except ConnectionResetError:
            return Outcome.CANCELLED  # the client went away
        return ok

    @staticmethod
    async def _end_stream(out: web.StreamResponse, message: str, code: str) -> None:
        try:
            await out.write(sse_error_event(message, code))
            await out.write_eof()
        except ConnectionResetError:
            pass

    async def _read_body(self, upstream: ClientResponse, deadline: float) -> bytes:
        time = asyncio.get_running_loop().time
        content = upstream.content
        parts: list[bytes] = []
        size = 0
        while chunk := await content.readany():
            if time() > deadline:
                raise TimeoutError
            size += len(chunk)
            if size > self.max_response:
                raise ClientError("response larger than limits.max_response_bytes")
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    # -- helpers ----------------------------------------------------------------

    def _upstream_headers(self, request: web.Request, request_id: str) -> CIMultiDict[str]:
        headers = CIMultiDict(
            (k, v) for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST
        )
        headers["x-request-id"] = request_id
        return headers

    def _too_large(self) -> web.Response:
        return error_response(
            413,
            f"request body exceeds {self.max_body} bytes",
            "invalid_request_error",
            "request_too_large",
        )

    def _exhausted(self, failures: list[_Failed], deadline_passed: bool) -> web.Response:
        if not failures or deadline_passed or all(f.outcome is Outcome.TIMEOUT for f in failures):
            return error_response(
                504,
                "no node answered within the request deadline",
                "timeout_error",
                "deadline_exceeded",
            )
        summary = ", ".join(f.detail for f in failures)
        if all(f.outcome is Outcome.HTTP_404 for f in failures):
            return error_response(
                404,
                f"no node tried knows this model or endpoint ({summary})",
                "invalid_request_error",
                "model_not_found",
                "model",
            )
        if all(f.outcome is Outcome.HTTP_429 for f in failures):
            retry_after = min((f.retry_after or "1" for f in failures), key=_seconds)
            return error_response(
                429,
                f"every node tried is rate limited ({summary})",
                "rate_limit_error",
                "upstream_rate_limited",
                headers={"Retry-After": retry_after},
            )
        return error_response(
            502,
            f"{len(failures)} attempt(s) failed: {summary}",
            "upstream_error",
            "upstream_failed",
            headers={"Retry-After": "1"},
        )


def _seconds(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return 1.0
