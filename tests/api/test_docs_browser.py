"""/docs (Swagger UI) and /redoc render in a real headless Chromium with nothing but the API to talk to.

The browser is Debian's `chromium` with `chromium-driver` (`.ci/run` and `make test` as root install them; elsewhere:
`apt-get install chromium chromium-driver`). It reaches the API under a made-up host name mapped to the loopback
address, so a page that asked any other host for anything (a CDN, fonts, an online spec validator) shows up in the
browser's network log. Screenshots are left in the test's temporary directory (its path is logged).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from tests.api.conftest import LiveServer

log = logging.getLogger(__name__)

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
HOST = "sdqueue.test"  # resolved by the browser alone, to 127.0.0.1
# Shown by ReDoc's menu from its vendor's CDN, unconditionally; the page's Content-Security-Policy refuses it.
REDOC_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"
RENDER_TIMEOUT_S = 60  # two busy cores can take a while to start a browser and run 1.5 MB of JavaScript


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[WebDriver]:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if shutil.which(path) is None]
    if missing:
        pytest.fail(f"browser tests need {' and '.join(missing)}: apt-get install chromium chromium-driver "
                    "(`make test` does this itself when run as root)", pytrace=False)
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must not look for a browser or driver online
    monkeypatch.setenv("SE_AVOID_STATS", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--no-proxy-server",
                 "--disable-dev-shm-usage", "--window-size=1280,1600", f"--user-data-dir={tmp_path / 'profile'}",
                 f"--host-resolver-rules=MAP {HOST} 127.0.0.1"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER,
                                                               log_output=str(tmp_path / "chromedriver.log")))
    try:
        yield driver
    finally:
        driver.quit()


@dataclass
class Requests:
    sent: list[str]  # went out of the browser (or tried to: a name that did not resolve counts)
    blocked: list[str]  # refused by the browser before any connection, by the page's Content-Security-Policy


def requests_made(driver: WebDriver) -> Requests:
    """What the page asked for since the last call (the performance log is drained by reading it)."""
    urls: dict[str, str] = {}
    blocked: set[str] = set()
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        params = message["params"]
        if message["method"] == "Network.requestWillBeSent":
            urls[params["requestId"]] = params["request"]["url"]
        elif message["method"] == "Network.loadingFailed" and params.get("blockedReason"):
            blocked.add(params["requestId"])
    return Requests(sent=[u for i, u in urls.items() if i not in blocked],
                    blocked=[u for i, u in urls.items() if i in blocked])


def console_errors(driver: WebDriver) -> list[str]:
    """The page's console errors since the last call."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def open_page(driver: WebDriver, url: str, rendered: tuple[str, str], screenshot: Path) -> Requests:
    """Load `url`, wait until the element `rendered` (a locator) is shown, screenshot it; what it requested."""
    requests_made(driver)  # what the previous page (or the browser's start page) asked for is not this page's
    driver.get(url)
    try:
        WebDriverWait(driver, RENDER_TIMEOUT_S).until(expected_conditions.visibility_of_element_located(rendered))
    finally:
        driver.save_screenshot(str(screenshot))
        log.info("screenshot of %s: %s", url, screenshot)
    return requests_made(driver)


def assert_only_from(origin: str, requests: Requests) -> None:
    """Every request that went over the network (not `data:`, `blob:`, the browser's own `chrome:`) was to `origin`;
    none of `origin`'s own was blocked."""
    network = [u for u in requests.sent if urlsplit(u).scheme in ("http", "https", "ws", "wss")]
    assert network, "no network request seen: is the performance log on?"
    foreign = [u for u in network if not u.startswith(origin + "/")]
    assert not foreign, f"the page requested {foreign} (only {origin} may be asked)"
    assert not [u for u in requests.blocked if u.startswith(origin + "/")], requests.blocked


def test_swagger_ui_and_redoc_render_from_the_api_alone(
    live_server: LiveServer, browser: WebDriver, tmp_path: Path
) -> None:
    origin = f"http://{HOST}:{live_server.port}"

    requests = open_page(browser, f"{origin}/docs", (By.CSS_SELECTOR, '.opblock-summary-path[data-path="/v1/txt2img"]'),
                         tmp_path / "docs.png")
    spec_operations = [op for item in live_server.app.openapi()["paths"].values() for op in item.values()]
    assert len(browser.find_elements(By.CSS_SELECTOR, ".opblock")) == len(spec_operations)
    ids = {e.text for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-operation-id")}
    assert {"submit_txt2img", "get_job", "stream_job_events", "head_image"} <= ids
    assert {f"{origin}/docs/assets/swagger-ui-bundle.js", f"{origin}/openapi.json"} <= set(requests.sent)
    assert_only_from(origin, requests)
    assert requests.blocked == []
    assert console_errors(browser) == []

    # ReDoc names each operation's section after its operationId.
    requests = open_page(browser, f"{origin}/redoc",
                         (By.CSS_SELECTOR, '[data-section-id="tag/jobs/operation/submit_txt2img"]'),
                         tmp_path / "redoc.png")
    assert "/v1/txt2img" in browser.find_element(By.TAG_NAME, "body").text
    assert {f"{origin}/docs/assets/redoc.standalone.js", f"{origin}/openapi.json"} <= set(requests.sent)
    assert_only_from(origin, requests)
    assert requests.blocked == [REDOC_LOGO]
    assert all(REDOC_LOGO in e and "Content Security Policy" in e for e in console_errors(browser))
