"""The training noise schedule of an SD model: ᾱ_t for t = 0..T-1, how inference steps are spaced, and what the
model predicts (ε, or v = √ᾱ·ε - √(1-ᾱ)·x_0 for SD 2.x 768-v models)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction")
BETA_SCHEDULES = ("linear", "scaled_linear")

# Scheduler-config switches whose non-default values change the maths in ways the samplers do not implement.
_UNSUPPORTED_FLAGS = ("rescale_betas_zero_snr", "thresholding", "clip_sample")


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no single truth value
class NoiseSchedule:
    """Forward process q(x_t | x_0) = N(√ᾱ_t·x_0, (1-ᾱ_t)·I) with the step-spacing rules of diffusers' configs."""

    alphas_cumprod: torch.Tensor  # [num_train_timesteps] float32, ᾱ_t, computed in float32 as diffusers does
    num_train_timesteps: int = 1000
    steps_offset: int = 1
    timestep_spacing: str = "leading"
    set_alpha_to_one: bool = False  # DDIM: ᾱ after the last step is 1 (True) or ᾱ_0 (False)
    prediction_type: str = "epsilon"

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {self.prediction_type!r}"
            )
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(
                f"timestep_spacing must be one of {', '.join(TIMESTEP_SPACINGS)}, got {self.timestep_spacing!r}"
            )
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be at least 2, got {self.num_train_timesteps}")
        if self.steps_offset < 0:
            raise ValueError(f"steps_offset must be >= 0, got {self.steps_offset}")
        ac = self.alphas_cumprod
        if ac.dim() != 1 or ac.numel() != self.num_train_timesteps:
            raise ValueError(
                f"alphas_cumprod must have shape [{self.num_train_timesteps}] (num_train_timesteps), "
                f"got {list(ac.shape)}"
            )
        if not bool(((ac > 0) & (ac < 1)).all()) or not bool((ac[1:] < ac[:-1]).all()):
            raise ValueError("alphas_cumprod must be strictly decreasing inside (0, 1): every beta in (0, 1)")

    @classmethod
    def from_betas(cls, betas: torch.Tensor, **options: Any) -> NoiseSchedule:
        """ᾱ_t = Π_{s≤t} (1 - β_s), accumulated in float32 like diffusers so ᾱ matches it bit for bit."""
        betas = betas.to(torch.float32)
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("every beta must be inside (0, 1)")
        return cls(alphas_cumprod=torch.cumprod(1.0 - betas, dim=0), num_train_timesteps=betas.numel(), **options)

    @classmethod
    def sd15(cls) -> NoiseSchedule:
        """The schedule SD 1.x was trained with: scaled_linear betas 0.00085..0.012 over 1000 steps."""
        return cls.from_betas(_scaled_linear_betas(0.00085, 0.012, 1000))

    @classmethod
    def from_diffusers_config(cls, cfg: Mapping[str, Any]) -> NoiseSchedule:
        """Read a diffusers ``scheduler_config.json``; keys it lacks take the SD 1.5 values."""
        for flag in _UNSUPPORTED_FLAGS:
            if cfg.get(flag):
                raise ValueError(f"scheduler config sets {flag}=true, which is not supported")
        num_train = int(cfg.get("num_train_timesteps", 1000))
        trained = cfg.get("trained_betas")
        if trained is not None:
            betas = _trained_betas(trained, num_train)
        else:
            kind = cfg.get("beta_schedule", "scaled_linear")
            start, end = float(cfg.get("beta_start", 0.00085)), float(cfg.get("beta_end", 0.012))
            if kind == "linear":
                betas = torch.linspace(start, end, num_train, dtype=torch.float32)
            elif kind == "scaled_linear":
                betas = _scaled_linear_betas(start, end, num_train)
            else:
                raise ValueError(f"beta_schedule must be one of {', '.join(BETA_SCHEDULES)}, got {kind!r}")
        return cls.from_betas(
            betas,
            steps_offset=int(cfg.get("steps_offset", 1)),
            timestep_spacing=str(cfg.get("timestep_spacing", "leading")),
            set_alpha_to_one=bool(cfg.get("set_alpha_to_one", False)),
            prediction_type=str(cfg.get("prediction_type", "epsilon")),
        )

    def train_sigmas(self) -> torch.Tensor:
        """σ_t = √((1-ᾱ_t)/ᾱ_t) for every training step, float32 (the noise scale of x_t/√ᾱ_t = x_0 + σ_t·ε)."""
        ac = self.alphas_cumprod
        return ((1 - ac) / ac) ** 0.5

    def final_sigma(self) -> float:
        """σ after DDIM's last step: 0 when ᾱ is taken as 1 there, else σ_0."""
        if self.set_alpha_to_one:
            return 0.0
        a0 = float(self.alphas_cumprod[0])
        return math.sqrt((1 - a0) / a0)


def _scaled_linear_betas(start: float, end: float, n: int) -> torch.Tensor:
    # Latent diffusion's schedule: linear in √β (the float32 linspace matters for bit-exact ᾱ).
    return torch.linspace(start**0.5, end**0.5, n, dtype=torch.float32) ** 2


def _trained_betas(trained: Sequence[float], num_train: int) -> torch.Tensor:
    betas = torch.tensor(list(trained), dtype=torch.float32)
    if betas.dim() != 1 or betas.numel() != num_train:
        raise ValueError(
            f"trained_betas must hold num_train_timesteps={num_train} values, got shape {list(betas.shape)}"
        )
    return betas
