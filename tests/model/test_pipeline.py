"""Whole-pipeline parity with diffusers on identical tiny weights, batch invariance, cancellation, input errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from model.pipeline import Pipeline
from model.requests import GenerationRequest, StepEvent
from tests.model.reference import Reference, build_reference, reference_scheduler

W, H = 64, 64
STEPS = 6


@pytest.fixture(scope="module")
def ref(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    return build_reference(Path(tmp_path_factory.mktemp("sd4")), in_channels=4, seed=0)


@pytest.fixture(scope="module")
def ref9(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    return build_reference(Path(tmp_path_factory.mktemp("sd9")), in_channels=9, seed=1)


@pytest.fixture(scope="module")
def pipe(ref: Reference) -> Pipeline:
    return Pipeline.load(ref.folder, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def pipe9(ref9: Reference) -> Pipeline:
    return Pipeline.load(ref9.folder, device="cpu", dtype="float32")


def pixels(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(i, dtype=np.int16) for i in images])


def generators(seed: int, n: int) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]


def reference_images(pipeline_cls: Any, ref: Reference, req: GenerationRequest, **extra: Any) -> np.ndarray:
    pipe = pipeline_cls(
        vae=ref.vae, text_encoder=ref.text_encoder, tokenizer=ref.tokenizer, unet=ref.unet,
        scheduler=reference_scheduler(req.sampler, req.karras), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        req.prompt, negative_prompt=req.negative_prompt, num_inference_steps=req.steps,
        guidance_scale=req.guidance_scale, num_images_per_prompt=req.n, generator=generators(req.seed, req.n),
        eta=req.eta, output_type="np", **extra,
    )
    return np.round(out.images * 255).astype(np.int16)


def gradient_image(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:H, 0:W]
    base = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).astype(np.float32)
    return Image.fromarray(np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8))


def half_mask() -> Image.Image:
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[:, W // 2 :] = 255
    return Image.fromarray(mask)


@pytest.mark.parametrize(
    ("sampler", "karras", "eta"),
    [("ddim", False, 0.0), ("ddim", False, 0.5), ("euler", False, 0.0), ("euler_a", False, 0.0),
     ("dpmpp_2m", True, 0.0)],
)
def test_txt2img_matches_diffusers(ref: Reference, pipe: Pipeline, sampler: str, karras: bool, eta: float) -> None:
    req = GenerationRequest(prompt="a photo of a cat", negative_prompt="blurry", width=W, height=H, steps=STEPS,
                            guidance_scale=6.0, sampler=sampler, karras=karras, eta=eta, seed=42, n=2)
    ours = pixels(pipe.generate([req])[0].images)  # type: ignore[union-attr]
    theirs = reference_images(StableDiffusionPipeline, ref, req, height=H, width=W)
    assert np.abs(ours - theirs).max() <= 2
    assert ours.std() > 1.0  # a real image, not a constant


def test_odd_latent_size_matches_diffusers(ref: Reference, pipe: Pipeline) -> None:
    req = GenerationRequest(prompt="a red house", width=72, height=88, steps=4, sampler="euler", seed=3)
    result = pipe.generate([req])[0]
    assert result is not None and result.images[0].size == (72, 88)
    theirs = reference_images(StableDiffusionPipeline, ref, req, height=88, width=72)
    assert np.abs(pixels(result.images) - theirs).max() <= 2


@pytest.mark.parametrize("prompt", ["a painting", ""])  # "": the image alone steers (variations, A1111's default)
def test_img2img_matches_diffusers(ref: Reference, pipe: Pipeline, prompt: str) -> None:
    init = gradient_image()
    req = GenerationRequest(prompt=prompt, task="img2img", width=W, height=H, steps=10, sampler="euler_a",
                            strength=0.6, seed=7, n=2, init_image=init)
    ours = pixels(pipe.generate([req])[0].images)  # type: ignore[union-attr]
    theirs = reference_images(StableDiffusionImg2ImgPipeline, ref, req, image=init, strength=0.6)
    assert np.abs(ours - theirs).max() <= 2


@pytest.mark.parametrize("nine_channels", [False, True])
def test_inpaint_matches_diffusers(ref: Reference, ref9: Reference, pipe: Pipeline, pipe9: Pipeline,
                                   nine_channels: bool) -> None:
    reference, ours_pipe = (ref9, pipe9) if nine_channels else (ref, pipe)
    init, mask = gradient_image(1), half_mask()
    req = GenerationRequest(prompt="a dog", task="inpaint", width=W, height=H, steps=STEPS, sampler="ddim",
                            strength=1.0, seed=11, n=1, init_image=init, mask=mask)
    ours = pixels(ours_pipe.generate([req])[0].images)  # type: ignore[union-attr]
    theirs = reference_images(StableDiffusionInpaintPipeline, reference, req, image=init, mask_image=mask,
                              height=H, width=W, strength=1.0)
    assert np.abs(ours - theirs).max() <= 2


def test_batch_invariance_mixed_requests(pipe: Pipeline) -> None:
    common = dict(width=W, height=H, steps=STEPS, sampler="euler_a")
    requests = [
        GenerationRequest(prompt="a cat", guidance_scale=7.5, seed=1, n=2, **common),  # type: ignore[arg-type]
        GenerationRequest(prompt="a dog", negative_prompt="ugly", guidance_scale=1.0, seed=9, **common),  # type: ignore[arg-type]
        GenerationRequest(prompt="a tree", guidance_scale=3.0, seed=123, n=3, **common),  # type: ignore[arg-type]
    ]
    batched = pipe.generate(requests)
    for req, together in zip(requests, batched, strict=True):
        alone = pipe.generate([req])[0]
        assert together is not None and alone is not None
        assert together.seeds == alone.seeds == [req.seed + i for i in range(req.n)]
        assert np.abs(pixels(together.images) - pixels(alone.images)).max() <= 1


def test_cancel_drops_one_request_and_keeps_the_others(pipe: Pipeline) -> None:
    common = dict(width=W, height=H, steps=STEPS, sampler="dpmpp_2m", karras=True)
    a = GenerationRequest(prompt="a cat", seed=5, n=2, **common)  # type: ignore[arg-type]
    b = GenerationRequest(prompt="a ship", seed=6, **common)  # type: ignore[arg-type]
    c = GenerationRequest(prompt="a boat", seed=8, **common)  # type: ignore[arg-type]
    seen: list[list[int]] = []

    def cancel_b_at_step_2(event: StepEvent) -> list[int]:
        seen.append(event.active)
        return [1] if event.step == 2 else []

    results = pipe.generate([a, b, c], callback=cancel_b_at_step_2)
    assert results[1] is None
    assert seen[0] == [0, 1, 2] and seen[-1] == [0, 2] and len(seen) == STEPS
    for req, got in ((a, results[0]), (c, results[2])):
        alone = pipe.generate([req])[0]
        assert got is not None and alone is not None
        assert np.abs(pixels(got.images) - pixels(alone.images)).max() <= 1


def test_cancelling_everything_returns_none(pipe: Pipeline) -> None:
    req = GenerationRequest(prompt="a cat", width=W, height=H, steps=STEPS, sampler="euler")
    assert pipe.generate([req], callback=lambda e: [0]) == [None]


def vae_round_trip(ref: Reference, init: Image.Image, seed: int, n: int) -> np.ndarray:
    """Diffusers' img2img start latents with nothing left to denoise: image i decodes a posterior sample of the
    init image drawn from a CPU generator seeded ``seed + i``, pre- and post-processed by diffusers' own code."""
    processor = VaeImageProcessor(vae_scale_factor=8)
    with torch.no_grad():
        posterior = ref.vae.encode(processor.preprocess(init)).latent_dist
        latents = torch.cat([posterior.sample(generator=g) for g in generators(seed, n)])
        decoded = ref.vae.decode(latents).sample
    return np.round(processor.postprocess(decoded, output_type="np") * 255).astype(np.int16)


def test_strength_zero_returns_the_input_through_the_vae(ref: Reference, pipe: Pipeline) -> None:
    """Diffusers' own img2img pipeline cannot run strength 0 (no timesteps), so its VAE is the oracle."""
    init = gradient_image(2)
    req = GenerationRequest(prompt="x", task="img2img", width=W, height=H, steps=STEPS, strength=0.0,
                            init_image=init, seed=1, n=2)
    result = pipe.generate([req])[0]
    assert result is not None and [i.size for i in result.images] == [(W, H)] * 2
    ours, expected = pixels(result.images), vae_round_trip(ref, init, seed=1, n=2)
    assert np.abs(ours - expected).max() <= 2
    assert np.abs(ours[0] - ours[1]).max() > 2  # each image decodes its own posterior sample


def test_long_prompt_is_chunked_not_truncated(pipe: Pipeline) -> None:
    req = GenerationRequest(prompt="cat " * 100, width=W, height=H, steps=1, sampler="euler")
    result = pipe.generate([req])[0]
    assert result is not None and not result.prompt_truncated and not result.negative_prompt_truncated
    assert (result.prompt_tokens, result.negative_prompt_tokens, result.prompt_chunks) == (100, 0, 2)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"width": 65}, "width must be a multiple of 8, got 65"),
        ({"steps": 0}, "steps must be between 1 and 150, got 0"),
        ({"steps": 151}, "steps must be between 1 and 150, got 151"),  # the API's limit (core.rules), not 1000
        ({"n": 9}, "n must be between 1 and 8, got 9"),
        ({"sampler": "ddim", "karras": True}, "karras sigmas apply to euler, euler_a, dpmpp_2m, not ddim"),
        ({"eta": 0.5}, "eta applies to ddim, tcd only, got eta 0.5 with euler_a"),
        ({"sampler": "plms"}, "unknown sampler 'plms'; valid samplers: ddim, euler, euler_a, dpmpp_2m"),
        ({"task": "img2img", "strength": 1.5, "init_image": Image.new("RGB", (W, H))},
         "strength must be between 0 and 1, got 1.5"),
        ({"task": "inpaint", "init_image": Image.new("RGB", (W, H)), "mask": Image.new("L", (32, 32))},
         "mask is 32x32 but init_image is 64x64"),
        ({"task": "img2img"}, "init_image is required for img2img"),
        ({"guidance_scale": float("nan")}, "guidance_scale must be a finite number"),
    ],
)
def test_bad_input_names_the_value(pipe: Pipeline, changes: dict[str, Any], message: str) -> None:
    req = GenerationRequest(prompt="a cat", width=W, height=H, steps=2)
    for key, value in changes.items():
        setattr(req, key, value)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        pipe.generate([req])


def test_incompatible_requests_are_refused(pipe: Pipeline) -> None:
    a = GenerationRequest(prompt="a", width=W, height=H, steps=2)
    b = GenerationRequest(prompt="b", width=W, height=H, steps=3)
    with pytest.raises(ValueError, match="cannot share a batch"):
        pipe.generate([a, b])


def test_text_embeddings_are_cached_by_tokens(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = Pipeline.load(tiny_checkpoint, device="cpu", dtype="float32")
    encoder = pipe.components.text_encoder
    calls: list[int] = []
    original = encoder.forward

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs["input_ids"].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(encoder, "forward", counting)
    ids = pipe.tokenizer.tokenize(["a cat", "", "a dog", ""]).input_ids
    first = pipe._encode_text(ids)[0]
    assert calls == [3]  # "" once
    again = pipe._encode_text(ids[[2, 0]])[0]
    assert calls == [3] and torch.equal(again, first[[2, 0]])
    with torch.inference_mode():
        fresh = original(input_ids=ids).last_hidden_state
    assert torch.allclose(first, fresh, atol=1e-5)
    monkeypatch.setattr("model.text_cache.TEXT_CACHE_SIZE", 2)
    pipe._encode_text(pipe.tokenizer.tokenize(["a bird"]).input_ids)
    assert len(pipe._text_cache) == 2 and calls == [3, 1]  # least recently used texts dropped
