"""Logging: the access log (one line per request) and the process log.

The access log is on the request path, so it skips stdlib ``logging``
entirely: each finished request is serialized once with orjson into a buffer,
and a background task writes the buffer out every ``flush_interval`` seconds
(or sooner once it passes ``max_buffer`` bytes) in one call. Prompt text,
headers and secrets are never part of a line.

The process log (start-up, warnings such as state changes, errors) goes through
stdlib ``logging`` to stderr, as JSON or text per ``logging.format``.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from datetime import UTC, datetime
from typing import BinaryIO

import orjson

from router.proxy import Exchange
from router.tasks import cancel_and_wait


class AccessLog:
    def __init__(
        self,
        out: BinaryIO | None = None,
        fmt: str = "json",
        flush_interval: float = 0.2,
        max_buffer: int = 256 * 1024,
    ) -> None:
        self.out = out if out is not None else sys.stdout.buffer
        self.json = fmt == "json"
        self.flush_interval = flush_interval
        self.max_buffer = max_buffer
        self._buf: list[bytes] = []
        self._size = 0
        self._task: asyncio.Task[None] | None = None

    def __call__(self, ex: Exchange) -> None:
        now = datetime.now(UTC)
        if self.json:
            line = orjson.dumps(
                {
                    "time": now,
                    "request_id": ex.request_id,
                    "model": ex.model,
                    "stream": ex.stream,
                    "status": ex.status,
                    "node": ex.node,
                    "attempts": ex.attempts,
                    "failed": ex.outcomes,
                    "duration_ms": round(ex.duration * 1e3, 3),
                    "ttfb_ms": round(ex.ttfb * 1e3, 3) if ex.ttfb >= 0 else None,
                },
                option=orjson.OPT_APPEND_NEWLINE,
            )
        else:
            ttfb = f"{ex.ttfb * 1e3:.1f}" if ex.ttfb >= 0 else "-"
            line = (
                f"{now.isoformat(timespec='milliseconds')} {ex.request_id} {ex.model or '-'} "
                f"{ex.status} {ex.node or '-'} attempts={ex.attempts} "
                f"duration_ms={ex.duration * 1e3:.1f} ttfb_ms={ttfb}\n"
            ).encode()
        self._buf.append(line)
        self._size += len(line)
        if self._size >= self.max_buffer:
            self.flush()

    def flush(self) -> None:
        if not self._buf:
            return
        data = b"".join(self._buf)
        self._buf.clear()
        self._size = 0
        try:
            self.out.write(data)
            self.out.flush()
        except (OSError, ValueError):
            pass  # a closed or broken log sink must never break request handling

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self.flush()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval)
            self.flush()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": datetime.fromtimestamp(record.created, UTC),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(doc).decode()


def setup_logging(level: str, fmt: str) -> None:
    """Configure the process log on stderr (idempotent)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").disabled = True
