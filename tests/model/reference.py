"""Tiny diffusers reference models with random weights, saved as a diffusers folder our loader reads.

The same in-memory modules drive diffusers' pipelines, so both implementations run on identical weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UNet2DConditionModel,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from model.tokenizer import ClipTokenizer

SD15_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "set_alpha_to_one": False,
    "clip_sample": False,
    "prediction_type": "epsilon",
}


def reference_scheduler(sampler: str, karras: bool = False) -> SchedulerMixin:
    if sampler == "ddim":
        return DDIMScheduler(**SD15_SCHEDULER)
    cfg = {k: v for k, v in SD15_SCHEDULER.items() if k not in ("set_alpha_to_one", "clip_sample")}
    if sampler == "euler":
        return EulerDiscreteScheduler(**cfg, use_karras_sigmas=karras)
    if sampler == "euler_a":  # diffusers' Euler a has no Karras option
        return EulerAncestralDiscreteScheduler(**cfg)
    if sampler == "dpmpp_2m":
        return DPMSolverMultistepScheduler(**cfg, use_karras_sigmas=karras)
    raise ValueError(sampler)


@dataclass
class Reference:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    folder: Path


def build_reference(folder: Path, in_channels: int = 4, seed: int = 0, time_cond_proj_dim: int | None = None,
                    scheduler: str = "PNDMScheduler") -> Reference:
    """Random tiny SD-architecture modules (2 UNet levels, 4 VAE levels), saved to ``folder``;
    ``time_cond_proj_dim``: an LCM-distilled UNet's guidance embedding."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=2,
        norm_num_groups=32,
        time_cond_proj_dim=time_cond_proj_dim,
    ).eval()
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=32,
    ).eval()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    ).eval()
    # Random init leaves the UNet's last conv at zero in some versions: perturb everything a little so outputs
    # depend on every weight.
    with torch.no_grad():
        for module in (unet, vae):
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    folder.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text_encoder.save_pretrained(folder / "text_encoder")
    tok_dir = folder / "tokenizer"
    ClipTokenizer.bundled().save_folder(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": scheduler, **SD15_SCHEDULER, "skip_prk_steps": True})
    )
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return Reference(unet, vae, text_encoder, tokenizer, folder)
