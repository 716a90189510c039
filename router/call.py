"""One client request on its way through the router.

:class:`Call` is what the request path carries from step to step instead of a
list of arguments: the client's request, the facts parsed from its body once,
the headers to send upstream, the deadline, the failures so far and the
:class:`Exchange` that observers (metrics, access log) receive at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web
from multidict import CIMultiDict

from policies import RequestInfo
from router.affinity import NONE
from router.measure import Outcome

if TYPE_CHECKING:
    from router.bill import Sizes
    from router.fleet import Node
    from router.pools import Pool
    from router.tenants import Key
    from router.upstream import Opened


class Exchange:
    """What happened to one client request; handed to observers when it ends."""

    __slots__ = (
        "affinity",
        "attempts",
        "cost",
        "duration",
        "fallback",
        "finished_at",
        "hedged",
        "key",
        "limited",
        "model",
        "node",
        "outcomes",
        "pool",
        "priority",
        "queued_s",
        "request_id",
        "resumed",
        "start",
        "status",
        "stream",
        "tokens",
        "ttfb",
        "upstream_id",
    )

    def __init__(self, request_id: str, upstream_id: str, start: float) -> None:
        self.request_id = request_id  # as the client sees it
        self.upstream_id = upstream_id  # the UUID nodes see (the same when the client's is one)
        self.start = start
        self.model = ""
        self.stream = False
        self.node = ""
        self.attempts = 0
        self.status = 0
        self.ttfb = -1.0  # request arrival to the node's first byte; < 0: none
        self.duration = 0.0
        self.finished_at = 0.0  # wall-clock time the answer ended
        self.queued_s = 0.0  # time spent waiting for supply or capacity
        self.priority = "interactive"  # or "batch" (router.gate)
        self.hedged = False
        self.key = ""  # the client key's name (router.tenants), "" without one
        self.limited = False  # refused over the key's limits
        self.tokens: tuple[int, int] | None = None  # (prompt, completion), when counted
        self.affinity = NONE  # hit, spill or none (router.affinity)
        self.pool = ""  # the serving node's pool (router.pools), "" without pools
        self.cost = 0.0  # what the answer cost (router.pools), in the config's currency
        self.fallback = ""  # the model asked for, when a fallback model served instead
        self.outcomes: list[Outcome] = []
        # (node, reason, outcome) for each node that failed a stream mid-answer
        self.resumed: list[tuple[str, str, str]] = []


class Failed(Exception):
    """An attempt failed before anything reached the client: try another node."""

    def __init__(self, outcome: Outcome, detail: str, retry_after: str | None = None) -> None:
        self.outcome = outcome
        self.detail = detail
        self.retry_after = retry_after


@dataclass(slots=True, eq=False)
class Call:
    request: web.Request
    ex: Exchange
    info: RequestInfo
    doc: dict[str, Any]  # the body, parsed once
    body: bytes
    headers: CIMultiDict[str]  # what every attempt sends upstream (before the node's key)
    deadline: float  # clock() after which the request has failed
    sizes: Sizes  # stream, token limit and choices, as the engine reads them (router.bill)
    need: int | None = None  # tokens of context and KV cache the request needs, if known
    # the affinity key (router.affinity): (group, conversation), when placement uses it
    affinity: tuple[int, int] | None = None
    failures: list[Failed] = field(default_factory=list)
    tried: set[str] = field(default_factory=set)  # ids of the nodes attempted
    # A 4xx held back while a node of another kind tries the request: whose fault?
    rejected: Opened | None = None
    # With a client key (router.tenants): the key, and the tokens estimated at admission.
    # Counted (a key, pools or priced nodes): the tokens billed (router.bill: the node's
    # count within what was delivered) and whether the usage chunk is hidden from the
    # client. Headers every answer carries (rate limits, x-ballast-fallback).
    key: Key | None = None
    count: bool = False
    answer_headers: dict[str, str] | None = None
    estimate: int = 0
    tokens: tuple[int, int] | None = None
    hide_usage: bool = False
    # The model's name as the client asked for it, when the model has aliases: the
    # answer's ``model`` says that (nodes may serve it by another name).
    asked: str | None = None
    gated: bool = False  # admitted by the priority gate: only nodes below their capacity
    pools: tuple[int, ...] = ()  # the pools it may use, in order (router.pools)
    region: str | None = None  # the caller's locality: preferred on ties
    fallbacks: tuple[str, ...] = ()  # models left to fall back to
    first_pool: Pool | None = None  # the pool of its first attempt (judged by its outcome)
    served_by: Node | None = None  # the node whose answer the client got (the last)

    def failed(self, f: Failed) -> None:
        self.ex.outcomes.append(f.outcome)
        self.failures.append(f)
