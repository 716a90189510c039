"""The ``ballast`` command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import orjson

from router.config import Config, ConfigError, load_config
from router.logs import printable


def _run(coro: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        runner = asyncio.Runner()
    from router.app import ListenError

    with runner:
        try:
            runner.run(coro)
        except ListenError as e:
            raise SystemExit(f"ballast: {e}") from None


def command() -> str:
    """How to run this command again, as the user started it."""
    if Path(sys.argv[0]).name == "ballast":
        return sys.argv[0]
    return f"{sys.executable} -m router.cli"


def _load(path: str) -> Any:
    try:
        return load_config(path)
    except ConfigError as e:
        n = len(e.problems)
        found = f" ({n} problem{'s' if n != 1 else ''})" if n else ""
        print(f"ballast: invalid config {path}{found}:\n{e}", file=sys.stderr)
        raise SystemExit(2) from None


@contextlib.contextmanager
def reader_may_leave() -> Iterator[None]:
    """Output a reader may stop reading (``ballast nodes --watch | head``): when it
    leaves, stop quietly, with status 0. Python's documented recipe for EPIPE: stdout
    then points at /dev/null, so that the flush at exit does not fail again."""
    try:
        yield
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def cmd_serve(args: argparse.Namespace) -> None:
    made = None
    if args.workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        # Before prometheus_client is first imported: it picks its storage then.
        made = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="ballast-metrics-")
    from router.app import serve
    from router.logs import setup_logging

    cfg = _load(args.config)
    if args.port is not None:
        cfg = cfg.model_copy(update={"listen": cfg.listen.model_copy(update={"port": args.port})})
    setup_logging(cfg.logging.level, cfg.logging.format)
    if args.workers <= 1:
        _run(serve(cfg, Path(args.config)))
        return
    try:
        code = _serve_workers(args, cfg)
    finally:
        if made is not None:  # a directory the caller named is theirs
            shutil.rmtree(made, ignore_errors=True)
    raise SystemExit(code)


def _serve_workers(args: argparse.Namespace, cfg: Config) -> int:
    from router.app import serve
    from router.workers import run_workers

    if cfg.listen.port == 0:
        raise SystemExit("ballast: --workers needs a fixed listen.port")
    try:  # one line now, rather than every worker failing to bind and restarting
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            probe.bind((cfg.listen.host, cfg.listen.port))
    except OSError as e:
        raise SystemExit(
            f"ballast: cannot listen on {cfg.listen.host}:{cfg.listen.port}: {e.strerror}; "
            "another process holds it; stop it or choose another port with --port"
        ) from None
    if cfg.state.path and not (cfg.state.redis_url or cfg.state.sentinel):
        raise SystemExit(
            "ballast: --workers with state.path and no Redis: each worker would keep its "
            "own keys, revocations and budgets in one file; use one process, or Redis"
        )
    if not (cfg.state.redis_url or cfg.state.sentinel):
        logging.getLogger("ballast").warning(
            "--workers %d without state.redis_url: each worker routes on what it alone has "
            "seen and registrations reach only the worker that received them",
            args.workers,
        )
    return run_workers(args.workers, lambda: _run(serve(cfg, Path(args.config), reuse_port=True)))


def cmd_demo(args: argparse.Namespace) -> None:
    from loadtest.demo import run_demo
    from router.logs import setup_logging

    setup_logging("warning", "text")
    _run(run_demo(args.host, args.port))


def cmd_policies(args: argparse.Namespace) -> None:
    from policies import POLICIES

    width = max(len(n) for n in POLICIES)
    with reader_may_leave():
        for name in sorted(POLICIES):
            print(f"{name:<{width}}  {POLICIES[name].description}")


def cmd_check_config(args: argparse.Namespace) -> None:
    cfg = _load(args.config)
    if cfg.state.sentinel:
        state = f"redis sentinel {cfg.state.sentinel.service}"
    elif cfg.state.redis_url:
        state = "redis cluster" if cfg.state.cluster else "redis"
    else:
        state = "in-memory"
    print(
        f"{args.config}: ok ({len(cfg.nodes)} static node(s), policy {cfg.policy.name}, "
        f"state {state})"
    )


def admin_call(
    router: str, token: str | None, path: str, method: str = "GET", body: object = None
) -> Any:
    """One admin API call; any failure exits with one line saying what to do."""
    data = orjson.dumps(body) if body is not None else None
    req = urllib.request.Request(router.rstrip("/") + path, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return orjson.loads(resp.read())
    except urllib.error.HTTPError as e:
        try:
            message = orjson.loads(e.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = e.reason
        hint = ""
        if e.code == 401:
            hint = "; pass --admin-token or set BALLAST_ADMIN_TOKEN to the router's admin token"
        elif e.code == 404 and "admin API is off" in str(message):
            hint = "; the router needs admin.token_env set, or --router points elsewhere"
        raise SystemExit(printable(f"ballast: {router}: HTTP {e.code}: {message}{hint}")) from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        why = getattr(e, "reason", e)
        raise SystemExit(
            printable(
                f"ballast: cannot reach {router}: {why}; is the router running? (--router URL)"
            )
        ) from None


def fetch_fleet(router: str, token: str | None) -> dict[str, Any]:
    return admin_call(router, token, "/admin/nodes")


def table(rows: list[list[str]], header: list[str]) -> str:
    cells = [header, *([printable(c) for c in r] for r in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in cells)  # fmt: skip


KEY_FIELDS = ("name", "priority", "rpm", "tpm", "max_parallel", "budget_tokens", "budget_period",
              "region")  # fmt: skip
KEY_LISTS = ("models", "pools")


def key_spec(args: argparse.Namespace, update: bool) -> dict[str, Any]:
    """The key fields the flags give: for ``create`` those set; for ``update`` those
    given (the others are left out, so the key keeps them), ``none`` sent as null."""
    given = vars(args)
    spec = {f: given[f] for f in KEY_FIELDS if f in given and (update or given[f] is not None)}
    for f in KEY_LISTS:
        if f in given and (update or given[f]):  # update: an empty list means all
            spec[f] = [m for m in given[f].split(",") if m]
    return spec


def key_field(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(value) or "*"
    return "none" if value is None else str(value)


def cmd_keys(args: argparse.Namespace) -> None:
    if args.action == "create":
        spec = key_spec(args, update=False)
        doc = admin_call(args.router, args.admin_token, "/admin/keys", "POST", spec)
        print(doc["key"])
        print(f"key {doc['name']} ({doc['id']}): shown once, keep it now", file=sys.stderr)
    elif args.action == "update":
        spec = key_spec(args, update=True)
        if not spec:
            print("ballast keys update: nothing to change (see --help)", file=sys.stderr)
            raise SystemExit(2)
        path = "/admin/keys/" + urllib.parse.quote(args.key, safe="")
        doc = admin_call(args.router, args.admin_token, path, "PATCH", spec)
        changed = ", ".join(f"{f} {key_field(doc.get(f))}" for f in spec if f != "name")
        print(f"updated {doc['name']} ({doc['id']})" + (f": {changed}" if changed else ""))
    elif args.action == "list":
        doc = admin_call(args.router, args.admin_token, "/admin/keys")
        rows = [
            [k["name"], k["id"], k["prefix"] or "-", k["source"], k["priority"],
             str(k["rpm"] or "-"), str(k["tpm"] or "-"), str(k["max_parallel"] or "-"),
             ",".join(k["models"]) or "*"]
            for k in doc["data"]
        ]  # fmt: skip
        header = ["NAME", "ID", "PREFIX", "SOURCE", "PRIORITY", "RPM", "TPM", "PARALLEL", "MODELS"]
        with reader_may_leave():
            print(table(rows, header))
    else:
        doc = admin_call(args.router, args.admin_token, f"/admin/keys/{args.name}", "DELETE")
        print(f"revoked {doc['name']} ({doc['id']})")


def cmd_usage(args: argparse.Namespace) -> None:
    query = urllib.parse.urlencode(
        {k: v for k, v in (("key", args.key), ("since", args.since)) if v}
    )
    doc = admin_call(args.router, args.admin_token, "/admin/usage" + (f"?{query}" if query else ""))
    rows = [
        [r["key"], r["model"], str(r["requests"]), str(r["errors"]), str(r["prompt_tokens"]),
         str(r["completion_tokens"])]
        for r in doc["data"]
    ]  # fmt: skip
    header = ["KEY", "MODEL", "REQUESTS", "ERRORS", "PROMPT_TOKENS", "COMPLETION_TOKENS"]
    with reader_may_leave():
        print(f"since {doc['since']} (UTC)")
        print(table(rows, header))


DURATION = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_s(text: str) -> float:
    """``90s``, ``15m``, ``12h``, ``30d`` (or plain seconds) in seconds, for argparse."""
    unit = DURATION.get(text[-1:].lower())
    try:
        value = float(text[:-1] if unit else text) * (unit or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a duration such as 12h or 30d") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be more than 0")
    return value


def cmd_tokens(args: argparse.Namespace) -> None:
    if args.action == "create":
        spec: dict[str, Any] = {"name": args.name}
        if args.models:
            spec["models"] = [m for m in args.models.split(",") if m]
        for field in ("pool", "max_nodes"):
            if getattr(args, field) is not None:
                spec[field] = getattr(args, field)
        if args.expires_in is not None:
            spec["expires_in_s"] = args.expires_in
        doc = admin_call(args.router, args.admin_token, "/admin/join-tokens", "POST", spec)
        print(doc["token"])
        print(f"join token {doc['name']} ({doc['id']}): shown once, keep it now", file=sys.stderr)
    elif args.action == "list":
        doc = admin_call(args.router, args.admin_token, "/admin/join-tokens")
        rows = []
        for t in doc["data"]:
            expires = t.get("expires_at")
            when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(expires)) if expires else "-"
            rows.append(
                [t["name"], t["id"], t.get("prefix") or "-", t["state"],
                 ",".join(t.get("models") or []) or "*", t.get("pool") or "-",
                 str(t["nodes"]), str(t.get("max_nodes") or "-"), when]
            )  # fmt: skip
        header = ["NAME", "ID", "PREFIX", "STATE", "MODELS", "POOL", "NODES", "MAX", "EXPIRES"]
        with reader_may_leave():
            print(table(rows, header))
    else:
        path = f"/admin/join-tokens/{urllib.parse.quote(args.name, safe='')}"
        doc = admin_call(args.router, args.admin_token, path, "DELETE")
        n = len(doc["nodes"])
        print(f"revoked {doc['name']} ({doc['id']}): {n} node(s) drained and forgotten")


def render_fleet(doc: dict[str, Any]) -> str:
    cols = [
        ("NODE", "id"),
        ("GPU", "gpu"),
        ("STATE", "state"),
        ("REASON", "reason"),
        ("MODELS", "models"),
        ("ENGINE", "engine"),
        ("INFL", "in_flight"),
        ("LAT_MS", "latency_ms"),
        ("SUCCESS", "success_ratio"),
        ("ROUTE_COST", "cost"),
        ("SHARE", "share"),
        ("AFFINITY", "affinity_share"),
        ("POOL", "pool"),
        ("TOKEN", "join_token"),
        ("PRICE", "price"),
        ("SPEND", "spent_share"),
    ]

    def cell(row: dict[str, Any], key: str) -> str:
        v = row.get(key)
        if key == "models":
            return ",".join(v or [])
        if key in ("share", "affinity_share", "spent_share"):
            return f"{(v or 0) * 100:.1f}%"
        if key == "price":
            mtok, hour = row.get("price_per_mtok"), row.get("price_per_hour")
            return f"{mtok:g}/Mtok" if mtok else f"{hour:g}/h" if hour else "-"
        if key in ("cost", "latency_ms", "success_ratio") and not row.get("requests"):
            return "-"  # untried: its estimates are priors, not measurements
        if key == "success_ratio":
            return f"{v:.3f}"
        if key == "cost":
            return f"{v:.4g}"
        if key == "latency_ms":
            return f"{v:.1f}"
        return "-" if v is None else str(v)

    rows = [[printable(cell(r, k)) for _, k in cols] for r in doc["nodes"]]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, (h, _) in enumerate(cols)]
    lines = ["  ".join(h.ljust(w) for (h, _), w in zip(cols, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    parts = []
    for name, s in doc["summary"].items():
        parts.append(f"{name} {s['nodes']} nodes / {s['gpus']} GPUs / {s['vram_gb']:g} GB")
    lines.append("supply: " + " | ".join(parts))
    return "\n".join(lines)


def cmd_nodes(args: argparse.Namespace) -> None:
    with reader_may_leave():
        while True:
            doc = fetch_fleet(args.router, args.admin_token)
            if args.json:
                print(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode(), flush=True)
            else:
                if args.watch and sys.stdout.isatty():  # clear the screen, not a pipe
                    print("\033[2J\033[H", end="")
                print(render_fleet(doc), flush=True)
            if not args.watch:
                return
            time.sleep(args.interval)


def cmd_agent(args: argparse.Namespace) -> None:
    from router.agent import AgentConfig, AgentError, node_claims, read_file, run_agent
    from router.logs import setup_logging

    def invalid(message: str) -> SystemExit:
        print(printable(f"ballast agent: {message}"), file=sys.stderr)
        return SystemExit(2)

    if not args.join_token:
        raise invalid("--join-token (or $BALLAST_JOIN_TOKEN) is required")
    names = ("gpu", "gpus", "vram_gb", "price_per_mtok", "price_per_hour", "engine", "region",
             "max_concurrency")  # fmt: skip
    flags = {"id": args.id or socket.gethostname(), **{k: getattr(args, k) for k in names}}
    try:
        file = read_file(Path(args.file)) if args.file else {}
        claims = node_claims(file, flags, args.label or [])
    except AgentError as e:
        raise invalid(str(e)) from None
    setup_logging("warning", "text")
    cfg = AgentConfig(
        router=args.router,
        node_url=args.node_url,
        node_id=claims.id or socket.gethostname(),
        join_token=args.join_token,
        models=[m for m in (args.models or "").split(",") if m],
        gpu=claims.gpu,
        gpus=claims.gpus,
        vram_gb=claims.vram_gb,
        interval_s=args.interval,
        secret_file=Path(args.secret_file) if args.secret_file else None,
        claims=claims.model_dump(exclude={"id", "gpu", "gpus", "vram_gb"}, exclude_none=True),
    )
    _run(run_agent(cfg))


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("ballast")
    except PackageNotFoundError:
        return "(not installed)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="ballast", description="Inference request router for unreliable GPU fleets."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    p = sub.add_parser("serve", help="run the router")
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument("--port", type=int, help="override listen.port")
    p.add_argument(
        "--workers", type=int, default=1, help="router processes sharing the port (SO_REUSEPORT)"
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="run the router on a local simulated fleet")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("policies", help="list routing policies")
    p.set_defaults(func=cmd_policies)

    p = sub.add_parser("nodes", help="print the fleet table of a running router")
    p.add_argument("--router", default="http://127.0.0.1:8080", help="router base URL")
    p.add_argument(
        "--admin-token",
        default=os.environ.get("BALLAST_ADMIN_TOKEN"),
        help="admin bearer token (default: $BALLAST_ADMIN_TOKEN)",
    )
    p.add_argument("--watch", action="store_true", help="refresh until interrupted")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=cmd_nodes)

    p = sub.add_parser("agent", help="keep a GPU node registered with a router")
    p.add_argument("--router", required=True, help="router base URL")
    p.add_argument("--node-url", required=True, help="base URL of the inference server")
    p.add_argument("--id", help="node id (default: hostname)")
    p.add_argument(
        "--join-token",
        default=os.environ.get("BALLAST_JOIN_TOKEN"),
        help="join token (default: $BALLAST_JOIN_TOKEN)",
    )
    p.add_argument("--models", help="comma-separated models (default: the node's /v1/models)")
    p.add_argument("--gpu", help="GPU model, when nvidia-smi is absent")
    p.add_argument("--gpus", help="GPU count, when nvidia-smi is absent (default 1)")
    p.add_argument("--vram-gb", dest="vram_gb", help="total VRAM, when nvidia-smi is absent")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between heartbeats")
    p.add_argument("--secret-file", help="keep the node secret here across restarts")
    # What the node is (checked as registration checks it; flags override --file).
    p.add_argument(
        "--label", action="append", metavar="KEY=VALUE", help="a label, e.g. pool=spot (repeat)"
    )
    p.add_argument("--region", help="the node's region label (what locality.label reads)")
    p.add_argument("--max-concurrency", dest="max_concurrency", help="requests it serves at once")
    p.add_argument("--price-per-mtok", dest="price_per_mtok", help="price per million tokens")
    p.add_argument("--price-per-hour", dest="price_per_hour", help="price per node hour")
    p.add_argument("--engine", help="vllm, sglang, llamacpp, llama-cpp-python, tgi, ollama, openai")
    p.add_argument("--file", help="YAML file of these claims (labels, price_per_mtok, ...)")
    p.set_defaults(func=cmd_agent)

    def admin_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--router", default="http://127.0.0.1:8080", help="router base URL")
        p.add_argument(
            "--admin-token",
            default=os.environ.get("BALLAST_ADMIN_TOKEN"),
            help="admin bearer token (default: $BALLAST_ADMIN_TOKEN)",
        )

    def limit(text: str) -> int | None:
        """An integer limit, or ``none``: no limit."""
        if text.strip().lower() == "none":
            return None
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer or none") from None

    def key_args(k: argparse.ArgumentParser, update: bool) -> None:
        off = "; none: no limit" if update else ""
        every = "; '' for all" if update else " (default: all)"
        k.add_argument("--rpm", type=limit, help="requests per minute" + off)
        k.add_argument("--tpm", type=limit, help="tokens per minute (prompt + completion)" + off)
        k.add_argument(
            "--max-parallel", dest="max_parallel", type=limit, help="requests at once" + off
        )
        k.add_argument("--models", help="comma-separated models it may use" + every)
        priority = {} if update else {"default": "interactive"}  # update: unchanged if not given
        k.add_argument("--priority", choices=["interactive", "batch"], **priority)
        k.add_argument(
            "--budget-tokens", dest="budget_tokens", type=limit, help="tokens per period" + off
        )
        k.add_argument("--budget-period", dest="budget_period", choices=["day", "month"])
        k.add_argument("--pools", help="comma-separated pools it may use, in order" + every)
        k.add_argument("--region", help="its requests' locality (preferred nodes' region label)")
        admin_args(k)

    p = sub.add_parser("keys", help="create, update, list and revoke client keys")
    keys = p.add_subparsers(dest="action", required=True)
    k = keys.add_parser("create", help="create a key and print it (shown once)")
    k.add_argument("--name", required=True)
    key_args(k, update=False)
    # Flags left out are not sent (argparse.SUPPRESS): the key keeps what it has.
    k = keys.add_parser(
        "update", help="change a key's limits on every replica (PATCH /admin/keys/{id})",
        argument_default=argparse.SUPPRESS,
    )  # fmt: skip
    k.add_argument("key", help="key name or id")
    k.add_argument("--name", help="rename it")
    key_args(k, update=True)
    k = keys.add_parser("list", help="list keys (never the keys themselves)")
    admin_args(k)
    k = keys.add_parser("revoke", help="revoke a key on every replica")
    k.add_argument("name", help="key name or id")
    admin_args(k)
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("tokens", help="mint, list and revoke scoped join tokens")
    tokens = p.add_subparsers(dest="action", required=True)
    t = tokens.add_parser("create", help="mint a join token and print it (shown once)")
    t.add_argument("--name", required=True, help="whose nodes it joins (a provider)")
    t.add_argument("--models", help="comma-separated models its nodes may serve (default: any)")
    t.add_argument("--pool", help="the pool its nodes are in, whatever they claim")
    t.add_argument("--max-nodes", dest="max_nodes", type=int, help="live nodes at most")
    t.add_argument("--expires-in", dest="expires_in", type=duration_s, help="e.g. 12h, 30d")
    admin_args(t)
    t = tokens.add_parser("list", help="list join tokens and their live nodes (never a token)")
    admin_args(t)
    t = tokens.add_parser("revoke", help="revoke a token: its nodes drained and forgotten")
    t.add_argument("name", help="token name or id")
    admin_args(t)
    p.set_defaults(func=cmd_tokens)

    p = sub.add_parser("usage", help="usage per key and model")
    p.add_argument("--key", help="only this key name")
    p.add_argument("--since", help="first UTC day, YYYY-MM-DD (default: 30 days ago)")
    admin_args(p)
    p.set_defaults(func=cmd_usage)

    p = sub.add_parser("check-config", help="validate a config file")
    p.add_argument("config")
    p.set_defaults(func=cmd_check_config)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
