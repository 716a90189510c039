"""Proxy overhead benchmark: Ballast against direct-to-node and a bare proxy.

Every target runs in its own process against the same local node process, and
the load comes from a separate process, so the CPU counters of each proxy
measure that proxy alone. Targets:

* ``direct``: the load generator talks to the node itself (the floor);
* ``bare``: a pass-through aiohttp proxy with no logic at all, written here;
  the cost floor of a Python proxy;
* ``ballast``: ``ballast serve`` with its default features;
* ``ballast-auth`` (``--auth``): the same with ``auth.required`` and three keys
  with rpm, tpm and parallel limits (high enough never to refuse); every target
  then gets the key's ``Authorization`` header;
* ``nginx``: when ``nginx`` is on the PATH, a keep-alive ``proxy_pass``.

Non-streaming load comes from wrk when it is installed (else, and for streams,
from a Python aiohttp client that also measures time to first byte).
With ``--streams N`` it instead holds N slow streams open at once through each of
direct, Ballast and ``serve --workers 2``, and prints the router's peak RSS, CPU
and the streams' time to first byte.

For each target, non-streaming and streaming, at each concurrency, it prints
requests/s, p50/p99 latency, p50 time to first byte (streams), added p50
latency against direct, and the proxy's CPU time per request (user + system
from ``/proc/PID/stat``). Ratios against ``bare`` are measured in the same run,
because the machine is shared and noisy.

    python -m loadtest.bench_overhead --duration 5 --concurrency 1,64 [--no-obs] [--workers2]
    python -m loadtest.bench_overhead --duration 5 --concurrency 1,64 --auth
    python -m loadtest.bench_overhead --streams 2000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from loadtest.common import free_port, percentile, spawn, stop_all, wait_port

MODEL = "bench-model"
CHAT = orjson.dumps(
    {"model": MODEL, "messages": [{"role": "user", "content": "hello " * 20}], "max_tokens": 8}
)
CHAT_STREAM = orjson.dumps({**orjson.loads(CHAT), "stream": True})
STREAM_CHUNKS = 8
BENCH_KEY = "sk-bal-bench-0000000000000000000000000000000000000000"
AUTH = {"Authorization": f"Bearer {BENCH_KEY}"}


# -- the processes -----------------------------------------------------------


def run_node(port: int, chunks: int = STREAM_CHUNKS, interval: float = 0.0) -> None:
    """A node that answers at once (fixed JSON), or streams ``chunks`` SSE chunks
    ``interval`` seconds apart (at once by default)."""
    from aiohttp import web

    body = orjson.dumps(
        {
            "id": "x",
            "object": "chat.completion",
            "model": MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "tok " * 8}}],
            "usage": {"prompt_tokens": 20, "completion_tokens": 8, "total_tokens": 28},
        }
    )
    chunk = b'data: {"choices":[{"index":0,"delta":{"content":"tok "}}]}\n\n'

    async def chat(request: web.Request) -> web.StreamResponse:
        doc = orjson.loads(await request.read())
        if not doc.get("stream"):
            return web.Response(body=body, content_type="application/json")
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        for i in range(chunks):
            if i and interval:
                await asyncio.sleep(interval)
            await out.write(chunk)
        await out.write(b"data: [DONE]\n\n")
        await out.write_eof()
        return out

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    _run_app(app, port)


def run_bare(port: int, upstream: str) -> None:
    """The cost floor of a Python proxy: forward, stream back, nothing else."""
    from aiohttp import ClientSession, TCPConnector, web

    async def session_ctx(app: web.Application) -> Any:
        app["s"] = ClientSession(connector=TCPConnector(limit=0), auto_decompress=False)
        yield
        await app["s"].close()

    async def proxy(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        async with request.app["s"].post(
            upstream + request.path, data=body, headers={"Content-Type": "application/json"}
        ) as up:
            out = web.StreamResponse(
                status=up.status, headers={"Content-Type": up.headers["Content-Type"]}
            )
            await out.prepare(request)
            async for data in up.content.iter_any():
                await out.write(data)
            await out.write_eof()
            return out

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/v1/chat/completions", proxy)
    _run_app(app, port)


def _run_app(app: Any, port: int) -> None:
    import uvloop
    from aiohttp import web

    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def run_load(url: str, conc: int, duration: float, stream: bool, auth: bool = False) -> None:
    """Closed-loop load: ``conc`` workers for ``duration`` seconds; prints JSON."""
    import uvloop
    from aiohttp import ClientSession, TCPConnector

    body = CHAT_STREAM if stream else CHAT
    lat: list[float] = []
    ttfb: list[float] = []
    errors = 0

    async def worker(session: ClientSession, stop_at: float) -> None:
        nonlocal errors
        clock = time.perf_counter
        target = url + "/v1/chat/completions"
        headers = {"Content-Type": "application/json", **(AUTH if auth else {})}
        while clock() < stop_at:
            t0 = clock()
            try:
                async with session.post(target, data=body, headers=headers) as resp:
                    first = await resp.content.readany()
                    t1 = clock()
                    while await resp.content.readany():
                        pass
                    if resp.status != 200 or not first:
                        errors += 1
                        continue
            except Exception:
                errors += 1
                continue
            lat.append(clock() - t0)
            ttfb.append(t1 - t0)

    async def main() -> None:
        async with ClientSession(connector=TCPConnector(limit=0)) as session:
            warm = time.perf_counter() + min(1.0, duration / 5)
            await asyncio.gather(*(worker(session, warm) for _ in range(conc)))
            lat.clear()
            ttfb.clear()
            start = time.perf_counter()
            await asyncio.gather(*(worker(session, start + duration) for _ in range(conc)))
            elapsed = time.perf_counter() - start
            print(
                orjson.dumps(
                    {"lat": lat, "ttfb": ttfb, "errors": errors, "elapsed": elapsed}
                ).decode()
            )

    uvloop.run(main())


# -- orchestration ------------------------------------------------------------


@dataclass
class Result:
    target: str
    mode: str
    conc: int
    rps: float
    p50_ms: float
    p99_ms: float
    ttfb_p50_ms: float
    cpu_us: float  # proxy CPU per request; nan for direct
    errors: int
    client: str = "python"


def tree(pid: int) -> list[int]:
    """``pid`` and its children (a `serve --workers N` supervisor and its workers)."""
    pids = [pid]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                pids.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return pids


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and its children."""
    total = 0
    for p in tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    total = 0
    for p in tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def measure(
    target: str, url: str, pid: int | None, conc: int, duration: float, stream: bool,
    auth: bool = False,
) -> Result:  # fmt: skip
    me = [sys.executable, "-m", "loadtest.bench_overhead"]
    args = [*me, "--role", "load", "--url", url, "--conc", str(conc)]
    args += ["--duration", str(duration)] + (["--stream"] if stream else [])
    args += ["--auth"] if auth else []
    load = subprocess.Popen(args, stdout=subprocess.PIPE)
    # CPU is sampled around the measured window only (the load warms up first).
    time.sleep(min(1.0, duration / 5))
    cpu0 = cpu_seconds(pid) if pid else 0.0
    out, _ = load.communicate(timeout=duration + 60)
    cpu1 = cpu_seconds(pid) if pid else 0.0
    doc = orjson.loads(out)
    n = len(doc["lat"])
    return Result(
        target=target,
        mode="stream" if stream else "json",
        conc=conc,
        rps=n / doc["elapsed"],
        p50_ms=percentile(doc["lat"], 0.5) * 1e3,
        p99_ms=percentile(doc["lat"], 0.99) * 1e3,
        ttfb_p50_ms=percentile(doc["ttfb"], 0.5) * 1e3,
        cpu_us=(cpu1 - cpu0) / n * 1e6 if pid and n else float("nan"),
        errors=doc["errors"],
    )


WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = [[%s]]
wrk.headers["Content-Type"] = "application/json"
%s"""


def _wrk_ms(text: str) -> float:
    units = {"us": 1e-3, "ms": 1.0, "s": 1e3}
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    return float(m.group(1)) * units[m.group(2)] if m else float("nan")


def measure_wrk(
    target: str, url: str, pid: int | None, conc: int, duration: float, script: Path
) -> Result:
    """Non-streaming load with wrk (C, far cheaper than a Python client)."""
    base = ["wrk", "-t1", f"-c{conc}", "--latency", "-s", str(script)]
    endpoint = url + "/v1/chat/completions"
    subprocess.run([*base, "-d1s", endpoint], capture_output=True, check=True)  # warm-up
    cpu0 = cpu_seconds(pid) if pid else 0.0
    out = subprocess.run(
        [*base, f"-d{max(1, round(duration))}s", endpoint],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    cpu1 = cpu_seconds(pid) if pid else 0.0
    n = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    secs = float(re.search(r"requests in ([\d.]+)s", out).group(1))  # type: ignore[union-attr]
    pct = dict(re.findall(r"^\s+(50|99)\.000%\s+(\S+)", out, re.M))
    if not pct:
        pct = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    p50 = _wrk_ms(pct.get("50", ""))
    return Result(
        target=target,
        mode="json",
        conc=conc,
        rps=n / secs,
        p50_ms=p50,
        p99_ms=_wrk_ms(pct.get("99", "")),
        ttfb_p50_ms=p50,
        cpu_us=(cpu1 - cpu0) / n * 1e6 if pid and n else float("nan"),
        errors=int(bad.group(1)) if bad else 0,
        client="wrk",
    )


def nginx_conf(tmp: Path, port: int, upstream_port: int) -> Path:
    conf = tmp / "nginx.conf"
    conf.write_text(
        f"""
worker_processes 1;
daemon off;
master_process off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {tmp};
  proxy_temp_path {tmp};
  upstream node {{ server 127.0.0.1:{upstream_port}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://node;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }}
  }}
}}
"""
    )
    return conf


def ballast_conf(
    tmp: Path, port: int, node_url: str, observability: bool, resume: bool = True,
    auth: bool = False,
) -> Path:  # fmt: skip
    import yaml

    from router.tenants import hash_key

    keys = [
        {"name": f"bench-{i}", "hash": hash_key(f"{BENCH_KEY}{i or ''}"), "rpm": 10_000_000,
         "tpm": 10_000_000_000, "max_parallel": 100_000}
        for i in range(3)
    ]  # fmt: skip
    conf = tmp / f"ballast-{port}.yaml"
    conf.write_text(
        yaml.safe_dump(
            {
                "listen": {"host": "127.0.0.1", "port": port},
                "shutdown": {"grace_s": 0},
                "nodes": [{"id": "bench-node", "url": node_url, "models": [MODEL]}],
                "logging": {"level": "info", "access_log": observability},
                "metrics": {"enabled": observability},
                "resume": {"enabled": resume},
                "auth": {"required": True, "keys": keys} if auth else {},
            }
        )
    )
    return conf


def spawn_ballast(
    tmp: Path,
    port: int,
    node_url: str,
    observability: bool = True,
    workers: int = 1,
    resume: bool = True,
    auth: bool = False,
) -> subprocess.Popen[bytes]:
    conf = ballast_conf(tmp, port, node_url, observability, resume, auth)
    cmd = [sys.executable, "-m", "router.cli", "serve", "--config", str(conf)]
    return spawn([*cmd, "--workers", str(workers)])


def main_bench(args: argparse.Namespace) -> list[Result]:
    me = [sys.executable, "-m", "loadtest.bench_overhead"]
    procs: list[subprocess.Popen[bytes]] = []
    tmp = Path(tempfile.mkdtemp(prefix="ballast-bench-"))
    try:
        node_port = free_port()
        node = spawn([*me, "--role", "node", "--port", str(node_port)])
        procs.append(node)
        wait_port(node_port, node)
        node_url = f"http://127.0.0.1:{node_port}"
        targets: list[tuple[str, str, int | None]] = [("direct", node_url, None)]

        bare_port = free_port()
        bare = spawn([*me, "--role", "bare", "--port", str(bare_port), "--url", node_url])
        procs.append(bare)
        targets.append(("bare", f"http://127.0.0.1:{bare_port}", bare.pid))

        variants = [("ballast", True, 1, False)]
        variants += [("ballast-auth", True, 1, True)] if args.auth else []
        variants += [("ballast-noobs", False, 1, False)] if args.no_obs else []
        variants += [("ballast-w2", True, 2, False)] if args.workers2 else []
        for name, observability, workers, auth in variants:
            b_port = free_port()
            ballast = spawn_ballast(tmp, b_port, node_url, observability, workers, auth=auth)
            procs.append(ballast)
            targets.append((name, f"http://127.0.0.1:{b_port}", ballast.pid))

        if shutil.which("nginx") and not args.no_nginx:
            n_port = free_port()
            nginx = spawn(["nginx", "-c", str(nginx_conf(tmp, n_port, node_port))])
            procs.append(nginx)
            targets.append(("nginx", f"http://127.0.0.1:{n_port}", nginx.pid))

        for _, url, pid in targets:
            if pid:
                wait_port(int(url.rsplit(":", 1)[1]), next(p for p in procs if p.pid == pid))

        wrk_script = tmp / "post.lua"
        header = f'wrk.headers["Authorization"] = "Bearer {BENCH_KEY}"\n' if args.auth else ""
        wrk_script.write_text(WRK_SCRIPT % (CHAT.decode(), header))
        use_wrk = shutil.which("wrk") is not None and not args.no_wrk
        results = []
        for stream in (False, True):
            for conc in args.concurrency:
                for name, url, pid in targets:
                    if use_wrk and not stream:
                        r = measure_wrk(name, url, pid, conc, args.duration, wrk_script)
                    else:
                        r = measure(name, url, pid, conc, args.duration, stream, args.auth)
                    results.append(r)
                    print(
                        f"  measured {name:<8} {r.mode:<6} c={conc:<3} {r.rps:8.0f} req/s",
                        file=sys.stderr,
                    )
        return results
    finally:
        stop_all(procs)
        shutil.rmtree(tmp, ignore_errors=True)


# -- many open streams ----------------------------------------------------------


def run_streams(url: str, n: int) -> None:
    """Open ``n`` streams at once, read them to the end; print TTFBs as JSON."""
    import uvloop
    from aiohttp import ClientSession, ClientTimeout, TCPConnector

    async def one(session: ClientSession) -> float:
        t0 = time.perf_counter()
        async with session.post(url + "/v1/chat/completions", data=CHAT_STREAM) as resp:
            if resp.status != 200 or not await resp.content.readany():
                return -1.0
            ttfb = time.perf_counter() - t0
            while await resp.content.readany():
                pass
            return ttfb

    async def main() -> None:
        timeout = ClientTimeout(total=300)
        async with ClientSession(connector=TCPConnector(limit=0), timeout=timeout) as session:
            results = await asyncio.gather(
                *(one(session) for _ in range(n)), return_exceptions=True
            )
        ttfb = [r for r in results if isinstance(r, float) and r >= 0]
        print(orjson.dumps({"ttfb": ttfb, "errors": n - len(ttfb)}).decode())

    uvloop.run(main())


def main_streams(args: argparse.Namespace) -> str:
    me = [sys.executable, "-m", "loadtest.bench_overhead"]
    procs: list[subprocess.Popen[bytes]] = []
    tmp = Path(tempfile.mkdtemp(prefix="ballast-bench-"))
    lines = [
        f"{args.streams} concurrent streams, {args.chunks} tokens each, one every "
        f"{args.interval} s",
        "",
        "| target | streams ok | TTFB p50 ms | TTFB p99 ms | peak RSS MB | RSS idle MB "
        "| CPU s | CPU ms/stream | CPU µs/chunk | CPU vs bare |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    try:
        node_port = free_port()
        node = spawn(
            [*me, "--role", "slownode", "--port", str(node_port), "--chunks", str(args.chunks),
             "--interval", str(args.interval)]
        )  # fmt: skip
        procs.append(node)
        wait_port(node_port, node)
        node_url = f"http://127.0.0.1:{node_port}"
        targets: list[tuple[str, str, int | None]] = [("direct", node_url, None)]
        bare_port = free_port()
        bare = spawn([*me, "--role", "bare", "--port", str(bare_port), "--url", node_url])
        procs.append(bare)
        wait_port(bare_port, bare)
        targets.append(("bare", f"http://127.0.0.1:{bare_port}", bare.pid))
        variants = (("ballast", 1, True), ("ballast-noresume", 1, False), ("ballast-w2", 2, True))
        for name, workers, resume in variants:
            port = free_port()
            proc = spawn_ballast(tmp, port, node_url, workers=workers, resume=resume)
            procs.append(proc)
            wait_port(port, proc)
            targets.append((name, f"http://127.0.0.1:{port}", proc.pid))
        bare_chunk = float("nan")
        for name, url, pid in targets:
            idle = rss_mb(pid) if pid else float("nan")
            cpu0 = cpu_seconds(pid) if pid else 0.0
            load = subprocess.Popen(
                [*me, "--role", "streams", "--url", url, "--streams", str(args.streams)],
                stdout=subprocess.PIPE,
            )
            peak = idle
            while load.poll() is None:
                if pid:
                    peak = max(peak, rss_mb(pid))
                time.sleep(0.2)
            cpu = (cpu_seconds(pid) - cpu0) if pid else float("nan")
            doc = orjson.loads(load.stdout.read() if load.stdout else b"{}")
            ok = len(doc["ttfb"])
            per_chunk = cpu / max(ok * args.chunks, 1) * 1e6
            if name == "bare":
                bare_chunk = per_chunk
            lines.append(
                f"| {name} | {ok}/{args.streams} | {(percentile(doc['ttfb'], 0.5)) * 1e3:.1f} "
                f"| {percentile(doc['ttfb'], 0.99) * 1e3:.1f} | {peak:.0f} | {idle:.0f} "
                f"| {cpu:.2f} | {cpu / max(ok, 1) * 1e3:.2f} | {per_chunk:.1f} "
                f"| {per_chunk / bare_chunk:.2f}x |"
            )
            print(f"  measured {name}", file=sys.stderr)
        return "\n".join(lines)
    finally:
        stop_all(procs)
        shutil.rmtree(tmp, ignore_errors=True)


def report(results: list[Result]) -> str:
    lines = [
        "| mode | conc | client | target | req/s | p50 ms | p99 ms | TTFB p50 ms | added p50 ms | "
        "CPU µs/req | req/s vs bare | CPU vs bare |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_key = {(x.mode, x.conc, x.target): x for x in results}
    for r in results:
        direct, bare = by_key[r.mode, r.conc, "direct"], by_key[r.mode, r.conc, "bare"]
        lines.append(
            f"| {r.mode} | {r.conc} | {r.client} | {r.target} | {r.rps:.0f} "
            f"| {r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.ttfb_p50_ms:.2f} "
            f"| {r.p50_ms - direct.p50_ms:+.2f} | {r.cpu_us:.0f} "
            f"| {r.rps / bare.rps:.2f}x | {r.cpu_us / bare.cpu_us:.2f}x |"
            + (f" errors={r.errors}" if r.errors else "")
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--role",
        choices=["bench", "node", "bare", "load", "slownode", "streams"],
        default="bench",
    )
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--url", default="")
    p.add_argument("--conc", type=int, default=1)
    p.add_argument("--stream", action="store_true")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    p.add_argument(
        "--concurrency",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 64],
        help="comma-separated concurrencies",
    )
    p.add_argument("--no-nginx", action="store_true")
    p.add_argument("--no-wrk", action="store_true", help="use the Python client for everything")
    p.add_argument(
        "--no-obs",
        action="store_true",
        help="also measure Ballast with metrics and the access log off",
    )
    p.add_argument("--workers2", action="store_true", help="also measure serve --workers 2")
    p.add_argument(
        "--auth", action="store_true", help="also measure auth.required with three limited keys"
    )
    p.add_argument(
        "--streams",
        type=int,
        default=0,
        help="instead: hold this many slow streams open at once (router RSS, CPU, TTFB)",
    )
    p.add_argument("--chunks", type=int, default=20, help="tokens per slow stream")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between slow tokens")
    args = p.parse_args()
    if args.role == "slownode":
        run_node(args.port, args.chunks, args.interval)
    elif args.role == "streams":
        run_streams(args.url, args.streams)
    elif args.streams:
        print(main_streams(args))
    elif args.role == "node":
        run_node(args.port)
    elif args.role == "bare":
        run_bare(args.port, args.url)
    elif args.role == "load":
        run_load(args.url, args.conc, args.duration, args.stream, args.auth)
    else:
        print(report(main_bench(args)))


if __name__ == "__main__":
    main()
