"""OpenAI Images requests onto the native request models, and finished jobs back into OpenAI's `ImagesResponse`.

This is the only place that knows OpenAI's field names. Every rule of a generation stays where it is: the native
models (`core.jobs`, hence `core.rules`) validate what this module builds, and their messages come back naming the
OpenAI field (`size '1001x512': width must be a multiple of 8, got 1001`).

| OpenAI | native | |
|---|---|---|
| `prompt` | `prompt` | variations have none: the empty prompt, so the image alone steers them |
| `n` | `n` | 1..8 (OpenAI allows 10) |
| `image` or `image[]` (one), `mask` (edits) | `InpaintRequest` | mask: fully transparent = repaint (`mask.py`) |
| `image` (edits without a mask, variations) | `Img2ImgRequest` | native strength 0.75 |
| `size` | `width`, `height` | `"WIDTHxHEIGHT"`; `"auto"`/absent: 512x512 (generations), the image's size (edits) |
| `quality` | `steps` | `QUALITY_STEPS` |
| `output_format` | `output_format` | png, jpeg, webp |
| `output_compression` | `output_quality` | 0..100, 0 counts as 1 |
| `seed` (sdqueue's own) | `seed` | absent, null or -1: random |
| `response_format` | | b64_json (default) or url: how the answer carries the images |
| `background` | | auto or opaque; transparent is refused |
| `stream` | | false only; true is refused |
| | `priority` | `Caller.default_priority`: normal, or the API key's highest when lower (OpenAI has none) |
| `model` | `model` | `dall-e-*`, `gpt-image-*` (OpenAI's names) or none: the default model; else a served one |
| `style`, `user` and any other field | | accepted, no effect |
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from api.errors import ApiError, describe, summarize
from core.jobs import Img2ImgRequest, InpaintRequest, JobPublic, OutputFormat, Priority, Txt2ImgRequest

Quality = Literal["low", "medium", "auto", "standard", "high", "hd", "xhigh", "max"]
# OpenAI's quality names as denoising steps; "auto" (the default) is the native default of 30.
QUALITY_STEPS: dict[str, int] = {
    "low": 15, "medium": 25, "auto": 30, "standard": 30, "high": 40, "hd": 40, "xhigh": 50, "max": 75,
}
DEFAULT_SIZE = (512, 512)  # "auto" for generations: what SD 1.x models were trained at
ResponseFormat = Literal["b64_json", "url"]
# OpenAI's model names: clients send them by default, so they mean "the deployment's default model".
OPENAI_MODEL_PREFIXES = ("dall-e-", "gpt-image-")
# Native field -> the OpenAI field it came from, for error messages.
_OPENAI_FIELD = {"width": "size", "height": "size", "steps": "quality", "output_quality": "output_compression"}
_SIZE = re.compile(r"(\d{1,6})x(\d{1,6})")
N = TypeVar("N", bound=BaseModel)


class _ImagesRequest(BaseModel):
    """What every Images request may carry. Fields OpenAI adds later are accepted and do nothing."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="A model from `GET /v1/models`; OpenAI's names (`dall-e-2`, "
                                                "`dall-e-3`, `gpt-image-1`, ...) or none: the default model.")
    n: int | None = Field(None, description="Images to generate, 1..8.")
    size: str | None = Field(None, description="`WIDTHxHEIGHT` in pixels, each 64..2048 and a multiple of 8, or "
                                               "`auto`.", examples=["512x512"])
    response_format: ResponseFormat | None = Field(
        None, description="`b64_json` (default): the image in the answer; `url`: a link to it on this server.")
    user: str | None = Field(None, description="Accepted, not used.")
    seed: int | None = Field(None, description="sdqueue's own: the same seed gives the same pixels as the native "
                                               "API with the same seed; absent, null or -1 = random.")


class _Rendered(_ImagesRequest):
    """Requests that describe their output's quality and file."""

    prompt: str = Field(description="What to draw.")
    quality: Quality | None = Field(None, description="Denoising steps: low 15, medium 25, auto/standard 30, "
                                                      "high/hd 40, xhigh 50, max 75.")
    output_format: OutputFormat | None = Field(None, description="png (default), jpeg or webp.")
    output_compression: int | None = Field(None, ge=0, le=100, description="JPEG / WebP quality, 0..100.")
    background: Literal["transparent", "opaque", "auto"] | None = Field(
        None, description="auto or opaque; sdqueue's images have no transparency.")
    stream: bool | None = Field(None, description="Only false: answers are not streamed.")


class ImageGenerationRequest(_Rendered):
    """`POST /v1/images/generations`."""

    style: Literal["vivid", "natural"] | None = Field(None, description="Accepted, no effect.")


class ImageEditRequest(_Rendered):
    """`POST /v1/images/edits` (multipart): one image, and optionally a mask whose transparent pixels are
    repainted."""

    image: str | list[str] | None = Field(None, description="The image to edit (PNG, JPEG or WebP).")
    image_list: list[str] | None = Field(None, alias="image[]", description="The same, as OpenAI's clients send "
                                                                            "a list; one image only.")
    mask: str | None = Field(None, description="A PNG the size of `image`: its fully transparent pixels mark the "
                                               "area to repaint, the rest is kept. Absent: the whole image is "
                                               "redrawn (image-to-image).")


class ImageVariationRequest(_ImagesRequest):
    """`POST /v1/images/variations` (multipart)."""

    image: str = Field(description="The image to vary (PNG, JPEG or WebP).")


class ImageData(BaseModel):
    b64_json: str | None = Field(None, description="The image file, base64.")
    url: str | None = Field(None, description="With `response_format=url`: where to download the image.")
    revised_prompt: str | None = Field(None, description="The prompt used (prompts are never rewritten).")


class ImagesResponse(BaseModel):
    created: int = Field(description="Unix seconds when the job was created.")
    data: list[ImageData]
    output_format: OutputFormat
    size: str = Field(description="`WIDTHxHEIGHT` of the images.")
    background: Literal["opaque"] = "opaque"


# requests -----------------------------------------------------------------------------------------------------------
def txt2img(request: ImageGenerationRequest, priority: Priority = Priority.normal) -> Txt2ImgRequest:
    _check_rendering(request)
    width, height = _size(request.size) or DEFAULT_SIZE
    return _native(Txt2ImgRequest, request, {
        "prompt": request.prompt, "width": width, "height": height, **_rendering(request),
        **_common(request, priority),
    })


def edit_image(request: ImageEditRequest) -> str:
    """The one image of an edit, whether sent as `image` or `image[]`."""
    given = request.image if isinstance(request.image, list) else [request.image] if request.image else []
    images = given + (request.image_list or [])
    if len(images) != 1:
        raise ApiError(422, "invalid_request", f"image: send exactly one image to edit (as image or image[]), got "
                                               f"{len(images)}", field="image")
    return images[0]


def img2img(request: ImageEditRequest, image: str, priority: Priority = Priority.normal) -> Img2ImgRequest:
    """An edit without a mask: the whole image redrawn towards the prompt (native img2img defaults)."""
    _check_rendering(request)
    return _native(Img2ImgRequest, request, {
        "prompt": request.prompt, "image": image, **_sides(request.size), **_rendering(request),
        **_common(request, priority),
    })


def inpaint(
    request: ImageEditRequest, image: str, mask: str, priority: Priority = Priority.normal
) -> InpaintRequest:
    """An edit with a mask; `mask` is already native (white = repaint, see `api.openai_images.mask`)."""
    _check_rendering(request)
    return _native(InpaintRequest, request, {
        "prompt": request.prompt, "image": image, "mask": mask, **_sides(request.size), **_rendering(request),
        **_common(request, priority),
    })


def variation(request: ImageVariationRequest, priority: Priority = Priority.normal) -> Img2ImgRequest:
    return _native(Img2ImgRequest, request, {
        "prompt": "", "image": request.image, **_sides(request.size), **_common(request, priority),
    })


def _common(request: _ImagesRequest, priority: Priority) -> dict[str, Any]:
    fields: dict[str, Any] = {"seed": request.seed, "priority": priority}
    if request.model is not None and not request.model.startswith(OPENAI_MODEL_PREFIXES):
        fields["model"] = request.model
    if request.n is not None:
        fields["n"] = request.n
    return fields


def _rendering(request: _Rendered) -> dict[str, Any]:
    fields: dict[str, Any] = {"steps": QUALITY_STEPS[request.quality or "auto"]}
    if request.output_format is not None:
        fields["output_format"] = request.output_format
    if request.output_compression is not None:
        fields["output_quality"] = max(1, request.output_compression)
    return fields


def _check_rendering(request: _Rendered) -> None:
    if request.background == "transparent":
        raise ApiError(422, "invalid_request", "background 'transparent' is not supported: images are opaque; send "
                                               "'opaque' or 'auto'", field="background")
    if request.stream:
        raise ApiError(422, "invalid_request", "stream: streamed answers are not supported; leave stream unset or "
                                               "false", field="stream")


def _size(size: str | None) -> tuple[int, int] | None:
    """(width, height) of `size`; None for "auto" or none."""
    if size is None or size == "auto":
        return None
    match = _SIZE.fullmatch(size.strip())
    if match is None:
        raise ApiError(422, "invalid_request", f"size must be 'WIDTHxHEIGHT' in pixels (e.g. '512x512') or 'auto', "
                                               f"got {summarize(size)}", field="size")
    return int(match[1]), int(match[2])


def _sides(size: str | None) -> dict[str, int]:
    """Native width and height for an image input: none for "auto", so the output keeps the image's size."""
    parsed = _size(size)
    return {} if parsed is None else {"width": parsed[0], "height": parsed[1]}


def _native(model: type[N], request: _ImagesRequest, fields: Mapping[str, Any]) -> N:
    """`model` validated from `fields`; its first error as a 422 naming the OpenAI field."""
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        native_field, message = describe(exc.errors()[0])
        field = _OPENAI_FIELD.get(native_field, native_field)
        if field == "size":
            message = f"size {request.size!r}: {message}"
        elif field != native_field:
            message = f"{field} ({message})"
        raise ApiError(422, "invalid_request", message, field=field) from None


# answers -------------------------------------------------------------------------------------------------------------
def images_response(job: JobPublic, images_b64: list[str] | None) -> ImagesResponse:
    """The answer for a job that succeeded: its images as `images_b64` (b64_json), else as URLs."""
    params = job.params
    data = [
        ImageData(b64_json=images_b64[i] if images_b64 is not None else None,
                  url=None if images_b64 is not None else record.url, revised_prompt=params.prompt)
        for i, record in enumerate(job.images)
    ]
    first = job.images[0] if job.images else None
    width, height = (first.width, first.height) if first else (params.width, params.height)
    return ImagesResponse(created=int(job.created_at.timestamp()), data=data, output_format=params.output_format,
                          size=f"{width}x{height}")
