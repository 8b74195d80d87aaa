"""A1111's answer to txt2img / img2img: the images as raw base64, the request echoed, and `info`.

The infotexts are not built here: they are read from the stored PNGs' `parameters` chunks (`core.imagefile`,
written by the worker), so they equal the files' metadata by construction. The rest of `info` (model name and
hash, extra parameters such as "Schedule type") is parsed from the same text.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from api.a1111.models import GenerationFields, GenerationResponse
from core.imagefile import parse_parameters, read_parameters
from core.jobs import JobPublic
from core.rules import SAMPLERS
from core.version import __version__

# Settings of the parameters line that `info` has fields of its own for; the others are extra_generation_params.
_OWN_FIELDS = {"Steps", "Sampler", "CFG scale", "Seed", "Size", "Model hash", "Model", "Denoising strength"}


def infotexts(files: list[bytes]) -> list[str]:
    """Each stored image's A1111 `parameters` text."""
    return [read_parameters(data)["parameters"] or "" for data in files]


def generation_response(
    fields: GenerationFields, view: JobPublic, files: list[bytes], parameters: dict[str, Any]
) -> GenerationResponse:
    """The answer for an ended job: its images (none unless it succeeded, or with send_images false)."""
    texts = infotexts(files)
    images = [base64.b64encode(data).decode("ascii") for data in files] if fields.send_images else []
    return GenerationResponse(images=images, parameters=parameters, info=json.dumps(info(fields, view, texts)))


def info(fields: GenerationFields, view: JobPublic, texts: list[str]) -> dict[str, Any]:
    """A1111's `Processed.js()` fields for the job."""
    p = view.params
    settings: dict[str, str] = parse_parameters(texts[0])["settings"] if texts else {}
    started = view.started_at or view.created_at
    return {
        "prompt": p.prompt,
        "all_prompts": [p.prompt] * p.n,
        "negative_prompt": p.negative_prompt,
        "all_negative_prompts": [p.negative_prompt] * p.n,
        "seed": view.seeds[0],
        "all_seeds": view.seeds,
        "subseed": fields.subseed,
        "all_subseeds": [fields.subseed] * p.n,
        "subseed_strength": 0,
        "width": p.width,
        "height": p.height,
        "sampler_name": SAMPLERS[p.sampler].a1111_name,
        "cfg_scale": p.guidance_scale,
        "steps": p.steps,
        "batch_size": fields.batch_size,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": settings.get("Model"),
        "sd_model_hash": settings.get("Model hash"),
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": view.strength,
        "extra_generation_params": {k: v for k, v in settings.items() if k not in _OWN_FIELDS},
        "index_of_first_image": 0,
        "infotexts": texts,
        "styles": [],
        "job_timestamp": started.strftime("%Y%m%d%H%M%S"),
        "clip_skip": 1,
        "version": f"sdqueue {__version__}",
        "job_id": view.id,
        "status": view.status.value,
    }
