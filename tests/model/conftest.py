"""Tiny SD-architecture checkpoints with random weights, in both layouts our loader reads.

- ``tiny_checkpoint`` / ``tiny_inpaint_checkpoint``: single-file ``.safetensors`` (original layout) of
  ``model.weights.tiny_configs()``, with a 4- and a 9-channel UNet input.
- ``diffusers_model``: a diffusers-format folder written by diffusers/transformers ``save_pretrained`` from their
  own modules, for two different tiny configs ("tiny", and "variant": 3 levels, 2 res blocks, fixed head size,
  linear projections, 2-deep transformers), with those reference modules kept for comparisons.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from model.clip_config import clip_text_config
from model.unet import UNetConfig
from model.vae import VAEConfig
from model.weights import save_random_checkpoint, tiny_configs

Configs = tuple[UNetConfig, VAEConfig, CLIPTextConfig]

SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "steps_offset": 1, "set_alpha_to_one": False, "skip_prk_steps": True,
    "clip_sample": False,
}


def variant_configs() -> Configs:
    """A second small architecture, different from tiny_configs() in every dimension the loader infers."""
    return (
        UNetConfig(model_channels=32, channel_mult=(1, 2, 4), num_res_blocks=2, attention_resolutions=(2, 4),
                   num_head_channels=16, transformer_depth=2, context_dim=48, use_linear_in_transformer=True),
        VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=2),
        clip_text_config(hidden_size=48, num_hidden_layers=3, num_attention_heads=3, intermediate_size=96,
                         max_position_embeddings=64),
    )


CONFIGS: dict[str, Configs] = {"tiny": tiny_configs(), "variant": variant_configs()}


def diffusers_unet_kwargs(c: UNetConfig) -> dict[str, Any]:
    channels = [c.model_channels * m for m in c.channel_mult]
    attention = [2**i in c.attention_resolutions for i in range(len(channels))]
    # diffusers' attention_head_dim is the number of heads per level
    heads: int | list[int] = c.num_heads
    if c.num_head_channels != -1:
        heads = [ch // c.num_head_channels for ch in channels]
    # diffusers' middle block takes the last level's count; a last level without attention ignores it
    depths = list(c.transformer_depth)  # type: ignore[arg-type]
    if not attention[-1]:
        depths[-1] = c.depth(-1)
    return {
        "sample_size": 8, "in_channels": c.in_channels, "out_channels": c.out_channels,
        "block_out_channels": tuple(channels), "layers_per_block": c.num_res_blocks,
        "down_block_types": tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        "up_block_types": tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        "cross_attention_dim": c.context_dim, "attention_head_dim": heads,
        "transformer_layers_per_block": tuple(depths), "use_linear_projection": c.use_linear_in_transformer,
    }


def diffusers_vae_kwargs(c: VAEConfig) -> dict[str, Any]:
    levels = len(c.ch_mult)
    return {
        "in_channels": c.in_channels, "out_channels": c.out_channels,
        "block_out_channels": tuple(c.ch * m for m in c.ch_mult), "layers_per_block": c.num_res_blocks,
        "down_block_types": ("DownEncoderBlock2D",) * levels, "up_block_types": ("UpDecoderBlock2D",) * levels,
        "latent_channels": c.z_channels, "sample_size": 64,
    }


@dataclass
class DiffusersModel:
    """A diffusers-format folder and the reference modules whose weights it holds."""

    name: str
    folder: Path
    configs: Configs
    unet: diffusers.UNet2DConditionModel
    vae: diffusers.AutoencoderKL
    text_encoder: CLIPTextModel


def random_reference_modules(
    configs: Configs, seed: int = 0
) -> tuple[diffusers.UNet2DConditionModel, diffusers.AutoencoderKL, CLIPTextModel]:
    """diffusers' UNet and VAE and transformers' CLIP text model of ``configs``, randomly initialised from ``seed``."""
    unet_config, vae_config, clip_config = configs
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        unet = diffusers.UNet2DConditionModel(**diffusers_unet_kwargs(unet_config)).eval()
        vae = diffusers.AutoencoderKL(**diffusers_vae_kwargs(vae_config)).eval()
        text_encoder = CLIPTextModel(clip_config).eval()
        # norms start as the identity: perturb them so a swapped norm cannot go unnoticed
        for module in (unet, vae, text_encoder):
            for p in module.parameters():
                if p.ndim == 1:
                    p.add_(0.1 * torch.randn_like(p))
    return unet, vae, text_encoder


def write_diffusers_folder(name: str, folder: Path, configs: Configs, seed: int = 0) -> DiffusersModel:
    unet, vae, text_encoder = random_reference_modules(configs, seed)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text_encoder.save_pretrained(folder / "text_encoder")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER_CONFIG))
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }))
    return DiffusersModel(name, folder, configs, unet, vae, text_encoder)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Single-file checkpoint of tiny_configs() with random weights (seed 0)."""
    return save_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", *tiny_configs(), seed=0)


@pytest.fixture(scope="session")
def tiny_inpaint_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Like tiny_checkpoint, with a 9-channel (inpainting) UNet input (seed 1)."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny-inpainting.safetensors"
    return save_random_checkpoint(path, *tiny_configs(in_channels=9), seed=1)


@pytest.fixture(scope="session", params=sorted(CONFIGS))
def diffusers_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> DiffusersModel:
    name = request.param
    return write_diffusers_folder(name, tmp_path_factory.mktemp(name), CONFIGS[name])
