"""A simulated OpenAI-compatible inference node (one GPU server) on loopback.

Each node follows a GPU :class:`Profile`: time to first token grows with the
prompt, tokens stream at the profile's rate per sequence, at most
``max_seqs`` sequences run at once, up to ``max_queue`` more wait, and beyond
that the node answers 503; a sequence longer than the KV cache holds
(``kv_tokens``) fails with an out-of-memory 500. Streaming responses are real SSE chunks emitted at
the token rate. A :class:`Fault` makes the node misbehave the ways real
decentralized supply does (hang, error bursts, mid-stream disconnects, slowness,
lying about models); ``stop()``/``start()`` model a crash (connection refused).

Engine-style ``/metrics`` use vLLM's metric names so a router can scrape it.
``engine`` and ``quirks`` make a node behave like a real engine where engines
differ (see :data:`QUIRKS` and :func:`context_error_body`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import math
import re
import socket
import struct
import time
import zlib
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from random import Random
from typing import Any

import orjson
from aiohttp import web


@dataclass(frozen=True)
class Profile:
    """Relative behaviour of one GPU class serving a small model."""

    name: str
    ttft_s: float  # time to first token for an empty prompt
    prefill_tok_per_s: float  # prompt processing rate
    tokens_per_s: float  # decode rate of one sequence
    max_seqs: int  # sequences decoded at once
    vram_gb: float
    kv_tokens: int = 1 << 30  # KV-cache capacity in tokens; a longer sequence runs out of memory


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile("H100", 0.020, 40000, 120, 64, 80, kv_tokens=400_000),
        Profile("A100", 0.030, 25000, 90, 48, 80, kv_tokens=400_000),
        Profile("L40S", 0.045, 15000, 70, 32, 48, kv_tokens=200_000),
        Profile("RTX 4090", 0.050, 12000, 80, 16, 24, kv_tokens=40_000),
        Profile("RTX 3090", 0.080, 7000, 55, 12, 24, kv_tokens=40_000),
        Profile("T4", 0.150, 2500, 25, 8, 16, kv_tokens=6_000),
    )
}


@dataclass
class Fault:
    """How a node misbehaves. ``mode`` is one of the names below."""

    # none | hang | error | slow | midstream | stall | throttle | lie | garbage (a 200
    # whose body is not an answer, for requests that are not greedy: probes pass)
    mode: str = "none"
    rate: float = 1.0  # share of requests affected (error, midstream)
    status: int = 500  # error: HTTP status to answer
    retry_after: float | None = None  # error: Retry-After header (seconds)
    factor: float = 5.0  # slow: latency multiplier; throttle: token interval multiplier
    after_tokens: int = 2  # midstream, stall, throttle: tokens sent before it happens


QUIRKS = frozenset(
    {
        "uuid_request_ids",  # 400 with an empty body for a non-UUID x-request-id (llama-cpp-python)
        "reject_all",  # 400 with an empty body for every inference request
        "close_after_stream",  # closes the connection after each stream, advertising keep-alive
        "echo_prefill",  # a trailing assistant message is continued and echoed (llama.cpp)
    }
)
_GENERATED = re.compile(r"(?:t\d+ )+$")
_WORDS = tuple(
    "the a sea cat blue morning bread river light small quiet green stone warm wind "
    "paper tree song cloud road".split()
)
_UUID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")


def context_error_body(engine: str, prompt: int, n_out: int, n_ctx: int) -> tuple[int, bytes]:
    """(status, body) of a context-length error as ``engine`` words it."""
    need = prompt + n_out
    if engine == "llamacpp":
        doc: dict[str, Any] = {
            "error": {
                "code": 400,
                "type": "exceed_context_size_error",
                "n_prompt_tokens": prompt,
                "n_ctx": n_ctx,
                "message": f"request ({need} tokens) exceeds the available "
                f"context size ({n_ctx} tokens), try increasing it",
            }
        }
        return 400, orjson.dumps(doc)
    if engine == "sglang":
        doc = {
            "object": "error",
            "type": "BadRequestError",
            "param": None,
            "code": 400,
            "message": f"The input ({prompt} tokens) is longer than the model's context "
            f"length ({n_ctx} tokens).",
        }
        return 400, orjson.dumps(doc)
    if engine == "tgi":
        doc = {
            "error_type": "validation",
            "error": "Input validation error: `inputs` tokens + "
            f"`max_new_tokens` must be <= {n_ctx}. Given: {prompt} `inputs` tokens and "
            f"{n_out} `max_new_tokens`",
        }
        return 422, orjson.dumps(doc)
    message = (
        f"This model's maximum context length is {n_ctx} tokens. However, you requested "
        f"{need} tokens ({prompt} in the messages, {n_out} in the completion). Please "
        "reduce the length of the messages or completion."
    )
    if engine == "vllm":
        doc = {
            "object": "error",
            "message": message,
            "type": "BadRequestError",
            "param": None,
            "code": 400,
        }
    else:  # llama-cpp-python, OpenAI
        doc = {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": "messages",
                "code": "context_length_exceeded",
            }
        }
    return 400, orjson.dumps(doc)  # fmt: skip


@dataclass
class SimConfig:
    id: str
    models: list[str]
    profile: Profile = PROFILES["RTX 4090"]
    claimed_models: list[str] = field(default_factory=list)  # lie: claimed, not served
    max_queue: int = 64
    time_scale: float = 1.0  # multiply every delay (tests run faster with < 1)
    default_max_tokens: int = 16
    seed: int = 0
    # owned_by in /v1/models, the wording of context-length errors: by default the
    # simulator answers as vLLM does (its metric names, continue_final_message).
    engine: str = "vllm"
    quirks: tuple[str, ...] = ()  # from QUIRKS
    context_length: int | None = None  # prompt + max_tokens beyond this: a context error
    # Answers "t0 t1 t2 ..." instead of "tok tok ...": token i of an answer is always
    # the same, so a continued answer can be checked word for word.
    numbered: bool = False
    # The model it really runs (a substitute): greedy answers (temperature 0) are that
    # model's, whatever the request names.
    serves_as: str | None = None
    # Prefix caching (vLLM's, SGLang's): the KV of recent prompts is kept, in blocks,
    # in half of the profile's KV cache; a prompt's cached leading blocks skip prefill.
    prefix_cache: bool = False


CACHE_BLOCK_CHARS = 256  # a prefix-cache block: 64 tokens at 4 characters a token


def _prompt_text(doc: dict[str, Any]) -> str:
    if isinstance(doc.get("messages"), list):
        return "".join(
            f"<{m.get('role')}>{m.get('content', '')}"
            for m in doc["messages"]
            if isinstance(m, dict)
        )
    return str(doc.get("prompt", doc.get("input", "")))


class PrefixCache:
    """An LRU of prompt blocks, each named by the hash of the prompt up to its end."""

    def __init__(self, capacity_tokens: int) -> None:
        self.capacity = max(1, capacity_tokens * 4 // CACHE_BLOCK_CHARS)
        self.blocks: OrderedDict[int, None] = OrderedDict()
        self.queried = 0  # prompt tokens asked for
        self.hit = 0  # of them, found cached

    def lookup(self, text: str, prompt_tokens: int) -> int:
        """Cached tokens at the start of ``text``; its blocks become the most recent."""
        chain, cached, missed = 0, 0, False
        for start in range(0, len(text) - CACHE_BLOCK_CHARS + 1, CACHE_BLOCK_CHARS):
            chain = zlib.crc32(text[start : start + CACHE_BLOCK_CHARS].encode(), chain)
            h = chain | (start << 32)
            if not missed and h in self.blocks:
                cached += CACHE_BLOCK_CHARS // 4
                self.blocks.move_to_end(h)
            else:
                missed = True
                self.blocks[h] = None
                if len(self.blocks) > self.capacity:
                    self.blocks.popitem(last=False)
        cached = min(cached, prompt_tokens)
        self.queried += prompt_tokens
        self.hit += cached
        return cached


def _prompt_tokens(doc: dict[str, Any], words: bool = False) -> int:
    """Tokens in the prompt: a quarter of its characters, or (``words``) one per word."""
    if "messages" in doc:
        text = " ".join(str(m.get("content", "")) for m in doc["messages"] if isinstance(m, dict))
    else:
        text = str(doc.get("prompt", doc.get("input", "")))
    return max(1, len(text.split()) if words else len(text) // 4)


class SimNode:
    def __init__(self, cfg: SimConfig, fault: Fault | None = None) -> None:
        self.cfg = cfg
        self.fault = fault or Fault()
        self.rng = Random(cfg.seed)
        self.running = 0
        self.waiting = 0
        self.requests = 0
        self.callers: Counter[str] = Counter()  # requests by sending router (x-ballast-via)
        self.usage_sent = [0, 0]  # prompt and completion tokens reported in usage fields
        self.cancelled = 0  # requests whose client (the router) went away
        self.cancel_seen = asyncio.Event()
        self.arrived = asyncio.Event()  # set once a request has reached the node
        self.port = 0
        self._slots = asyncio.Semaphore(cfg.profile.max_seqs)
        self.cache = PrefixCache(cfg.profile.kv_tokens // 2) if cfg.prefix_cache else None
        self._runner: web.AppRunner | None = None
        self._sock: socket.socket | None = None
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._generate)
        app.router.add_post("/v1/completions", self._generate)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        self.app = app

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set_fault(self, fault: Fault) -> None:
        self.fault = fault

    async def start(self, port: int = 0, host: str = "127.0.0.1") -> None:
        """Listen on ``host`` (the same port again after a ``stop()``)."""
        if self._runner is None:
            self._runner = web.AppRunner(self.app, access_log=None, handler_cancellation=True)
            await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port or self.port))
        self.port = sock.getsockname()[1]
        self._sock = sock
        site = web.SockSite(self._runner, sock)
        await site.start()

    async def stop(self) -> None:
        """Crash: close the listener and every open connection (then: refused)."""
        if self._runner is not None:
            for site in list(self._runner.sites):
                await site.stop()
            server = self._runner.server
            if server is not None:
                await server.shutdown(0.001)  # 0 would mean no timeout at all

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- handlers ---------------------------------------------------------

    def _count_usage(self, prompt: int, completion: int) -> None:
        """Tokens this node reported in ``usage`` fields (what a key's usage must add up to)."""
        self.usage_sent[0] += prompt
        self.usage_sent[1] += completion

    def _delay(self, seconds: float) -> float:
        f = self.fault
        return seconds * self.cfg.time_scale * (f.factor if f.mode == "slow" else 1.0)

    async def _preamble(self, request: web.Request) -> tuple[dict[str, Any], web.Response | None]:
        self.requests += 1
        self.callers[request.headers.get("x-ballast-via", "")] += 1
        self.arrived.set()
        quirks = self.cfg.quirks
        rid = request.headers.get("x-request-id", "")
        if "reject_all" in quirks or (
            "uuid_request_ids" in quirks and rid and not _UUID.fullmatch(rid)
        ):
            await request.read()
            return {}, web.Response(status=400)
        try:
            doc = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return {}, _error(400, "invalid JSON")
        model = doc.get("model")
        if model not in self.cfg.models:
            return doc, _error(404, f"model {model!r} not found")
        f = self.fault
        if f.mode == "hang":
            try:
                await asyncio.Event().wait()  # black hole: until the client gives up
            except asyncio.CancelledError:
                self.cancelled += 1
                self.cancel_seen.set()
                raise
        if f.mode == "error" and self.rng.random() < f.rate:
            headers = {"Retry-After": str(f.retry_after)} if f.retry_after is not None else None
            return doc, _error(f.status, "simulated failure", headers)
        if self.waiting >= self.cfg.max_queue:
            return doc, _error(503, "server overloaded", {"Retry-After": "1"})
        if f.mode == "garbage" and doc.get("temperature") != 0 and self.rng.random() < f.rate:
            return doc, web.Response(body=b"<html>lorem ipsum</html>\n\n", content_type="text/html")
        return doc, None

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        doc, err = await self._preamble(request)
        if err is not None:
            return err
        p = self.cfg.profile
        chat = request.path.endswith("chat/completions")
        prompt = _prompt_tokens(doc, words=self.cfg.numbered)
        n_out = doc.get("max_tokens") or doc.get("max_completion_tokens")
        n_out = int(n_out) if isinstance(n_out, int) and n_out > 0 else self.cfg.default_max_tokens
        n_ctx = self.cfg.context_length
        if n_ctx is not None and prompt + n_out > n_ctx:
            status, body = context_error_body(self.cfg.engine, prompt, n_out, n_ctx)
            return web.Response(status=status, body=body, content_type="application/json")
        if prompt + n_out > p.kv_tokens:
            return _error(
                500, f"CUDA out of memory: {prompt + n_out} tokens do not fit the KV cache"
            )
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            cached = self.cache.lookup(_prompt_text(doc), prompt) if self.cache else 0
            await asyncio.sleep(self._delay(p.ttft_s + (prompt - cached) / p.prefill_tok_per_s))
            rid = f"sim-{self.cfg.id}-{self.requests}"
            tok_s = self._delay(1.0 / p.tokens_per_s)
            start, echo = self._continues(doc, chat)
            greedy = self._greedy(doc)
            usage = {"prompt_tokens": prompt, "completion_tokens": n_out,
                     "total_tokens": prompt + n_out,
                     "prompt_tokens_details": {"cached_tokens": cached}}  # fmt: skip
            if doc.get("stream") is True:
                opts = doc.get("stream_options")
                with_usage = isinstance(opts, dict) and opts.get("include_usage") is True
                if with_usage:
                    self._count_usage(prompt, n_out)
                return await self._stream(
                    request, doc["model"], rid, chat, n_out, tok_s, start, echo,
                    usage if with_usage else None, greedy,
                )  # fmt: skip
            await asyncio.sleep(tok_s * (n_out - 1))
            text = echo + "".join(self._token(start + i, greedy) for i in range(n_out))
            choice: dict[str, Any] = (
                {"index": 0, "message": {"role": "assistant", "content": text}}
                if chat
                else {"index": 0, "text": text, "logprobs": None}
            )
            choice["finish_reason"] = "length"
            body = {
                "id": rid,
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()),
                "model": doc["model"],
                "choices": [choice],
                "usage": usage,
                "system_fingerprint": self.cfg.id,
            }
            self._count_usage(prompt, n_out)
            return web.Response(body=orjson.dumps(body), content_type="application/json")
        except asyncio.CancelledError:
            self.cancelled += 1
            self.cancel_seen.set()
            raise
        finally:
            self.running -= 1
            self._slots.release()

    def _token(self, i: int, greedy: list[str] | None = None) -> str:
        if greedy:
            return greedy[i % len(greedy)]
        return f"t{i} " if self.cfg.numbered else "tok "

    def _greedy(self, doc: dict[str, Any]) -> list[str] | None:
        """A greedy request's answer, word by word: the same for every node running
        the same model (``serves_as``, else the model asked for) and prompt."""
        if doc.get("temperature") != 0 or self.cfg.numbered:
            return None
        model = self.cfg.serves_as or str(doc.get("model"))
        seed = zlib.crc32(orjson.dumps([model, doc.get("messages"), doc.get("prompt")]))
        rng = Random(seed)
        return [rng.choice(_WORDS) + " " for _ in range(12)]

    def _continues(self, doc: dict[str, Any], chat: bool) -> tuple[int, str]:
        """(index of the first token to generate, prefill text to echo) for a request
        continuing a partial answer: a final assistant message (with vLLM's
        continue_final_message, or as llama.cpp's prefill), or a completion prompt
        that ends in generated tokens."""
        if chat:
            messages = doc.get("messages") or []
            last = messages[-1] if messages and isinstance(messages[-1], dict) else {}
            if last.get("role") != "assistant":
                return 0, ""
            text = str(last.get("content") or "")
            start = len(text.split()) if self.cfg.numbered else 0
            if doc.get("continue_final_message") is True:
                return start, ""
            if "echo_prefill" in self.cfg.quirks:
                return start, text
            return 0, ""
        found = _GENERATED.search(str(doc.get("prompt", ""))) if self.cfg.numbered else None
        return (len(found.group(0).split()), "") if found else (0, "")

    async def _stream(
        self,
        request: web.Request,
        model: str,
        rid: str,
        chat: bool,
        n_out: int,
        tok_s: float,
        start: int = 0,
        echo: str = "",
        usage: dict[str, int] | None = None,
        greedy: list[str] | None = None,
    ) -> web.StreamResponse:
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        created = int(time.time())
        f = self.fault
        hit = f.mode in ("midstream", "stall", "throttle") and self.rng.random() < f.rate
        drop_at = f.after_tokens if hit and f.mode != "throttle" else -1
        slow_from = f.after_tokens if hit and f.mode == "throttle" else n_out
        for i in range(n_out):
            if i == drop_at and f.mode == "stall":
                await asyncio.Event().wait()  # silent, connection open, until the client leaves
            if i == drop_at and request.transport is not None:
                request.transport.abort()  # the node dies mid-stream
                return out
            if i:
                await asyncio.sleep(tok_s * (f.factor if i >= slow_from else 1.0))
            last = i == n_out - 1
            piece = (echo if i == 0 else "") + self._token(start + i, greedy)
            if chat:
                delta: dict[str, Any] = {"content": piece}
                if i == 0:
                    delta["role"] = "assistant"
                choice: dict[str, Any] = {"index": 0, "delta": delta}
            else:
                choice = {"index": 0, "text": piece, "logprobs": None}
            choice["finish_reason"] = "length" if last else None
            chunk = {
                "id": rid,
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created,
                "model": model,
                "choices": [choice],
            }
            await out.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        if usage is not None:
            chunk = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                     "created": created, "model": model, "choices": [], "usage": usage}  # fmt: skip
            await out.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        await out.write(b"data: [DONE]\n\n")
        await out.write_eof()
        if "close_after_stream" in self.cfg.quirks and request.transport is not None:
            # llama.cpp's server: the response said keep-alive, the socket closes anyway.
            asyncio.get_running_loop().call_later(0.0005, request.transport.close)
        return out

    async def _embeddings(self, request: web.Request) -> web.Response:
        doc, err = await self._preamble(request)
        if err is not None:
            return err
        await asyncio.sleep(self._delay(self.cfg.profile.ttft_s))
        inputs = doc.get("input", "")
        inputs = inputs if isinstance(inputs, list) else [inputs]
        b64 = doc.get("encoding_format") == "base64"
        data = []
        for i, text in enumerate(inputs):
            vec = [math.sin(len(str(text)) + j) for j in range(8)]
            emb: Any = base64.b64encode(struct.pack("<8f", *vec)).decode() if b64 else vec
            data.append({"object": "embedding", "index": i, "embedding": emb})
        tokens = sum(max(1, len(str(t)) // 4) for t in inputs)
        body = {
            "object": "list",
            "data": data,
            "model": doc["model"],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        self._count_usage(tokens, 0)
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    async def _models(self, request: web.Request) -> web.Response:
        data = [
            {"id": m, "object": "model", "created": 0, "owned_by": self.cfg.engine}
            for m in self.cfg.models
        ]
        return web.json_response({"object": "list", "data": data})

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _metrics(self, request: web.Request) -> web.Response:
        p = self.cfg.profile
        model = self.cfg.models[0] if self.cfg.models else ""
        usage = min(1.0, self.running / p.max_seqs)
        text = (
            f'vllm:num_requests_running{{model_name="{model}"}} {self.running}\n'
            f'vllm:num_requests_waiting{{model_name="{model}"}} {self.waiting}\n'
            f'vllm:kv_cache_usage_perc{{model_name="{model}"}} {usage}\n'
        )
        if self.cache is not None:  # in tokens, as vLLM counts them
            text += (
                f'vllm:prefix_cache_queries_total{{model_name="{model}"}} {self.cache.queried}\n'
                f'vllm:prefix_cache_hits_total{{model_name="{model}"}} {self.cache.hit}\n'
            )
        return web.Response(text=text, content_type="text/plain")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"message": message, "type": "sim_error", "param": None, "code": status}}
    return web.Response(
        status=status, body=orjson.dumps(body), content_type="application/json", headers=headers
    )


def sim_config(
    id: str, models: list[str], profile: str | Profile = "RTX 4090", **kw: Any
) -> SimConfig:
    """Shorthand: a :class:`SimConfig` with a profile given by name from :data:`PROFILES`."""
    prof = PROFILES[profile] if isinstance(profile, str) else profile
    return SimConfig(id=id, models=models, profile=prof, **kw)


def main() -> None:
    """``python -m loadtest.simnode``: one simulated node, e.g. in the compose stack."""
    import argparse
    import asyncio

    ap = argparse.ArgumentParser(description="One simulated GPU node (OpenAI-compatible).")
    ap.add_argument("--id", required=True)
    ap.add_argument("--model", action="append", required=True, help="a model it serves")
    ap.add_argument("--profile", default="RTX 4090", choices=sorted(PROFILES))
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9000)
    args = ap.parse_args()

    async def run() -> None:
        sim = SimNode(sim_config(args.id, args.model, args.profile))
        await sim.start(args.port, args.host)
        print(f"simulated node {args.id} ({args.profile}) on {args.host}:{sim.port}", flush=True)
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


if __name__ == "__main__":
    main()
