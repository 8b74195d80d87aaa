"""SD 2.x: folders written by diffusers' ``save_pretrained`` from a tiny SD 2-like architecture, v-prediction and
ε, against diffusers' pipelines on the same folder; the same model as a single file in the original layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline
from safetensors import safe_open

from model import open_clip
from model.pipeline import Pipeline
from model.requests import GenerationRequest
from model.weights import load_components, save_single_file
from tests.model.saved_pipeline import KNOWN_CHUNKS, LONG_PROMPT, chunk_embeds, pixels
from tests.model.sd2_reference import reference_pipeline, reference_pixels, save_sd2_folder, with_prediction_type
from tests.model.test_pipeline import gradient_image, half_mask

W = H = 64


@pytest.fixture(scope="module")
def v_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_sd2_folder(tmp_path_factory.mktemp("sd2") / "tiny-sd2-v")


@pytest.fixture(scope="module")
def eps_folder(v_folder: Path) -> Path:
    return with_prediction_type(v_folder, v_folder.with_name("tiny-sd2-eps"), "epsilon")


@pytest.fixture(scope="module")
def v_pipe(v_folder: Path) -> Pipeline:
    return Pipeline.load(v_folder, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def single_file(v_folder: Path) -> Path:
    return save_single_file(load_components(v_folder), v_folder.with_name("tiny-sd2.safetensors"))


def request(sampler: str, **options: object) -> GenerationRequest:
    defaults: dict[str, object] = dict(prompt="a photo of a cat", negative_prompt="blurry", width=W, height=H,
                                       steps=5, guidance_scale=6.0, sampler=sampler, seed=42, n=2)
    return GenerationRequest(**{**defaults, **options})  # type: ignore[arg-type]


def diffusers_txt2img(folder: Path, req: GenerationRequest) -> np.ndarray:
    pipe = reference_pipeline(StableDiffusionPipeline, folder, req.sampler, req.karras)
    return reference_pixels(pipe, req.seed, req.n, prompt=req.prompt, negative_prompt=req.negative_prompt,
                            num_inference_steps=req.steps, guidance_scale=req.guidance_scale, eta=req.eta,
                            height=req.height, width=req.width)


def test_folder_loads_as_sd2(v_pipe: Pipeline) -> None:
    c = v_pipe.components
    assert v_pipe.schedule.prediction_type == "v_prediction"
    assert v_pipe.tokenizer.pad_id == 0  # the folder's tokenizer pads with "!"
    assert (c.unet_config.num_head_channels, c.unet_config.use_linear_in_transformer) == (16, True)
    assert c.text_encoder.config.hidden_act == "gelu"


@pytest.mark.parametrize(
    ("sampler", "karras", "eta", "guidance"),
    [("ddim", False, 0.0, 6.0), ("ddim", False, 0.5, 6.0), ("euler", False, 0.0, 6.0), ("euler_a", False, 0.0, 6.0),
     ("dpmpp_2m", True, 0.0, 6.0), ("lcm", False, 0.0, 1.0)],
)
def test_v_prediction_txt2img_matches_diffusers(v_folder: Path, v_pipe: Pipeline, sampler: str, karras: bool,
                                                eta: float, guidance: float) -> None:
    req = request(sampler, karras=karras, eta=eta, guidance_scale=guidance, steps=4 if sampler == "lcm" else 5)
    ours = pixels(v_pipe.generate([req])[0].images)  # type: ignore[union-attr]
    assert np.abs(ours - diffusers_txt2img(v_folder, req)).max() <= 2
    assert ours.std() > 1.0


@pytest.mark.parametrize("sampler", ["ddim", "euler_a"])
def test_epsilon_sd2_folder_matches_diffusers(eps_folder: Path, v_pipe: Pipeline, sampler: str) -> None:
    pipe = Pipeline.load(eps_folder, device="cpu", dtype="float32")
    assert pipe.schedule.prediction_type == "epsilon"
    req = request(sampler)
    ours = pixels(pipe.generate([req])[0].images)  # type: ignore[union-attr]
    assert np.abs(ours - diffusers_txt2img(eps_folder, req)).max() <= 2
    v_images = pixels(v_pipe.generate([req])[0].images)  # type: ignore[union-attr]
    assert np.abs(ours - v_images).max() > 10  # the prediction type changes the images


def test_v_prediction_long_prompt_matches_diffusers(v_folder: Path, v_pipe: Pipeline) -> None:
    """Two 75-token chunks, each padded with "!" (id 0): diffusers given the same chunks as embeddings."""
    req = request("euler", prompt=LONG_PROMPT, negative_prompt="", n=1)
    result = v_pipe.generate([req])[0]
    assert result is not None and result.prompt_chunks == 2
    pipe = reference_pipeline(StableDiffusionPipeline, v_folder, "euler")
    chunks = KNOWN_CHUNKS[LONG_PROMPT]
    theirs = reference_pixels(pipe, req.seed, 1, prompt_embeds=chunk_embeds(pipe, chunks),
                              negative_prompt_embeds=chunk_embeds(pipe, [""] * len(chunks)),
                              num_inference_steps=req.steps, guidance_scale=req.guidance_scale, height=H, width=W)
    assert np.abs(pixels(result.images) - theirs).max() <= 2


def test_v_prediction_img2img_matches_diffusers(v_folder: Path, v_pipe: Pipeline) -> None:
    init = gradient_image()
    req = request("euler_a", task="img2img", steps=10, strength=0.6, seed=7, init_image=init)
    ours = pixels(v_pipe.generate([req])[0].images)  # type: ignore[union-attr]
    pipe = reference_pipeline(StableDiffusionImg2ImgPipeline, v_folder, "euler_a")
    theirs = reference_pixels(pipe, req.seed, req.n, prompt=req.prompt, negative_prompt=req.negative_prompt,
                              image=init, strength=0.6, num_inference_steps=req.steps,
                              guidance_scale=req.guidance_scale)
    assert np.abs(ours - theirs).max() <= 2


def test_v_prediction_inpaint_by_blending_matches_diffusers(v_folder: Path, v_pipe: Pipeline) -> None:
    init, mask = gradient_image(1), half_mask()
    req = request("ddim", task="inpaint", steps=6, strength=1.0, seed=11, n=1, init_image=init, mask=mask)
    ours = pixels(v_pipe.generate([req])[0].images)  # type: ignore[union-attr]
    pipe = reference_pipeline(StableDiffusionInpaintPipeline, v_folder, "ddim")
    theirs = reference_pixels(pipe, req.seed, 1, prompt=req.prompt, negative_prompt=req.negative_prompt, image=init,
                              mask_image=mask, height=H, width=W, strength=1.0, num_inference_steps=req.steps,
                              guidance_scale=req.guidance_scale)
    assert np.abs(ours - theirs).max() <= 2


def test_single_file_holds_the_open_clip_layout(single_file: Path) -> None:
    with safe_open(str(single_file), "pt") as f:
        names = set(f.keys())
        fused = f.get_slice(f"{open_clip.SD2_PREFIX}transformer.resblocks.0.attn.in_proj_weight").get_shape()
    text = {n.removeprefix(open_clip.SD2_PREFIX) for n in names if n.startswith("cond_stage_model.")}
    assert not any(n.startswith("cond_stage_model.transformer.") for n in names)
    assert open_clip.count_layers(names, open_clip.SD2_PREFIX) == 3  # 2 used + the unused last one, as SD 2.x
    assert {"logit_scale", "text_projection", "ln_final.weight", "positional_embedding"} <= text
    assert fused == [96, 32]


def test_single_file_equals_the_folder(v_folder: Path, v_pipe: Pipeline, single_file: Path) -> None:
    folder, loaded = load_components(v_folder), load_components(single_file)
    for a, b in ((folder.unet, loaded.unet), (folder.vae, loaded.vae)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    ids = v_pipe.tokenizer.tokenize(["a photo of a cat", "", "blurry, low quality"]).input_ids
    with torch.no_grad():
        expected = folder.text_encoder(input_ids=ids).last_hidden_state
        got = loaded.text_encoder(input_ids=ids).last_hidden_state
    assert torch.allclose(got, expected, atol=1e-4, rtol=0)
    assert loaded.text_encoder.config.num_hidden_layers == 2

    pipe = Pipeline.load(single_file, device="cpu", dtype="float32", prediction_type="v_prediction")
    assert pipe.tokenizer.pad_id == 0  # the bundled vocabulary, padding with "!" for an OpenCLIP text encoder
    req = request("dpmpp_2m", karras=True, prompt="a (red:1.3) house", n=1)
    ours = pixels(pipe.generate([req])[0].images)  # type: ignore[union-attr]
    assert np.abs(ours - pixels(v_pipe.generate([req])[0].images)).max() <= 1  # type: ignore[union-attr]


def test_prediction_type_override(v_folder: Path, single_file: Path) -> None:
    assert Pipeline.load(v_folder, device="cpu", dtype="float32",
                         prediction_type="epsilon").schedule.prediction_type == "epsilon"
    for choice in ("epsilon", "v_prediction"):
        pipe = Pipeline.load(single_file, device="cpu", dtype="float32", prediction_type=choice)
        assert pipe.schedule.prediction_type == choice
    with pytest.raises(ValueError, match=r"prediction_type must be one of auto, epsilon, v_prediction, got 'v'"):
        Pipeline.load(single_file, device="cpu", dtype="float32", prediction_type="v")  # type: ignore[arg-type]
