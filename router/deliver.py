"""Delivering an opened attempt's answer to the client: from here on it is committed.

A plain answer was read whole by :meth:`~router.upstream.Upstream.open` and is
sent as one response. A stream is copied chunk by chunk as it arrives: between
chunks the node may be silent for ``timeouts.stream_idle_s``, the request
deadline is checked as each chunk arrives, and a failure after the first byte
ends the stream with an SSE error event.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import ClientError, ClientResponse, web
from multidict import CIMultiDict

from router.call import Call
from router.errors import sse_error_event
from router.measure import Outcome
from router.upstream import DROP_RESPONSE, Opened


class Deliver:
    def __init__(self, stream_idle_s: float, clock: Callable[[], float]) -> None:
        self.stream_idle_s = stream_idle_s
        self.clock = clock

    async def __call__(self, call: Call, opened: Opened) -> web.StreamResponse:
        response = opened.response
        ex = call.ex
        outcome = Outcome.CANCELLED
        try:
            attempt = opened.attempt
            ex.node = attempt.node.id
            ex.ttfb = attempt.t_first - ex.start
            status = response.status
            ok = Outcome.OK if status < 400 else Outcome.CLIENT_ERROR
            headers = CIMultiDict(
                (k, v) for k, v in response.headers.items() if k.lower() not in DROP_RESPONSE
            )
            headers["x-ballast-node"] = attempt.node.id
            if opened.whole:
                outcome = ok
                return web.Response(status=status, body=opened.first, headers=headers)
            attempt.node.stats.observe_ttfb(attempt.t_first - attempt.t0, attempt.t_first)
            out = web.StreamResponse(status=status, headers=headers)
            outcome = await self._pump(call, response, out, opened.first, ok)
            return out
        finally:
            opened.close(outcome)

    async def _pump(
        self,
        call: Call,
        response: ClientResponse,
        out: web.StreamResponse,
        first: bytes,
        ok: Outcome,
    ) -> Outcome:
        """Copy a stream to the client as it arrives; return the attempt's outcome."""
        conn = response.connection
        if conn is not None and conn.protocol is not None:
            conn.protocol.read_timeout = self.stream_idle_s
        clock = self.clock
        deadline = call.deadline
        readany = response.content.readany
        write = out.write
        chunk = first
        try:
            await out.prepare(call.request)
            while chunk:
                await write(chunk)
                if clock() > deadline:
                    await _end_stream(out, "request deadline exceeded", "deadline_exceeded")
                    return Outcome.CANCELLED  # the node was working; the deadline ran out
                try:
                    chunk = await readany()
                except TimeoutError:  # stream_idle_s passed without a byte
                    await _end_stream(out, "node stopped sending", "upstream_stalled")
                    return Outcome.TIMEOUT
                except (ClientError, OSError):
                    await _end_stream(out, "node failed mid-stream", "upstream_error")
                    return Outcome.STREAM_ERROR
            await out.write_eof()
        except ConnectionResetError:
            return Outcome.CANCELLED  # the client went away
        return ok


async def _end_stream(out: web.StreamResponse, message: str, code: str) -> None:
    try:
        await out.write(sse_error_event(message, code))
        await out.write_eof()
    except ConnectionResetError:
        pass
