"""img2img / inpaint inputs on the worker side: read from storage into the pipeline request, pasted back after."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline
from PIL import Image, ImageChops

from core.jobs import GenerationParams, JobSpec, Sampler
from core.storage import LocalStorage
from model.requests import GenerationResult
from model.samplers import make_plan
from model.schedule import NoiseSchedule
from tests.images import encode, noise_image, white_box
from tests.model.reference import reference_scheduler
from worker.inputs import paste_back
from worker.runner import to_request


def spec(task: str = "inpaint", steps: int = 10, strength: float | None = 1.0, **fields: Any) -> JobSpec:
    params = GenerationParams(prompt="a cat", width=64, height=64, steps=steps,
                              **{k: fields.pop(k) for k in ("sampler", "eta") if k in fields})
    keys = {} if task == "txt2img" else {"init_image_key": "job/input.png", "mask_key": "job/mask.png"}
    return JobSpec(id="job", task=task, params=params, seed=5, created_at=datetime.now(timezone.utc),  # type: ignore[arg-type]
                   strength=strength, **{**keys, **fields})


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path, "http://api")


def test_to_request_reads_the_stored_image_and_mask(storage: LocalStorage) -> None:
    image, mask = noise_image(64, 64), white_box(64, 64, (8, 8, 24, 24))
    storage.put("job/input.png", encode(image), "image/png")
    storage.put("job/mask.png", encode(mask), "image/png")

    request = to_request(spec(strength=0.6), storage)

    assert (request.task, request.strength, request.seed, request.width) == ("inpaint", 0.6, 5, 64)
    assert request.init_image is not None and request.mask is not None
    assert (request.init_image.mode, request.mask.mode) == ("RGB", "L")
    assert ImageChops.difference(request.init_image, image).getbbox() is None
    assert ImageChops.difference(request.mask, mask).getbbox() is None


def test_txt2img_needs_no_storage() -> None:
    request = to_request(spec("txt2img", strength=None))
    assert request.init_image is None and request.mask is None


def test_missing_inputs_fail_the_job_with_a_reason(storage: LocalStorage) -> None:
    with pytest.raises(ValueError, match=r"input image job/input.png is missing from storage"):
        to_request(spec(), storage)
    with pytest.raises(ValueError, match="its input images need the storage"):
        to_request(spec(), None)


def test_paste_back_keeps_the_original_outside_the_mask_and_blends_its_soft_edge() -> None:
    original, generated = noise_image(64, 64, seed=1), noise_image(64, 64, seed=2)
    mask = white_box(64, 64, (16, 16, 48, 48))
    mask.putpixel((15, 30), 128)  # a blurred edge pixel
    request = to_request(spec("txt2img", strength=None))
    request.init_image, request.mask = original, mask

    [out] = paste_back(spec(mask_overlay=True), request, GenerationResult([generated], [5])).images

    assert ImageChops.difference(out.crop((16, 16, 48, 48)), generated.crop((16, 16, 48, 48))).getbbox() is None
    assert ImageChops.difference(out.crop((0, 0, 64, 16)), original.crop((0, 0, 64, 16))).getbbox() is None
    a, b, o = original.getpixel((15, 30)), generated.getpixel((15, 30)), out.getpixel((15, 30))
    assert isinstance(a, tuple) and isinstance(b, tuple) and isinstance(o, tuple)
    assert all(abs(oc - (ac * 127 + bc * 128) / 255) <= 1 for ac, bc, oc in zip(a, b, o, strict=True))
    unchanged = paste_back(spec(mask_overlay=False), request, GenerationResult([generated], [5])).images[0]
    assert unchanged is generated


@pytest.mark.parametrize("steps", [1, 4, 10, 30])
@pytest.mark.parametrize("strength", [0.0, 0.1, 0.25, 0.5, 0.75, 0.99, 1.0])
def test_a_jobs_batch_key_holds_the_first_step_the_sampler_runs(
    storage: LocalStorage, steps: int, strength: float
) -> None:
    storage.put("job/input.png", encode(Image.new("RGB", (64, 64))), "image/png")
    job = spec("img2img", steps=steps, strength=strength, mask_key=None, sampler=Sampler.ddim)
    request = to_request(job, storage)
    schedule = NoiseSchedule.sd15()
    plan = make_plan(schedule, request.sampler, steps, strength=request.denoising_strength)
    full = make_plan(schedule, request.sampler, steps)
    # diffusers' img2img pipeline is the oracle for how many of the steps run at this strength
    scheduler = reference_scheduler("ddim")
    scheduler.set_timesteps(steps)
    _, runs = StableDiffusionImg2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=scheduler), steps, strength, "cpu")
    first = steps - runs
    assert plan.num_steps == runs
    assert torch.equal(plan.timesteps, full.timesteps[first:])
    assert job.batch_key().endswith(f":from{first}:eta0")


def test_batch_keys_separate_start_steps_and_ddim_etas() -> None:
    assert spec(strength=0.5).batch_key() == spec(strength=0.55).batch_key()  # int(10 * s) == 5 for both
    assert spec(strength=0.5).batch_key() != spec(strength=0.6).batch_key()
    assert spec(task="img2img", mask_key=None).batch_key() != spec().batch_key()
    ddim = [spec(sampler=Sampler.ddim, eta=eta).batch_key() for eta in (0.0, 0.0, 1.0)]
    assert ddim[0] == ddim[1] != ddim[2]
    assert spec("txt2img", strength=None).batch_key() == "txt2img:64x64:euler_a:0:10"


@pytest.mark.parametrize(
    "job",
    [spec("txt2img", strength=None), spec("img2img", strength=0.5, mask_key=None), spec(strength=0.3),
     spec("txt2img", strength=None, sampler=Sampler.ddim, eta=0.5)],
    ids=["txt2img", "img2img", "inpaint", "ddim-eta"],
)
def test_the_pipeline_groups_a_job_by_the_key_the_batcher_used(storage: LocalStorage, job: JobSpec) -> None:
    storage.put("job/input.png", encode(Image.new("RGB", (64, 64))), "image/png")
    storage.put("job/mask.png", encode(Image.new("L", (64, 64))), "image/png")
    assert to_request(job, storage).batch_key() == job.batch_key()
