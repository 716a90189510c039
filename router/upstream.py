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
import zlib
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
from multidict import CIMultiDict, CIMultiDictProxy

from router.addresses import VIA_HEADER
from router.call import Call, Failed
from router.config import Config
from router.errors import BUSY, retry_after_s
from router.fleet import Node
from router.gate import BATCH
from router.measure import Attempt, Meter, Outcome

# The client's headers a node receives: trace context, and the compression the
# client accepts for answers read whole (a stream must stay readable event by
# event). Everything else (keys, cookies, organisation ids, the client's user
# agent) stays here. Ballast sets Content-Type (the body is JSON: it was parsed),
# x-request-id and x-ballast-via.
FORWARD_REQUEST = frozenset({"traceparent", "tracestate", "baggage"})
# None of a node's answer headers reach a client: Ballast sets the type of every
# answer itself (JSON or SSE, as it checked it) with ``nosniff``, and the
# compression it decoded to check, so that no node can make a browser run what it
# sends (text/html), set cookies, CORS, caching, redirects or HSTS in the router's
# origin, or show rate limits or a request id that are not Ballast's.
JSON_HEADERS = (("Content-Type", "application/json"), ("X-Content-Type-Options", "nosniff"))
SSE_HEADERS = (
    ("Content-Type", "text/event-stream; charset=utf-8"),
    ("Cache-Control", "no-cache"),
    ("X-Content-Type-Options", "nosniff"),
)
SSE_START = (b"data:", b":", b"event:", b"id:", b"retry:")
# The compressions an answer read whole may come in (when the client accepts them):
# each is decoded, within limits.max_response_bytes, to check and count the answer.
DECODABLE = {"gzip": zlib.MAX_WBITS | 16, "x-gzip": zlib.MAX_WBITS | 16, "deflate": zlib.MAX_WBITS}
# 404 too: a node that claims the model but does not know it is broken for this
# request, and another node may well serve it. 401, 403 and 407 refuse Ballast's
# own credentials (the node's key), never the caller's: the node's fault, and the
# caller must not read them as its key refused.
RETRYABLE_STATUS = frozenset({401, 403, 404, 407, 429, 500, 502, 503, 504})
_OUTCOME_OF = {
    401: Outcome.REJECTED,
    403: Outcome.REJECTED,
    404: Outcome.HTTP_404,
    407: Outcome.REJECTED,
    429: Outcome.HTTP_429,
}


_REFUSED = re.compile(r"\s*q\s*=\s*0(\.0{0,3})?\s*", re.IGNORECASE)  # "not acceptable"
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
    stream, its first chunk. A body read whole counts against
    ``limits.buffered_bytes`` until the attempt is closed."""

    __slots__ = ("attempt", "doc", "encoding", "first", "held", "response", "whole")

    def __init__(
        self,
        attempt: Attempt,
        response: ClientResponse,
        first: bytes,
        whole: bool,
        doc: dict[str, Any] | None = None,
        held: Held | None = None,
        encoding: str = "identity",
    ) -> None:
        self.attempt = attempt
        self.response = response
        self.first = first
        self.whole = whole
        self.doc = doc  # a 2xx answer read whole, parsed once
        self.held = held  # the bytes it holds of limits.buffered_bytes
        self.encoding = encoding  # a whole answer's checked compression

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
        if self.held is not None:
            self.held.release()
            self.held = None
        self.attempt.end(outcome)


class Held:
    """The memory one answer read whole takes, counted in ``budget`` until released
    (once): ``COPIES`` times its bytes, for the chunks read, the body they are
    joined into, the answer parsed from it, the copy in the client's socket buffer
    and what the allocator keeps meanwhile, about what a process's resident memory
    grows by per answer (loadtest/bench_hostile.py)."""

    __slots__ = ("budget", "size")
    COPIES = 6

    def __init__(self, budget: Buffered) -> None:
        self.budget = budget
        self.size = 0

    def take(self, n: int) -> bool:
        budget = self.budget
        n *= self.COPIES
        if budget.used + n > budget.limit:
            return False
        budget.used += n
        self.size += n
        return True

    def release(self) -> None:
        self.budget.used -= self.size
        self.size = 0


class Buffered:
    """The bytes of answers this process is reading whole (``limits.buffered_bytes``)."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0


def decodable(accept_encoding: str) -> str | None:
    """Of a client's ``Accept-Encoding``, what a node may use: the compressions
    Ballast can decode to check the answer (None: none of them)."""
    wanted = []
    for part in accept_encoding.split(","):
        name, _, params = part.partition(";")
        name = name.strip().lower()
        if name in DECODABLE and not _REFUSED.fullmatch(params):
            wanted.append(name)
    return ", ".join(wanted) if wanted else None


def _connection_names(headers: Mapping[str, str]) -> frozenset[str]:
    """Header names a ``Connection`` header declares hop-by-hop (RFC 9110 §7.6.1)."""
    value = headers.get("Connection")
    if not value:
        return frozenset()
    return frozenset(n.strip().lower() for n in value.split(","))


def response_headers(stream: bool, encoding: str = "identity") -> CIMultiDict[str]:
    """The headers of an answer to a client, all Ballast's: its type as Ballast
    checked it, and the compression it checked (none of a node's headers pass)."""
    out = CIMultiDict(SSE_HEADERS if stream else JSON_HEADERS)
    if encoding != "identity":
        out["Content-Encoding"] = encoding
    return out


def encoding_of(headers: CIMultiDictProxy[str]) -> str | None:
    """An answer's one ``Content-Encoding``, lower case ("identity" when it has
    none); None when it names several (headers or a list): not one Ballast checks."""
    values = headers.getall("Content-Encoding", ())
    if not values:
        return "identity"
    if len(values) > 1 or "," in values[0]:
        return None
    return values[0].strip().lower() or "identity"


def decode(body: bytes, encoding: str, limit: int) -> bytes | None:
    """A compressed answer's bytes, or None when it is not valid in ``encoding`` or
    inflates past ``limit`` bytes (a compression bomb stops there)."""
    inflate = zlib.decompressobj(DECODABLE[encoding])
    try:
        out = inflate.decompress(body, limit + 1)
    except zlib.error:
        return None
    if len(out) > limit or inflate.unconsumed_tail or not inflate.eof or inflate.unused_data:
        return None  # (unused data: a second gzip member, which clients would read)
    return out


def read_answer(path: str, body: bytes) -> dict[str, Any] | None:
    """A 2xx body read whole (decoded), parsed, when it is an answer for ``path``: a
    JSON object with ``choices`` (completions) or ``data`` (embeddings); None when
    it is not."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    key = "data" if path.endswith("/embeddings") else "choices"
    return doc if isinstance(doc, dict) and isinstance(doc.get(key), list) else None


def is_answer_status(status: int) -> bool:
    """Statuses a node may answer with: 2xx, 4xx and 5xx. A 1xx or 3xx (a redirect
    would make clients send the prompt elsewhere) or anything past 599 is not one."""
    return 200 <= status < 300 or 400 <= status < 600


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
        self.buffered = Buffered(cfg.limits.buffered_bytes)  # answers being read whole
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
            if named and low in named:
                continue
            if low in FORWARD_REQUEST:
                headers.add(k, v)
            elif compress and low == "accept-encoding" and (wanted := decodable(v)):
                headers.add(k, wanted)
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
            body = call.body
            if (name := node.served.get(call.info.model)) is not None:
                body = orjson.dumps({**call.doc, "model": name})  # the node's name for it
            response = await self.send(node, call.request.path, body, call.headers, call.deadline)
            status = response.status
            if status in RETRYABLE_STATUS:
                retry_after = response.headers.get("Retry-After")
                if retry_after is not None and status == 429:
                    node.stats.paused_until = self.clock() + retry_after_s(retry_after)
                outcome = _OUTCOME_OF.get(status, Outcome.HTTP_5XX)
                raise Failed(outcome, f"HTTP {status}", retry_after)
            if not is_answer_status(status):
                raise Failed(Outcome.BAD_ANSWER, f"HTTP {status} is not an answer")
            encoding = encoding_of(response.headers)
            if encoding is None:
                raise Failed(Outcome.BAD_ANSWER, "an answer with several encodings")
            if call.info.stream and status < 400:
                if encoding != "identity":
                    raise Failed(Outcome.BAD_ANSWER, f"a stream compressed with {encoding[:32]}")
                first = await response.content.readany()
                attempt.first_byte()
                if not first.lstrip().startswith(SSE_START):
                    raise Failed(Outcome.BAD_ANSWER, f"HTTP {status} with a body that is not SSE")
                return Opened(attempt, response, first, whole=False)
            attempt.progress()  # the headers: not hung; its latency runs to the last byte
            held = Held(self.buffered)
            try:
                body = await self.read_body(response, self.max_response, call.deadline, held)
                attempt.first_byte()
                doc = None
                if status < 300:
                    doc = self._answer(call, body, encoding, held)
                    if doc is None:
                        raise Failed(
                            Outcome.BAD_ANSWER, f"HTTP {status} with a body that is not an answer"
                        )
            except BaseException:
                held.release()
                raise
            if not call.count and call.asked is None:
                doc = None  # checked; nothing reads it again: not kept while it is sent
            return Opened(attempt, response, body, True, doc, held, encoding)
        except Failed as f:
            self._abandon(attempt, response, f.outcome)
            raise
        except TimeoutError:
            self._abandon(attempt, response, Outcome.TIMEOUT)
            late = response is not None
            raise Failed(
                Outcome.TIMEOUT, "body not complete in time" if late else "no first byte in time"
            ) from None
        except (ClientError, OSError) as e:
            outcome = Outcome.STREAM_ERROR if response is not None else Outcome.CONNECT_ERROR
            self._abandon(attempt, response, outcome)
            raise Failed(outcome, type(e).__name__) from None
        except BaseException:
            self._abandon(attempt, response, Outcome.CANCELLED)
            raise

    def _answer(self, call: Call, body: bytes, encoding: str, held: Held) -> dict[str, Any] | None:
        """A 2xx body read whole, parsed (decoded first when compressed as the client
        accepts); None when it is not an answer, or is compressed in a way the client
        did not accept."""
        if encoding != "identity":
            accepted = call.headers.get("Accept-Encoding", "")
            if encoding not in accepted.split(", "):
                return None
            decoded = decode(body, encoding, self.max_response)
            if decoded is None:
                return None
            if not held.take(len(decoded)):  # decoded, it is held too while it is read
                raise Failed(Outcome.CANCELLED, BUSY)
            body = decoded
        return read_answer(call.request.path, body)

    @staticmethod
    def _abandon(attempt: Attempt, response: ClientResponse | None, outcome: Outcome) -> None:
        if response is not None:
            response.close()
        attempt.end(outcome)

    async def read_body(
        self,
        response: ClientResponse,
        limit: int,
        deadline: float = float("inf"),
        held: Held | None = None,
    ) -> bytes:
        """The whole body; ClientError past ``limit`` bytes, TimeoutError past
        ``deadline``. Into ``held``, its bytes count against ``limits.buffered_bytes``;
        past it, the attempt fails without blaming the node."""
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
            if held is not None and not held.take(len(chunk)):
                raise Failed(Outcome.CANCELLED, BUSY)
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)
