"""Which layer of our networks each tensor name of a LoRA file points at, in the two formats people have.

Our module paths are the original (CompVis) checkpoint keys. A LoRA file names the same layers otherwise:

- kohya / A1111 (``lora_unet_*``, ``lora_te_*``): the diffusers module path (UNet) or the transformers module path
  below ``text_model.`` (text encoder) with every ``.`` written as ``_``: ``lora_unet_down_blocks_0_attentions_0_
  transformer_blocks_0_attn1_to_q``, ``lora_te_text_model_encoder_layers_0_self_attn_q_proj``. Module names hold
  underscores themselves, so the rule cannot be undone by splitting; instead every layer's kohya name is built
  from our modules, and looked up. Files trained on the original layout (``lora_unet_input_blocks_1_1_...``) are
  found the same way, from our own paths.
- diffusers / PEFT (``unet.*``, ``text_encoder.*``, what diffusers' ``save_lora_weights`` writes): the diffusers
  module path after ``unet.``, the transformers one (with or without ``text_model.``) after ``text_encoder.``.
- SDXL: the same for its two text encoders, ``lora_te1_`` / ``lora_te2_`` (kohya) and ``text_encoder.`` /
  ``text_encoder_2.`` (diffusers); kohya's SDXL UNet names are the original layout's (``lora_unet_input_blocks_``),
  found from our paths as above.

The diffusers -> original UNet names come from ``model.diffusers_format.unet_renames``, the one table the
diffusers-folder loader uses too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from model import diffusers_format
from model.clip_config import state_dict_prefix
from model.layers import Upsample
from model.unet import UNetConfig, UNetModel

Network = Literal["unet", "text", "text2"]  # text2: SDXL's second text encoder


@dataclass(frozen=True)
class Target:
    """A layer a LoRA may adapt, with what its low-rank pair must look like."""

    path: str  # the module path in our network (the checkpoint key without ``.weight``)
    conv: bool  # a convolution (the pair: a conv with this kernel, stride and padding, then a 1x1 conv)
    in_features: int
    out_features: int
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    # The conv of an ``Upsample``: the side path hooks the Upsample (whatever runs its conv) and interpolates first.
    upsample: bool = False

    @property
    def hook_path(self) -> str:
        return self.path.rpartition(".")[0] if self.upsample else self.path


def _targets(network: nn.Module) -> dict[str, Target]:
    out: dict[str, Target] = {}
    for path, module in network.named_modules():
        if isinstance(module, nn.Linear):
            out[path] = Target(path, False, module.in_features, module.out_features)
        elif isinstance(module, nn.Conv2d):
            parent = network.get_submodule(path.rpartition(".")[0]) if "." in path else network
            out[path] = Target(
                path, True, module.in_channels, module.out_channels, tuple(module.kernel_size),  # type: ignore[arg-type]
                tuple(module.stride), tuple(module.padding),  # type: ignore[arg-type]
                upsample=isinstance(parent, Upsample),
            )
    return out


@dataclass(frozen=True)
class LoraNames:
    """Every name a LoRA file may give each adaptable layer of one model, -> (network, target)."""

    layers: dict[str, tuple[Network, Target]]

    @classmethod
    def build(cls, unet_config: UNetConfig, text_config: CLIPTextConfig,
              text_2_config: CLIPTextConfig | None = None) -> LoraNames:
        # The networks are built on the meta device: their layer shapes, before any CPU weight packing.
        with torch.device("meta"):
            unet, text = UNetModel(unet_config), CLIPTextModel(text_config)
            text_2 = None if text_2_config is None else CLIPTextModelWithProjection(text_2_config)
        back = diffusers_format.inverted(diffusers_format.unet_renames(unet_config))
        layers: dict[str, tuple[Network, Target]] = {}
        for path, target in _targets(unet).items():
            diffusers = (diffusers_format.rename(f"{path}.weight", back) or f"{path}.weight").removesuffix(".weight")
            for name in (f"lora_unet_{diffusers.replace('.', '_')}", f"lora_unet_{path.replace('.', '_')}",
                         f"unet.{diffusers}"):
                layers[name] = ("unet", target)
        prefix = state_dict_prefix(text)
        for path, target in _targets(text).items():
            canonical = path.removeprefix(prefix)  # below text_model., whatever transformers' version nests
            kohya = canonical.replace(".", "_")
            for name in (f"lora_te_text_model_{kohya}", f"text_encoder.{canonical}",
                         f"text_encoder.text_model.{canonical}"):
                layers[name] = ("text", target)
            if text_2 is not None:
                layers[f"lora_te1_text_model_{kohya}"] = ("text", target)
        if text_2 is not None:
            prefix = state_dict_prefix(text_2)
            for path, target in _targets(text_2).items():
                if not path.startswith(prefix):  # text_projection: no LoRA trainer adapts it
                    continue
                canonical = path.removeprefix(prefix)
                for name in (f"lora_te2_text_model_{canonical.replace('.', '_')}", f"text_encoder_2.{canonical}",
                             f"text_encoder_2.text_model.{canonical}"):
                    layers[name] = ("text2", target)
        return cls(layers)
