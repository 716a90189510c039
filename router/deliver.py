"""Delivering an opened attempt's answer to the client: from here on it is committed.

A plain answer was read whole by :meth:`~router.upstream.Upstream.open` and is
sent as one response. A stream goes through a :class:`~router.relay.Relay`
event by event: between chunks the node may be silent for
``timeouts.stream_idle_s``, and may send bytes without making progress (no new
generated text) for no longer either; the request deadline is checked as each
chunk arrives. A stream is cut with ``finish_reason: length`` once it delivered
more content events than the request's ``max_tokens * n`` (a node that never
stops), and moved elsewhere when its pace falls ``resume.slow_factor`` times
behind the median of the model's nodes. When the node fails after the first
byte, the ``resume`` step asks another node to continue the answer (see
:mod:`router.relay`); when no node can, the stream ends with an SSE error event.

However the answer ends (completed, cut, failed, or the client gone), a counted
request's tokens are billed here (:func:`router.bill.bill`): the node's usage
within what it delivered. A usage over those bounds is the node's
``bad_usage`` failure.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import ClientError, web

from router.bill import bill, generated_bytes
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
# The usual seconds between tokens of a model's nodes (their median); < 0: unknown.
FleetPace = Callable[[str], float]
PACE_WINDOW = 16  # tokens between two looks at a stream's pace
PACE_FLOOR_S = 0.05  # a stream faster than one token per this is never a straggler
_FAILURE_CODES = {
    "stalled": ("node stopped sending", "upstream_stalled"),
    "deadline": ("request deadline exceeded", "deadline_exceeded"),
    "late": ("request deadline exceeded", "deadline_exceeded"),
}
# Moved for its pace: a straggler (behind its own usual pace: the node is busy,
# not at fault) or slow (behind the fleet's: a timeout of its node).
MOVED = {"straggler": Outcome.CANCELLED, "slow": Outcome.TIMEOUT}


class Deliver:
    def __init__(
        self,
        stream_idle_s: float,
        clock: Callable[[], float],
        resume: Resume,
        track: bool = True,
        straggler_factor: float = 0.0,
        max_event: int = 1024 * 1024,
        slow_factor: float = 0.0,
        fleet_pace: FleetPace = lambda model: -1.0,
    ) -> None:
        self.stream_idle_s = stream_idle_s
        self.clock = clock
        self.resume = resume
        self.track = track  # False (resume.enabled: false): bytes pass as they come
        self.straggler_factor = straggler_factor  # 0: never move a slow stream
        self.max_event = max_event  # limits.max_event_bytes
        self.slow_factor = slow_factor  # 0: no pace floor relative to the fleet
        self.fleet_pace = fleet_pace
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
        status = 200  # a node's other 2xx (201, 206, ...) mean nothing in these APIs
        headers = response_headers(response.headers, stream=not opened.whole)
        headers.add(NODE_HEADER, node.id)
        headers["x-request-id"] = ex.request_id
        if call.answer_headers is not None:
            headers.extend(call.answer_headers)
        if opened.whole:
            outcome = Outcome.OK
            if call.count:
                doc = opened.doc or {}
                call.tokens, over = bill(
                    call.sizes, call.body, usage_from(doc), None, generated_bytes(doc)
                )
                if over:
                    outcome = Outcome.BAD_USAGE
            opened.close(outcome)
            return web.Response(status=status, body=opened.first, headers=headers)
        node.stats.observe_ttfb(attempt.t_first - attempt.t0, attempt.t_first)
        out = web.StreamResponse(status=status, headers=headers)
        await self._relay(call, opened, out)
        return out

    async def _relay(self, call: Call, opened: Opened, out: web.StreamResponse) -> None:
        """Pass the stream on event by event; continue it elsewhere when its node fails
        (or falls far behind its own usual pace, or the fleet's)."""
        sizes = call.sizes
        chat = call.request.path.endswith("/chat/completions")
        relay = Relay(chat, call.hide_usage, sizes.limit, sizes.events, self.max_event)
        pass_through = True  # the first answer's events go out as they came
        current: Opened | None = opened
        chunk = opened.first
        pace = True
        task = asyncio.current_task()
        if task is not None:
            self.streams.add(task)
        try:
            await out.prepare(call.request)
            while current is not None:
                reason = await self._copy(call, current, out, relay, chunk, pass_through, pace)
                if reason is None:
                    over = self._bill(call, relay) if call.count else False
                    current.close(Outcome.BAD_USAGE if over else Outcome.OK)
                    current = None
                    await out.write_eof()
                    return
                if reason == "overlong":  # more than it was asked for: cut here
                    current.close(Outcome.BAD_ANSWER)
                    current = None
                    await out.write(relay.final_event("length") + b"\n\ndata: [DONE]\n\n")
                    await out.write_eof()
                    return
                if reason in ("deadline", "late"):
                    found: Opened | str = "deadline"
                else:
                    found = await self.resume(call, relay, current.node, reason)
                if reason in MOVED and not isinstance(found, Opened):
                    pace, chunk = False, b""  # nowhere better: stay on this node
                    continue
                current.close(_outcome(reason))
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
            if call.count and call.tokens is None:  # it ended early: what was delivered
                self._bill(call, relay)

    @staticmethod
    def _bill(call: Call, relay: Relay) -> bool:
        """Bill the stream's tokens; True when the node's usage claimed more than it
        delivered."""
        claimed = usage_from({"usage": relay.usage})
        call.tokens, over = bill(call.sizes, call.body, claimed, relay.delivered, relay.volume)
        return over

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
        None when it ended properly, else why it stopped: reset, stalled (silent, or
        sending without progress, for ``stream_idle_s``), error_event, garbage,
        truncated, overlong (more content events than asked for), deadline (late:
        with a pace far behind the fleet's), straggler (``pace``: it fell
        ``straggler_factor`` times behind its own usual time between tokens) or slow
        (``slow_factor`` times behind the fleet's)."""
        conn = opened.response.connection
        if conn is not None and conn.protocol is not None:
            conn.protocol.read_timeout = self.stream_idle_s
        if not self.track and not call.count:  # counting tokens needs the events read
            return await self._copy_bytes(call, opened, out, chunk)
        clock, deadline, idle = self.clock, call.deadline, self.stream_idle_s
        readany = opened.response.content.readany
        write = out.write
        stats = opened.node.stats
        usual = stats.token_gap * self.straggler_factor if pace and stats.token_gap > 0 else 0.0
        fleet = self.fleet_pace(call.info.model) if self.slow_factor else -1.0
        slowest = fleet * self.slow_factor if fleet > 0 else 0.0
        cut = relay.cut
        began, began_n = clock(), relay.delivered
        mark, mark_n = began, began_n
        moved, moved_at = relay.delivered + relay.volume, began
        while True:
            if chunk:
                held = bool(relay.buf)
                events = relay.feed(chunk)
                over = False
                if pass_through:
                    for i, event in enumerate(events):
                        relay.track(event)
                        if relay.delivered > cut:
                            del events[i:]  # from the event past the request's tokens on
                            over = True
                            break
                    if relay.failure:
                        return relay.failure
                    if relay.hidden is not None:  # the usage chunk the client did not ask for
                        events = [e for e in events if e is not relay.hidden]
                        relay.hidden, held = None, True
                    if events:
                        # Whole events only: a chunk that ends mid-event waits for the rest.
                        whole = not held and not over and not relay.buf
                        whole = whole and chunk.endswith(b"\n\n")
                        await write(chunk if whole else b"\n\n".join(events) + b"\n\n")
                else:
                    rewritten = [e for e in map(relay.rewrite, events) if e is not None]
                    if relay.failure:
                        return relay.failure
                    if rewritten:
                        await write(b"\n\n".join(rewritten) + b"\n\n")
                    over = relay.delivered > cut
                if over:
                    return "overlong"
                now = clock()
                if now > deadline:
                    gap = (now - began) / max(relay.delivered - began_n, 1)
                    return "late" if slowest and gap > slowest else "deadline"
                progress = relay.delivered + relay.volume
                if progress != moved:
                    moved, moved_at = progress, now
                elif now - moved_at > idle:
                    return "stalled"  # bytes, but no new text
                if pace and (usual or slowest) and relay.delivered - mark_n >= PACE_WINDOW:
                    gap = (now - mark) / (relay.delivered - mark_n)
                    if gap > PACE_FLOOR_S and not relay.exhausted:
                        if slowest and gap > slowest:
                            return "slow"
                        if usual and gap > usual:
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
    """What a node's stream that stopped for ``reason`` says of the node."""
    if reason in MOVED:
        return MOVED[reason]
    if reason == "deadline":
        return Outcome.CANCELLED  # the node was working; the caller's time ran out
    if reason == "garbage":
        return Outcome.BAD_ANSWER
    return Outcome.TIMEOUT if reason in ("stalled", "late") else Outcome.STREAM_ERROR


async def _end_stream(out: web.StreamResponse, message: str, code: str) -> None:
    try:
        await out.write(sse_error_event(message, code))
        await out.write_eof()
    except (ConnectionResetError, RuntimeError):  # the client left; the response closed
        pass
