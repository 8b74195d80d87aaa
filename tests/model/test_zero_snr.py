"""Zero terminal SNR (a diffusers scheduler config's ``rescale_betas_zero_snr``): the schedule bit for bit
as diffusers', and a tiny SD 2-like v-prediction folder with trailing spacing against diffusers' pipelines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
)

from model.pipeline import Pipeline
from model.requests import GenerationRequest
from model.samplers import make_plan
from model.schedule import NoiseSchedule
from tests.model.saved_pipeline import pixels
from tests.model.sd2_reference import SD2_SCHEDULER, reference_pipeline, reference_pixels, save_sd2_folder
from tests.model.test_pipeline import gradient_image

ZERO_SNR = {**SD2_SCHEDULER, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
W = H = 64


def test_schedule_matches_diffusers_bit_for_bit() -> None:
    schedule = NoiseSchedule.from_diffusers_config(ZERO_SNR)
    assert schedule.zero_terminal_snr
    assert torch.equal(schedule.alphas_cumprod, DDIMScheduler.from_config(ZERO_SNR).alphas_cumprod)
    assert float(schedule.alphas_cumprod[-1]) == 0.0
    assert float(schedule.train_sigmas()[-1]) == float("inf")

    euler = EulerDiscreteScheduler.from_config(ZERO_SNR)
    euler.set_timesteps(6)
    plan = make_plan(schedule, "euler", 6)
    torch.testing.assert_close(plan.sigmas, euler.sigmas.float(), atol=0, rtol=1e-6)
    assert float(plan.sigmas[0]) == pytest.approx(4096.0) and plan.init_noise_sigma == float(euler.init_noise_sigma)

    ddim = DDIMScheduler.from_config(ZERO_SNR)
    ddim.set_timesteps(6)
    plan = make_plan(schedule, "ddim", 6)
    assert plan.timesteps.tolist() == ddim.timesteps.tolist()  # 999 first: pure noise
    assert float(plan.sigmas[0]) == float("inf")


def test_refusals_name_the_setting() -> None:
    schedule = NoiseSchedule.from_diffusers_config(ZERO_SNR)
    with pytest.raises(ValueError, match=r"sampler 'lcm' does not run .*rescale_betas_zero_snr.*ddim"):
        make_plan(schedule, "lcm", 4)
    with pytest.raises(ValueError, match=r"zero terminal SNR .*needs prediction_type v_prediction.*'epsilon'"):
        NoiseSchedule.from_diffusers_config({**ZERO_SNR, "prediction_type": "epsilon"})


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = save_sd2_folder(tmp_path_factory.mktemp("zsnr") / "tiny-sd2-zsnr", seed=5)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}))
    return folder


@pytest.fixture(scope="module")
def pipe(folder: Path) -> Pipeline:
    return Pipeline.load(folder, device="cpu", dtype="float32")


def request(sampler: str, **options: object) -> GenerationRequest:
    defaults: dict[str, object] = dict(prompt="a photo of a cat", negative_prompt="blurry", width=W, height=H,
                                       steps=5, guidance_scale=6.0, sampler=sampler, seed=8, n=1)
    return GenerationRequest(**{**defaults, **options})  # type: ignore[arg-type]


@pytest.mark.parametrize(("sampler", "eta", "karras"),
                         [("ddim", 0.0, False), ("ddim", 0.6, False), ("euler", 0.0, False), ("euler_a", 0.0, False),
                          ("dpmpp_2m", 0.0, False)])
def test_txt2img_matches_diffusers(folder: Path, pipe: Pipeline, sampler: str, eta: float, karras: bool) -> None:
    req = request(sampler, eta=eta, karras=karras)
    ours = pixels(pipe.generate([req])[0].images)  # type: ignore[union-attr]
    reference = reference_pipeline(StableDiffusionPipeline, folder, sampler, karras)
    assert reference.scheduler.config.rescale_betas_zero_snr
    theirs = reference_pixels(reference, req.seed, 1, prompt=req.prompt, negative_prompt=req.negative_prompt,
                              num_inference_steps=req.steps, guidance_scale=req.guidance_scale, eta=eta,
                              height=H, width=W)
    assert np.abs(ours - theirs).max() <= 2
    assert ours.std() > 1.0


def test_img2img_at_full_strength_starts_from_pure_noise(folder: Path, pipe: Pipeline) -> None:
    req = request("ddim", task="img2img", strength=1.0, init_image=gradient_image(2))
    ours = pixels(pipe.generate([req])[0].images)  # type: ignore[union-attr]
    reference = reference_pipeline(StableDiffusionImg2ImgPipeline, folder, "ddim")
    theirs = reference_pixels(reference, req.seed, 1, prompt=req.prompt, negative_prompt=req.negative_prompt,
                              image=req.init_image, strength=1.0, num_inference_steps=req.steps,
                              guidance_scale=req.guidance_scale)
    assert np.abs(ours - theirs).max() <= 2


def test_dpm_solver_reference_is_the_finite_schedule() -> None:
    """DPM++ 2M, like Euler, starts from ᾱ = 2**-24 in diffusers."""
    dpm = DPMSolverMultistepScheduler.from_config(ZERO_SNR)
    assert float(dpm.alphas_cumprod[-1]) == 2.0**-24
