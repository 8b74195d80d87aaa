"""A tiny SD 2.x-like diffusers folder, written by ``StableDiffusionPipeline.save_pretrained``: linear projections in
the transformers, a fixed head size (diffusers' ``attention_head_dim`` as a per-level list of head counts), a GELU
text encoder whose width is the cross-attention width, a tokenizer padding with ``!`` and a v-prediction scheduler.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)
from transformers import CLIPTextConfig, CLIPTokenizer

from model.unet import UNetConfig
from model.vae import VAEConfig
from model.weights import tiny_configs
from tests.model.conftest import Configs, random_reference_modules
from tests.model.reference import SD15_SCHEDULER
from tests.model.saved_pipeline import clip_vocabulary

SD2_SCHEDULER = {"_class_name": "DDIMScheduler", **SD15_SCHEDULER, "prediction_type": "v_prediction"}
SCHEDULERS: dict[str, Any] = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler,
                              "euler_a": EulerAncestralDiscreteScheduler, "dpmpp_2m": DPMSolverMultistepScheduler,
                              "lcm": LCMScheduler}


def sd2_configs(in_channels: int = 4) -> Configs:
    """SD 2.x's architecture, tiny: 16 channels per head (2 heads at 32 channels, 4 at 64), linear projections,
    a 2-layer GELU text encoder of 32 channels in 2 heads; ``in_channels`` 9 for the inpainting UNet."""
    _, vae, _ = tiny_configs()
    unet = UNetConfig(in_channels=in_channels, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                      attention_resolutions=(1, 2), num_head_channels=16, context_dim=32,
                      use_linear_in_transformer=True)
    text = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5,
                          bos_token_id=49406, eos_token_id=49407, pad_token_id=0)
    assert isinstance(vae, VAEConfig)
    return unet, vae, text


def sd2_tokenizer() -> CLIPTokenizer:
    """CLIP's vocabulary padding with "!" (id 0), as the tokenizer of diffusers' SD 2.x folders."""
    vocab, merges = clip_vocabulary()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77,  # type: ignore[arg-type]
                         pad_token="!")


def save_sd2_folder(
    folder: Path, seed: int = 0, prediction_type: str = "v_prediction", in_channels: int = 4
) -> Path:
    """``in_channels`` 9: an inpainting folder (``StableDiffusionInpaintPipeline``), as SD 2's 512-inpainting-ema."""
    unet, vae, text_encoder = random_reference_modules(sd2_configs(in_channels), seed)
    scheduler = DDIMScheduler.from_config({**SD2_SCHEDULER, "prediction_type": prediction_type})
    cls = StableDiffusionInpaintPipeline if in_channels == 9 else StableDiffusionPipeline
    pipe = cls(vae=vae, text_encoder=text_encoder, tokenizer=sd2_tokenizer(), unet=unet, scheduler=scheduler,
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def with_prediction_type(folder: Path, target: Path, prediction_type: str) -> Path:
    """A copy of ``folder`` whose scheduler config says ``prediction_type``."""
    shutil.copytree(folder, target)
    config_file = target / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "prediction_type": prediction_type}))
    return target


def reference_pipeline(cls: type[DiffusionPipeline], folder: Path, sampler: str, karras: bool = False) -> Any:
    """diffusers' ``cls`` loaded from ``folder`` with the sampler's scheduler, made from the folder's config."""
    pipe: Any = cls.from_pretrained(folder, local_files_only=True, safety_checker=None, requires_safety_checker=False)
    options: dict[str, Any] = {"use_karras_sigmas": True} if karras else {}
    if sampler == "lcm":
        options = {"original_inference_steps": 50}
    pipe.scheduler = SCHEDULERS[sampler].from_config(pipe.scheduler.config, **options)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_pixels(pipe: Any, seed: int, n: int, **call: Any) -> np.ndarray:
    """diffusers' images for one CPU generator per image (our noise convention), as int16 pixels."""
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]
    out = pipe(num_images_per_prompt=n, generator=generators, output_type="np", **call)
    return np.round(out.images * 255).astype(np.int16)
