"""How one attempt on a node ended."""

from __future__ import annotations

from enum import StrEnum


class Outcome(StrEnum):
    OK = "ok"
    CLIENT_ERROR = "client_error"  # 4xx other than 429: the node works, the request was bad
    CONNECT_ERROR = "connect_error"
    TIMEOUT = "timeout"
    HTTP_5XX = "http_5xx"
    HTTP_429 = "http_429"
    HTTP_404 = "http_404"  # the node does not know a model (or path) it claims
    STREAM_ERROR = "stream_error"  # failed after the first byte
    BAD_ANSWER = "bad_answer"  # 200 with a body that is not an answer (not JSON, not SSE)
    # 4xx for a request that a node of another kind then served: the node's fault
    REJECTED = "rejected"
    CANCELLED = "cancelled"  # the client went away; says nothing about the node
    # an answer delivered whose usage claimed more tokens than it could have (router.bill)
    BAD_USAGE = "bad_usage"


FAILURES = frozenset(
    {
        Outcome.CONNECT_ERROR,
        Outcome.TIMEOUT,
        Outcome.HTTP_5XX,
        Outcome.HTTP_429,
        Outcome.HTTP_404,
        Outcome.STREAM_ERROR,
        Outcome.BAD_ANSWER,
        Outcome.REJECTED,
        Outcome.BAD_USAGE,
    }
)
