"""What a model predicts, ε or v, when its checkpoint does not say.

A diffusers folder says it: ``prediction_type`` in ``scheduler/scheduler_config.json``. A single file does not.
The rule for those (``SDQ_PREDICTION_TYPE=auto``):

- an SD 1.x text encoder (OpenAI CLIP): ε, without running anything; SD 1.x was trained for ε only;
- an OpenCLIP text encoder with a 9-channel (inpainting) UNet: ε, without running anything; the one SD 2 inpainting
  model (``512-inpainting-ema``) and its fine-tunes predict ε, and AUTOMATIC1111 and ComfyUI take them as ε too;
- an OpenCLIP text encoder (SD 2.x, whose 512 models predict ε and 768 ones v): the UNet runs once, as
  AUTOMATIC1111 decides it, and its output tells. Unlike AUTOMATIC1111's probe (latents of 0.5 everywhere, an
  empirical threshold on mean(output - input)), ours gives the UNet what it was trained on: seeded standard-normal
  latents at the noisiest timestep, and the empty prompt's text context.

Why it separates the two: at t = 999, ᾱ ≈ 0.0047 for SD's schedule (a = √ᾱ ≈ 0.068, b = √(1-ᾱ) ≈ 0.998), so
x_t = a·x_0 + b·ε is almost ε. The statistic is the least-squares slope of the output on the input. For data of
mean μ and variance s² (s ≈ 1 for SD's scaled latents) the best predictions are affine in x_t, with slopes
b/(a²s² + b²) ≈ 1 for ε and a·b·(1 - s²)/(a²s² + b²) ≈ 0.068·(1 - s²) for v = a·ε - b·x_0 (its x_t-parts cancel),
whatever μ. ε when the slope is above ``EPSILON_SLOPE`` = 0.5: for every s up to ~14, while a v model's slope stays
below 0.07.

Limits: the argument holds for a trained model; random or untrained weights give an arbitrary answer, and a
fine-tune far from its base could in principle fool it. Not verified here on published SD 2.x weights. Set
``SDQ_PREDICTION_TYPE`` (``epsilon`` or ``v_prediction``) to overrule the rule, and a folder's config too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

import torch

from model.clip_config import BOS_TOKEN_ID, EOS_TOKEN_ID
from model.open_clip import uses_open_clip
from model.schedule import PREDICTION_TYPES
from model.weights import Components

log = logging.getLogger(__name__)

PredictionChoice = Literal["auto", "epsilon", "v_prediction"]
PREDICTION_CHOICES = ("auto", *PREDICTION_TYPES)

PROBE_TIMESTEP = 999.0  # the noisiest step of SD's 1000 training steps
PROBE_SIDE = 16  # latent side (128 image pixels): 1024 values; divisible by the 8 of SD's 4 levels
PROBE_SEED = 0
EPSILON_SLOPE = 0.5  # slope of output on input above it: ε

# (latents [1, C, h, w], timesteps [1], context [1, L, D], context mask None) -> prediction [1, 4, h, w]
ProbeUNet = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, None], torch.Tensor]


@torch.inference_mode()
def probe_slope(unet: ProbeUNet, in_channels: int, context: torch.Tensor) -> float:
    """Least-squares slope of UNet(x, 999, context) on x, for seeded standard-normal latents x (CPU generator).
    Input channels past the first 4 (an inpainting UNet's mask and masked image) are zero."""
    noise = torch.randn((1, 4, PROBE_SIDE, PROBE_SIDE), generator=torch.Generator("cpu").manual_seed(PROBE_SEED))
    extra = torch.zeros((1, in_channels - 4, PROBE_SIDE, PROBE_SIDE))
    x = torch.cat([noise, extra], dim=1).to(context)
    t = torch.full((1,), PROBE_TIMESTEP, device=context.device)
    out = unet(x, t, context, None).float().flatten().cpu()
    centred = noise.flatten() - noise.mean()
    return float(((out - out.mean()) * centred).sum() / (centred * centred).sum())


def looks_like_v_prediction(unet: ProbeUNet, in_channels: int, context: torch.Tensor) -> bool:
    """The probe of the module docstring: True when the UNet's output looks like v rather than ε."""
    slope = probe_slope(unet, in_channels, context)
    if slope != slope:  # NaN: a broken network; ε, the default, and SDQ_PREDICTION_TYPE can say otherwise
        log.warning("prediction probe: the UNet's output is not finite; taking epsilon")
    verdict = slope < EPSILON_SLOPE
    log.info("prediction probe: slope of output on input at t=999: %.3f: %s", slope,
             "v-prediction" if verdict else "epsilon")
    return verdict


def resolve_prediction_type(
    choice: str, scheduler_config: dict[str, Any] | None, open_clip_text: bool, probe: Callable[[], bool],
    *, inpaint: bool = False,
) -> str:
    """The prediction type to sample with: ``choice`` unless "auto"; else the folder's scheduler config; else ε for
    SD 1.x text encoders and inpainting UNets, and ``probe()`` (``looks_like_v_prediction``) for other OpenCLIP ones."""
    if choice not in PREDICTION_CHOICES:
        raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_CHOICES)}, got {choice!r}")
    if choice != "auto":
        return choice
    if scheduler_config is not None:
        return str(scheduler_config.get("prediction_type", "epsilon"))
    if not open_clip_text or inpaint:
        return "epsilon"
    return "v_prediction" if probe() else "epsilon"


def empty_prompt_context(components: Components) -> torch.Tensor:
    """[1, positions, D]: the text encoder's output for the empty prompt, BOS, EOS, then OpenCLIP's pad id 0."""
    encoder = components.text_encoder
    positions = int(encoder.config.max_position_embeddings)
    ids = torch.zeros((1, positions), dtype=torch.long)
    ids[0, :2] = torch.tensor([BOS_TOKEN_ID, EOS_TOKEN_ID])
    device = next(encoder.parameters()).device
    with torch.inference_mode():
        context: torch.Tensor = encoder(input_ids=ids.to(device)).last_hidden_state
    return context.to(next(components.unet.parameters()))  # the UNet's device and dtype


def choose_prediction_type(components: Components, choice: str) -> str:
    """``resolve_prediction_type`` for loaded components, probing their UNet where the rule needs it."""
    unet = components.unet

    def probe() -> bool:
        return looks_like_v_prediction(unet, unet.config.in_channels, empty_prompt_context(components))

    chosen = resolve_prediction_type(choice, components.scheduler_config,
                                     uses_open_clip(components.text_encoder.config), probe,
                                     inpaint=components.is_inpaint)
    log.info("%s: %s (prediction type %s)", components.source.name, chosen, choice)
    return chosen
