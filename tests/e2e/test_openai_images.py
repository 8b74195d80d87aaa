"""OpenAI's own Python client, unmodified, against real processes: redis-server, `sdqueue api` with an API key,
`sdqueue worker` on the tiny random checkpoint.

Pixels are compared with the native API's for the same seed and the same rules (quality "low" = 15 steps, an edit
without a mask = img2img at strength 0.75, a variation = img2img of the empty prompt at the default 30 steps):
one worker runs both, so they must be equal, not merely close.
"""

from __future__ import annotations

import base64
import io
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import openai
import pytest
from PIL import Image
from redis import Redis

from core import apikeys
from tests.e2e.conftest import Service
from tests.images import encode, noise_image, png_b64

KEY = "sdq_openai-e2e-key"
CAT = "a photo of a cat"


@pytest.fixture
def authed(service: Service) -> Service:
    service.env["SDQ_API_KEYS"] = f"e2e:{apikeys.digest(KEY)}"
    service.env["SDQ_RATE_LIMIT_PER_MIN"] = "0"
    service.http.headers["Authorization"] = f"Bearer {KEY}"
    return service


@pytest.fixture
def redis(redis_url: str) -> Iterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    client.close()


def jobs_in(redis: Redis) -> int:
    return sum(1 for k in redis.keys("rq:job:*") if k.count(b":") == 2)


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def b64_pixels(image: Any) -> np.ndarray:
    return pixels(base64.b64decode(image.b64_json))


def native(service: Service, path: str, **fields: Any) -> list[np.ndarray]:
    r = service.http.post(path, json=fields)
    assert r.status_code == 202, r.text
    job = service.wait_job(r.json()["id"])
    return [pixels(service.http.get(record["url"]).content) for record in job["images"]]


def test_openai_client_generates_edits_and_varies_with_the_native_pixels(authed: Service, redis: Redis) -> None:
    service = authed
    service.start_api()
    service.start_worker()
    service.wait_ready()
    client = openai.OpenAI(base_url=f"{service.url}/v1", api_key=KEY)

    generated = client.images.generate(prompt=CAT, size="64x64", quality="low", extra_body={"seed": 42})
    assert generated.data is not None and len(generated.data) == 1
    assert (generated.size, generated.output_format, generated.data[0].revised_prompt) == ("64x64", "png", CAT)
    [same] = native(service, "/v1/txt2img", prompt=CAT, width=64, height=64, steps=15, seed=42)
    assert np.array_equal(b64_pixels(generated.data[0]), same)

    linked = client.images.generate(prompt=CAT, size="64x64", quality="low", response_format="url",
                                    extra_body={"seed": 42})
    assert linked.data is not None and linked.data[0].b64_json is None and linked.data[0].url
    assert linked.data[0].url.startswith(f"{service.url}/v1/images/")
    download = service.http.get(linked.data[0].url)  # with local storage the URL needs the key, as any route
    assert download.status_code == 200 and download.headers["content-type"] == "image/png"
    assert np.array_equal(pixels(download.content), same)

    source = noise_image(64, 64, seed=3)
    file = ("source.png", encode(source), "image/png")
    redrawn = client.images.edit(image=file, prompt="an oil painting", quality="low", extra_body={"seed": 42})
    assert redrawn.data is not None and redrawn.size == "64x64"
    [img2img] = native(service, "/v1/img2img", prompt="an oil painting", image=png_b64(source), steps=15, seed=42)
    assert np.array_equal(b64_pixels(redrawn.data[0]), img2img)

    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 16, 48, 48))  # transparent: repaint this box, keep the rest
    inpainted = client.images.edit(image=[file], mask=("mask.png", encode(mask), "image/png"), prompt="a red apple",
                                   quality="low", response_format="url", extra_body={"seed": 42})
    assert inpainted.data is not None and inpainted.data[0].url
    out = pixels(service.http.get(inpainted.data[0].url).content)
    job_id = inpainted.data[0].url.rsplit("/", 2)[-2]
    stored_mask = np.asarray(Image.open(service.data_dir / "images" / job_id / "mask.png"))
    kept, box = stored_mask == 0, np.zeros((64, 64), dtype=bool)
    box[16:48, 16:48] = True
    original = np.asarray(source, dtype=np.int16)
    assert kept[:6].all() and kept[-6:].all() and not kept[box].any()  # opaque (10+ px from the box) = kept
    assert np.array_equal(out[kept], original[kept])  # kept pixels come back exactly
    assert np.abs(out[box] - original[box]).mean() > 20  # the transparent box was repainted

    with warnings.catch_warnings():  # the client marks variations deprecated (OpenAI's models no longer do them)
        warnings.simplefilter("ignore", DeprecationWarning)
        # (the client's types list OpenAI's three sizes; any WIDTHxHEIGHT within our limits is taken)
        varied = client.images.create_variation(image=file, n=2, size="64x64",  # type: ignore[arg-type]
                                                extra_body={"seed": 7})
    assert varied.data is not None and len(varied.data) == 2
    first, second = (b64_pixels(d) for d in varied.data)
    assert not np.array_equal(first, second)  # seeds 7 and 8
    assert all(np.array_equal(a, b) for a, b in zip(
        (first, second), native(service, "/v1/img2img", prompt="", image=png_b64(source), n=2,
                                width=64, height=64, seed=7), strict=True))

    before = jobs_in(redis)
    with pytest.raises(openai.BadRequestError) as bad_size:
        client.images.generate(prompt=CAT, size="1001x64")
    assert (bad_size.value.param, bad_size.value.code) == ("size", "invalid_request")
    assert "width must be a multiple of 8, got 1001" in bad_size.value.message
    with pytest.raises(openai.BadRequestError) as not_an_image:
        client.images.edit(image=("x.png", b"not an image", "image/png"), prompt="p")
    assert not_an_image.value.param == "image"
    with pytest.raises(openai.AuthenticationError) as bad_key:
        openai.OpenAI(base_url=f"{service.url}/v1", api_key="sdq_wrong").images.generate(prompt=CAT)
    assert bad_key.value.type == "authentication_error"
    assert jobs_in(redis) == before  # nothing was queued


def test_a_resend_with_the_same_idempotency_key_gets_the_first_job(authed: Service, redis: Redis) -> None:
    service = authed
    service.start_api()
    # Each try gives up after 1 s; with no worker yet the first one surely does, and the client sends it again.
    client = openai.OpenAI(base_url=f"{service.url}/v1", api_key=KEY, timeout=1.0, max_retries=12)
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(lambda: client.images.with_raw_response.generate(
            prompt=CAT, size="64x64", quality="low", extra_headers={"Idempotency-Key": "order-7"},
            extra_body={"seed": 5},
        ))
        deadline = time.monotonic() + 20
        while jobs_in(redis) == 0:
            assert time.monotonic() < deadline, service.logs()
            time.sleep(0.05)
        time.sleep(1.5)  # the first try has timed out: its job must stay for the resends
        service.start_worker()
        raw = answer.result(120)
    assert raw.headers["idempotent-replayed"] == "true"  # answered to a resend, with the first request's job
    images = raw.parse().data
    assert images is not None and len(images) == 1
    assert jobs_in(redis) == 1
    [same] = native(service, "/v1/txt2img", prompt=CAT, width=64, height=64, steps=15, seed=5)
    assert np.array_equal(b64_pixels(images[0]), same)
