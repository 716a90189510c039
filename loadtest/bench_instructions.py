"""Instructions per request, counted by valgrind's callgrind: repeatable on a
shared machine where CPU time is not.

    python -m loadtest.bench_instructions [--requests 800] [--auth] [--bare]

Starts the benchmark node (``loadtest.bench_overhead``'s) and ``ballast serve``
under ``valgrind --tool=callgrind``, warms the router up, zeroes the counters
(a dump), sends ``--requests`` non-streamed chat requests 8 at a time, dumps
again, and prints the router's instructions per request for that window
(background tasks included). With ``--auth`` it measures the router without and
with ``auth.required`` and three limited keys, and prints the difference; with
``--bare`` also the benchmark's bare aiohttp pass-through proxy, the yardstick
for converting instructions to time. Each measurement takes about half a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from loadtest.bench_overhead import AUTH, CHAT, ballast_conf
from loadtest.common import free_port, spawn, stop_all, wait_port


async def send(url: str, n: int) -> None:
    headers = {"Content-Type": "application/json", **AUTH}
    async with aiohttp.ClientSession() as http:

        async def worker(k: int) -> None:
            for _ in range(k):
                async with http.post(url + "/v1/chat/completions", data=CHAT, headers=headers) as r:
                    await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"HTTP {r.status}")

        await asyncio.gather(*(worker(n // 8) for _ in range(8)))


def dumped(out: Path, pid: int, part: int) -> int:
    """Total instructions in the ``part``-th dump of ``pid``, once it is written."""
    path = out / f"callgrind.out.{pid}.{part}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if path.exists():
            for line in path.read_text(errors="replace").splitlines():
                if line.startswith(("summary:", "totals:")):
                    return int(line.split()[1])
        time.sleep(0.2)
    raise RuntimeError(f"no dump {path}")


def measure(tmp: Path, node_url: str, n: int, auth: bool, bare: bool = False) -> float:
    """Instructions per request of ``ballast serve`` (or, ``bare``, of the benchmark's
    bare aiohttp pass-through proxy)."""
    port = free_port()
    if bare:
        me = [sys.executable, "-m", "loadtest.bench_overhead"]
        cmd = [*me, "--role", "bare", "--port", str(port), "--url", node_url]
    else:
        conf = ballast_conf(tmp, port, node_url, True, True, auth)
        cmd = [sys.executable, "-m", "router.cli", "serve", "--config", str(conf)]
    router = spawn(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/callgrind.out.%p", *cmd]
    )
    try:
        wait_port(port, router, timeout=300)
        url = f"http://127.0.0.1:{port}"
        asyncio.run(send(url, 64))  # warm-up
        subprocess.run(
            ["callgrind_control", "-d", str(router.pid)], check=True, capture_output=True
        )
        dumped(tmp, router.pid, 1)
        asyncio.run(send(url, n))
        subprocess.run(
            ["callgrind_control", "-d", str(router.pid)], check=True, capture_output=True
        )
        return dumped(tmp, router.pid, 2) / n
    finally:
        stop_all([router])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=800)
    ap.add_argument("--auth", action="store_true", help="also with auth.required and 3 keys")
    ap.add_argument("--bare", action="store_true", help="also the bare aiohttp pass-through proxy")
    args = ap.parse_args()
    me = [sys.executable, "-m", "loadtest.bench_overhead"]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        node_port = free_port()
        node = spawn([*me, "--role", "node", "--port", str(node_port)])
        try:
            wait_port(node_port, node)
            node_url = f"http://127.0.0.1:{node_port}"
            base = measure(tmp, node_url, args.requests, auth=False)
            print(f"ballast: {base:,.0f} instructions per request")
            if args.bare:
                plain = measure(tmp, node_url, args.requests, auth=False, bare=True)
                print(f"bare aiohttp proxy: {plain:,.0f} ({base / plain:.2f}x for ballast)")
            if args.auth:
                keyed = measure(tmp, node_url, args.requests, auth=True)
                print(f"ballast, auth.required and 3 limited keys: {keyed:,.0f} "
                      f"(+{keyed - base:,.0f}, {keyed / base:.3f}x)")  # fmt: skip
        finally:
            stop_all([node])


if __name__ == "__main__":
    main()
