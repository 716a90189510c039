"""OpenAI-style error responses: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import orjson
from aiohttp import web

from router.config import ROUTER_ID
from router.measure import Outcome

if TYPE_CHECKING:
    from router.call import Failed


NODE_HEADER = "x-ballast-node"  # which node served an answer
# Why an attempt failed on the router's side, not the node's (limits.buffered_bytes)
BUSY = "router busy: answers being read exceed limits.buffered_bytes"
NOSNIFF = "X-Content-Type-Options"  # "nosniff" on every answer: JSON is never run as a page
# answers the router gives itself
ROUTER_NODE = {NODE_HEADER: ROUTER_ID, NOSNIFF: "nosniff"}


def error_body(
    message: str, type_: str, code: str | None = None, param: str | None = None
) -> bytes:
    return orjson.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    )


def error_response(
    status: int,
    message: str,
    type_: str,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """An error the router gives itself: ``x-ballast-node: ballast`` says so."""
    return web.Response(
        status=status,
        body=error_body(message, type_, code, param),
        content_type="application/json",
        headers={**headers, **ROUTER_NODE} if headers else ROUTER_NODE,
    )


def invalid_key(why: str) -> web.Response:
    """401 for a request whose client key is missing, unknown or expired (``why``)."""
    return error_response(
        401, f"{why}: pass a Ballast key as Authorization: Bearer sk-bal-...",
        "invalid_request_error", "invalid_api_key",
    )  # fmt: skip


def sse_error_event(message: str, code: str) -> bytes:
    """A terminal SSE event for a stream that failed after its first byte."""
    return b"data: " + error_body(message, "upstream_error", code) + b"\n\n"


def exhausted(failures: Sequence[Failed], deadline_passed: bool) -> web.Response:
    """The answer when every attempt failed before a byte reached the client."""
    if not failures or deadline_passed or all(f.outcome is Outcome.TIMEOUT for f in failures):
        return error_response(
            504, "no node answered within the request deadline", "timeout_error",
            "deadline_exceeded",
        )  # fmt: skip
    summary = ", ".join(f.detail for f in failures)
    if all(f.outcome is Outcome.HTTP_404 for f in failures):
        return error_response(
            404, f"no node tried knows this model or endpoint ({summary})",
            "invalid_request_error", "model_not_found", "model",
        )  # fmt: skip
    if all(f.outcome is Outcome.HTTP_429 for f in failures):
        retry_after = min((f.retry_after or "1" for f in failures), key=retry_after_s)
        return error_response(
            429, f"every node tried is rate limited ({summary})", "rate_limit_error",
            "upstream_rate_limited", headers={"Retry-After": retry_after},
        )  # fmt: skip
    if any(f.detail == BUSY for f in failures):  # the router's own budget
        return error_response(
            503, f"the router is busy ({failures[0].detail})", "service_unavailable",
            "router_busy", headers={"Retry-After": "1"},
        )  # fmt: skip
    return error_response(
        502, f"{len(failures)} attempt(s) failed: {summary}", "upstream_error",
        "upstream_failed", headers={"Retry-After": "1"},
    )  # fmt: skip


def no_capacity(model: str) -> web.Response:
    return error_response(
        503, f"no node can serve model {model!r} right now", "service_unavailable",
        "no_capacity", headers={"Retry-After": "1"},
    )  # fmt: skip


def retry_after_s(value: str) -> float:
    """Seconds in a Retry-After header (HTTP dates count as one second)."""
    try:
        return float(value)
    except ValueError:
        return 1.0


MAX_NODE_MESSAGE = 512  # characters of a node's error message a client sees


def node_error(body: bytes) -> tuple[str | None, str | None]:
    """The message and ``param`` of a node's error answer (OpenAI's envelope, or a
    bare ``{"message"}``/``{"error": "..."}`` as some engines send), printable and
    short; (None, None) when it has none."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, None
    if not isinstance(doc, dict):
        return None, None
    err = doc.get("error", doc)
    if isinstance(err, str):
        err = {"message": err}
    if not isinstance(err, dict):
        return None, None
    message, param = err.get("message"), err.get("param")
    return _printable(message, MAX_NODE_MESSAGE), _printable(param, 64)


def _printable(value: object, limit: int) -> str | None:
    if not isinstance(value, str) or not value:
        return None
    text = "".join(c if c.isprintable() else " " for c in value[:limit])
    return text.strip() or None
