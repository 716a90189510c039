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
from router.nodes import Node, Outcome, Registry

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
_RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})


class Exchange:
    """What happened to one client request; handed to observers when it ends."""

    __slots__ = (
        "attempts",
        "duration",
        "model",
        "node",
        "outcomes",
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
        self.outcomes: list[Outcome] = []


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

    # -- entry point -------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        ex = Exchange(_request_id(request), self.clock())
        self.active += 1
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

        candidates = self.registry.candidates(model)
        if candidates is None:
            return error_response(
                404,
                f"the model {model!r} does not exist or no node serves it",
                "invalid_request_error",
                "model_not_found",
                "model",
            )
        if not candidates:
            return error_response(
                503,
                f"no node can serve model {model!r} right now",
                "service_unavailable",
                "no_capacity",
                headers={"Retry-After": "1"},
            )
        info = RequestInfo(
            model=model,
            stream=stream,
            max_tokens=max_tokens if isinstance(max_tokens, int) else None,
            prompt_bytes=len(body),
        )
        ranked = self.policy.rank(info, candidates, self.max_attempts, self.rng, self.clock())
        headers = self._upstream_headers(request, ex.request_id)
        return await self._attempts(request, ex, ranked, body, headers, stream)

    # -- attempts and failover ----------------------------------------------

    async def _attempts(
        self,
        request: web.Request,
        ex: Exchange,
        ranked: list[Node],
        body: bytes,
        headers: CIMultiDict[str],
        stream: bool,
    ) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.total_s
        failures: list[_Failed] = []
        retrying = False
        try:
            for i, node in enumerate(ranked):
                if i > 0:
                    if not self._retry_allowed():
                        break
                    if not retrying:
                        retrying = True
                        self.active_retries += 1
                if deadline - loop.time() <= 0:
                    break
                ex.attempts += 1
                ex.node = node.id
                try:
                    return await self._attempt(request, ex, node, body, headers, stream, deadline)
                except _Failed as f:
                    ex.outcomes.append(f.outcome)
                    failures.append(f)
        finally:
            if retrying:
                self.active_retries -= 1
        return self._exhausted(failures, deadline - loop.time() <= 0)

    def _retry_allowed(self) -> bool:
        """Envoy-style retry budget: concurrent retries stay below a share of traffic."""
        cap = max(self.min_retry_concurrency, self.active * self.budget_fraction)
        return self.active_retries < cap

    async def _attempt(
        self,
        request: web.Request,
        ex: Exchange,
        node: Node,
        body: bytes,
        headers: CIMultiDict[str],
        stream: bool,
        deadline: float,
    ) -> web.StreamResponse:
        stats = node.stats
        if node.auth_header is not None:
            headers["Authorization"] = node.auth_header
        else:
            headers.popall("Authorization", None)
        stats.in_flight += 1
        if stats.pending is not None:  # a shared store will report it
            self.registry.dirty.add(node)
        t0 = self.clock()
        elapsed = 0.0
        outcome = Outcome.CANCELLED
        upstream: ClientResponse | None = None
        try:
            # Until the client has been sent anything, every failure is retryable
            # (raised as _Failed). The first-byte timeout is aiohttp's socket read
            # timeout, so no extra timer runs per attempt.
            try:
                upstream = await self.session.post(
                    node.url + request.path,
                    data=body,
                    headers=headers,
                    timeout=self._attempt_timeout(deadline),
                    allow_redirects=False,
                )
                status = upstream.status
                if status in _RETRYABLE_STATUS:
                    outcome = Outcome.HTTP_429 if status == 429 else Outcome.HTTP_5XX
                    raise _Failed(outcome, f"HTTP {status}", upstream.headers.get("Retry-After"))
                first = await upstream.content.readany() if stream else b""
                t_first = self.clock()
                elapsed = t_first - t0
                data = b"" if stream else await self._read_body(upstream, deadline)
            except TimeoutError:
                outcome = Outcome.TIMEOUT
                detail = "body not complete in time" if elapsed else "no first byte in time"
                raise _Failed(outcome, detail) from None
            except (ClientError, OSError) as e:
                outcome = Outcome.STREAM_ERROR if elapsed else Outcome.CONNECT_ERROR
                raise _Failed(outcome, type(e).__name__) from None
            ex.ttfb = t_first - ex.start
            ok = Outcome.OK if status < 400 else Outcome.CLIENT_ERROR
            resp_headers = CIMultiDict(
                (k, v) for k, v in upstream.headers.items() if k.lower() not in _DROP_RESPONSE
            )
            resp_headers["x-ballast-node"] = node.id
            if not stream:
                outcome = ok
                return web.Response(status=status, body=data, headers=resp_headers)
            stats.ttfb.observe(elapsed, t_first)
            out = web.StreamResponse(status=status, headers=resp_headers)
            outcome = await self._pump(request, upstream, out, first, ok, deadline)
            return out
        finally:
            stats.in_flight -= 1
            if upstream is not None:
                if outcome is Outcome.OK or outcome is Outcome.CLIENT_ERROR:
                    upstream.release()
                else:
                    upstream.close()
            now = self.clock()
            stats.record(outcome, elapsed or (now - t0), now, self.penalty_s)

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
