"""Two models on one Redis: two `sdqueue worker` processes holding different (tiny, random) checkpoints behind one
`sdqueue api`. Each job runs on a worker of the model it names, a model nobody serves is refused, and jobs of
different models never share a batch."""

from __future__ import annotations

import io
import re
import signal
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

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
    # each worker ran its model's three jobs as one batch, and nothing else
    batches = [int(n) for n in re.findall(r"batch of (\d+) jobs", service.logs())]
    assert sorted(batches) == [3, 3], batches
    for job in done:
        assert f"Model: {job['params']['model']}" in pixels(service, job)[1]
