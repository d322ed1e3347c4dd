"""The dashboard at ``GET /`` of ``promptq serve``: its JSON endpoints (behind the token,
paged), and the page itself in a real Chromium (Playwright): the token asked once and
kept out of URLs, batches, a batch's charts and errors, workers, the cancel button."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from arq.connections import ArqRedis
from pydantic import SecretStr

from promptq.api import create_app
from promptq.producer import Producer
from promptq.shared.settings import Settings

from .conftest import TOKEN, WorkerProcs, in_process_worker, wait_until

AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: how many pixels of a canvas something was drawn on
DRAWN_PIXELS = """(id) => {
  const c = document.getElementById(id);
  const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
  let n = 0;
  for (let i = 3; i < d.length; i += 4) if (d[i]) n++;
  return n;
}"""


@pytest.fixture
async def api(redis: ArqRedis, settings: Settings) -> AsyncIterator[TestClient]:
    app = create_app(settings.model_copy(update={"api_token": SecretStr(TOKEN)}))
    async with TestClient(TestServer(app)) as client:
        yield client


async def test_the_page_needs_no_token_and_the_data_does(api: TestClient) -> None:
    page = await api.get("/")
    assert page.status == 200
    assert page.content_type == "text/html"
    html = await page.text()
    assert "sessionStorage" in html
    assert "Authorization" in html
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    assert (await api.get("/dashboard/overview")).status == 401
    assert (await api.get("/dashboard/batches/x", headers=AUTH)).status == 404


async def test_overview_pages_through_many_batches_and_filters_them(
    api: TestClient, redis: ArqRedis, settings: Settings
) -> None:
    async with in_process_worker(settings), Producer(redis, settings=settings) as producer:
        batches = [await producer.submit([f"p{i}"]) for i in range(30)]
        await asyncio.gather(*(b.wait(timeout_s=30) for b in batches))
        failing = await producer.submit(
            ["ok", "bad [[mock status=400]]", "worse [[mock status=400]]"]
        )
        await failing.wait(timeout_s=30)
        # a refused key stops the batch, which ends `failed`: the filter finds only it
        stopped = await producer.submit(["no [[mock status=401]]"])
        await stopped.wait(timeout_s=30)
    seen: list[str] = []
    offset: int | None = 0
    while offset is not None:
        resp = await api.get(f"/dashboard/overview?offset={offset}&limit=10", headers=AUTH)
        body = await resp.json()
        seen += [b["id"] for b in body["batches"]]
        offset = body["next_offset"]
    assert len(seen) == 32 == len(set(seen))
    assert seen[:2] == [stopped.id, failing.id]  # newest first
    assert body["batch_count"] == 32
    only_failed = await (await api.get("/dashboard/overview?status=failed", headers=AUTH)).json()
    assert [b["id"] for b in only_failed["batches"]] == [stopped.id]
    # a filtered page that fills up says where the next one starts, and skips nothing
    completed: list[str] = []
    offset = 0
    while offset is not None:
        page = await (
            await api.get(f"/dashboard/overview?status=completed&limit=7&offset={offset}",
                          headers=AUTH)
        ).json()  # fmt: skip
        completed += [b["id"] for b in page["batches"]]
        offset = page["next_offset"]
    assert len(completed) == 31 == len(set(completed))
    assert stopped.id not in completed
    detail = await (await api.get(f"/dashboard/batches/{failing.id}", headers=AUTH)).json()
    assert detail["batch"]["failed"] == 2
    assert detail["errors"][0]["code"] == "invalid_request_error"
    assert detail["errors"][0]["count"] == 2
    assert detail["errors"][0]["samples"]  # a sample message to read
    assert sum(h["count"] for h in detail["histogram"]) == 3
    assert detail["series"]
    assert detail["live_stats"]["succeeded"] == 1
    assert detail["cancellable"] is False


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    """Where test artifacts (the screenshot) go: PROMPTQ_TEST_ARTIFACTS, else tmp_path."""
    found = Path(os.environ.get("PROMPTQ_TEST_ARTIFACTS") or tmp_path)
    found.mkdir(parents=True, exist_ok=True)
    return found


def _chromium() -> str:
    found = os.environ.get("PROMPTQ_TEST_CHROMIUM") or shutil.which("chromium")
    if found is None:
        found = shutil.which("chromium-browser") or shutil.which("google-chrome")
    if found is None:
        why = (
            "the dashboard's browser test needs Chromium: `apt-get install chromium` (or set "
            "PROMPTQ_TEST_CHROMIUM to a Chrome/Chromium binary); .ci/run installs it"
        )
        if os.environ.get("PROMPTQ_REQUIRE_CHROMIUM"):  # CI: never without the browser
            pytest.fail(why)
        pytest.skip(why)
    return found


async def test_the_dashboard_in_a_real_browser(
    redis: ArqRedis, base_url: str, worker_procs: WorkerProcs, settings: Settings, artifacts: Path
) -> None:
    from playwright.async_api import async_playwright

    await worker_procs.launch(redis, 1)
    root = base_url.removesuffix("/v1")
    async with Producer(redis, settings=settings) as producer:
        done = await producer.submit(["a", "b", "c", "bad [[mock status=400]]"])
        await done.wait(timeout_s=30)
        slow = await producer.submit([f"slow {i} [[mock latency_ms=8000]]" for i in range(3)])
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
            try:
                page = await browser.new_page()
                dialogs: list[str] = []

                async def accept(dialog: Any) -> None:
                    dialogs.append(dialog.message)
                    await dialog.accept()

                page.on("dialog", accept)
                await page.goto(root + "/")
                # the token is asked for once; a wrong one is refused
                await page.fill("#token-input", "wrong")
                await page.click("#token-form button")
                await page.wait_for_selector("#token-error:has-text('refused')")
                await page.fill("#token-input", TOKEN)
                await page.click("#token-form button")
                await page.wait_for_selector(f"tr[data-id='{done.id}']")
                assert TOKEN not in page.url
                assert await page.evaluate("sessionStorage.getItem('promptq-token')") == TOKEN
                await page.wait_for_selector("#workers tbody tr")
                assert await page.text_content("#worker-count") == "1"
                await page.wait_for_selector("#limits:has-text('using')")  # RPM and TPM in use
                limits = await page.text_content("#limits") or ""
                assert re.search(r"using [0-9,]+ RPM, [0-9,]+ TPM", limits), limits
                # one batch's page: status, counts, errors with a sample, charts drawn
                await page.click(f"tr[data-id='{done.id}']")
                await page.wait_for_selector("#detail-status:has-text('completed')")
                assert await page.text_content("#d-done") == "4/4"
                await page.wait_for_function(
                    "document.getElementById('detail-bar').style.width === '100%'"
                )
                await page.wait_for_selector("#errors tbody tr")
                assert "invalid_request_error" in (await page.text_content("#errors") or "")
                assert TOKEN not in page.url  # the batch is in the hash, never the token
                drawn = await page.evaluate(DRAWN_PIXELS, "latency")
                assert drawn > 100
                shot = artifacts / "dashboard.png"
                await page.screenshot(path=str(shot), full_page=True)
                assert shot.stat().st_size > 10_000
                # cancel the running one from its page
                await page.click(f"tr[data-id='{slow.id}']")
                await page.wait_for_selector("#cancel", state="visible")
                await page.click("#cancel")
                await page.wait_for_selector("#detail-status:has-text('cancel')", timeout=20_000)
                assert dialogs
                assert slow.id in dialogs[0]
            finally:
                await browser.close()

        async def cancelled() -> bool:
            info = await slow.info()
            return info.status.value in ("cancelling", "cancelled")

        await wait_until(cancelled, what="the batch cancelled from the page")
