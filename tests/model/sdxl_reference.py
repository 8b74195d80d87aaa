"""A tiny SDXL diffusers folder, written by ``StableDiffusionXLPipeline.save_pretrained``: a UNet whose levels have
different transformer depths (none, 1, 2; the middle block 2), the "text_time" added conditioning, two text encoders
(CLIP-style with QuickGELU; OpenCLIP-style with GELU and a projection) whose widths add up to the cross-attention
width, two tokenizers (padding with the end token, and with ``!``) and a VAE with SDXL's scaling factor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, TCDScheduler
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from model.clip_config import clip_text_config
from model.sdxl import SDXL_SCALING_FACTOR
from model.weights import tiny_configs
from tests.model.conftest import diffusers_vae_kwargs
from tests.model.reference import SD15_SCHEDULER
from tests.model.saved_pipeline import clip_tokenizer
from tests.model.sd2_reference import SCHEDULERS, sd2_tokenizer

WIDTH_1, WIDTH_2 = 32, 32  # the two text encoders; the UNet's context is both
POOLED = 32  # the second encoder's projection
SDXL_SCHEDULER = {"_class_name": "EulerDiscreteScheduler", **SD15_SCHEDULER, "interpolation_type": "linear",
                  "timestep_spacing": "leading"}


def sdxl_unet(in_channels: int = 4) -> diffusers.UNet2DConditionModel:
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=WIDTH_1 + WIDTH_2, attention_head_dim=(2, 4, 4), transformer_layers_per_block=(1, 1, 2),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=POOLED + 6 * 256,
    )


def text_encoders() -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    first = CLIPTextModel(clip_text_config(hidden_size=WIDTH_1, num_hidden_layers=3, num_attention_heads=4,
                                           intermediate_size=64))
    second = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, hidden_size=WIDTH_2, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=POOLED,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=0))
    return first, second


def sdxl_pipeline(seed: int = 0, in_channels: int = 4) -> StableDiffusionXLPipeline:
    _, vae_config, _ = tiny_configs()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        unet = sdxl_unet(in_channels).eval()
        vae = diffusers.AutoencoderKL(**diffusers_vae_kwargs(vae_config), scaling_factor=SDXL_SCALING_FACTOR).eval()
        text_encoder, text_encoder_2 = (m.eval() for m in text_encoders())
        for module in (unet, vae, text_encoder, text_encoder_2):  # norms start as the identity: perturb them
            for p in module.parameters():
                if p.ndim == 1:
                    p.add_(0.1 * torch.randn_like(p))
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=clip_tokenizer(),
        tokenizer_2=sd2_tokenizer(), unet=unet, scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
    )


def save_sdxl_folder(folder: Path, seed: int = 0, in_channels: int = 4) -> Path:
    """``in_channels`` 9: an inpainting UNet (latents, mask, masked-image latents), as SDXL inpainting 0.1."""
    sdxl_pipeline(seed, in_channels).save_pretrained(folder)
    return folder


def reference(cls: type[Any], folder: Path, sampler: str, karras: bool = False) -> Any:
    """diffusers' SDXL pipeline ``cls`` from ``folder``, with the sampler's scheduler made from the folder's config."""
    pipe: Any = cls.from_pretrained(folder, local_files_only=True)
    options: dict[str, Any] = {"use_karras_sigmas": True} if karras else {}
    if sampler in ("lcm", "tcd"):
        options = {"original_inference_steps": 50}
    schedulers = {**SCHEDULERS, "tcd": TCDScheduler}
    pipe.scheduler = schedulers[sampler].from_config(pipe.scheduler.config, **options)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def refiner_unet() -> diffusers.UNet2DConditionModel:
    """The refiner's shape, tiny: another width, 2-deep transformers on both attention levels, bigG's context alone,
    and the aesthetic score in place of the target size (5 time ids)."""
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 96), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=WIDTH_2, attention_head_dim=(2, 4, 6), transformer_layers_per_block=2,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=POOLED + 5 * 256,
    )


def save_refiner_folder(folder: Path, base: Path, seed: int = 0) -> Path:
    """A refiner folder sharing the base's VAE and second text encoder, as diffusers' base + refiner example."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    base_pipe = StableDiffusionXLPipeline.from_pretrained(base, local_files_only=True)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        unet = refiner_unet().eval()
        for p in unet.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    StableDiffusionXLImg2ImgPipeline(
        vae=base_pipe.vae, text_encoder=None, text_encoder_2=base_pipe.text_encoder_2, tokenizer=None,
        tokenizer_2=base_pipe.tokenizer_2, unet=unet, scheduler=base_pipe.scheduler, requires_aesthetics_score=True,
    ).save_pretrained(folder)
    return folder
