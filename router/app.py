"""The HTTP application: routes, start-up and shutdown, and the serve loop."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from random import Random

import orjson
from aiohttp import ClientSession, TCPConnector, web

from policies import Policy, PolicyError, build_policy
from router.config import Config, ConfigError, load_config
from router.errors import error_response
from router.nodes import Node, Registry
from router.proxy import Exchange, Proxy

log = logging.getLogger("ballast")

INFERENCE_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


@dataclass
class Router:
    """Everything one router process holds, resolved from config once."""

    cfg: Config
    registry: Registry
    proxy: Proxy
    config_path: Path | None = None
    observers: list[Callable[[Exchange], None]] = field(default_factory=list)
    _models_body: bytes = b""
    _models_version: int = -1

    def models_body(self) -> bytes:
        if self._models_version != self.registry.version:
            data = [
                {"id": m, "object": "model", "created": 0, "owned_by": "ballast"}
                for m in self.registry.served_models()
            ]
            self._models_body = orjson.dumps({"object": "list", "data": data})
            self._models_version = self.registry.version
        return self._models_body

    def swap_policy(self, name: str, params: dict[str, object]) -> Policy:
        """Replace the policy; requests already ranked keep their order."""
        policy = build_policy(name, params)
        self.proxy.policy = policy
        return policy

    def reload(self) -> None:
        """SIGHUP: re-read the config file and apply the policy from it."""
        if self.config_path is None:
            return
        try:
            cfg = load_config(self.config_path)
            self.swap_policy(cfg.policy.name, cfg.policy.params)
        except (ConfigError, PolicyError) as e:
            log.error("reload failed, keeping the current policy: %s", e)
            return
        log.warning("reloaded %s: policy %s", self.config_path, cfg.policy.name)


ROUTER = web.AppKey("router", Router)


def build_router(
    cfg: Config,
    *,
    session: ClientSession,
    clock: Callable[[], float] = time.monotonic,
    rng: Random | None = None,
    config_path: Path | None = None,
) -> Router:
    registry = Registry()
    for nc in cfg.nodes:
        registry.add(Node.from_config(nc, cfg.scoring))
    policy = build_policy(cfg.policy.name, cfg.policy.params)
    proxy = Proxy(cfg, registry, policy, session, clock=clock, rng=rng)
    return Router(cfg=cfg, registry=registry, proxy=proxy, config_path=config_path)


def new_session() -> ClientSession:
    """One pooled client for every node: keep-alive, no total connection cap."""
    connector = TCPConnector(limit=0, keepalive_timeout=30, ttl_dns_cache=60)
    return ClientSession(
        connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent",)
    )


def create_app(
    cfg: Config,
    config_path: Path | None = None,
    *,
    clock: Callable[[], float] = time.monotonic,
    rng: Random | None = None,
) -> web.Application:
    """The aiohttp application; the client pool opens on start-up and closes on cleanup."""
    app = web.Application(client_max_size=cfg.limits.max_body_bytes)

    async def pool(app: web.Application) -> AsyncIterator[None]:
        async with new_session() as session:
            app[ROUTER] = build_router(
                cfg, session=session, clock=clock, rng=rng, config_path=config_path
            )
            yield

    app.cleanup_ctx.append(pool)

    async def inference(request: web.Request) -> web.StreamResponse:
        return await request.app[ROUTER].proxy.handle(request)

    async def models(request: web.Request) -> web.Response:
        body = request.app[ROUTER].models_body()
        return web.Response(body=body, content_type="application/json")

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        n = request.app[ROUTER].registry.routable_count()
        body = {"status": "ready" if n else "not_ready", "routable_nodes": n, "store": "memory"}
        return web.json_response(body, status=200 if n else 503)

    async def fallback(request: web.Request) -> web.Response:
        if request.path in INFERENCE_PATHS or request.path == "/v1/models":
            return error_response(
                405, f"method {request.method} not allowed", "invalid_request_error", "bad_method"
            )
        return error_response(
            404, f"unknown path {request.path}", "invalid_request_error", "unknown_url"
        )

    for path in INFERENCE_PATHS:
        app.router.add_post(path, inference)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_route("*", "/{tail:.*}", fallback)
    return app


async def serve(
    cfg: Config,
    config_path: Path | None = None,
    *,
    ready: Callable[[int], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run until SIGINT/SIGTERM (or ``stop``); SIGHUP reloads the policy."""
    app = create_app(cfg, config_path)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=30)
    await runner.setup()
    site = web.TCPSite(runner, cfg.listen.host, cfg.listen.port, backlog=2048)
    await site.start()
    port = runner.addresses[0][1]
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, app[ROUTER].reload)
    log.warning("ballast listening on http://%s:%d", cfg.listen.host, port)
    if ready is not None:
        ready(port)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await runner.cleanup()
