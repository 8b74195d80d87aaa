"""AUTOMATIC1111's API on real processes (redis-server, `sdqueue api`, `sdqueue worker`, tiny checkpoint), spoken
to by the unmodified `webuiapi` package: the same seed gives the same pixels as the native API."""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import webuiapi
from PIL import Image
from redis import Redis

from core import apikeys
from core.imagefile import read_parameters
from tests.e2e.conftest import Service
from tests.images import noise_image, png_b64, white_box
from tests.redis_server import RedisServer

SMALL: dict[str, Any] = {"prompt": "a photo of a cat", "width": 64, "height": 64, "steps": 4, "cfg_scale": 7.0,
                         "sampler_name": "Euler"}
NATIVE = {"prompt": "a photo of a cat", "width": 64, "height": 64, "steps": 4, "guidance_scale": 7.0,
          "sampler": "euler"}
KEY = "sdq_e2e-a1111-key"


@pytest.fixture(scope="module")
def running(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory,
            tiny_checkpoint: Path) -> Iterator[Service]:
    """One API and one worker for the module's tests (a worker start loads the model: seconds)."""
    svc = Service(redis_server.url, tmp_path_factory.mktemp("a1111"), tiny_checkpoint)
    svc.start_api()
    svc.start_worker()
    svc.wait_ready()
    yield svc
    svc.stop()


@pytest.fixture
def api(running: Service) -> webuiapi.WebUIApi:
    return webuiapi.WebUIApi(baseurl=f"{running.url}/sdapi/v1")


@pytest.fixture
def redis(redis_server: RedisServer) -> Iterator[Redis]:
    """The module's Redis, not flushed: the running worker is registered there."""
    client = Redis.from_url(redis_server.url)
    yield client
    client.close()


def native(service: Service, path: str, **fields: Any) -> list[np.ndarray]:
    r = service.http.post(path, json={**NATIVE, **fields})
    assert r.status_code == 202, r.text
    job = service.wait_job(r.json()["id"])
    return [pixels(Image.open(io.BytesIO(service.http.get(i["url"]).content))) for i in job["images"]]


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def job_count(redis: Redis) -> int:
    return len(redis.keys("rq:job:*"))


def test_txt2img_gives_the_native_apis_pixels_and_infotexts_equal_to_the_png_metadata(
    running: Service, api: webuiapi.WebUIApi
) -> None:
    result = api.txt2img(**SMALL, seed=42, batch_size=2)

    expected = native(running, "/v1/txt2img", seed=42, n=2)
    assert len(result.images) == len(expected) == 2
    assert all(np.array_equal(pixels(a), b) for a, b in zip(result.images, expected, strict=True))
    assert [image.size for image in result.images] == [(64, 64), (64, 64)]
    assert (result.info["seed"], result.info["all_seeds"]) == (42, [42, 43])
    assert result.info["infotexts"] == [image.info["parameters"] for image in result.images]
    stored = running.job(result.info["job_id"])["images"]
    assert result.info["infotexts"] == [
        read_parameters(running.http.get(i["url"]).content)["parameters"] for i in stored]
    assert "Steps: 4, Sampler: Euler, CFG scale: 7, Seed: 43, Size: 64x64" in result.info["infotexts"][1]
    assert result.parameters["prompt"] == "a photo of a cat" and result.parameters["enable_hr"] is False


def test_img2img_and_inpaint_give_the_native_apis_pixels(running: Service, api: webuiapi.WebUIApi) -> None:
    source, mask = noise_image(64, 64, seed=3), white_box(64, 64, (16, 16, 48, 48))

    plain = api.img2img(images=[source], denoising_strength=0.5, seed=7, **SMALL)
    inpaint = api.img2img(images=[source], mask_image=mask, denoising_strength=1.0, seed=8, **SMALL)

    [expected_plain] = native(running, "/v1/img2img", image=png_b64(source), strength=0.5, seed=7)
    assert np.array_equal(pixels(plain.image), expected_plain)
    [expected] = native(running, "/v1/inpaint", image=png_b64(source), mask=png_b64(mask), strength=1.0, seed=8,
                        mask_blur=4)
    assert np.array_equal(pixels(inpaint.image), expected)
    kept = pixels(source)
    assert np.array_equal(pixels(inpaint.image)[:4], kept[:4])  # far from the mask: the original pixels
    assert np.abs(pixels(inpaint.image)[24:40, 24:40] - kept[24:40, 24:40]).mean() > 5  # repainted
    assert "Denoising strength: 0.5" in plain.info["infotexts"][0]


def test_img2img_without_a_prompt_gives_the_native_empty_prompt_pixels(running: Service,
                                                                        api: webuiapi.WebUIApi) -> None:
    source = noise_image(64, 64, seed=4)
    unprompted = {k: v for k, v in SMALL.items() if k != "prompt"}  # webuiapi then sends its default, ""

    result = api.img2img(images=[source], denoising_strength=0.6, seed=9, **unprompted)

    [expected] = native(running, "/v1/img2img", prompt="", image=png_b64(source), strength=0.6, seed=9)
    assert result.info["prompt"] == "" and np.array_equal(pixels(result.image), expected)
    assert np.abs(pixels(result.image) - pixels(source)).mean() > 1  # denoised, not the input returned


def test_progress_while_a_job_runs_then_interrupt_ends_it(running: Service, api: webuiapi.WebUIApi) -> None:
    answer: list[webuiapi.WebUIApiResult] = []
    slow = {**SMALL, "steps": 150, "width": 256, "height": 256, "batch_size": 2}  # seconds on any CPU
    thread = threading.Thread(target=lambda: answer.append(api.txt2img(**slow, seed=1)))
    thread.start()
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + 60
    while not (seen and seen[-1]["state"]["sampling_step"] >= 2 * 10 and seen[-1]["current_image"]):
        assert time.monotonic() < deadline, seen[-1:]
        seen.append(api.get_progress())
        time.sleep(0.05)
    running_now = seen[-1]

    api.interrupt()
    thread.join(60)

    assert 0 < running_now["progress"] < 1 and running_now["eta_relative"] >= 0
    assert running_now["state"]["job_count"] == 1 and running_now["state"]["sampling_steps"] == 150
    assert running_now["state"]["job"] == "txt2img"
    assert Image.open(io.BytesIO(base64.b64decode(running_now["current_image"]))).size[0] > 0
    [result] = answer
    assert result.images == [] and result.info["status"] == "canceled"
    assert running.job(result.info["job_id"])["status"] == "canceled"
    idle = api.get_progress()
    assert (idle["progress"], idle["state"]["job_count"]) == (0, 0)


def test_model_names_and_setting_the_model_the_worker_holds(running: Service, api: webuiapi.WebUIApi) -> None:
    [model] = running.http.get("/v1/models").json()["models"]

    names = api.util_get_model_names()
    api.util_set_model(names[0])

    assert names == [f"{model['name']} [{model['hash']}]"]
    assert api.util_get_current_model() == names[0]
    assert api.util_get_sampler_names() == ["DDIM", "DPM++ 2M", "Euler", "Euler a", "LCM", "TCD"]


def test_bad_inputs_are_422_naming_the_a1111_field_and_queue_nothing(api: webuiapi.WebUIApi, redis: Redis) -> None:
    before = job_count(redis)

    with pytest.raises(RuntimeError) as hires:
        api.txt2img(**SMALL, enable_hr=True)
    with pytest.raises(RuntimeError) as cfg:
        api.txt2img(**{**SMALL, "cfg_scale": 99})
    with pytest.raises(RuntimeError) as resize:
        api.img2img(images=[noise_image(64, 64)], resize_mode=2, **SMALL)

    for caught, field in ((hires, "enable_hr"), (cfg, "cfg_scale"), (resize, "resize_mode")):
        status, text = caught.value.args
        assert status == 422 and f'"field":"{field}"' in text, text
    assert job_count(redis) == before


def test_set_auth_wrong_then_right_key(running: Service, redis_server: RedisServer, tiny_checkpoint: Path,
                                       tmp_path: Path) -> None:
    keyed = Service(redis_server.url, tmp_path, tiny_checkpoint)  # a second API, on the same queues and worker
    keyed.env.update(SDQ_API_KEYS=f"alice:{apikeys.digest(KEY)}", SDQ_DATA_DIR=str(running.data_dir))
    keyed.start_api()
    try:
        api = webuiapi.WebUIApi(baseurl=f"{keyed.url}/sdapi/v1")
        api.set_auth("alice", "sdq_not-the-key")
        with pytest.raises(RuntimeError) as wrong:
            api.txt2img(**SMALL, seed=9)

        api.set_auth("alice", KEY)
        result = api.txt2img(**SMALL, seed=9)
    finally:
        keyed.stop()

    assert wrong.value.args[0] == 401
    assert len(result.images) == 1 and result.info["all_seeds"] == [9]
