"""Two models on one Redis: two `sdqueue worker` processes holding different (tiny, random) checkpoints behind one
`sdqueue api`. Each job runs on a worker of the model it names, a model nobody serves is refused, and jobs of
different models never share a batch."""

from __future__ import annotations

import io
import json
import signal
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from redis import Redis

from core.queues import Keys
from tests.e2e.conftest import Service

JOB = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 3, "sampler": "euler", "seed": 7}


def pixels(service: Service, job: dict[str, Any]) -> tuple[np.ndarray, str]:
    r = service.http.get(job["images"][0]["url"])
    assert r.status_code == 200
    image = Image.open(io.BytesIO(r.content))
    return np.asarray(image.convert("RGB"), dtype=np.int16), image.info["parameters"]


def start_fleet(service: Service, tmp_path: Path) -> dict[str, Any]:
    from model import weights

    workers = {}
    for name, seed in (("ink", 1), ("neon", 2)):
        checkpoint = tmp_path / f"{name}.safetensors"
        weights.save_random_checkpoint(checkpoint, *weights.tiny_configs(), seed=seed)
        service.env["SDQ_CHECKPOINT"] = str(checkpoint)
        workers[name] = service.start_worker()
    service.start_api()
    service.wait_for(lambda: len(service.http.get("/v1/models").json()["models"]) == 2, 120, "both models announced")
    return workers


def test_each_job_runs_on_its_model_and_an_absent_model_is_refused(service: Service, tmp_path: Path) -> None:
    start_fleet(service, tmp_path)
    models = service.http.get("/v1/models").json()["models"]
    assert [m["name"] for m in models] == ["ink", "neon"] and all(len(m["workers"]) == 1 for m in models)

    done = {name: service.wait_job(service.submit(**JOB, model=name)["id"]) for name in ("ink", "neon")}
    (ink, ink_text), (neon, neon_text) = pixels(service, done["ink"]), pixels(service, done["neon"])
    assert done["ink"]["params"]["model"] == "ink" and "Model: ink" in ink_text
    assert done["neon"]["params"]["model"] == "neon" and "Model: neon" in neon_text
    holder = {m["name"]: m["workers"][0]["name"] for m in models}
    assert done["ink"]["worker"] == holder["ink"] and done["neon"]["worker"] == holder["neon"]
    assert np.abs(ink - neon).max() > 10  # two different networks drew them

    r = service.http.post("/v1/txt2img", json={**JOB, "model": "absent"})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["field"] == "model" and "'absent' is not served" in error["message"]
    assert "ink, neon" in error["message"]
    # two models and no SDQ_DEFAULT_MODEL: a job that names none is refused, naming both
    r = service.http.post("/v1/txt2img", json=JOB)
    assert r.status_code == 422 and "model is required" in r.json()["error"]["message"], r.text


def test_jobs_of_two_models_never_share_a_batch(service: Service, tmp_path: Path) -> None:
    workers = start_fleet(service, tmp_path)
    for proc in workers.values():
        proc.send_signal(signal.SIGSTOP)  # every job waits, so each worker finds all of its model's jobs at once
    try:
        ids = [service.submit(**{**JOB, "seed": i}, model=("ink", "neon")[i % 2])["id"] for i in range(6)]
    finally:
        for proc in workers.values():
            proc.send_signal(signal.SIGCONT)
    done = [service.wait_job(job_id) for job_id in ids]
    assert [job["params"]["model"] for job in done] == ["ink", "neon"] * 3
    # batch membership from the records: the jobs of one batch share their worker and the start time of the batch,
    # and their `running` events the batch's image count
    holder = {m["name"]: m["workers"][0]["name"] for m in service.http.get("/v1/models").json()["models"]}
    redis = Redis.from_url(service.env["SDQ_REDIS_URL"])
    batches: dict[tuple[str, str], list[str]] = {}
    for job in done:
        model = job["params"]["model"]
        assert job["worker"] == holder[model], job
        running = [e["data"] for e in events(redis, job["id"]) if e["event"] == "running"]
        assert running == [{"started_at": running[0]["started_at"], "batch_images": 3}], running
        batches.setdefault((job["worker"], job["started_at"]), []).append(model)
        assert f"Model: {model}" in pixels(service, job)[1]
    # each worker ran its model's three jobs as one batch, and nothing else
    assert sorted(batches.values()) == [["ink"] * 3, ["neon"] * 3], batches


def events(redis: Redis, job_id: str) -> list[dict[str, Any]]:
    """The job's events as its event log stream holds them."""
    return [json.loads(fields[b"message"]) for _, fields in redis.xrange(Keys().event_log(job_id))]


def test_a_model_whose_workers_left_takes_jobs_until_one_is_back(service: Service, tmp_path: Path) -> None:
    workers = start_fleet(service, tmp_path)  # SDQ_CHECKPOINT now holds neon's checkpoint
    gone = {m["name"]: m["workers"][0]["name"] for m in service.http.get("/v1/models").json()["models"]}["neon"]
    workers["neon"].send_signal(signal.SIGTERM)  # a rollout, or an autoscaler taking neon's workers to zero
    assert workers["neon"].wait(30) == 0
    service.procs = [(name, proc) for name, proc in service.procs if proc is not workers["neon"]]  # exited, as asked
    service.wait_for(lambda: [m["name"] for m in service.http.get("/v1/models").json()["models"]] == ["ink"], 30,
                     "neon's worker to leave /v1/models")

    queued = service.submit(**JOB, model="neon")  # seen lately (SDQ_MODEL_SEEN_TTL_S): it waits for a worker
    assert queued["status"] == "queued" and queued["params"]["model"] == "neon"
    assert service.http.get("/readyz").json()["models"]["neon"] == {"workers": 0, "queued": 1}
    assert service.http.post("/v1/txt2img", json={**JOB, "model": "never-served"}).status_code == 422

    service.start_worker()  # neon is back
    done = service.wait_job(queued["id"], timeout=120)
    back = {m["name"]: m["workers"][0]["name"] for m in service.http.get("/v1/models").json()["models"]}["neon"]
    assert done["worker"] == back != gone and "Model: neon" in pixels(service, done)[1]
