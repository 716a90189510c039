"""The ``ballast`` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from router.config import ConfigError, load_config


def _run(coro: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        runner = asyncio.Runner()
    with runner:
        runner.run(coro)


def _load(path: str) -> Any:
    try:
        return load_config(path)
    except ConfigError as e:
        print(f"ballast: invalid config {path}:\n{e}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_serve(args: argparse.Namespace) -> None:
    from router.app import serve

    cfg = _load(args.config)
    if args.port is not None:
        cfg = cfg.model_copy(update={"listen": cfg.listen.model_copy(update={"port": args.port})})
    logging.basicConfig(
        level=cfg.logging.level.upper(), format="%(asctime)s %(levelname)s %(message)s"
    )
    _run(serve(cfg, Path(args.config)))


def cmd_demo(args: argparse.Namespace) -> None:
    from loadtest.demo import run_demo

    logging.basicConfig(level="WARNING", format="%(asctime)s %(levelname)s %(message)s")
    _run(run_demo(args.host, args.port))


def cmd_policies(args: argparse.Namespace) -> None:
    from policies import REGISTRY

    width = max(len(n) for n in REGISTRY)
    for name in sorted(REGISTRY):
        print(f"{name:<{width}}  {REGISTRY[name].description}")


def cmd_check_config(args: argparse.Namespace) -> None:
    cfg = _load(args.config)
    print(
        f"{args.config}: ok ({len(cfg.nodes)} static node(s), policy {cfg.policy.name}, "
        f"state {'redis' if cfg.state.redis_url else 'in-memory'})"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="ballast", description="Inference request router for unreliable GPU fleets."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the router")
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument("--port", type=int, help="override listen.port")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="run the router on a local simulated fleet")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("policies", help="list routing policies")
    p.set_defaults(func=cmd_policies)

    p = sub.add_parser("check-config", help="validate a config file")
    p.add_argument("config")
    p.set_defaults(func=cmd_check_config)

    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
