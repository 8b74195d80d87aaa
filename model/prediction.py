"""What a model predicts, ε or v, when its checkpoint does not say.

A diffusers folder says it: ``prediction_type`` in ``scheduler/scheduler_config.json``. A single file does not.
The rule for those (``SDQ_PREDICTION_TYPE=auto``):

- an SD 1.x text encoder (OpenAI CLIP): ε, without running anything; no v-prediction SD 1.x models exist;
- an OpenCLIP text encoder (SD 2.x): the UNet runs once on a fixed input, as AUTOMATIC1111 decides it: latents of
  0.5 everywhere at the noisiest timestep (999), a constant text context. At that noise level x_t is almost pure
  noise, so an ε model gives back roughly its input, while a v model predicts v = √ᾱ·ε - √(1-ᾱ)·x_0 ≈ -x̂_0,
  which does not follow the input. v when the mean of (output - input) is below -1.

The threshold is AUTOMATIC1111's, an empirical one from trained SD 2.x checkpoints (SD 2.0 / 2.1 512-base: ε, 768-v:
v). It says nothing about random or untrained weights, and a fine-tune far from its base could fool it. Set
``SDQ_PREDICTION_TYPE`` (``epsilon`` or ``v_prediction``) to overrule it, and for a folder's config too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

import torch

from model.open_clip import uses_open_clip
from model.schedule import PREDICTION_TYPES
from model.weights import Components

log = logging.getLogger(__name__)

PredictionChoice = Literal["auto", "epsilon", "v_prediction"]
PREDICTION_CHOICES = ("auto", *PREDICTION_TYPES)

PROBE_TIMESTEP = 999.0  # the noisiest training step
PROBE_VALUE = 0.5  # every latent and context value of the probe
PROBE_SIDE = 8  # latent side: 64 image pixels, divisible by 2 for every downsampling of SD's 4 levels
PROBE_TOKENS = 2
V_THRESHOLD = -1.0  # mean(output - input) below it: v

# (latents [1, 4, h, w], timesteps [1], context [1, tokens, D], context mask None) -> prediction [1, 4, h, w]
ProbeUNet = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, None], torch.Tensor]


@torch.inference_mode()
def probe_statistic(unet: ProbeUNet, in_channels: int, context_dim: int, device: torch.device,
                    dtype: torch.dtype) -> float:
    """mean(UNet(x, 999, c) - x) on the probe input (x = c = 0.5 everywhere); input channels past the first 4
    (an inpainting UNet's mask and masked image) are 0.5 too."""
    x = torch.full((1, in_channels, PROBE_SIDE, PROBE_SIDE), PROBE_VALUE, device=device, dtype=dtype)
    t = torch.full((1,), PROBE_TIMESTEP, device=device)
    context = torch.full((1, PROBE_TOKENS, context_dim), PROBE_VALUE, device=device, dtype=dtype)
    out = unet(x, t, context, None).float()
    return float((out - x[:, : out.shape[1]].float()).mean())


def looks_like_v_prediction(unet: ProbeUNet, in_channels: int, context_dim: int, device: torch.device,
                            dtype: torch.dtype) -> bool:
    """The probe of the module docstring: True when the UNet's output looks like v rather than ε."""
    statistic = probe_statistic(unet, in_channels, context_dim, device, dtype)
    verdict = statistic < V_THRESHOLD
    log.info("prediction probe: mean(output - input) = %.3f at t=999: %s", statistic,
             "v-prediction" if verdict else "epsilon")
    return verdict


def resolve_prediction_type(
    choice: str, scheduler_config: dict[str, Any] | None, open_clip_text: bool, probe: Callable[[], bool],
) -> str:
    """The prediction type to sample with: ``choice`` unless "auto"; else the folder's scheduler config; else ε for
    SD 1.x text encoders and ``probe()`` (``looks_like_v_prediction``) for OpenCLIP ones."""
    if choice not in PREDICTION_CHOICES:
        raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_CHOICES)}, got {choice!r}")
    if choice != "auto":
        return choice
    if scheduler_config is not None:
        return str(scheduler_config.get("prediction_type", "epsilon"))
    if not open_clip_text:
        return "epsilon"
    return "v_prediction" if probe() else "epsilon"


def choose_prediction_type(components: Components, choice: str) -> str:
    """``resolve_prediction_type`` for loaded components, probing their UNet where the rule needs it."""
    unet = components.unet
    param = next(unet.parameters())

    def probe() -> bool:
        return looks_like_v_prediction(unet, unet.config.in_channels, unet.config.context_dim, param.device,
                                       param.dtype)

    chosen = resolve_prediction_type(choice, components.scheduler_config,
                                     uses_open_clip(components.text_encoder.config), probe)
    log.info("%s: %s (SDQ_PREDICTION_TYPE=%s)", components.source.name, chosen, choice)
    return chosen
