"""The admin API for client keys and their usage (admin token required).

``POST /admin/keys`` creates a key and answers it once; ``GET /admin/keys`` lists
keys (never a key or its hash); ``PATCH`` and ``DELETE /admin/keys/{id}`` (id or
name) change or revoke one; ``GET /admin/usage?key=NAME&since=YYYY-MM-DD``
answers usage per key and model. Changes go through the state store, so every
replica applies them (within a second with Redis).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from datetime import date
from typing import Any, TypeVar

import orjson
from aiohttp import web
from pydantic import BaseModel, ValidationError

from router.config import KeyLimits, KeyName
from router.errors import error_response
from router.registration import admin_denied
from router.store import StateStore, utc_day
from router.tenants import DISPLAY_CHARS, Key, Keyring, Usage, hash_key, new_key

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


Handler = Callable[["KeyAdmin", web.Request], Awaitable[web.Response]]


def _admin(handler: Handler) -> Handler:
    """Every key route needs the admin token."""

    async def checked(self: KeyAdmin, request: web.Request) -> web.Response:
        if (denied := admin_denied(request, self.admin_token)) is not None:
            return denied
        return await handler(self, request)

    return checked


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

    async def _spec(
        self, request: web.Request, model: type[M], base: dict[str, Any] | None = None
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
                "; ".join(
                    f"{'.'.join(map(str, x['loc'])) or 'body'}: {x['msg']}" for x in e.errors()
                )
            )
        except TypeError:
            return _invalid("invalid fields")

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
        spec = await self._spec(request, NewKey)
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
        change = await self._spec(request, KeyChange, key.limits.model_dump())
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
