"""Conformance of real inference engines, through Ballast.

Builds (once, into a cache directory outside the repository) the real engines
that PyPI carries: llama.cpp's ``llama-server`` and llama-cpp-python's server,
both from the ``llama-cpp-python`` sdist (about 11 minutes on 2 cores; one
llama.cpp build serves both, the Python package loads its shared libraries).
Writes a tiny random-weight GGUF (:mod:`loadtest.tiny_gguf`), starts a mixed
fleet on loopback (two llama.cpp servers and one llama-cpp-python server for
chat and completions, one of each with embeddings), puts ``ballast serve`` in
front of it with its default verification, probes and engine-metrics scraping,
and runs every check through Ballast with the official ``openai`` client:

    python -m loadtest.engines [--cache DIR] [--out docs/engines.md]

It prints a table of feature by engine and writes it to ``--out``. It takes
minutes and needs the build, so it is not part of the test suite: it is the
check to run before saying an engine works. Everything listens on 127.0.0.1
and stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import yaml

from loadtest.common import free_port, spawn, stop_all, wait_port

LLAMA_CPP_PYTHON = "0.3.36"
MODEL = "tiny"
EMBED_MODEL = "tiny-embed"
SERVED_AS = "tiny-q8.gguf"  # one llama-server serves MODEL under this alias
ASKED_AS = "tiny:latest"  # another alias, which no node serves under
DEFAULT_CACHE = Path.home() / ".cache" / "ballast-engines"
ENGINES = ("llamacpp", "llama-cpp-python")


# -- build ---------------------------------------------------------------------------


def run(cmd: list[str], log: Path, **kw: Any) -> None:
    print("  $", " ".join(cmd)[:160], file=sys.stderr)
    with log.open("ab") as out:
        subprocess.run(cmd, check=True, stdout=out, stderr=subprocess.STDOUT, **kw)


def build(cache: Path) -> tuple[Path, Path]:
    """(llama-server binary, the Python of a venv with llama-cpp-python), built once."""
    cache.mkdir(parents=True, exist_ok=True)
    log = cache / "build.log"
    src = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
    server = cache / "build" / "bin" / "llama-server"
    python = cache / "venv" / "bin" / "python"
    if not src.exists():
        print(f"fetching the llama-cpp-python {LLAMA_CPP_PYTHON} sdist", file=sys.stderr)
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(cache / "sdist")], log)  # fmt: skip
        (archive,) = (cache / "sdist").glob("llama_cpp_python-*.tar.gz")
        with tarfile.open(archive) as tar:
            tar.extractall(cache, filter="data")
    if not server.exists():
        print("building llama.cpp (about 11 minutes on 2 cores)", file=sys.stderr)
        run(["cmake", "-S", str(src / "vendor" / "llama.cpp"), "-B", str(cache / "build"),
             "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_CURL=OFF",
             "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TESTS=OFF",
             "-DLLAMA_BUILD_EXAMPLES=OFF"], log)  # fmt: skip
        run(["cmake", "--build", str(cache / "build"), "-j", str(os.cpu_count() or 2),
             "--target", "llama-server", "mtmd"], log)  # fmt: skip
    found = "import importlib.util as u; assert u.find_spec('llama_cpp') and u.find_spec('gguf')"
    if not python.exists() or subprocess.run([str(python), "-c", found]).returncode:
        print("installing llama-cpp-python (on the libraries just built)", file=sys.stderr)
        run([sys.executable, "-m", "venv", str(cache / "venv")], log)
        env = {**os.environ, "CMAKE_ARGS": "-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF"}
        run([str(python), "-m", "pip", "install", "-q", f"{src}[server]", "gguf", "numpy"],
            log, env=env)  # fmt: skip
    return server, python


def tiny_model(cache: Path, python: Path, seed: int = 0) -> Path:
    """The tiny GGUF; another ``seed`` gives other weights (a substitute model)."""
    path = cache / ("tiny.gguf" if not seed else f"tiny-{seed}.gguf")
    if not path.exists():
        script = Path(__file__).with_name("tiny_gguf.py")
        subprocess.run([str(python), str(script), str(path), str(seed)], check=True)
    return path


# -- the fleet ----------------------------------------------------------------------


@dataclass
class EngineNode:
    id: str
    engine: str
    model: str
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def llama_server(cache: Path, server: Path, model: Path, node_id: str) -> EngineNode:
    """One more llama-server serving ``model`` as MODEL."""
    port = free_port()
    cmd = [str(server), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
           "-a", MODEL, "-c", "4096", "-np", "4", "-t", "1"]  # fmt: skip
    log = (cache / f"{node_id}.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    node = EngineNode(node_id, "llamacpp", MODEL, port, proc)
    wait_port(port, proc, timeout=60)
    return node


def start_fleet(cache: Path, server: Path, python: Path, model: Path) -> list[EngineNode]:
    libs = str(server.parent)
    env = {**os.environ, "LLAMA_CPP_LIB_PATH": libs, "MTMD_CPP_LIB": libs}
    plan = [
        ("lcpp-a", "llamacpp", MODEL, False),
        ("lcpp-b", "llamacpp", SERVED_AS, False),
        ("lcpy", "llama-cpp-python", MODEL, False),
        ("lcpp-embed", "llamacpp", EMBED_MODEL, True),
        ("lcpy-embed", "llama-cpp-python", EMBED_MODEL, True),
    ]
    nodes = []
    for node_id, engine, alias, embed in plan:
        port = free_port()
        if engine == "llamacpp":
            cmd = [str(server), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
                   "-a", alias, "-c", "4096", "-np", "4", "--metrics", "-t", "1"]  # fmt: skip
            cmd += ["--embeddings", "--pooling", "mean"] if embed else []
        else:
            cmd = [str(python), "-m", "llama_cpp.server", "--model", str(model), "--model_alias",
                   alias, "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "4096",
                   "--n_threads", "1"]  # fmt: skip
            cmd += ["--embedding", "true"] if embed else []
        log = (cache / f"{node_id}.log").open("wb")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        nodes.append(EngineNode(node_id, engine, alias, port, proc))
    for n in nodes:
        wait_port(n.port, n.proc, timeout=60)
    return nodes


def ballast_config(tmp: Path, port: int, nodes: list[EngineNode]) -> Path:
    conf = tmp / "ballast.yaml"
    conf.write_text(
        yaml.safe_dump(
            {
                "listen": {"host": "127.0.0.1", "port": port},
                "shutdown": {"grace_s": 0},
                # Round robin, so that every engine sees every feature.
                "policy": {"name": "round_robin"},
                # Priced: every answer's tokens are counted and its cost reported.
                "nodes": [
                    {
                        "id": n.id,
                        "url": n.url,
                        "models": [n.model],
                        "labels": {"price_per_mtok": str(PRICE_PER_MTOK)},
                    }
                    for n in nodes
                ],
                # A retired model name whose requests the live model serves.
                "models": {
                    RETIRED: {"fallbacks": [MODEL]},
                    MODEL: {"aliases": [SERVED_AS, ASKED_AS]},
                },
                "registry": {
                    "join_token_env": "BALLAST_JOIN_TOKEN",
                    "allowed_networks": ["127.0.0.0/8"],
                },
                "health": {
                    "verify_static": True,
                    "probe_interval_s": 0.5,
                    "verified_probe_interval_s": 2,
                    "scrape_engine_metrics": True,
                    "engine_metrics_interval_s": 1,
                },
                "admin": {"token_env": "BALLAST_ADMIN_TOKEN"},
                "logging": {"level": "info", "access_log": False},
                # A client key (not required: the other checks go without one).
                "auth": {"keys": [{"name": "engines", "key_env": "BALLAST_ENGINES_KEY"}]},
            }
        )
    )
    return conf


# -- the checks ----------------------------------------------------------------------


@dataclass
class Tally:
    ok: int = 0
    total: int = 0
    errors: list[str] = field(default_factory=list)

    def add(self, ok: bool, error: str = "") -> None:
        self.total += 1
        self.ok += ok
        if not ok and error and len(self.errors) < 3:
            self.errors.append(error[:120])

    def cell(self) -> str:
        if not self.total:
            return "n/a"
        mark = "ok" if self.ok == self.total else "FAIL"
        why = f" ({'; '.join(self.errors)})" if self.errors else ""
        return f"{mark} {self.ok}/{self.total}{why}"


KEY_PROMPT: list[Any] = [{"role": "user", "content": "Count to three"}]
PRICE_PER_MTOK = 1000.0  # every node's price: a cost of 0.001 a token
RETIRED = "retired-model"  # no node serves it; falls back to MODEL


class Checks:
    def __init__(self, router: str, token: str, nodes: list[EngineNode]) -> None:
        from openai import AsyncOpenAI

        self.router = router
        self.token = token
        self.nodes = nodes
        self.engine_of = {n.id: n.engine for n in nodes}
        self.client = AsyncOpenAI(base_url=router + "/v1", api_key="unused", max_retries=0)
        self.keyed = AsyncOpenAI(
            base_url=router + "/v1", api_key=os.environ["BALLAST_ENGINES_KEY"], max_retries=0
        )
        self.usage_of: dict[str, tuple[int, int]] = {}  # engine -> usage of KEY_PROMPT
        self.results: dict[str, dict[str, Tally]] = defaultdict(lambda: defaultdict(Tally))
        self.notes: list[str] = []

    def record(self, feature: str, node_id: str, ok: bool, error: str = "") -> None:
        self.results[feature][self.engine_of.get(node_id, "?")].add(ok, error)

    async def fleet(self) -> list[dict[str, Any]]:
        import aiohttp

        headers = {"Authorization": f"Bearer {self.token}"}
        async with (
            aiohttp.ClientSession() as http,
            http.get(self.router + "/admin/nodes", headers=headers) as resp,
        ):
            return (await resp.json())["nodes"]

    async def wait_verified(self, within: float = 60) -> None:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            rows = await self.fleet()
            if all(r["state"] in ("verified", "serving") for r in rows):
                return
            await asyncio.sleep(0.5)

    async def probes(self) -> None:
        for row in await self.fleet():
            expected = self.engine_of[row["id"]]
            self.record("verified by a probe", row["id"], row["state"] in ("verified", "serving"),
                        f"{row['state']}: {row['reason']}")  # fmt: skip
            self.record("engine detected", row["id"], row["engine"] == expected,
                        f"detected {row['engine']!r}")  # fmt: skip

    async def each(self, feature: str, n: int, call: Any) -> None:
        for _ in range(n):
            try:
                node_id, ok, why = await call()
            except Exception as e:  # the SDK raises on any error answer
                self.record(feature, "?", False, f"{type(e).__name__}: {e}")
                continue
            self.record(feature, node_id, ok, why)

    async def chat(self) -> tuple[str, bool, str]:
        raw = await self.client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "Say hello"}], max_tokens=8
        )
        out = raw.parse()
        ok = out.choices[0].message.content is not None and out.usage is not None
        return raw.headers["x-ballast-node"], ok, "no content or usage"

    async def chat_stream(self) -> tuple[str, bool, str]:
        raw = await self.client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "Say hello"}], max_tokens=8,
            stream=True, stream_options={"include_usage": True},
        )  # fmt: skip
        text, usage, finish = "", None, None
        async for chunk in raw.parse():
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
        ok = usage is not None and finish is not None
        return raw.headers["x-ballast-node"], ok, f"usage={usage is not None} finish={finish}"

    async def completion(self) -> tuple[str, bool, str]:
        raw = await self.client.completions.with_raw_response.create(
            model=MODEL, prompt="Once upon a time", max_tokens=8
        )
        out = raw.parse()
        return raw.headers["x-ballast-node"], bool(out.choices), "no choices"

    async def completion_stream(self) -> tuple[str, bool, str]:
        raw = await self.client.completions.with_raw_response.create(
            model=MODEL, prompt="Once upon a time", max_tokens=8, stream=True
        )
        chunks = [c async for c in raw.parse()]
        return raw.headers["x-ballast-node"], bool(chunks), "no chunks"

    async def embedding(self) -> tuple[str, bool, str]:
        raw = await self.client.embeddings.with_raw_response.create(
            model=EMBED_MODEL, input=["hello world", "ok"]
        )
        out = raw.parse()
        ok = len(out.data) == 2 and len(out.data[0].embedding) > 0
        return raw.headers["x-ballast-node"], ok, "wrong embedding count"

    async def key_usage(self) -> dict[str, int]:
        import aiohttp

        headers = {"Authorization": f"Bearer {self.token}"}
        async with (
            aiohttp.ClientSession() as http,
            http.get(self.router + "/admin/usage?key=engines", headers=headers) as resp,
        ):
            rows = (await resp.json())["data"]
        return rows[0] if rows else {"prompt_tokens": 0, "completion_tokens": 0}

    async def keyed_chat(self) -> tuple[str, bool, str]:
        """With a client key, a plain answer: its usage is what the key is charged."""
        before = await self.key_usage()
        raw = await self.keyed.chat.completions.with_raw_response.create(
            model=MODEL, messages=KEY_PROMPT, max_tokens=8, temperature=0
        )
        out, node = raw.parse(), raw.headers["x-ballast-node"]
        after = await self.key_usage()
        assert out.usage is not None
        self.usage_of[self.engine_of[node]] = (out.usage.prompt_tokens, out.usage.completion_tokens)
        got = [after[k] - before[k] for k in ("prompt_tokens", "completion_tokens")]
        want = [out.usage.prompt_tokens, out.usage.completion_tokens]
        return node, got == want, f"charged {got}, the node said {want}"

    @staticmethod
    async def stream_without_usage(client: Any) -> tuple[str, bool]:
        """A greedy KEY_PROMPT stream that does not ask for usage: the node that served
        it, and whether a usage chunk reached the client anyway."""
        raw = await client.chat.completions.with_raw_response.create(
            model=MODEL, messages=KEY_PROMPT, max_tokens=8, temperature=0, stream=True
        )
        usage_seen = False
        async for chunk in raw.parse():
            usage_seen |= chunk.usage is not None
        return raw.headers["x-ballast-node"], usage_seen

    async def keyed_stream(self) -> tuple[str, bool, str]:
        """With a client key, a stream that does not ask for usage: Ballast asks the
        node, charges its count and hides the usage chunk."""
        before = await self.key_usage()
        node, usage_seen = await self.stream_without_usage(self.keyed)
        after = await self.key_usage()
        charged = tuple(after[k] - before[k] for k in ("prompt_tokens", "completion_tokens"))
        known = self.usage_of.get(self.engine_of[node])  # greedy: the same tokens
        ok = not usage_seen and charged == known
        why = f"usage chunk shown={usage_seen}, charged {charged}, plain answer's usage {known}"
        return node, ok, why

    async def cost(self) -> float:
        import aiohttp

        async with aiohttp.ClientSession() as http, http.get(self.router + "/metrics") as resp:
            text = await resp.text()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("ballast_cost_total{")
        )

    async def priced_stream(self) -> tuple[str, bool, str]:
        """Without a key, on priced nodes: a stream's cost is the node's own count of
        its tokens times the price, and the usage chunk it was asked for is hidden."""
        before = await self.cost()
        node, usage_seen = await self.stream_without_usage(self.client)
        after = before
        async with asyncio.timeout(5):  # the metrics take finished requests in batches
            while after == before:
                await asyncio.sleep(0.05)
                after = await self.cost()
        charged = round((after - before) / PRICE_PER_MTOK * 1e6)
        known = self.usage_of.get(self.engine_of[node])  # greedy: the same tokens
        ok = not usage_seen and known is not None and charged == sum(known)
        why = f"usage chunk shown={usage_seen}, cost of {charged} tokens, plain usage {known}"
        return node, ok, why

    async def fallback(self) -> tuple[str, bool, str]:
        """A model no node serves, configured to fall back to one that is served."""
        raw = await self.client.chat.completions.with_raw_response.create(
            model=RETIRED, messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        answer = raw.parse()
        said = raw.headers.get("x-ballast-fallback")
        ok = said == MODEL and answer.model == MODEL
        return (
            raw.headers["x-ballast-node"],
            ok,
            f"header {said!r}, answer's model {answer.model!r}",
        )

    async def alias(self) -> tuple[str, bool, str]:
        """A request by an alias of the model (models.<name>.aliases): any of its nodes
        serves it, one of them under its own alias, and the answer, plain or streamed,
        names the model as the client asked."""
        ask = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        raw = await self.client.chat.completions.with_raw_response.create(model=ASKED_AS, **ask)
        plain = raw.parse().model
        stream = await self.client.chat.completions.create(model=ASKED_AS, stream=True, **ask)
        streamed = {chunk.model async for chunk in stream}
        ok = plain == ASKED_AS and streamed == {ASKED_AS}
        return raw.headers["x-ballast-node"], ok, f"answer's model {plain!r}, stream's {streamed}"

    async def foreign_request_id(self) -> tuple[str, bool, str]:
        raw = await self.client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
            extra_headers={"x-request-id": "client-id-not-a-uuid"},
        )  # fmt: skip
        ok = raw.headers.get("x-request-id") == "client-id-not-a-uuid"
        return raw.headers["x-ballast-node"], ok, "request id not echoed"

    async def engine_metrics(self) -> None:
        await asyncio.sleep(2.5)  # two scrape intervals
        for row in await self.fleet():
            if self.engine_of[row["id"]] == "llamacpp":
                self.record("engine metrics scraped", row["id"], row["load"] is not None,
                            "no load figures")  # fmt: skip

    async def kill_mid_run(self, victim: EngineNode, n: int = 60, concurrency: int = 4) -> str:
        """n chat requests at a concurrency; the victim is killed after a third."""
        done = failed = 0
        errors: list[str] = []

        async def worker(count: int) -> None:
            nonlocal done, failed
            for _ in range(count):
                try:
                    await self.chat()
                except Exception as e:
                    failed += 1
                    errors.append(f"{type(e).__name__}: {e}"[:100])
                done += 1
                if done == n // 3:
                    victim.proc.kill()

        await asyncio.gather(*(worker(n // concurrency) for _ in range(concurrency)))
        why = f" ({errors[0]})" if errors else ""
        return f"{'ok' if not failed else 'FAIL'} {n - failed}/{n}{why}"

    async def kill_mid_stream(self, tries: int = 6) -> tuple[str, str]:
        """A long stream whose llama.cpp node is killed after its first tokens: the
        caller must still get one whole answer (continued on another node)."""
        import aiohttp

        body = orjson.dumps({
            "model": MODEL, "messages": [{"role": "user", "content": "Tell a long story"}],
            "max_tokens": 3000, "stream": True, "ignore_eos": True,
        })  # fmt: skip
        by_id = {n.id: n for n in self.nodes}
        async with aiohttp.ClientSession() as http:
            for _ in range(tries):
                async with http.post(self.router + "/v1/chat/completions", data=body) as resp:
                    node = by_id[resp.headers["x-ballast-node"]]
                    if node.engine != "llamacpp":
                        await resp.read()
                        continue  # round robin: the next one lands elsewhere
                    first = await resp.content.readany()
                    node.proc.kill()
                    raw = first + await resp.read()
                evs = [e for e in raw.split(b"\n\n") if e]
                docs = [orjson.loads(e[6:]) for e in evs if e.startswith(b"data: {")]
                errors = [d for d in docs if "error" in d]
                text = "".join(c["delta"].get("content") or "" for d in docs if "choices" in d
                               for c in d["choices"])  # fmt: skip
                ids = {d.get("id") for d in docs if "choices" in d}
                finish = [c.get("finish_reason") for d in docs for c in d.get("choices", [])]
                ok = (evs[-1] == b"data: [DONE]" and not errors and len(ids) == 1
                      and finish[-1] == "length")  # fmt: skip
                async with http.get(self.router + "/metrics") as m:
                    continued = sum(
                        float(line.rsplit(" ", 1)[1]) for line in (await m.text()).splitlines()
                        if line.startswith("ballast_stream_resumes_total")
                        and 'outcome="continued"' in line
                    )  # fmt: skip
                ok = ok and continued >= 1
                why = "" if ok else f" (errors={errors[:1]}, ids={len(ids)}, end={evs[-1][:60]!r})"
                result = (f"{'ok' if ok else 'FAIL'}: continued on another node "
                          f"{continued:g} time(s), {len(text)} characters, one id, "
                          f"finish_reason {finish[-1]}, [DONE]{why}")  # fmt: skip
                return node.id, result
        return "", "FAIL: no stream landed on a llama.cpp node"

    async def substitution(self, sub: EngineNode, within: float = 90) -> str:
        """A llama-server with other weights joins under the same model name: it
        must not be verified, and the honest nodes must stay routable."""
        import aiohttp

        join = {"Authorization": f"Bearer {os.environ['BALLAST_JOIN_TOKEN']}"}
        admin = {"Authorization": f"Bearer {self.token}"}
        claims = {"id": sub.id, "url": sub.url, "models": [MODEL]}
        t0 = time.monotonic()
        async with aiohttp.ClientSession() as http:
            async with http.post(self.router + "/v1/nodes/register", json=claims,
                                 headers=join) as resp:  # fmt: skip
                if resp.status != 201:
                    return f"FAIL: registration answered {resp.status}"
                own = {"Authorization": f"Bearer {(await resp.json())['secret']}"}
            row: dict[str, Any] = {}
            while time.monotonic() - t0 < within:
                beat = self.router + f"/v1/nodes/{sub.id}/heartbeat"
                async with http.post(beat, json={}, headers=own):
                    pass
                rows = {r["id"]: r for r in await self.fleet()}
                row = rows[sub.id]
                if "substitution" in row["reason"]:
                    break
                await asyncio.sleep(0.5)
            async with http.delete(self.router + f"/admin/nodes/{sub.id}", headers=admin):
                pass
        honest = [r for r in rows.values() if r["models"] == [MODEL] and r["id"] != sub.id]
        kept = all(r["state"] in ("verified", "serving") for r in honest)
        caught = "substitution" in row.get("reason", "")
        took = time.monotonic() - t0
        routable = [r["id"] for r in honest if r["state"] in ("verified", "serving")]
        return (
            f"{'ok' if caught and kept else 'FAIL'}: {'unverified' if caught else 'not caught'} "
            f"after {took:.1f} s ({row.get('state')}: {row.get('reason', '')[:90]}); "
            f"honest nodes of the model routable: {len(routable)}/{len(honest)}"
        )

    async def conversations(self, n: int = 4, turns: int = 4) -> str:
        """Multi-turn chats under the ``score`` policy (cache-aware placement): every
        turn of a conversation should reach the same node, and llama.cpp's server
        should reuse the cached prompt (its ``timings.cache_n``) from turn 2 on."""
        import aiohttp

        admin = {"Authorization": f"Bearer {self.token}"}
        same = reused = later = on_llamacpp = 0
        async with aiohttp.ClientSession() as http:
            policy = {"name": "score", "params": {}}
            async with http.put(self.router + "/admin/policy", json=policy, headers=admin):
                pass
            for c in range(n):
                messages = [
                    {"role": "system", "content": f"You answer questions on topic {c}. " * 5},
                    {"role": "user", "content": f"Conversation {c}: tell me a story."},
                ]
                first = ""
                for turn in range(turns):
                    body = {"model": MODEL, "messages": messages, "max_tokens": 16}
                    async with http.post(self.router + "/v1/chat/completions", json=body) as r:
                        node = r.headers.get("x-ballast-node", "")
                        doc = await r.json()
                    answer = doc["choices"][0]["message"]["content"] or ""
                    if turn == 0:
                        first = node
                    else:
                        later += 1
                        same += node == first
                        if self.engine_of.get(node) == "llamacpp":
                            on_llamacpp += 1
                            reused += (doc.get("timings") or {}).get("cache_n", 0) > 0
                    messages += [{"role": "assistant", "content": answer},
                                 {"role": "user", "content": f"And then? ({turn})"}]  # fmt: skip
            policy = {"name": "round_robin", "params": {}}
            async with http.put(self.router + "/admin/policy", json=policy, headers=admin):
                pass
        ok = same == later and reused == on_llamacpp
        return (
            f"{'ok' if ok else 'FAIL'}: later turns on their conversation's node {same}/{later}; "
            f"of the {on_llamacpp} on llama.cpp servers, {reused} reused the cached prompt "
            "(timings.cache_n > 0)"
        )

    def table(self, fleet_rows: list[tuple[str, str]]) -> str:
        lines = ["| feature | " + " | ".join(ENGINES) + " |", "|---|" + "---|" * len(ENGINES)]
        for feature, by_engine in self.results.items():
            cells = [by_engine[e].cell() if e in by_engine else "n/a" for e in ENGINES]
            lines.append(f"| {feature} | " + " | ".join(cells) + " |")
        lines += ["", "| mixed fleet | result |", "|---|---|"]
        lines += [f"| {name} | {result} |" for name, result in fleet_rows]
        return "\n".join(lines)


async def conformance(
    router: str, token: str, nodes: list[EngineNode], substitute: EngineNode
) -> str:
    checks = Checks(router, token, nodes)
    await checks.wait_verified()
    await checks.probes()
    for feature, call in (
        ("chat (openai SDK)", checks.chat),
        ("chat stream with usage", checks.chat_stream),
        ("completions", checks.completion),
        ("completions stream", checks.completion_stream),
        ("client x-request-id that is not a UUID", checks.foreign_request_id),
        ("client key: charged the usage of a plain answer", checks.keyed_chat),
        ("client key: stream charged the node's count, usage chunk hidden", checks.keyed_stream),
        (
            "priced nodes: a stream's cost from the node's count, usage chunk hidden",
            checks.priced_stream,
        ),
        ("fallback model: answered by the served model, x-ballast-fallback", checks.fallback),
        ("model alias: served by every node of the model, answer named as asked", checks.alias),
    ):
        await checks.each(feature, 6, call)
    await checks.each("embeddings", 4, checks.embedding)
    await checks.engine_metrics()
    substituted = await checks.substitution(substitute)
    conversed = await checks.conversations()
    substitute.proc.kill()
    streamed_on, mid_stream = await checks.kill_mid_stream()
    victim = next(n for n in nodes if n.engine == "llamacpp" and n.model in (MODEL, SERVED_AS)
                  and n.id != streamed_on)  # fmt: skip
    killed = await checks.kill_mid_run(victim)
    return checks.table([
        ("a llama-server with other weights joins under the same model name", substituted),
        ("4 chats of 4 turns under the score policy (cache-aware placement)", conversed),
        ("a 3000-token stream whose llama.cpp node is killed after its first tokens",
         mid_stream),
        ("then 60 chat requests, 4 at a time, the other llama.cpp node killed after 20",
         killed),
    ])  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--out", type=Path, default=None, help="write the table into this file")
    p.add_argument("--build-only", action="store_true")
    args = p.parse_args()
    server, python = build(args.cache)
    model = tiny_model(args.cache, python)
    if args.build_only:
        return
    version = subprocess.run([str(server), "--version"], capture_output=True, text=True)
    build_id = (version.stdout + version.stderr).strip().splitlines()[0]
    procs: list[subprocess.Popen[bytes]] = []
    tmp = Path(tempfile.mkdtemp(prefix="ballast-engines-"))
    try:
        nodes = start_fleet(args.cache, server, python, model)
        procs += [n.proc for n in nodes]
        other = tiny_model(args.cache, python, seed=1)
        substitute = llama_server(args.cache, server, other, "lcpp-substitute")
        procs.append(substitute.proc)
        port = free_port()
        token = secrets.token_urlsafe(16)
        os.environ["BALLAST_ADMIN_TOKEN"] = token
        os.environ["BALLAST_JOIN_TOKEN"] = secrets.token_urlsafe(16)
        os.environ["BALLAST_ENGINES_KEY"] = "sk-bal-" + secrets.token_urlsafe(32)
        conf = ballast_config(tmp, port, nodes)
        ballast = spawn([sys.executable, "-m", "router.cli", "serve", "--config", str(conf)])
        procs.append(ballast)
        wait_port(port, ballast)
        table = asyncio.run(conformance(f"http://127.0.0.1:{port}", token, nodes, substitute))
    finally:
        stop_all(procs)
        shutil.rmtree(tmp, ignore_errors=True)
    header = (
        f"llama-cpp-python {LLAMA_CPP_PYTHON} (its server and its vendored llama.cpp's "
        f"llama-server, {build_id}), tiny random GGUF, through `ballast serve`"
    )
    print(header)
    print(table)
    if args.out is not None:
        write_doc(args.out, header, table)


def write_doc(path: Path, header: str, table: str) -> None:
    """Replace the generated section of ``path`` (between the markers) with the table."""
    begin, end = "<!-- engines:begin -->", "<!-- engines:end -->"
    text = path.read_text() if path.exists() else f"{begin}\n{end}\n"
    head, _, rest = text.partition(begin)
    _, _, tail = rest.partition(end)
    path.write_text(f"{head}{begin}\n{header}\n\n{table}\n{end}{tail}")


if __name__ == "__main__":
    main()
