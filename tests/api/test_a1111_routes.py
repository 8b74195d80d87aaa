"""The /sdapi/v1 routes without a worker: refusals queue nothing, the lists and options, auth, metrics, and the
synchronous wait (its end by interrupt, and a client that hangs up)."""

from __future__ import annotations

import base64
import json
import threading
import time
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from redis import Redis
from rq import Queue
from rq.job import Job

from api.main import create_app
from core import apikeys
from core.imagefile import encode_image
from core.queues import Keys
from core.settings import Settings
from tests.api.conftest import LiveServer
from tests.api.test_metrics import samples
from tests.api.test_models import INPAINT, SD15, start_worker
from tests.images import noise_image, png_b64

KEY = "sdq_a1111-test-key"
SMALL = {"prompt": "a cat", "width": 64, "height": 64, "steps": 4}


def nothing_queued(redis: Redis, keys: Keys, settings: Settings) -> bool:
    images = settings.data_dir / "images"
    stored = [p for p in images.rglob("*") if p.is_file()] if images.exists() else []
    return all(len(Queue(q, connection=redis)) == 0 for q in keys.queues()) and not redis.keys("rq:job:*") \
        and not stored


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/sdapi/v1/txt2img", {"prompt": "a cat", "enable_hr": True}, "enable_hr"),
    ("/sdapi/v1/txt2img", {"prompt": "a cat", "cfg_scale": 99}, "cfg_scale"),
    ("/sdapi/v1/txt2img", {"prompt": "a cat", "batch_size": 0}, "batch_size"),
    ("/sdapi/v1/txt2img", {"prompt": "a cat", "sampler_name": "UniPC"}, "sampler_name"),
    ("/sdapi/v1/txt2img", {"prompt": "a cat", "alwayson_scripts": {"ADetailer": {"args": [True]}}},
     "alwayson_scripts"),
    ("/sdapi/v1/txt2img", {"prompt": "a cat", "steps": "many"}, "steps"),
    ("/sdapi/v1/img2img", {"prompt": "a cat"}, "init_images"),
    ("/sdapi/v1/img2img", {"prompt": "a cat", "init_images": ["bm90IGFuIGltYWdl"]}, "init_images.0"),
    ("/sdapi/v1/img2img", {"prompt": "a cat", "init_images": [png_b64(noise_image(64, 64))], "width": 60},
     "width"),
    ("/sdapi/v1/img2img", {"prompt": "a cat", "init_images": [png_b64(noise_image(64, 64))],
                           "mask": png_b64(noise_image(32, 32))}, "mask"),
    ("/sdapi/v1/img2img", {"prompt": "a cat", "init_images": [png_b64(noise_image(64, 64))],
                           "denoising_strength": -1}, "denoising_strength"),
])
def test_bad_inputs_are_422_naming_the_a1111_field_and_queue_nothing(
    client: TestClient, redis: Redis, keys: Keys, settings: Settings, path: str, body: dict[str, Any], field: str
) -> None:
    r = client.post(path, json=body)

    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == field and r.json()["error"]["message"].startswith(field), r.json()
    assert nothing_queued(redis, keys, settings)


def test_samplers_schedulers_and_empty_lists_have_a1111s_shapes(client: TestClient) -> None:
    samplers = client.get("/sdapi/v1/samplers").json()
    schedulers = client.get("/sdapi/v1/schedulers").json()

    assert [s["name"] for s in samplers] == ["DDIM", "Euler", "Euler a", "DPM++ 2M", "LCM", "TCD"]
    assert {s["name"]: s["options"] for s in samplers}["DPM++ 2M"] == {"scheduler": "karras"}
    assert [(s["name"], s["label"]) for s in schedulers] == [
        ("automatic", "Automatic"), ("uniform", "Uniform"), ("karras", "Karras")]
    for path in ("loras", "sd-vae", "hypernetworks", "face-restorers", "prompt-styles", "script-info"):
        assert client.get(f"/sdapi/v1/{path}").json() == [], path
    assert client.get("/sdapi/v1/embeddings").json() == {"loaded": {}, "skipped": {}}
    assert client.get("/sdapi/v1/scripts").json() == {"txt2img": [], "img2img": []}
    assert [u["name"] for u in client.get("/sdapi/v1/upscalers").json()] == ["None"]
    assert client.get("/sdapi/v1/cmd-flags").json()["api"] is True


def test_models_and_options_follow_the_live_workers(client: TestClient, redis: Redis) -> None:
    assert client.get("/sdapi/v1/sd-models").json() == []
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] is None
    refused = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "v1-5-pruned-emaonly [6ce0161689]"})
    assert refused.status_code == 422 and refused.json()["error"]["field"] == "sd_model_checkpoint"

    start_worker(redis, "gpu-a", SD15)

    [model] = client.get("/sdapi/v1/sd-models").json()
    assert model == {"title": "v1-5-pruned-emaonly [6ce0161689]", "model_name": "v1-5-pruned-emaonly",
                     "hash": "6ce0161689", "sha256": SD15.sha256, "filename": "v1-5-pruned-emaonly", "config": None}
    options = client.get("/sdapi/v1/options").json()
    assert (options["sd_model_checkpoint"], options["sd_checkpoint_hash"]) == (model["title"], SD15.sha256)
    ok = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": model["title"], "samples_format": "png"})
    assert (ok.status_code, ok.json()) == (200, None)
    other = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "anything-v3"})
    assert other.status_code == 422 and "v1-5-pruned-emaonly [6ce0161689]" in other.json()["error"]["message"]
    fixed = client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2})
    assert fixed.status_code == 422 and fixed.json()["error"]["field"] == "CLIP_stop_at_last_layers"


def test_post_options_chooses_the_model_of_a1111_requests_that_name_none(client: TestClient, redis: Redis) -> None:
    start_worker(redis, "gpu-a", SD15)
    start_worker(redis, "cpu-1", INPAINT)
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "sd-v1-5-inpainting [c6bbc15e32]"
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": SD15.name}).status_code == 200
    options = client.get("/sdapi/v1/options").json()
    assert (options["sd_model_checkpoint"], options["sd_checkpoint_hash"]) == (f"{SD15.name} [{SD15.hash}]",
                                                                               SD15.sha256)
    assert redis.get("sdq:a1111:sd_model_checkpoint") == SD15.name.encode()


def test_png_info_reads_the_parameters_sdqueue_writes(client: TestClient) -> None:
    text = "a cat\nNegative prompt: blurry\nSteps: 4, Sampler: Euler, CFG scale: 7, Seed: 42, Size: 64x48"
    png = encode_image(noise_image(64, 48), parameters=text, record={"job_id": "j1"}).data

    r = client.post("/sdapi/v1/png-info", json={"image": "data:image/png;base64," + base64.b64encode(png).decode()})
    plain = client.post("/sdapi/v1/png-info", json={"image": png_b64(noise_image(8, 8))})
    broken = client.post("/sdapi/v1/png-info", json={"image": "bm90IGFuIGltYWdl"})

    assert r.status_code == 200
    assert r.json()["info"] == text and r.json()["items"] == {"sdqueue": {"job_id": "j1"}}
    assert r.json()["parameters"] == {"Prompt": "a cat", "Negative prompt": "blurry", "Steps": "4", "Sampler": "Euler",
                                      "CFG scale": "7", "Seed": "42", "Size": "64x48", "Size-1": "64", "Size-2": "48"}
    assert plain.json() == {"info": "", "items": {}, "parameters": {}}
    assert broken.status_code == 422 and broken.json()["error"]["field"] == "image"


def test_the_api_key_works_as_basic_password_or_bearer(settings: Settings) -> None:
    keyed = settings.model_copy(update={"api_keys": f"alice:{apikeys.digest(KEY)}"})
    with TestClient(create_app(keyed)) as client:
        none = client.get("/sdapi/v1/options")
        wrong = client.get("/sdapi/v1/options", auth=("alice", "sdq_wrong"))
        garbled = client.get("/sdapi/v1/options", headers={"Authorization": "Basic !!!"})
        basic = client.get("/sdapi/v1/options", auth=("any-user", KEY))
        bearer = client.get("/sdapi/v1/options", headers={"Authorization": f"Bearer {KEY}"})
        native = client.get("/v1/jobs", auth=("", KEY))
        refused_body = client.post("/sdapi/v1/txt2img", json={"enable_hr": True}, auth=("alice", "sdq_wrong"))

    assert [r.status_code for r in (none, wrong, garbled, refused_body)] == [401, 401, 401, 401]
    assert [r.status_code for r in (basic, bearer, native)] == [200, 200, 200]


def test_requests_are_counted_by_layer(client: TestClient) -> None:
    client.get("/sdapi/v1/samplers")
    client.post("/sdapi/v1/txt2img", json={"prompt": "a", "steps": 0})
    client.get("/v1/samplers")
    client.get("/sdapi/v1/no-such-route")
    client.post("/v1/images/generations", json={"prompt": "a", "size": "13x13"})
    client.get("/v1/images/0123/0.png")  # the native download shares OpenAI's prefix

    m = samples(client)
    by_layer: dict[tuple[str, str], float] = {}
    for (name, labels), value in m.items():
        if name == "sdq_http_requests_total":
            key = (dict(labels)["layer"], dict(labels)["route"])
            by_layer[key] = by_layer.get(key, 0) + value

    a1111 = (("layer", "a1111"), ("method", "GET"), ("route", "/sdapi/v1/samplers"), ("status", "200"))
    refused = (("layer", "a1111"), ("method", "POST"), ("route", "/sdapi/v1/txt2img"), ("status", "422"))
    native = (("layer", "native"), ("method", "GET"), ("route", "/v1/samplers"), ("status", "200"))
    unmatched = (("layer", "a1111"), ("method", "GET"), ("route", "unmatched"), ("status", "404"))
    for labels in (a1111, refused, native, unmatched):
        assert m[("sdq_http_requests_total", labels)] == 1, labels
    assert m[("sdq_http_request_duration_seconds_count", a1111[:3])] == 1
    assert by_layer[("openai", "/v1/images/generations")] == 1
    assert by_layer[("native", "/v1/images/{key:path}")] == 1


def test_the_openapi_document_tags_the_layer(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    a1111 = {path: item for path, item in spec["paths"].items() if path.startswith("/sdapi/v1/")}

    assert {"/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/progress", "/sdapi/v1/options"} <= set(a1111)
    assert all(op["tags"] == ["a1111"] for item in a1111.values() for op in item.values())
    assert all(op["operationId"].startswith("a1111_") for item in a1111.values() for op in item.values())


def queued_job_ids(redis: Redis, keys: Keys) -> list[str]:
    return [i.decode() for q in keys.queues() for i in redis.lrange(Queue(q, connection=redis).key, 0, -1)]


def wait_for(check: Any, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_interrupt_ends_the_callers_waiting_request_with_no_image(
    live_server: LiveServer, redis: Redis, keys: Keys
) -> None:
    answer: dict[str, Any] = {}

    def generate() -> None:
        r = httpx.post(f"{live_server.url}/sdapi/v1/txt2img", json={**SMALL, "seed": 5, "batch_size": 2}, timeout=30)
        answer.update(status=r.status_code, body=r.json())

    thread = threading.Thread(target=generate)
    thread.start()
    wait_for(lambda: queued_job_ids(redis, keys))
    [job_id] = queued_job_ids(redis, keys)
    progress = httpx.get(f"{live_server.url}/sdapi/v1/progress").json()

    assert httpx.post(f"{live_server.url}/sdapi/v1/interrupt").json() == {}
    thread.join(30)

    assert progress["state"]["job_count"] == 1 and progress["progress"] == 0.01  # queued: there, not started
    assert Job.fetch(job_id, connection=redis).get_status() == "canceled"
    assert answer["status"] == 200 and answer["body"]["images"] == []
    info = json.loads(answer["body"]["info"])
    assert (info["job_id"], info["status"], info["all_seeds"]) == (job_id, "canceled", [5, 6])
    idle = httpx.get(f"{live_server.url}/sdapi/v1/progress").json()
    assert (idle["progress"], idle["state"]["job_count"]) == (0.0, 0)


def test_a_client_that_hangs_up_gets_its_queued_job_canceled(
    live_server: LiveServer, redis: Redis, keys: Keys
) -> None:
    with pytest.raises(httpx.ReadTimeout):  # no worker: the job waits, and the client gives up
        httpx.post(f"{live_server.url}/sdapi/v1/txt2img", json=SMALL, timeout=1.0)
    [job_id] = [k.decode().removeprefix("rq:job:") for k in redis.keys("rq:job:*")]

    wait_for(lambda: Job.fetch(job_id, connection=redis).get_status() == "canceled")

    assert queued_job_ids(redis, keys) == []


def test_with_an_idempotency_key_the_queued_job_outlives_the_client_for_its_resend(
    live_server: LiveServer, redis: Redis, keys: Keys
) -> None:
    url, keyed = f"{live_server.url}/sdapi/v1/txt2img", {"Idempotency-Key": "a1111-order-1"}
    for _ in range(2):  # the request and its resend both give up: one job, still queued
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url, json=SMALL, headers=keyed, timeout=1.0)
    [job_id] = queued_job_ids(redis, keys)
    with pytest.raises(httpx.ReadTimeout):  # the same without a key: that job is canceled
        httpx.post(url, json={**SMALL, "seed": 2}, timeout=1.0)
    [other_id] = [k.decode().removeprefix("rq:job:") for k in redis.keys("rq:job:*") if job_id not in k.decode()]

    wait_for(lambda: Job.fetch(other_id, connection=redis).get_status() == "canceled")

    assert queued_job_ids(redis, keys) == [job_id]
    assert Job.fetch(job_id, connection=redis).get_status() == "queued"


def test_routes_of_features_sdqueue_lacks_say_so(client: TestClient) -> None:
    r = client.post("/sdapi/v1/interrogate", json={"image": png_b64(noise_image(8, 8)), "model": "clip"})
    extras = client.post("/sdapi/v1/extra-single-image", json={})

    assert r.status_code == 404 and r.json()["error"]["message"] == (
        "prompts from images (interrogate) is not supported by sdqueue")
    assert extras.status_code == 404 and "upscaling" in extras.json()["error"]["message"]
