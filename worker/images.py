"""Result images: written to storage as ``{job_id}/{index}.{ext}`` in the job's output format.

Encoding (and the AUTOMATIC1111 ``parameters`` metadata every file carries) lives in ``core.imagefile``.
"""

from __future__ import annotations

import base64
import io
from typing import Any

from PIL import Image

from core.imagefile import ModelInfo, encode_job_image, image_key
from core.jobs import JobSpec
from core.storage import Storage


def store_images(
    storage: Storage, spec: JobSpec, images: list[Image.Image], seeds: list[int], model: ModelInfo
) -> list[dict[str, Any]]:
    """Write the images of one job and return their records (ImageRecord without ``url``: the API adds it).

    A retried job overwrites the same keys with the same pixels, so writing twice is harmless.
    """
    strength = spec.strength if spec.task != "txt2img" else None
    records = []
    for index, (image, seed) in enumerate(zip(images, seeds, strict=True)):
        encoded = encode_job_image(image, spec, index=index, seed=seed, model=model, strength=strength)
        key = image_key(spec.id, index, encoded)
        storage.put(key, encoded.data, encoded.content_type)
        records.append(
            {"key": key, "seed": seed, "width": image.width, "height": image.height,
             "content_type": encoded.content_type}
        )
    return records


def preview_jpeg_base64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=70)
    return base64.b64encode(buf.getvalue()).decode("ascii")
