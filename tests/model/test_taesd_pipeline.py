"""The pipeline with a tiny VAE: pixels against diffusers' pipelines given AutoencoderTiny, per-request choice in a
shared batch, TAESD previews."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from PIL import Image

from model.images import latents_to_preview
from model.pipeline import Pipeline
from model.requests import GenerationRequest
from tests.model.reference import Reference, build_reference, reference_scheduler
from tests.model.test_lcm import lcm_scheduler
from tests.model.test_pipeline import gradient_image
from tests.model.test_taesd import random_taesd

W, H = 64, 64


@pytest.fixture(scope="module")
def ref(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    return build_reference(Path(tmp_path_factory.mktemp("sd")), in_channels=4, seed=5)


@pytest.fixture(scope="module")
def taesd(tmp_path_factory: pytest.TempPathFactory) -> tuple[AutoencoderTiny, Path]:
    vae, folder = random_taesd(seed=4), Path(tmp_path_factory.mktemp("taesd"))
    vae.save_pretrained(folder)
    return vae, folder


@pytest.fixture(scope="module")
def pipe(ref: Reference, taesd: tuple[AutoencoderTiny, Path]) -> Pipeline:
    return Pipeline.load(ref.folder, device="cpu", dtype="float32", tiny_vae=taesd[1])


def pixels(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(i, dtype=np.int16) for i in images])


def run(pipe: Pipeline, req: GenerationRequest) -> np.ndarray:
    result = pipe.generate([req])[0]
    assert result is not None
    return pixels(result.images)


def diffusers_images(
    cls: Any, ref: Reference, vae: AutoencoderTiny, req: GenerationRequest, **extra: Any
) -> np.ndarray:
    scheduler = lcm_scheduler() if req.sampler == "lcm" else reference_scheduler(req.sampler)
    pipe = cls(vae=vae, text_encoder=ref.text_encoder, tokenizer=ref.tokenizer, unet=ref.unet, scheduler=scheduler,
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator("cpu").manual_seed(req.seed + i) for i in range(req.n)]
    out = pipe(req.prompt, negative_prompt=req.negative_prompt, num_inference_steps=req.steps,
               guidance_scale=req.guidance_scale, num_images_per_prompt=req.n, generator=gens, output_type="np",
               **extra)
    return np.round(out.images * 255).astype(np.int16)


@pytest.mark.parametrize(("sampler", "guidance"), [("lcm", 1.0), ("euler_a", 5.0)])
def test_txt2img_matches_diffusers_with_autoencoder_tiny(ref: Reference, taesd: tuple[AutoencoderTiny, Path],
                                                         pipe: Pipeline, sampler: str, guidance: float) -> None:
    req = GenerationRequest(prompt="a cat", width=W, height=H, steps=4, guidance_scale=guidance, sampler=sampler,
                            seed=3, n=2, vae="tiny")
    ours = run(pipe, req)
    theirs = diffusers_images(StableDiffusionPipeline, ref, taesd[0], req, height=H, width=W)
    assert np.abs(ours - theirs).max() <= 2
    assert ours.std() > 1.0
    full = run(pipe, GenerationRequest(**{**req.__dict__, "vae": "full"}))
    assert np.abs(full - ours).max() > 10  # the tiny VAE did the decoding: the comparison can fail


def test_img2img_encodes_with_autoencoder_tiny_as_diffusers(ref: Reference, taesd: tuple[AutoencoderTiny, Path],
                                                            pipe: Pipeline) -> None:
    init = gradient_image(3)
    req = GenerationRequest(prompt="a painting", task="img2img", width=W, height=H, steps=4, guidance_scale=1.0,
                            sampler="lcm", strength=0.5, seed=8, n=2, init_image=init, vae="tiny")
    ours = run(pipe, req)
    theirs = diffusers_images(StableDiffusionImg2ImgPipeline, ref, taesd[0], req, image=init, strength=0.5)
    assert np.abs(ours - theirs).max() <= 2
    assert ours.std() > 1.0


def test_tiny_and_full_requests_share_a_batch(pipe: Pipeline) -> None:
    common: dict[str, Any] = dict(width=W, height=H, steps=4, sampler="lcm", guidance_scale=1.0)
    tiny = GenerationRequest(prompt="a cat", seed=1, n=1, vae="tiny", **common)
    full = GenerationRequest(prompt="a dog", seed=5, n=2, vae="full", **common)
    assert tiny.batch_key() == full.batch_key()
    together = pipe.generate([full, tiny, full])
    for got, alone in ((together[0], run(pipe, full)), (together[1], run(pipe, tiny)), (together[2], run(pipe, full))):
        assert got is not None
        assert np.abs(pixels(got.images) - alone).max() <= 1


def test_previews_are_taesd_decodes(ref: Reference, taesd: tuple[AutoencoderTiny, Path], pipe: Pipeline) -> None:
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    preview = pipe.preview(latents)[0]
    assert preview.size == (256, 256)
    with torch.no_grad():
        decoded = taesd[0].decode(latents).sample  # [1, 3, 64, 64]
    expected = Image.fromarray(np.round(((decoded[0] / 2 + 0.5).clamp(0, 1) * 255).permute(1, 2, 0).numpy())
                               .astype(np.uint8)).resize((256, 256), Image.Resampling.BILINEAR)
    assert np.abs(pixels([preview]) - pixels([expected])).max() <= 2
    cheap = latents_to_preview(latents)[0]
    assert np.abs(pixels([preview]) - pixels([cheap])).mean() > 5


def test_previews_of_large_latents_decode_at_preview_size(pipe: Pipeline) -> None:
    latents = torch.randn((1, 4, 64, 48), generator=torch.Generator().manual_seed(1))  # a 512x384 image
    calls: list[tuple[int, ...]] = []
    assert pipe.tiny_vae is not None
    hook = pipe.tiny_vae.decoder.register_forward_pre_hook(lambda m, args: calls.append(tuple(args[0].shape)))
    try:
        [preview] = pipe.preview(latents)
    finally:
        hook.remove()
    assert preview.size == (192, 256)
    assert calls == [(1, 4, 32, 24)]  # half the latent side: 256 px decoded, not 512
    assert np.asarray(preview).std() > 1.0


def test_tiny_is_refused_without_a_tiny_vae(ref: Reference) -> None:
    plain = Pipeline.load(ref.folder, device="cpu", dtype="float32")
    with pytest.raises(ValueError, match="vae 'tiny' needs a tiny VAE"):
        plain.check(GenerationRequest(prompt="a cat", width=W, height=H, vae="tiny"))
