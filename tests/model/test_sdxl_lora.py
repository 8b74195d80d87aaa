"""SDXL LoRAs against diffusers' ``load_lora_weights``: a PEFT adapter on the UNet (attention, feed-forward,
projections, res blocks, the time and added-condition embeddings) and on both text encoders, written with
``StableDiffusionXLPipeline.save_lora_weights``; the same tensors in kohya's SDXL naming (``lora_unet_`` + the
original layout's paths, ``lora_te1_`` / ``lora_te2_``) load onto the same layers; jobs with and without LoRAs
share a batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors import safe_open
from safetensors.torch import save_file

from model import diffusers_format
from model.pipeline import Pipeline
from model.requests import GenerationRequest, LoraRef
from tests.model.lora_files import TEXT_TARGETS, allow_text_encoder_adapters
from tests.model.saved_pipeline import pixels
from tests.model.sd2_reference import reference_pixels
from tests.model.sdxl_reference import reference, save_sdxl_folder

W = H = 64
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "time_emb_proj", "linear_1", "linear_2"]  # linear_*: time and added-condition embeddings


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_sdxl_folder(tmp_path_factory.mktemp("sdxl-lora") / "tiny-sdxl", seed=9)


@pytest.fixture(scope="module")
def pipe(folder: Path) -> Pipeline:
    return Pipeline.load(folder, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def peft_file(folder: Path) -> Path:
    ref = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    unet_config = LoraConfig(r=4, lora_alpha=6.0, init_lora_weights=False, target_modules=UNET_TARGETS)
    text_config = LoraConfig(r=2, lora_alpha=3.0, init_lora_weights=False, target_modules=TEXT_TARGETS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        ref.unet.add_adapter(unet_config)
        inject_adapter_in_model(text_config, ref.text_encoder)
        inject_adapter_in_model(text_config, ref.text_encoder_2)
    with torch.no_grad():
        for module in (ref.unet, ref.text_encoder, ref.text_encoder_2):
            for name, p in module.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.3)
    path = folder.parent / "loras" / "xl-peft.safetensors"
    path.parent.mkdir(exist_ok=True)
    StableDiffusionXLPipeline.save_lora_weights(
        path.parent, weight_name=path.name, unet_lora_layers=get_peft_model_state_dict(ref.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(ref.text_encoder),
        text_encoder_2_lora_layers=get_peft_model_state_dict(ref.text_encoder_2),
        unet_lora_adapter_metadata=unet_config.to_dict(), text_encoder_lora_adapter_metadata=text_config.to_dict(),
        text_encoder_2_lora_adapter_metadata=text_config.to_dict(),
    )
    return path


@pytest.fixture(scope="module")
def kohya_file(peft_file: Path, pipe: Pipeline) -> Path:
    """The same tensors as kohya's sd-scripts name an SDXL LoRA: the UNet by the original layout's module paths."""
    renames = diffusers_format.unet_renames(pipe.components.unet_config)
    out = {}
    with safe_open(str(peft_file), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118
            module, _, part = key.rpartition(".lora_")
            network, _, path = module.partition(".")
            if network == "unet":
                original = diffusers_format.rename(path + ".weight", renames)
                assert original is not None, path
                name = "lora_unet_" + original.removesuffix(".weight").replace(".", "_")
                alpha = 6.0
            else:
                te = "lora_te1_" if network == "text_encoder" else "lora_te2_"
                name = te + "text_model_" + path.removeprefix("text_model.").replace(".", "_")
                alpha = 3.0
            out[f"{name}.{'lora_down' if part == 'A.weight' else 'lora_up'}.weight"] = f.get_tensor(key)
            out[f"{name}.alpha"] = torch.tensor(alpha)
    path = peft_file.with_name("xl-kohya.safetensors")
    save_file(out, str(path))
    return path


def request(*loras: LoraRef, **options: object) -> GenerationRequest:
    defaults: dict[str, object] = dict(prompt="a photo of a cat", negative_prompt="blurry", width=W, height=H,
                                       steps=4, guidance_scale=5.0, sampler="euler", seed=2, n=1, loras=list(loras))
    return GenerationRequest(**{**defaults, **options})  # type: ignore[arg-type]


def ours(pipe: Pipeline, *requests: GenerationRequest) -> list[np.ndarray]:
    return [pixels(r.images) for r in pipe.generate(list(requests)) if r is not None]


def test_a_peft_sdxl_lora_matches_diffusers(folder: Path, pipe: Pipeline, peft_file: Path) -> None:
    req = request(LoraRef("xl", 0.8, peft_file))
    [mine] = ours(pipe, req)
    ref = reference(StableDiffusionXLPipeline, folder, "euler")
    allow_text_encoder_adapters()
    ref.load_lora_weights(str(peft_file.parent), weight_name=peft_file.name, adapter_name="xl")
    ref.set_adapters(["xl"], adapter_weights=[0.8])
    theirs = reference_pixels(ref, req.seed, 1, prompt=req.prompt, negative_prompt=req.negative_prompt,
                              num_inference_steps=req.steps, guidance_scale=req.guidance_scale, height=H, width=W)
    assert np.abs(mine - theirs).max() <= 2
    [without] = ours(pipe, request())
    assert np.abs(mine - without).max() > 20


def test_kohya_naming_loads_the_same_layers_and_pixels(pipe: Pipeline, peft_file: Path, kohya_file: Path) -> None:
    peft, kohya = pipe.loras.load(LoraRef("p", path=peft_file)), pipe.loras.load(LoraRef("k", path=kohya_file))
    assert peft.unet.keys() == kohya.unet.keys() and peft.text.keys() == kohya.text.keys()
    assert peft.text2.keys() == kohya.text2.keys() and len(peft.text2) == 3 * len(TEXT_TARGETS)
    assert {"label_emb.0.0", "label_emb.0.2", "input_blocks.5.1.transformer_blocks.1.attn2.to_k"} <= peft.unet.keys()
    [a] = ours(pipe, request(LoraRef("p", 0.8, peft_file)))
    [b] = ours(pipe, request(LoraRef("k", 0.8, kohya_file)))
    assert np.abs(a - b).max() <= 1


def test_sdxl_jobs_with_and_without_loras_share_a_batch(pipe: Pipeline, peft_file: Path, kohya_file: Path) -> None:
    jobs = [request(LoraRef("p", 0.8, peft_file)), request(seed=7),
            request(LoraRef("k", -0.4, kohya_file), prompt="a dog", seed=4)]
    alone = [ours(pipe, job)[0] for job in jobs]
    for i, (x, y) in enumerate(zip(alone, ours(pipe, *jobs), strict=True)):
        assert np.abs(x - y).max() <= 1, f"job {i}"
