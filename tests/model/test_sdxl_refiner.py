"""SDXL base + refiner as one job, against diffusers' "ensemble of expert denoisers" (the base with
``denoising_end``, its latents into StableDiffusionXLImg2ImgPipeline with ``denoising_start``, the same generators):
every sampler, batch mates with and without size conditioning, the refiner's single file equal to its folder,
refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

from model.pipeline import Pipeline
from model.refiner import is_refiner_checkpoint, load_refiner, save_refiner_file
from model.requests import GenerationRequest
from model.single_file import CheckpointError
from model.weights import load_components
from tests.model.saved_pipeline import pixels
from tests.model.sdxl_reference import reference, save_refiner_folder, save_sdxl_folder

W = H = 64


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("refiner")
    base = save_sdxl_folder(root / "tiny-sdxl", seed=7)
    return base, save_refiner_folder(root / "tiny-sdxl-refiner", base, seed=8)


@pytest.fixture(scope="module")
def pipe(folders: tuple[Path, Path]) -> Pipeline:
    pipe = Pipeline.load(folders[0], device="cpu", dtype="float32")
    pipe.use_refiner(folders[1])
    return pipe


def request(sampler: str, **options: object) -> GenerationRequest:
    defaults: dict[str, object] = dict(prompt="a photo of a cat", negative_prompt="blurry", width=W, height=H,
                                       steps=6, guidance_scale=5.0, sampler=sampler, seed=5, n=1,
                                       refiner_switch=0.7)
    return GenerationRequest(**{**defaults, **options})  # type: ignore[arg-type]


def ensemble(folders: tuple[Path, Path], req: GenerationRequest, **call: Any) -> np.ndarray:
    base = reference(StableDiffusionXLPipeline, folders[0], req.sampler)
    refiner = reference(StableDiffusionXLImg2ImgPipeline, folders[1], req.sampler)
    generators = [torch.Generator("cpu").manual_seed(req.seed + i) for i in range(req.n)]
    common = dict(prompt=req.prompt, negative_prompt=req.negative_prompt, num_inference_steps=req.steps,
                  guidance_scale=req.guidance_scale, num_images_per_prompt=req.n, generator=generators, **call)
    latents = base(**common, height=H, width=W, denoising_end=req.refiner_switch, output_type="latent").images
    out = refiner(**common, image=latents, denoising_start=req.refiner_switch, output_type="np").images
    return np.round(out * 255).astype(np.int16)


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "ddim", "dpmpp_2m"])
def test_base_then_refiner_matches_diffusers_ensemble(folders: tuple[Path, Path], pipe: Pipeline,
                                                      sampler: str) -> None:
    req = request(sampler, n=2, refiner_switch=0.5)
    result = pipe.generate([req])[0]
    assert result is not None
    ours = pixels(result.images)
    assert np.abs(ours - ensemble(folders, req)).max() <= 2
    without = pipe.generate([request(sampler, n=2, refiner_switch=None)])[0]
    assert without is not None and np.abs(ours - pixels(without.images)).max() > 5  # the refiner ran


def test_size_conditioning_reaches_both_stages_and_batches_mix(folders: tuple[Path, Path], pipe: Pipeline) -> None:
    sized = request("euler", original_size=(1024, 2048), crop_top_left=(32, 0))
    plain = request("euler", seed=9, prompt="a red bicycle", negative_prompt="")
    assert sized.batch_key() == plain.batch_key()
    both = pipe.generate([sized, plain])
    assert all(r is not None for r in both)
    expected = ensemble(folders, sized, original_size=(1024, 2048), crops_coords_top_left=(32, 0))
    assert np.abs(pixels(both[0].images) - expected).max() <= 2  # type: ignore[union-attr]
    assert np.abs(pixels(both[1].images) - ensemble(folders, plain)).max() <= 2  # type: ignore[union-attr]


def test_the_refiners_single_file_equals_its_folder(folders: tuple[Path, Path], pipe: Pipeline,
                                                    tmp_path: Path) -> None:
    parts = load_refiner(folders[1], device=torch.device("cpu"), dtype=torch.float32, text_dtype=torch.float32)
    base = load_components(folders[0])
    # the original layout: bigG as embedder 0, the UNet, and the (base's) VAE, as sd_xl_refiner_1.0 holds them
    file = save_refiner_file(parts, base.vae, tmp_path / "tiny-refiner.safetensors")
    assert is_refiner_checkpoint(file) and is_refiner_checkpoint(folders[1])
    assert not is_refiner_checkpoint(folders[0])
    from_file = Pipeline.load(folders[0], device="cpu", dtype="float32")
    from_file.use_refiner(file)
    req = request("dpmpp_2m")
    assert np.abs(pixels(from_file.generate([req])[0].images)  # type: ignore[union-attr]
                  - pixels(pipe.generate([req])[0].images)).max() <= 1  # type: ignore[union-attr]
    with pytest.raises(CheckpointError, match="is an SDXL refiner"):
        Pipeline.load(file, device="cpu", dtype="float32")
    with pytest.raises(CheckpointError, match="is an SDXL refiner"):
        Pipeline.load(folders[1], device="cpu", dtype="float32")
    with pytest.raises(ValueError, match="is not an SDXL refiner"):
        from_file.use_refiner(folders[0])  # the base model itself


def test_a_refiner_request_without_a_refiner_or_out_of_range_is_refused(folders: tuple[Path, Path],
                                                                        pipe: Pipeline) -> None:
    alone = Pipeline.load(folders[0], device="cpu", dtype="float32")
    with pytest.raises(ValueError, match="refiner: this worker holds no SDXL refiner"):
        alone.generate([request("euler")])
    with pytest.raises(ValueError, match=r"refiner switch_at must be between 0\.05 and 0\.95, got 1\.0"):
        pipe.generate([request("euler", refiner_switch=1.0)])
    assert request("euler").batch_key() != request("euler", refiner_switch=0.8).batch_key()


def test_the_refiners_conditioning_and_unet_match_diffusers_components(folders: tuple[Path, Path],
                                                                       pipe: Pipeline) -> None:
    ref = StableDiffusionXLImg2ImgPipeline.from_pretrained(folders[1], local_files_only=True)
    assert pipe.refiner is not None
    req = request("euler", original_size=(640, 512), crop_top_left=(8, 16))
    with torch.inference_mode():
        embeds, negative, pooled, negative_pooled = ref.encode_prompt(
            req.prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
            negative_prompt=req.negative_prompt)
        time_ids, negative_ids = ref._get_add_time_ids(
            (640, 512), (8, 16), (H, W), 6.0, 2.5, (640, 512), (8, 16), (H, W), torch.float32, 32)
        text, y, y_uncond = pipe.refiner.condition([req])
        torch.testing.assert_close(torch.cat([text.cond, text.uncond]), torch.cat([embeds, negative]), atol=1e-4,
                                   rtol=0)
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        t = torch.tensor([250.0, 250.0])
        added = {"text_embeds": torch.cat([pooled, negative_pooled]), "time_ids": torch.cat([time_ids, negative_ids])}
        expected = ref.unet(x, t, encoder_hidden_states=torch.cat([embeds, negative]), added_cond_kwargs=added).sample
        got = pipe.refiner.unet(x, t, torch.cat([text.cond, text.uncond]), None, torch.cat([y, y_uncond]))
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
