"""Delivering an opened attempt's answer to the client: from here on it is committed.

A plain answer was read whole by :meth:`~router.upstream.Upstream.open` and is
sent as one response. A stream goes through a :class:`~router.relay.Relay`
event by event: between chunks the node may be silent for
``timeouts.stream_idle_s``, and the request deadline is checked as each chunk
arrives. When the node fails after the first byte, the ``resume`` step asks
another node to continue the answer (see :mod:`router.relay`); when no node
can, the stream ends with an SSE error event.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import ClientError, web

from router.call import Call
from router.errors import NODE_HEADER, sse_error_event
from router.fleet import Node
from router.measure import Outcome
from router.relay import Relay
from router.tenants import usage_from
from router.upstream import Opened, response_headers

# Continue ``call`` elsewhere after ``node`` failed (for ``reason``): the new attempt,
# or why there is none ("ended": nothing left to ask for).
Resume = Callable[[Call, Relay, Node, str], Awaitable[Opened | str]]
PACE_WINDOW = 16  # tokens between two looks at a stream's pace
PACE_FLOOR_S = 0.05  # a stream faster than one token per this is never a straggler
_FAILURE_CODES = {
    "stalled": ("node stopped sending", "upstream_stalled"),
    "deadline": ("request deadline exceeded", "deadline_exceeded"),
}


class Deliver:
    def __init__(
        self,
        stream_idle_s: float,
        clock: Callable[[], float],
        resume: Resume,
        track: bool = True,
        straggler_factor: float = 0.0,
    ) -> None:
        self.stream_idle_s = stream_idle_s
        self.clock = clock
        self.resume = resume
        self.track = track  # False (resume.enabled: false): bytes pass as they come
        self.straggler_factor = straggler_factor  # 0: never move a slow stream
        self.streams: set[asyncio.Task[object]] = set()  # relaying now (ended on shutdown)

    def end_streams(self) -> int:
        """Shutdown, after the drain time: end every stream still relaying with an
        error event (the client can read it; the connection then closes)."""
        for task in self.streams:
            task.cancel()
        return len(self.streams)

    async def __call__(self, call: Call, opened: Opened) -> web.StreamResponse:
        response = opened.response
        ex = call.ex
        attempt = opened.attempt
        node = call.served_by = attempt.node
        ex.node = node.id
        if node.pool is not None:
            ex.pool = node.pool.name
        ex.ttfb = attempt.t_first - ex.start
        status = response.status
        ok = Outcome.OK if status < 400 else Outcome.CLIENT_ERROR
        headers = response_headers(response.headers)  # none of those added here
        headers.add(NODE_HEADER, node.id)
        if call.answer_headers is not None:
            headers.extend(call.answer_headers)
        if opened.whole:
            opened.close(ok)
            if call.count:
                call.tokens = usage_from(opened.doc)
            return web.Response(status=status, body=opened.first, headers=headers)
        node.stats.observe_ttfb(attempt.t_first - attempt.t0, attempt.t_first)
        out = web.StreamResponse(status=status, headers=headers)
        await self._relay(call, opened, out)
        return out

    async def _relay(self, call: Call, opened: Opened, out: web.StreamResponse) -> None:
        """Pass the stream on event by event; continue it elsewhere when its node fails
        (or, a straggler, falls far behind its own usual pace)."""
        relay = Relay(call.request.path.endswith("/chat/completions"), call.hide_usage)
        pass_through = True  # the first answer's events go out as they came
        current: Opened | None = opened
        chunk = opened.first
        pace = self.straggler_factor > 0
        task = asyncio.current_task()
        if task is not None:
            self.streams.add(task)
        try:
            await out.prepare(call.request)
            while current is not None:
                reason = await self._copy(call, current, out, relay, chunk, pass_through, pace)
                if reason is None:
                    current.close(Outcome.OK)
                    current = None
                    if call.count:
                        call.tokens = usage_from({"usage": relay.usage})
                        call.delivered = relay.delivered
                    await out.write_eof()
                    return
                if reason == "deadline":
                    found: Opened | str = "deadline"
                else:
                    found = await self.resume(call, relay, current.node, reason)
                if reason == "straggler" and not isinstance(found, Opened):
                    pace, chunk = False, b""  # nowhere better: stay on this node
                    continue
                slow = reason in ("deadline", "straggler")  # the node was working
                current.close(Outcome.CANCELLED if slow else _outcome(reason))
                current = None
                if found == "ended":
                    await out.write(relay.final_event("length") + b"\n\ndata: [DONE]\n\n")
                    await out.write_eof()
                    return
                if not isinstance(found, Opened):
                    message, code = _FAILURE_CODES.get(
                        reason, ("node failed mid-stream", "upstream_error")
                    )
                    await _end_stream(out, message, code)
                    return
                current, chunk, pass_through = found, found.first, False
        except ConnectionResetError:
            if current is not None:
                current.close(Outcome.CANCELLED)  # the client went away
        except asyncio.CancelledError:
            # The router is stopping (end_streams) or the client left: end the
            # stream properly where the client can still read it.
            if current is not None:
                current.close(Outcome.CANCELLED)
            await _end_stream(out, "the router stopped before the answer ended", "router_stopped")
            raise
        except BaseException:
            if current is not None:
                current.close(Outcome.CANCELLED)
            raise
        finally:
            self.streams.discard(task)  # type: ignore[arg-type]

    async def _copy(
        self,
        call: Call,
        opened: Opened,
        out: web.StreamResponse,
        relay: Relay,
        chunk: bytes,
        pass_through: bool,
        pace: bool,
    ) -> str | None:
        """Copy one node's stream (from ``chunk``, or from its next bytes when empty);
        None when it ended properly, else why it stopped: reset, stalled, error_event,
        garbage, truncated, deadline, or straggler (``pace``: it fell ``straggler_factor`` times
        behind its own usual time between tokens)."""
        conn = opened.response.connection
        if conn is not None and conn.protocol is not None:
            conn.protocol.read_timeout = self.stream_idle_s
        if not self.track and not call.count:  # counting tokens needs the events read
            return await self._copy_bytes(call, opened, out, chunk)
        clock, deadline = self.clock, call.deadline
        readany = opened.response.content.readany
        write = out.write
        stats = opened.node.stats
        usual = stats.token_gap * self.straggler_factor if pace and stats.token_gap > 0 else 0.0
        began, began_n = clock(), relay.delivered
        mark, mark_n = began, began_n
        while True:
            if chunk:
                held = bool(relay.buf)
                events = relay.feed(chunk)
                if pass_through:
                    for event in events:
                        relay.track(event)
                    if relay.failure:
                        return relay.failure
                    if relay.hidden is not None:  # the usage chunk the client did not ask for
                        events = [e for e in events if e is not relay.hidden]
                        relay.hidden, held = None, True
                    if events:
                        # Whole events only: a chunk that ends mid-event waits for the rest.
                        whole = not held and not relay.buf and chunk.endswith(b"\n\n")
                        await write(chunk if whole else b"\n\n".join(events) + b"\n\n")
                else:
                    rewritten = [e for e in map(relay.rewrite, events) if e is not None]
                    if relay.failure:
                        return relay.failure
                    if rewritten:
                        await write(b"\n\n".join(rewritten) + b"\n\n")
                now = clock()
                if now > deadline:
                    return "deadline"
                if usual and relay.delivered - mark_n >= PACE_WINDOW:
                    gap = (now - mark) / (relay.delivered - mark_n)
                    if gap > usual and gap > PACE_FLOOR_S and not relay.exhausted(call.doc):
                        return "straggler"
                    mark, mark_n = now, relay.delivered
            try:
                chunk = await readany()
            except TimeoutError:  # stream_idle_s passed without a byte
                return "stalled"
            except (ClientError, OSError):
                return "reset"
            if not chunk:
                break
        if not relay.complete:
            return "truncated"
        tokens = relay.delivered - began_n
        if tokens >= PACE_WINDOW:
            stats.observe_token_gap((clock() - began) / tokens)
        return None

    async def _copy_bytes(
        self, call: Call, opened: Opened, out: web.StreamResponse, chunk: bytes
    ) -> str | None:
        """The untracked copy: chunks as they arrive; the end of the bytes is the end."""
        clock, deadline = self.clock, call.deadline
        readany = opened.response.content.readany
        while chunk:
            await out.write(chunk)
            if clock() > deadline:
                return "deadline"
            try:
                chunk = await readany()
            except TimeoutError:
                return "stalled"
            except (ClientError, OSError):
                return "reset"
        return None


def _outcome(reason: str) -> Outcome:
    if reason == "garbage":
        return Outcome.BAD_ANSWER
    return Outcome.TIMEOUT if reason == "stalled" else Outcome.STREAM_ERROR


async def _end_stream(out: web.StreamResponse, message: str, code: str) -> None:
    try:
        await out.write(sse_error_event(message, code))
        await out.write_eof()
    except (ConnectionResetError, RuntimeError):  # the client left; the response closed
        pass
