"""A real worker serves a tiny SD 2.x v-prediction model through the API: as a single file from our writer with
SDQ_PREDICTION_TYPE=v_prediction (the pixels of the model-level pipeline), and as a diffusers folder whose scheduler
config says v_prediction (diffusers' pixels)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from diffusers import StableDiffusionPipeline

from model.pipeline import Pipeline
from model.requests import GenerationRequest
from model.weights import load_components, save_single_file
from tests.e2e.conftest import Service
from tests.e2e.test_service import download
from tests.model.saved_pipeline import pixels
from tests.model.sd2_reference import reference_pipeline, reference_pixels, save_sd2_folder

PARAMS = {"prompt": "a photo of a cat", "negative_prompt": "blurry", "width": 64, "height": 64, "steps": 4,
          "sampler": "euler_a", "guidance_scale": 6.0, "seed": 21, "n": 2}


@pytest.fixture(scope="module")
def v_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_sd2_folder(tmp_path_factory.mktemp("sd2") / "tiny-sd2-v", seed=4)


@pytest.fixture(scope="module")
def v_file(v_folder: Path) -> Path:
    return save_single_file(load_components(v_folder), v_folder.with_name("tiny-sd2-v-file.safetensors"))


def serve(svc: Service, **env: str) -> Service:
    svc.env.update(env)
    svc.start_api()
    svc.start_worker()
    svc.wait_ready()
    return svc


def run_job(svc: Service) -> np.ndarray:
    done = svc.wait_job(svc.submit(**PARAMS)["id"], timeout=120)
    return pixels([download(svc, image["url"]) for image in done["images"]])


@pytest.fixture
def file_service(redis_url: str, tmp_path: Path, v_file: Path) -> Iterator[Service]:
    svc = Service(redis_url, tmp_path, v_file)
    yield svc
    svc.stop()


@pytest.fixture
def folder_service(redis_url: str, tmp_path: Path, v_folder: Path) -> Iterator[Service]:
    svc = Service(redis_url, tmp_path, v_folder)
    yield svc
    svc.stop()


def test_single_file_with_the_prediction_type_set(file_service: Service, v_file: Path) -> None:
    served = run_job(serve(file_service, SDQ_PREDICTION_TYPE="v_prediction"))
    req = GenerationRequest(**PARAMS)  # type: ignore[arg-type]
    direct = Pipeline.load(v_file, device="cpu", dtype="float32", prediction_type="v_prediction")
    # each process times packed and plain kernels per layer kind (model/cpu_choice.py): same maths, other roundings
    assert np.abs(served - pixels(direct.generate([req])[0].images)).max() <= 1  # type: ignore[union-attr]
    as_epsilon = Pipeline.load(v_file, device="cpu", dtype="float32", prediction_type="epsilon")
    assert np.abs(served - pixels(as_epsilon.generate([req])[0].images)).max() > 10  # type: ignore[union-attr]
    assert "prediction type v_prediction" in file_service.logs()


def test_folder_whose_scheduler_says_v_prediction(folder_service: Service, v_folder: Path) -> None:
    served = run_job(serve(folder_service))  # SDQ_PREDICTION_TYPE unset: auto, the folder's config
    reference = reference_pipeline(StableDiffusionPipeline, v_folder, "euler_a")
    assert reference.scheduler.config.prediction_type == "v_prediction"
    theirs = reference_pixels(reference, PARAMS["seed"], 2, prompt=PARAMS["prompt"],  # type: ignore[arg-type]
                              negative_prompt=PARAMS["negative_prompt"], num_inference_steps=PARAMS["steps"],
                              guidance_scale=PARAMS["guidance_scale"], height=64, width=64)
    assert np.abs(served - theirs).max() <= 2
    assert served.std() > 1.0
