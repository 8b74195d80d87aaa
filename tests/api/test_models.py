"""GET /v1/models (what live workers report) and GET /v1/samplers."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient
from redis import Redis
from rq import Worker

from api.main import create_app
from core import catalog
from core.catalog import LoadedModel, publish_model
from core.settings import Settings

SD15 = LoadedModel(name="v1-5-pruned-emaonly", hash="6ce0161689", sha256="6ce0161689" + "0" * 54,
                   inpainting_unet=False, device="cuda", dtype="float16")
INPAINT = LoadedModel(name="sd-v1-5-inpainting", hash="c6bbc15e32", sha256="c6bbc15e32" + "1" * 54,
                      inpainting_unet=True, device="cpu", dtype="bfloat16", tiny_vae=True)


def start_worker(
    redis: Redis, name: str, model: LoadedModel | None, queues: tuple[str, ...] = ("sdq-normal",)
) -> Worker:
    """Register a worker as the sdqueue worker does: RQ's registration, then the model in its hash."""
    worker = Worker(list(queues), connection=redis, name=name)
    worker.register_birth()
    if model is not None:
        publish_model(redis, worker.key, model)
    return worker


def test_no_worker_no_model(client: TestClient) -> None:
    assert client.get("/v1/models").json() == {"models": []}


def test_models_are_grouped_per_checkpoint_with_their_workers(client: TestClient, redis: Redis) -> None:
    start_worker(redis, "gpu-b", SD15)
    start_worker(redis, "gpu-a", SD15, queues=("sdq-high", "sdq-normal", "sdq-low"))
    start_worker(redis, "cpu-1", INPAINT)
    start_worker(redis, "plain-rq", None)  # an RQ worker that reports no model
    start_worker(redis, "elsewhere", SD15, queues=("other-app",))  # not on sdqueue's queues
    stopped = start_worker(redis, "gone", INPAINT)
    stopped.register_death()

    assert client.get("/v1/models").json() == {"models": [
        {"name": "sd-v1-5-inpainting", "hash": "c6bbc15e32", "sha256": INPAINT.sha256, "inpainting_unet": True,
         "tiny_vae": True, "queued": 0, "default_size": 512, "refiners": [],
         "workers": [{"name": "cpu-1", "device": "cpu", "dtype": "bfloat16"}]},
        {"name": "v1-5-pruned-emaonly", "hash": "6ce0161689", "sha256": SD15.sha256, "inpainting_unet": False,
         "tiny_vae": False, "queued": 0, "default_size": 512, "refiners": [],
         "workers": [{"name": "gpu-a", "device": "cuda", "dtype": "float16"},
                     {"name": "gpu-b", "device": "cuda", "dtype": "float16"}]},
    ]}


def test_jobs_go_to_their_models_queues_and_the_counts_follow(client: TestClient, redis: Redis) -> None:
    start_worker(redis, "gpu-b", SD15)
    start_worker(redis, "cpu-1", INPAINT)
    job = {"prompt": "a cat", "width": 64, "height": 64}
    for model in ("v1-5-pruned-emaonly", "v1-5-pruned-emaonly", "sd-v1-5-inpainting"):
        assert client.post("/v1/txt2img", json={**job, "model": model}).status_code == 202
    r = client.post("/v1/txt2img", json={**job, "model": "absent", "priority": "high"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "model"
    assert r.json()["error"]["message"] == ("model 'absent' is not served; the live workers hold: "
                                            "sd-v1-5-inpainting, v1-5-pruned-emaonly")
    r = client.post("/v1/txt2img", json=job)  # two models, no default: which one would be a guess
    assert r.status_code == 422 and "model is required" in r.json()["error"]["message"]
    assert redis.llen("rq:queue:sdq-model-v1-5-pruned-emaonly-normal") == 2
    assert redis.llen("rq:queue:sdq-model-sd-v1-5-inpainting-normal") == 1
    assert redis.llen("rq:queue:sdq-normal") == 0 and redis.llen("rq:queue:sdq-model-absent-high") == 0
    queued = {m["name"]: m["queued"] for m in client.get("/v1/models").json()["models"]}
    assert queued == {"sd-v1-5-inpainting": 1, "v1-5-pruned-emaonly": 2}
    assert client.get("/readyz").json()["models"] == {"sd-v1-5-inpainting": {"workers": 1, "queued": 1},
                                                      "v1-5-pruned-emaonly": {"workers": 1, "queued": 2}}


def test_a_worker_whose_registration_expired_drops_out(client: TestClient, redis: Redis) -> None:
    worker = start_worker(redis, "killed", SD15)
    redis.delete(worker.key)  # what the TTL does once a SIGKILLed worker's heartbeats stop
    assert client.get("/v1/models").json() == {"models": []}


def test_samplers_with_a1111_names_and_options(client: TestClient) -> None:
    assert client.get("/v1/samplers").json() == {"samplers": [
        {"name": "ddim", "display_name": "DDIM", "karras": False, "eta": True},
        {"name": "euler", "display_name": "Euler", "karras": True, "eta": False},
        {"name": "euler_a", "display_name": "Euler a", "karras": True, "eta": False},
        {"name": "dpmpp_2m", "display_name": "DPM++ 2M", "karras": True, "eta": False},
        {"name": "lcm", "display_name": "LCM", "karras": False, "eta": False},
        {"name": "tcd", "display_name": "TCD", "karras": False, "eta": True},
    ]}


def test_a_queued_jobs_eta_counts_its_models_workers_at_its_models_speed(client: TestClient, redis: Redis) -> None:
    from core.queue_stats import record_pipeline_call
    from core.queues import Keys

    keys = Keys("sdq")
    for name, model in (("fast-1", SD15), ("fast-2", SD15), ("slow", INPAINT)):
        start_worker(redis, name, model, queues=tuple(keys.worker_queues(model.name)))
    record_pipeline_call(redis, keys, seconds=2.0, images=2, jobs=2, model=SD15.name)  # 1 s per image
    record_pipeline_call(redis, keys, seconds=8.0, images=2, jobs=2, model=INPAINT.name)  # 4 s per image
    job = {"prompt": "a cat", "width": 64, "height": 64}
    ids = {m: [client.post("/v1/txt2img", json={**job, "model": m}).json()["id"] for _ in range(2)]
           for m in (SD15.name, INPAINT.name)}
    eta = {m: [client.get(f"/v1/jobs/{i}").json()["progress"]["eta_seconds"] for i in ids[m]] for m in ids}
    # second job: one job ahead of it on its model's queue, shared by that model's workers (2 and 1)
    assert eta == {SD15.name: [1.0, 1.5], INPAINT.name: [4.0, 8.0]}


def test_the_default_model_queues_before_its_workers_are_up(settings: Settings, redis: Redis) -> None:
    with TestClient(create_app(settings.model_copy(update={"default_model": "sd15"}))) as client:
        job = {"prompt": "a cat", "width": 64, "height": 64}
        r = client.post("/v1/txt2img", json=job)  # no live worker yet: it waits on the default model's queue
        assert r.status_code == 202 and r.json()["params"]["model"] == "sd15"
        assert redis.llen("rq:queue:sdq-model-sd15-normal") == 1
        start_worker(redis, "gpu-a", SD15)  # once workers are up, other models are refused unless served
        r = client.post("/v1/txt2img", json={**job, "model": "other"})
        assert r.status_code == 422 and r.json()["error"]["message"] == (
            "model 'other' is not served; the live workers hold: v1-5-pruned-emaonly")
        r = client.post("/v1/txt2img", json={**job, "model": SD15.name})
        assert r.status_code == 202 and r.json()["params"]["model"] == SD15.name


def test_the_queue_limit_counts_every_models_jobs(settings: Settings, redis: Redis) -> None:
    start_worker(redis, "gpu-a", SD15)
    start_worker(redis, "cpu-1", INPAINT)
    with TestClient(create_app(settings.model_copy(update={"max_queued_jobs": 2}))) as client:
        job = {"prompt": "a cat", "width": 64, "height": 64}
        assert client.post("/v1/txt2img", json={**job, "model": SD15.name}).status_code == 202
        assert client.post("/v1/txt2img", json={**job, "model": INPAINT.name}).status_code == 202
        full = client.post("/v1/txt2img", json={**job, "model": INPAINT.name})
        assert full.status_code == 503 and "queue full: 2 jobs waiting" in full.json()["error"]["message"]


def test_a_model_whose_workers_left_lately_takes_jobs_until_its_ttl(settings: Settings, redis: Redis) -> None:
    import time

    from core.catalog import mark_served
    from core.queues import Keys

    keys = Keys("sdq")
    start_worker(redis, "gpu-a", SD15)
    mark_served(redis, keys, "scaled-to-zero", time.time() - 600, forget_after_s=86400)
    mark_served(redis, keys, "retired", time.time() - 7200, forget_after_s=86400)
    job = {"prompt": "a cat", "width": 64, "height": 64}
    with TestClient(create_app(settings.model_copy(update={"model_seen_ttl_s": 3600}))) as client:
        r = client.post("/v1/txt2img", json={**job, "model": "scaled-to-zero"})
        assert r.status_code == 202 and r.json()["params"]["model"] == "scaled-to-zero"
        assert redis.llen("rq:queue:sdq-model-scaled-to-zero-normal") == 1  # where its next worker looks
        r = client.post("/v1/txt2img", json={**job, "model": "retired"})  # last seen 2 h ago: past the TTL
        assert r.status_code == 422 and r.json()["error"]["message"] == (
            "model 'retired' is not served; the live workers hold: v1-5-pruned-emaonly; with no live worker now, "
            "jobs still wait for: scaled-to-zero")
        # waiting jobs show in /readyz (and the metrics) under their model, with no worker
        assert client.get("/readyz").json()["models"] == {"scaled-to-zero": {"workers": 0, "queued": 1},
                                                          "v1-5-pruned-emaonly": {"workers": 1, "queued": 0}}
    with TestClient(create_app(settings.model_copy(update={"model_seen_ttl_s": 0}))) as client:
        r = client.post("/v1/txt2img", json={**job, "model": "scaled-to-zero"})
        assert r.status_code == 422, r.text  # 0: only the models of live workers


def test_a_txt2img_job_without_a_size_gets_its_models_native_size(client: TestClient, redis: Redis) -> None:
    start_worker(redis, "gpu-xl", LoadedModel(name="sd_xl_base_1.0", inpainting_unet=False, device="cuda",
                                              dtype="float16", default_size=1024))
    start_worker(redis, "gpu-b", SD15)
    assert client.get("/v1/models").json()["models"][0]["default_size"] == 1024

    def params(body: dict[str, object]) -> dict[str, object]:
        r = client.post("/v1/txt2img", json={"prompt": "a cat", **body})
        assert r.status_code == 202, r.text
        return client.get(f"/v1/jobs/{r.json()['id']}").json()["params"]  # type: ignore[no-any-return]

    p = params({"model": "sd_xl_base_1.0", "original_size": [2048, 1536], "crops_coords_top_left": [0, 64]})
    assert (p["width"], p["height"]) == (1024, 1024)
    assert p["original_size"] == [2048, 1536] and p["crops_coords_top_left"] == [0, 64] and p["target_size"] is None
    p = params({"model": "sd_xl_base_1.0", "width": 832})  # a size given is kept; the other side is the default
    assert (p["width"], p["height"]) == (832, 512)
    p = params({"model": "v1-5-pruned-emaonly"})
    assert (p["width"], p["height"]) == (512, 512)
    r = client.post("/v1/txt2img", json={"prompt": "a cat", "model": "sd_xl_base_1.0", "original_size": [0, 5]})
    assert r.status_code == 422 and "original_size values must be between 1 and 8192" in r.text


def test_a_refiner_must_be_held_by_a_live_worker_of_the_jobs_model(client: TestClient, redis: Redis) -> None:
    xl = LoadedModel(name="sd_xl_base_1.0", inpainting_unet=False, device="cuda", dtype="float16",
                     default_size=1024, refiner="sd_xl_refiner_1.0")
    start_worker(redis, "gpu-xl", xl)
    start_worker(redis, "gpu-b", SD15)
    listed = {m["name"]: m["refiners"] for m in client.get("/v1/models").json()["models"]}
    assert listed == {"sd_xl_base_1.0": ["sd_xl_refiner_1.0"], "v1-5-pruned-emaonly": []}
    job = {"prompt": "a cat", "width": 64, "height": 64}
    r = client.post("/v1/txt2img", json={**job, "model": "sd_xl_base_1.0",
                                         "refiner": {"model": "sd_xl_refiner_1.0", "switch_at": 0.7}})
    assert r.status_code == 202, r.text
    params = client.get(f"/v1/jobs/{r.json()['id']}").json()["params"]
    assert params["refiner"] == {"model": "sd_xl_refiner_1.0", "switch_at": 0.7}
    r = client.post("/v1/txt2img", json={**job, "model": "v1-5-pruned-emaonly",
                                         "refiner": {"model": "sd_xl_refiner_1.0"}})
    assert r.status_code == 422 and r.json()["error"]["field"] == "refiner.model"
    assert "not held by a live worker of model 'v1-5-pruned-emaonly'; held: none" in r.json()["error"]["message"]
    r = client.post("/v1/txt2img", json={**job, "model": "sd_xl_base_1.0",
                                         "refiner": {"model": "sd_xl_refiner_1.0", "switch_at": 1.5}})
    assert r.status_code == 422 and "switch_at" in r.text


def test_a_submit_reads_the_live_workers_models_once(client: TestClient, redis: Redis, monkeypatch: Any) -> None:
    """The model route, the default size, the LoRA names, the refiner and the tiny VAE are all checked against one
    read of the live workers' models (each read costs a registry lookup per queue and one per worker)."""
    sdxl = LoadedModel(name="sdxl", inpainting_unet=False, device="cuda", dtype="float16", loras=["detail"],
                       tiny_vae=True, refiner="sdxl-refiner", default_size=1024)
    start_worker(redis, "gpu-1", sdxl)
    reads = []
    real = catalog._live_models

    def counted(*args: Any) -> Any:
        reads.append(args)
        return real(*args)

    monkeypatch.setattr(catalog, "_live_models", counted)
    r = client.post("/v1/txt2img", json={"prompt": "a cat", "model": "sdxl", "loras": [{"name": "detail"}],
                                         "refiner": {"model": "sdxl-refiner"}, "vae": "tiny"})
    assert r.status_code == 202, r.text
    assert (r.json()["params"]["width"], r.json()["params"]["height"]) == (1024, 1024)  # the model's own size
    assert len(reads) == 1
    r = client.post("/v1/txt2img", json={"prompt": "a cat", "model": "sdxl", "refiner": {"model": "other"}})
    assert r.status_code == 422 and r.json()["error"]["field"] == "refiner.model"
    assert len(reads) == 2
