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
(Mirrokni, Thorup and Zadimoghaddam, 2018), weighted. A claim of huge VRAM
attracts keys only up to that bound, and only while the node answers well. A node
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
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TypeVar

BLOCK_CHARS = 1024  # a completion prompt's key covers its first this many characters
MASK = (1 << 64) - 1
HIT, SPILL, NONE = "hit", "spill", "none"
MIN_SUCCESS = 0.8  # decayed success ratio below which a node is not an affinity target
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


def _mix(x: int) -> int:
    """SplitMix64's finaliser: a 64-bit integer, well scrambled."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


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
    """Each candidate's claimed VRAM; all 1 when any claims none."""
    vram = [getattr(c, "vram_gb", None) for c in candidates]
    if any(not v for v in vram):
        return [1.0] * len(candidates)
    return [float(v) for v in vram]  # type: ignore[arg-type]


def _score(key: int, node_id: str, weight: float) -> float:
    u = (_mix(key ^ node_hash(node_id)) + 0.5) / 2.0**64  # in (0, 1)
    return -weight / math.log(u)


def order(key: int, candidates: Sequence[P]) -> list[tuple[P, float]]:
    """``candidates`` with their weights, in the key's rendezvous order."""
    pairs = list(zip(candidates, weights(candidates), strict=True))
    pairs.sort(key=lambda p: _score(key, p[0].id, p[1]), reverse=True)
    return pairs


def load(node: Placeable) -> int:
    st = node.stats
    return int(st.in_flight + st.remote_in_flight)


def place(key: int, candidates: Sequence[P], epsilon: float, now: float) -> tuple[P | None, str]:
    """The node for ``key`` and how it was chosen: ``hit`` (the key's own node) or
    ``spill`` (a later node in the key's order, its first ones being over their
    bound or passed over; None when no node qualifies: the policy decides)."""
    if not candidates:
        return None, SPILL
    ranked = order(key, candidates)
    total = sum(load(c) for c in candidates) + 1  # this request included
    share = (1.0 + epsilon) * total / sum(w for _, w in ranked)
    gaps = [g for c in candidates if (g := c.stats.token_gap) > 0]
    limit = MAX_SLOWDOWN * min(gaps) if gaps else float("inf")
    for i, (node, weight) in enumerate(ranked):
        st = node.stats
        if (
            load(node) + 1 <= math.ceil(share * weight)
            and st.success.value(now) >= MIN_SUCCESS
            and st.token_gap <= limit
            and not st.hung(now)
        ):
            return node, HIT if i == 0 else SPILL
    return None, SPILL
