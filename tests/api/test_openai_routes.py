"""The OpenAI Images routes on a real uvicorn and Redis, with the worker's side played on RQ's own APIs
(tests/rq_worker_side.py): synchronous answers, OpenAI's error shape, disconnects, Idempotency-Key resends."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from redis import Redis
from rq import Queue
from rq.job import Job

from api.main import create_app
from core import apikeys, jobstore
from core.jobs import JobSpec, Priority, Status
from core.queues import Keys
from core.settings import Settings
from tests.api.conftest import LiveServer
from tests.images import encode, noise_image
from tests.rq_worker_side import take

T = TypeVar("T")
KEY = "sdq_openai-test-key"
PNG = encode(noise_image(64, 64))


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(4) as executor:
        yield executor


def client_of(server: LiveServer, **options: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused with auth off", **options)


def queued(redis: Redis, keys: Keys, count: int = 1, timeout: float = 10) -> list[str]:
    """The ids on the normal queue once it holds `count` jobs."""
    deadline = time.monotonic() + timeout
    while len(ids := Queue("sdq-normal", connection=redis).job_ids) < count:
        assert time.monotonic() < deadline, f"{count} job(s) were not queued within {timeout} s: {ids}"
        time.sleep(0.02)
    return ids


def all_jobs(redis: Redis) -> list[bytes]:
    return sorted(k for k in redis.keys("rq:job:*") if k.count(b":") == 2)


def succeed(server: LiveServer, redis: Redis, keys: Keys, job_id: str) -> None:
    """Run the job as a worker would: write its image, then record the success."""
    storage = server.app.state.storage
    storage.put(f"{job_id}/0.png", PNG, "image/png")
    take(redis, keys, job_id).succeed({"images": [{"key": f"{job_id}/0.png", "seed": 7, "width": 64, "height": 64,
                                                   "content_type": "image/png"}],
                                       "warnings": [], "timings": {"run_seconds": 0.1}})


def spec_of(redis: Redis, job_id: str) -> JobSpec:
    return JobSpec.model_validate(Job.fetch(job_id, connection=redis).kwargs["spec"])


def in_thread(pool: ThreadPoolExecutor, call: Callable[[], T]) -> Future[T]:
    return pool.submit(call)


def test_a_generation_answers_with_the_images_once_its_job_has_ended(
    live_server: LiveServer, redis: Redis, keys: Keys, pool: ThreadPoolExecutor
) -> None:
    client = client_of(live_server)
    as_b64 = in_thread(pool, lambda: client.images.generate(prompt="a cat", size="64x64", quality="low",
                                                            extra_body={"seed": 7}))
    [job_id] = queued(redis, keys)
    spec = spec_of(redis, job_id)
    assert (spec.task, spec.params.width, spec.params.height, spec.params.steps, spec.seed) == (
        "txt2img", 64, 64, 15, 7)
    time.sleep(0.3)
    assert not as_b64.done()  # it waits for the job
    succeed(live_server, redis, keys, job_id)
    answer = as_b64.result(10)
    assert answer.data is not None and base64.b64decode(answer.data[0].b64_json or "") == PNG
    assert (answer.size, answer.output_format, answer.data[0].revised_prompt) == ("64x64", "png", "a cat")

    as_url = in_thread(pool, lambda: client.images.generate(prompt="a dog", size="64x64", response_format="url"))
    [second] = queued(redis, keys)
    succeed(live_server, redis, keys, second)
    data = as_url.result(10).data
    assert data is not None and data[0].b64_json is None
    assert data[0].url == f"http://api.example/v1/images/{second}/0.png"  # SDQ_PUBLIC_URL


def test_a_failed_job_is_a_500_that_the_client_does_not_resend(
    live_server: LiveServer, redis: Redis, keys: Keys, pool: ThreadPoolExecutor
) -> None:
    client = client_of(live_server, max_retries=2)
    answer = in_thread(pool, lambda: client.images.generate(prompt="a cat", size="64x64"))
    [job_id] = queued(redis, keys)
    take(redis, keys, job_id).fail(RuntimeError("the GPU caught fire"))
    with pytest.raises(openai.InternalServerError) as info:
        answer.result(10)
    assert info.value.message.endswith("failed (RuntimeError: the GPU caught fire)")
    assert info.value.response.headers["x-should-retry"] == "false"
    time.sleep(1.5)  # a resend would come after 0.5..1 s
    assert all_jobs(redis) == [f"rq:job:{job_id}".encode()]


def test_a_client_that_goes_away_cancels_its_queued_job(live_server: LiveServer, redis: Redis, keys: Keys) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{live_server.url}/v1/images/generations", json={"prompt": "a cat", "size": "64x64"},
                   timeout=0.5)
    [job_id] = [k.decode().removeprefix("rq:job:") for k in all_jobs(redis)]
    deadline = time.monotonic() + 10
    while (job := jobstore.get_job(redis, keys, live_server.app.state.storage, job_id)) is not None and \
            job.status is not Status.canceled:
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    assert Queue("sdq-normal", connection=redis).job_ids == []


def test_with_an_idempotency_key_the_job_outlives_the_client_and_a_resend_gets_it(
    live_server: LiveServer, redis: Redis, keys: Keys, pool: ThreadPoolExecutor
) -> None:
    url, body, key = f"{live_server.url}/v1/images/generations", {"prompt": "a cat", "size": "64x64"}, "order-1"
    for _ in range(2):  # the first request and a resend both time out: still one job, still queued
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url, json=body, headers={"Idempotency-Key": key}, timeout=0.5)
    time.sleep(0.3)
    [job_id] = queued(redis, keys)
    resend = in_thread(pool, lambda: httpx.post(url, json=body, headers={"Idempotency-Key": key}, timeout=10))
    time.sleep(0.3)
    succeed(live_server, redis, keys, job_id)
    r = resend.result(10)
    assert r.status_code == 200, r.text
    assert r.headers["idempotent-replayed"] == "true"
    assert base64.b64decode(r.json()["data"][0]["b64_json"]) == PNG
    assert all_jobs(redis) == [f"rq:job:{job_id}".encode()]

    other = httpx.post(url, json={**body, "prompt": "a dog"}, headers={"Idempotency-Key": key}, timeout=10)
    assert other.status_code == 409
    assert other.headers["x-should-retry"] == "false"  # another body: resending cannot help
    assert other.json()["error"]["code"] == "idempotency_conflict"


def test_bad_inputs_are_400s_in_openai_shape_and_queue_nothing(client: TestClient, redis: Redis,
                                                                settings: Settings) -> None:
    r = client.post("/v1/images/generations", json={"prompt": "a cat", "size": "1001x512"})
    assert r.status_code == 400
    assert r.json() == {"error": {
        "message": "size '1001x512': width must be a multiple of 8, got 1001", "type": "invalid_request_error",
        "param": "size", "code": "invalid_request",
    }}
    assert client.post("/v1/images/generations", json={"size": "64x64"}).json()["error"]["param"] == "prompt"
    bad_format = client.post("/v1/images/generations", json={"prompt": "p", "output_format": "gif"})
    assert (bad_format.status_code, bad_format.json()["error"]["param"]) == (400, "output_format")
    absent = client.post("/v1/images/generations", json={"prompt": "p", "model": "absent"})
    assert (absent.status_code, absent.json()["error"]["param"]) == (400, "model")
    assert "model 'absent' is not served" in absent.json()["error"]["message"]

    def edit(files: dict[str, tuple[str, bytes, str]]) -> dict[str, Any]:
        r = client.post("/v1/images/edits", data={"prompt": "a red apple"}, files=files)
        assert r.status_code == 400, r.text
        return dict(r.json()["error"])

    assert edit({"image": ("a.txt", b"not an image", "text/plain")})["param"] == "image"
    assert "no transparency" in edit({"image": ("a.png", PNG, "image/png"), "mask": ("m.png", PNG, "image/png")})[
        "message"]
    small_mask = encode(noise_image(32, 32).convert("RGBA").point(lambda v: 0))
    assert edit({"image": ("a.png", PNG, "image/png"), "mask": ("m.png", small_mask, "image/png")})["message"] == \
        "mask is 32x32 but image is 64x64: they must be the same size"
    two = [("image[]", ("a.png", PNG, "image/png")), ("image[]", ("b.png", PNG, "image/png"))]
    r = client.post("/v1/images/edits", data={"prompt": "p"}, files=two)
    assert (r.status_code, r.json()["error"]["param"]) == (400, "image")
    r = client.post("/v1/images/variations", files={"image": ("a.png", PNG, "image/png")}, data={"size": "100x100"})
    assert (r.status_code, r.json()["error"]["param"]) == (400, "size")

    assert all_jobs(redis) == []
    images = settings.data_dir / "images"
    assert not images.exists() or not any(images.rglob("*.png"))  # prepared inputs of refused jobs are deleted


def test_a_full_queue_is_503_with_retry_after(settings: Settings) -> None:
    with TestClient(create_app(settings.model_copy(update={"max_queued_jobs": 0}))) as c:
        r = c.post("/v1/images/generations", json={"prompt": "a cat", "size": "64x64"})
    assert r.status_code == 503
    assert r.headers["retry-after"] == "5"
    assert r.json()["error"]["type"] == "server_error"
    assert r.json()["error"]["code"] == "queue_full"


def test_a_wrong_key_is_openai_s_authentication_error(settings: Settings) -> None:
    app = create_app(settings.model_copy(update={"api_keys": f"alice:{apikeys.digest(KEY)}"}))
    with TestClient(app) as c:
        r = c.post("/v1/images/generations", json={"prompt": "a cat"}, headers={"Authorization": "Bearer nope"})
        native = c.get("/v1/jobs/x", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert r.json() == {"error": {"message": "unknown or revoked API key", "type": "authentication_error",
                                  "param": "Authorization", "code": "unauthorized"}}
    assert native.json()["error"]["type"] == "unauthorized"  # other paths keep the native shape


def test_image_downloads_keep_their_route_and_native_errors(client: TestClient) -> None:
    r = client.get("/v1/images/nothing/0.png")
    assert r.status_code == 404
    assert set(r.json()["error"]) == {"type", "message", "field"}
    assert client.get("/v1/images/generations").status_code == 404  # GET is still the image download


def test_the_openapi_spec_tags_the_layer_and_documents_its_error_shape(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    ids = {}
    for path in ("/v1/images/generations", "/v1/images/edits", "/v1/images/variations"):
        op = spec["paths"][path]["post"]
        ids[path] = op["operationId"]
        assert op["tags"] == ["OpenAI Images"]
        assert "422" not in op["responses"]
        for code in ("400", "401", "429", "503", "4XX"):
            schema = op["responses"][code]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/OpenAIErrorResponse"}, (path, code)
    assert ids == {"/v1/images/generations": "create_image", "/v1/images/edits": "create_image_edit",
                   "/v1/images/variations": "create_image_variation"}
    edit_form = spec["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert set(edit_form["encoding"]) >= {"image", "image[]", "mask"}


def test_an_edit_with_a_mask_queues_an_inpaint_job_with_the_converted_mask(
    live_server: LiveServer, redis: Redis, keys: Keys, pool: ThreadPoolExecutor
) -> None:
    mask = noise_image(64, 64).convert("RGBA")
    mask.putalpha(255)
    mask.paste((0, 0, 0, 0), (0, 0, 32, 64))  # left half transparent: edit it
    files = {"image": ("a.png", PNG, "image/png"), "mask": ("m.png", encode(mask), "image/png")}
    answer = in_thread(pool, lambda: httpx.post(f"{live_server.url}/v1/images/edits", data={"prompt": "p", "n": "2"},
                                                files=files, timeout=10))
    [job_id] = queued(redis, keys)
    spec = spec_of(redis, job_id)
    assert (spec.task, spec.params.n, spec.strength, spec.mask_overlay) == ("inpaint", 2, 1.0, True)
    stored = Image.open(io.BytesIO(live_server.app.state.storage.get(spec.mask_key)))
    assert stored.getpixel((8, 32)) == 255 and stored.getpixel((56, 32)) == 0  # white = repaint, after the blur
    succeed(live_server, redis, keys, job_id)
    assert answer.result(10).status_code == 200


def test_a_rate_limited_request_is_resent_by_the_client_after_retry_after(
    settings: Settings, redis: Redis, keys: Keys, pool: ThreadPoolExecutor
) -> None:
    limited = settings.model_copy(update={"api_keys": f"alice:{apikeys.digest(KEY)}", "rate_limit_per_min": 60,
                                          "rate_limit_burst": 1})
    server = LiveServer(create_app(limited))
    server.start()
    try:
        spent = httpx.post(f"{server.url}/v1/txt2img", json={"prompt": "a cat", "width": 64, "height": 64},
                           headers={"Authorization": f"Bearer {KEY}"})
        assert spent.status_code == 202  # the key's one token
        refused = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "a dog", "size": "64x64"},
                             headers={"Authorization": f"Bearer {KEY}"})
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert refused.json()["error"]["code"] == "rate_limited"

        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=2)
        started = time.monotonic()
        answer = pool.submit(lambda: client.images.generate(prompt="a dog", size="64x64"))
        native_id, resent_id = queued(redis, keys, count=2)  # the native job, then the resend's
        # Refused again at once, the client waited out Retry-After (its own first backoff is 0.5 s at most).
        assert time.monotonic() - started >= 0.9
        assert native_id == spent.json()["id"] and spec_of(redis, resent_id).params.prompt == "a dog"
        take(redis, keys, native_id).succeed({"images": [], "warnings": [], "timings": {}})
        succeed(server, redis, keys, resent_id)
        assert answer.result(10).data is not None
    finally:
        server.stop()


def test_a_key_limited_to_low_priority_gets_its_images_at_low(settings: Settings, redis: Redis) -> None:
    server = LiveServer(create_app(settings.model_copy(update={"api_keys": f"bob:{apikeys.digest(KEY)}:low"})))
    server.start()
    try:
        with pytest.raises(httpx.ReadTimeout):  # queued (not 403): OpenAI's requests carry no priority
            httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "a cat", "size": "64x64"},
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=0.5)
    finally:
        server.stop()
    [job_key] = all_jobs(redis)
    assert spec_of(redis, job_key.decode().removeprefix("rq:job:")).params.priority is Priority.low
