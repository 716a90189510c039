"""Attempts on nodes: send the request, wait for the first byte, classify failures.

:meth:`Upstream.open` is the retryable half of an attempt: everything that can
go wrong before a byte reaches the client raises :class:`~router.call.Failed`,
and the request path moves on to another node. What it returns, an
:class:`Opened`, is an attempt whose answer has started; delivering it is
:mod:`router.deliver`.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import (
    ClientConnectionResetError,
    ClientConnectorError,
    ClientError,
    ClientOSError,
    ClientResponse,
    ClientSession,
    ClientTimeout,
    ServerDisconnectedError,
    web,
)
from multidict import CIMultiDict

from router.addresses import VIA_HEADER
from router.call import Call, Failed
from router.config import Config
from router.errors import NODE_HEADER, retry_after_s
from router.fleet import Node
from router.gate import BATCH
from router.measure import Attempt, Meter, Outcome
from router.pools import FALLBACK_HEADER
from router.tenants import RATE_LIMIT_HEADERS

# Headers that describe one hop, not the message (RFC 9110 §7.6.1), plus those
# Ballast sets itself or must not leak to a node.
HOP_BY_HOP = frozenset(
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
# The client's headers a node receives: trace context, and the compression the
# client accepts for answers read whole (a stream must stay readable event by
# event). Everything else (keys, cookies, organisation ids, the client's user
# agent) stays here. Ballast sets Content-Type (the body is JSON: it was parsed),
# x-request-id and x-ballast-via.
FORWARD_REQUEST = frozenset({"traceparent", "tracestate", "baggage"})
# A node's answer keeps none of the headers Ballast sets on answers itself: which
# node served, the fallback model, and the client key's rate limits (a node's own
# limits are Ballast's to handle, not the client's).
ROUTER_SETS = frozenset({NODE_HEADER, FALLBACK_HEADER, *RATE_LIMIT_HEADERS})
DROP_RESPONSE = HOP_BY_HOP | ROUTER_SETS | {"content-length", "set-cookie", "set-cookie2"}
SSE_START = (b"data:", b":", b"event:", b"id:", b"retry:")
# 404 too: a node that claims the model but does not know it is broken for this
# request, and another node may well serve it.
RETRYABLE_STATUS = frozenset({404, 429, 500, 502, 503, 504})
_OUTCOME_OF = {404: Outcome.HTTP_404, 429: Outcome.HTTP_429}


_UUID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")


class RequestIds:
    """Request ids shaped as UUIDs (version 4), which every engine accepts (some
    refuse anything else): a random prefix per process and a counter, so making
    one costs a string format, not a call for random bytes."""

    def __init__(self) -> None:
        h = secrets.token_hex(8)
        variant = "89ab"[int(h[15], 16) % 4]
        self.prefix = f"{h[:8]}-{h[8:12]}-4{h[12:15]}-{variant}{secrets.token_hex(2)[:3]}-"
        self.counter = int.from_bytes(secrets.token_bytes(6), "big")

    def new(self) -> str:
        self.counter = (self.counter + 1) & 0xFFFFFFFFFFFF
        return f"{self.prefix}{self.counter:012x}"

    def of(self, request: web.Request) -> tuple[str, str]:
        """(the id the client sees, the UUID sent upstream): the client's
        ``x-request-id`` when it is sane, and that same id upstream when it is a UUID."""
        rid = request.headers.get("x-request-id")
        if rid and len(rid) <= 128 and rid.isprintable() and rid.isascii():
            return rid, rid if _UUID.fullmatch(rid) else self.new()
        rid = self.new()
        return rid, rid


class Opened:
    """An attempt whose node has answered: status known, and either the whole body
    read (``whole``: every non-streamed answer, and every error answer) or, for a
    stream, its first chunk."""

    __slots__ = ("attempt", "doc", "first", "response", "whole")

    def __init__(
        self,
        attempt: Attempt,
        response: ClientResponse,
        first: bytes,
        whole: bool,
        doc: dict[str, Any] | None = None,
    ) -> None:
        self.attempt = attempt
        self.response = response
        self.first = first
        self.whole = whole
        self.doc = doc  # a 2xx answer read whole, parsed once

    @property
    def node(self) -> Node:
        return self.attempt.node

    @property
    def status(self) -> int:
        return self.response.status

    def close(self, outcome: Outcome) -> None:
        """End the attempt: keep the connection for reuse after a clean or whole answer."""
        if self.whole or outcome is Outcome.OK or outcome is Outcome.CLIENT_ERROR:
            self.response.release()
        else:
            self.response.close()
        self.attempt.end(outcome)


def _connection_names(headers: Mapping[str, str]) -> frozenset[str]:
    """Header names a ``Connection`` header declares hop-by-hop (RFC 9110 §7.6.1)."""
    value = headers.get("Connection")
    if not value:
        return frozenset()
    return frozenset(n.strip().lower() for n in value.split(","))


def response_headers(headers: Mapping[str, str]) -> CIMultiDict[str]:
    """A node's response headers a client may see: no hop-by-hop headers (nor any
    the node's ``Connection`` names), no cookies, no length (set again)."""
    named = _connection_names(headers)
    return CIMultiDict(
        (k, v)
        for k, v in headers.items()
        if (low := k.lower()) not in DROP_RESPONSE and low not in named
    )


COMPRESSED: dict[str, Any] = {}  # what read_answer gives for a body it passes on unread


def read_answer(path: str, body: bytes, headers: Mapping[str, str]) -> dict[str, Any] | None:
    """A 2xx body read whole, parsed, when it is an answer for ``path``: a JSON object
    with ``choices`` (completions) or ``data`` (embeddings); None when it is not. A
    compressed body (the client asked for compression) is passed on unread
    (:data:`COMPRESSED`)."""
    if headers.get("Content-Encoding", "identity") != "identity":
        return COMPRESSED
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    key = "data" if path.endswith("/embeddings") else "choices"
    return doc if isinstance(doc, dict) and isinstance(doc.get(key), list) else None


def stale_connection(e: BaseException) -> bool:
    """The node closed a pooled connection we then reused: it never saw the request,
    or closed before answering. Refused connections are not this."""
    if isinstance(e, ServerDisconnectedError | ClientConnectionResetError):
        return True
    return isinstance(e, ClientOSError) and not isinstance(e, ClientConnectorError)


class Upstream:
    """The pooled client sessions and the rules for one attempt on one node.

    ``fresh`` opens a new connection for every request: a request that failed on
    a pooled connection the node had closed (llama.cpp's server closes after
    streamed answers while advertising keep-alive) is sent again at once on a
    new one, and that first failure is not the node's.
    """

    def __init__(
        self,
        cfg: Config,
        session: ClientSession,
        meter: Meter,
        fresh: ClientSession | None = None,
    ) -> None:
        self.session = session
        self.fresh = fresh if fresh is not None else session
        self.meter = meter
        self.clock = meter.clock
        t = cfg.timeouts
        self.connect_s = t.connect_s
        self.first_byte_s = t.first_byte_s
        self.max_response = cfg.limits.max_response_bytes
        # The first-byte timeout is aiohttp's socket read timeout: no extra timer.
        self.timeout = ClientTimeout(total=None, sock_connect=t.connect_s, sock_read=t.first_byte_s)
        self.stale_retries = 0  # requests sent again after a node closed a pooled connection
        self.ids = RequestIds()
        self.router_id = secrets.token_hex(6)  # this process, in x-ballast-via

    def headers(
        self, request_headers: Mapping[str, str], request_id: str, compress: bool = False
    ) -> CIMultiDict[str]:
        """What every attempt of a request sends: the allowed client headers (less
        any the client's ``Connection`` names), the request id and the routers passed."""
        named = _connection_names(request_headers)
        headers: CIMultiDict[str] = CIMultiDict()
        for k, v in request_headers.items():
            low = k.lower()
            if (low in FORWARD_REQUEST or (compress and low == "accept-encoding")) and (
                not named or low not in named
            ):
                headers.add(k, v)
        headers["Content-Type"] = "application/json"
        headers["x-request-id"] = request_id
        via = request_headers.get(VIA_HEADER)
        headers[VIA_HEADER] = f"{via}, {self.router_id}" if via else self.router_id
        return headers

    def _timeout(self, deadline: float) -> ClientTimeout:
        """First byte within min(first_byte_s, time left)."""
        remaining = deadline - self.clock()
        if remaining >= self.first_byte_s:
            return self.timeout
        return ClientTimeout(
            total=None,
            sock_connect=min(self.connect_s, max(remaining, 0.001)),
            sock_read=max(remaining, 0.001),
        )

    async def send(
        self, node: Node, path: str, body: bytes, headers: CIMultiDict[str], deadline: float
    ) -> ClientResponse:
        """POST to the node (with its own key); a stale pooled connection is retried
        once at once on a new one."""
        if node.auth_header is not None:
            headers = CIMultiDict(headers)
            headers["Authorization"] = node.auth_header
        url = node.url + path
        try:
            return await self._post(self.session, url, body, headers, deadline)
        except (ClientError, OSError) as e:
            if not stale_connection(e):
                raise
        self.stale_retries += 1
        return await self._post(self.fresh, url, body, headers, deadline)

    async def _post(
        self,
        session: ClientSession,
        url: str,
        body: bytes,
        headers: CIMultiDict[str],
        deadline: float,
    ) -> ClientResponse:
        return await session.post(
            url, data=body, headers=headers, timeout=self._timeout(deadline), allow_redirects=False
        )  # fmt: skip

    async def open(self, call: Call, node: Node) -> Opened:
        """Send ``call`` to ``node`` and wait for its first byte (or, without
        streaming, its whole body). Every failure here raises Failed."""
        attempt = self.meter.begin(node, call.ex.priority == BATCH, call.ex)
        response: ClientResponse | None = None
        try:
            response = await self.send(
                node, call.request.path, call.body, call.headers, call.deadline
            )
            status = response.status
            if status in RETRYABLE_STATUS:
                retry_after = response.headers.get("Retry-After")
                if retry_after is not None and status == 429:
                    node.stats.paused_until = self.clock() + retry_after_s(retry_after)
                outcome = _OUTCOME_OF.get(status, Outcome.HTTP_5XX)
                raise Failed(outcome, f"HTTP {status}", retry_after)
            if call.info.stream and status < 400:
                first = await response.content.readany()
                attempt.first_byte()
                if not first.lstrip().startswith(SSE_START):
                    raise Failed(Outcome.BAD_ANSWER, f"HTTP {status} with a body that is not SSE")
                return Opened(attempt, response, first, whole=False)
            attempt.first_byte()
            body = await self.read_body(response, self.max_response, call.deadline)
            doc = None
            if status < 300:
                doc = read_answer(call.request.path, body, response.headers)
                if doc is None:
                    raise Failed(
                        Outcome.BAD_ANSWER, f"HTTP {status} with a body that is not an answer"
                    )
            return Opened(attempt, response, body, whole=True, doc=doc)
        except Failed as f:
            self._abandon(attempt, response, f.outcome)
            raise
        except TimeoutError:
            self._abandon(attempt, response, Outcome.TIMEOUT)
            late = attempt.t_first >= 0
            raise Failed(
                Outcome.TIMEOUT, "body not complete in time" if late else "no first byte in time"
            ) from None
        except (ClientError, OSError) as e:
            outcome = Outcome.STREAM_ERROR if attempt.t_first >= 0 else Outcome.CONNECT_ERROR
            self._abandon(attempt, response, outcome)
            raise Failed(outcome, type(e).__name__) from None
        except BaseException:
            self._abandon(attempt, response, Outcome.CANCELLED)
            raise

    @staticmethod
    def _abandon(attempt: Attempt, response: ClientResponse | None, outcome: Outcome) -> None:
        if response is not None:
            response.close()
        attempt.end(outcome)

    async def read_body(
        self, response: ClientResponse, limit: int, deadline: float = float("inf")
    ) -> bytes:
        """The whole body; ClientError past ``limit`` bytes, TimeoutError past ``deadline``."""
        clock = self.clock
        content = response.content
        parts: list[bytes] = []
        size = 0
        while chunk := await content.readany():
            if clock() > deadline:
                raise TimeoutError
            size += len(chunk)
            if size > limit:
                raise ClientError(f"answer larger than {limit} bytes")
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)
