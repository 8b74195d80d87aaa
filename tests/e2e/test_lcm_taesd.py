"""LCM and the tiny VAE through the API on real processes: a worker with SDQ_TINY_VAE runs both kinds of job, shares a
batch between tiny and full ones, and an API whose workers hold no tiny VAE refuses `vae: tiny` before queueing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.e2e.conftest import Service
from tests.e2e.test_service import download
from tests.model.test_taesd import random_taesd

LCM = {"prompt": "a photo of a cat", "width": 72, "height": 64, "steps": 4, "sampler": "lcm", "guidance_scale": 1.0,
       "seed": 21}


@pytest.fixture
def taesd_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "taesd"
    random_taesd(seed=2).save_pretrained(folder)
    return folder


def test_lcm_and_tiny_vae_jobs_succeed(service: Service, taesd_folder: Path) -> None:
    service.env["SDQ_TINY_VAE"] = str(taesd_folder)
    service.start_api()
    service.start_worker()
    service.wait_ready()
    models = service.http.get("/v1/models").json()["models"]
    assert [m["tiny_vae"] for m in models] == [True]

    full = service.submit(**LCM)
    tiny = service.submit(**LCM, vae="tiny", n=2)
    done = {job["id"]: service.wait_job(job["id"], timeout=120) for job in (full, tiny)}
    images = {job_id: [download(service, i["url"]) for i in job["images"]] for job_id, job in done.items()}
    assert [i.size for i in images[full["id"]]] == [(72, 64)]
    assert [i.size for i in images[tiny["id"]]] == [(72, 64), (72, 64)]
    assert [(i["width"], i["height"]) for i in done[tiny["id"]]["images"]] == [(72, 64), (72, 64)]
    # image 0 of both jobs has seed 21: the same latents, decoded by different VAEs
    full_px = np.asarray(images[full["id"]][0], dtype=np.int16)
    tiny_px = np.asarray(images[tiny["id"]][0], dtype=np.int16)
    assert np.abs(full_px - tiny_px).max() > 10
    assert tiny_px.std() > 1.0


def test_tiny_vae_without_a_worker_holding_one_is_refused(service: Service) -> None:
    service.start_api()
    r = service.http.post("/v1/txt2img", json={**LCM, "vae": "tiny"})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["field"] == "vae" and "SDQ_TINY_VAE" in error["message"]
    assert service.http.post("/v1/txt2img", json={**LCM, "steps": 51}).status_code == 422  # LCM's 50-step schedule
