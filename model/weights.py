"""Loading SD checkpoints (1.x, 2.x, SDXL) from a local path: a single file in the original layout, or a diffusers
folder.

Networks are built on the meta device and every tensor is read on its own, converted, moved to the target device
and assigned, so loading never holds a second copy of the model. Loading is strict: any missing, unexpected or
mis-shaped tensor is an error that names them.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from model import diffusers_format, open_clip, single_file
from model.clip_config import clip_text_config, state_dict_prefix
from model.cpu_pack import ChosenLayer
from model.network_parts import NetworkPart, check_parts, folder_part, materialize, read_json
from model.sdxl import SDXL_SCALING_FACTOR
from model.single_file import (
    HEADS_METADATA_KEY,
    SD1_SCALING_FACTOR,
    SDXL_OPEN_CLIP_PREFIX,
    SDXL_TEXT_PREFIX,
    TEXT_MODEL_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    CheckpointError,
)
from model.tensor_reader import TensorReader
from model.unet import UNetConfig, UNetModel
from model.vae import AutoencoderKL, VAEConfig

log = logging.getLogger(__name__)

@dataclass
class Components:
    """Everything a pipeline needs from one checkpoint, ready on its device, in eval mode, without gradients."""

    unet: UNetModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    unet_config: UNetConfig
    vae_config: VAEConfig
    scaling_factor: float  # latent = vae.encode(x).mean * scaling_factor
    tokenizer_dir: Path | None  # a diffusers folder's tokenizer/, else None (use the packaged vocabulary)
    scheduler_config: dict[str, Any] | None  # a diffusers folder's scheduler_config.json, else None
    source: Path
    # SDXL: the second text encoder (OpenCLIP ViT-bigG with its projection) and its tokenizer folder
    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2_dir: Path | None = None

    @property
    def is_sdxl(self) -> bool:
        """SDXL: two text encoders and the vector conditioning (``model/sdxl.py``)."""
        return self.unet_config.adm_in_channels > 0

    @property
    def is_inpaint(self) -> bool:
        """An inpainting UNet takes latent + mask + masked-image latent: 4 + 1 + 4 input channels."""
        return self.unet_config.in_channels == 9


def _build(unet: UNetConfig, vae: VAEConfig, text: CLIPTextConfig) -> tuple[UNetModel, AutoencoderKL, CLIPTextModel]:
    with torch.device("meta"):  # shapes only: no memory, no random init
        return UNetModel(unet), AutoencoderKL(vae), CLIPTextModel(text)


def _sdxl_single_file(reader: TensorReader, groups: single_file.KeyGroups, heads: Mapping[str, int]
                      ) -> tuple[list[NetworkPart], list[str], dict[str, Any]]:
    """SDXL's original layout: CLIP ViT-L under ``conditioner.embedders.0.transformer.`` and OpenCLIP ViT-bigG
    (all its layers, with the projection) under ``conditioner.embedders.1.model.``."""
    text_model = SDXL_TEXT_PREFIX + "text_model."
    clip_shapes = {k.removeprefix(text_model): v for k, v in reader.shapes.items() if k.startswith(text_model)}
    with torch.device("meta"):
        unet = UNetModel(single_file.infer_unet_config({k: reader.shapes[v] for k, v in groups.unet.items()}, heads))
        vae = AutoencoderKL(single_file.infer_vae_config({k: reader.shapes[v] for k, v in groups.vae.items()}))
        text = CLIPTextModel(single_file.infer_clip_config(clip_shapes, heads, text_model))
        text_2 = CLIPTextModelWithProjection(open_clip.config_from_open_clip(
            reader.shapes, SDXL_OPEN_CLIP_PREFIX, None, heads.get("text_2_num_attention_heads")))
    text_prefix = state_dict_prefix(text)
    found = open_clip.open_clip_sources(reader.shapes, SDXL_OPEN_CLIP_PREFIX, text_2)
    unexpected = [k for k in groups.conditioner
                  if not k.startswith(text_model) and not k.startswith(SDXL_OPEN_CLIP_PREFIX)]
    parts = [
        NetworkPart("unet", unet, reader, groups.unet, [], lambda k: UNET_PREFIX + k),
        NetworkPart("vae", vae, reader, groups.vae, [], lambda k: VAE_PREFIX + k),
        NetworkPart("text_encoder", text, reader, {text_prefix + k: text_model + k for k in clip_shapes}, unexpected,
              lambda k: text_model + k.removeprefix(text_prefix)),
        NetworkPart("text_encoder_2", text_2, reader, found.sources, found.unexpected,
              partial(open_clip.checkpoint_name, prefix=SDXL_OPEN_CLIP_PREFIX, model=text_2)),
    ]
    return parts, list(groups.stray) + list(groups.text.values()), {
        "scaling_factor": SDXL_SCALING_FACTOR, "tokenizer_dir": None, "scheduler_config": None,
    }


def _single_file(path: Path, stack: ExitStack, allow_pickle: bool
                 ) -> tuple[list[NetworkPart], list[str], dict[str, Any]]:
    reader = TensorReader()
    reader.add(path, stack, allow_pickle)
    groups = single_file.group_keys(reader.shapes)
    if open_clip.has_open_clip(reader.shapes, "conditioner.embedders.0.model."):
        raise CheckpointError(f"{path} is an SDXL refiner (OpenCLIP ViT-bigG alone): it runs as a second stage "
                              "beside an SDXL base model (SDQ_REFINER_CHECKPOINT), not on its own")
    if groups.conditioner:
        return _sdxl_single_file(reader, groups, json.loads(reader.metadata.get(HEADS_METADATA_KEY, "{}")))
    unet_shapes, vae_shapes, text_shapes = ({k: reader.shapes[v] for k, v in g.items()}
                                            for g in (groups.unet, groups.vae, groups.text))
    heads = json.loads(reader.metadata.get(HEADS_METADATA_KEY, "{}"))
    # SD 2.x: an OpenCLIP text encoder, of which the last layer goes unused (model/open_clip.py)
    sd2 = open_clip.has_open_clip(reader.shapes, open_clip.SD2_PREFIX) and not groups.text
    unet, vae, text = _build(
        # the original SD 2 code computes every q·k in fp32 (its ATTN_PRECISION default)
        single_file.infer_unet_config(unet_shapes, heads, upcast_attention=sd2),
        single_file.infer_vae_config(vae_shapes),
        open_clip.config_from_open_clip(reader.shapes, open_clip.SD2_PREFIX, -1, heads.get("text_num_attention_heads"))
        if sd2 else single_file.infer_clip_config(text_shapes, heads),
    )
    text_prefix = state_dict_prefix(text)
    stray = groups.stray
    if sd2:
        found = open_clip.open_clip_sources(reader.shapes, open_clip.SD2_PREFIX, text)
        text_part = NetworkPart("text_encoder", text, reader, found.sources, found.unexpected,
                          partial(open_clip.checkpoint_name, prefix=open_clip.SD2_PREFIX, model=text))
        stray = [name for name in stray if not name.startswith(open_clip.SD2_PREFIX)]
    else:
        text_part = NetworkPart("text_encoder", text, reader, {text_prefix + k: v for k, v in groups.text.items()}, [],
                          lambda k: TEXT_MODEL_PREFIX + k.removeprefix(text_prefix))
    parts = [
        NetworkPart("unet", unet, reader, groups.unet, [], lambda k: UNET_PREFIX + k),
        NetworkPart("vae", vae, reader, groups.vae, [], lambda k: VAE_PREFIX + k),
        text_part,
    ]
    return parts, stray, {"scaling_factor": SD1_SCALING_FACTOR, "tokenizer_dir": None, "scheduler_config": None}


def _diffusers_folder(
    path: Path, stack: ExitStack, allow_pickle: bool
) -> tuple[list[NetworkPart], list[str], dict[str, Any]]:
    if (path / "text_encoder_2").is_dir() and not (path / "text_encoder").is_dir():
        raise CheckpointError(f"{path} is an SDXL refiner (text_encoder_2 alone): it runs as a second stage beside "
                              "an SDXL base model (SDQ_REFINER_CHECKPOINT), not on its own")
    vae_json = read_json(path / "vae" / "config.json")
    unet_config = diffusers_format.unet_config_from_diffusers(read_json(path / "unet" / "config.json"))
    vae_config = diffusers_format.vae_config_from_diffusers(vae_json)
    text_config = CLIPTextConfig.from_dict(read_json(path / "text_encoder" / "config.json"))
    unet, vae, text = _build(unet_config, vae_config, text_config)

    unet_names, vae_names = diffusers_format.unet_renames(unet_config), diffusers_format.vae_renames(vae_config)
    unet_back, vae_back = diffusers_format.inverted(unet_names), diffusers_format.inverted(vae_names)
    text_prefix = state_dict_prefix(text)
    parts = [
        folder_part("unet", unet, path, partial(diffusers_format.rename, renames=unet_names),
                     lambda k: diffusers_format.rename(k, unet_back) or k, stack, allow_pickle),
        folder_part("vae", vae, path, partial(diffusers_format.rename, renames=vae_names),
                     lambda k: diffusers_format.rename(k, vae_back) or k, stack, allow_pickle),
        # transformers has saved CLIPTextModel with and without the "text_model." level
        folder_part("text_encoder", text, path, lambda k: text_prefix + k.removeprefix("text_model."),
                     lambda k: k, stack, allow_pickle),
    ]
    if unet_config.adm_in_channels:  # SDXL: the second text encoder, CLIPTextModelWithProjection
        with torch.device("meta"):
            text_2 = CLIPTextModelWithProjection(
                CLIPTextConfig.from_dict(read_json(path / "text_encoder_2" / "config.json")))
        prefix_2 = state_dict_prefix(text_2)
        parts.append(folder_part(
            "text_encoder_2", text_2, path,
            lambda k: k if k.startswith("text_projection.") else prefix_2 + k.removeprefix("text_model."),
            lambda k: k, stack, allow_pickle))
    scheduler = path / "scheduler" / "scheduler_config.json"
    return parts, [], {
        "scaling_factor": float(vae_json.get("scaling_factor", SD1_SCALING_FACTOR)),
        "tokenizer_dir": path / "tokenizer" if (path / "tokenizer").is_dir() else None,
        "scheduler_config": json.loads(scheduler.read_text()) if scheduler.is_file() else None,
        "tokenizer_2_dir": path / "tokenizer_2" if (path / "tokenizer_2").is_dir() else None,
    }


def load_components(
    path: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype | None = None,
    text_dtype: torch.dtype | None = None,
    allow_pickle: bool = False,
) -> Components:
    """Load an SD 1.x checkpoint (single .safetensors file, or diffusers folder) from a local path.

    ``dtype`` applies to the UNet, and to the VAE and text encoder unless ``vae_dtype`` / ``text_dtype`` are given.
    Pickle checkpoints (.ckpt, .pt, .bin) are refused unless ``allow_pickle``; even then nothing but tensors loads.
    """
    path, device = Path(path).expanduser(), torch.device(device)
    started = time.perf_counter()
    with ExitStack() as stack:
        if path.is_dir():
            parts, stray, extras = _diffusers_folder(path, stack, allow_pickle)
        elif path.is_file():
            parts, stray, extras = _single_file(path, stack, allow_pickle)
        else:
            raise FileNotFoundError(f"checkpoint not found: {path} (a .safetensors file or a diffusers folder)")
        check_parts(parts, stray, path)
        dtypes = (dtype, vae_dtype or dtype, text_dtype or dtype, text_dtype or dtype)
        for part, part_dtype in zip(parts, dtypes[: len(parts)], strict=True):
            materialize(part, device, part_dtype)
    unet, vae, text, *more = (part.module for part in parts)
    assert isinstance(unet, UNetModel) and isinstance(vae, AutoencoderKL) and isinstance(text, CLIPTextModel)
    text_2 = more[0] if more else None
    assert text_2 is None or isinstance(text_2, CLIPTextModelWithProjection)
    log.info("loaded %s (%s%s UNet inputs) to %s in %.1fs", path.name, "SDXL, " if text_2 is not None else "",
             unet.config.in_channels, device, time.perf_counter() - started)
    return Components(unet=unet, vae=vae, text_encoder=text, unet_config=unet.config, vae_config=vae.config,
                      source=path, text_encoder_2=text_2, **extras)


def save_original_layout(path: Path, unet: UNetModel, vae: AutoencoderKL, text_encoder: CLIPTextModel | None,
                         text_encoder_2: CLIPTextModelWithProjection | None = None,
                         open_clip_prefix: str = SDXL_OPEN_CLIP_PREFIX) -> Path:
    """The original layout; an OpenCLIP (GELU) text encoder as SD 2.x holds it, with its unused last layer; SDXL's
    two under ``conditioner.embedders.``; the SDXL refiner's bigG alone (``text_encoder`` None) under
    ``open_clip_prefix``."""
    tensors = {UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
    tensors |= {VAE_PREFIX + k: v for k, v in vae.state_dict().items()}
    extra_heads = {}
    if text_encoder is None:
        assert text_encoder_2 is not None, "a checkpoint needs a text encoder"
        tensors |= open_clip.to_open_clip(text_encoder_2, open_clip_prefix)
        heads = {"unet_num_heads": unet.config.num_heads, "unet_num_head_channels": unet.config.num_head_channels,
                 "text_2_num_attention_heads": text_encoder_2.config.num_attention_heads}
        return _write(path, tensors, heads)
    text_prefix = state_dict_prefix(text_encoder)
    if text_encoder_2 is not None:
        tensors |= {SDXL_TEXT_PREFIX + "text_model." + k.removeprefix(text_prefix): v
                    for k, v in text_encoder.state_dict().items()}
        tensors |= open_clip.to_open_clip(text_encoder_2, SDXL_OPEN_CLIP_PREFIX)
        extra_heads = {"text_2_num_attention_heads": text_encoder_2.config.num_attention_heads}
    elif open_clip.uses_open_clip(text_encoder.config):
        tensors |= open_clip.to_open_clip(text_encoder, open_clip.SD2_PREFIX, unused_layers=1)
    else:
        tensors |= {TEXT_MODEL_PREFIX + k.removeprefix(text_prefix): v
                    for k, v in text_encoder.state_dict().items()}
    heads = {"unet_num_heads": unet.config.num_heads, "unet_num_head_channels": unet.config.num_head_channels,
             "text_num_attention_heads": text_encoder.config.num_attention_heads, **extra_heads}
    return _write(path, tensors, heads)


def _write(path: Path, tensors: Mapping[str, torch.Tensor], heads: Mapping[str, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path),
              metadata={"format": "pt", HEADS_METADATA_KEY: json.dumps(heads)})
    return path


def save_single_file(components: Components, path: str | Path) -> Path:
    """Write loaded components as one .safetensors file in the original (LDM) layout, e.g. to convert a folder.
    Components a CPU pipeline has packed (``model/cpu_pack.py``) keep only their packed weights: refused."""
    networks = (components.unet, components.vae, components.text_encoder, components.text_encoder_2)
    if any(isinstance(m, ChosenLayer) for net in networks if net is not None for m in net.modules()):
        raise ValueError("these components hold packed CPU weights (a loaded pipeline's): save the components "
                         "load_components returns instead")
    return save_original_layout(Path(path), components.unet, components.vae, components.text_encoder,
                                components.text_encoder_2)


def save_random_checkpoint(
    path: str | Path, unet_config: UNetConfig, vae_config: VAEConfig, clip_config: CLIPTextConfig, *, seed: int = 0
) -> Path:
    """Write a randomly initialised single-file checkpoint (for tests and the no-download demo).

    PyTorch's default init (and CLIP's), where unlike LDM training no layer starts at zero, plus small noise on
    every norm scale and bias, so that outputs depend on every input and every tensor.
    """
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        networks = UNetModel(unet_config), AutoencoderKL(vae_config), CLIPTextModel(clip_config)
        for network in networks:
            for param in network.parameters():
                if param.ndim == 1:
                    param.add_(0.1 * torch.randn_like(param))
    return save_original_layout(Path(path), *networks)


def tiny_configs(in_channels: int = 4) -> tuple[UNetConfig, VAEConfig, CLIPTextConfig]:
    """The smallest configs with every part of the real architecture (tests). The VAE keeps 4 levels, so the
    latent is H/8 x W/8 as in SD; CLIP keeps the real 49,408-token vocabulary and 77 positions."""
    return (
        UNetConfig(in_channels=in_channels, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                   attention_resolutions=(1, 2), num_heads=2, context_dim=32),
        VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1),
        clip_text_config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64),
    )


def demo_configs() -> tuple[UNetConfig, VAEConfig, CLIPTextConfig]:
    """Small configs for the random-weights demo: a 256x256 image in seconds on a CPU."""
    return (
        UNetConfig(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(2, 4),
                   num_heads=4, context_dim=128),
        VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1),
        clip_text_config(hidden_size=128, num_hidden_layers=4, num_attention_heads=4),
    )
