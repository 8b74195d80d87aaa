"""LoRAs on the API: the names live workers announce (GET /v1/loras, /sdapi/v1/loras), the `loras` field and
`<lora:name:weight>` prompt tags, and unknown names refused with 422 before anything is queued."""

from __future__ import annotations

from fastapi.testclient import TestClient
from redis import Redis

from core.catalog import LoadedModel
from tests.api.test_models import start_worker

QUEUE = "rq:queue:sdq-model-sd15-normal"  # the queue of the live workers' model


def model(*loras: str) -> LoadedModel:
    return LoadedModel(name="sd15", inpainting_unet=False, device="cpu", dtype="float32", loras=list(loras))


def test_loras_are_what_the_live_workers_announce(client: TestClient, redis: Redis) -> None:
    assert client.get("/v1/loras").json() == {"loras": []}
    start_worker(redis, "w1", model("add-detail", "pixel art"))
    start_worker(redis, "w2", model("add-detail"))
    start_worker(redis, "gone", model("old-style")).register_death()
    assert client.get("/v1/loras").json() == {"loras": [
        {"name": "add-detail", "workers": ["w1", "w2"]},
        {"name": "pixel art", "workers": ["w1"]},
    ]}
    assert client.get("/sdapi/v1/loras").json() == [
        {"name": "add-detail", "alias": "add-detail", "path": "add-detail.safetensors", "metadata": {}},
        {"name": "pixel art", "alias": "pixel art", "path": "pixel art.safetensors", "metadata": {}},
    ]


def test_unknown_lora_is_422_naming_it_and_nothing_is_queued(client: TestClient, redis: Redis) -> None:
    start_worker(redis, "w1", model("add-detail"))
    r = client.post("/v1/txt2img", json={"prompt": "a cat", "loras": [{"name": "add-detail"}, {"name": "nope"}]})
    assert r.status_code == 422
    assert r.json()["error"]["field"] == "loras"
    assert "'nope' is not available; the live workers have: add-detail" in r.json()["error"]["message"]
    r = client.post("/v1/txt2img", json={"prompt": "a cat <lora:missing:0.5>"})
    assert r.status_code == 422 and "'missing'" in r.json()["error"]["message"]
    assert redis.llen(QUEUE) == 0


def test_no_worker_announcing_loras_says_so(client: TestClient) -> None:
    r = client.post("/v1/txt2img", json={"prompt": "a cat", "loras": [{"name": "add-detail"}]})
    assert r.status_code == 422 and "set SDQ_LORA_DIR" in r.json()["error"]["message"]


def test_prompt_tags_become_loras_and_leave_the_prompt(client: TestClient, redis: Redis) -> None:
    start_worker(redis, "w1", model("add-detail", "pixel art"))
    r = client.post("/v1/txt2img", json={"prompt": "a cat <lora:pixel art:0.6>, sharp <lora:add-detail>",
                                         "loras": []})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["params"]["prompt"] == "a cat , sharp "
    assert job["params"]["loras"] == [{"name": "pixel art", "scale": 0.6}, {"name": "add-detail", "scale": 1.0}]
    assert redis.llen(QUEUE) == 1
    assert client.get(f"/v1/jobs/{job['id']}").json()["params"]["loras"] == job["params"]["loras"]


def test_bad_loras_are_422(client: TestClient, redis: Redis) -> None:
    start_worker(redis, "w1", model("add-detail"))
    bad = [
        ({"prompt": "a <lora:add-detail:0.5:1>"}, "separate text encoder and UNet weights"),
        ({"prompt": "a <hypernet:x:1>"}, "only <lora:name:weight>"),
        ({"prompt": "a <lora:add-detail> <lora:add-detail:2>"}, "asked for twice"),
        ({"prompt": "a", "loras": [{"name": "add-detail", "scale": 11}]}, "less than or equal to 10"),
        ({"prompt": "a", "loras": [{"name": "../etc/passwd"}]}, "loras.0.name"),
    ]
    for body, message in bad:
        r = client.post("/v1/txt2img", json=body)
        assert r.status_code == 422, body
        assert message in r.json()["error"]["message"], r.json()
    assert redis.llen(QUEUE) == 0


def test_a1111_prompt_tags_are_checked_too(client: TestClient, redis: Redis) -> None:
    start_worker(redis, "w1", model("add-detail"))
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat <lora:nope:0.8>", "steps": 4})
    assert r.status_code == 422
    assert "lora 'nope' is not available" in r.json()["error"]["message"]
    assert redis.llen(QUEUE) == 0
