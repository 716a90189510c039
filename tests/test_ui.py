"""The status page in a real browser: headless Chromium (Debian's), driven by
Playwright, against a running router."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from loadtest.simnode import Fault
from tests.conftest import MakeRouter, MakeSim, chat, node_entry

TOKEN = "ui-admin-token"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    chromium = shutil.which("chromium")
    assert chromium, "chromium missing: the test command installs Debian's chromium"
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield browser
        await browser.close()


async def test_status_page_shows_what_an_operator_needs(
    fleet: MakeSim,
    make_router: MakeRouter,
    http: aiohttp.ClientSession,
    browser: Browser,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("UI_ADMIN_TOKEN", TOKEN)
    good = await fleet("good-h100")
    bad = await fleet("bad-4090", profile="RTX 4090", fault=Fault(mode="error"))
    spare = await fleet("spare-t4", profile="T4")
    r = await make_router(
        [node_entry(good), node_entry(bad), node_entry(spare)],
        admin={"token_env": "UI_ADMIN_TOKEN"},
        health={"probe": False, "consecutive_failures": 2},
        policy={"name": "round_robin"},
    )
    admin = {"Authorization": f"Bearer {TOKEN}"}
    async with http.post(r.url + "/admin/nodes/spare-t4/drain", headers=admin) as resp:
        assert resp.status == 200
    for _ in range(6):  # the failing node fails twice in a row and is ejected
        async with http.post(r.url + "/v1/chat/completions", data=orjson.dumps(chat())) as resp:
            assert resp.status == 200

    async with http.get(r.url + "/admin/status") as resp:
        assert resp.status == 401  # the data needs the admin token; the page holds none
    async with http.get(r.url + "/ui") as resp:
        html = await resp.text()
        assert "script-src 'sha256-" in resp.headers["Content-Security-Policy"]
    assert TOKEN not in html and "good-h100" not in html

    page: Page = await browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    await page.goto(r.url + "/ui")
    await page.fill("#token", "wrong")
    await page.click("button[type=submit]")
    await expect(page.locator("#error")).to_have_text("wrong admin token")
    await page.fill("#token", TOKEN)
    await page.click("button[type=submit]")

    nodes = page.locator("#nodes tbody tr")
    await expect(nodes).to_have_count(3)
    row = {
        name: page.locator("#nodes tbody tr", has=page.locator("td", has_text=name))
        for name in ("good-h100", "bad-4090", "spare-t4")
    }
    await expect(row["good-h100"].locator(".state")).to_have_text("serving")
    await expect(row["bad-4090"].locator(".state")).to_have_text("ejected")
    await expect(row["bad-4090"]).to_contain_text("failures in a row")
    await expect(row["spare-t4"].locator(".state")).to_have_text("draining")
    await expect(row["spare-t4"]).to_contain_text("drained by an operator")
    await expect(row["good-h100"].locator("td").nth(9)).not_to_have_text("0.0%")
    await expect(row["spare-t4"].locator("td").nth(7)).to_have_text("-")  # untried
    await expect(page.locator("#supply-claimed b")).to_have_text("3")
    await expect(page.locator("#supply-verified b")).to_have_text("1")
    await expect(page.locator("#ejections tbody tr")).to_have_count(1)
    await expect(page.locator("#ejections tbody tr")).to_contain_text("bad-4090")
    await expect(page.locator("#models tbody tr")).to_contain_text("tiny-llama")
    await expect(page.locator("#meta")).to_contain_text("policy round_robin")

    # It updates by itself: the drained node resumes and the page follows.
    async with http.post(r.url + "/admin/nodes/spare-t4/resume", headers=admin) as resp:
        assert resp.status == 200
    await expect(row["spare-t4"].locator(".state")).to_have_text("serving", timeout=10_000)
    await expect(page.locator("#supply-verified b")).to_have_text("2", timeout=10_000)
    assert errors == []
    await page.close()
