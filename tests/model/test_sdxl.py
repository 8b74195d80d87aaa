"""SDXL against diffusers: a tiny SDXL folder from ``StableDiffusionXLPipeline.save_pretrained`` (``sdxl_reference``),
txt2img with every sampler, long prompts, img2img and inpaint by blending against diffusers' SDXL pipelines, the
size conditioning, the UNet and text encoders component by component, and the single file our writer makes in the
original layout (``conditioner.embedders.*``) equal to the folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline
from PIL import Image
from safetensors import safe_open

from model.pipeline import Pipeline
from model.requests import GenerationRequest
from model.sdxl import SDXL_SCALING_FACTOR, SizeConditioning, vector_conditioning
from model.weights import load_components, save_single_file
from tests.model.saved_pipeline import pixels
from tests.model.sd2_reference import reference_pixels
from tests.model.sdxl_reference import reference, save_sdxl_folder
from tests.model.test_pipeline import gradient_image

W = H = 64
NEGATIVE = "blurry, low quality"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_sdxl_folder(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl", seed=3)


@pytest.fixture(scope="module")
def pipe(folder: Path) -> Pipeline:
    return Pipeline.load(folder, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def single_file(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    components = load_components(folder)
    return save_single_file(components, tmp_path_factory.mktemp("sdxl-file") / "tiny-sdxl.safetensors")


def request(sampler: str = "euler", **options: object) -> GenerationRequest:
    defaults: dict[str, object] = dict(prompt="a photo of a cat", negative_prompt=NEGATIVE, width=W, height=H,
                                       steps=5, guidance_scale=6.0, sampler=sampler, seed=11, n=1)
    return GenerationRequest(**{**defaults, **options})  # type: ignore[arg-type]


def ours(pipe: Pipeline, req: GenerationRequest) -> np.ndarray:
    result = pipe.generate([req])[0]
    assert result is not None
    return pixels(result.images)


def test_the_folder_loads_as_sdxl(pipe: Pipeline) -> None:
    c = pipe.components
    assert c.is_sdxl and c.text_encoder_2 is not None
    assert c.unet_config.transformer_depth == (0, 1, 2) and c.unet_config.transformer_depth_middle == 2
    assert c.unet_config.adm_in_channels == 32 + 6 * 256 and c.unet_config.context_dim == 64
    assert c.scaling_factor == SDXL_SCALING_FACTOR
    assert pipe.text.pad_id_2 == 0  # tokenizer_2 pads with "!"
    assert pipe.schedule.prediction_type == "epsilon"


@pytest.mark.parametrize(("sampler", "karras", "eta"),
                         [("euler", False, 0.0), ("euler_a", False, 0.0), ("ddim", False, 0.0), ("ddim", False, 0.5),
                          ("dpmpp_2m", True, 0.0), ("dpmpp_2m", False, 0.0), ("lcm", False, 0.0),
                          ("tcd", False, 0.3)])
def test_txt2img_matches_diffusers(folder: Path, pipe: Pipeline, sampler: str, karras: bool, eta: float) -> None:
    steps = 4 if sampler in ("lcm", "tcd") else 5
    guidance = 1.0 if sampler in ("lcm", "tcd") else 6.0
    req = request(sampler, karras=karras, eta=eta, n=2, steps=steps, guidance_scale=guidance)
    mine = ours(pipe, req)
    theirs = reference_pixels(reference(StableDiffusionXLPipeline, folder, sampler, karras), req.seed, 2,
                              prompt=req.prompt, negative_prompt=req.negative_prompt, num_inference_steps=steps,
                              guidance_scale=guidance, eta=eta, height=H, width=W)
    assert np.abs(mine - theirs).max() <= 2
    assert mine.std() > 1.0 and np.abs(mine[0] - mine[1]).max() > 10  # real images, one per seed


def test_size_conditioning_is_read_and_changes_the_image(folder: Path, pipe: Pipeline) -> None:
    req = request(original_size=(1024, 768), crop_top_left=(16, 32), target_size=(512, 512))
    mine = ours(pipe, req)
    theirs = reference_pixels(reference(StableDiffusionXLPipeline, folder, "euler"), req.seed, 1,
                              prompt=req.prompt, negative_prompt=req.negative_prompt, num_inference_steps=req.steps,
                              guidance_scale=req.guidance_scale, height=H, width=W, original_size=(1024, 768),
                              crops_coords_top_left=(16, 32), target_size=(512, 512))
    assert np.abs(mine - theirs).max() <= 2
    assert np.abs(mine - ours(pipe, request())).max() > 2


def test_img2img_and_inpaint_match_diffusers(folder: Path, pipe: Pipeline) -> None:
    image = gradient_image(3)
    req = request("euler_a", task="img2img", init_image=image, strength=0.6)
    theirs = reference_pixels(reference(StableDiffusionXLImg2ImgPipeline, folder, "euler_a"), req.seed, 1,
                              prompt=req.prompt, negative_prompt=req.negative_prompt, image=image, strength=0.6,
                              num_inference_steps=req.steps, guidance_scale=req.guidance_scale)
    assert np.abs(ours(pipe, req) - theirs).max() <= 2

    mask = Image.new("L", (W, H), 0)
    mask.paste(255, (16, 16, 48, 48))
    req = request("ddim", task="inpaint", init_image=image, mask=mask, strength=1.0)
    theirs = reference_pixels(reference(StableDiffusionXLInpaintPipeline, folder, "ddim"), req.seed, 1,
                              prompt=req.prompt, negative_prompt=req.negative_prompt, image=image, mask_image=mask,
                              strength=1.0, num_inference_steps=req.steps, guidance_scale=req.guidance_scale,
                              height=H, width=W)
    assert np.abs(ours(pipe, req) - theirs).max() <= 2


def test_text_encoders_and_unet_match_diffusers_components(folder: Path, pipe: Pipeline) -> None:
    ref = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    with torch.inference_mode():
        embeds, negative, pooled, negative_pooled = ref.encode_prompt(
            "a photo of a cat", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
            negative_prompt=NEGATIVE)
        ids = pipe.tokenizer.tokenize(["a photo of a cat", NEGATIVE]).input_ids
        context, our_pooled = pipe._encode_text(ids)
        assert our_pooled is not None
        torch.testing.assert_close(context, torch.cat([embeds, negative]), atol=1e-4, rtol=0)
        torch.testing.assert_close(our_pooled, torch.cat([pooled, negative_pooled]), atol=1e-4, rtol=0)

        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([999.0, 421.0])
        time_ids = [SizeConditioning.default(H, W).time_ids()] * 2
        y = vector_conditioning(our_pooled, time_ids)
        expected = ref.unet(x, t, encoder_hidden_states=context, added_cond_kwargs={
            "text_embeds": our_pooled, "time_ids": torch.tensor(time_ids)}).sample
        torch.testing.assert_close(pipe.components.unet(x, t, context, None, y), expected, atol=1e-4, rtol=0)
        with pytest.raises(ValueError, match="takes a vector conditioning"):
            pipe.components.unet(x, t, context)


def test_long_prompts_run_in_chunks(pipe: Pipeline) -> None:
    long = "a watercolor painting of a lighthouse on a cliff at dawn, " * 8
    result = pipe.generate([request(prompt=long), request(prompt="a cat", seed=3)])
    assert all(r is not None for r in result)
    assert result[0] is not None and result[0].prompt_chunks == 2


def test_the_single_file_in_the_original_layout_equals_the_folder(single_file: Path, pipe: Pipeline) -> None:
    with safe_open(str(single_file), "pt") as f:
        names = set(f.keys())
    assert "model.diffusion_model.label_emb.0.0.weight" in names
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in names
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in names
    assert "conditioner.embedders.1.model.text_projection" in names
    from_file = Pipeline.load(single_file, device="cpu", dtype="float32")
    assert from_file.components.is_sdxl and from_file.components.scaling_factor == SDXL_SCALING_FACTOR
    assert from_file.components.unet_config == pipe.components.unet_config
    req = request("dpmpp_2m")
    assert np.abs(ours(from_file, req) - ours(pipe, req)).max() <= 1


def test_a_9_channel_inpainting_sdxl_matches_diffusers(tmp_path: Path) -> None:
    folder = save_sdxl_folder(tmp_path / "tiny-sdxl-inpainting", seed=4, in_channels=9)
    pipe = Pipeline.load(folder, device="cpu", dtype="float32")
    assert pipe.is_inpaint and pipe.components.is_sdxl
    image, mask = gradient_image(5), Image.new("L", (W, H), 0)
    mask.paste(255, (8, 24, 40, 56))
    for sampler, strength in (("euler_a", 1.0), ("ddim", 0.7)):
        req = request(sampler, task="inpaint", init_image=image, mask=mask, strength=strength)
        theirs = reference_pixels(reference(StableDiffusionXLInpaintPipeline, folder, sampler), req.seed, 1,
                                  prompt=req.prompt, negative_prompt=req.negative_prompt, image=image,
                                  mask_image=mask, strength=strength, num_inference_steps=req.steps,
                                  guidance_scale=req.guidance_scale, height=H, width=W)
        assert np.abs(ours(pipe, req) - theirs).max() <= 2
    pipe.refiner = object()  # type: ignore[assignment]  # any refiner: an inpainting UNet's job cannot use it
    with pytest.raises(ValueError, match="refiner: an inpainting model's latents"):
        pipe.check(request("euler", task="inpaint", init_image=image, mask=mask, refiner_switch=0.8))
