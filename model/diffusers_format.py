"""Reading diffusers-format model folders: their config.json files, weight file names and tensor names.

diffusers names the same SD 1.x networks differently (``down_blocks.0.resnets.0.norm1`` for the original
``input_blocks.1.0.in_layers.0``). The rename tables here are generated from our config, one entry per module path,
so any number of levels, res blocks and attention levels maps without a hand-written table. A tensor name is
renamed by its longest module-path prefix found in the table; the rest of the name (``weight``, or the inside of a
transformer block, whose names agree) is kept.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from model.sdxl import SDXL_TIME_EMBED_DIM
from model.single_file import CheckpointError
from model.tensor_reader import refuse_pickle
from model.unet import GROUPS, UNetConfig
from model.vae import VAEConfig

# Config values that would change the network; ours only builds these. A key absent from config.json takes
# diffusers' default, which is the value listed.
_UNET_FIXED: dict[str, Any] = {
    "time_embedding_type": "positional", "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu",
    "norm_num_groups": GROUPS, "norm_eps": 1e-5, "class_embed_type": None,
    "encoder_hid_dim": None, "mid_block_type": "UNetMidBlock2DCrossAttn",
    "conv_in_kernel": 3, "conv_out_kernel": 3, "resnet_time_scale_shift": "default", "dual_cross_attention": False,
    "only_cross_attention": False, "center_input_sample": False, "downsample_padding": 1, "mid_block_scale_factor": 1,
    "num_class_embeds": None, "time_embedding_act_fn": None, "timestep_post_act": None, "time_embedding_dim": None,
    "encoder_hid_dim_type": None, "attention_type": "default", "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0, "cross_attention_norm": None, "reverse_transformer_layers_per_block": None,
}
_VAE_FIXED: dict[str, Any] = {
    "act_fn": "silu", "norm_num_groups": GROUPS, "mid_block_add_attention": True, "use_quant_conv": True,
    "use_post_quant_conv": True, "shift_factor": None, "latents_mean": None, "latents_std": None,
}

_UNET_RESNET = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_ATTN_LEGACY = {"query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}  # diffusers < 0.14 folders


def weight_files(folder: Path, stem: str, pickle_stem: str, allow_pickle: bool) -> list[Path]:
    """The weight files of one component, as diffusers' and transformers' ``save_pretrained`` name them.

    ``{stem}.safetensors``; sharded: ``{stem}.safetensors.index.json`` naming ``{stem}-00001-of-00002.safetensors``
    ...; the fp16 variant puts ``fp16`` before the last suffix: ``{stem}.fp16.safetensors``, sharded
    ``{stem}.safetensors.index.fp16.json``. ``{pickle_stem}.bin`` likewise with ``safe_serialization=False``.
    Preferred in that order: safetensors, full precision, whole files.
    """
    for name, suffix in ((stem, "safetensors"), (pickle_stem, "bin")):
        for variant in ("", ".fp16"):
            files = [folder / f"{name}{variant}.{suffix}"]
            index = folder / f"{name}.{suffix}.index{variant}.json"
            if not files[0].is_file():
                if not index.is_file():
                    continue
                files = _shards(index)
            if suffix == "bin":
                refuse_pickle(files[0], allow_pickle)
            return files
    found = ", ".join(sorted(p.name for p in folder.iterdir())) if folder.is_dir() else "nothing (no such folder)"
    raise CheckpointError(
        f"{folder}: no weights found; expected {stem}.safetensors (or its .fp16 variant, or a sharded "
        f"{stem}.safetensors.index.json); the folder holds {found}"
    )


def _shards(index: Path) -> list[Path]:
    weight_map = json.loads(index.read_text()).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: a sharded weights index needs a non-empty weight_map")
    shards = [index.parent / name for name in sorted(set(weight_map.values()))]
    missing = [shard.name for shard in shards if not shard.is_file()]
    if missing:
        raise CheckpointError(f"{index} names shards that are not in the folder: {', '.join(missing)}")
    return shards


def _check_fixed(cfg: Mapping[str, Any], fixed: Mapping[str, Any], what: str) -> None:
    for key, expected in fixed.items():
        value = cfg.get(key, expected)
        values = value if isinstance(value, list) else [value]
        if any(v != expected for v in values):
            raise CheckpointError(f"{what} config: {key}={value!r} is not supported (SD 1.x needs {expected!r})")


def _one(cfg: Mapping[str, Any], key: str, default: Any, what: str) -> Any:
    """A per-level setting that our networks keep the same on every level."""
    value = cfg.get(key, default)
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise CheckpointError(f"{what} config: {key}={value} differs between levels, which is not supported")
        return value[0]
    return value


def _channel_mult(block_out_channels: list[int], what: str) -> tuple[int, tuple[int, ...]]:
    base = block_out_channels[0]
    if any(c % base for c in block_out_channels):
        raise CheckpointError(f"{what} config: block_out_channels={block_out_channels} must be multiples of the first")
    return base, tuple(c // base for c in block_out_channels)


def _vector_conditioning(cfg: Mapping[str, Any]) -> int:
    """SDXL's added conditioning (``addition_embed_type`` "text_time"): the width of ``y``, 0 without one."""
    kind = cfg.get("addition_embed_type")
    if kind is None:
        return 0
    if kind != "text_time":
        raise CheckpointError(f"unet config: addition_embed_type={kind!r} is not supported (SDXL's is 'text_time')")
    if cfg.get("addition_time_embed_dim") != SDXL_TIME_EMBED_DIM:
        raise CheckpointError(f"unet config: addition_time_embed_dim={cfg.get('addition_time_embed_dim')!r} is not "
                              f"supported (SDXL's is {SDXL_TIME_EMBED_DIM})")
    width = cfg.get("projection_class_embeddings_input_dim")
    if not isinstance(width, int) or width <= 0:
        raise CheckpointError(
            "unet config: addition_embed_type 'text_time' needs projection_class_embeddings_input_dim")
    return width


def _guidance_width(cfg: Mapping[str, Any]) -> int:
    """An LCM-distilled UNet's guidance-scale embedding width (``time_cond_proj_dim``), 0 without one."""
    width = cfg.get("time_cond_proj_dim")
    if width is None:
        return 0
    if not isinstance(width, int) or isinstance(width, bool) or width <= 1:
        raise CheckpointError(f"unet config: time_cond_proj_dim={width!r} must be an integer above 1, or null")
    return width


def unet_config_from_diffusers(cfg: Mapping[str, Any]) -> UNetConfig:
    """Our UNetConfig from a diffusers ``unet/config.json`` of ``UNet2DConditionModel`` (SD 1.x, 2.x, SDXL)."""
    _check_fixed(cfg, _UNET_FIXED, "unet")
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    known = {"CrossAttnDownBlock2D", "DownBlock2D"}
    if not set(down) <= known:
        raise CheckpointError(f"unet config: down_block_types={down} must use only {sorted(known)}")
    expected_up = [t.replace("Down", "Up") for t in reversed(down)]
    if up != expected_up:
        raise CheckpointError(f"unet config: up_block_types={up} must mirror down_block_types (expected {expected_up})")
    model_channels, channel_mult = _channel_mult(list(cfg["block_out_channels"]), "unet")
    attention_levels = [i for i, t in enumerate(down) if t == "CrossAttnDownBlock2D"]

    # diffusers' "attention_head_dim" is, for SD configs, the number of heads (a known misnomer there)
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
    heads = heads if isinstance(heads, list) else [heads] * len(down)
    used = sorted({*attention_levels, len(down) - 1})  # the middle block runs at the last level
    head_counts = {heads[i] for i in used}
    head_dims = {model_channels * channel_mult[i] // heads[i] for i in used}
    if len(head_counts) == 1:
        num_heads, num_head_channels = head_counts.pop(), -1
    elif len(head_dims) == 1:
        num_heads, num_head_channels = 8, head_dims.pop()
    else:
        raise CheckpointError(f"unet config: attention heads {heads} give neither a fixed head count nor head size")

    return UNetConfig(
        in_channels=cfg.get("in_channels", 4),
        out_channels=cfg.get("out_channels", 4),
        model_channels=model_channels,
        channel_mult=channel_mult,
        num_res_blocks=_one(cfg, "layers_per_block", 2, "unet"),
        attention_resolutions=tuple(2**i for i in attention_levels),
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        transformer_depth=_per_level(cfg.get("transformer_layers_per_block", 1), len(down)),
        context_dim=_one(cfg, "cross_attention_dim", 1280, "unet"),
        use_linear_in_transformer=bool(cfg.get("use_linear_projection", False)),
        upcast_attention=bool(cfg.get("upcast_attention", False)),  # SD 2.1: fp16 q·k overflows without it
        adm_in_channels=_vector_conditioning(cfg),
        time_cond_proj_dim=_guidance_width(cfg),
    )


def _per_level(value: Any, levels: int) -> int | tuple[int, ...]:
    if isinstance(value, int):
        return value
    if not isinstance(value, list) or len(value) != levels or not all(isinstance(v, int) for v in value):
        raise CheckpointError(f"unet config: transformer_layers_per_block={value!r} must be a number or one per level")
    return tuple(value)


def vae_config_from_diffusers(cfg: Mapping[str, Any]) -> VAEConfig:
    """Our VAEConfig from a diffusers ``vae/config.json`` of ``AutoencoderKL``."""
    _check_fixed(cfg, _VAE_FIXED, "vae")
    levels = len(cfg["block_out_channels"])
    for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if list(cfg.get(key, [block] * levels)) != [block] * levels:
            raise CheckpointError(f"vae config: {key}={cfg[key]} must be {levels} x {block}")
    ch, ch_mult = _channel_mult(list(cfg["block_out_channels"]), "vae")
    latent = cfg.get("latent_channels", 4)
    return VAEConfig(
        in_channels=cfg.get("in_channels", 3),
        out_channels=cfg.get("out_channels", 3),
        ch=ch,
        ch_mult=ch_mult,
        num_res_blocks=cfg.get("layers_per_block", 2),
        z_channels=latent,
        embed_dim=latent,  # diffusers' quant_conv maps 2*latent -> 2*latent
    )


def unet_renames(c: UNetConfig) -> dict[str, str]:
    """diffusers module path -> original module path (below ``model.diffusion_model.``) for every UNet module."""
    r = {
        "conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2",
    }
    if c.time_cond_proj_dim:
        r["time_embedding.cond_proj"] = "time_embedding.cond_proj"
    if c.adm_in_channels:
        r |= {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}

    def resnet(diffusers: str, original: str) -> None:
        r.update({f"{diffusers}.{d}": f"{original}.{o}" for d, o in _UNET_RESNET.items()})

    n, levels = c.num_res_blocks, len(c.channel_mult)
    for level in range(levels):
        first = 1 + level * (n + 1)  # input_blocks.0 is conv_in; each level has n res blocks + 1 downsample
        for j in range(n):
            resnet(f"down_blocks.{level}.resnets.{j}", f"input_blocks.{first + j}.0")
            if 2**level in c.attention_resolutions:
                r[f"down_blocks.{level}.attentions.{j}"] = f"input_blocks.{first + j}.1"
        if level != levels - 1:
            r[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{first + n}.0.op"
    resnet("mid_block.resnets.0", "middle_block.0")
    r["mid_block.attentions.0"] = "middle_block.1"
    resnet("mid_block.resnets.1", "middle_block.2")
    for i in range(levels):  # up_blocks.i runs at level levels-1-i, with n+1 res blocks each
        level, attention = levels - 1 - i, 2 ** (levels - 1 - i) in c.attention_resolutions
        for j in range(n + 1):
            resnet(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{i * (n + 1) + j}.0")
            if attention:
                r[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{i * (n + 1) + j}.1"
        if level != 0:
            r[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{i * (n + 1) + n}.{2 if attention else 1}.conv"
    return r


def vae_renames(c: VAEConfig) -> dict[str, str]:
    """diffusers module path -> original module path (below ``first_stage_model.``) for every VAE module."""
    r = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}

    def resnet(diffusers: str, original: str) -> None:
        r[diffusers] = original  # norm1, conv1, norm2, conv2 keep their names
        r[f"{diffusers}.conv_shortcut"] = f"{original}.nin_shortcut"

    levels = len(c.ch_mult)
    for part in ("encoder", "decoder"):
        r |= {f"{part}.conv_in": f"{part}.conv_in", f"{part}.conv_norm_out": f"{part}.norm_out",
              f"{part}.conv_out": f"{part}.conv_out"}
        resnet(f"{part}.mid_block.resnets.0", f"{part}.mid.block_1")
        resnet(f"{part}.mid_block.resnets.1", f"{part}.mid.block_2")
        for attn_names in (_VAE_ATTN, _VAE_ATTN_LEGACY):  # modern names first: they win when inverting
            r |= {f"{part}.mid_block.attentions.0.{d}": f"{part}.mid.attn_1.{o}" for d, o in attn_names.items()}
    for i in range(levels):
        for j in range(c.num_res_blocks):
            resnet(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}")
        if i != levels - 1:
            r[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
        level = levels - 1 - i  # decoder up_blocks.i runs at level levels-1-i; checkpoints index up.* by level
        for j in range(c.num_res_blocks + 1):
            resnet(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{level}.block.{j}")
        if level != 0:
            r[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{level}.upsample.conv"
    return r


def rename(key: str, renames: Mapping[str, str]) -> str | None:
    """Rename a tensor name by its longest module-path prefix in ``renames``; None when no prefix is known."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in renames:
            return ".".join([renames[prefix], *parts[i:]])
    return None


def inverted(renames: Mapping[str, str]) -> dict[str, str]:
    """The reverse table (original -> diffusers); where two names map to one, the first listed wins."""
    inverse: dict[str, str] = {}
    for diffusers, original in renames.items():
        inverse.setdefault(original, diffusers)
    return inverse
