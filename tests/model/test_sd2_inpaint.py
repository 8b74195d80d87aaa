"""SD 2 inpainting (``512-inpainting-ema``: a 9-channel SD 2 UNet predicting ε): a tiny SD 2-like inpainting folder
from diffusers' ``save_pretrained`` against ``StableDiffusionInpaintPipeline``, and the same model as a single file
written by our writer, which the prediction rule takes as ε without running the UNet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline

from model import prediction
from model.pipeline import Pipeline
from model.requests import GenerationRequest
from model.weights import load_components, save_single_file
from tests.model.saved_pipeline import pixels
from tests.model.sd2_reference import reference_pipeline, reference_pixels, save_sd2_folder
from tests.model.test_pipeline import gradient_image, half_mask

W = H = 64


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_sd2_folder(tmp_path_factory.mktemp("sd2") / "tiny-sd2-inpainting", seed=3,
                           prediction_type="epsilon", in_channels=9)


@pytest.fixture(scope="module")
def pipe(folder: Path) -> Pipeline:
    return Pipeline.load(folder, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def single_file(folder: Path) -> Path:
    return save_single_file(load_components(folder), folder.with_name("tiny-sd2-inpainting.safetensors"))


def inpaint_request(sampler: str, **options: object) -> GenerationRequest:
    defaults: dict[str, object] = dict(prompt="a photo of a cat", negative_prompt="blurry", width=W, height=H,
                                       steps=6, guidance_scale=6.0, sampler=sampler, seed=11, n=2, task="inpaint",
                                       strength=1.0, init_image=gradient_image(1), mask=half_mask())
    return GenerationRequest(**{**defaults, **options})  # type: ignore[arg-type]


def diffusers_inpaint(folder: Path, req: GenerationRequest) -> np.ndarray:
    """One diffusers call per image: for several images of one source, diffusers samples the masked image's latent
    with the first image's generator only and repeats it, where each of ours draws it from its own seed."""
    pipe = reference_pipeline(StableDiffusionInpaintPipeline, folder, req.sampler, req.karras)
    return np.concatenate([
        reference_pixels(pipe, req.seed + i, 1, prompt=req.prompt, negative_prompt=req.negative_prompt,
                         image=req.init_image, mask_image=req.mask, height=H, width=W, strength=req.strength,
                         num_inference_steps=req.steps, guidance_scale=req.guidance_scale, eta=req.eta)
        for i in range(req.n)
    ])


def test_folder_loads_as_sd2_inpainting(pipe: Pipeline) -> None:
    c = pipe.components
    assert c.is_inpaint and pipe.schedule.prediction_type == "epsilon"
    assert (c.unet_config.num_head_channels, c.unet_config.use_linear_in_transformer) == (16, True)
    assert c.text_encoder.config.hidden_act == "gelu" and pipe.tokenizer.pad_id == 0


@pytest.mark.parametrize(("sampler", "eta", "strength", "n"),
                         [("ddim", 0.0, 1.0, 2), ("ddim", 0.5, 1.0, 1), ("euler_a", 0.0, 1.0, 1),
                          ("euler", 0.0, 0.7, 1)])
def test_inpainting_matches_diffusers(folder: Path, pipe: Pipeline, sampler: str, eta: float,
                                      strength: float, n: int) -> None:
    req = inpaint_request(sampler, eta=eta, strength=strength, n=n)
    ours = pixels(pipe.generate([req])[0].images)  # type: ignore[union-attr]
    assert np.abs(ours - diffusers_inpaint(folder, req)).max() <= 2
    assert ours.std() > 1.0


def test_single_file_is_epsilon_without_a_probe(single_file: Path, pipe: Pipeline,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """An OpenCLIP single file with a 9-channel UNet: ε under "auto", and the UNet never runs to decide it."""

    def never(*args: object) -> bool:
        raise AssertionError("the prediction probe ran for an inpainting UNet")

    monkeypatch.setattr(prediction, "looks_like_v_prediction", never)
    loaded = Pipeline.load(single_file, device="cpu", dtype="float32")
    assert loaded.components.is_inpaint and loaded.schedule.prediction_type == "epsilon"
    for a, b in ((pipe.components.unet, loaded.components.unet), (pipe.components.vae, loaded.components.vae)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    req = inpaint_request("ddim", n=1)
    ours = pixels(loaded.generate([req])[0].images)  # type: ignore[union-attr]
    assert np.abs(ours - pixels(pipe.generate([req])[0].images)).max() <= 1  # type: ignore[union-attr]
    overruled = Pipeline.load(single_file, device="cpu", dtype="float32", prediction_type="v_prediction")
    assert overruled.schedule.prediction_type == "v_prediction"  # SDQ_PREDICTION_TYPE still overrules the rule
