"""The HTTP application: routes, start-up and shutdown, and the serve loop."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from random import Random
from typing import Any

import orjson
from aiohttp import ClientSession, TCPConnector, web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server
from prometheus_client import CONTENT_TYPE_LATEST

from policies import Policy, PolicyError, build_policy
from router import ui
from router.addresses import AddressRules, GuardedResolver, hosts_of
from router.config import Config, ConfigError, load_config
from router.errors import ROUTER_NODE, error_body, error_response, invalid_key
from router.fleet import Fleet
from router.health import HealthMonitor
from router.keyadmin import JoinTokenAdmin, KeyAdmin
from router.logs import AccessLog
from router.measure import Meter
from router.metrics import Metrics
from router.pools import Pools
from router.prober import Prober
from router.proxy import Proxy
from router.recorder import Recorder
from router.registration import Membership, admin_denied
from router.store import MemoryStore, StateStore, codec, health
from router.tenants import Keyring
from router.upstream import Upstream
from router.view import fleet_view

log = logging.getLogger("ballast")

INFERENCE_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


@dataclass
class Router:
    """Everything one router process holds, resolved from config once."""

    cfg: Config
    fleet: Fleet
    meter: Meter
    proxy: Proxy
    metrics: Metrics
    store: StateStore
    recorder: Recorder
    admin_token: str | None
    membership: Membership
    keys: KeyAdmin
    health: HealthMonitor
    prober: Prober | None
    clock: Callable[[], float]
    config_path: Path | None = None
    draining: bool = False  # SIGTERM received: /readyz fails, connections close after use
    _models: list[str] = field(default_factory=list)
    _models_body: bytes = b""
    _models_version: int = -1
    _background: set[asyncio.Task[None]] = field(default_factory=set)

    def models_body(self, allowed: frozenset[str] = frozenset()) -> bytes:
        """``GET /v1/models``: the models served and their aliases, only those of the
        models in ``allowed`` when it is not empty (a key's allow-list)."""
        if self._models_version != self.fleet.version:
            served = self.fleet.served_models()
            aliases = sorted(a for a, m in self.fleet.aliases.items() if m in set(served))
            self._models = [*served, *aliases]  # a model's aliases are names to ask for
            self._models_body = _model_list(self._models)
            self._models_version = self.fleet.version
        if allowed:
            named = self.fleet.aliases
            return _model_list([m for m in self._models if named.get(m, m) in allowed])
        return self._models_body

    def swap_policy(self, name: str, params: dict[str, object]) -> Policy:
        """Replace the policy; requests already ranked keep their order."""
        policy = build_policy(name, params)
        self.proxy.policy = policy
        return policy

    def adopt_policy(self, name: str, params: dict[str, object]) -> None:
        """A policy change made on another router process (through the store)."""
        try:
            self.swap_policy(name, params)
        except PolicyError as e:
            log.error("ignoring a shared policy change: %s", e)
            return
        log.warning("policy %s adopted from the shared store", name)

    def reload(self) -> None:
        """SIGHUP: re-read the config file, apply (and share) its policy, and name the
        sections that changed but take effect only after a restart."""
        if self.config_path is None:
            return
        try:
            cfg = load_config(self.config_path)
            self.swap_policy(cfg.policy.name, cfg.policy.params)
        except (ConfigError, PolicyError) as e:
            log.error("reload failed, keeping the current config: %s", e)
            return
        pending = [
            name
            for name in type(cfg).model_fields
            if name != "policy"
            and getattr(cfg, name) != getattr(self.cfg, name)
            and not (name == "listen" and cfg.listen.host == self.cfg.listen.host)  # --port
        ]
        log.warning(
            "reloaded %s: policy %s applied%s", self.config_path, cfg.policy.name,
            f"; changed but applied only after a restart: {', '.join(pending)}" if pending else "",
        )  # fmt: skip
        task = asyncio.get_running_loop().create_task(
            self.store.publish_policy(cfg.policy.name, cfg.policy.params)
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)


ROUTER = web.AppKey("router", Router)


def _model_list(models: Iterable[str]) -> bytes:
    data = [{"id": m, "object": "model", "created": 0, "owned_by": "ballast"} for m in models]
    return orjson.dumps({"object": "list", "data": data})


def warn_if_open(router: Router) -> None:
    """At start: say so when ``/metrics`` answers anyone who can reach it."""
    if router.cfg.metrics.enabled and router.metrics.token is None:
        log.warning(
            "/metrics is open to anyone who can reach the router: it shows node ids, client "
            "key names and per-key counts; set metrics.token_env to require a token"
        )


class ListenError(Exception):
    """The listening socket could not be opened (the message says what to do)."""


STARTUP_PROBE_S = 3.0  # longest wait at start for the first probes of static nodes
DRAIN_POLL_S = 0.05  # how often a drain looks whether requests in flight have finished
GC_GEN0 = 20_000  # allocations between young-generation collections (CPython's default: 700)


def make_store(cfg: Config, clock: Callable[[], float]) -> StateStore:
    """Redis when configured (URL or Sentinel), else the in-process store."""
    ttl, verify = cfg.registry.heartbeat_ttl_s, cfg.health.probe
    retention = cfg.registry.gone_retention_s
    if cfg.state.redis_url or cfg.state.sentinel:
        from router.store.redis import RedisStore

        return RedisStore(
            cfg.state, cfg.scoring, ttl, verify=verify, retention_s=retention, clock=clock
        )
    return MemoryStore(ttl, verify=verify, retention_s=retention, path=cfg.state.path)


def build_router(
    cfg: Config,
    *,
    session: ClientSession,
    fresh: ClientSession | None = None,
    clock: Callable[[], float] = time.monotonic,
    rng: Random | None = None,
    config_path: Path | None = None,
) -> Router:
    fleet = Fleet(slow_start_s=cfg.health.slow_start_s, clock=clock)
    fleet.locality_label = cfg.locality.label
    fleet.aliases = cfg.aliases
    if cfg.pools is not None:
        fleet.pools = Pools(cfg.pools, rng)
    verify = cfg.health.verify_static and cfg.health.probe
    with fleet.batch():
        for nc in cfg.nodes:
            fleet.add(codec.from_config(nc, cfg.scoring, verify))
    meter = Meter(clock, cfg.scoring.failure_penalty_s)
    policy = build_policy(cfg.policy.name, cfg.policy.params)
    recorder = Recorder()
    upstream = Upstream(cfg, session, meter, fresh)
    keys = Keyring(cfg.auth, os.environ, clock, aliases=cfg.aliases)
    proxy = Proxy(cfg, fleet, policy, upstream, rng=rng, record=recorder, keys=keys)
    store = make_store(cfg, clock)
    store.keyring = keys
    health = HealthMonitor(cfg.health, fleet, meter.signals, store, clock)
    prober = Prober(cfg.health, fleet, store, upstream, clock) if cfg.health.probe else None
    metrics = Metrics(
        fleet, store, lambda: proxy.active, cfg.metrics, cfg.models, clock, proxy, health, prober
    )
    if cfg.metrics.enabled:
        # Per worker, a scrape drains only its own batch: count at once there.
        (recorder.immediate if metrics.multiprocess else recorder.observers).append(metrics.observe)
    if cfg.logging.access_log:
        recorder.observers.append(AccessLog(fmt=cfg.logging.format))
    admin_token = os.environ.get(cfg.admin.token_env) if cfg.admin.token_env else None
    join_token = (
        os.environ.get(cfg.registry.join_token_env) if cfg.registry.join_token_env else None
    )
    router = Router(
        cfg=cfg,
        fleet=fleet,
        meter=meter,
        proxy=proxy,
        metrics=metrics,
        store=store,
        recorder=recorder,
        admin_token=admin_token,
        membership=Membership(cfg, store, join_token, admin_token),
        keys=KeyAdmin(keys, store, admin_token),
        health=health,
        prober=prober,
        clock=clock,
        config_path=config_path,
    )
    store.on_policy = router.adopt_policy
    return router


def new_session(cfg: Config, pooled: bool = True) -> ClientSession:
    """One pooled client for every node: keep-alive, no total connection cap. With
    ``pooled`` false, a new connection for every request (see ``Upstream``). Its
    resolver refuses addresses a self-registered node may not have
    (:mod:`router.addresses`); it adds no User-Agent or Accept-Encoding of its own."""
    resolver = GuardedResolver(AddressRules.of(cfg), hosts_of(n.url for n in cfg.nodes))
    reuse: dict[str, Any] = {"keepalive_timeout": 30} if pooled else {"force_close": True}
    connector = TCPConnector(limit=0, ttl_dns_cache=60, resolver=resolver, **reuse)
    return ClientSession(
        connector=connector,
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding"),
    )


class EnvelopeHandler(RequestHandler):
    """aiohttp's connection handler, answering requests it cannot parse (header
    too long, malformed request line) in the API's error envelope, with at most a
    short prefix of what it got, and logging them in one line."""

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:
            self.log_exception("error handling request", exc_info=exc)
            text, type_, code = "internal error in the router", "server_error", "internal_error"
        else:
            why = (message or str(exc or "malformed request")).splitlines()[0][:120]
            log.info("refused a malformed HTTP request: %s", why)
            text, type_, code = (
                f"malformed HTTP request: {why}",
                "invalid_request_error",
                "bad_http",
            )
        if request.writer.output_size > 0:
            raise ConnectionError("the answer had started; cannot send an error")
        resp = web.Response(
            status=status, body=error_body(text, type_, code), content_type="application/json"
        )
        resp.force_close()
        return resp


class _EnvelopeServer(Server):
    def __call__(self) -> RequestHandler:
        return EnvelopeHandler(self, loop=self._loop, **self._kwargs)


class Runner(web.AppRunner):
    """The app runner with Ballast's connection handling: errors in the envelope,
    header limits, and idle connections closed after ``limits.idle_timeout_s``."""

    def __init__(self, app: web.Application, cfg: Config, **kwargs: object) -> None:
        limits = cfg.limits
        super().__init__(
            app,
            access_log=None,
            handler_cancellation=True,
            keepalive_timeout=limits.idle_timeout_s,
            max_line_size=limits.max_header_bytes,
            max_field_size=limits.max_header_bytes,
            lingering_time=1.0,  # after an early answer (408, 413), unread body bytes
            **kwargs,
        )

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        server.__class__ = _EnvelopeServer
        return server


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
        async with new_session(cfg) as session, new_session(cfg, pooled=False) as fresh:
            router = app[ROUTER] = build_router(
                cfg, session=session, fresh=fresh, clock=clock, rng=rng, config_path=config_path
            )
            await router.store.start(router.fleet, router.meter.signals)
            router.health.start()
            if router.prober is not None:
                router.prober.start()
                # A healthy fleet is verified in milliseconds: start serving once it is
                # (a node that hangs its first probe delays the start by STARTUP_PROBE_S).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(cfg.health.probe_timeout_s, STARTUP_PROBE_S)):
                        await router.prober.settled.wait()
            router.recorder.start()
            router.metrics.start()
            yield
            await router.recorder.stop()
            await router.metrics.stop()
            await router.proxy.gate.close()
            if router.prober is not None:
                await router.prober.stop()
            await router.health.stop()
            await router.store.close()

    app.cleanup_ctx.append(pool)

    async def inference(request: web.Request) -> web.StreamResponse:
        router = request.app[ROUTER]
        response = await router.proxy.handle(request)
        if router.draining:  # the client's next request opens a connection elsewhere
            response.force_close()
        return response

    async def models(request: web.Request) -> web.Response:
        router = request.app[ROUTER]
        keys = router.proxy.keys
        key = keys.lookup(request.headers) if keys.active else None
        if isinstance(key, str):  # as an inference request with that key would be
            return invalid_key(key)
        body = router.models_body(key.models if key is not None else frozenset())
        return web.Response(body=body, content_type="application/json", headers=ROUTER_NODE)

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        """Whether this process takes traffic: it is up, its config and first state are
        loaded (it answers only then), and it is not draining. A store outage leaves it
        ready (the request path never waits on the store) and a fleet without routable
        nodes too (requests then queue and get 503 with Retry-After): both are reported
        here and in the metrics, for alerts, not for the load balancer."""
        router = request.app[ROUTER]
        n = router.fleet.routable_count()
        store = health(router.store)
        body: dict[str, object] = {
            "status": "draining" if router.draining else "ready",
            "routable_nodes": n,
            "store": store,
        }
        # The detail is the operator's (the admin token); without it, the plain answer.
        if "verbose" in request.query and admin_denied(request, router.admin_token) is None:
            body["routers"] = len(router.store.routers)
            body["models"] = router.fleet.supply_by_model()
        return web.json_response(body, status=503 if router.draining else 200)

    async def metrics(request: web.Request) -> web.Response:
        router = request.app[ROUTER]
        if (denied := router.metrics.denied(request)) is not None:
            return denied
        router.recorder.flush()
        body = await router.metrics.render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def admin_nodes(request: web.Request) -> web.Response:
        router = request.app[ROUTER]
        if (denied := admin_denied(request, router.admin_token)) is not None:
            return denied
        view = fleet_view(router.fleet.nodes.values(), router.proxy.policy, router.clock())
        return web.Response(body=orjson.dumps(view), content_type="application/json")

    async def put_policy(request: web.Request) -> web.Response:
        router = request.app[ROUTER]
        if (denied := admin_denied(request, router.admin_token)) is not None:
            return denied
        try:
            doc = orjson.loads(await request.read())
            name, params = doc["name"], doc.get("params") or {}
            if not isinstance(name, str) or not isinstance(params, dict):
                raise TypeError
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return error_response(
                400, 'body must be {"name": str, "params": {...}}', "invalid_request_error",
                "invalid_policy",
            )  # fmt: skip
        try:
            router.swap_policy(name, params)
        except PolicyError as e:
            return error_response(400, str(e), "invalid_request_error", "invalid_policy")
        await router.store.publish_policy(name, params)
        log.warning("policy switched to %s through the admin API", name)
        return web.json_response({"policy": name, "params": params})

    async def status_page(request: web.Request) -> web.Response:
        return web.Response(
            body=ui.PAGE_BODY, content_type="text/html", charset="utf-8", headers=ui.PAGE_HEADERS
        )

    async def admin_status(request: web.Request) -> web.Response:
        router = request.app[ROUTER]
        if (denied := admin_denied(request, router.admin_token)) is not None:
            return denied
        return web.Response(body=orjson.dumps(ui.status(router)), content_type="application/json")

    async def get_policy(request: web.Request) -> web.Response:
        router = request.app[ROUTER]
        if (denied := admin_denied(request, router.admin_token)) is not None:
            return denied
        return web.json_response({"policy": router.proxy.policy.name})

    async def fallback(request: web.Request) -> web.Response:
        if request.path in INFERENCE_PATHS or request.path == "/v1/models":
            return error_response(
                405, f"method {request.method} not allowed", "invalid_request_error", "bad_method"
            )
        return error_response(
            404, f"unknown path {request.path[:128]}", "invalid_request_error", "unknown_url"
        )

    for path in INFERENCE_PATHS:
        app.router.add_post(path, inference)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/health", healthz)  # as vLLM, SGLang, TGI and llama.cpp serve it
    app.router.add_get("/readyz", readyz)
    if cfg.metrics.enabled:
        app.router.add_get("/metrics", metrics)
    app.router.add_get("/admin/nodes", admin_nodes)
    app.router.add_get("/admin/status", admin_status)
    app.router.add_get("/ui", status_page)
    app.router.add_put("/admin/policy", put_policy)
    app.router.add_get("/admin/policy", get_policy)

    for method, path, name in KeyAdmin.ROUTES:
        app.router.add_route(method, path, delegate("keys", name))
    for method, path, name in JoinTokenAdmin.ROUTES:
        app.router.add_route(method, path, delegate("membership.token_admin", name))
    app.router.add_post("/v1/nodes/register", delegate("membership", "register"))
    app.router.add_post("/v1/nodes/{id}/heartbeat", delegate("membership", "heartbeat"))
    app.router.add_post("/admin/nodes/{id}/drain", delegate("membership", "drain"))
    app.router.add_post("/admin/nodes/{id}/resume", delegate("membership", "resume"))
    app.router.add_delete("/admin/nodes/{id}", delegate("membership", "delete"))
    app.router.add_route("*", "/{tail:.*}", fallback)
    return app


def delegate(part: str, name: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """A route handler calling ``<part>.<name>`` of the running router (its
    ``membership``, its ``keys``, or a dotted path such as ``membership.token_admin``)."""
    path = part.split(".")

    async def handler(request: web.Request) -> web.StreamResponse:
        target: Any = request.app[ROUTER]
        for attr in path:
            target = getattr(target, attr)
        return await getattr(target, name)(request)

    return handler


async def serve(
    cfg: Config,
    config_path: Path | None = None,
    *,
    ready: Callable[[int], None] | None = None,
    stop: asyncio.Event | None = None,
    reuse_port: bool = False,
) -> None:
    """Run until SIGINT/SIGTERM (or ``stop``), then drain (see :func:`drain`); SIGHUP
    reloads the config file."""
    app = create_app(cfg, config_path)
    runner = Runner(app, cfg, shutdown_timeout=1.0)  # after drain(): what is left is cut
    await runner.setup()
    site = web.TCPSite(
        runner, cfg.listen.host, cfg.listen.port, backlog=2048, reuse_port=reuse_port or None
    )
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        where = f"{cfg.listen.host}:{cfg.listen.port}"
        hint = "another process holds it; stop it or choose another port with --port"
        if e.errno != errno.EADDRINUSE:
            hint = "check listen.host and listen.port"
        raise ListenError(f"cannot listen on {where}: {e.strerror}; {hint}") from None
    port = runner.addresses[0][1]
    # What start-up built lives as long as the process: keep the cyclic garbage
    # collector off it, and let it run less often (requests make few cycles).
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0, 20, 20)
    stop = stop or asyncio.Event()
    signals: list[int] = []

    def on_signal(sig: int) -> None:
        signals.append(sig)
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    loop.add_signal_handler(signal.SIGHUP, app[ROUTER].reload)
    log.info("ballast listening on http://%s:%d", cfg.listen.host, port)
    warn_if_open(app[ROUTER])
    if ready is not None:
        ready(port)
    try:
        await stop.wait()
        stop.clear()
        # Ctrl-C is someone at a terminal: no load balancer to wait for.
        grace = 0.0 if signals[:1] == [signal.SIGINT] else cfg.shutdown.grace_s
        await drain(app[ROUTER], runner, grace, stop)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await runner.cleanup()


async def drain(router: Router, runner: web.AppRunner, grace: float, again: asyncio.Event) -> None:
    """Graceful stop. For ``grace`` seconds (``shutdown.grace_s``) keep serving while
    ``/readyz`` fails and every answer closes its connection, so load balancers move
    new requests elsewhere; a second signal cuts that short. Then stop accepting,
    close idle connections, and give requests in flight ``shutdown.drain_s`` to
    finish; streams still running then end with an error event."""
    router.draining = True
    proxy, drain_s = router.proxy, router.cfg.shutdown.drain_s
    log.info(
        "draining: not ready; accepting for %.0f s, then %.0f s for %d request(s) in flight",
        grace, drain_s, proxy.active,
    )  # fmt: skip
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(again.wait(), grace)
    for site in list(runner.sites):
        await site.stop()
    if runner.server is not None:
        runner.server.pre_shutdown()  # idle keep-alive connections close now
    end = time.monotonic() + drain_s
    while proxy.active and time.monotonic() < end:  # noqa: ASYNC110 - once, at exit
        await asyncio.sleep(DRAIN_POLL_S)
    if ended := proxy.deliver.end_streams():
        log.warning("drain time over: %d stream(s) ended with an error event", ended)
        await asyncio.wait(list(proxy.deliver.streams), timeout=1.0)
    if proxy.active:
        log.warning("drain time over: %d request(s) cut", proxy.active)
