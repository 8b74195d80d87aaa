"""Result image files: PNG (default), JPEG or WebP bytes that carry their generation parameters.

The parameters use the text layout AUTOMATIC1111 writes, so image browsers, "PNG info" tabs and parsers of A1111
metadata read our images too::

    a photo of a cat                      <- prompt (may span lines)
    Negative prompt: blurry               <- omitted when empty, as A1111 does
    Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 42, Size: 512x512, Model hash: ...

- PNG: the text in a ``parameters`` tEXt chunk (iTXt when it is not Latin-1, as Pillow and A1111 do), plus an
  ``sdqueue`` iTXt chunk with our own JSON record of the request (job id, parameters, seed, model).
- JPEG / WebP: the text in EXIF UserComment, ``UNICODE\\0`` + UTF-16-BE, which is what A1111 writes. These formats
  have no place for the JSON record.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from core.jobs import JobSpec, OutputFormat
from core.rules import SAMPLERS

CONTENT_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
EXTENSIONS: dict[str, str] = {"png": "png", "jpeg": "jpg", "webp": "webp"}

PARAMETERS_KEY = "parameters"
SDQUEUE_KEY = "sdqueue"
EXIF_IFD = 0x8769
USER_COMMENT = 0x9286
UNICODE_PREFIX = b"UNICODE\x00"
ASCII_PREFIX = b"ASCII\x00\x00\x00"

# "Key: value" or 'Key: "quoted, value"' items of the settings line, separated by commas.
_SETTING = re.compile(r'\s*([\w][\w \-/+.()]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


@dataclass(frozen=True)
class ModelInfo:
    """What a file records about the checkpoint: A1111 writes its file stem and short hash."""

    name: str
    hash: str | None = None


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
    content_type: str
    extension: str  # without the dot: png, jpg, webp


def _quote(value: str) -> str:
    """Quote a value that would break the comma-separated settings line, as A1111 does."""
    if any(c in value for c in ',:"\n'):
        return json.dumps(value, ensure_ascii=False)
    return value


def a1111_parameters(
    spec: JobSpec, *, seed: int, model: ModelInfo, strength: float | None = None
) -> str:
    """The A1111 ``parameters`` text for the image of ``spec`` made with ``seed``.

    ``strength`` is the img2img / inpaint denoising strength (A1111's "Denoising strength"), None for txt2img.
    """
    p = spec.params
    items: list[tuple[str, str]] = [("Steps", str(p.steps)), ("Sampler", SAMPLERS[p.sampler].a1111_name)]
    if p.karras:  # as A1111 1.9+ writes it (older versions named the sampler "DPM++ 2M Karras")
        items.append(("Schedule type", "Karras"))
    items += [("CFG scale", f"{p.guidance_scale:g}"), ("Seed", str(seed)), ("Size", f"{p.width}x{p.height}")]
    if model.hash:
        items.append(("Model hash", model.hash))
    items.append(("Model", _quote(model.name)))
    if p.eta:  # DDIM only (core.rules)
        items.append(("Eta", f"{p.eta:g}"))
    if strength is not None:
        items.append(("Denoising strength", f"{strength:g}"))
    lines = [p.prompt] if p.prompt else []  # A1111 strips the text: an empty prompt leaves no blank first line
    if p.negative_prompt:
        lines.append(f"Negative prompt: {p.negative_prompt}")
    lines.append(", ".join(f"{k}: {v}" for k, v in items))
    return "\n".join(lines)


def sdqueue_record(spec: JobSpec, *, index: int, seed: int, model: ModelInfo) -> dict[str, Any]:
    """Our own JSON record of how an image was made: enough to submit the same job again."""
    return {
        "job_id": spec.id,
        "task": spec.task,
        "index": index,
        "seed": seed,
        "params": spec.params.model_dump(mode="json"),
        "model": {"name": model.name, "hash": model.hash},
    }


def encode_image(
    image: Image.Image,
    output_format: OutputFormat = "png",
    *,
    quality: int = 90,
    parameters: str | None = None,
    record: dict[str, Any] | None = None,
) -> EncodedImage:
    """Encode ``image``; ``parameters`` (A1111 text) and ``record`` (JSON, PNG only) go into its metadata."""
    if output_format not in CONTENT_TYPES:
        raise ValueError(f"output_format must be one of {', '.join(CONTENT_TYPES)}, got {output_format!r}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be between 1 and 100, got {quality}")
    buf = io.BytesIO()
    if output_format == "png":
        info = PngInfo()
        if parameters is not None:
            info.add_text(PARAMETERS_KEY, parameters)
        if record is not None:
            info.add_itxt(SDQUEUE_KEY, json.dumps(record, ensure_ascii=False, separators=(",", ":")))
        image.save(buf, format="PNG", pnginfo=info)
    else:
        options: dict[str, Any] = {"quality": quality}
        if parameters is not None:
            exif = Image.Exif()
            exif.get_ifd(EXIF_IFD)[USER_COMMENT] = UNICODE_PREFIX + parameters.encode("utf-16-be")
            options["exif"] = exif.tobytes()
        # JPEG has no alpha channel; our images are RGB already, this only guards other callers.
        rgb = image.convert("RGB") if image.mode not in ("RGB", "L") else image
        rgb.save(buf, format=output_format.upper(), **options)
    return EncodedImage(buf.getvalue(), CONTENT_TYPES[output_format], EXTENSIONS[output_format])


def encode_job_image(
    image: Image.Image, spec: JobSpec, *, index: int, seed: int, model: ModelInfo, strength: float | None = None
) -> EncodedImage:
    """Encode image ``index`` of a job in the job's ``output_format`` with its parameters and record."""
    p = spec.params
    return encode_image(
        image,
        p.output_format,
        quality=p.output_quality,
        parameters=a1111_parameters(spec, seed=seed, model=model, strength=strength),
        record=sdqueue_record(spec, index=index, seed=seed, model=model),
    )


def image_key(job_id: str, index: int, encoded: EncodedImage) -> str:
    """Storage key of image ``index`` of a job: ``{job_id}/{index}.{ext}``."""
    return f"{job_id}/{index}.{encoded.extension}"


def parse_parameters(text: str) -> dict[str, Any]:
    """Split A1111 ``parameters`` text into prompt, negative prompt and the settings of its last line."""
    lines = text.split("\n")
    settings: dict[str, str] = {}
    last = lines[-1] if lines else ""
    found = _SETTING.findall(last)
    # A1111's own reader needs a few "Key: value" items before it takes the last line for settings, not prompt.
    if len(found) >= 3:
        lines = lines[:-1]
        for key, value in found:
            settings[key.strip()] = json.loads(value) if value.startswith('"') else value.strip()
    prompt_lines: list[str] = []
    negative_lines: list[str] | None = None
    for line in lines:
        if negative_lines is None and line.startswith("Negative prompt:"):
            negative_lines = [line[len("Negative prompt:") :].strip()]
        elif negative_lines is None:
            prompt_lines.append(line)
        else:
            negative_lines.append(line)
    return {
        "prompt": "\n".join(prompt_lines).strip(),
        "negative_prompt": "\n".join(negative_lines or []).strip(),
        "settings": settings,
    }


def _user_comment(image: Image.Image) -> str | None:
    raw = image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
    if raw is None:
        return None
    if isinstance(raw, str):
        return raw
    data = bytes(raw)
    if data.startswith(UNICODE_PREFIX):
        # A1111 writes big-endian UTF-16; some tools write little-endian with a byte order mark.
        body = data[len(UNICODE_PREFIX) :]
        return body.decode("utf-16") if body[:2] in (b"\xff\xfe", b"\xfe\xff") else body.decode("utf-16-be")
    if data.startswith(ASCII_PREFIX):
        return data[len(ASCII_PREFIX) :].decode("ascii", errors="replace")
    return data.decode("utf-8", errors="replace")


def read_parameters(source: str | Path | bytes) -> dict[str, Any]:
    """What an image file says about how it was made.

    Returns ``{"format", "width", "height", "parameters": A1111 text or None, "prompt", "negative_prompt",
    "settings": {A1111 key: value}, "sdqueue": our JSON record or None}``.
    """
    opened = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    with opened as image:
        if image.format == "PNG":
            text_chunks = dict(getattr(image, "text", {}))
            parameters = text_chunks.get(PARAMETERS_KEY)
            raw_record = text_chunks.get(SDQUEUE_KEY)
        else:
            parameters = _user_comment(image)
            raw_record = None
        result: dict[str, Any] = {
            "format": image.format,
            "width": image.width,
            "height": image.height,
            "parameters": parameters,
            "sdqueue": json.loads(raw_record) if raw_record else None,
        }
    if parameters is not None:
        result.update(parse_parameters(parameters))
    return result
