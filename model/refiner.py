"""SDXL's refiner as the second stage of a job: base and refiner share one noise schedule, as diffusers' "ensemble
of expert denoisers" (``denoising_end`` on the base, ``denoising_start`` on the refiner).

The refiner (``sd_xl_refiner_1.0``) is an SDXL UNet (384 channels, 4 levels, 4-deep transformers) conditioned on
OpenCLIP ViT-bigG alone (context 1280 wide) and on an aesthetic score instead of the target size: its vector ``y`` is
pooled ‖ Fourier(original_size, crop top-left, score), 1280 + 5 x 256 = 2560 values, with the score 6 for the
prompt's rows and 2.5 for the negative prompt's (diffusers' ``aesthetic_score`` / ``negative_aesthetic_score``).

A job asking for it runs its base steps down to ``switch_at`` of the schedule (the timesteps at or above
round(1000 · (1 - switch_at))), then the refiner's UNet runs the remaining steps on the same latents, each image
drawing its noise from the same generator, and the base's VAE decodes (the refiner ships the same SDXL VAE). Both
models live in one worker: the latents never leave it.

Checkpoints: a single file holds bigG under ``conditioner.embedders.0.model.`` (OpenCLIP layout), the UNet under
``model.diffusion_model.`` and a VAE (not loaded); a diffusers folder has ``unet/``, ``text_encoder_2/``,
``tokenizer_2/`` and no ``text_encoder/``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from model import diffusers_format, open_clip, single_file
from model.clip_config import state_dict_prefix
from model.network_parts import NetworkPart, check_parts, folder_part, materialize, read_json
from model.open_clip import PAD_TOKEN
from model.requests import GenerationRequest
from model.sdxl import encode_text as sdxl_encode_text
from model.sdxl import vector_conditioning
from model.single_file import HEADS_METADATA_KEY, UNET_PREFIX, VAE_PREFIX, CheckpointError
from model.tensor_reader import TensorReader
from model.text_encoding import TextContext, encode_prompts
from model.tokenizer import ClipTokenizer, PromptTokens
from model.unet import UNetModel
from model.vae import AutoencoderKL
from model.weights import save_original_layout

log = logging.getLogger(__name__)

REFINER_OPEN_CLIP_PREFIX = "conditioner.embedders.0.model."
AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5  # diffusers' defaults for the refiner


def is_refiner_checkpoint(path: Path) -> bool:
    """Whether ``path`` is an SDXL refiner (bigG alone), without loading it."""
    if path.is_dir():
        return (path / "text_encoder_2").is_dir() and not (path / "text_encoder").is_dir()
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    with ExitStack() as stack:
        reader = TensorReader()
        reader.add(path, stack, allow_pickle=False)
        return open_clip.has_open_clip(reader.shapes, REFINER_OPEN_CLIP_PREFIX)


@dataclass
class RefinerParts:
    unet: UNetModel
    text_encoder: CLIPTextModelWithProjection
    tokenizer: ClipTokenizer
    source: Path


def load_refiner(path: str | Path, *, device: torch.device, dtype: torch.dtype, text_dtype: torch.dtype,
                 allow_pickle: bool = False) -> RefinerParts:
    """The refiner's UNet and text encoder from a single file or a diffusers folder, strictly."""
    path = Path(path).expanduser()
    with ExitStack() as stack:
        parts, stray, tokenizer_dir = (_folder(path, stack, allow_pickle) if path.is_dir()
                                       else _single_file(path, stack, allow_pickle))
        check_parts(parts, stray, path)
        for part, part_dtype in zip(parts, (dtype, text_dtype), strict=True):
            materialize(part, device, part_dtype)
    unet, text = (part.module for part in parts)
    assert isinstance(unet, UNetModel) and isinstance(text, CLIPTextModelWithProjection)
    if not unet.config.adm_in_channels:
        raise CheckpointError(f"{path} is not an SDXL refiner: its UNet takes no vector conditioning")
    tokenizer = ClipTokenizer.from_folder(tokenizer_dir) if tokenizer_dir else ClipTokenizer.bundled(PAD_TOKEN)
    log.info("loaded the refiner %s to %s", path.name, device)
    return RefinerParts(unet, text, tokenizer, path)


def _single_file(path: Path, stack: ExitStack, allow_pickle: bool) -> tuple[list[NetworkPart], list[str], Path | None]:
    reader = TensorReader()
    reader.add(path, stack, allow_pickle)
    if not open_clip.has_open_clip(reader.shapes, REFINER_OPEN_CLIP_PREFIX):
        raise CheckpointError(f"{path} is not an SDXL refiner: no OpenCLIP text encoder under "
                              f"{REFINER_OPEN_CLIP_PREFIX}")
    groups = single_file.group_keys(reader.shapes)
    heads = json.loads(reader.metadata.get(HEADS_METADATA_KEY, "{}"))
    with torch.device("meta"):
        unet = UNetModel(single_file.infer_unet_config({k: reader.shapes[v] for k, v in groups.unet.items()}, heads))
        text = CLIPTextModelWithProjection(open_clip.config_from_open_clip(
            reader.shapes, REFINER_OPEN_CLIP_PREFIX, None, heads.get("text_2_num_attention_heads")))
    found = open_clip.open_clip_sources(reader.shapes, REFINER_OPEN_CLIP_PREFIX, text)
    parts = [
        NetworkPart("unet", unet, reader, groups.unet, [], lambda k: UNET_PREFIX + k),
        NetworkPart("text_encoder_2", text, reader, found.sources, found.unexpected,
              partial(open_clip.checkpoint_name, prefix=REFINER_OPEN_CLIP_PREFIX, model=text)),
    ]
    # the VAE is the base's (the same SDXL VAE): its tensors here are known and left
    stray = [n for n in groups.stray + list(groups.conditioner)
             if not n.startswith(REFINER_OPEN_CLIP_PREFIX) and not n.startswith(VAE_PREFIX)]
    return parts, stray, None


def _folder(path: Path, stack: ExitStack, allow_pickle: bool) -> tuple[list[NetworkPart], list[str], Path | None]:
    unet_config = diffusers_format.unet_config_from_diffusers(read_json(path / "unet" / "config.json"))
    with torch.device("meta"):
        unet = UNetModel(unet_config)
        text = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(
            read_json(path / "text_encoder_2" / "config.json")))
    names = diffusers_format.unet_renames(unet_config)
    back = diffusers_format.inverted(names)
    prefix = state_dict_prefix(text)
    parts = [
        folder_part("unet", unet, path, partial(diffusers_format.rename, renames=names),
                     lambda k: diffusers_format.rename(k, back) or k, stack, allow_pickle),
        folder_part("text_encoder_2", text, path,
                     lambda k: k if k.startswith("text_projection.") else prefix + k.removeprefix("text_model."),
                     lambda k: k, stack, allow_pickle),
    ]
    tokenizer = path / "tokenizer_2"
    return parts, [], tokenizer if tokenizer.is_dir() else None


def save_refiner_file(parts: RefinerParts, vae: AutoencoderKL, path: str | Path) -> Path:
    """Write a refiner as one .safetensors file in the original layout (bigG as embedder 0, the UNet, the VAE)."""
    return save_original_layout(Path(path), parts.unet, vae, None, parts.text_encoder,
                                open_clip_prefix=REFINER_OPEN_CLIP_PREFIX)


class Refiner:
    """A loaded refiner: its text context and vector conditioning for a batch, and its UNet."""

    def __init__(self, parts: RefinerParts, device: torch.device, dtype: torch.dtype, name: str) -> None:
        self.unet = parts.unet
        self.text_encoder = parts.text_encoder
        self.tokenizer = parts.tokenizer
        self.device, self.dtype, self.name = device, dtype, name

    def condition(self, requests: Sequence[GenerationRequest]) -> tuple[TextContext, torch.Tensor, torch.Tensor]:
        """(text context, y, y_uncond) of ``requests`` for the refiner."""
        pooled: dict[tuple[int, ...], torch.Tensor] = {}

        def rows(ids: torch.Tensor, owners: Sequence[int]) -> torch.Tensor:
            ids = ids.to(self.device)
            context, pooled_rows = sdxl_encode_text(None, self.text_encoder, ids, ids)
            pooled.update(zip(map(tuple, ids.tolist()), pooled_rows.float(), strict=True))
            return context.to(self.dtype)

        text = encode_prompts(self.tokenizer, rows, [r.prompt for r in requests],
                              [r.negative_prompt for r in requests])
        y = self._vectors(requests, text.prompts, pooled, AESTHETIC_SCORE)
        y_uncond = self._vectors(requests, text.negatives, pooled, NEGATIVE_AESTHETIC_SCORE)
        return text, y, y_uncond

    @staticmethod
    def _vectors(requests: Sequence[GenerationRequest], tokens: Sequence[PromptTokens],
                 pooled: dict[tuple[int, ...], torch.Tensor], score: float) -> torch.Tensor:
        time_ids = [[*(r.original_size or (r.height, r.width)), *r.crop_top_left, score] for r in requests]
        return vector_conditioning(torch.stack([pooled[tuple(t.ids[0])] for t in tokens]), time_ids)
