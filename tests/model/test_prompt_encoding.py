"""Weighted and long prompts through the text encoder, against tensors computed by hand from diffusers' own modules;
the images against diffusers given those embeddings; batch invariance across prompt lengths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from model.pipeline import Pipeline
from model.requests import GenerationRequest
from model.text_encoding import TextContext, encode_prompts
from tests.model.reference import Reference, build_reference, reference_scheduler
from tests.model.saved_pipeline import pixels

W, H = 64, 64
BOS, EOS, CAT, DOG, A = 49406, 49407, 2368, 1929, 320


@pytest.fixture(scope="module")
def ref(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    ref = build_reference(Path(tmp_path_factory.mktemp("sd-prompts")), in_channels=4, seed=3)
    # A fresh final LayerNorm (bias 0) leaves each chunk's mean near 0, where restoring the mean divides by ~0;
    # SD's CLIP has a learned bias there. Give this one a bias too, as its checkpoint.
    with torch.no_grad():
        ref.text_encoder.final_layer_norm.bias.add_(torch.randn(32, generator=torch.Generator().manual_seed(4)) + 0.5)
    ref.text_encoder.save_pretrained(ref.folder / "text_encoder")
    return ref


@pytest.fixture(scope="module")
def pipe(ref: Reference) -> Pipeline:
    return Pipeline.load(ref.folder, device="cpu", dtype="float32")


def z_of(ref: Reference, rows: list[list[int]]) -> torch.Tensor:
    """diffusers' CLIPTextModel (the same weights as ours) on 77-id rows: [rows, 77, D]."""
    with torch.no_grad():
        return ref.text_encoder(torch.tensor(rows)).last_hidden_state


def row(tokens: list[int]) -> list[int]:
    return [BOS, *tokens, EOS] + [EOS] * (75 - len(tokens))


def a1111_weighted(z: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """A1111's "Original" emphasis on one chunk z [77, D]: z * w, then the original mean restored."""
    w = torch.tensor(weights)[:, None]
    weighted = z * w
    return weighted * (z.mean() / weighted.mean())


def encode(pipe: Pipeline, prompts: list[str], negatives: list[str], max_chunks: int = 8) -> TextContext:
    with torch.inference_mode():
        return encode_prompts(pipe.tokenizer, lambda ids, owners: pipe._encode_text(ids, owners=owners)[0], prompts,
                              negatives, max_chunks)


def test_plain_short_prompt_is_the_encoder_output_exactly(pipe: Pipeline, ref: Reference) -> None:
    text = encode(pipe, ["a photo of a cat"], ["ugly"])
    with torch.inference_mode():
        today = pipe._encode_text(pipe.tokenizer.tokenize(["a photo of a cat", "ugly"]).input_ids)[0]
    assert text.cond.shape == (1, 77, 32) and text.mask is None
    assert torch.equal(text.cond[0], today[0]) and torch.equal(text.uncond[0], today[1])
    assert torch.allclose(text.cond[0], z_of(ref, [row([A, 1125, 539, A, CAT])])[0], atol=1e-5)


def test_weights_scale_tokens_then_restore_the_mean(pipe: Pipeline, ref: Reference) -> None:
    text = encode(pipe, ["a (cat:1.5) ((dog)) [a]"], ["(a:0.5)"])
    # 'a ' 1.0, 'cat' 1.5, ' ' 1.0, 'dog' 1.21, ' ' 1.0, 'a' 1/1.1: each fragment tokenized on its own
    z = z_of(ref, [row([A, CAT, DOG, A]), row([A])])
    expected = a1111_weighted(z[0], [1.0, 1.0, 1.5, 1.1 * 1.1, 1 / 1.1] + [1.0] * 72)
    expected_neg = a1111_weighted(z[1], [1.0, 0.5] + [1.0] * 75)
    assert torch.allclose(text.cond[0], expected, atol=1e-6)
    assert torch.allclose(text.uncond[0], expected_neg, atol=1e-6)
    assert torch.isfinite(expected).all() and not torch.allclose(text.cond[0], z[0], atol=1e-3)  # weights show
    assert torch.allclose(text.cond[0].mean(), z[0].mean(), atol=1e-7)


def test_long_prompt_is_chunks_joined_and_negative_padded(pipe: Pipeline, ref: Reference) -> None:
    text = encode(pipe, ["cat " * 80 + "(dog:1.3)"], ["dog"])
    z = z_of(ref, [row([CAT] * 75), row([CAT] * 5 + [DOG]), row([DOG]), row([])])
    second = a1111_weighted(z[1], [1.0] * 6 + [1.3] + [1.0] * 70)  # the weights of chunk 2 only
    assert text.cond.shape == (1, 154, 32) and text.chunks == [2] and text.prompts[0].num_tokens == 81
    assert torch.allclose(text.cond[0], torch.cat([z[0], second]), atol=1e-6)
    assert torch.allclose(text.uncond[0], torch.cat([z[2], z[3]]), atol=1e-6)  # "dog", then the empty prompt
    swapped = encode(pipe, ["dog"], ["cat " * 80])  # and the other way round
    assert torch.allclose(swapped.cond[0], torch.cat([z[2], z[3]]), atol=1e-6)


def test_batch_pads_to_its_longest_prompt_behind_a_mask(pipe: Pipeline, ref: Reference) -> None:
    text = encode(pipe, ["a cat", "cat " * 160], ["", ""])
    assert text.cond.shape == (2, 3 * 77, 32) and text.chunks == [1, 3]
    assert text.mask is not None and text.mask.tolist() == [[True] * 77 + [False] * 154, [True] * 231]
    alone = encode(pipe, ["a cat"], [""])
    assert torch.equal(text.cond[0, :77], alone.cond[0]) and torch.equal(text.uncond[0, :77], alone.uncond[0])


def test_too_many_chunks_are_cut_and_reported(pipe: Pipeline) -> None:
    text = encode(pipe, ["cat " * 160], ["dog"], max_chunks=2)
    assert text.chunks == [2] and text.prompts[0].truncated and not text.negatives[0].truncated
    assert text.prompts[0].num_tokens == 160


def diffusers_pixels(ref: Reference, req: GenerationRequest, cond: torch.Tensor, uncond: torch.Tensor) -> np.ndarray:
    sd = StableDiffusionPipeline(vae=ref.vae, text_encoder=ref.text_encoder, tokenizer=ref.tokenizer, unet=ref.unet,
                                 scheduler=reference_scheduler(req.sampler, req.karras), safety_checker=None,
                                 feature_extractor=None, requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    out = sd(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=req.steps, height=req.height,
             width=req.width, guidance_scale=req.guidance_scale, num_images_per_prompt=req.n, output_type="np",
             generator=[torch.Generator("cpu").manual_seed(req.seed + i) for i in range(req.n)])
    return np.round(out.images * 255).astype(np.int16)


def test_weighted_long_prompt_matches_diffusers_given_a1111_embeddings(pipe: Pipeline, ref: Reference) -> None:
    req = GenerationRequest(prompt="(cat:1.4) " * 60 + "[dog] " * 30, negative_prompt="(dog:0.7)", width=W,
                            height=H, steps=5, guidance_scale=6.0, sampler="euler_a", seed=5, n=2)
    result = pipe.generate([req])[0]
    assert result is not None and (result.prompt_tokens, result.prompt_chunks) == (90, 2)
    z = z_of(ref, [row([CAT] * 60 + [DOG] * 15), row([DOG] * 15), row([DOG]), row([])])
    cond = torch.cat([a1111_weighted(z[0], [1.0] + [1.4] * 60 + [1 / 1.1] * 15 + [1.0]),
                      a1111_weighted(z[1], [1.0] + [1 / 1.1] * 15 + [1.0] * 61)])
    uncond = torch.cat([a1111_weighted(z[2], [1.0, 0.7] + [1.0] * 75), z[3]])
    assert torch.isfinite(cond).all() and torch.isfinite(uncond).all()
    expected = diffusers_pixels(ref, req, cond[None], uncond[None])
    ours = pixels(result.images)
    assert np.abs(ours - expected).max() <= 2
    plain = pipe.generate([GenerationRequest(**{**req.__dict__, "prompt": "cat " * 60 + "dog " * 30})])[0]
    assert plain is not None and np.abs(pixels(plain.images) - ours).max() > 2  # the weights show in the image


def test_image_is_the_same_alone_or_beside_a_longer_prompt(pipe: Pipeline) -> None:
    short = GenerationRequest(prompt="a (cat:1.2)", negative_prompt="blurry", width=W, height=H, steps=4,
                              guidance_scale=5.0, sampler="euler", seed=11)
    long = GenerationRequest(prompt="dog, " * 90, width=W, height=H, steps=4, guidance_scale=7.0, sampler="euler",
                             seed=12, n=2)
    unguided = GenerationRequest(prompt="cat " * 100, width=W, height=H, steps=4, guidance_scale=1.0,
                                 sampler="euler", seed=13)
    together = pipe.generate([short, long, unguided])
    for req, batched in zip((short, long, unguided), together, strict=True):
        alone = pipe.generate([req])[0]
        assert alone is not None and batched is not None
        assert np.abs(pixels(alone.images) - pixels(batched.images)).max() <= 1
    assert [r.prompt_chunks for r in together if r is not None] == [1, 3, 2]
