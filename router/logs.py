"""Logging: the access log (one line per request) and the process log.

The access log skips stdlib ``logging`` entirely: it receives finished requests
in batches from the :class:`~router.recorder.Recorder`, serializes each batch
with orjson and writes it out in one call. Prompt text, headers and secrets are
never part of a line.

The process log (start-up, warnings such as state changes, errors) goes through
stdlib ``logging`` to stderr, as JSON or text per ``logging.format``.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import BinaryIO

import orjson

from router.call import Exchange

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` with control characters escaped (``\\x1b``): what a node or a client
    says must not drive an operator's terminal."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class TextFormatter(logging.Formatter):
    """The text log: a record's message on one line, control characters escaped (a
    traceback keeps its lines)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return printable(super().formatMessage(record))


class AccessLog:
    def __init__(self, out: BinaryIO | None = None, fmt: str = "json") -> None:
        self.out = out if out is not None else sys.stdout.buffer
        self.json = fmt == "json"

    def __call__(self, batch: Sequence[Exchange]) -> None:
        lines = [self._line(ex) for ex in batch]
        try:
            self.out.write(b"".join(lines))
            self.out.flush()
        except (OSError, ValueError):
            pass  # a closed or broken log sink must never break request handling

    def _line(self, ex: Exchange) -> bytes:
        when = datetime.fromtimestamp(ex.finished_at, UTC)
        if self.json:
            return orjson.dumps(
                {
                    "time": when,
                    "request_id": ex.request_id,
                    "upstream_id": ex.upstream_id,
                    "model": ex.model,
                    "stream": ex.stream,
                    "status": ex.status,
                    "node": ex.node,
                    "attempts": ex.attempts,
                    "affinity": ex.affinity,
                    "key": ex.key or None,
                    "tokens": ex.tokens,
                    "failed": ex.outcomes,
                    "resumed": [f"{n}:{why}:{how}" for n, why, how in ex.resumed] or None,
                    "duration_ms": round(ex.duration * 1e3, 3),
                    "queued_ms": round(ex.queued_s * 1e3, 3) if ex.queued_s else None,
                    "ttfb_ms": round(ex.ttfb * 1e3, 3) if ex.ttfb >= 0 else None,
                },
                option=orjson.OPT_APPEND_NEWLINE,
            )
        ttfb = f"{ex.ttfb * 1e3:.1f}" if ex.ttfb >= 0 else "-"
        return (
            f"{when.isoformat(timespec='milliseconds')} {ex.request_id} "
            f"{printable(ex.model) or '-'} "
            f"{ex.status} {ex.node or '-'} attempts={ex.attempts} affinity={ex.affinity} "
            f"key={ex.key or '-'} duration_ms={ex.duration * 1e3:.1f} ttfb_ms={ttfb}\n"
        ).encode()


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
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").disabled = True
