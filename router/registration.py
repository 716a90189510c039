"""Nodes that join by themselves, and the operator's membership controls.

* ``POST /v1/nodes/register`` (``Authorization: Bearer <join token>``): a node
  announces its URL, models, claimed hardware, labels, prices and engine. Every
  claim is validated and bounded (:class:`RegisterBody`; ``ballast agent``
  checks its flags with the same model before it starts); the URL must pass
  :class:`~router.addresses.AddressRules`, here and again at every connection.
  The answer carries a per-node secret, shown once; Ballast keeps only its
  SHA-256. Without an ``id`` the router picks one. The join token is the shared
  one (``registry.join_token_env``) or a scoped one an operator minted
  (:mod:`router.join_tokens`), whose models, pool, node count and expiry hold
  here; each node records which token registered it.
* ``POST /v1/nodes/{id}/heartbeat`` (``Authorization: Bearer <node secret>``):
  liveness and telemetry. A node can only speak for itself, and an unknown id
  and a wrong secret get the same 401 after the same work. Nodes silent for
  ``registry.heartbeat_ttl_s`` leave the candidate set (state ``gone``) and are
  forgotten after ``registry.gone_retention_s``.
* ``POST /admin/nodes/{id}/drain``, ``/resume`` and ``DELETE /admin/nodes/{id}``
  behind the admin token. Revoking a scoped join token drains and forgets its
  nodes on every replica, and refuses their heartbeats.

A node that comes back (a heartbeat after ``gone``, a re-registration, an
operator's resume) is verified again before it takes traffic; a drain holds
until an operator resumes the node, and ejection back-off survives
re-registration.

Tokens and secrets are compared in constant time and never logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
from typing import Annotated, Any

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from router.addresses import AddressRules, check_url
from router.config import ROUTER_ID, Config, EngineName, Labels, ModelName, NodeId, Text
from router.errors import error_response
from router.fleet import Node, NodeState, Source
from router.join_tokens import SHARED, JoinToken, JoinTokens
from router.store import StateStore, codec

log = logging.getLogger("ballast.membership")

MetricName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_:.]+$")]


class NodeClaims(BaseModel):
    """What a node says of itself besides where it is and what it serves: the part of
    a registration ``ballast agent`` knows (and checks) before it starts."""

    model_config = ConfigDict(extra="forbid")

    id: NodeId | None = None
    gpu: Text | None = None
    gpus: int = Field(1, ge=0, le=1024)
    vram_gb: float | None = Field(None, ge=0, le=1_000_000)
    price_per_mtok: float | None = Field(None, ge=0, le=1_000_000)
    price_per_hour: float | None = Field(None, ge=0, le=1_000_000)
    # pool, region (locality.label), max_concurrency and any free-form ones
    labels: Labels = Field(default_factory=dict)
    engine: EngineName | None = None  # as nodes[].engine; else the prober detects it

    @field_validator("id")
    @classmethod
    def _id(cls, v: str | None) -> str | None:
        # A node must not take the router's name (the x-ballast-node of its own answers).
        if v is not None and v.lower() == ROUTER_ID:
            raise ValueError(f"the id {ROUTER_ID!r} is the router's own")
        return v


class RegisterBody(NodeClaims):
    url: str = Field(max_length=2048)
    models: list[ModelName] = Field(min_length=1, max_length=256)


class HeartbeatBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    free_vram_gb: float | None = Field(None, ge=0, le=1_000_000)
    gpu_util: float | None = Field(None, ge=0, le=100)
    queue_len: int | None = Field(None, ge=0, le=1_000_000)
    engine: dict[MetricName, float] = Field(default_factory=dict, max_length=64)


def _bytes(value: str) -> bytes:
    # Header values arrive decoded with surrogate escapes for invalid UTF-8.
    return value.encode("utf-8", "surrogateescape")


def hash_secret(secret: str) -> str:
    return hashlib.sha256(_bytes(secret)).hexdigest()


# What a given secret's hash is compared with when there is no stored one: as long
# as a real hash, and never equal to one (it is not hex).
NO_SECRET = "-" * 64


def _bearer(request: web.Request) -> str:
    value = request.headers.get("Authorization", "")
    return value[7:] if value[:7].lower() == "bearer " else ""


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(_bytes(a), _bytes(b))


def _bad(message: str, code: str, status: int = 400) -> web.Response:
    types = {
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        409: "invalid_request_error",
        429: "rate_limit_error",
    }
    return error_response(status, message, types.get(status, "invalid_request_error"), code)


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
        self.reg = cfg.registry
        self.store = store
        self.join_token = join_token
        self.admin_token = admin_token
        self.verify = cfg.health.probe
        self.rules = AddressRules.of(cfg)
        self.pool_label = cfg.pools.label if cfg.pools is not None else "pool"
        # Scoped join tokens: the store hands them every record (as it hands the
        # keyring the client keys); revoked ones take their nodes with them.
        self.tokens = JoinTokens()
        self._pending: dict[str, set[str]] = {}  # token name -> ids registering now
        self.tokens.on_revoked = self._revoked
        store.join_tokens = self.tokens
        self._sweeps: set[asyncio.Task[Any]] = set()
        from router.keyadmin import JoinTokenAdmin  # it needs admin_denied from here

        self.token_admin = JoinTokenAdmin(self, store, admin_token)

    async def _body(self, request: web.Request, model: type[BaseModel]) -> BaseModel | web.Response:
        try:
            return model.model_validate(orjson.loads(await request.read()))
        except orjson.JSONDecodeError:
            return _bad("request body is not valid JSON", "invalid_json")
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p)[:64] for p in first["loc"]) or "body"
            return _bad(f"{where}: {first['msg'][:200]}", "invalid_node")

    def _claims_refused(self, body: RegisterBody) -> str | None:
        if len(body.models) > self.reg.max_models_per_node:
            return f"models: at most {self.reg.max_models_per_node} models per node"
        if self.reg.allowed_models:
            aliases = self.cfg.aliases  # an alias names an allowed model as well
            allowed = self.reg.allowed_models
            foreign = [m for m in body.models if aliases.get(m, m) not in allowed]
            if foreign:
                return f"models: {foreign[0][:64]!r} is not in registry.allowed_models"
        return None

    def _join_token(self, request: web.Request) -> JoinToken | str | web.Response:
        """The join token a registration presents: ``SHARED``, a live scoped token, or
        the refusal. The shared token is compared in constant time; a scoped one is
        looked up by its hash."""
        if self.join_token is None and not self.tokens.by_hash:
            return _bad(
                "self-registration is off (set registry.join_token_env, or mint a join token)",
                "off",
                404,
            )
        given = _bearer(request)
        if self.join_token is not None and _same(given, self.join_token):
            return SHARED
        token = self.tokens.match(given)
        if token is None:
            return _bad("missing or wrong join token", "invalid_join_token", 401)
        if self.tokens.expired(token):
            return _bad(f"join token {token.name} has expired", "expired_join_token", 401)
        return token

    def _token_refused(
        self, token: JoinToken, body: RegisterBody, node_id: str
    ) -> web.Response | None:
        """What a scoped token does not allow this registration, or None."""
        if token.models:
            foreign = [m for m in body.models if self.cfg.aliases.get(m, m) not in token.models]
            if foreign:
                why = f"models: {foreign[0][:64]!r} is not allowed by join token {token.name}"
                return _bad(why, "join_token_models", 403)
        if token.max_nodes is not None:
            live = {
                n.id
                for n in self.store.joined_by(token.name)
                if n.state is not NodeState.GONE and n.id != node_id
            }
            live |= self._pending.get(token.name, set()) - {node_id}
            if len(live) >= token.max_nodes:
                why = f"join token {token.name} has its {token.max_nodes} live node(s) already"
                return _bad(why, "join_token_full", 429)
        return None

    async def register(self, request: web.Request) -> web.Response:
        token = self._join_token(request)
        if isinstance(token, web.Response):
            return token
        body = await self._body(request, RegisterBody)
        if isinstance(body, web.Response):
            return body
        assert isinstance(body, RegisterBody)
        if (why := self._claims_refused(body)) is not None:
            return _bad(why, "invalid_node")
        url = body.url.rstrip("/")
        if (why := await check_url(url, self.rules)) is not None:
            log.warning("refused a registration: %s", why)
            return _bad(why, "url_not_allowed", 403)
        node_id = body.id or f"node-{secrets.token_hex(6)}"
        if not isinstance(token, JoinToken):
            return await self._register(request, body, token, node_id, url)
        if (refused := self._token_refused(token, body, node_id)) is not None:
            return refused
        # Counted against the token's max_nodes from now: registrations that arrive
        # together cannot all pass the count before any of them is in the fleet.
        pending = self._pending.setdefault(token.name, set())
        pending.add(node_id)
        try:
            return await self._register(request, body, token, node_id, url)
        finally:
            pending.discard(node_id)

    async def _register(
        self,
        request: web.Request,
        body: RegisterBody,
        token: JoinToken | str,
        node_id: str,
        url: str,
    ) -> web.Response:
        existing = await self.store.fetch(node_id)
        if existing is None and not self.store.healthy:
            # Whether the id is taken is only known to the shared store.
            return error_response(
                503,
                "the state store is unreachable; retry the registration shortly",
                "service_unavailable",
                "store_unavailable",
                headers={"Retry-After": "5"},
            )
        if existing is None and self.store.joined_count() >= self.reg.max_nodes:
            return _bad(
                f"the registry is full ({self.reg.max_nodes} self-registered nodes)",
                "registry_full",
                429,
            )
        given = request.headers.get("X-Node-Secret", "")
        secret = None
        if existing is not None:
            if existing.source is not Source.JOINED:
                return _bad(f"node id {node_id!r} belongs to a static node", "id_taken", 409)
            if not given or not _same(hash_secret(given), existing.secret_hash):
                return _bad(
                    f"node id {node_id!r} is registered; re-registering needs its X-Node-Secret",
                    "id_taken",
                    409,
                )
            secret_hash = existing.secret_hash
        else:
            secret = secrets.token_urlsafe(32)
            secret_hash = hash_secret(secret)
        claims = {**body.model_dump(), "id": node_id, "url": url}
        name, pool = SHARED, None
        if isinstance(token, JoinToken):
            name, pool = token.name, token.pool
            if pool is not None:  # the operator's word, not the node's claim
                claims["labels"] = {**claims["labels"], self.pool_label: pool}
        node = codec.from_registration(
            claims, self.cfg.scoring, self.verify, secret_hash, name, pool
        )
        if existing is not None:
            codec.carry_over(existing, node)
        await self.store.register(node)
        log.info(
            "node %s registered (%s, %s) with join token %s",
            node.id, node.gpu or "gpu unknown", node.url, name,
        )  # fmt: skip
        out = {
            "id": node.id,
            "heartbeat_url": f"/v1/nodes/{node.id}/heartbeat",
            "heartbeat_ttl_s": self.reg.heartbeat_ttl_s,
        }
        if secret is not None:
            out["secret"] = secret
        return web.Response(
            status=201 if secret else 200, body=orjson.dumps(out), content_type="application/json"
        )

    async def heartbeat(self, request: web.Request) -> web.Response:
        node = await self._heartbeat_node(request)
        if node is None:
            return _bad("unknown node or wrong node secret", "invalid_node_secret", 401)
        if node.join_token in self.tokens.revoked:
            # Its removal may still be on its way (a write queued while Redis is away).
            return _bad("the join token of this node was revoked", "revoked_join_token", 401)
        body = await self._body(request, HeartbeatBody)
        if isinstance(body, web.Response):
            return body
        await self.store.heartbeat(node.id, body.model_dump(exclude_none=True))
        return web.json_response({"id": node.id, "state": node.state.value})

    async def _heartbeat_node(self, request: web.Request) -> Node | None:
        """The self-registered node a heartbeat speaks for, when its secret is right.
        An unknown id, a static node's id and a wrong or missing secret take the same
        steps (one read of the stored secret, one hash, one comparison of equal
        length) and get the same None, so neither answer nor timing says which ids
        exist."""
        node_id = request.match_info["id"]
        stored = await self.store.secret_of(node_id)
        given = _bearer(request)
        matches = _same(hash_secret(given), stored or NO_SECRET)
        if stored is None or not given or not matches:
            return None
        node = await self.store.fetch(node_id)
        return node if node is not None and node.source is Source.JOINED else None

    async def _admin_node(self, request: web.Request) -> Node | web.Response:
        if (denied := admin_denied(request, self.admin_token)) is not None:
            return denied
        node = await self.store.fetch(request.match_info["id"])
        if node is None:
            return _bad(f"no node {request.match_info['id'][:128]!r}", "unknown_node", 404)
        return node

    async def drain(self, request: web.Request) -> web.Response:
        node = await self._admin_node(request)
        if isinstance(node, web.Response):
            return node
        node.drained = True
        reason = "drained by an operator"
        await self.store.set_state(node.id, NodeState.DRAINING, reason)
        return web.json_response({"id": node.id, "state": "draining", "reason": reason})

    async def resume(self, request: web.Request) -> web.Response:
        """Undo a drain; the node is verified again before it takes traffic."""
        node = await self._admin_node(request)
        if isinstance(node, web.Response):
            return node
        node.drained = False
        if self.verify:
            state, reason = NodeState.REGISTERED, "resumed by an operator; verifying"
        else:
            state, reason = NodeState.SERVING, "resumed by an operator"
        await self.store.set_state(node.id, state, reason)
        return web.json_response({"id": node.id, "state": state.value, "reason": reason})

    def _revoked(self, names: set[str]) -> None:
        """Join tokens newly seen revoked (the store's sync): drain and forget their
        nodes that this process knows, in the background."""
        task = asyncio.get_running_loop().create_task(self.forget_nodes_of(names))
        self._sweeps.add(task)
        task.add_done_callback(self._sweeps.discard)

    async def forget_nodes_of(self, names: set[str]) -> list[str]:
        """Drain, then forget, every node these join tokens registered (through the
        store, so every replica forgets them); their ids."""
        gone = []
        for name in sorted(names):
            for node in self.store.joined_by(name):
                node.drained = True
                try:
                    await self.store.set_state(
                        node.id, NodeState.DRAINING, f"join token {name} revoked"
                    )
                except KeyError:  # forgotten meanwhile (another replica's removal)
                    continue
                await self.store.remove(node.id)
                gone.append(node.id)
        if gone:
            log.warning(
                "forgot %d node(s) of revoked join token(s): %s", len(gone), ", ".join(gone)
            )
        return gone

    async def delete(self, request: web.Request) -> web.Response:
        node = await self._admin_node(request)
        if isinstance(node, web.Response):
            return node
        await self.store.remove(node.id)
        return web.json_response({"id": node.id, "removed": True})
