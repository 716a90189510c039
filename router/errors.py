"""OpenAI-style error responses: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import orjson
from aiohttp import web


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
    return web.Response(
        status=status,
        body=error_body(message, type_, code, param),
        content_type="application/json",
        headers=headers,
    )


def sse_error_event(message: str, code: str) -> bytes:
    """A terminal SSE event for a stream that failed after its first byte."""
    return b"data: " + error_body(message, "upstream_error", code) + b"\n\n"
