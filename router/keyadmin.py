"""The admin API for client keys, their usage, and join tokens (admin token required).

``POST /admin/keys`` creates a key and answers it once; ``GET /admin/keys`` lists
keys (never a key or its hash); ``PATCH`` and ``DELETE /admin/keys/{id}`` (id or
name) change or revoke one; ``GET /admin/usage?key=NAME&since=YYYY-MM-DD``
answers usage per key and model. Changes go through the state store, so every
replica applies them (within a second with Redis).

Scoped join tokens (:mod:`router.join_tokens`) the same way: ``POST
/admin/join-tokens`` mints one and answers it once, ``GET /admin/join-tokens``
lists them with their live nodes, ``DELETE /admin/join-tokens/{id}`` (id or name)
revokes one, draining and forgetting its nodes on every replica.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import date
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from router import join_tokens as jt
from router.config import KeyLimits, KeyName, ModelName, PoolName
from router.errors import error_response
from router.fleet import NodeState, Source
from router.registration import admin_denied
from router.store import StateStore, utc_day
from router.tenants import DISPLAY_CHARS, Key, Keyring, Usage, hash_key, new_key

if TYPE_CHECKING:
    from router.registration import Membership

log = logging.getLogger("ballast.keys")


M = TypeVar("M", bound=BaseModel)


class NewKey(KeyLimits):
    name: KeyName


class KeyChange(KeyLimits):
    name: KeyName | None = None


def _invalid(message: str) -> web.Response:
    return error_response(400, message, "invalid_request_error", "invalid_key_request")


def _exists(name: str) -> web.Response:
    return error_response(409, f"a key named {name} exists", "invalid_request_error", "key_exists")


def _store_down(e: Exception) -> web.Response:
    log.error("key change or usage read failed in the state store: %r", e)
    return error_response(
        503, "the state store cannot be reached; try again", "service_unavailable",
        "store_unavailable", headers={"Retry-After": "1"},
    )  # fmt: skip


def _public(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "hash"}


A = TypeVar("A", "KeyAdmin", "JoinTokenAdmin")
Handler = Callable[[A, web.Request], Awaitable[web.Response]]


def _admin(handler: Handler[A]) -> Handler[A]:
    """Every key and join token route needs the admin token."""

    async def checked(self: A, request: web.Request) -> web.Response:
        if (denied := admin_denied(request, self.admin_token)) is not None:
            return denied
        return await handler(self, request)

    return checked


async def read_spec(
    request: web.Request, model: type[M], base: dict[str, Any] | None = None
) -> M | web.Response:
    """The JSON body (over ``base``) validated as ``model``, or the 400."""
    try:
        doc = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        doc = None
    if not isinstance(doc, dict):
        return _invalid("the body must be a JSON object")
    try:
        return model(**{**(base or {}), **doc})
    except ValidationError as e:
        return _invalid(
            "; ".join(f"{'.'.join(map(str, x['loc'])) or 'body'}: {x['msg']}" for x in e.errors())
        )
    except TypeError:
        return _invalid("invalid fields")


class KeyAdmin:
    ROUTES = (
        ("POST", "/admin/keys", "create"),
        ("GET", "/admin/keys", "list"),
        ("PATCH", "/admin/keys/{id}", "change"),
        ("DELETE", "/admin/keys/{id}", "revoke"),
        ("GET", "/admin/usage", "usage"),
    )

    def __init__(
        self,
        keys: Keyring,
        store: StateStore,
        admin_token: str | None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.keys = keys
        self.store = store
        self.admin_token = admin_token
        self.wall = wall

    def _find(self, request: web.Request) -> Key | web.Response:
        key = self.keys.by_name(request.match_info["id"])
        if key is None:
            return error_response(404, "no such key", "invalid_request_error", "key_not_found")
        if key.source != "admin":
            return _invalid(f"key {key.name} is set in the config file; change it there")
        return key

    async def _put(self, record: dict[str, Any], did: str) -> web.Response | None:
        """Store a key record (every replica then has it); the 503 when Redis fails."""
        try:
            await self.store.put_key(record)
        except Exception as e:  # Redis down: nothing was changed
            return _store_down(e)
        log.warning("key %s (%s) %s through the admin API", record["name"], record["id"], did)
        return None

    @_admin
    async def create(self, request: web.Request) -> web.Response:
        spec = await read_spec(request, NewKey)
        if isinstance(spec, web.Response):
            return spec
        if self.keys.by_name(spec.name) is not None:
            return _exists(spec.name)
        if len(self.keys.dynamic) >= self.keys.max_keys:
            return error_response(
                429, "too many keys (auth.max_keys)", "invalid_request_error", "too_many_keys"
            )
        secret = new_key()
        record = {
            "id": "key_" + secrets.token_hex(6),
            "name": spec.name,
            "prefix": secret[:DISPLAY_CHARS],
            "source": "admin",
            "created_at": self.wall(),
            "hash": hash_key(secret),
            **spec.model_dump(exclude={"name"}),
        }
        if (failed := await self._put(record, "created")) is not None:
            return failed
        return web.json_response({**_public(record), "key": secret}, status=201)

    @_admin
    async def list(self, request: web.Request) -> web.Response:
        keys = [*self.keys.static.values(), *self.keys.dynamic.values()]
        return web.json_response({"data": [k.public() for k in keys]})

    @_admin
    async def change(self, request: web.Request) -> web.Response:
        key = self._find(request)
        if isinstance(key, web.Response):
            return key
        change = await read_spec(request, KeyChange, key.limits.model_dump())
        if isinstance(change, web.Response):
            return change
        name = change.name or key.name
        if name != key.name and self.keys.by_name(name) is not None:
            return _exists(name)
        record = {**key.record(), **change.model_dump(exclude={"name"}), "name": name}
        if (failed := await self._put(record, "changed")) is not None:
            return failed
        return web.json_response(_public(record))

    @_admin
    async def revoke(self, request: web.Request) -> web.Response:
        key = self._find(request)
        if isinstance(key, web.Response):
            return key
        try:
            await self.store.delete_key(key.id)
        except Exception as e:
            return _store_down(e)
        log.warning("key %s (%s) revoked through the admin API", key.name, key.id)
        return web.json_response({"id": key.id, "name": key.name, "revoked": True})

    @_admin
    async def usage(self, request: web.Request) -> web.Response:
        since = request.query.get("since") or utc_day(self.wall() - 29 * 86400)
        try:
            date.fromisoformat(since)
        except ValueError:
            return _invalid("since must be a date, YYYY-MM-DD (UTC)")
        name = request.query.get("key")
        try:
            rows = await self.store.read_usage(since)
        except Exception as e:
            return _store_down(e)
        data = [
            {"key": k, "model": m, **dict(zip(Usage.FIELDS, row, strict=True))}
            for (k, m), row in sorted(rows.items())
            if name is None or k == name
        ]
        return web.json_response({"since": since, "data": data})


class NewJoinToken(BaseModel):
    """A scoped join token as an operator asks for it (``POST /admin/join-tokens``)."""

    model_config = ConfigDict(extra="forbid")

    name: KeyName
    models: list[ModelName] = Field(default_factory=list, max_length=256)  # empty: any
    pool: PoolName | None = None  # the pool label its nodes get (the operator's word)
    max_nodes: int | None = Field(None, ge=1, le=1_000_000)  # live nodes at once
    expires_at: float | None = Field(None, ge=0)  # Unix time
    expires_in_s: float | None = Field(None, gt=0, le=100 * 365 * 86400)  # or: from now

    @model_validator(mode="after")
    def _one_expiry(self) -> NewJoinToken:
        if self.expires_at is not None and self.expires_in_s is not None:
            raise ValueError("give at most one of expires_at and expires_in_s")
        return self


def _token_error(status: int, message: str, code: str) -> web.Response:
    return error_response(status, message, "invalid_request_error", code)


class JoinTokenAdmin:
    """Mint, list and revoke scoped join tokens; each kept only as its SHA-256."""

    ROUTES = (
        ("POST", "/admin/join-tokens", "create"),
        ("GET", "/admin/join-tokens", "list"),
        ("DELETE", "/admin/join-tokens/{id}", "revoke"),
    )

    def __init__(
        self,
        membership: Membership,
        store: StateStore,
        admin_token: str | None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.membership = membership
        self.tokens = membership.tokens
        self.store = store
        self.admin_token = admin_token
        self.wall = wall
        pools = membership.cfg.pools
        self.pools = frozenset(pools.order) if pools is not None else None

    async def _put(self, record: dict[str, Any], did: str) -> web.Response | None:
        try:
            await self.store.put_join_token(record)
        except Exception as e:  # Redis down: nothing was changed
            return _store_down(e)
        log.warning(
            "join token %s (%s) %s through the admin API", record["name"], record["id"], did
        )
        return None

    async def _prune(self) -> None:
        """Forget tombstones older than ``REVOKED_KEPT_S``."""
        before = self.wall() - jt.REVOKED_KEPT_S
        for token in list(self.tokens.by_id.values()):
            if token.revoked_at is not None and token.revoked_at < before:
                await self.store.delete_join_token(token.id)

    @_admin
    async def create(self, request: web.Request) -> web.Response:
        spec = await read_spec(request, NewJoinToken)
        if isinstance(spec, web.Response):
            return spec
        if spec.name == jt.SHARED:
            return _invalid(f"{jt.SHARED} names the shared join token (registry.join_token_env)")
        if self.tokens.by_name(spec.name) is not None:
            return _token_error(409, f"a join token named {spec.name} exists", "join_token_exists")
        if self.pools is not None and spec.pool is not None and spec.pool not in self.pools:
            known = ", ".join(sorted(self.pools))
            return _invalid(f"pool: unknown pool {spec.pool!r} (known: {known})")
        if len(self.tokens.live()) >= jt.MAX_TOKENS:
            return _token_error(429, "too many join tokens", "too_many_join_tokens")
        secret = jt.new_token()
        now = self.wall()
        expires_at = spec.expires_at
        if spec.expires_in_s is not None:
            expires_at = now + spec.expires_in_s
        record = {
            "id": "jt_" + secrets.token_hex(6),
            "name": spec.name,
            "prefix": secret[: jt.DISPLAY_CHARS],
            "created_at": now,
            "hash": hash_key(secret),
            "models": spec.models,
            "pool": spec.pool,
            "max_nodes": spec.max_nodes,
            "expires_at": expires_at,
        }
        try:
            await self._prune()
            for old in [t for t in self.tokens.by_id.values() if t.name == spec.name]:
                await self.store.delete_join_token(old.id)  # a revoked one's tombstone
        except Exception as e:
            return _store_down(e)
        if (failed := await self._put(record, "created")) is not None:
            return failed
        return web.json_response({**_public(record), "token": secret}, status=201)

    def _state(self, token: jt.JoinToken) -> str:
        if token.revoked_at is not None:
            return "revoked"
        return "expired" if self.tokens.expired(token) else "active"

    def _live_nodes(self) -> Counter[str]:
        """Live self-registered nodes by the join token that registered them (one pass
        over the fleet, whatever the number of tokens)."""
        return Counter(
            n.join_token
            for n in self.store.fleet.nodes.values()
            if n.source is Source.JOINED and n.state is not NodeState.GONE
        )

    @_admin
    async def list(self, request: web.Request) -> web.Response:
        """Every token (revoked ones while their tombstone lasts) with its live nodes;
        first the shared join token's, when there is one."""
        data: list[dict[str, Any]] = []
        live = self._live_nodes()
        if self.membership.join_token is not None:
            data.append(
                {"id": jt.SHARED, "name": jt.SHARED, "source": "config", "state": "active",
                 "nodes": live[jt.SHARED]}
            )  # fmt: skip
        for token in sorted(
            self.tokens.by_id.values(), key=lambda t: t.record.get("created_at", 0)
        ):
            row = {**token.public(), "source": "admin", "state": self._state(token)}
            data.append({**row, "nodes": live[token.name]})
        return web.json_response({"data": data})

    @_admin
    async def revoke(self, request: web.Request) -> web.Response:
        which = request.match_info["id"]
        if which == jt.SHARED:
            return _invalid("the shared join token is set in the config (registry.join_token_env)")
        token = self.tokens.by_name(which)
        if token is None:
            return _token_error(404, "no such join token", "join_token_not_found")
        record = {**token.public(), "revoked_at": self.wall()}  # a tombstone: no hash
        self.tokens.claim_sweep(token.id)  # its nodes are forgotten here, below
        if (failed := await self._put(record, "revoked")) is not None:
            return failed
        gone = await self.membership.forget_nodes_of({token.name})
        with contextlib.suppress(Exception):
            await self._prune()
        return web.json_response(
            {"id": token.id, "name": token.name, "revoked": True, "nodes": gone}
        )
