"""The live dashboard at /dashboard in headless Chromium (Debian's, at /usr/bin/chromium):
what an operator sees of a simulated fleet (the picture, the aliases, the last requests, the
charts), the page following the fleet when a backend goes down, and a keyed gateway's page
asking for the admin key. The page must run without a console error (a script or style
the Content-Security-Policy blocks is one).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from playwright.sync_api import Browser, ConsoleMessage, Error, Page, expect, sync_playwright

from gateway.sim import SimModel, create_ollama_app, create_openai_app
from tests.integration.conftest import FAST, host_models
from tests.support import ServerThread, backend, gateway_config, start_gateway

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
WAIT = 15_000  # ms: the longest the page may take to show a change (a slow, busy machine)
CLOUD_MODEL = "gpt-4o-mini"
ADMIN = "gw-admin-key-of-the-dashboard-tests"
KEY = "gw-client-key-of-the-dashboard-tests"
USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello"}]
T = TypeVar("T")

# For each chart: its name, how many points it has, and how many of its pixels are in the
# line's colour (the canvas's CSS colour), so a chart with axes but no line counts as blank.
CHARTS_DRAWN = """() => [...document.querySelectorAll('#charts canvas')].map((canvas) => {
  const [r, g, b] = getComputedStyle(canvas).color.match(/\\d+/g).map(Number);
  const pixels = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  let lit = 0;
  for (let i = 0; i < pixels.length; i += 4) {
    const distance = Math.abs(pixels[i] - r) + Math.abs(pixels[i + 1] - g)
      + Math.abs(pixels[i + 2] - b);
    if (pixels[i + 3] > 100 && distance < 60) lit += 1;
  }
  return [canvas.closest('figure').dataset.chart, Number(canvas.dataset.points), lit];
})"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        message = (f"the dashboard's test needs Chromium at {CHROMIUM}: "
                   "apt-get install chromium (./run-tests installs it)")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield chromium
        chromium.close()


@dataclass
class Sims:
    ollama: ServerThread  # the workstation's Ollama (tier primary)
    cloud: ServerThread  # an OpenAI-compatible cloud API (tier cloud)


@pytest.fixture
def sims() -> Iterator[Sims]:
    sims = Sims(ServerThread(lambda: create_ollama_app(host_models())).start(),
                ServerThread(lambda: create_openai_app(
                    [SimModel(CLOUD_MODEL, context_length=128000)], flavor="openai")).start())
    yield sims
    for thread in (sims.ollama, sims.cloud):
        with contextlib.suppress(RuntimeError):  # stopped by the test
            thread.stop()


def config(sims: Sims, **sections: Any) -> Any:
    return gateway_config(
        backend("primary", "ollama", sims.ollama.url, timeouts=FAST),
        backend("cloud", "openai", sims.cloud.url + "/v1", tier="cloud", timeouts=FAST),
        routing={"health_interval": 0.5},
        monitor={"interval": 0.5, "alerts": [{"kind": "backend_down", "after": 0}]},
        plugins=[{"name": "cache", "options": {"backend": "memory"}}],
        **sections)


@dataclass
class Tab:
    """A page in its own browser context, and the errors its console showed."""

    page: Page
    errors: list[str] = field(default_factory=list)
    requested: list[str] = field(default_factory=list)  # every URL the page asked for

    def unexpected_errors(self, *allowed: str) -> list[str]:
        return [e for e in self.errors if not any(a in e for a in allowed)]


@contextlib.contextmanager
def dashboard(browser: Browser, server: ServerThread) -> Iterator[Tab]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    tab = Tab(context.new_page())

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            tab.errors.append(f"console: {message.text} ({message.location})")

    def on_page_error(error: Error) -> None:
        tab.errors.append(f"uncaught: {error.message}")

    tab.page.on("console", on_console)
    tab.page.on("pageerror", on_page_error)
    tab.page.on("request", lambda request: tab.requested.append(request.url))
    try:
        tab.page.goto(server.url + "/dashboard")
        yield tab
    finally:
        context.close()


def send_requests(server: ServerThread, key: str = "x") -> list[str]:
    """Five chat requests, one streamed and one repeated (a cache hit); the models served."""
    with openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0) as client:
        served = [client.chat.completions.create(model=model, messages=USER, temperature=0).model
                  for model in ("auto", CLOUD_MODEL, "auto", CLOUD_MODEL)]
        chunks = list(client.chat.completions.create(model="auto", messages=USER, stream=True))
        served.append(chunks[-1].model)
    return served


def status(server: ServerThread, key: str = "") -> Any:
    request = urllib.request.Request(server.url + "/admin/status",
                                     headers={"Authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def alias_pick(server: ServerThread, alias: str) -> str:
    """What the alias table should say for ``alias``, from /admin/status."""
    pick = status(server)["aliases"][alias]
    return "nothing available" if pick is None else f"{pick['model']} @ {pick['backend']}"


def eventually(page: Page, read: Callable[[], T], ok: Callable[[T], bool], what: str) -> T:
    """``read()`` once ``ok`` holds for it (fails, showing the last value, past WAIT)."""
    for _ in range(WAIT // 250):
        value = read()
        if ok(value):
            return value
        page.wait_for_timeout(250)
    raise AssertionError(f"{what}: still {value!r} after {WAIT / 1000} s")


def test_the_dashboard_shows_the_fleet_live_and_follows_a_backend_going_down(
        browser: Browser, sims: Sims) -> None:
    server = start_gateway(config(sims))
    try:
        served = send_requests(server)
        with dashboard(browser, server) as tab:
            page = tab.page
            expect(page.locator("#status-live")).to_have_text("live", timeout=WAIT)
            expect(page.locator("#ready")).to_have_text("ready")

            # The fleet: each backend in its tier's lane, with its models and breakers.
            primary = page.locator('[data-tier="primary"] [data-backend="primary"]')
            cloud = page.locator('[data-tier="cloud"] [data-backend="cloud"]')
            expect(primary).to_have_attribute("data-state", "up", timeout=WAIT)
            expect(cloud).to_have_attribute("data-state", "up")
            for model in [m.name for m in host_models()]:
                deployment = primary.locator(f'[data-deployment="primary/{model}"]')
                expect(deployment).to_contain_text(model)
                expect(deployment).to_have_attribute("data-breaker", "closed")
                expect(deployment).to_contain_text("closed · 0 in flight")
            expect(cloud.locator(f'[data-deployment="cloud/{CLOUD_MODEL}"]')).to_contain_text(
                CLOUD_MODEL)

            # What each alias picks now is what the gateway says it picks.
            expect(page.locator('#aliases [data-alias="auto"] td').nth(1)).to_have_text(
                alias_pick(server, "auto"))

            # The last requests, newest first: what was asked and what served it.
            rows = page.locator("#recent tbody tr")
            expect(rows).to_have_count(len(served), timeout=WAIT)
            assert rows.locator(".served").all_inner_texts() == served[::-1]
            expect(rows.first).to_contain_text("auto →")

            # Every chart has drawn a line from the traffic of the events received.
            charts = eventually(page, lambda: page.evaluate(CHARTS_DRAWN),
                                lambda c: len(c) == 5 and all(n >= 3 and lit >= 8
                                                              for _, n, lit in c),
                                "the charts' points and line pixels")
            assert [name for name, _, _ in charts] == [
                "rate", "p95_ms", "ttft_p95_ms", "tokens_per_second", "cache_hit_ratio"]
            expect(page.locator("#alerts")).to_have_text("No open alerts.")

            sims.ollama.stop()
            expect(primary).to_have_attribute("data-state", "down", timeout=WAIT)
            expect(primary).to_contain_text("down")
            expect(page.locator('#alerts .alert[data-target="primary"]')).to_contain_text(
                "backend_down", timeout=WAIT)
            expect(cloud).to_have_attribute("data-state", "up")
            eventually(page, lambda: (page.locator('#aliases [data-alias="auto"] td').nth(1)
                                      .inner_text(), alias_pick(server, "auto")),
                       lambda texts: texts[0] == texts[1], "auto in the table and the status")

            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
            assert tab.unexpected_errors() == []
            elsewhere = [url for url in tab.requested
                         if not url.startswith((server.url + "/", "data:"))]
            assert elsewhere == [], "the page asked for something not from the gateway"
            assert server.url + "/dashboard/events" in tab.requested

            server.stop()
            expect(page.locator("#status-live")).to_have_text("disconnected", timeout=WAIT)
    finally:
        with contextlib.suppress(RuntimeError):  # stopped by the test
            server.stop()


def test_a_keyed_gateways_dashboard_asks_for_the_admin_key(browser: Browser, sims: Sims) -> None:
    def sha256(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()

    server = start_gateway(config(sims, auth={"admin_key_hashes": [sha256(ADMIN)],
                                              "key_hashes": [sha256(KEY)]}))
    try:
        served = send_requests(server, KEY)
        with dashboard(browser, server) as tab:
            page = tab.page
            login, error = page.locator("#login"), page.locator("#login-error")
            expect(login).to_be_visible(timeout=WAIT)
            expect(page.locator("#status-live")).to_have_text("needs admin key")
            expect(page.locator("#fleet")).to_be_hidden()

            page.fill("#admin-key", KEY)  # a client's key is not an admin key
            page.click("#login button")
            expect(error).to_have_text("The gateway refused that key.", timeout=WAIT)
            expect(login).to_be_visible()
            expect(page.locator("[data-backend]")).to_have_count(0)

            page.fill("#admin-key", ADMIN)
            page.click("#login button")
            expect(page.locator("#status-live")).to_have_text("live", timeout=WAIT)
            expect(login).to_be_hidden()
            expect(page.locator('[data-backend="primary"]')).to_have_attribute(
                "data-state", "up", timeout=WAIT)
            expect(page.locator("#recent tbody tr")).to_have_count(len(served), timeout=WAIT)

            page.reload()  # the key is kept for the tab's session
            expect(page.locator("#status-live")).to_have_text("live", timeout=WAIT)
            expect(login).to_be_hidden()
            # The two refusals are logged by Chromium itself; nothing else may be.
            assert tab.unexpected_errors("status of 401") == []
    finally:
        server.stop()
