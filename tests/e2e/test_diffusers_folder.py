"""A real worker process serves a folder written by diffusers' ``StableDiffusionPipeline.save_pretrained`` (a
tokenizer.json without vocab.json / merges.txt) through the API, and draws diffusers' pixels from it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from model.requests import GenerationRequest
from tests.e2e.conftest import Service
from tests.e2e.test_service import download
from tests.model.saved_pipeline import LONG_PROMPT, diffusers_pixels, pixels, save_tiny_pipeline

PARAMS = {"prompt": LONG_PROMPT, "negative_prompt": "ugly, blurry", "width": 64, "height": 64, "steps": 4,
          "sampler": "euler", "guidance_scale": 5.0}


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("saved") / "tiny-sd")


@pytest.fixture
def folder_service(redis_url: str, tmp_path: Path, saved_folder: Path) -> Iterator[Service]:
    """API and workers with SDQ_CHECKPOINT set to the saved diffusers folder."""
    svc = Service(redis_url, tmp_path, saved_folder)
    yield svc
    svc.stop()


def test_worker_serves_a_saved_diffusers_folder(folder_service: Service, saved_folder: Path) -> None:
    assert not (saved_folder / "tokenizer" / "vocab.json").exists()
    folder_service.start_api()
    folder_service.start_worker()
    folder_service.wait_ready()

    job = folder_service.submit(**PARAMS, seed=30, n=2)
    done = folder_service.wait_job(job["id"], timeout=120)

    images = [download(folder_service, image["url"]) for image in done["images"]]
    req = GenerationRequest(**PARAMS, seed=30, n=2)  # type: ignore[arg-type]
    assert np.abs(pixels(images) - diffusers_pixels(saved_folder, req)).max() <= 2
    models = folder_service.http.get("/v1/models").json()["models"]
    assert [m["name"] for m in models] == ["tiny-sd"]
