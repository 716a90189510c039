"""The fleet simulator does what its profiles and fault modes say."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson
import pytest

from loadtest.fleet import Fleet
from loadtest.simnode import Fault, Profile, SimNode, sim_config
from tests.conftest import MODEL, MakeSim, chat

FAST = Profile("test-card", ttft_s=0.08, prefill_tok_per_s=1e9, tokens_per_s=25, max_seqs=2,
               vram_gb=24)  # fmt: skip


async def timed_stream(http: aiohttp.ClientSession, url: str, n: int) -> tuple[float, list[float]]:
    """Time to first chunk, and the arrival time of every chunk."""
    t0 = time.monotonic()
    arrivals = []
    async with http.post(url + "/v1/chat/completions", data=orjson.dumps(chat(True, n))) as resp:
        assert resp.status == 200
        async for line in resp.content:
            if line.startswith(b"data: {"):
                arrivals.append(time.monotonic() - t0)
    return arrivals[0], arrivals


async def test_profile_ttfb_and_token_rate(fleet: MakeSim, http: aiohttp.ClientSession) -> None:
    sim = await fleet("card", profile=FAST, time_scale=1.0)
    ttfb, arrivals = await timed_stream(http, sim.url, 11)
    assert len(arrivals) == 11
    assert 0.08 <= ttfb < 0.08 + 0.15
    tokens_per_s = 10 / (arrivals[-1] - arrivals[0])
    assert 25 * 0.6 < tokens_per_s <= 25 * 1.05


async def test_ttfb_grows_with_the_prompt(fleet: MakeSim, http: aiohttp.ClientSession) -> None:
    slow_prefill = Profile("p", 0.01, 20_000, 100, 4, 24)  # 20k prompt tokens per second
    sim = await fleet("p", profile=slow_prefill, time_scale=1.0)

    async def ttfb(words: int) -> float:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "word " * words}],
                "max_tokens": 1}  # fmt: skip
        t0 = time.monotonic()
        async with http.post(sim.url + "/v1/chat/completions", json=body) as resp:
            await resp.read()
        return time.monotonic() - t0

    short, long = await ttfb(10), await ttfb(16_000)  # ~20k prompt tokens: ~1 s of prefill
    assert long - short > 0.7


async def test_over_capacity_queues_then_refuses(fleet: MakeSim) -> None:
    one_seq = Profile("one", 0.3, 1e9, 100, 1, 24)
    sim = await fleet("busy", profile=one_seq, time_scale=1.0, max_queue=1)
    async with aiohttp.ClientSession() as http:

        async def send() -> int:
            async with http.post(sim.url + "/v1/chat/completions", json=chat()) as resp:
                await resp.read()
                return resp.status

        statuses = await asyncio.gather(*(send() for _ in range(3)))
    assert sorted(statuses) == [200, 200, 503]  # one running, one queued, one refused


async def test_fault_error_with_retry_after(fleet: MakeSim, http: aiohttp.ClientSession) -> None:
    sim = await fleet("e", fault=Fault(mode="error", status=429, retry_after=3))
    async with http.post(sim.url + "/v1/chat/completions", json=chat()) as resp:
        assert resp.status == 429 and resp.headers["Retry-After"] == "3"
        assert "error" in await resp.json()


async def test_fault_slow_multiplies_latency(fleet: MakeSim, http: aiohttp.ClientSession) -> None:
    sim = await fleet("s", profile=FAST, time_scale=1.0)
    normal, _ = await timed_stream(http, sim.url, 1)
    sim.set_fault(Fault(mode="slow", factor=4))
    slow, _ = await timed_stream(http, sim.url, 1)
    assert slow > 3 * 0.08 and slow > 2.5 * normal


async def test_fault_hang_answers_nothing(fleet: MakeSim) -> None:
    sim = await fleet("h", fault=Fault(mode="hang"))
    timeout = aiohttp.ClientTimeout(sock_read=0.3)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        with pytest.raises(asyncio.TimeoutError):
            async with http.post(sim.url + "/v1/chat/completions", json=chat()) as resp:
                await resp.read()
    await asyncio.wait_for(sim.cancel_seen.wait(), 5)


async def test_fault_midstream_drops_the_connection(
    fleet: MakeSim, http: aiohttp.ClientSession
) -> None:
    sim = await fleet("m", fault=Fault(mode="midstream", after_tokens=3))
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.post(sim.url + "/v1/chat/completions", json=chat(True, 10)) as resp:
            await resp.read()


async def test_crash_refuses_then_recovers_on_the_same_port(
    fleet: MakeSim, http: aiohttp.ClientSession
) -> None:
    sim = await fleet("c")
    url = sim.url
    await sim.stop()
    with pytest.raises(aiohttp.ClientConnectorError):
        async with http.post(url + "/v1/chat/completions", json=chat()):
            pass
    await sim.start()
    assert sim.url == url
    async with http.post(url + "/v1/chat/completions", json=chat()) as resp:
        assert resp.status == 200


async def test_engine_metrics_use_vllm_names(fleet: MakeSim, http: aiohttp.ClientSession) -> None:
    sim = await fleet("v")
    async with http.get(sim.url + "/metrics") as resp:
        text = await resp.text()
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc"):  # fmt: skip
        assert f'{name}{{model_name="{MODEL}"}}' in text


async def test_fleet_file_liars_schedule_and_churn(http: aiohttp.ClientSession) -> None:
    fleet = Fleet(
        {
            "seed": 1,
            "time_scale": 0.01,
            "nodes": [
                {"id": "ok", "profile": "H100"},
                {"id": "liar", "models": ["other"], "claims": [MODEL], "claimed_vram_gb": 80},
                {"id": "flappy", "faults": [{"mode": "flap", "period": 0.2, "at": 0, "for": 0.4}]},
                {"id": "late", "join_at": 0.3, "leave_at": 0.6},
                {"id": "erring", "faults": [{"mode": "error", "status": 503, "at": 0.1,
                                             "for": 0.2}]},
            ],
        }
    )  # fmt: skip
    await fleet.start()
    try:
        nodes = {n["id"]: n for n in fleet.router_nodes()}
        assert nodes["liar"]["models"] == [MODEL] and nodes["liar"]["vram_gb"] == 80
        liar = fleet.sims["liar"]
        async with http.get(liar.url + "/v1/models") as resp:
            assert [m["id"] for m in (await resp.json())["data"]] == ["other"]
        async with http.post(liar.url + "/v1/chat/completions", json=chat()) as resp:
            assert resp.status == 404  # it claims the model but cannot serve it
        await fleet.wait_events(len(fleet.events))
        actions = [(node, action) for _, node, action in fleet.log]
        assert [a for n, a in actions if n == "flappy"] == ["crash", "recover", "crash", "recover"]
        assert [a for n, a in actions if n == "late"] == ["leave", "join", "leave"]
        assert [a for n, a in actions if n == "erring"] == ["error", "recover"]
        times = [t for t, n, _ in fleet.log if n == "late"]
        assert times == sorted(times) and times[-1] >= 0.6
        with pytest.raises(aiohttp.ClientConnectorError):  # "late" has left for good
            async with http.post(fleet.sims["late"].url + "/v1/chat/completions", json=chat()):
                pass
    finally:
        await fleet.close()


def test_random_faults_and_churn_are_seeded() -> None:
    spec = {
        "seed": 9,
        "nodes": [{"id": "n", "count": 10}],
        "random_faults": {"fraction": 0.3, "window_s": 10},
        "churn": {"every_s": 2, "fraction": 0.2},
        "duration_s": 10,
    }

    def plan(s: dict) -> list[tuple[float, str, str]]:
        return [(e.at, e.node, e.action) for e in Fleet(s).events]

    first = plan(spec)
    assert first == plan(spec)
    assert any(a in ("hang", "error", "slow", "midstream", "crash") for _, _, a in first)
    assert sum(a == "leave" for _, _, a in first) >= 4  # churn every 2 s over 10 s
    assert first != plan({**spec, "seed": 10})


def test_unknown_fault_mode_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown fault mode"):
        Fleet({"nodes": [{"id": "x", "faults": [{"mode": "explode"}]}]})


def test_simnode_config_shorthand() -> None:
    cfg = sim_config("a", [MODEL], "T4")
    assert cfg.profile.name == "T4" and SimNode(cfg).cfg.id == "a"


async def test_sequence_longer_than_the_kv_cache_runs_out_of_memory(
    fleet: MakeSim, http: aiohttp.ClientSession
) -> None:
    sim = await fleet("t4", profile="T4")  # 6,000 tokens of KV cache
    long = {"model": MODEL, "messages": [{"role": "user", "content": "word " * 6000}],
            "max_tokens": 16}  # fmt: skip
    async with http.post(sim.url + "/v1/chat/completions", json=long) as resp:
        assert resp.status == 500
        assert "out of memory" in (await resp.json())["error"]["message"]
    async with http.post(sim.url + "/v1/chat/completions", json=chat()) as resp:
        assert resp.status == 200
