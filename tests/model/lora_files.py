"""Random-weight LoRA files for the tiny test pipelines, in both formats, written by diffusers' and PEFT's own tools.

- PEFT / diffusers: a ``LoraConfig`` adapter with random init is added to a diffusers UNet and a CLIP text model of
  the pipeline's architecture, its state dict taken with ``get_peft_model_state_dict`` and written with
  ``StableDiffusionPipeline.save_lora_weights`` (the configs go into the file's metadata, as diffusers does).
- kohya / A1111: the same tensors renamed the way kohya's sd-scripts writes them: the diffusers (UNet) or
  transformers (text encoder, below ``text_model.``) module path with ``.`` replaced by ``_``, after
  ``lora_unet_`` / ``lora_te_``; ``lora_A`` -> ``lora_down``, ``lora_B`` -> ``lora_up``; and an ``alpha`` scalar
  per layer, equal to PEFT's ``lora_alpha`` (so alpha / rank is the same scale).
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from packaging.version import Version
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors import safe_open
from safetensors.torch import save_file

from tests.model.saved_pipeline import tiny_pipeline

# Every kind of layer the UNet has: attention, feed-forward, transformer projections, res block convs (LoCon),
# time embedding, shortcuts, down- and upsampler convs, the first and last conv.
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "time_emb_proj", "conv", "conv_in", "conv_out", "linear_1"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def allow_text_encoder_adapters() -> None:
    """transformers 5 asks peft >= 0.22 for ``CLIPTextModel.load_adapter`` (what diffusers' ``load_lora_weights``
    calls for the text encoder); the newest peft installable here is older. The adapter path it takes works with
    it (a scale-0 adapter leaves the embeddings bit-identical), so the test lifts that version gate."""
    if Version(importlib.metadata.version("peft")) < Version("0.22"):
        import transformers.integrations.peft as transformers_peft

        transformers_peft.check_peft_version = lambda **_: None


def write_peft_lora(path: Path, seed: int, *, rank: int = 4, alpha: float = 6.0, text_rank: int = 2,
                    text_alpha: float = 3.0, text: bool = True, pipeline_seed: int = 0) -> Path:
    """A diffusers-format LoRA of ``tiny_pipeline(pipeline_seed)``: random A and B (PEFT's ``init_lora_weights=False``
    draws B at random too), scaled so that the images change visibly but stay images."""
    pipe = tiny_pipeline(pipeline_seed)
    unet_config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False, target_modules=UNET_TARGETS,
                             rank_pattern={"conv_out": 2}, alpha_pattern={"time_emb_proj": 1.0})
    text_config = LoraConfig(r=text_rank, lora_alpha=text_alpha, init_lora_weights=False,
                             target_modules=TEXT_TARGETS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe.unet.add_adapter(unet_config)
        inject_adapter_in_model(text_config, pipe.text_encoder)
    with torch.no_grad():
        for module in (pipe.unet, pipe.text_encoder):
            for name, p in module.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.3)
    unet_layers = get_peft_model_state_dict(pipe.unet)
    text_layers = get_peft_model_state_dict(pipe.text_encoder) if text else None
    path.parent.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(
        path.parent, unet_lora_layers=unet_layers, text_encoder_lora_layers=text_layers, weight_name=path.name,
        unet_lora_adapter_metadata=unet_config.to_dict(),
        text_encoder_lora_adapter_metadata=text_config.to_dict() if text else None,
    )
    return path


def kohya_name(peft_key: str) -> str:
    """``unet.down_blocks.0.resnets.0.conv1.lora_A.weight`` -> ``lora_unet_down_blocks_0_resnets_0_conv1.lora_down
    .weight``; ``text_encoder.encoder.layers.0.mlp.fc1.lora_B.weight`` -> ``lora_te_text_model_encoder_layers_0_mlp
    _fc1.lora_up.weight``."""
    module, _, part = peft_key.rpartition(".lora_")
    network, _, path = module.partition(".")
    prefix = "lora_unet_" if network == "unet" else "lora_te_text_model_"
    suffix = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}[part]
    return f"{prefix}{path.removeprefix('text_model.').replace('.', '_')}.{suffix}"


def write_kohya_lora(peft_path: Path, path: Path, alphas: dict[str, float]) -> Path:
    """The PEFT file's tensors under kohya's names, with ``alphas[network]`` (or a layer's own) as each alpha.

    ``alphas`` maps "unet", "text_encoder" and module-name endings (PEFT's alpha patterns) to alphas; rank
    patterns need nothing, as kohya's rank is the tensors' own.
    """
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(peft_path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118
            tensor = f.get_tensor(key)
            tensors[kohya_name(key)] = tensor
            if ".lora_A." in key:
                module = key.split(".lora_A.")[0]
                network = module.partition(".")[0]
                alpha = next((a for end, a in alphas.items() if module.endswith("." + end)), alphas[network])
                tensors[kohya_name(key).replace(".lora_down.weight", ".alpha")] = torch.tensor(float(alpha))
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})
    return path
