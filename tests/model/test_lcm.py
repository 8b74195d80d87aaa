"""LCM against diffusers' LCMScheduler: its timesteps, the loop on a toy ε-model with per-sample generators, and the
whole pipeline on the tiny random model (txt2img, img2img, guidance on and off)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    LCMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    TCDScheduler,
)
from PIL import Image

from core import rules
from model.lcm import lcm_timesteps
from model.pipeline import Pipeline
from model.requests import GenerationRequest
from model.samplers import initial_latents, make_plan, sample
from model.schedule import NoiseSchedule
from tests.model.reference import SD15_SCHEDULER, Reference, build_reference
from tests.model.test_pipeline import gradient_image
from tests.model.test_samplers import RowNoise, clean_latents, toy_eps

SEEDS = [5, 6]
W, H = 64, 64


def lcm_scheduler() -> LCMScheduler:
    # what LCM-LoRA users run: LCMScheduler.from_config(the SD 1.5 pipeline's scheduler config)
    return LCMScheduler.from_config({**SD15_SCHEDULER, "original_inference_steps": 50})


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 50])
def test_timesteps_match_diffusers(steps: int) -> None:
    scheduler = lcm_scheduler()
    scheduler.set_timesteps(steps)
    assert lcm_timesteps(steps, 1000).tolist() == scheduler.timesteps.tolist()
    plan = make_plan(NoiseSchedule.sd15(), "lcm", steps)
    assert plan.timesteps.tolist() == scheduler.timesteps.tolist()
    assert float(plan.sigmas[-1]) == 0.0  # the last step lands on the consistency estimate


def test_four_steps_are_the_published_schedule() -> None:
    assert lcm_timesteps(4, 1000).tolist() == [999, 759, 499, 259]


def run_diffusers(steps: int, strength: float) -> torch.Tensor:
    """The loop of diffusers' SD txt2img / img2img pipelines with LCMScheduler, on the toy model."""
    scheduler = lcm_scheduler()
    scheduler.set_timesteps(steps)
    noise_fn = RowNoise(SEEDS)
    clean = clean_latents(len(SEEDS))
    noise = noise_fn(clean)
    timesteps = scheduler.timesteps
    if strength < 1:
        t_start = rules.start_step(steps, strength)
        timesteps = timesteps[t_start:]
        scheduler.set_begin_index(t_start)
        x = scheduler.add_noise(clean, noise, timesteps[:1].repeat(len(SEEDS)))
    else:
        x = noise * scheduler.init_noise_sigma
    for t in timesteps:
        eps = toy_eps(scheduler.scale_model_input(x, t), t.to(torch.float32).expand(len(SEEDS)))
        x = scheduler.step(eps, t, x, generator=noise_fn.generators).prev_sample
    return x


def run_ours(steps: int, strength: float) -> torch.Tensor:
    plan = make_plan(NoiseSchedule.sd15(), "lcm", steps, strength=strength)
    noise_fn = RowNoise(SEEDS)
    clean = clean_latents(len(SEEDS))
    x = initial_latents(plan, noise_fn(clean), clean if strength < 1 else None)
    return sample(plan, toy_eps, x, noise=noise_fn)


# (steps, strength): one step is the bare consistency function; img2img keeps the last int(steps·strength) steps
@pytest.mark.parametrize(("steps", "strength"), [(1, 1.0), (4, 1.0), (6, 1.0), (4, 0.5), (6, 0.7)])
def test_loop_matches_diffusers(steps: int, strength: float) -> None:
    ours, theirs = run_ours(steps, strength), run_diffusers(steps, strength)
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert ours.abs().max().item() < 10 and ours.std().item() > 0.1  # a real result, not zeros


def test_steps_noise_each_row_from_its_own_generator() -> None:
    """Changing one row's seed changes that row only (the injected noise is per image)."""
    plan = make_plan(NoiseSchedule.sd15(), "lcm", 4)
    start = RowNoise([1])(clean_latents(1))
    both = sample(plan, toy_eps, torch.cat([start, start]), noise=RowNoise([1, 2]))
    alone = sample(plan, toy_eps, start, noise=RowNoise([1]))
    assert torch.equal(both[0], alone[0])
    assert (both[1] - both[0]).abs().max().item() > 1e-3


@pytest.mark.parametrize("steps", [51, 150])
def test_more_steps_than_the_distillation_schedule_are_refused(steps: int) -> None:
    with pytest.raises(ValueError, match=f"at most 50 with sampler lcm, got {steps}"):
        make_plan(NoiseSchedule.sd15(), "lcm", steps)
    with pytest.raises(ValueError, match="at most 50"):
        rules.check_steps("lcm", steps)


def test_lcm_takes_neither_karras_nor_eta() -> None:
    with pytest.raises(ValueError, match="karras"):
        rules.check_sampler_options("lcm", karras=True, eta=0.0)
    with pytest.raises(ValueError, match="eta"):
        rules.check_sampler_options("lcm", karras=False, eta=0.3)
    assert rules.SAMPLERS[rules.Sampler.lcm].a1111_name == "LCM"


# the whole pipeline -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ref(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    # an LCM-distilled checkpoint is an SD 1.x UNet with other weights: random weights stand for it
    return build_reference(Path(tmp_path_factory.mktemp("lcm")), in_channels=4, seed=3)


@pytest.fixture(scope="module")
def pipe(ref: Reference) -> Pipeline:
    return Pipeline.load(ref.folder, device="cpu", dtype="float32")


def pixels(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(i, dtype=np.int16) for i in images])


def diffusers_images(cls: type, ref: Reference, req: GenerationRequest, **extra: object) -> np.ndarray:
    pipe = cls(vae=ref.vae, text_encoder=ref.text_encoder, tokenizer=ref.tokenizer, unet=ref.unet,
               scheduler=lcm_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator("cpu").manual_seed(req.seed + i) for i in range(req.n)]
    out = pipe(req.prompt, negative_prompt=req.negative_prompt, num_inference_steps=req.steps,
               guidance_scale=req.guidance_scale, num_images_per_prompt=req.n, generator=gens, output_type="np",
               **extra)
    return np.round(out.images * 255).astype(np.int16)


@pytest.mark.parametrize("guidance", [1.0, 2.0], ids=["one-pass", "cfg"])
def test_txt2img_matches_diffusers(ref: Reference, pipe: Pipeline, guidance: float) -> None:
    req = GenerationRequest(prompt="a photo of a cat", negative_prompt="blurry", width=W, height=H, steps=4,
                            guidance_scale=guidance, sampler="lcm", seed=42, n=2)
    ours = pixels(pipe.generate([req])[0].images)  # type: ignore[union-attr]
    theirs = diffusers_images(StableDiffusionPipeline, ref, req, height=H, width=W)
    assert np.abs(ours - theirs).max() <= 2
    assert ours.std() > 1.0


def test_img2img_matches_diffusers(ref: Reference, pipe: Pipeline) -> None:
    init = gradient_image()
    req = GenerationRequest(prompt="a painting", task="img2img", width=W, height=H, steps=4, guidance_scale=1.0,
                            sampler="lcm", strength=0.5, seed=9, n=2, init_image=init)
    ours = pixels(pipe.generate([req])[0].images)  # type: ignore[union-attr]
    theirs = diffusers_images(StableDiffusionImg2ImgPipeline, ref, req, image=init, strength=0.5)
    assert np.abs(ours - theirs).max() <= 2
    assert ours.std() > 1.0


def test_one_image_is_the_same_alone_and_in_a_batch(pipe: Pipeline) -> None:
    common = dict(width=W, height=H, steps=4, sampler="lcm", guidance_scale=1.0)
    a = GenerationRequest(prompt="a cat", seed=1, n=1, **common)  # type: ignore[arg-type]
    b = GenerationRequest(prompt="a dog", seed=7, n=2, **common)  # type: ignore[arg-type]
    alone = pixels(pipe.generate([a])[0].images)  # type: ignore[union-attr]
    together = pipe.generate([b, a])
    assert np.abs(pixels(together[1].images) - alone).max() <= 1  # type: ignore[union-attr]



# TCD: the LCM schedule, γ (eta) picks the intermediate step -------------------------------------------------------
def run_tcd_diffusers(steps: int, strength: float, gamma: float) -> torch.Tensor:
    scheduler = TCDScheduler.from_config({**SD15_SCHEDULER, "original_inference_steps": 50})
    scheduler.set_timesteps(steps)
    noise_fn = RowNoise(SEEDS)
    clean = clean_latents(len(SEEDS))
    noise = noise_fn(clean)
    timesteps = scheduler.timesteps
    if strength < 1:
        t_start = rules.start_step(steps, strength)
        timesteps = timesteps[t_start:]
        scheduler.set_begin_index(t_start)
        x = scheduler.add_noise(clean, noise, timesteps[:1].repeat(len(SEEDS)))
    else:
        x = noise * scheduler.init_noise_sigma
    for t in timesteps:
        eps = toy_eps(scheduler.scale_model_input(x, t), t.to(torch.float32).expand(len(SEEDS)))
        x = scheduler.step(eps, t, x, eta=gamma, generator=noise_fn.generators).prev_sample
    return x


@pytest.mark.parametrize(("steps", "strength", "gamma"),
                         [(1, 1.0, 0.3), (4, 1.0, 0.3), (6, 1.0, 0.0), (4, 1.0, 1.0), (6, 0.7, 0.3)])
def test_tcd_loop_matches_diffusers(steps: int, strength: float, gamma: float) -> None:
    plan = make_plan(NoiseSchedule.sd15(), "tcd", steps, strength=strength)
    noise_fn = RowNoise(SEEDS)
    clean = clean_latents(len(SEEDS))
    x = initial_latents(plan, noise_fn(clean), clean if strength < 1 else None)
    ours = sample(plan, toy_eps, x, noise=noise_fn, eta=gamma)
    theirs = run_tcd_diffusers(steps, strength, gamma)
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert ours.abs().max().item() < 10 and ours.std().item() > 0.1


def test_tcd_gamma_is_part_of_the_batch_key() -> None:
    a = GenerationRequest(prompt="a", sampler="tcd", steps=4, eta=0.3)
    b = GenerationRequest(prompt="a", sampler="tcd", steps=4, eta=0.5)
    assert a.batch_key() != b.batch_key()
    assert a.batch_key() == GenerationRequest(prompt="b", sampler="tcd", steps=4, eta=0.3, seed=9).batch_key()


def test_tcd_txt2img_matches_diffusers(ref: Reference, pipe: Pipeline) -> None:
    req = GenerationRequest(prompt="a photo of a cat", width=W, height=H, steps=4, guidance_scale=1.0,
                            sampler="tcd", eta=0.3, seed=4, n=2)
    ours = pixels(pipe.generate([req])[0].images)  # type: ignore[union-attr]
    sd = StableDiffusionPipeline(vae=ref.vae, text_encoder=ref.text_encoder, tokenizer=ref.tokenizer, unet=ref.unet,
                                 scheduler=TCDScheduler.from_config({**SD15_SCHEDULER, "original_inference_steps": 50}),
                                 safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    out = sd(req.prompt, num_inference_steps=4, guidance_scale=1.0, num_images_per_prompt=2, eta=0.3, height=H,
             width=W, generator=[torch.Generator("cpu").manual_seed(4 + i) for i in range(2)], output_type="np")
    assert np.abs(ours - np.round(out.images * 255).astype(np.int16)).max() <= 2
    assert ours.std() > 1.0

