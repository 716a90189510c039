"""The fleet as operators see it: one row per node, and the supply summary.

The same rows feed ``GET /admin/nodes`` (and so ``ballast nodes``) and the
per-node series of ``/metrics``, so the two never disagree.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from policies import Policy, node_cost
from router.fleet import ROUTABLE, Node, NodeState


def node_row(
    node: Node, policy: Policy | None, now: float, total_requests: int, total_spent: float = 0.0
) -> dict[str, Any]:
    st = node.stats
    load = node.load
    factors = getattr(policy, "factors", None)
    return {
        "id": node.id,
        "gpu": node.gpu,
        "gpus": node.gpus,
        "vram_gb": node.vram_gb,
        "models": node.models,
        "labels": node.labels,
        "source": node.source.value,
        # the join token that registered it ("shared", or a scoped token's name)
        "join_token": node.join_token,
        "state": node.state.value,
        "reason": node.state_reason,
        "in_flight": st.in_flight,
        "latency_ms": round(st.latency.value(now) * 1e3, 3),
        "ttfb_ms": round(st.ttfb.value(now) * 1e3, 3),
        "success_ratio": round(st.success.value(now), 4),
        "cost": round(node_cost(policy, node, now), 6),
        "requests": st.requests_total,
        "failures": st.failures_total,
        "outcomes": {o.value: n for o, n in dict(st.outcomes).items() if n},
        "consecutive_failures": st.consecutive_failures,
        "last_error": st.last_error or None,
        "share": round(st.requests_total / (total_requests or 1), 4),
        "affinity_share": round(st.affinity_hits / (st.requests_total or 1), 4),
        "pool": node.pool.name if node.pool is not None else None,
        "price_per_mtok": node.price_per_mtok or None,
        "price_per_hour": node.price_per_hour or None,
        # What answers this node served cost (router.pools), as this router process
        # counted, and its share of all nodes' spend.
        "spent": round(node.cost, 6),
        "spent_share": round(node.cost / total_spent, 4) if total_spent else 0.0,
        "ejections": node.ejections,
        "telemetry": node.telemetry,
        "engine": node.engine,
        "context_length": node.context_length,
        "load": None
        if load is None
        else {
            "queue": load.queue,
            "running": load.running,
            "kv_usage": load.kv_usage,
            "stale": now > load.fresh_until,
        },
        "probe": node.probe,
        "factors": factors(node, now) if factors else None,
    }


def node_rows(nodes: Iterable[Node], policy: Policy | None, now: float) -> list[dict[str, Any]]:
    nodes = list(nodes)
    total = sum(n.stats.requests_total for n in nodes)
    spent = sum(n.cost for n in nodes)
    return [node_row(n, policy, now, total, spent) for n in nodes]


def supply_summary(nodes: list[Node]) -> dict[str, dict[str, float]]:
    """Claimed (every known node) vs verified vs serving: nodes, GPUs, VRAM."""
    groups = {
        "claimed": nodes,
        "verified": [n for n in nodes if n.state in ROUTABLE],
        "serving": [n for n in nodes if n.state is NodeState.SERVING],
    }
    return {
        name: {
            "nodes": len(ns),
            "gpus": sum(n.gpus for n in ns),
            "vram_gb": sum(n.vram_gb or 0 for n in ns),
        }
        for name, ns in groups.items()
    }


def fleet_view(nodes: Iterable[Node], policy: Policy | None, now: float) -> dict[str, object]:
    """Every node with its claims, state and measured scores, plus the supply summary."""
    nodes = list(nodes)
    return {"nodes": node_rows(nodes, policy, now), "summary": supply_summary(nodes)}
