"""Cache-aware routing: a conversation goes back to the node that holds its prefix.

Every engine keeps the KV cache of recent prompts (vLLM's and SGLang's prefix
caching, llama.cpp's per-slot prompt cache): a request whose prefix is cached
skips most of its prefill. So requests that share a prefix should land on the
same node, without piling onto it.

**The key** (:func:`affinity_key`), computed once per request from the parsed
body: an explicit session (the ``x-session-id`` header, else the body's
``user``) when there is one; else a hash of the conversation's leading
messages: the system prompt and the first user turn. Every later turn of a
conversation repeats those, so all its turns share the key, while conversations
that share only a long system prompt get different keys (and each node that
serves one caches that system prompt too). A completion prompt's key is its
first :data:`BLOCK_CHARS` characters. Hashes are stable across processes
(BLAKE2b), so every replica computes the same key.

**Placement** (:func:`place`): weighted rendezvous hashing (highest random
weight) orders the candidates for the key: each node's score is ``-w / ln(u)``
with ``u`` a mix of the key and the node's id and ``w`` its claimed VRAM (its
KV cache, so its room for cached prefixes; 1 for all when some node claims
none). Every replica, seeing the same candidates, gets the same order without
asking anyone, a node gets keys in proportion to its weight, and removing a
node (failure, ejection, drain) moves only the keys it held. The first node in
that order whose load (requests in flight here and, through the shared store,
on other replicas) is within ``ceil((1 + epsilon) x its weighted share of the
total load)`` takes the request: consistent hashing with bounded loads
(Mirrokni, Thorup and Zadimoghaddam, 2018), weighted. Weights are capped at
:data:`MAX_WEIGHT_OVER_MEDIAN` times the candidates' median claim, so a node
claiming huge VRAM gets at most that many times a typical node's keys, and only
while it answers well. A node
is passed over when it looks hung, when its recent success ratio is below
:data:`MIN_SUCCESS` (a cached prefix is worth less than an answer), or when it
generates over :data:`MAX_SLOWDOWN` times slower than the fastest candidate (its
usual time between a stream's tokens; on a mixed fleet a cache hit on a slow
card can be slower than a miss on a fast one. Load is the bound's business, not
this). When no node qualifies, the policy's own ranking decides.
"""

from __future__ import annotations

import hashlib
import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TypeVar

BLOCK_CHARS = 1024  # a completion prompt's key covers its first this many characters
MASK = (1 << 64) - 1
HIT, SPILL, NONE = "hit", "spill", "none"
MIN_SUCCESS = 0.8  # decayed success ratio below which a node is not an affinity target
MAX_WEIGHT_OVER_MEDIAN = 4.0  # a node's weight is at most this times the median claim
MAX_SLOWDOWN = 2.5  # an affinity target decodes at most this much slower than the fastest


def stable_hash(*parts: str) -> int:
    """64 bits of BLAKE2b over ``parts``: the same in every process."""
    h = hashlib.blake2b(digest_size=8)
    for part in parts:
        h.update(part.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return int.from_bytes(h.digest(), "big")


def _text(message: Any) -> str:
    if not isinstance(message, dict):
        return ""
    content = message.get("content")
    if isinstance(content, str):
        return f"{message.get('role')}:{content}"
    if isinstance(content, list):  # content parts: their text
        texts = [p.get("text", "") for p in content if isinstance(p, dict)]
        return f"{message.get('role')}:" + "".join(t for t in texts if isinstance(t, str))
    return ""


def affinity_key(doc: Mapping[str, Any], session: str | None, model: str) -> int | None:
    """The request's affinity key, or None when it has nothing to key on."""
    if not session:
        user = doc.get("user")
        session = user if isinstance(user, str) and user else None
    if session:
        return stable_hash(model, "session", session[:256])
    messages = doc.get("messages")
    if isinstance(messages, list) and messages:
        lead = [_text(messages[0])]
        if len(messages) > 1 and isinstance(messages[0], dict):
            if messages[0].get("role") == "system":
                lead.append(_text(messages[1]))
        return stable_hash(model, "chat", *lead)
    prompt = doc.get("prompt")
    if isinstance(prompt, str) and prompt:
        return stable_hash(model, "prompt", prompt[:BLOCK_CHARS])
    return None


M1, M2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9
UNIT = 2.0**-53


def _u(key: int, node: int) -> float:
    """A uniform number in (0, 1) from a key and a node's hash (a multiply-xorshift
    mix: the same in every process)."""
    x = ((key ^ node) * M1) & MASK
    x = ((x ^ (x >> 29)) * M2) & MASK
    return ((x >> 11) | 1) * UNIT


class Placeable(Protocol):
    id: str
    stats: Any


P = TypeVar("P", bound=Placeable)
_NODE_HASHES: dict[str, int] = {}


def node_hash(node_id: str) -> int:
    h = _NODE_HASHES.get(node_id)
    if h is None:
        if len(_NODE_HASHES) > 200_000:  # ids of nodes long gone
            _NODE_HASHES.clear()
        h = _NODE_HASHES[node_id] = stable_hash("node", node_id)
    return h


def weights(candidates: Sequence[Placeable]) -> list[float]:
    """Each candidate's claimed VRAM, at most :data:`MAX_WEIGHT_OVER_MEDIAN` times the
    candidates' median (a claim is only a claim); all 1 when any claims none."""
    vram = [getattr(c, "vram_gb", None) for c in candidates]
    if any(not v for v in vram):
        return [1.0] * len(candidates)
    cap = MAX_WEIGHT_OVER_MEDIAN * statistics.median(vram)  # type: ignore[type-var]
    return [min(float(v), cap) for v in vram]  # type: ignore[arg-type]


def order(key: int, candidates: Sequence[P]) -> list[tuple[P, float]]:
    """``candidates`` with their weights, in the key's rendezvous order."""
    scored = [
        (-w / math.log(_u(key, node_hash(c.id))), c, w)
        for c, w in zip(candidates, weights(candidates), strict=True)
    ]
    scored.sort(key=_first, reverse=True)
    return [(c, w) for _, c, w in scored]


def _first(item: tuple[float, object, float]) -> float:
    return item[0]


def load(node: Placeable) -> int:
    st = node.stats
    return int(st.in_flight + st.remote_in_flight)


def place(key: int, candidates: Sequence[P], epsilon: float, now: float) -> tuple[P | None, str]:
    """The node for ``key`` and how it was chosen: ``hit`` (the key's own node) or
    ``spill`` (a later node in the key's order, its first ones being over their
    bound or passed over; None when no node qualifies: the policy decides).

    One pass finds the key's own node and the fleet's load and speed; the full
    order is sorted only when that node does not qualify."""
    ws = weights(candidates)
    total, fastest, wsum = 1, math.inf, 0.0  # this request included
    top, top_w, best = None, 0.0, -1.0
    for c, w in zip(candidates, ws, strict=True):
        st = c.stats
        total += st.in_flight + st.remote_in_flight
        if 0 < st.token_gap < fastest:
            fastest = st.token_gap
        wsum += w
        score = -w / math.log(_u(key, node_hash(c.id)))
        if score > best:
            top, top_w, best = c, w, score
    if top is None:
        return None, SPILL
    share = (1.0 + epsilon) * total / wsum
    limit = MAX_SLOWDOWN * fastest

    def qualifies(node: P, weight: float) -> bool:
        st = node.stats
        return (
            load(node) + 1 <= math.ceil(share * weight)
            and st.token_gap <= limit
            and st.success.value(now) >= MIN_SUCCESS
            and not st.hung(now)
        )

    if qualifies(top, top_w):
        return top, HIT
    for node, weight in order(key, candidates)[1:]:
        if qualifies(node, weight):
            return node, SPILL
    return None, SPILL
