"""Result images: PNG files that carry their generation parameters, written to storage as ``{job_id}/{index}.png``.

The ``parameters`` text chunk uses the layout AUTOMATIC1111 writes, so image browsers and "PNG info" tools that read
A1111 files show the prompt, seed and settings of our images too.
"""

from __future__ import annotations

import base64
import io
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from core.jobs import JobSpec
from core.storage import Storage

# A1111's names for our samplers; with karras=True A1111 writes "Schedule type: Karras" next to them.
A1111_SAMPLERS = {"ddim": "DDIM", "euler": "Euler", "euler_a": "Euler a", "dpmpp_2m": "DPM++ 2M"}
PNG = "image/png"


def a1111_parameters(spec: JobSpec, seed: int, model_name: str) -> str:
    p = spec.params
    settings = [f"Steps: {p.steps}", f"Sampler: {A1111_SAMPLERS[p.sampler.value]}"]
    if p.karras:
        settings.append("Schedule type: Karras")
    settings += [f"CFG scale: {p.guidance_scale:g}", f"Seed: {seed}", f"Size: {p.width}x{p.height}"]
    settings.append(f"Model: {model_name}")
    if p.eta:
        settings.append(f"Eta: {p.eta:g}")
    lines = [p.prompt]
    if p.negative_prompt:
        lines.append(f"Negative prompt: {p.negative_prompt}")
    lines.append(", ".join(settings))
    return "\n".join(lines)


def encode_png(image: Image.Image, parameters: str) -> bytes:
    info = PngInfo()
    info.add_text("parameters", parameters)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def image_key(job_id: str, index: int) -> str:
    return f"{job_id}/{index}.png"


def store_images(
    storage: Storage, spec: JobSpec, images: list[Image.Image], seeds: list[int], model_name: str
) -> list[dict[str, Any]]:
    """Write the images of one job and return their records (ImageRecord without ``url``: the API adds it).

    A retried job overwrites the same keys with the same pixels, so writing twice is harmless.
    """
    records = []
    for index, (image, seed) in enumerate(zip(images, seeds, strict=True)):
        key = image_key(spec.id, index)
        storage.put(key, encode_png(image, a1111_parameters(spec, seed, model_name)), PNG)
        records.append({"key": key, "seed": seed, "width": image.width, "height": image.height, "content_type": PNG})
    return records


def preview_jpeg_base64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=70)
    return base64.b64encode(buf.getvalue()).decode("ascii")
