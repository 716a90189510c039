"""VRAM fit: send a request only to nodes whose memory can hold it.

For a model with ``models.<name>.kv_bytes_per_token`` configured, a request's
need is estimated as prompt tokens (body bytes / 4, a deliberate over-estimate
for English text) plus ``max_tokens`` (256 when absent). A node can hold

    min(context_length, free KV memory / kv_bytes_per_token)

where free KV memory is, best first: the free VRAM the node reports in its
heartbeats; its claimed VRAM minus the model's weights, scaled by the KV-cache
use its engine metrics report; or its claimed VRAM minus the weights. Nodes
that cannot hold the request are filtered out, so long-context requests land on
big cards and short ones spread over small ones. Models without these facts
are not filtered.
"""

from __future__ import annotations

from collections.abc import Sequence

from policies import RequestInfo
from router.config import Config, ModelConfig
from router.fleet import Fleet, Node

GB = 1e9
DEFAULT_MAX_TOKENS = 256


class Fit:
    def __init__(self, cfg: Config, fleet: Fleet) -> None:
        self.fleet = fleet
        self.models: dict[str, ModelConfig] = {
            m: mc for m, mc in cfg.models.items() if mc.kv_bytes_per_token or mc.context_length
        }
        self._version = -1
        self._largest: dict[str, float] = {}

    def need_tokens(self, info: RequestInfo) -> int | None:
        if info.model not in self.models:
            return None
        return info.prompt_bytes // 4 + (info.max_tokens or DEFAULT_MAX_TOKENS)

    def capacity(self, node: Node, model: str) -> float:
        """Tokens of context and KV cache ``node`` can give one request of ``model``."""
        mc = self.models[model]
        context = float(node.claimed_context or mc.context_length or float("inf"))
        if not mc.kv_bytes_per_token:
            return context
        free_gb = node.telemetry.get("free_vram_gb")
        if not isinstance(free_gb, int | float):
            if node.vram_gb is None:
                return context  # nothing claimed, nothing reported: do not guess
            free_gb = max(0.0, node.vram_gb - mc.weights_gb)
            usage = node.load.kv_usage if node.load is not None else None
            if usage is not None:
                free_gb *= max(0.0, 1.0 - usage)
        return min(context, free_gb * GB / mc.kv_bytes_per_token)

    def possible(self, model: str, need: int) -> bool:
        """Could any node claiming ``model`` ever hold ``need`` tokens (ignoring load)?"""
        if self._version != self.fleet.version:
            self._largest = {m: self._largest_for(m) for m in self.models}
            self._version = self.fleet.version
        return self._largest.get(model, float("inf")) >= need

    def _largest_for(self, model: str) -> float:
        mc = self.models[model]
        best = 0.0
        for node in self.fleet.nodes.values():
            if model not in node.models:
                continue
            cap = float(node.claimed_context or mc.context_length or float("inf"))
            if mc.kv_bytes_per_token and node.vram_gb is not None:
                whole = (node.vram_gb - mc.weights_gb) * GB / mc.kv_bytes_per_token
                cap = min(cap, whole)
            best = max(best, cap)
        return best

    def filter(self, candidates: Sequence[Node], model: str, need: int) -> Sequence[Node]:
        return [c for c in candidates if self.capacity(c, model) >= need]
