"""SDXL's conditioning beyond the text context: the pooled text embedding and the size and crop "micro-conditioning".

SDXL was trained on images of many sizes and random crops, and told the UNet both (Podell et al. 2023, section
2.2): ``original_size`` (the training image's size before resizing), ``crops_coords_top_left`` (where the crop
began) and ``target_size``, each as (height, width) or (top, left). Each of the six numbers gets a 256-wide
sinusoidal embedding (the timestep embedding's), and the 1536 values follow the second text encoder's pooled,
projected embedding (1280 for ViT-bigG) as the UNet's vector conditioning ``y`` [B, 2816], which ``label_emb``
turns into an addition to the timestep embedding. The refiner replaces ``target_size`` by one aesthetic score:
1280 + 5 x 256 = 2560.

Defaults, as diffusers' StableDiffusionXLPipeline: original and target size = the image size, crop (0, 0); the
negative (unconditional) rows use the same values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from model.requests import GenerationRequest
from model.tokenizer import PromptTokens
from model.unet import timestep_embedding

SDXL_TIME_EMBED_DIM = 256  # Fourier features per size / crop value (generative-models' ConcatTimestepEmbedderND)
SDXL_SCALING_FACTOR = 0.13025  # the SDXL VAE's latent scale (its config's scaling_factor)


@dataclass(frozen=True)
class SizeConditioning:
    """One request's micro-conditioning, in pixels: (height, width) sizes and the (top, left) crop corner."""

    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]

    @classmethod
    def default(cls, height: int, width: int) -> SizeConditioning:
        return cls((height, width), (0, 0), (height, width))

    def time_ids(self) -> list[float]:
        return [float(v) for v in (*self.original_size, *self.crop_top_left, *self.target_size)]


def time_ids_width(adm_in_channels: int, pooled_width: int) -> int:
    """How many values the vector conditioning of a UNet with ``adm_in_channels`` holds besides the pooled text."""
    extra = adm_in_channels - pooled_width
    if extra <= 0 or extra % SDXL_TIME_EMBED_DIM:
        raise ValueError(f"the UNet's vector conditioning is {adm_in_channels} wide: it cannot hold a "
                         f"{pooled_width}-wide pooled text embedding and {SDXL_TIME_EMBED_DIM}-wide time ids")
    return extra // SDXL_TIME_EMBED_DIM


def vector_conditioning(pooled: torch.Tensor, time_ids: Sequence[Sequence[float]]) -> torch.Tensor:
    """y [B, pooled + 256 x ids] from the pooled text embeddings [B, pooled] and each row's time ids."""
    ids = torch.tensor([list(row) for row in time_ids], dtype=torch.float32, device=pooled.device)  # [B, k]
    fourier = timestep_embedding(ids.flatten(), SDXL_TIME_EMBED_DIM).reshape(ids.shape[0], -1)  # [B, 256 k]
    return torch.cat([pooled.float(), fourier], dim=1)


def second_tokenizer_ids(ids: torch.Tensor, eos_id: int, pad_id: int) -> torch.Tensor:
    """The second tokenizer's ids [R, 77] from the first's: the same BPE vocabulary, but everything after the first
    EOS padded with ``pad_id`` (``!``, id 0, for ViT-bigG) instead of the first tokenizer's pad."""
    after_eos = (ids == eos_id).int().cumsum(dim=1) > 0
    after_eos &= ~((ids == eos_id) & (after_eos.int().cumsum(dim=1) == 1))  # keep the first EOS itself
    return torch.where(after_eos, torch.full_like(ids, pad_id), ids)


@torch.inference_mode()
def encode_text(
    text_encoder: torch.nn.Module | None, text_encoder_2: torch.nn.Module, ids: torch.Tensor, ids_2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's text context [R, 77, 768 + 1280] (each encoder's penultimate hidden state, no final layer norm) and the
    pooled embedding [R, 1280] (the second encoder's final-norm EOS state through its projection), as
    generative-models and diffusers' StableDiffusionXLPipeline compute them. The refiner has the second encoder
    only (``text_encoder`` None): its context is [R, 77, 1280]."""
    second = text_encoder_2(input_ids=ids_2, output_hidden_states=True)
    if text_encoder is None:
        return second.hidden_states[-2], second.text_embeds
    first = text_encoder(input_ids=ids, output_hidden_states=True)
    context = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    return context, second.text_embeds


def request_vectors(requests: Sequence[GenerationRequest], prompts: Sequence[PromptTokens],
                    negatives: Sequence[PromptTokens], pooled: dict[tuple[int, tuple[int, ...]], torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The vector conditioning per request, (cond, uncond) [N, adm]: the pooled embedding of each prompt's first
    chunk (as A1111 for long prompts; ``pooled`` by (request, chunk ids)) and the request's size conditioning, the
    same for both."""
    time_ids = []
    for r in requests:
        default = SizeConditioning.default(r.height, r.width)
        time_ids.append(SizeConditioning(r.original_size or default.original_size, r.crop_top_left,
                                         r.target_size or default.target_size).time_ids())
    cond = torch.stack([pooled[k, tuple(p.ids[0])] for k, p in enumerate(prompts)])
    uncond = torch.stack([pooled[k, tuple(p.ids[0])] for k, p in enumerate(negatives)])
    return vector_conditioning(cond, time_ids), vector_conditioning(uncond, time_ids)
