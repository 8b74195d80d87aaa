"""img2img, inpaint and outpaint on real processes (API + worker, tiny random checkpoint), and GET /v1/models.

The tiny checkpoint's VAE has random weights: it is not an autoencoder, so "strength 0 returns the input" cannot
mean the input's pixels here. What strength 0 must return is the input through the model's own VAE (a sample of
the encoder's posterior, decoded), which the test computes in this process; with a trained SD VAE that round trip
is close to the identity. Kept pixels of inpaint come back exactly because the original pixels are pasted back
outside the mask (`mask_overlay`), not because the VAE reproduces them.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from model.images import image_to_tensor, tensor_to_images
from model.pipeline import Pipeline
from model.requests import GenerationRequest
from tests.e2e.conftest import Service
from tests.images import noise_image, png_b64, white_box
from worker.modelhash import sha256_of

BASE = {"prompt": "a photo of a cat", "steps": 4, "sampler": "euler", "seed": 42}


def post(service: Service, path: str, **fields: Any) -> str:
    r = service.http.post(path, json={**BASE, **fields})
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def result(service: Service, job_id: str) -> np.ndarray:
    job = service.wait_job(job_id)
    [record] = job["images"]
    r = service.http.get(record["url"])
    assert r.status_code == 200
    return np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"), dtype=np.int16)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def vae_round_trip(pipe: Pipeline, image: Image.Image, seed: int) -> np.ndarray:
    """The image encoded by the VAE, one posterior sample drawn from the image's seed (as the pipeline draws it),
    and decoded."""
    with torch.inference_mode():
        mean, std = pipe.encode_image(image_to_tensor(image, image.width, image.height))
        noise = torch.randn(std.shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
        decoded = pipe.components.vae.decode((mean + noise * std).to(pipe.device, pipe.precision.vae))
    return pixels(tensor_to_images(decoded)[0])


def test_img2img_strength_0_is_the_vae_round_trip_and_models_lists_the_checkpoint(
    service: Service, tiny_checkpoint: Path
) -> None:
    service.start_api()
    service.start_worker()
    service.wait_ready()
    source = noise_image(64, 64)
    zero = post(service, "/v1/img2img", image=png_b64(source), strength=0.0)
    zero_other_prompt = post(service, "/v1/img2img", image=png_b64(source), strength=0.0, prompt="a red bicycle")
    half = post(service, "/v1/img2img", image=png_b64(source), strength=0.5)
    pipe = Pipeline.load(tiny_checkpoint, device="cpu", dtype="float32")
    expected_zero = vae_round_trip(pipe, source, seed=42)
    [expected_half] = pipe.generate([GenerationRequest(
        prompt=str(BASE["prompt"]), task="img2img", width=64, height=64, steps=4, sampler="euler", seed=42,
        strength=0.5, init_image=source,
    )])[0].images  # type: ignore[union-attr]

    out_zero, out_other, out_half = (result(service, j) for j in (zero, zero_other_prompt, half))

    assert np.abs(out_zero - expected_zero).max() <= 2  # the VAE round trip: no denoising step ran
    assert np.array_equal(out_zero, out_other)  # so the prompt cannot matter
    assert np.abs(out_half - pixels(expected_half)).max() <= 2  # the worker ran the last 2 of 4 steps from it
    assert np.abs(out_half - out_zero).mean() > 5  # ...and they changed the image

    sha256 = sha256_of(tiny_checkpoint)
    [model] = service.http.get("/v1/models").json()["models"]
    [worker] = model.pop("workers")
    assert model == {"name": "tiny", "hash": sha256[:10], "sha256": sha256, "inpainting_unet": False, "tiny_vae": False,
                     "queued": 0, "default_size": 512, "refiners": []}
    assert (worker["device"], worker["dtype"]) == ("cpu", str(pipe.precision.unet).removeprefix("torch."))


def test_inpaint_keeps_unmasked_pixels_and_outpaint_grows_the_canvas(service: Service) -> None:
    service.start_api()
    service.start_worker()
    service.wait_ready()
    source = noise_image(64, 64)
    box = white_box(64, 64, (16, 16, 48, 48))
    inside = np.asarray(box) == 255
    common = {"image": png_b64(source), "mask": png_b64(box)}
    sharp = post(service, "/v1/inpaint", **common, mask_blur=0)
    no_overlay = post(service, "/v1/inpaint", **common, mask_blur=0, mask_overlay=False)
    blurred = post(service, "/v1/inpaint", **common)  # mask_blur 4, A1111's default
    grown = post(service, "/v1/inpaint", image=png_b64(source), outpaint={"left": 16, "top": 8})

    out_sharp, out_plain, out_blurred, out_grown = (result(service, j) for j in (sharp, no_overlay, blurred, grown))

    original = pixels(source)
    assert np.array_equal(out_sharp[~inside], original[~inside])  # kept pixels come back exactly
    assert np.abs(out_sharp[inside] - original[inside]).mean() > 20  # the box was repainted
    assert np.abs(out_sharp[inside] - out_plain[inside]).max() <= 2  # the overlay changed nothing inside
    assert not np.array_equal(out_plain[~inside], original[~inside])  # without it, kept pixels went through the VAE

    soft = np.asarray(Image.open(service.data_dir / "images" / blurred / "mask.png"))
    kept = soft == 0
    assert np.array_equal(out_blurred[kept], original[kept])
    assert kept[:6].all() and kept[-6:].all() and kept[:, :6].all() and kept[:, -6:].all()  # 10+ px from the box

    assert out_grown.shape == (72, 80, 3)  # 64x64 + 16 left, 8 top
    mask = np.asarray(Image.open(service.data_dir / "images" / grown / "mask.png"))
    canvas = pixels(Image.open(service.data_dir / "images" / grown / "input.png"))
    assert np.array_equal(canvas[8:, 16:], original)
    assert np.array_equal(out_grown[mask == 0], canvas[mask == 0])  # the original area, pasted back
    assert (mask[8:, 16:] == 0).sum() > 0.7 * 64 * 64
    assert np.abs(out_grown[:8] - canvas[:8]).mean() > 5  # the new strip was painted, not left as filled
