"""The one place a :class:`~router.fleet.Node` is built, and how it is stored.

A node comes from the config file, from a registration, or from another router
process through Redis; each source has one function here, and all of them end
in ``Node(...)`` with claims already validated (config and registration bodies
are pydantic models; a Redis hash was written by :func:`fields`).

In Redis a node is one hash: ``spec`` (its claims as JSON, no secrets),
``state`` / ``reason``, ``until`` / ``ejections`` (ejection back-off),
``drained`` (1 while an operator's drain holds), ``secret`` (SHA-256 of a
joined node's secret), ``seen`` / ``tel`` (last heartbeat, telemetry), the
merged counters of :mod:`router.measure.merge`, and
``if:<replica>`` / ``ift:<replica>`` (each replica's in-flight count and when
it reported it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import orjson

from router.config import NodeConfig, Scoring
from router.engines import ENGINES, UNKNOWN
from router.fleet import Node, NodeState, Source, claimed_models
from router.measure.merge import Shared


def from_config(
    nc: NodeConfig, scoring: Scoring, verify: bool, env: Mapping[str, str] | None = None
) -> Node:
    """A static node; ``verify``: it takes traffic only once a probe has passed."""
    env = os.environ if env is None else env
    return Node(
        id=nc.id,
        url=nc.url,
        models=nc.models,
        gpu=nc.gpu,
        vram_gb=nc.vram_gb,
        gpus=nc.gpus,
        labels=nc.labels,
        api_key=env.get(nc.api_key_env) if nc.api_key_env else None,
        scoring=scoring,
        source=Source.CONFIG,
        engine=nc.engine or UNKNOWN,
        state=NodeState.REGISTERED if verify else NodeState.SERVING,
        state_reason="static node waiting for verification" if verify else "static node",
    )


def from_registration(
    claims: Mapping[str, Any],
    scoring: Scoring,
    verify: bool,
    secret_hash: str,
    join_token: str = "shared",
    operator_pool: str | None = None,
) -> Node:
    """A node that joined through the API (``claims``: a validated registration body),
    with the name of the join token it used and the pool that token gives it."""
    labels = dict(claims.get("labels") or {})
    for price in ("price_per_mtok", "price_per_hour"):
        if claims.get(price) is not None:
            labels[price] = repr(claims[price])
    node = Node(
        id=claims["id"],
        url=claims["url"],
        models=claims["models"],
        gpu=claims.get("gpu"),
        gpus=claims.get("gpus", 1),
        vram_gb=claims.get("vram_gb"),
        labels=labels,
        scoring=scoring,
        source=Source.JOINED,
        engine=claims.get("engine") or UNKNOWN,
        state=NodeState.REGISTERED if verify else NodeState.SERVING,
        state_reason="waiting for verification"
        if verify
        else "self-registered (verification is off)",
    )
    node.secret_hash = secret_hash
    node.join_token = join_token
    node.operator_pool = operator_pool
    return node


def carry_over(old: Node, new: Node) -> None:
    """A node registering again keeps its ejection back-off and an operator's drain."""
    new.ejections = old.ejections
    new.ejected_until = old.ejected_until
    new.drained = old.drained
    if old.drained:
        new.state, new.state_reason = NodeState.DRAINING, "drained by an operator"


def returning(node: Node, verify: bool) -> tuple[NodeState, str]:
    """The state of a node whose heartbeats resume after it was ``gone``."""
    if node.drained:
        return NodeState.DRAINING, "drained by an operator"
    if verify:
        return NodeState.REGISTERED, "heartbeats resumed; verifying again"
    return NodeState.SERVING, "heartbeats resumed"


def spec(node: Node) -> dict[str, object]:
    """The node's claims, as shared between router processes (no secrets)."""
    return {
        "url": node.url,
        "models": claimed_models(node),
        "gpu": node.gpu,
        "gpus": node.gpus,
        "vram_gb": node.vram_gb,
        "labels": node.labels,
        "source": node.source.value,
        "engine": node.engine,
        "join_token": node.join_token,
        "operator_pool": node.operator_pool,
    }


def fields(node: Node) -> list[Any]:
    """The hash fields describing ``node`` (claims, state, membership), flat."""
    out: list[Any] = ["spec", orjson.dumps(spec(node)), "state", node.state.value]
    out += ["reason", node.state_reason, "drained", int(node.drained)]
    out += ["until", repr(node.ejected_until), "ejections", node.ejections]
    if node.secret_hash:
        out += ["secret", node.secret_hash]
    if node.source is Source.JOINED:
        out += ["seen", repr(node.last_seen), "tel", orjson.dumps(node.telemetry)]
    return out


def _source(value: object) -> Source:
    # "registered" was the joined source's name in earlier versions of the hash.
    return Source.CONFIG if value == "config" else Source.JOINED


def from_hash(node_id: str, h: Mapping[bytes, bytes], scoring: Scoring) -> Node | None:
    """A node from its Redis hash; None when the hash holds no claims."""
    raw = h.get(b"spec")
    if raw is None:
        return None
    s = orjson.loads(raw)
    node = Node(
        id=node_id,
        url=s["url"],
        models=s["models"],
        gpu=s.get("gpu"),
        gpus=s.get("gpus", 1),
        vram_gb=s.get("vram_gb"),
        labels=s.get("labels") or {},
        source=_source(s.get("source")),
        engine=s["engine"] if s.get("engine") in ENGINES else UNKNOWN,
        scoring=scoring,
        state=NodeState(text(h.get(b"state"), NodeState.SERVING.value)),
        state_reason=text(h.get(b"reason")),
    )
    node.join_token = s.get("join_token")
    node.operator_pool = s.get("operator_pool")
    return node


def same_claims(node: Node, h: Mapping[bytes, bytes]) -> bool:
    """Whether the hash describes the node as this process knows it (URL, models,
    labels and the join token that registered it)."""
    raw = h.get(b"spec")
    if raw is None:
        return True
    s = orjson.loads(raw)
    return (
        node.url == s["url"]
        and claimed_models(node) == s["models"]
        and node.labels == (s.get("labels") or {})
        and node.join_token == s.get("join_token")
    )


def shared(h: Mapping[bytes, bytes]) -> Shared:
    """A node's merged counters (:mod:`router.measure.merge`) from its hash."""
    lat, lat_t, sr_t = h.get(b"lat"), h.get(b"lat_t"), h.get(b"sr_t")
    return Shared(
        ok=number(h.get(b"ok"), 0.0),
        n=number(h.get(b"n"), 0.0),
        sr_t=float(sr_t) if sr_t is not None and b"n" in h else None,
        lat=float(lat) if lat is not None else None,
        lat_t=float(lat_t) if lat_t is not None else None,
        req=int(h.get(b"req", b"0")),
        fail=int(h.get(b"fail", b"0")),
    )


def text(v: bytes | None, default: str = "") -> str:
    return v.decode() if v is not None else default


def number(v: bytes | None, default: float) -> float:
    return float(v) if v is not None else default
