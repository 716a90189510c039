"""Routing policies: which node gets this request.

A policy is a pure function of the request, a snapshot of candidate nodes, a
random generator and the current time; it returns up to ``k`` distinct nodes in
order of preference (first = primary, the rest = failover). Policies do no I/O
and keep no clock of their own, so they are deterministic under a seeded
``random.Random`` and an injected ``now``.

Each policy lives in its own module; :data:`POLICIES` maps names to them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from random import Random
from typing import Any, ClassVar, Protocol, TypeVar


@dataclass(slots=True)
class RequestInfo:
    """Just enough of the request to route it (the body is parsed once).

    Not frozen: a frozen dataclass costs a microsecond more to build per request."""

    model: str
    stream: bool = False
    max_tokens: int | None = None
    prompt_bytes: int = 0


class Stats(Protocol):
    in_flight: int

    def cost(self, now: float) -> float: ...


class Candidate(Protocol):
    id: str
    stats: Stats


C = TypeVar("C", bound=Candidate)


class Policy(Protocol):
    name: ClassVar[str]
    description: ClassVar[str]

    def rank(
        self, req: RequestInfo, candidates: Sequence[C], k: int, rng: Random, now: float
    ) -> list[C]: ...


class PolicyError(ValueError):
    """Invalid policy name or parameters."""


def node_cost(policy: object, node: Candidate, now: float) -> float:
    """The node's routing cost under ``policy`` (lower is preferred); the peak-EWMA
    cost for policies that do not define one."""
    cost = getattr(policy, "cost", None)
    return cost(node, now) if cost is not None else node.stats.cost(now)


TIE = 0.05  # costs within 5% of each other are equal: the random pick stands


def p2c_rank(candidates: Sequence[C], k: int, rng: Random, cost: Callable[[C], float]) -> list[C]:
    """Power of two choices: the cheaper of two random candidates first (of two
    within ``TIE`` of each other, the first drawn), then the rest of a random sample
    of ``k + 1`` in order of cost (the failover nodes)."""
    n = len(candidates)
    if n <= 1:
        return list(candidates[:k])
    sample = [candidates[i] for i in rng.sample(range(n), min(n, k + 1))]
    if cost(sample[1]) < cost(sample[0]) * (1.0 - TIE):
        sample[0], sample[1] = sample[1], sample[0]
    return [sample[0], *sorted(sample[1:], key=cost)][:k]


def _by_name() -> dict[str, type]:
    from policies.least_outstanding import LeastOutstanding
    from policies.p2c_peak_ewma import P2CPeakEwma
    from policies.random_choice import RandomChoice
    from policies.round_robin import RoundRobin
    from policies.score import Score

    return {p.name: p for p in (RoundRobin, RandomChoice, LeastOutstanding, P2CPeakEwma, Score)}


POLICIES: dict[str, type] = _by_name()


def policy_params(name: str) -> list[str] | None:
    """The parameters a policy takes (its constructor's keyword parameters), or None
    when it takes any; ``KeyError`` for an unknown policy."""
    params = inspect.signature(POLICIES[name]).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def build_policy(name: str, params: dict[str, Any] | None = None) -> Policy:
    """Instantiate a policy by name; unknown names and parameters are errors."""
    cls = POLICIES.get(name)
    if cls is None:
        raise PolicyError(f"unknown policy {name!r} (known: {', '.join(sorted(POLICIES))})")
    try:
        return cls(**(params or {}))
    except TypeError as e:
        raise PolicyError(f"policy {name}: invalid params: {e}") from None
