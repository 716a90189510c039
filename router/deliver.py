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
import re
from collections.abc import Awaitable, Callable

import orjson
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
        straggler_factor: float = 0.0,
        max_event: int = 1024 * 1024,
        slow_factor: float = 0.0,
        fleet_pace: FleetPace = lambda model: -1.0,
    ) -> None:
        self.stream_idle_s = stream_idle_s
        self.clock = clock
        self.resume = resume
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
        ex = call.ex
        attempt = opened.attempt
        node = call.served_by = attempt.node
        ex.node = node.id
        if node.pool is not None:
            ex.pool = node.pool.name
        ex.ttfb = attempt.t_first - ex.start
        status = 200  # a node's other 2xx (201, 206, ...) mean nothing in these APIs
        headers = response_headers(not opened.whole, opened.encoding)
        headers.add(NODE_HEADER, node.id)
        headers["x-request-id"] = ex.request_id
        if call.answer_headers is not None:
            headers.extend(call.answer_headers)
        if opened.whole:
            outcome = Outcome.OK
            doc = opened.doc or {}
            if call.count:
                call.tokens, over = bill(
                    call.sizes, call.body, usage_from(doc), None, generated_bytes(doc)
                )
                if over:
                    outcome = Outcome.BAD_USAGE
            body = opened.first
            if call.asked is not None and doc:  # the model by the name the client asked
                doc["model"] = call.asked
                body = orjson.dumps(doc)
                headers.popall("Content-Encoding", None)
            opened.close(outcome)
            return web.Response(status=status, body=body, headers=headers)
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
        sending without progress, for ``stream_idle_s``), error_event, garbage (also:
        more than ``max_event`` bytes without progress), truncated, overlong (more
        generated events than asked for), deadline (late: with a pace far behind the
        fleet's), straggler (``pace``: it fell ``straggler_factor`` times behind its
        own usual time between tokens) or slow (``slow_factor`` times behind the
        fleet's, judged by tokens and by time). Only events written to the client
        count: those a failure or the cut stops are not sent, and not billed."""
        conn = opened.response.connection
        if conn is not None and conn.protocol is not None:
            conn.protocol.read_timeout = self.stream_idle_s
        clock, deadline, idle = self.clock, call.deadline, self.stream_idle_s
        readany = opened.response.content.readany
        write = out.write
        read = relay.track if pass_through else relay.rewrite
        stats = opened.node.stats
        usual = stats.token_gap * self.straggler_factor if pace and stats.token_gap > 0 else 0.0
        fleet = self.fleet_pace(call.info.model) if self.slow_factor else -1.0
        slowest = fleet * self.slow_factor if fleet > 0 else 0.0
        cut, max_idle = relay.cut, self.max_event
        rename = renamer(call.asked) if call.asked is not None else None
        began, began_n = clock(), relay.delivered
        mark, mark_n = -1.0, began_n  # the pace window: from this attempt's first token
        moved, moved_at, idle_bytes = relay.delivered + relay.volume, began, 0
        while True:
            if chunk:
                same = not relay.buf and pass_through and rename is None  # out as it came
                events = relay.feed(chunk)
                sent: list[bytes] = []
                over = False
                for event in events:
                    kept = read(event)
                    if relay.failure:
                        break
                    if relay.delivered > cut:
                        over = True  # the event past the request's tokens, and the rest
                        break
                    if kept is not None:
                        sent.append(kept if rename is None else rename(kept))
                now = clock()
                progress = relay.delivered + relay.volume
                if progress != moved:
                    moved, moved_at, idle_bytes = progress, now, 0
                else:
                    idle_bytes += len(chunk)
                    if idle_bytes > max_idle:
                        return "garbage"  # a flood of events that say nothing: not sent
                if sent:
                    whole = same and len(sent) == len(events) and not relay.buf
                    whole = whole and sent[-1] is events[-1] and chunk.endswith(b"\n\n")
                    await write(chunk if whole else b"\n\n".join(sent) + b"\n\n")
                if relay.failure:
                    return relay.failure
                if over:
                    return "overlong"
                if now > deadline:
                    gap = (now - began) / max(relay.delivered - began_n, 1)
                    return "late" if slowest and gap > slowest else "deadline"
                if now - moved_at > idle:
                    return "stalled"  # bytes, but no new text
                if pace and (usual or slowest) and relay.delivered > began_n:
                    if mark < 0:
                        mark, mark_n = now, relay.delivered
                    tokens = relay.delivered - mark_n
                    if tokens >= PACE_WINDOW or (slowest and now - mark > PACE_WINDOW * slowest):
                        gap = (now - mark) / max(tokens, 1)
                        if gap > PACE_FLOOR_S and not relay.exhausted:
                            if slowest and gap > slowest:
                                return "slow"
                            if usual and gap > usual and tokens >= PACE_WINDOW:
                                return "straggler"
                        if tokens >= PACE_WINDOW:
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


MODEL_FIELD = re.compile(rb'"model":\s*"(?:[^"\\]|\\.)*"')


def renamer(model: str) -> Callable[[bytes], bytes]:
    """An event's ``model`` field set to ``model`` (a node serving an alias names the
    model its own way; the client reads the name it asked for)."""
    field = b'"model":' + orjson.dumps(model)
    return lambda event: MODEL_FIELD.sub(lambda _: field, event)


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
