"""The training noise schedule of an SD model: ᾱ_t for t = 0..T-1, how inference steps are spaced, and what the
model predicts (ε, or v = √ᾱ·ε - √(1-ᾱ)·x_0 for SD 2.x 768-v models).

Zero terminal SNR (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", alg. 1; diffusers'
``rescale_betas_zero_snr``): √ᾱ is shifted and scaled so that ᾱ_0 is kept and ᾱ_{T-1} = 0, pure noise. Such a
model must predict v (at ᾱ = 0 the input says nothing of x_0, so ε cannot give it). DDIM steps from ᾱ = 0 itself;
Euler, Euler a and DPM++ 2M take ᾱ_{T-1} = 2**-24 instead (σ ≈ 4096), as diffusers' schedulers do.
"""

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
_UNSUPPORTED_FLAGS = ("thresholding", "clip_sample")
ZERO_SNR_FINITE_ALPHA_CUMPROD = 2.0**-24  # ᾱ_{T-1} of a zero-SNR schedule in diffusers' Euler and DPM-Solver


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no single truth value
class NoiseSchedule:
    """Forward process q(x_t | x_0) = N(√ᾱ_t·x_0, (1-ᾱ_t)·I) with the step-spacing rules of diffusers' configs."""

    alphas_cumprod: torch.Tensor  # [num_train_timesteps] float32, ᾱ_t, computed in float32 as diffusers does
    num_train_timesteps: int = 1000
    steps_offset: int = 1
    timestep_spacing: str = "leading"
    set_alpha_to_one: bool = False  # DDIM: ᾱ after the last step is 1 (True) or ᾱ_0 (False)
    prediction_type: str = "epsilon"
    zero_terminal_snr: bool = False  # ᾱ_{T-1} = 0 (rescale_betas_zero_snr)

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
        inside = ac[:-1] if self.zero_terminal_snr else ac
        if not bool(((inside > 0) & (inside < 1)).all()) or not bool((ac[1:] < ac[:-1]).all()):
            raise ValueError("alphas_cumprod must be strictly decreasing inside (0, 1): every beta in (0, 1)")
        if self.zero_terminal_snr and float(ac[-1]) != 0.0:
            raise ValueError(f"a zero terminal SNR schedule ends at alphas_cumprod 0, got {float(ac[-1])}")
        if self.zero_terminal_snr and self.prediction_type != "v_prediction":
            raise ValueError(
                "zero terminal SNR (the scheduler config's rescale_betas_zero_snr) needs prediction_type "
                f"v_prediction: at alphas_cumprod 0 an epsilon model cannot tell the image; "
                f"got {self.prediction_type!r}"
            )

    @classmethod
    def from_betas(cls, betas: torch.Tensor, **options: Any) -> NoiseSchedule:
        """ᾱ_t = Π_{s≤t} (1 - β_s), accumulated in float32 like diffusers so ᾱ matches it bit for bit."""
        betas = betas.to(torch.float32)
        # zero terminal SNR: the last beta is 1
        inside = betas[:-1] if options.get("zero_terminal_snr") else betas
        if not bool(((inside > 0) & (inside < 1)).all()):
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
        zero_snr = bool(cfg.get("rescale_betas_zero_snr", False))
        if zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls.from_betas(
            betas,
            steps_offset=int(cfg.get("steps_offset", 1)),
            timestep_spacing=str(cfg.get("timestep_spacing", "leading")),
            set_alpha_to_one=bool(cfg.get("set_alpha_to_one", False)),
            prediction_type=str(cfg.get("prediction_type", "epsilon")),
            zero_terminal_snr=zero_snr,
        )

    def train_sigmas(self, finite: bool = False) -> torch.Tensor:
        """σ_t = √((1-ᾱ_t)/ᾱ_t) for every training step, float32 (the noise scale of x_t/√ᾱ_t = x_0 + σ_t·ε).

        Zero terminal SNR: σ_{T-1} = ∞; with ``finite``, that of ᾱ_{T-1} = 2**-24 (diffusers' Euler, DPM-Solver)."""
        ac = self.alphas_cumprod
        if finite and self.zero_terminal_snr:
            ac = ac.clone()
            ac[-1] = ZERO_SNR_FINITE_ALPHA_CUMPROD
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


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023 alg. 1, as diffusers computes it in float32: √ᾱ shifted to end at 0, scaled to keep √ᾱ_0."""
    sqrt_ac = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ac[0].clone(), sqrt_ac[-1].clone()
    sqrt_ac -= last
    sqrt_ac *= first / (first - last)
    ac = sqrt_ac**2
    return 1 - torch.cat([ac[0:1], ac[1:] / ac[:-1]])


def _trained_betas(trained: Sequence[float], num_train: int) -> torch.Tensor:
    betas = torch.tensor(list(trained), dtype=torch.float32)
    if betas.dim() != 1 or betas.numel() != num_train:
        raise ValueError(
            f"trained_betas must hold num_train_timesteps={num_train} values, got shape {list(betas.shape)}"
        )
    return betas
