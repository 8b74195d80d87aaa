"""Latent Consistency Model sampling (Luo et al. 2023, "Latent Consistency Models", alg. 3), as diffusers'
``LCMScheduler`` runs it: a few steps picked from the 50-step distillation schedule, each mapping the latents to
the consistency function's x̂_0 and, before every step but the last, noising that estimate to the next timestep.

It works with any ε-prediction SD 1.x UNet trained for it: an LCM-distilled UNet, or a base model with an LCM-LoRA.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from core import rules

if TYPE_CHECKING:
    from model.samplers import NoiseFn, SamplingPlan

SIGMA_DATA = 0.5  # σ_data of the consistency parameterisation (LCM paper, eq. 3)
TIMESTEP_SCALING = 10.0  # diffusers' default `timestep_scaling`: c_skip, c_out are taken at 10·t


def lcm_timesteps(steps: int, num_train_timesteps: int, original_steps: int = rules.LCM_ORIGINAL_STEPS) -> np.ndarray:
    """The descending timesteps of ``steps`` LCM steps, float64: evenly spaced indices into the distillation
    schedule t = k·j - 1 (j = 1..original_steps, k = T // original_steps), as ``LCMScheduler.set_timesteps``.

    For SD 1.5 and 4 steps: 999, 759, 499, 259. The schedule does not depend on the config's ``timestep_spacing``
    or ``steps_offset`` (diffusers ignores both for LCM).
    """
    if steps > original_steps:  # the picks must be distinct points of the distillation schedule
        raise ValueError(f"steps must be at most {original_steps} with sampler lcm, got {steps}")
    if original_steps > num_train_timesteps:
        raise ValueError(f"the LCM schedule needs {original_steps} training timesteps, the model has "
                         f"{num_train_timesteps}")
    k = num_train_timesteps // original_steps
    origin = (np.arange(1, original_steps + 1) * k - 1)[::-1]
    picks = np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)
    return np.ascontiguousarray(origin[picks], dtype=np.float64)


def boundary_scalings(timestep: float) -> tuple[float, float]:
    """c_skip(t), c_out(t) of the consistency function f(x, t) = c_skip·x + c_out·x̂_0 (LCM eq. 3, diffusers'
    discrete form at 10·t): c_skip = σ_d²/(s² + σ_d²), c_out = s/√(s² + σ_d²), s = 10·t."""
    s = timestep * TIMESTEP_SCALING
    return SIGMA_DATA**2 / (s * s + SIGMA_DATA**2), s / math.sqrt(s * s + SIGMA_DATA**2)


def tcd_step(
    plan: SamplingPlan, i: int, x: torch.Tensor, eps: torch.Tensor, memory: torch.Tensor | None,
    noise: NoiseFn, eta: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """TCD (Zheng et al. 2024, "Trajectory Consistency Distillation", eq. 9, strategic stochastic sampling), as
    diffusers' ``TCDScheduler``: x̂_0 = (x - √(1-ᾱ_t)·ε)/√ᾱ_t; to s = ⌊(1-γ)·t'⌋: x_s = √ᾱ_s·x̂_0 + √(1-ᾱ_s)·ε; then,
    but at the last step, forward to t': x' = √(ᾱ'/ᾱ_s)·x_s + √(1-ᾱ'/ᾱ_s)·z. γ is ``eta``; t' = 0 after the last step.
    """
    assert plan.train_sigmas is not None  # make_plan sets them for tcd
    s_now = float(plan.sigmas[i])
    a_now = 1 / (1 + s_now**2)
    last = i == plan.num_steps - 1
    t_next = 0 if last else int(plan.timesteps[i + 1])
    t_s = int(torch.floor((1 - eta) * torch.tensor(t_next)))  # in float32, as diffusers rounds it
    s_s = float(plan.train_sigmas[t_s])
    a_s = 1 / (1 + s_s**2)
    x0 = (x - math.sqrt(s_now**2 * a_now) * eps) / math.sqrt(a_now)
    x_s = math.sqrt(a_s) * x0 + math.sqrt(s_s**2 * a_s) * eps
    if last or eta == 0:
        return x_s, memory
    a_next = 1 / (1 + float(plan.sigmas[i + 1]) ** 2)
    return math.sqrt(a_next / a_s) * x_s + math.sqrt(1 - a_next / a_s) * noise(x).to(x), memory


def lcm_step(
    plan: SamplingPlan, i: int, x: torch.Tensor, eps: torch.Tensor, memory: torch.Tensor | None,
    noise: NoiseFn, eta: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """LCM multistep sampling (alg. 3): x̂_0 = (x - √(1-ᾱ)·ε)/√ᾱ, f = c_skip·x + c_out·x̂_0, x' = √ᾱ'·f + √(1-ᾱ')·z.

    The last step returns f itself (no noise), so a one-step run is one consistency-function evaluation.
    """
    s_now = float(plan.sigmas[i])
    a_now = 1 / (1 + s_now**2)  # ᾱ_t
    x0 = (x - math.sqrt(s_now**2 * a_now) * eps) / math.sqrt(a_now)
    c_skip, c_out = boundary_scalings(float(plan.timesteps[i]))
    denoised = c_out * x0 + c_skip * x
    if i == plan.num_steps - 1:
        return denoised, memory
    s_next = float(plan.sigmas[i + 1])
    a_next = 1 / (1 + s_next**2)
    return math.sqrt(a_next) * denoised + math.sqrt(s_next**2 * a_next) * noise(x).to(x), memory


def guidance_embedding(guidance_scales: torch.Tensor, dim: int) -> torch.Tensor:
    """An LCM-distilled UNet's guidance input [B, dim], float32 (the ``timestep_cond`` of ``UNetModel``): a
    sinusoidal embedding of w = 1000·(scale - 1), sin half first, frequencies 10000^(-k/(dim/2 - 1)), as diffusers'
    ``get_guidance_scale_embedding``. Such a UNet was distilled with the guidance folded in: it runs one pass per
    step at any scale, never classifier-free guidance."""
    w = (guidance_scales.to(torch.float32).reshape(-1) - 1) * 1000.0
    half = dim // 2
    step = torch.log(torch.tensor(10000.0)) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -step).to(w.device)
    args = w[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb
