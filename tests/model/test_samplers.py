"""Samplers against diffusers' schedulers driving the same toy ε-model with the same per-sample generators."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)

from core.rules import SAMPLER_NAMES
from model.samplers import (
    SamplingPlan,
    StepCallback,
    StepControl,
    initial_latents,
    make_plan,
    sample,
)
from model.schedule import NoiseSchedule

# What SD 1.5's scheduler/scheduler_config.json amounts to once loaded (PNDMScheduler defaults filled in).
SD15_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "set_alpha_to_one": False,
    "clip_sample": False,
    "prediction_type": "epsilon",
}
DIFFUSERS_CLASSES: dict[str, Any] = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
}
SHAPE = (1, 4, 8, 8)  # one row; batches are built by stacking rows with their own seeds
SEEDS = [11, 12]

# (sampler, karras, eta)
CASES = [
    ("ddim", False, 0.0),
    ("ddim", False, 0.5),
    ("euler", False, 0.0),
    ("euler", True, 0.0),
    ("euler_a", False, 0.0),
    ("euler_a", True, 0.0),
    ("dpmpp_2m", False, 0.0),
    ("dpmpp_2m", True, 0.0),
]


def toy_eps(model_input: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth per-row stand-in for the UNet: the exact ε of unit Gaussian data plus a t-dependent wiggle."""
    tt = t.view(-1, 1, 1, 1)
    return (tt / 1000).clamp(min=1e-3).sqrt() * model_input + 0.1 * torch.sin(
        3 * model_input.roll(1, dims=1) + tt / 100
    )


class RowNoise:
    """NoiseFn with one CPU generator per sample, following the rows that stay in the batch."""

    def __init__(self, seeds: list[int]) -> None:
        self.generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        rows = [torch.randn((1, *like.shape[1:]), generator=g, dtype=torch.float32) for g in self.generators]
        return torch.cat(rows).to(like.device)

    def keep(self, rows: torch.Tensor) -> None:
        self.generators = [self.generators[int(i)] for i in rows]


def clean_latents(batch: int) -> torch.Tensor:
    return torch.randn((batch, *SHAPE[1:]), generator=torch.Generator().manual_seed(99))


def diffusers_scheduler(sampler: str, steps: int, karras: bool) -> Any:
    config = dict(SD15_CONFIG)
    if karras and sampler != "euler_a":
        config["use_karras_sigmas"] = True
    scheduler = DIFFUSERS_CLASSES[sampler].from_config(config)
    scheduler.set_timesteps(steps)
    if karras and sampler == "euler_a":
        # diffusers' Euler a has no Karras option; ours uses Euler's Karras schedule, so give it that one.
        euler = diffusers_scheduler("euler", steps, karras=True)
        scheduler.sigmas, scheduler.timesteps = euler.sigmas.clone(), euler.timesteps.clone()
    return scheduler


def run_diffusers(sampler: str, steps: int, karras: bool, strength: float, eta: float) -> torch.Tensor:
    """The loop of diffusers' SD txt2img (strength 1) / img2img pipelines, with the toy model."""
    scheduler = diffusers_scheduler(sampler, steps, karras)
    batch = len(SEEDS)
    noise_fn = RowNoise(SEEDS)
    noise = noise_fn(clean_latents(batch))
    timesteps = scheduler.timesteps
    if strength < 1:
        t_start = max(steps - min(int(steps * strength), steps), 0)
        timesteps = timesteps[t_start:]
        if hasattr(scheduler, "set_begin_index"):  # as the pipeline does; DDIM indexes by timestep value
            scheduler.set_begin_index(t_start)
        x = scheduler.add_noise(clean_latents(batch), noise, timesteps[:1].repeat(batch))
    else:
        x = noise * scheduler.init_noise_sigma
    extra = {"eta": eta} if sampler == "ddim" else {}
    for t in timesteps:
        eps = toy_eps(scheduler.scale_model_input(x, t), t.to(torch.float32).expand(batch))
        x = scheduler.step(eps, t, x, generator=noise_fn.generators, **extra).prev_sample
    return x


def run_ours(
    sampler: str,
    steps: int,
    karras: bool,
    strength: float,
    eta: float,
    seeds: list[int] = SEEDS,
    clean: torch.Tensor | None = None,
    make_callback: Callable[[RowNoise], StepCallback] | None = None,
) -> torch.Tensor:
    plan = make_plan(NoiseSchedule.sd15(), sampler, steps, karras=karras, strength=strength)
    noise_fn = RowNoise(seeds)
    clean = clean_latents(len(seeds)) if clean is None else clean
    x = initial_latents(plan, noise_fn(clean), clean if strength < 1 else None)
    callback = make_callback(noise_fn) if make_callback else None
    return sample(plan, toy_eps, x, noise=noise_fn, eta=eta, callback=callback)


@pytest.mark.parametrize("strength", [1.0, 0.6], ids=["txt2img", "img2img"])
@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize(("sampler", "karras", "eta"), CASES, ids=[f"{s}-karras{k}-eta{e}" for s, k, e in CASES])
def test_sampler_matches_diffusers(sampler: str, karras: bool, eta: float, steps: int, strength: float) -> None:
    ours = run_ours(sampler, steps, karras, strength, eta)
    reference = run_diffusers(sampler, steps, karras, strength, eta)
    assert ours.dtype == torch.float32
    assert (ours - reference).abs().max().item() <= 1e-4
    assert ours.abs().max().item() < 10  # the toy model denoises to a sane range: the comparison is not vacuous


@pytest.mark.parametrize(("sampler", "karras"), [(s, k) for s, k, _ in CASES if _ == 0.0])
def test_add_noise_matches_diffusers(sampler: str, karras: bool) -> None:
    steps, batch = 10, len(SEEDS)
    plan = make_plan(NoiseSchedule.sd15(), sampler, steps, karras=karras)
    clean, noise = clean_latents(batch), RowNoise(SEEDS)(clean_latents(batch))
    for step in (0, 3, 9):
        scheduler = diffusers_scheduler(sampler, steps, karras)
        expected = scheduler.add_noise(clean, noise, scheduler.timesteps[step : step + 1].repeat(batch))
        torch.testing.assert_close(plan.add_noise(clean, noise, step), expected, atol=1e-5, rtol=1e-5)
    # After the last step latents are clean; diffusers' inpainting blends the plain image latents there.
    assert torch.equal(plan.add_noise(clean, noise, steps), clean)
    # An img2img plan is the tail of the full one.
    tail = make_plan(NoiseSchedule.sd15(), sampler, steps, karras=karras, strength=0.6)
    for step in range(tail.num_steps + 1):
        assert torch.equal(tail.add_noise(clean, noise, step), plan.add_noise(clean, noise, 4 + step))


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_dropped_sample_leaves_the_others_as_if_run_alone(sampler: str) -> None:
    seeds, clean = [21, 22, 23], torch.randn((3, *SHAPE[1:]), generator=torch.Generator().manual_seed(5))
    eta = 0.5 if sampler == "ddim" else 0.0  # exercise the per-sample noise of every stochastic sampler
    calls: list[int] = []

    def drop_second_at_step_2(noise_fn: RowNoise) -> StepCallback:
        def callback(i: int, x: torch.Tensor) -> StepControl | None:
            calls.append(x.shape[0])
            if i != 2:
                return None
            keep = torch.tensor([0, 2])
            noise_fn.keep(keep)
            return StepControl(keep=keep)

        return callback

    batch = run_ours(sampler, 8, False, 0.6, eta, seeds=seeds, clean=clean, make_callback=drop_second_at_step_2)
    assert batch.shape[0] == 2
    assert calls == [3, 3, 3, 2]  # 8 steps at strength 0.6 run 4
    for row, b in ((0, 0), (2, 1)):
        alone = run_ours(sampler, 8, False, 0.6, eta, seeds=[seeds[row]], clean=clean[row : row + 1])
        torch.testing.assert_close(batch[b : b + 1], alone, atol=1e-6, rtol=0)


def test_callback_latents_replace_the_batch() -> None:
    plan = make_plan(NoiseSchedule.sd15(), "dpmpp_2m", 4)
    x = initial_latents(plan, torch.ones((2, *SHAPE[1:])))
    replacement = torch.zeros((1, *SHAPE[1:]))

    def callback(i: int, latents: torch.Tensor) -> StepControl | None:
        return StepControl(keep=torch.tensor([1]), latents=replacement) if i == plan.num_steps - 1 else None

    out = sample(plan, toy_eps, x, noise=RowNoise([1, 2]), callback=callback)
    assert torch.equal(out, replacement)

    def wrong_shape(i: int, latents: torch.Tensor) -> StepControl:
        return StepControl(latents=torch.zeros((3, *SHAPE[1:])))

    with pytest.raises(ValueError, match=r"callback latents must have shape \[2, 4, 8, 8\], got \[3, 4, 8, 8\]"):
        sample(plan, toy_eps, x, noise=RowNoise([1, 2]), callback=wrong_shape)


def test_cancelling_every_sample_stops_the_loop() -> None:
    plan = make_plan(NoiseSchedule.sd15(), "euler", 6)
    calls: list[int] = []

    def cancel_all(i: int, latents: torch.Tensor) -> StepControl:
        calls.append(i)
        return StepControl(keep=torch.tensor([], dtype=torch.long))

    out = sample(plan, toy_eps, torch.randn((2, *SHAPE[1:])), noise=RowNoise([1, 2]), callback=cancel_all)
    assert out.shape == (0, *SHAPE[1:]) and calls == [0]


def test_strength_zero_runs_no_step_and_returns_the_init_latents() -> None:
    # diffusers' img2img gets an empty timestep list here and fails in scheduler.add_noise (size mismatch);
    # we return the init latents untouched instead.
    plan = make_plan(NoiseSchedule.sd15(), "euler_a", 20, strength=0.0)
    init = clean_latents(2)
    assert plan.num_steps == 0
    x = initial_latents(plan, torch.randn_like(init), init)
    assert torch.equal(x, init)
    assert torch.equal(sample(plan, toy_eps, x, noise=RowNoise([1, 2])), init)


def test_model_runs_in_float32_whatever_it_returns() -> None:
    plan = make_plan(NoiseSchedule.sd15(), "euler", 5)
    seen: list[torch.dtype] = []

    def half_model(model_input: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(model_input.dtype)
        assert t.dtype == torch.float32 and t.shape == (2,)
        return toy_eps(model_input, t).to(torch.bfloat16)

    out = sample(plan, half_model, initial_latents(plan, clean_latents(2)), noise=RowNoise([1, 2]))
    assert out.dtype == torch.float32 and set(seen) == {torch.float32}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sampler": "plms"}, r"unknown sampler 'plms'; valid samplers: ddim, euler, euler_a, dpmpp_2m"),
        ({"steps": 0}, r"steps must be in \[1, 1000\], got 0"),
        ({"steps": 1001}, r"steps must be in \[1, 1000\], got 1001"),
        ({"strength": 1.5}, r"strength must be in \[0, 1\], got 1.5"),
        ({"strength": -0.1}, r"strength must be in \[0, 1\], got -0.1"),
        ({"sampler": "ddim", "karras": True}, r"karras sigmas apply to euler, euler_a, dpmpp_2m, not ddim"),
        ({"sampler": "dpmpp_2m", "steps": 1000}, r"1000 steps repeat noise levels with sampler 'dpmpp_2m'"),
    ],
)
def test_make_plan_rejects_bad_input(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"sampler": "euler", "steps": 20, **kwargs}
    with pytest.raises(ValueError, match=message):
        make_plan(NoiseSchedule.sd15(), args.pop("sampler"), args.pop("steps"), **args)


def test_eta_is_for_ddim_only() -> None:
    plan: SamplingPlan = make_plan(NoiseSchedule.sd15(), "euler_a", 5)
    x = initial_latents(plan, clean_latents(2))
    with pytest.raises(ValueError, match=r"eta applies to ddim, tcd only, got eta 0.3 with euler_a"):
        sample(plan, toy_eps, x, noise=RowNoise([1, 2]), eta=0.3)
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\], got 1.5"):
        sample(make_plan(NoiseSchedule.sd15(), "ddim", 5), toy_eps, x, noise=RowNoise([1, 2]), eta=1.5)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_every_spacing_places_steps_like_diffusers(spacing: str) -> None:
    config = dict(SD15_CONFIG, timestep_spacing=spacing)
    schedule = NoiseSchedule.from_diffusers_config(config)
    for sampler, karras, _ in CASES:
        for steps in (1, 7, 25):
            plan = make_plan(schedule, sampler, steps, karras=karras)
            # Euler a with Karras follows Euler's Karras schedule (diffusers' Euler a has no Karras option).
            reference = DIFFUSERS_CLASSES["euler" if karras and sampler == "euler_a" else sampler].from_config(
                dict(config, use_karras_sigmas=True) if karras else config
            )
            reference.set_timesteps(steps)
            np.testing.assert_allclose(plan.timesteps.numpy(), reference.timesteps.numpy(), atol=2e-3)
            assert plan.init_noise_sigma == pytest.approx(float(reference.init_noise_sigma), rel=1e-6)
            if sampler != "ddim":  # diffusers' DDIM keeps ᾱ, not σ
                np.testing.assert_allclose(plan.sigmas.numpy(), reference.sigmas.numpy(), rtol=1e-6)


def test_schedule_from_sd15_config_equals_sd15_and_diffusers() -> None:
    schedule = NoiseSchedule.from_diffusers_config(SD15_CONFIG)
    sd15 = NoiseSchedule.sd15()
    assert torch.equal(schedule.alphas_cumprod, sd15.alphas_cumprod)
    reference: Any = DDIMScheduler.from_config(SD15_CONFIG)
    assert torch.equal(schedule.alphas_cumprod, reference.alphas_cumprod)
    for field in ("num_train_timesteps", "steps_offset", "timestep_spacing", "set_alpha_to_one", "prediction_type"):
        assert getattr(schedule, field) == getattr(sd15, field)
    assert (sd15.num_train_timesteps, sd15.steps_offset, sd15.timestep_spacing) == (1000, 1, "leading")


def test_schedule_honours_config_values() -> None:
    linear = {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "num_train_timesteps": 500}
    schedule = NoiseSchedule.from_diffusers_config(linear)
    reference: Any = DDIMScheduler(**linear)
    assert torch.equal(schedule.alphas_cumprod, reference.alphas_cumprod)
    betas = [0.001 * (i + 1) for i in range(10)]
    trained = NoiseSchedule.from_diffusers_config({"trained_betas": betas, "num_train_timesteps": 10})
    torch.testing.assert_close(trained.alphas_cumprod, torch.cumprod(1 - torch.tensor(betas), 0))
    options = {"steps_offset": 0, "timestep_spacing": "trailing", "set_alpha_to_one": True}
    schedule = NoiseSchedule.from_diffusers_config({**SD15_CONFIG, **options})
    assert (schedule.steps_offset, schedule.timestep_spacing, schedule.set_alpha_to_one) == (0, "trailing", True)
    assert schedule.final_sigma() == 0.0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"prediction_type": "sample"}, r"prediction_type must be one of epsilon, v_prediction, got 'sample'"),
        ({"beta_schedule": "squaredcos_cap_v2"}, r"beta_schedule must be one of linear, scaled_linear, got 'squa"),
        ({"timestep_spacing": "even"}, r"timestep_spacing must be one of leading, trailing, linspace, got 'even'"),
        ({"trained_betas": [0.1, 0.2]}, r"trained_betas must hold num_train_timesteps=1000 values, got shape \[2\]"),
        ({"rescale_betas_zero_snr": True}, r"zero terminal SNR .*needs prediction_type v_prediction"),
        ({"steps_offset": -1}, r"steps_offset must be >= 0, got -1"),
        ({"beta_end": 1.5, "beta_schedule": "linear"}, r"every beta must be inside \(0, 1\)"),
    ],
)
def test_schedule_rejects_bad_config(override: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NoiseSchedule.from_diffusers_config({**SD15_CONFIG, **override})
