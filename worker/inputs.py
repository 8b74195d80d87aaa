"""The input images of img2img / inpaint jobs: read from storage for the pipeline, and pasted back afterwards.

The API stored them already prepared (``api.imageinput``): an RGB image and an L mask (255 = repaint, soft at a
blurred edge) at the job's width x height, so the worker only reads them.
"""

from __future__ import annotations

import dataclasses
import io

from PIL import Image

from core.jobs import JobSpec
from core.storage import Storage
from model.requests import GenerationRequest, GenerationResult


def load_inputs(spec: JobSpec, storage: Storage | None) -> tuple[Image.Image | None, Image.Image | None]:
    """(init image, mask) of ``spec``; (None, None) for txt2img."""
    if spec.init_image_key is None:
        return None, None
    if storage is None:
        raise ValueError(f"job {spec.id} is {spec.task}: its input images need the storage they were written to")
    image = _read(storage, spec.init_image_key, "RGB")
    mask = _read(storage, spec.mask_key, "L") if spec.mask_key is not None else None
    return image, mask


def _read(storage: Storage, key: str, mode: str) -> Image.Image:
    try:
        data = storage.get(key)
    except KeyError:
        raise ValueError(f"input image {key} is missing from storage (deleted before the job ran?)") from None
    image = Image.open(io.BytesIO(data), formats=["PNG"])
    return image.convert(mode)


def paste_back(spec: JobSpec, request: GenerationRequest, result: GenerationResult) -> GenerationResult:
    """With ``mask_overlay``: the original pixels where the mask keeps them, blended by the mask's soft edge, as
    AUTOMATIC1111's and diffusers' overlay do; otherwise the result as it is (kept pixels went through the VAE)."""
    if not spec.mask_overlay or request.init_image is None or request.mask is None:
        return result
    images = [Image.composite(image.convert("RGB"), request.init_image, request.mask) for image in result.images]
    return dataclasses.replace(result, images=images)
