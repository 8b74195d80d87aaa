"""The original (LDM) single-file checkpoint layout: key prefixes, training leftovers to skip, and the
architecture read back from tensor shapes (what ``v1-5-pruned-emaonly.safetensors`` and fine-tunes of it hold)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from transformers import CLIPTextConfig

from model.clip_config import clip_text_config
from model.unet import UNetConfig
from model.vae import VAEConfig

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."  # then "text_model." in all but the oldest checkpoints
TEXT_MODEL_PREFIX = TEXT_PREFIX + "text_model."
# SDXL: CLIP ViT-L in transformers' layout, then OpenCLIP ViT-bigG (the refiner: bigG alone, as embedder 0)
SDXL_TEXT_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
CONDITIONER_PREFIX = "conditioner.embedders."
SD1_SCALING_FACTOR = 0.18215
# Head counts cannot be read from tensor shapes; files written by our checkpoint writer record them here.
HEADS_METADATA_KEY = "sdqueue.attention_heads"

# Training-only tensors that single-file checkpoints carry: the diffusion schedule (ours comes from the sampler
# config), EMA copies, the VAE's training loss (LPIPS, discriminator) and CLIP's constant position ids.
_IGNORED = re.compile(
    r"betas|alphas_cumprod(_prev)?|sqrt_\w+|log_one_minus_alphas_cumprod|posterior_\w+|logvar|lvlb_weights"
    r"|model_ema\..+|first_stage_model\.loss\..+"
    r"|(cond_stage_model|conditioner\.embedders\.\d+)\.transformer\.(text_model\.)?embeddings\.position_ids"
)

Shapes = Mapping[str, tuple[int, ...]]
_FIXED_HEAD_SIZE_CONTEXTS = (1024, 1280, 2048)  # SD 2.x (OpenCLIP ViT-H), SDXL refiner (bigG), SDXL base (L + bigG)


class CheckpointError(ValueError):
    """The checkpoint cannot be loaded into SD 1.x networks; the message says which tensors or files and why."""


@dataclass
class KeyGroups:
    """A checkpoint's tensor names by network, each as {name below the network's prefix: full name}."""

    unet: dict[str, str] = field(default_factory=dict)
    vae: dict[str, str] = field(default_factory=dict)
    text: dict[str, str] = field(default_factory=dict)  # below "text_model.", whether or not the file has it
    conditioner: dict[str, str] = field(default_factory=dict)  # SDXL's text encoders: full name -> full name
    stray: list[str] = field(default_factory=list)  # belong to no network and are no known leftover


def group_keys(names: Iterable[str]) -> KeyGroups:
    groups = KeyGroups()
    for name in names:
        if _IGNORED.fullmatch(name):
            continue
        if name.startswith(UNET_PREFIX):
            groups.unet[name.removeprefix(UNET_PREFIX)] = name
        elif name.startswith(VAE_PREFIX):
            groups.vae[name.removeprefix(VAE_PREFIX)] = name
        elif name.startswith(TEXT_PREFIX):
            groups.text[name.removeprefix(TEXT_PREFIX).removeprefix("text_model.")] = name
        elif name.startswith(CONDITIONER_PREFIX):
            groups.conditioner[name] = name
        else:
            groups.stray.append(name)
    return groups


def _need(shapes: Shapes, key: str, prefix: str) -> tuple[int, ...]:
    if key not in shapes:
        raise CheckpointError(
            f"cannot infer the network: tensor {prefix}{key} is missing (is this an SD 1.x checkpoint?)"
        )
    return shapes[key]


def _count(shapes: Shapes, prefix: str) -> int:
    """How many numbered children (prefix0., prefix1., ...) the keys have."""
    return len({k[len(prefix):].split(".")[0] for k in shapes if k.startswith(prefix)})


def infer_unet_config(s: Shapes, heads: Mapping[str, int], upcast_attention: bool = False) -> UNetConfig:
    """From the shapes of the keys below ``model.diffusion_model.``; ``heads`` = recorded head counts, if any."""

    def need(key: str) -> tuple[int, ...]:
        return _need(s, key, UNET_PREFIX)

    model_channels, in_channels = need("input_blocks.0.0.weight")[:2]
    levels: list[list[int]] = [[]]  # input block indices of each level's res blocks
    for i in range(1, _count(s, "input_blocks.")):
        if f"input_blocks.{i}.0.op.weight" in s:
            levels.append([])
        else:
            levels[-1].append(i)
    if not all(levels):
        raise CheckpointError(f"cannot infer the network: a UNet level has no res blocks ({UNET_PREFIX}input_blocks)")
    context_dim = need("middle_block.1.transformer_blocks.0.attn2.to_k.weight")[1]
    attention = [i for i, b in enumerate(levels) if f"input_blocks.{b[0]}.1.norm.weight" in s]
    label = s.get("label_emb.0.0.weight")  # SDXL's vector conditioning
    guidance = s.get("time_embedding.cond_proj.weight")  # LCM-distilled (kept in diffusers' name by converters)
    # SD 1.x fixes 8 heads; SD 2.x and SDXL (base and refiner) fix 64 channels per head. Shapes cannot tell: the
    # context width does.
    return UNetConfig(
        in_channels=in_channels,
        out_channels=need("out.2.weight")[0],
        model_channels=model_channels,
        channel_mult=tuple(need(f"input_blocks.{b[0]}.0.out_layers.3.weight")[0] // model_channels for b in levels),
        num_res_blocks=len(levels[0]),
        attention_resolutions=tuple(2**i for i in attention),
        num_heads=heads.get("unet_num_heads", 8),
        num_head_channels=heads.get("unet_num_head_channels", 64 if context_dim in _FIXED_HEAD_SIZE_CONTEXTS else -1),
        transformer_depth=tuple(_count(s, f"input_blocks.{b[0]}.1.transformer_blocks.") for b in levels),
        transformer_depth_middle=_count(s, "middle_block.1.transformer_blocks."),
        context_dim=context_dim,
        use_linear_in_transformer=len(need("middle_block.1.proj_in.weight")) == 2,
        upcast_attention=upcast_attention,
        adm_in_channels=label[1] if label is not None else 0,
        time_cond_proj_dim=guidance[1] if guidance is not None else 0,
    )


def infer_vae_config(s: Shapes) -> VAEConfig:
    """From the shapes of the keys below ``first_stage_model.``."""

    def need(key: str) -> tuple[int, ...]:
        return _need(s, key, VAE_PREFIX)

    ch, in_channels = need("encoder.conv_in.weight")[:2]
    levels = _count(s, "encoder.down.")
    return VAEConfig(
        in_channels=in_channels,
        out_channels=need("decoder.conv_out.weight")[0],
        ch=ch,
        ch_mult=tuple(need(f"encoder.down.{i}.block.0.conv1.weight")[0] // ch for i in range(levels)),
        num_res_blocks=_count(s, "encoder.down.0.block."),
        z_channels=need("decoder.conv_in.weight")[1],
        embed_dim=need("post_quant_conv.weight")[1],
    )


def infer_clip_config(s: Shapes, heads: Mapping[str, int], prefix: str = TEXT_MODEL_PREFIX) -> CLIPTextConfig:
    """From the shapes of the keys below ``prefix`` (``cond_stage_model.transformer.text_model.``)."""

    def need(key: str) -> tuple[int, ...]:
        return _need(s, key, prefix)

    vocab_size, hidden_size = need("embeddings.token_embedding.weight")
    return clip_text_config(
        hidden_size=hidden_size,
        num_hidden_layers=_count(s, "encoder.layers."),
        num_attention_heads=heads.get("text_num_attention_heads"),  # None: CLIP's one head per 64 channels
        intermediate_size=need("encoder.layers.0.mlp.fc1.weight")[0],
        vocab_size=vocab_size,
        max_position_embeddings=need("embeddings.position_embedding.weight")[0],
    )
