"""The web playground at `/`, driven in a real headless Chromium against real processes: redis-server,
`sdqueue api` and `sdqueue worker` on the tiny random checkpoint.

The browser is Debian's `chromium` with `chromium-driver`, as in tests/api/test_docs_browser.py (nothing downloads
a browser). Screenshots of each run go to `artifacts/playground/` (git-ignored). Every wait is an explicit wait on
what the page shows, with timeouts meant for two busy cores.
"""

from __future__ import annotations

import io
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from redis import Redis
from rq import Worker as RQWorker
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service as DriverService
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select, WebDriverWait

from core import apikeys
from core.catalog import LoadedModel, publish_model
from tests.api.test_docs_browser import CHROMEDRIVER, CHROMIUM, console_errors
from tests.e2e.conftest import ROOT, Service
from tests.images import noise_image
from tests.model.lora_files import write_peft_lora

log = logging.getLogger(__name__)

ARTIFACTS = ROOT / "artifacts" / "playground"
WAIT_S = 180  # a job on the tiny model takes a second; a loaded 2-core machine may take far longer
KEY = "sdq_playground-test-key"
# Long enough to be canceled while it runs, even on a fast machine: the tiny UNet at 96x96 latents, 150 steps (about
# 0.3 s a step on two cores; a canceled job stops after its current step).
SLOW_JOB = {"width": "768", "height": "768", "steps": "150"}
# What a person's drop of a file does (Selenium cannot drag files from outside the browser): a drop event whose
# DataTransfer holds a PNG of the given size.
DROP_FILE = """
const [zone, name, width, height, done] = arguments;
const canvas = document.createElement("canvas");
canvas.width = width;
canvas.height = height;
const context = canvas.getContext("2d");
context.fillStyle = "#3a6";
context.fillRect(0, 0, width, height);
canvas.toBlob((blob) => {
  const transfer = new DataTransfer();
  transfer.items.add(new File([blob], name, { type: "image/png" }));
  zone.dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true }));
  done();
}, "image/png");
"""
QUEUED = 6  # jobs followed at once beside the slow one: more than the 6 connections Chromium opens to one host


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
                 "--disable-dev-shm-usage", "--window-size=1280,1000", "--force-device-scale-factor=1",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=DriverService(
        executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log")))
    driver.set_script_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


class Playground:
    """The page, as a person uses it: fields by their ids, jobs by their cards."""

    def __init__(self, driver: WebDriver, service: Service, name: str) -> None:
        self.driver = driver
        self.service = service
        self.shots = ARTIFACTS / name
        self.shots.mkdir(parents=True, exist_ok=True)

    def open(self) -> None:
        self.driver.get(f"{self.service.url}/")
        self.wait(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") == "true",
                  "the page to load the schema and the server's state")

    def wait(self, condition: Callable[[WebDriver], Any], what: str, timeout: float = WAIT_S) -> Any:
        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.25).until(condition)
        except TimeoutException:
            self.screenshot("timeout")
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\nbrowser console: "
                                 f"{console_errors(self.driver)}\n{self.service.logs()}") from None

    def screenshot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.driver.save_screenshot(str(path))
        log.info("screenshot: %s", path)
        return path

    def by_id(self, element_id: str) -> WebElement:
        return self.driver.find_element(By.ID, element_id)

    def fill(self, **fields: str) -> None:
        for element_id, value in fields.items():
            field = self.by_id(element_id)
            field.clear()
            field.send_keys(value)

    def mode(self, mode: str) -> None:
        self.driver.find_element(By.CSS_SELECTOR, f'input[name="mode"][value="{mode}"]').click()

    def message(self, element_id: str) -> str:
        element = self.by_id(element_id)
        return element.text if element.is_displayed() else ""

    def cards(self) -> list[WebElement]:
        return self.driver.find_elements(By.CSS_SELECTOR, "#jobs > li.job")

    def submit(self) -> str:
        """Click Generate; the new job's id (its card comes first)."""
        before = len(self.cards())
        self.by_id("submit").click()
        self.wait(lambda d: len(self.cards()) > before or self.message("form-message"), "a new job card")
        assert not self.message("form-message"), self.message("form-message")
        return str(self.cards()[0].get_attribute("data-job-id"))

    def card(self, job_id: str) -> WebElement:
        return self.driver.find_element(By.CSS_SELECTOR, f'li.job[data-job-id="{job_id}"]')

    def wait_status(self, job_id: str, status: str) -> WebElement:
        self.wait(lambda d: self.card(job_id).get_attribute("data-status") in (status, "failed", "unavailable"),
                  f"job {job_id} to show {status}")
        card = self.card(job_id)
        assert card.get_attribute("data-status") == status, card.text
        return card

    def decoded_images(self, card: WebElement) -> list[tuple[int, int]]:
        """Waits for the card's result images to decode; their natural sizes."""
        script = ("return [...arguments[0].querySelectorAll('.job-images img')]"
                  ".map(i => i.complete && i.naturalWidth ? [i.naturalWidth, i.naturalHeight] : null)")
        self.wait(lambda d: (sizes := d.execute_script(script, card)) and all(sizes), "the result images to decode")
        return [tuple(size) for size in self.driver.execute_script(script, card)]


def start(service: Service, *, api_keys: str | None = None) -> None:
    if api_keys is not None:
        service.env["SDQ_API_KEYS"] = api_keys
    service.start_api()
    service.start_worker()
    service.wait_ready(WAIT_S)


def stored_image(service: Service, key: str) -> Image.Image:
    return Image.open(io.BytesIO((service.data_dir / "images" / key).read_bytes()))


def test_txt2img_with_progress_then_cancel_then_inpaint_with_a_painted_mask(
    service: Service, browser: WebDriver, tmp_path: Path
) -> None:
    start(service)
    page = Playground(browser, service, "session")
    page.open()

    # The form's defaults and ranges are the server's.
    schema = service.http.get("/openapi.json").json()["components"]["schemas"]
    txt2img = schema["Txt2ImgRequest"]["properties"]
    assert page.by_id("steps").get_attribute("value") == str(txt2img["steps"]["default"])
    assert page.by_id("steps").get_attribute("max") == str(int(txt2img["steps"]["maximum"]))
    assert page.by_id("guidance_scale").get_attribute("value") == str(txt2img["guidance_scale"]["default"])
    samplers = [o.get_attribute("value") for o in page.by_id("sampler").find_elements(By.TAG_NAME, "option")]
    assert samplers == schema["Sampler"]["enum"]
    assert page.by_id("sampler").get_attribute("value") == txt2img["sampler"]["default"]
    assert page.by_id("width").get_attribute("step") == str(service.http.get("/v1/limits").json()["side_multiple"])
    assert page.by_id("server-status").text == "Ready: 1 worker"

    # txt2img: progress, a preview, then the image with its seed, a download and the command that makes it again.
    page.fill(prompt="a lighthouse at dawn", width="64", height="64", steps="8", seed="1234")
    first = page.submit()
    card = page.wait_status(first, "succeeded")
    assert card.find_element(By.TAG_NAME, "progress").get_attribute("value") == "100"
    preview = card.find_element(By.CLASS_NAME, "job-preview").get_attribute("src") or ""
    assert preview.startswith("data:image/jpeg;base64,")  # a preview event of the running job was shown
    assert page.decoded_images(card) == [(64, 64)]
    assert "seed 1234" in card.find_element(By.CLASS_NAME, "result-seed").text
    download = card.find_element(By.CLASS_NAME, "result-download")
    assert (download.get_attribute("href") or "").startswith("blob:")
    assert download.get_attribute("download") == f"{first}-0.png"
    job = service.job(first)
    assert (job["status"], job["seeds"], job["params"]["steps"]) == ("succeeded", [1234], 8)
    card.find_element(By.CLASS_NAME, "job-copy-curl").click()
    curl = card.find_element(By.CLASS_NAME, "job-curl").get_attribute("value") or ""
    assert f"'{service.url}/v1/txt2img'" in curl and '"seed":1234' in curl and "a lighthouse at dawn" in curl
    page.screenshot("txt2img")

    # A long job, canceled while it runs. The jobs queued behind it show their places, then run; there are more
    # of them than a browser opens connections to one server, and every submit still gets through.
    page.fill(**SLOW_JOB)
    second = page.submit()
    page.wait_status(second, "running")
    page.fill(width="64", height="64", steps="4")
    behind = [page.submit() for _ in range(QUEUED)]
    assert [page.wait_status(job_id, "queued") for job_id in behind]
    places = [page.card(job_id).find_element(By.CLASS_NAME, "job-queue").text for job_id in behind]
    assert places[0].startswith("next in the queue") and places[-1].startswith(f"{QUEUED - 1} jobs ahead"), places
    page.card(second).find_element(By.CLASS_NAME, "job-cancel").click()
    page.wait_status(second, "canceled")
    assert service.job(second)["status"] == "canceled"
    for job_id in behind:
        assert page.decoded_images(page.wait_status(job_id, "succeeded")) == [(64, 64)]
    page.screenshot("canceled")

    # Inpaint: the first result as init image, a stroke painted across its middle.
    page.card(first).find_element(By.CLASS_NAME, "result-init").click()
    page.wait(lambda d: page.by_id("init-info").text.endswith("64 × 64"), "the init image to load")
    page.mode("inpaint")
    canvas = page.by_id("mask-canvas")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", canvas)  # actions do not scroll
    width = canvas.size["width"]
    assert width > 200, canvas.size  # shown larger than its 64 pixels, to paint on
    (ActionChains(browser).move_to_element_with_offset(canvas, -width // 4, 0).click_and_hold()
     .move_by_offset(width // 4, 0).move_by_offset(width // 4, 0).release().perform())
    page.fill(prompt="a red apple", steps="6")
    third = page.submit()
    card = page.wait_status(third, "succeeded")
    assert page.decoded_images(card) == [(64, 64)]
    job = service.job(third)
    assert (job["task"], job["params"]["width"], job["params"]["height"]) == ("inpaint", 64, 64)
    mask = np.asarray(stored_image(service, f"{third}/mask.png").convert("L"))  # as the API prepared the upload
    assert mask[32, 32] > 200  # painted: repaint
    assert max(mask[y, x] for x, y in ((2, 2), (61, 2), (32, 2), (2, 61), (32, 61), (61, 61))) < 40  # kept
    browser.execute_script("window.scrollTo(0, 0)")
    page.screenshot("playground")  # docs/playground.png is one of these

    # Outpaint a picked file 32 pixels to the right.
    picked = tmp_path / "picked.png"
    noise_image(64, 64).save(picked)
    page.mode("outpaint")
    page.by_id("init-file").send_keys(str(picked))
    page.wait(lambda d: page.by_id("init-info").text == "picked.png: 64 × 64", "the picked image to load")
    page.by_id("mask-clear").click()
    page.fill(**{"outpaint-right": "32"})
    fourth = page.submit()
    assert page.decoded_images(page.wait_status(fourth, "succeeded")) == [(96, 64)]
    assert service.job(fourth)["task"] == "inpaint"

    # img2img of a dropped file, at its own size, with a random seed; then that seed reused.
    page.mode("img2img")
    browser.execute_async_script(DROP_FILE, page.by_id("drop-zone"), "dropped.png", 80, 72)
    page.wait(lambda d: page.by_id("init-info").text == "dropped.png: 80 × 72", "the dropped image to load")
    page.by_id("seed-random").click()
    assert page.by_id("seed").get_attribute("value") == ""
    page.fill(strength="0.5")
    fifth = page.submit()
    assert page.decoded_images(page.wait_status(fifth, "succeeded")) == [(80, 72)]
    job = service.job(fifth)
    assert (job["task"], job["strength"]) == ("img2img", 0.5)
    page.by_id("seed-reuse").click()
    assert page.by_id("seed").get_attribute("value") == str(job["seeds"][0])

    # A phone's width: one column, nothing wider than the screen.
    browser.set_window_size(390, 844)
    browser.execute_script("window.scrollTo(0, 0)")
    overflow = browser.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, overflow
    page.screenshot("phone")

    # The system's dark theme.
    browser.set_window_size(1280, 1000)
    browser.execute_script("window.scrollTo(0, 0)")
    background = "return getComputedStyle(document.body).backgroundColor"
    light = browser.execute_script(background)
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia",  # type: ignore[attr-defined]
                            {"features": [{"name": "prefers-color-scheme", "value": "dark"}]})
    dark = browser.execute_script(background)
    assert (light, dark) == ("rgb(246, 247, 249)", "rgb(13, 17, 23)")
    page.screenshot("dark")
    assert console_errors(browser) == []


def test_auth_on_a_wrong_key_shows_the_error_and_the_right_key_works(service: Service, browser: WebDriver) -> None:
    start(service, api_keys=f"alice:{apikeys.digest(KEY)}")
    page = Playground(browser, service, "auth")
    page.open()  # the page itself needs no key
    assert "API key" in page.message("key-message")  # the server's 401 for the limits, asked without a key

    refused = service.http.get("/v1/limits", headers={"Authorization": "Bearer sdq_wrong"}).json()["error"]
    page.fill(**{"api-key": "sdq_wrong"})
    page.by_id("api-key").send_keys(Keys.ENTER)  # saved from the keyboard
    ActionChains(browser).send_keys(Keys.TAB).perform()  # the focus, moved by the keyboard, shows
    focused = browser.switch_to.active_element
    assert focused.text == "Save key" and focused.value_of_css_property("outline-style") == "solid"
    page.wait(lambda d: refused["message"] in page.message("key-message"), "the wrong key's error")
    page.fill(prompt="a lighthouse at dawn", width="64", height="64", steps="4")
    page.by_id("submit").click()
    page.wait(lambda d: refused["message"] in page.message("form-message"), "the refused submit's error")
    assert page.cards() == []
    page.screenshot("wrong-key")

    page.fill(**{"api-key": KEY})
    page.by_id("api-key").send_keys(Keys.ENTER)
    page.wait(lambda d: not page.message("key-message"), "the key to be accepted")
    job_id = page.submit()
    card = page.wait_status(job_id, "succeeded")
    assert page.decoded_images(card) == [(64, 64)]  # read with the key: <img src> alone would get a 401
    assert browser.execute_script("return localStorage.getItem('sdqueue.apiKey')") == KEY

    # The browser remembers its jobs and its key.
    page.open()
    card = page.wait_status(job_id, "succeeded")
    assert page.decoded_images(card) == [(64, 64)]
    page.screenshot("right-key")

    # Without the key the page still opens, and its jobs say why they cannot be read; with it, they come back.
    missing = service.http.get("/v1/limits").json()["error"]["message"]
    page.fill(**{"api-key": ""})
    page.by_id("api-key").send_keys(Keys.ENTER)
    page.open()
    assert missing in page.message("key-message")
    card = page.wait_status(job_id, "unavailable")
    assert missing in card.find_element(By.CLASS_NAME, "job-error").text
    page.fill(**{"api-key": KEY})
    page.by_id("api-key").send_keys(Keys.ENTER)
    assert page.decoded_images(page.wait_status(job_id, "succeeded")) == [(64, 64)]
    errors = console_errors(browser)  # the browser logs each refused request; nothing else may have failed
    assert all("401" in e for e in errors), errors


def test_the_workers_loras_and_vaes_are_offered_and_sent(service: Service, browser: WebDriver, tmp_path: Path) -> None:
    loras = tmp_path / "loras"
    write_peft_lora(loras / "ink.safetensors", seed=11)
    write_peft_lora(loras / "neon.safetensors", seed=12)
    service.env["SDQ_LORA_DIR"] = str(loras)
    start(service)
    page = Playground(browser, service, "loras")
    page.open()
    rows = page.wait(lambda d: d.find_elements(By.CSS_SELECTOR, "#lora-list .lora"), "the workers' LoRAs")
    assert [row.text for row in rows] == ["ink", "neon"] and not page.by_id("loras-empty").is_displayed()
    # no worker holds a tiny VAE: the full one is chosen, the tiny one is offered disabled, with the reason
    options = {o.get_attribute("value"): o.is_enabled() for o in page.by_id("vae").find_elements(By.TAG_NAME, "option")}
    assert options == {"full": True, "tiny": False}
    assert page.by_id("vae-help").is_displayed()
    # the live workers' models, after "default" (the deployment's)
    served = service.http.get("/v1/models").json()["models"][0]["name"]
    model = page.by_id("model")
    assert [o.get_attribute("value") for o in model.find_elements(By.TAG_NAME, "option")] == ["", served]
    # a model's native size becomes the txt2img size when it is chosen: an SDXL worker announces 1024
    redis = Redis.from_url(service.env["SDQ_REDIS_URL"])
    xl = RQWorker(["sdq-low"], connection=redis, name="xl-worker")
    xl.register_birth()
    publish_model(redis, xl.key, LoadedModel(name="sdxl-base", inpainting_unet=False, device="cuda",
                                             dtype="float16", default_size=1024))
    page.open()
    model = page.by_id("model")
    page.wait(lambda d: len(model.find_elements(By.TAG_NAME, "option")) == 3, "the SDXL model listed")
    Select(model).select_by_value("sdxl-base")
    assert page.by_id("width").get_attribute("value") == page.by_id("height").get_attribute("value") == "1024"
    Select(model).select_by_value(served)
    assert page.by_id("width").get_attribute("value") == "512"
    xl.register_death()
    redis.close()
    rows = page.wait(lambda d: d.find_elements(By.CSS_SELECTOR, "#lora-list .lora"), "the workers' LoRAs again")

    rows[0].find_element(By.CSS_SELECTOR, 'input[type="checkbox"]').click()
    scale = rows[0].find_element(By.CLASS_NAME, "lora-scale")
    scale.clear()
    scale.send_keys("0.7")
    page.fill(prompt="a lighthouse in ink", width="64", height="64", steps="4")
    job_id = page.submit()
    card = page.wait_status(job_id, "succeeded")
    assert page.decoded_images(card) == [(64, 64)]
    params = service.http.get(f"/v1/jobs/{job_id}").json()["params"]
    assert params["loras"] == [{"name": "ink", "scale": 0.7}] and params["vae"] == "full"
    assert params["model"] == served
    page.screenshot("loras")
    assert console_errors(browser) == []
