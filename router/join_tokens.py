"""Scoped join tokens: one per provider, so an operator knows whose nodes are whose.

Besides the shared join token (``registry.join_token_env``), an operator mints
join tokens through the admin API (:class:`router.keyadmin.JoinTokenAdmin`), one
per provider: a name, and optionally the models its nodes may serve, the pool
label they get (the operator's word: it replaces the node's own claim and is
trusted even without ``pools.trust_joined_labels``), how many live nodes may use
it at once, and when it expires. A token looks like ``jt-bal-<43 random
characters>``; it is shown once and kept only as its SHA-256
(:func:`router.tenants.hash_key`), like a client key.

The records live in the state store beside the client keys (``put_join_token``
and ``delete_join_token``), so every replica has them (within a second with
Redis, at once through pub/sub). Revoking a token leaves a *tombstone* record
(its hash dropped) for ``REVOKED_KEPT_S``: every replica that adopts a tombstone
drains and forgets the nodes that token registered (:attr:`JoinTokens.on_revoked`),
and refuses their heartbeats and registrations. An explicit tombstone, not a
missing record: a store that comes back empty must not make every replica forget
every provider's nodes.

Expiry ends joining (registrations and re-registrations), not the membership of
nodes already in; revocation ends both.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from router.tenants import hash_key

TOKEN_PREFIX = "jt-bal-"
DISPLAY_CHARS = 12  # of a token shown in listings: "jt-bal-AbCdE"
SHARED = "shared"  # what a node registered with the shared join token records
MAX_TOKENS = 10_000  # live tokens, over all replicas
REVOKED_KEPT_S = 7 * 86400  # a revoked token's tombstone is kept this long


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True, slots=True)
class JoinToken:
    id: str
    name: str
    models: frozenset[str] = frozenset()  # empty: any model (registry.allowed_models still holds)
    pool: str | None = None
    max_nodes: int | None = None
    expires_at: float | None = None  # Unix time
    revoked_at: float | None = None
    record: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def public(self) -> dict[str, Any]:
        """What listings show: never the token or its hash."""
        return {k: v for k, v in self.record.items() if k != "hash"}


def _token(rec: Mapping[str, Any]) -> JoinToken:
    return JoinToken(
        id=str(rec["id"]),
        name=str(rec["name"]),
        models=frozenset(str(m) for m in rec.get("models") or ()),
        pool=str(rec["pool"]) if rec.get("pool") else None,
        max_nodes=int(rec["max_nodes"]) if rec.get("max_nodes") is not None else None,
        expires_at=float(rec["expires_at"]) if rec.get("expires_at") is not None else None,
        revoked_at=float(rec["revoked_at"]) if rec.get("revoked_at") is not None else None,
        record=dict(rec),
    )


class JoinTokens:
    """Every scoped join token this process knows, as the store last reported them."""

    def __init__(self, wall: Callable[[], float] = time.time) -> None:
        self.wall = wall
        self.by_id: dict[str, JoinToken] = {}
        self.by_hash: dict[str, JoinToken] = {}  # live tokens only
        self.revoked: frozenset[str] = frozenset()  # names of tombstoned tokens
        self._swept: set[str] = set()  # tombstone ids whose nodes were handed to on_revoked
        # Called with the names of tokens newly seen revoked (from the store's sync).
        self.on_revoked: Callable[[set[str]], None] | None = None

    def adopt(self, records: Mapping[str, Mapping[str, Any]]) -> None:
        """The store's join token records (all of them)."""
        tokens: dict[str, JoinToken] = {}
        hashes: dict[str, JoinToken] = {}
        for tid, rec in records.items():
            try:
                token = _token(rec)
            except (KeyError, TypeError, ValueError):
                continue  # a record this version cannot read: no token it accepts
            tokens[tid] = token
            if token.revoked_at is None and isinstance(rec.get("hash"), str):
                hashes[rec["hash"]] = token
        self.by_id, self.by_hash = tokens, hashes
        tombs = {t.id: t.name for t in tokens.values() if t.revoked_at is not None}
        self.revoked = frozenset(tombs.values())
        fresh = {tombs[t] for t in tombs.keys() - self._swept}
        self._swept = set(tombs) | (self._swept & tokens.keys())
        if fresh and self.on_revoked is not None:
            self.on_revoked(fresh)

    def claim_sweep(self, token_id: str) -> None:
        """This process forgets the token's nodes itself (the revoking replica)."""
        self._swept.add(token_id)

    def live(self) -> list[JoinToken]:
        return [t for t in self.by_id.values() if t.revoked_at is None]

    def by_name(self, name_or_id: str) -> JoinToken | None:
        """A live token by name or id."""
        for token in self.live():
            if name_or_id in (token.id, token.name):
                return token
        return None

    def match(self, given: str) -> JoinToken | None:
        """The live token ``given`` is, or None (a lookup by hash: nothing to time)."""
        if not given.startswith(TOKEN_PREFIX):
            return None
        return self.by_hash.get(hash_key(given))

    def expired(self, token: JoinToken) -> bool:
        return token.expires_at is not None and self.wall() >= token.expires_at
