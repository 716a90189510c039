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
from collections.abc import Callable
from datetime import date
from typing import Any

import orjson
from aiohttp import web
from pydantic import ValidationError

from router.config import KeyLimits, KeyName
from router.errors import error_response
from router.registration import admin_denied
from router.store import StateStore, utc_day
from router.tenants import DISPLAY_CHARS, Keyring, Usage, hash_key, new_key

log = logging.getLogger("ballast.keys")


class NewKey(KeyLimits):
    name: KeyName


class KeyChange(KeyLimits):
    name: KeyName | None = None


def _invalid(message: str) -> web.Response:
    return error_response(400, message, "invalid_request_error", "invalid_key_request")


def _store_down(e: Exception) -> web.Response:
    log.error("key change or usage read failed in the state store: %r", e)
    return error_response(
        503, "the state store cannot be reached; try again", "service_unavailable",
        "store_unavailable", headers={"Retry-After": "1"},
    )  # fmt: skip


def _errors(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, x['loc'])) or 'body'}: {x['msg']}" for x in e.errors())


class KeyAdmin:
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

    async def _body(self, request: web.Request) -> dict[str, Any] | web.Response:
        try:
            doc = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _invalid("the body must be a JSON object")
        return doc if isinstance(doc, dict) else _invalid("the body must be a JSON object")

    def _find(self, request: web.Request) -> Any:
        key = self.keys.by_name(request.match_info["id"])
        if key is None:
            return error_response(404, "no such key", "invalid_request_error", "key_not_found")
        if key.source != "admin":
            return _invalid(f"key {key.name} is set in the config file; change it there")
        return key

    async def create(self, request: web.Request) -> web.Response:
        if (denied := admin_denied(request, self.admin_token)) is not None:
            return denied
        doc = await self._body(request)
        if isinstance(doc, web.Response):
            return doc
        try:
            spec = NewKey(**doc)
        except (ValidationError, TypeError) as e:
            return _invalid(_errors(e) if isinstance(e, ValidationError) else "invalid fields")
        if self.keys.by_name(spec.name) is not None:
            return error_response(
                409, f"a key named {spec.name} exists", "invalid_request_error", "key_exists"
            )
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
        try:
            await self.store.put_key(record)
        except Exception as e:  # Redis down: nothing was created
            return _store_down(e)
        log.warning("key %s (%s) created through the admin API", spec.name, record["id"])
        public = {k: v for k, v in record.items() if k != "hash"}
        return web.json_response({**public, "key": secret}, status=201)

    async def list(self, request: web.Request) -> web.Response:
        if (denied := admin_denied(request, self.admin_token)) is not None:
            return denied
        keys = [*self.keys.static.values(), *self.keys.dynamic.values()]
        return web.json_response({"data": [k.public() for k in keys]})

    async def change(self, request: web.Request) -> web.Response:
        if (denied := admin_denied(request, self.admin_token)) is not None:
            return denied
        key = self._find(request)
        if isinstance(key, web.Response):
            return key
        doc = await self._body(request)
        if isinstance(doc, web.Response):
            return doc
        try:
            change = KeyChange(**{**key.limits.model_dump(), **doc})
        except (ValidationError, TypeError) as e:
            return _invalid(_errors(e) if isinstance(e, ValidationError) else "invalid fields")
        name = change.name or key.name
        if name != key.name and self.keys.by_name(name) is not None:
            return error_response(409, f"a key named {name} exists", "invalid_request_error",
                                  "key_exists")  # fmt: skip
        record = {**key.record(), **change.model_dump(exclude={"name"}), "name": name}
        try:
            await self.store.put_key(record)
        except Exception as e:
            return _store_down(e)
        log.warning("key %s (%s) changed through the admin API", name, key.id)
        return web.json_response({k: v for k, v in record.items() if k != "hash"})

    async def revoke(self, request: web.Request) -> web.Response:
        if (denied := admin_denied(request, self.admin_token)) is not None:
            return denied
        key = self._find(request)
        if isinstance(key, web.Response):
            return key
        try:
            await self.store.delete_key(key.id)
        except Exception as e:
            return _store_down(e)
        log.warning("key %s (%s) revoked through the admin API", key.name, key.id)
        return web.json_response({"id": key.id, "name": key.name, "revoked": True})

    async def usage(self, request: web.Request) -> web.Response:
        if (denied := admin_denied(request, self.admin_token)) is not None:
            return denied
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
