"""Instructions per request, counted by valgrind's callgrind: repeatable on a
shared machine where CPU time is not.

    python -m loadtest.bench_instructions [--requests 2000] [--auth] [--bare] [--idle 5]

Starts the benchmark node (``loadtest.bench_overhead``'s) and ``ballast serve``
under ``valgrind --tool=callgrind``, warms the router up, zeroes the counters
(a dump), sends ``--requests`` non-streamed chat requests 8 at a time, dumps
again, and prints the router's instructions per request for that window
(background tasks included). It then leaves the router idle for ``--idle``
seconds and prints the timers' share: what the background work seen while idle
adds per request at the rate the window ran (under callgrind the router serves
about 150 requests a second, several times fewer than natively, so timers
weigh more per request here than in service). With ``--auth`` it measures the
router without and with ``auth.required`` and three limited keys, and prints
the difference (also without the timers' share); with ``--bare`` also the
benchmark's bare aiohttp pass-through proxy, the yardstick for converting
instructions to time. Each measurement takes under a minute.
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


def dump(pid: int) -> None:
    """Have callgrind write its counts since the last dump (and zero them)."""
    subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)


def measure(
    tmp: Path, node_url: str, n: int, auth: bool, bare: bool = False, idle_s: float = 0.0
) -> tuple[float, float]:
    """Instructions per request of ``ballast serve`` (or, ``bare``, of the benchmark's
    bare aiohttp pass-through proxy), and, with ``idle_s``, the part of that figure
    its timers' background work would add at the same rate with no requests."""
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
        dump(router.pid)
        dumped(tmp, router.pid, 1)
        t0 = time.monotonic()
        asyncio.run(send(url, n))
        busy_s = time.monotonic() - t0
        dump(router.pid)
        total = dumped(tmp, router.pid, 2)
        if not idle_s:
            return total / n, 0.0
        t0 = time.monotonic()
        time.sleep(idle_s)  # no requests: what the timers cost per second
        dump(router.pid)
        idle = dumped(tmp, router.pid, 3) / (time.monotonic() - t0)
        return total / n, idle * busy_s / n
    finally:
        stop_all([router])


def timers(background: float) -> str:
    return f" (timers' share at this rate: {background:,.0f})" if round(background) else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--auth", action="store_true", help="also with auth.required and 3 keys")
    ap.add_argument("--bare", action="store_true", help="also the bare aiohttp pass-through proxy")
    ap.add_argument(
        "--idle", type=float, default=5.0, help="seconds without requests, for the timers' cost"
    )
    args = ap.parse_args()
    me = [sys.executable, "-m", "loadtest.bench_overhead"]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        node_port = free_port()
        node = spawn([*me, "--role", "node", "--port", str(node_port)])
        try:
            wait_port(node_port, node)
            node_url = f"http://127.0.0.1:{node_port}"
            n, idle = args.requests, args.idle
            base, base_bg = measure(tmp, node_url, n, auth=False, idle_s=idle)
            print(f"ballast: {base:,.0f} instructions per request{timers(base_bg)}")
            if args.bare:
                plain, plain_bg = measure(tmp, node_url, n, auth=False, bare=True, idle_s=idle)
                print(f"bare aiohttp proxy: {plain:,.0f}{timers(plain_bg)} "
                      f"({base / plain:.2f}x for ballast)")  # fmt: skip
            if args.auth:
                keyed, keyed_bg = measure(tmp, node_url, n, auth=True, idle_s=idle)
                extra = f"+{keyed - base:,.0f}, {keyed / base:.3f}x"
                print(f"ballast, auth.required and 3 limited keys: {keyed:,.0f}"
                      f"{timers(keyed_bg)} ({extra})")  # fmt: skip
                if idle:
                    net = (keyed - keyed_bg) - (base - base_bg)
                    print(f"  without the timers' share: +{net:,.0f}")
        finally:
            stop_all([node])


if __name__ == "__main__":
    main()
