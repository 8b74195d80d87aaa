"""A real worker serves a tiny SDXL diffusers folder through the API: the job's pixels are diffusers'
StableDiffusionXLPipeline's for the same size conditioning, /v1/models says the model's native size, and a txt2img
job that gives no size gets it. With SDQ_REFINER_CHECKPOINT the worker finishes jobs that ask for the refiner as
diffusers' base + refiner ensemble does, and a refiner it does not hold is refused."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

from tests.e2e.conftest import Service
from tests.e2e.test_service import download
from tests.model.saved_pipeline import pixels
from tests.model.sd2_reference import reference_pixels
from tests.model.sdxl_reference import reference, save_refiner_folder, save_sdxl_folder

PARAMS = {"prompt": "a photo of a cat", "negative_prompt": "blurry", "width": 64, "height": 64, "steps": 4,
          "sampler": "dpmpp_2m", "guidance_scale": 5.0, "seed": 33, "n": 2, "original_size": [1536, 1024],
          "crops_coords_top_left": [8, 0]}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_sdxl_folder(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl", seed=6)


@pytest.fixture
def service(redis_url: str, tmp_path: Path, folder: Path) -> Iterator[Service]:
    svc = Service(redis_url, tmp_path, folder)
    svc.start_api()
    svc.start_worker()
    svc.wait_ready()
    yield svc
    svc.stop()


def test_an_sdxl_job_gives_diffusers_pixels_and_a_sizeless_job_the_native_size(service: Service,
                                                                               folder: Path) -> None:
    done = service.wait_job(service.submit(**PARAMS)["id"], timeout=180)
    assert done["status"] == "succeeded", done
    served = pixels([download(service, image["url"]) for image in done["images"]])
    theirs = reference_pixels(reference(StableDiffusionXLPipeline, folder, "dpmpp_2m"), 33, 2,
                              prompt=PARAMS["prompt"], negative_prompt=PARAMS["negative_prompt"],
                              num_inference_steps=4, guidance_scale=5.0, height=64, width=64,
                              original_size=(1536, 1024), crops_coords_top_left=(8, 0))
    assert np.abs(served - theirs).max() <= 2 and served.std() > 1.0

    models = service.http.get("/v1/models").json()["models"]
    assert [(m["name"], m["default_size"]) for m in models] == [("tiny-sdxl", 1024)]
    sizeless = service.submit(prompt="a lighthouse", steps=1, sampler="euler")
    job = service.job(sizeless["id"])
    assert (job["params"]["width"], job["params"]["height"]) == (1024, 1024)
    assert service.http.post(f"/v1/jobs/{sizeless['id']}/cancel").status_code in (200, 202)


@pytest.fixture
def refined_service(redis_url: str, tmp_path: Path, folder: Path) -> Iterator[Service]:
    refiner = save_refiner_folder(tmp_path / "tiny-refiner", folder, seed=2)
    svc = Service(redis_url, tmp_path, folder)
    svc.env["SDQ_REFINER_CHECKPOINT"] = str(refiner)
    svc.start_api()
    svc.start_worker()
    svc.wait_ready()
    yield svc
    svc.stop()


def test_a_job_with_the_refiner_is_finished_by_it(refined_service: Service, folder: Path, tmp_path: Path) -> None:
    svc = refined_service
    assert [m["refiners"] for m in svc.http.get("/v1/models").json()["models"]] == [["tiny-refiner"]]
    params = {**PARAMS, "sampler": "euler_a", "steps": 6, "refiner": {"model": "tiny-refiner", "switch_at": 0.5}}
    del params["original_size"], params["crops_coords_top_left"]
    done = svc.wait_job(svc.submit(**params)["id"], timeout=180)
    served = pixels([download(svc, image["url"]) for image in done["images"]])

    base = reference(StableDiffusionXLPipeline, folder, "euler_a")
    refiner = reference(StableDiffusionXLImg2ImgPipeline, tmp_path / "tiny-refiner", "euler_a")
    generators = [torch.Generator("cpu").manual_seed(33 + i) for i in range(2)]
    common = dict(prompt=PARAMS["prompt"], negative_prompt=PARAMS["negative_prompt"], num_inference_steps=6,
                  guidance_scale=5.0, num_images_per_prompt=2, generator=generators)
    latents = base(**common, height=64, width=64, denoising_end=0.5, output_type="latent").images
    theirs = refiner(**common, image=latents, denoising_start=0.5, output_type="np").images
    assert np.abs(served - np.round(theirs * 255).astype(np.int16)).max() <= 2

    r = svc.http.post("/v1/txt2img", json={**params, "refiner": {"model": "another-refiner"}})
    assert r.status_code == 422 and r.json()["error"]["field"] == "refiner.model"
