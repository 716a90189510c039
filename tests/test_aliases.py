"""Model aliases: one model, served under different names by different nodes."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from router.config import ConfigError, parse_config
from tests.conftest import MakeRouter, MakeSim, Node, chat, node_entry

CANON = "meta-llama/Llama-3.1-8B-Instruct"
ALIASES = ["llama3.1:8b", "Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf"]


async def test_a_request_by_any_name_reaches_every_node_under_its_own_name(
    fleet: MakeSim, node: Node, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    seen: list[str] = []

    async def gguf(request: web.Request) -> web.StreamResponse:
        doc = await request.json()
        seen.append(doc["model"])
        if doc["model"] != ALIASES[1]:
            return web.json_response({"error": {"message": "no such model"}}, status=404)
        answer = {"id": "x", "model": "/models/local.gguf", "object": "chat.completion",
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                               "finish_reason": "stop"}]}  # fmt: skip
        if not doc.get("stream"):
            return web.json_response(answer)
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        choice = {"index": 0, "delta": {"content": "ok"}, "finish_reason": "stop"}
        delta = {"id": "x", "model": "/models/local.gguf", "choices": [choice]}
        await out.write(b"data: " + orjson.dumps(delta) + b"\n\ndata: [DONE]\n\n")
        return out

    ollama = await fleet("ollama", models=(ALIASES[0],))
    r = await make_router(
        [node_entry(ollama), {**(await node(gguf, id="gguf")), "models": [ALIASES[1]]}],
        models={CANON: {"aliases": ALIASES}},
        policy={"name": "round_robin"},
    )
    nodes = r.router.fleet.nodes
    assert nodes["ollama"].models == (CANON,) and nodes["gguf"].models == (CANON,)
    async with http.get(r.url + "/v1/models") as resp:
        listed = [m["id"] for m in (await resp.json())["data"]]
    assert listed == [CANON, *sorted(ALIASES)]
    by_node: dict[str, set[str]] = {}
    for asked in (CANON, *ALIASES) * 2:
        for stream in (False, True):
            body = chat(stream=stream, model=asked)
            async with http.post(r.url + "/v1/chat/completions", json=body) as resp:
                assert resp.status == 200, await resp.text()
                raw = await resp.read()
            models = [
                orjson.loads(line[6:])["model"]
                for line in raw.split(b"\n\n")
                if line.startswith(b"data: {")
            ] if stream else [orjson.loads(raw)["model"]]  # fmt: skip
            assert set(models) == {asked}, (asked, stream, models)
            by_node.setdefault(resp.headers["x-ballast-node"], set()).add(asked)
    assert set(by_node) == {"ollama", "gguf"}  # each served requests by every name
    assert set(seen) == {ALIASES[1]}  # the GGUF node only ever heard its own name
    assert all(len(names) == 3 for names in by_node.values())


def test_an_alias_names_one_model_only() -> None:
    models: dict[str, Any] = {"a": {"aliases": ["x"]}, "b": {"aliases": ["x", "a"]}}
    with pytest.raises(ConfigError) as e:
        parse_config({"models": models})
    text = str(e.value)
    assert "'x' is already an alias of 'a'" in text and "'a' is a model of its own" in text
