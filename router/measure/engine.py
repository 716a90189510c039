"""Load as a node's inference engine reports it in its own ``/metrics``.

vLLM, SGLang and llama.cpp's server expose requests waiting, requests running
and KV-cache use under different names. A vLLM page is tens of kilobytes, most
of it histograms Ballast never reads, so the page is not parsed: each line is
checked against the few names below by prefix, and only those lines are split.
"""

from __future__ import annotations

QUEUE_METRICS = ("vllm:num_requests_waiting", "sglang:num_queue_reqs", "llamacpp:requests_deferred")
RUNNING_METRICS = (
    "vllm:num_requests_running",
    "sglang:num_running_reqs",
    "llamacpp:requests_processing",
)
KV_METRICS = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "sglang:token_usage")
_KIND = {name: 0 for name in QUEUE_METRICS}
_KIND.update({name: 1 for name in RUNNING_METRICS})
_KIND.update({name: 2 for name in KV_METRICS})
_PREFIXES = tuple(_KIND)
MAX_VALUE = 1e9  # a node reporting more than this is lying; the sample is ignored


class EngineLoad:
    __slots__ = ("fresh_until", "kv_usage", "queue", "running")

    def __init__(
        self, queue: float, running: float, kv_usage: float | None, fresh_until: float
    ) -> None:
        self.queue = queue
        self.running = running
        self.kv_usage = kv_usage
        self.fresh_until = fresh_until  # clock() after which it counts as saturated


def _sample(line: str) -> tuple[str, float] | None:
    """(metric name, value) of one exposition line ``name{labels} value [ts]``."""
    brace = line.find("{")
    if brace >= 0:
        name = line[:brace]
        close = line.rfind("}")
        if close < brace:
            return None
        rest = line[close + 1 :].split()
    else:
        parts = line.split()
        name, rest = (parts[0], parts[1:]) if parts else ("", [])
    if name not in _KIND or not rest:
        return None
    try:
        value = float(rest[0])
    except ValueError:
        return None
    if not (0.0 <= value <= MAX_VALUE):  # also rejects NaN
        return None
    return name, value


def parse_engine_metrics(text: str) -> tuple[float, float, float | None]:
    """(waiting, running, KV-cache use 0..1 or None) from an engine's /metrics page."""
    totals = [0.0, 0.0]
    kv: float | None = None
    for line in text.splitlines():
        if not line.startswith(_PREFIXES):
            continue
        found = _sample(line)
        if found is None:
            continue
        kind = _KIND[found[0]]
        if kind == 2:
            kv = max(kv or 0.0, min(found[1], 1.0))
        else:
            totals[kind] += found[1]
    return totals[0], totals[1], kv
