"""The official ``openai`` client works against Ballast unchanged."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import MODEL, MakeRouter, MakeSim, node_entry


@pytest.fixture
async def client(fleet: MakeSim, make_router: MakeRouter) -> openai.AsyncOpenAI:
    a, b = await fleet("a"), await fleet("b", profile="T4")
    r = await make_router([node_entry(a), node_entry(b)])
    return openai.AsyncOpenAI(base_url=r.url + "/v1", api_key="client-key", max_retries=0)


async def test_chat(client: openai.AsyncOpenAI) -> None:
    out = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert out.choices[0].message.content == "tok tok tok "
    assert out.usage is not None and out.usage.completion_tokens == 3


async def test_chat_stream(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True
    )
    parts = [c.choices[0].delta.content async for c in stream]
    assert "".join(p or "" for p in parts) == "tok " * 5


async def test_completions_plain_and_stream(client: openai.AsyncOpenAI) -> None:
    out = await client.completions.create(model=MODEL, prompt="once upon", max_tokens=2)
    assert out.choices[0].text == "tok tok "
    stream = await client.completions.create(
        model=MODEL, prompt="once upon", max_tokens=2, stream=True
    )
    assert [c.choices[0].text async for c in stream] == ["tok ", "tok "]


async def test_embeddings(client: openai.AsyncOpenAI) -> None:
    out = await client.embeddings.create(model=MODEL, input=["a", "bb"])
    assert len(out.data) == 2 and len(out.data[0].embedding) == 8


async def test_models(client: openai.AsyncOpenAI) -> None:
    models = [m.id async for m in client.models.list()]
    assert models == [MODEL]


async def test_errors_raise_typed_exceptions(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await client.chat.completions.create(
            model="missing", messages=[{"role": "user", "content": "hi"}]
        )
    assert info.value.code == "model_not_found"
