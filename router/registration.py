"""Nodes that join by themselves, and the operator's membership controls.

* ``POST /v1/nodes/register`` (``Authorization: Bearer <join token>``): a node
  announces its URL, models and claimed hardware. The URL must resolve only to
  addresses in ``registry.allowed_networks`` (by default: anything except
  loopback, link-local, cloud metadata and other special addresses), so the
  router cannot be pointed at internal services. The answer carries a per-node
  secret, shown once; Ballast keeps only its SHA-256.
* ``POST /v1/nodes/{id}/heartbeat`` (``Authorization: Bearer <node secret>``):
  liveness and telemetry. A node can only speak for itself. Nodes silent for
  ``registry.heartbeat_ttl_s`` leave the candidate set (state ``gone``).
* ``POST /admin/nodes/{id}/drain``, ``/resume`` and ``DELETE /admin/nodes/{id}``
  behind the admin token.

Tokens and secrets are compared in constant time and never logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import secrets
import socket
from urllib.parse import urlsplit

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from router.config import Config, NodeId, url_problem
from router.errors import error_response
from router.fleet import Node, NodeState, Source
from router.store import StateStore, codec

log = logging.getLogger("ballast.membership")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class RegisterBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: NodeId
    url: str = Field(max_length=2048)
    models: list[str] = Field(min_length=1, max_length=256)
    gpu: str | None = Field(None, max_length=128)
    gpus: int = Field(1, ge=0, le=1024)
    vram_gb: float | None = Field(None, ge=0, le=1_000_000)
    price_per_mtok: float | None = Field(None, ge=0)
    labels: dict[str, str] = Field(default_factory=dict, max_length=64)


class HeartbeatBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    free_vram_gb: float | None = Field(None, ge=0)
    gpu_util: float | None = Field(None, ge=0, le=100)
    queue_len: int | None = Field(None, ge=0)
    engine: dict[str, float] = Field(default_factory=dict, max_length=64)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _bearer(request: web.Request) -> str:
    value = request.headers.get("Authorization", "")
    return value[7:] if value[:7].lower() == "bearer " else ""


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def _bad(message: str, code: str, status: int = 400) -> web.Response:
    types = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}
    return error_response(status, message, types.get(status, "invalid_request_error"), code)


def address_allowed(
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address, allowed: list[IPNetwork]
) -> bool:
    """Explicitly allowed networks win; otherwise refuse special-purpose addresses."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if allowed:
        return any(addr in net for net in allowed)
    return not (
        addr.is_loopback
        or addr.is_link_local  # includes 169.254.169.254, the cloud metadata service
        or addr.is_unspecified
        or addr.is_multicast
        or addr.is_reserved
    )


async def check_url(url: str, allowed: list[IPNetwork]) -> str | None:
    """Why ``url`` may not be registered, or None when it may."""
    if (problem := url_problem(url)) is not None:
        return f"url {problem}"
    parts = urlsplit(url)
    assert parts.hostname is not None
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            parts.hostname, port, type=socket.SOCK_STREAM
        )
    except OSError:
        return f"url host {parts.hostname!r} does not resolve"
    for info in infos:
        addr = ipaddress.ip_address(info[4][0])
        if not address_allowed(addr, allowed):
            return f"url resolves to {addr}, outside registry.allowed_networks"
    return None


def admin_denied(request: web.Request, token: str | None) -> web.Response | None:
    """The admin API needs ``Authorization: Bearer <admin token>``; off without a token."""
    if token is None:
        return _bad("the admin API is off (set admin.token_env)", "admin_off", 404)
    if not _same(_bearer(request), token):
        return _bad("missing or wrong admin token", "invalid_admin_token", 401)
    return None


class Membership:
    """HTTP handlers for registration, heartbeats and the admin membership API."""

    def __init__(
        self, cfg: Config, store: StateStore, join_token: str | None, admin_token: str | None
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.join_token = join_token
        self.admin_token = admin_token
        self.allowed: list[IPNetwork] = [
            ipaddress.ip_network(c, strict=False) for c in cfg.registry.allowed_networks
        ]

    async def _body(self, request: web.Request, model: type[BaseModel]) -> BaseModel | web.Response:
        try:
            return model.model_validate(orjson.loads(await request.read()))
        except orjson.JSONDecodeError:
            return _bad("request body is not valid JSON", "invalid_json")
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            return _bad(f"{where}: {first['msg']}", "invalid_node")

    async def register(self, request: web.Request) -> web.Response:
        if self.join_token is None:
            return _bad("self-registration is off (set registry.join_token_env)", "off", 404)
        if not _same(_bearer(request), self.join_token):
            return _bad("missing or wrong join token", "invalid_join_token", 401)
        body = await self._body(request, RegisterBody)
        if isinstance(body, web.Response):
            return body
        assert isinstance(body, RegisterBody)
        url = body.url.rstrip("/")
        if (why := await check_url(url, self.allowed)) is not None:
            log.warning("refused registration of %s: %s", body.id, why)
            return _bad(why, "url_not_allowed", 403)
        existing = await self.store.fetch(body.id)
        if existing is None and not self.store.healthy:
            # Whether the id is taken is only known to the shared store.
            return error_response(
                503,
                "the state store is unreachable; retry the registration shortly",
                "service_unavailable",
                "store_unavailable",
                headers={"Retry-After": "5"},
            )
        given = request.headers.get("X-Node-Secret", "")
        secret = None
        if existing is not None:
            if existing.source is not Source.JOINED:
                return _bad(f"node id {body.id!r} belongs to a static node", "id_taken", 409)
            if not given or not _same(hash_secret(given), existing.secret_hash):
                return _bad(
                    f"node id {body.id!r} is registered; re-registering needs its X-Node-Secret",
                    "id_taken",
                    409,
                )
            secret_hash = existing.secret_hash
        else:
            secret = secrets.token_urlsafe(32)
            secret_hash = hash_secret(secret)
        claims = {**body.model_dump(), "url": url}
        node = codec.from_registration(claims, self.cfg.scoring, self.cfg.health.probe, secret_hash)
        await self.store.register(node)
        log.info("node %s registered (%s, %s)", node.id, node.gpu or "gpu unknown", node.url)
        out = {
            "id": node.id,
            "heartbeat_url": f"/v1/nodes/{node.id}/heartbeat",
            "heartbeat_ttl_s": self.cfg.registry.heartbeat_ttl_s,
        }
        if secret is not None:
            out["secret"] = secret
        return web.Response(
            status=201 if secret else 200, body=orjson.dumps(out), content_type="application/json"
        )

    async def heartbeat(self, request: web.Request) -> web.Response:
        node = await self.store.fetch(request.match_info["id"])
        given = _bearer(request)
        if node is None or node.source is not Source.JOINED or not node.secret_hash:
            return _bad("no such registered node; register first", "unknown_node", 404)
        if not given or not _same(hash_secret(given), node.secret_hash):
            return _bad("missing or wrong node secret", "invalid_node_secret", 401)
        body = await self._body(request, HeartbeatBody)
        if isinstance(body, web.Response):
            return body
        await self.store.heartbeat(node.id, body.model_dump(exclude_none=True))
        return web.json_response({"id": node.id, "state": node.state.value})

    async def _admin_node(self, request: web.Request) -> Node | web.Response:
        if (denied := admin_denied(request, self.admin_token)) is not None:
            return denied
        node = await self.store.fetch(request.match_info["id"])
        if node is None:
            return _bad(f"no node {request.match_info['id']!r}", "unknown_node", 404)
        return node

    async def _set(self, request: web.Request, state: NodeState, reason: str) -> web.Response:
        node = await self._admin_node(request)
        if isinstance(node, web.Response):
            return node
        await self.store.set_state(node.id, state, reason)
        return web.json_response({"id": node.id, "state": state.value, "reason": reason})

    async def drain(self, request: web.Request) -> web.Response:
        return await self._set(request, NodeState.DRAINING, "drained by an operator")

    async def resume(self, request: web.Request) -> web.Response:
        return await self._set(request, NodeState.SERVING, "resumed by an operator")

    async def delete(self, request: web.Request) -> web.Response:
        node = await self._admin_node(request)
        if isinstance(node, web.Response):
            return node
        await self.store.remove(node.id)
        return web.json_response({"id": node.id, "removed": True})
