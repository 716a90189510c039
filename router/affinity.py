"""Cache-aware routing: a conversation goes back to the node that holds its prefix.

Every engine keeps the KV cache of recent prompts (vLLM's and SGLang's prefix
caching, llama.cpp's per-slot prompt cache): a request whose prefix is cached
skips most of its prefill. So requests that share a prefix should land on the
same node, without piling onto it.

**The key** (:func:`affinity_key`), computed once per request from the parsed
body, is a pair (group, conversation). With an explicit session (the
``x-session-id`` header, else the body's ``user``) both are the session. A chat
with a system prompt has the system prompt as its group and the system prompt
with the first user turn as its conversation: every later turn repeats those,
so all its turns share the key, and conversations that share a system prompt
share the group. Without a system prompt both are the first message; a
completion prompt's are its first :data:`BLOCK_CHARS` characters. Hashes are
stable across processes (BLAKE2b), so every replica computes the same key.

**Placement** (:func:`place`): weighted rendezvous hashing (highest random
weight) orders the candidates: each node's score for a hash is ``-w / ln(u)``
with ``u`` a mix of the hash and the node's id and ``w`` its claimed VRAM (its
KV cache, so its room for cached prefixes; 1 for all when some node claims
none). A group's *home* is its first :data:`HOME_SHARE` of the candidates by
the group's scores (at least two nodes); a conversation's order is its home
nodes, then the others, each by the conversation's scores. So a conversation
returns to the node that holds its history, its first turn lands where its
system prompt is likely cached already, and a system prompt is cached on a few
nodes rather than all. Every replica, seeing the same candidates, gets the same
order without asking anyone, a node gets keys in proportion to its weight, and
removing a node (failure, ejection, drain) moves only the keys it held. The first node in
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
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TypeVar

BLOCK_CHARS = 1024  # a completion prompt's key covers its first this many characters
MASK = (1 << 64) - 1
HIT, SPILL, NONE = "hit", "spill", "none"
MIN_SUCCESS = 0.8  # decayed success ratio below which a node is not an affinity target
MAX_CACHED = 4096  # candidate sets, and groups per set, remembered
HOME_SHARE = 0.25  # a group's home: this share of the candidates (at least two nodes)
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
    """A message's role and text, at most :data:`BLOCK_CHARS` x 8 characters (the
    key's cost is bounded whatever the prompt's length)."""
    if not isinstance(message, dict):
        return ""
    content = message.get("content")
    if isinstance(content, list):  # content parts: their text
        texts = [p.get("text", "") for p in content if isinstance(p, dict)]
        content = "".join(t for t in texts if isinstance(t, str))
    if not isinstance(content, str):
        return ""
    return f"{message.get('role')}:{content[: BLOCK_CHARS * 8]}"


Key = tuple[int, int]  # (group, conversation)


def affinity_key(doc: Mapping[str, Any], session: str | None, model: str) -> Key | None:
    """The request's affinity key (group, conversation), or None when it has
    nothing to key on."""
    if not session:
        user = doc.get("user")
        session = user if isinstance(user, str) and user else None
    if session:
        h = stable_hash(model, "session", session[:256])
        return h, h
    messages = doc.get("messages")
    if isinstance(messages, list) and messages:
        first = _text(messages[0])
        group = stable_hash(model, "chat", first)
        if len(messages) > 1 and isinstance(messages[0], dict):
            if messages[0].get("role") == "system":
                return group, stable_hash(model, "chat", first, _text(messages[1]))
        return group, group
    prompt = doc.get("prompt")
    if isinstance(prompt, str) and prompt:
        h = stable_hash(model, "prompt", prompt[:BLOCK_CHARS])
        return h, h
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


def weights(candidates: Sequence[Placeable]) -> list[float] | None:
    """Each candidate's claimed VRAM, at most :data:`MAX_WEIGHT_OVER_MEDIAN` times the
    candidates' median (a claim is only a claim); None (all weigh the same) when
    all claim the same or any claims none."""
    vram = [getattr(c, "vram_gb", None) or 0.0 for c in candidates]
    low, high = min(vram), max(vram)
    if low <= 0 or low == high:
        return None
    cap = MAX_WEIGHT_OVER_MEDIAN * sorted(vram)[len(vram) // 2]
    return [min(v, cap) for v in vram]


def home_size(n: int) -> int:
    return min(n, max(2, math.ceil(HOME_SHARE * n)))


def _scores(h: int, candidates: Sequence[Placeable], ws: list[float] | None) -> list[float]:
    """Rendezvous scores of ``candidates`` for the hash ``h`` (``-w / ln(u)``; with
    equal weights ``u`` itself, which orders the same)."""
    if ws is None:
        return [_u(h, node_hash(c.id)) for c in candidates]
    return [-w / math.log(_u(h, node_hash(c.id))) for c, w in zip(candidates, ws, strict=True)]


class _Set:
    """What placement reuses for one set of candidates: weights, and each group's
    home nodes (groups, system prompts, repeat across many conversations)."""

    __slots__ = ("homes", "total_weight", "ws")

    def __init__(self, candidates: Sequence[Placeable]) -> None:
        self.ws = weights(candidates)
        self.total_weight = sum(self.ws) if self.ws is not None else float(len(candidates))
        self.homes: dict[int, list[int]] = {}

    def home(self, group: int, candidates: Sequence[Placeable]) -> list[int]:
        found = self.homes.get(group)
        if found is None:
            gs = _scores(group, candidates, self.ws)
            by_group = sorted(range(len(candidates)), key=gs.__getitem__, reverse=True)
            if len(self.homes) >= MAX_CACHED:
                self.homes.clear()
            found = self.homes[group] = by_group[: home_size(len(candidates))]
        return found


_SETS: dict[tuple[tuple[str, float | None], ...], _Set] = {}


def _set_of(candidates: Sequence[Placeable]) -> _Set:
    sig = tuple((c.id, getattr(c, "vram_gb", None)) for c in candidates)
    found = _SETS.get(sig)
    if found is None:
        if len(_SETS) >= MAX_CACHED:
            _SETS.clear()
        found = _SETS[sig] = _Set(candidates)
    return found


def _ranking(key: Key, candidates: Sequence[Placeable], cset: _Set) -> list[int]:
    """Candidate indices in the key's order: the group's home nodes, then the rest,
    each by the conversation's scores."""
    group, conversation = key
    n = len(candidates)
    cs = _scores(conversation, candidates, cset.ws)
    if group == conversation or n <= 2:
        return sorted(range(n), key=cs.__getitem__, reverse=True)
    home = set(cset.home(group, candidates))
    return sorted(range(n), key=lambda i: (i in home, cs[i]), reverse=True)


def order(key: Key, candidates: Sequence[P]) -> list[P]:
    """``candidates`` in the key's order."""
    return [candidates[i] for i in _ranking(key, candidates, _set_of(candidates))]


def place(key: Key, candidates: Sequence[P], epsilon: float, now: float) -> tuple[P | None, str]:
    """The node for ``key`` and how it was chosen: ``hit`` (the key's own node) or
    ``spill`` (a later node in the key's order, its first ones being over their
    bound or passed over; None when no node qualifies: the policy decides).

    The key's own node is found among the group's home nodes alone (cached per
    group); the whole order is built only when it does not qualify."""
    n = len(candidates)
    if not n:
        return None, SPILL
    cset = _set_of(candidates)
    ws = cset.ws
    total, fastest = 1, math.inf  # this request included
    for c in candidates:
        st = c.stats
        total += st.in_flight + st.remote_in_flight
        if 0 < st.token_gap < fastest:
            fastest = st.token_gap
    share = (1.0 + epsilon) * total / cset.total_weight
    limit = MAX_SLOWDOWN * fastest

    def qualifies(i: int) -> bool:
        st = candidates[i].stats
        return (
            st.in_flight + st.remote_in_flight + 1
            <= math.ceil(share * (ws[i] if ws is not None else 1.0))
            and st.token_gap <= limit
            and st.success.value(now) >= MIN_SUCCESS
            and not st.hung(now)
        )

    group, conversation = key
    home = range(n) if group == conversation or n <= 2 else cset.home(group, candidates)
    own = max(home, key=lambda i: _score(conversation, candidates[i], ws, i))
    if qualifies(own):
        return candidates[own], HIT
    for i in _ranking(key, candidates, cset)[1:]:
        if qualifies(i):
            return candidates[i], SPILL
    return None, SPILL


def _score(h: int, node: Placeable, ws: list[float] | None, i: int) -> float:
    u = _u(h, node_hash(node.id))
    return u if ws is None else -ws[i] / math.log(u)
