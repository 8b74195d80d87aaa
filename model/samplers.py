"""Samplers for ε- and v-prediction models: DDIM (η), Euler, Euler ancestral, DPM++ 2M, with optional Karras
sigmas, and LCM and TCD (their steps and spacing in ``model/lcm.py``, matching diffusers' ``LCMScheduler``).

Each sampler is one step function with one signature; ``sample`` owns the loop (model call, callback,
dropping cancelled rows). The numbers match diffusers' ``DDIMScheduler``, ``EulerDiscreteScheduler``,
``EulerAncestralDiscreteScheduler`` and ``DPMSolverMultistepScheduler`` (order 2, dpmsolver++, midpoint) run
with the same schedule config.

Noise levels are kept as σ = √((1-ᾱ)/ᾱ). Euler and Euler a loop over x = x_0 + σ·ε (k-diffusion's form);
DDIM and DPM++ 2M loop over x = √ᾱ·x_0 + √(1-ᾱ)·ε with ᾱ = 1/(1+σ²) (diffusers' form for them), so the
latents seen by callbacks and ``add_noise`` are the ones diffusers has at the same step.

Every step function takes ε. A v-prediction model's output is turned into ε in ``sample``, once for all samplers
(``SamplingPlan.eps_from_v``), after classifier-free guidance, which is linear and so the same on v as on ε. The one
exception is DDIM's first step on a zero terminal SNR schedule (model/schedule.py), from ᾱ = 0 (σ = ∞): there
ε = x_t says nothing of x̂_0 = -v, so that step takes v (``ddim_zero_snr_step``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from core import rules
from model.lcm import lcm_step, lcm_timesteps, tcd_step
from model.schedule import NoiseSchedule

_VARIANCE_PRESERVING = ("ddim", "dpmpp_2m", "lcm", "tcd")
_CONSISTENCY = ("lcm", "tcd")  # steps picked from the 50-step distillation schedule (model/lcm.py)
_INTEGER_TIMESTEPS = ("ddim", "dpmpp_2m")  # diffusers rounds these samplers' timesteps to integers
_KARRAS_RHO = 7.0
_ZERO_SNR = ("ddim", "euler", "euler_a", "dpmpp_2m")  # the samplers that run zero terminal SNR schedules

# (model_input [B,4,h,w] scaled as the sampler requires, timesteps [B] float32) -> the model's prediction [B,4,h,w]:
# the noise ε, or v for a plan whose prediction_type is "v_prediction"
EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# Standard normal noise shaped like its argument; row b drawn from sample b's own generator.
NoiseFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class StepControl:
    """What a step callback asks of the sampler: drop rows, then replace the latents."""

    keep: torch.Tensor | None = None  # LongTensor of row indices to keep (cancelled samples dropped)
    latents: torch.Tensor | None = None  # replacement latents, shaped like x after `keep` (inpaint blending)


# Called after step i (0-based) with the current latents. When it drops rows, the NoiseFn must follow the same rows.
StepCallback = Callable[[int, torch.Tensor], StepControl | None]


@dataclass(frozen=True, eq=False)
class SamplingPlan:
    """The steps one sampler runs: model time and noise level of each step, plus the level after the last."""

    sampler: str
    timesteps: torch.Tensor  # [num_steps] float32, the model's time input at each step
    sigmas: torch.Tensor  # [num_steps + 1] float32, σ before each step; the last entry is σ after the last step
    init_noise_sigma: float  # txt2img start: x_T = noise · init_noise_sigma
    train_sigmas: torch.Tensor | None = None  # TCD: σ of every training step (it steps through others)
    prediction_type: str = "epsilon"  # what the model outputs: "epsilon" or "v_prediction" (model.schedule)

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.numel())

    def steps_before(self, switch_at: float, num_train_timesteps: int) -> int:
        """How many steps run before a switch at ``switch_at`` of the schedule (SDXL's base to refiner): those whose
        timestep is at or above round(T·(1 - switch_at)), as diffusers' ``denoising_end`` counts them."""
        cutoff = round(num_train_timesteps - switch_at * num_train_timesteps)
        return int((self.timesteps >= cutoff).sum())

    @property
    def variance_preserving(self) -> bool:
        """True when the loop's latents are √ᾱ·x_0 + √(1-ᾱ)·ε, False when they are x_0 + σ·ε."""
        return self.sampler in _VARIANCE_PRESERVING

    def add_noise(self, clean: torch.Tensor, noise: torch.Tensor, step: int) -> torch.Tensor:
        """Noise ``clean`` to the level before step ``step`` (``num_steps``: the end, where latents are clean)."""
        if not 0 <= step <= self.num_steps:
            raise ValueError(f"step must be in [0, {self.num_steps}], got {step}")
        clean = clean.to(torch.float32)
        if step == self.num_steps:
            # The loop ends clean; DDIM's last level √ᾱ_0 ≈ 0.9996 counts as clean too, as in diffusers' inpainting.
            return clean
        sigma = float(self.sigmas[step])
        noise = noise.to(clean)
        if math.isinf(sigma):  # ᾱ = 0 (zero terminal SNR, DDIM): pure noise
            return noise
        if not self.variance_preserving:
            return clean + sigma * noise
        alpha = 1 / math.sqrt(1 + sigma * sigma)
        return alpha * clean + (sigma * alpha) * noise

    def eps_from_v(self, v: torch.Tensor, model_input: torch.Tensor, step: int) -> torch.Tensor:
        """ε = √ᾱ·v + √(1-ᾱ)·x_t (Salimans & Ho 2022, v = √ᾱ·ε - √(1-ᾱ)·x_0), ᾱ = 1/(1+σ²).

        ``model_input`` is x_t in both loop forms: x/√(σ²+1) of x = x_0 + σ·ε is √ᾱ·x_0 + √(1-ᾱ)·ε. For Euler this
        is diffusers' x̂_0 = -σ/√(σ²+1)·v + x/(σ²+1) written as ε = (x - x̂_0)/σ.
        """
        sigma = float(self.sigmas[step])
        alpha = 1 / math.sqrt(1 + sigma * sigma)  # √ᾱ
        return alpha * v + (sigma * alpha) * model_input

    def model_input(self, x: torch.Tensor, step: int) -> torch.Tensor:
        """Scale the latents to unit variance for the model: x/√(σ²+1) in the x_0 + σ·ε form."""
        if self.variance_preserving:
            return x
        sigma = float(self.sigmas[step])
        return x / math.sqrt(sigma * sigma + 1)


def make_plan(
    schedule: NoiseSchedule, sampler: str, steps: int, *, karras: bool = False, strength: float = 1.0
) -> SamplingPlan:
    """Timesteps and sigmas for ``steps`` steps; ``strength`` < 1 keeps the last int(steps·strength) (img2img).

    Strength 0 (or steps·strength < 1) gives a plan of zero steps whose start is the clean init latents;
    diffusers' img2img pipeline fails there instead (it noises the latents at an empty list of timesteps).
    """
    rules.check_sampler_options(sampler, karras=karras, eta=0.0)
    if not 1 <= steps <= schedule.num_train_timesteps:
        raise ValueError(f"steps must be in [1, {schedule.num_train_timesteps}], got {steps}")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")

    if schedule.zero_terminal_snr and sampler not in _ZERO_SNR:
        raise ValueError(
            f"sampler {sampler!r} does not run zero terminal SNR schedules (the scheduler config's "
            f"rescale_betas_zero_snr); use one of {', '.join(_ZERO_SNR)}"
        )
    # float32, as diffusers interpolates them; DDIM alone starts from ᾱ = 0 under zero terminal SNR
    train_sigmas = schedule.train_sigmas(finite=sampler != "ddim").numpy()
    if sampler in _CONSISTENCY:  # their own spacing (model/lcm.py), whatever the config's timestep_spacing
        timesteps = lcm_timesteps(steps, schedule.num_train_timesteps)
    else:
        timesteps = _spaced_timesteps(schedule, steps, sampler)
    sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
    if karras:
        # Euler spans the chosen timesteps' sigmas; DPM-Solver spans the whole training range (as diffusers).
        lo, hi = (sigmas[-1], sigmas[0]) if sampler != "dpmpp_2m" else (train_sigmas[0], train_sigmas[-1])
        sigmas = _karras_sigmas(float(lo), float(hi), steps)
        timesteps = _sigma_to_timestep(sigmas, np.log(train_sigmas))
        if sampler in _INTEGER_TIMESTEPS:
            timesteps = timesteps.round()
    final = schedule.final_sigma() if sampler == "ddim" else 0.0
    sigmas = np.concatenate([sigmas, [final]]).astype(np.float32)
    if not (np.all(sigmas[1:-1] < sigmas[:-2]) and sigmas[-1] <= sigmas[-2]):
        raise ValueError(
            f"{steps} steps repeat noise levels with sampler {sampler!r} and {schedule.timestep_spacing!r} "
            "timestep spacing; use fewer steps"
        )

    max_sigma = float(sigmas.max())
    if sampler in _VARIANCE_PRESERVING:
        init_noise_sigma = 1.0
    elif schedule.timestep_spacing == "leading":
        # diffusers' Euler schedulers start from √(σ_max²+1)·noise here; kept so seeds reproduce its images.
        init_noise_sigma = math.sqrt(max_sigma**2 + 1)
    else:
        init_noise_sigma = max_sigma

    t_start = rules.start_step(steps, strength)
    return SamplingPlan(
        sampler=sampler,
        timesteps=torch.from_numpy(timesteps[t_start:].astype(np.float32)),
        sigmas=torch.from_numpy(sigmas[t_start:]),
        init_noise_sigma=init_noise_sigma,
        train_sigmas=schedule.train_sigmas() if sampler == "tcd" else None,
        prediction_type=schedule.prediction_type,
    )


def initial_latents(
    plan: SamplingPlan, noise: torch.Tensor, init_latents: torch.Tensor | None = None
) -> torch.Tensor:
    """txt2img: scaled pure noise; img2img: the init latents noised to the plan's first level."""
    if init_latents is None:
        return noise.to(torch.float32) * plan.init_noise_sigma
    return plan.add_noise(init_latents, noise, 0)


def sample(
    plan: SamplingPlan,
    eps_model: EpsModel,
    x: torch.Tensor,
    *,
    noise: NoiseFn,
    eta: float = 0.0,
    callback: StepCallback | None = None,
    start: int = 0,
    stop: int | None = None,
) -> torch.Tensor:
    """Run the plan from latents ``x``; returns the final latents (float32). Zero steps return ``x``.

    ``start`` / ``stop``: run only steps [start, stop) of the plan, from ``x`` at the level before ``start``, as a
    fresh run (a multistep sampler's history starts empty): how SDXL's base and refiner share one schedule, as
    diffusers' ``denoising_end`` and ``denoising_start`` do."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    stop = plan.num_steps if stop is None else stop
    if not 0 <= start <= stop <= plan.num_steps:
        raise ValueError(f"steps [{start}, {stop}) are not inside the plan's {plan.num_steps}")
    rules.check_sampler_options(plan.sampler, karras=False, eta=eta)
    step_fn = STEP_FUNCTIONS[plan.sampler]
    x = x.to(torch.float32)
    memory: torch.Tensor | None = None
    for i in range(start, stop):
        if x.shape[0] == 0:  # every sample was cancelled
            break
        t = torch.full((x.shape[0],), float(plan.timesteps[i]), dtype=torch.float32, device=x.device)
        model_input = plan.model_input(x, i)
        eps = eps_model(model_input, t).to(torch.float32)
        if math.isinf(float(plan.sigmas[i])):  # make_plan allows σ = ∞ for DDIM only, whose schedule needs v
            x = ddim_zero_snr_step(plan, i, x, eps, noise, eta)
        else:
            if plan.prediction_type == "v_prediction":
                eps = plan.eps_from_v(eps, model_input, i)
            x, memory = step_fn(plan, i, x, eps, memory, noise, eta)
        if callback is not None and (control := callback(i, x)) is not None:
            if control.keep is not None:
                keep = control.keep.to(x.device)
                x = x[keep]
                memory = None if memory is None else memory[keep]
            if control.latents is not None:
                if control.latents.shape != x.shape:
                    raise ValueError(
                        f"callback latents must have shape {list(x.shape)}, got {list(control.latents.shape)}"
                    )
                x = control.latents.to(x)
    return x


# One signature for every sampler: (plan, step, x, ε, memory, noise, η) -> (next x, next memory), where memory is
# per-sample state carried between steps (row-aligned with x) and noise draws fresh per-sample noise.
StepFn = Callable[
    [SamplingPlan, int, torch.Tensor, torch.Tensor, torch.Tensor | None, NoiseFn, float],
    tuple[torch.Tensor, torch.Tensor | None],
]


def ddim_step(
    plan: SamplingPlan, i: int, x: torch.Tensor, eps: torch.Tensor, memory: torch.Tensor | None,
    noise: NoiseFn, eta: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """DDIM, Song et al. 2020 eq. 12: x' = √ᾱ'·x̂_0 + √(1-ᾱ'-s²)·ε + s·z, s = η·√((1-ᾱ')/(1-ᾱ)·(1-ᾱ/ᾱ')) (eq. 16)."""
    s_now, s_next = float(plan.sigmas[i]), float(plan.sigmas[i + 1])
    a_now, a_next = 1 / (1 + s_now**2), 1 / (1 + s_next**2)
    b_now, b_next = s_now**2 * a_now, s_next**2 * a_next  # 1 - ᾱ, written so it keeps precision near ᾱ = 1
    x0 = (x - math.sqrt(b_now) * eps) / math.sqrt(a_now)
    std = eta * math.sqrt(b_next / b_now * (1 - a_now / a_next))
    # max(): for η = 1 the difference is 0 up to rounding
    x = math.sqrt(a_next) * x0 + math.sqrt(max(b_next - std**2, 0.0)) * eps
    if eta > 0:
        x = x + std * noise(x).to(x)
    return x, memory


def ddim_zero_snr_step(
    plan: SamplingPlan, i: int, x: torch.Tensor, v: torch.Tensor, noise: NoiseFn, eta: float
) -> torch.Tensor:
    """DDIM (eq. 12) from ᾱ = 0, where x_t = ε and v = -x_0: x' = -√ᾱ'·v + √(1-ᾱ'-s²)·x + s·z, s = η·√(1-ᾱ')."""
    s_next = float(plan.sigmas[i + 1])
    a_next = 1 / (1 + s_next**2)
    b_next = s_next**2 * a_next
    std = eta * math.sqrt(b_next)
    x = -math.sqrt(a_next) * v + math.sqrt(max(b_next - std**2, 0.0)) * x
    if eta > 0:
        x = x + std * noise(x).to(x)
    return x


def euler_step(
    plan: SamplingPlan, i: int, x: torch.Tensor, eps: torch.Tensor, memory: torch.Tensor | None,
    noise: NoiseFn, eta: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Euler on the probability-flow ODE dx/dσ = (x - x̂_0)/σ = ε (Karras et al. 2022, alg. 1 without the 2nd order)."""
    s_now, s_next = float(plan.sigmas[i]), float(plan.sigmas[i + 1])
    return x + (s_next - s_now) * eps, memory


def euler_ancestral_step(
    plan: SamplingPlan, i: int, x: torch.Tensor, eps: torch.Tensor, memory: torch.Tensor | None,
    noise: NoiseFn, eta: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Euler to σ_down, then fresh noise of std σ_up, σ_down² + σ_up² = σ'² (k-diffusion's ancestral Euler)."""
    s_now, s_next = float(plan.sigmas[i]), float(plan.sigmas[i + 1])
    s_up = math.sqrt(s_next**2 * (s_now**2 - s_next**2) / s_now**2)
    s_down = math.sqrt(s_next**2 - s_up**2)
    x = x + (s_down - s_now) * eps
    if s_next > 0:
        x = x + s_up * noise(x).to(x)
    return x, memory


def dpmpp_2m_step(
    plan: SamplingPlan, i: int, x: torch.Tensor, eps: torch.Tensor, memory: torch.Tensor | None,
    noise: NoiseFn, eta: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """DPM-Solver++(2M), Lu et al. 2022 alg. 2: x' = (s'/s)·x - a'·(e^-h - 1)·D, D = x̂_0 + (x̂_0 - x̂_0_prev)/(2r).

    Here a = √ᾱ, s = √(1-ᾱ), h = λ' - λ with λ = log(a/s) = -log σ, r = h_prev/h. Memory is the previous
    step's x̂_0; the first step of a run and the step to σ = 0 are first order, as in diffusers.
    """
    s_now, s_next = float(plan.sigmas[i]), float(plan.sigmas[i + 1])
    a_now = 1 / math.sqrt(1 + s_now**2)  # √ᾱ
    denoised = (x - s_now * a_now * eps) / a_now
    if s_next == 0:  # h = ∞: the update lands exactly on the denoised estimate
        return denoised, denoised
    a_next = 1 / math.sqrt(1 + s_next**2)
    h = math.log(s_now / s_next)  # λ = log(√ᾱ/√(1-ᾱ)) = -log σ
    d = denoised
    if memory is not None:
        r = math.log(float(plan.sigmas[i - 1]) / s_now) / h
        d = denoised + (denoised - memory) / (2 * r)
    x = (s_next * a_next) / (s_now * a_now) * x - a_next * math.expm1(-h) * d
    return x, denoised


STEP_FUNCTIONS: dict[str, StepFn] = {
    "ddim": ddim_step,
    "euler": euler_step,
    "euler_a": euler_ancestral_step,
    "dpmpp_2m": dpmpp_2m_step,
    "lcm": lcm_step,
    "tcd": tcd_step,
}


def _spaced_timesteps(schedule: NoiseSchedule, steps: int, sampler: str) -> np.ndarray:
    """Descending timesteps by the schedule's spacing rule (Lin et al. 2023, table 2), float64."""
    n = schedule.num_train_timesteps
    # DPM-Solver places steps + 1 points and drops the one at t = 0 (its last step goes to σ = 0 instead).
    points = steps + 1 if sampler == "dpmpp_2m" else steps
    if schedule.timestep_spacing == "leading":
        ts = (np.arange(points) * (n // points))[::-1][:steps].astype(np.float64) + schedule.steps_offset
    elif schedule.timestep_spacing == "trailing":
        ts = np.round(n - np.arange(steps) * (n / steps)) - 1
    else:  # linspace
        ts = np.linspace(0, n - 1, points)[::-1][:steps]
        if sampler in _INTEGER_TIMESTEPS:
            ts = ts.round()
    return np.ascontiguousarray(ts)


def _karras_sigmas(sigma_min: float, sigma_max: float, steps: int) -> np.ndarray:
    """Karras et al. 2022 eq. 5: σ_i = (σ_max^(1/ρ) + i/(n-1)·(σ_min^(1/ρ) - σ_max^(1/ρ)))^ρ, ρ = 7."""
    ramp = np.linspace(0, 1, steps)
    lo, hi = sigma_min ** (1 / _KARRAS_RHO), sigma_max ** (1 / _KARRAS_RHO)
    return np.asarray((hi + ramp * (lo - hi)) ** _KARRAS_RHO, dtype=np.float64)


def _sigma_to_timestep(sigmas: np.ndarray, log_train_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timestep of each σ, interpolating linearly in log σ between training steps."""
    log_sigmas = np.log(np.maximum(sigmas, 1e-10))
    # Index of the last training step whose log σ is <= the target, kept one short of the end to interpolate.
    low = np.searchsorted(log_train_sigmas, log_sigmas, side="right") - 1
    low = np.clip(low, 0, len(log_train_sigmas) - 2)
    lo, hi = log_train_sigmas[low], log_train_sigmas[low + 1]
    w = np.clip((lo - log_sigmas) / (lo - hi), 0, 1)
    return np.asarray((1 - w) * low + w * (low + 1), dtype=np.float64)
