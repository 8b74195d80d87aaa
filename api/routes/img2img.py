"""Submitting img2img and inpaint (outpaint included) jobs, with images as base64 JSON or multipart uploads.

The API decodes and prepares the inputs (``api.imageinput``) and writes them to storage as ``{job_id}/input.png``
and ``{job_id}/mask.png`` before the job is queued with their keys: image bytes never go through Redis, and the
worker gets its inputs already at the output size. A job that is not queued after all (limits, full queue,
idempotent replay) has its inputs deleted again.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from anyio import to_thread
from fastapi import APIRouter, Body, Response
from PIL import Image

from api.deps import IntakeDep, SettingsDep, StorageDep
from api.errors import ApiError
from api.imageinput import ImageInputError, ImageLimits, PreparedInputs, prepare_img2img, prepare_inpaint
from api.intake import SUBMIT_RESPONSES, Intake
from api.multipart import MultipartAsJsonRoute, multipart_openapi
from api.webhook_check import check_webhook
from core import jobstore
from core.jobs import GenerationParams, Img2ImgRequest, InpaintRequest, JobPublic, JobSpec, TaskKind
from core.settings import Settings
from core.storage import Storage

router = APIRouter(prefix="/v1", tags=["jobs"], route_class=MultipartAsJsonRoute)

R = TypeVar("R", bound=Img2ImgRequest)
_RESPONSES: dict[int | str, dict[str, Any]] = {
    **SUBMIT_RESPONSES,
    413: {**SUBMIT_RESPONSES[413], "description": "An image or mask is larger than SDQ_MAX_IMAGE_BYTES, or the "
                                                  "body than SDQ_MAX_BODY_BYTES."},
    422: {**SUBMIT_RESPONSES[422], "description": "A field breaks a rule, or an image cannot be used (format, "
                                                  "pixels, size, mask); nothing was queued."},
}

# 64x64 PNGs: a yellow disc on blue, and a mask whose white square covers the disc.
_DISC = (
    "iVBORw0KGgoAAAANSUhEUgAAAEAAAABACAIAAAAlC+aJAAAA00lEQVR42u3Z0Q2DMAxFUbA6DDN1DsbIYB2BcRiAfrT2M8HyzWelPnxiqyWwvs"
    "dnqbxsKb4AAAAAAAAAAAAAAJi3Xkm5Y9uvH+7HkF9o1R5ovtadKpEBfixdzrBZ1bu/Je6ApIhIK2x69cGcxv8Dqu0PptkTqo9kthyhjO13J3Mz"
    "Vw6QNz++fEYIAAAAxQAZ59pIPiNUEZA3RY7kriOU0QRfpt18PXla718hVRMiOZpHi+5DQnwLbOIWShrI0+l/JAXeD3AvBAAAAAAAAAAAAKAT4A"
    "Q+w0brNbkuYwAAAABJRU5ErkJggg=="
)
_SQUARE = (
    "iVBORw0KGgoAAAANSUhEUgAAAEAAAABACAAAAACPAi4CAAAAM0lEQVR42u3OIQ4AMAgEQej//1xEU4MjNRUz8hI2RAAc2Yc9PFivHwgICAgI"
    "CAj8FgC4CjPiAUBwf1GKAAAAAElFTkSuQmCC"
)
_IMG2IMG_EXAMPLES: dict[str, Any] = {
    "restyle": {
        "summary": "Restyle a picture, keeping its layout",
        "value": {"prompt": "an oil painting of the sun over the sea", "image": _DISC, "strength": 0.6, "steps": 20,
                  "seed": 42},
    },
}
_INPAINT_EXAMPLES: dict[str, Any] = {
    "inpaint": {
        "summary": "Repaint the white square of the mask",
        "value": {"prompt": "a red apple", "image": _DISC, "mask": _SQUARE, "steps": 20, "seed": 42},
    },
    "outpaint": {
        "summary": "Grow the canvas 64 px to the right and paint the new area",
        "value": {"prompt": "a wide seascape", "image": _DISC, "outpaint": {"right": 64, "overlap": 8}, "steps": 20},
    },
}


@router.post(
    "/img2img", status_code=202, responses=_RESPONSES,
    openapi_extra=multipart_openapi(Img2ImgRequest, files=("image",)),
)
async def submit_img2img(
    request: Annotated[Img2ImgRequest, Body(openapi_examples=_IMG2IMG_EXAMPLES)], response: Response,
    settings: SettingsDep, storage: StorageDep, intake: IntakeDep,
) -> JobPublic:
    """Queue an image-to-image job: `image` is noised by `strength` and denoised towards the prompt; the output
    has the image's size unless width/height say otherwise. Follow it at the `Location` header."""
    return await _submit(request, "img2img", prepare_img2img, response, settings, storage, intake)


@router.post(
    "/inpaint", status_code=202, responses=_RESPONSES,
    openapi_extra=multipart_openapi(InpaintRequest, files=("image", "mask")),
)
async def submit_inpaint(
    request: Annotated[InpaintRequest, Body(openapi_examples=_INPAINT_EXAMPLES)], response: Response,
    settings: SettingsDep, storage: StorageDep, intake: IntakeDep,
) -> JobPublic:
    """Queue an inpaint job: the white area of `mask` is repainted and the rest kept (pasted back exactly with
    `mask_overlay`). With `outpaint` the canvas grows and its new area is repainted; `mask` is then optional."""
    return await _submit(request, "inpaint", prepare_inpaint, response, settings, storage, intake)


async def _submit(
    request: R, task: TaskKind, prepare: Callable[[R, ImageLimits], PreparedInputs], response: Response,
    settings: Settings, storage: Storage, intake: Intake,
) -> JobPublic:
    await check_webhook(request, settings)  # 422 on `webhook` for a URL this server may not call
    try:
        # Decoding, resizing and PNG encoding are CPU work: off the event loop.
        inputs = await to_thread.run_sync(prepare, request, ImageLimits.from_settings(settings))
    except ImageInputError as exc:
        if exc.too_large:
            raise ApiError(413, "payload_too_large", exc.message, exc.field) from None
        raise ApiError(422, "invalid_request", exc.message, exc.field) from None
    spec = job_spec(request, task, inputs)
    await to_thread.run_sync(store_inputs, storage, spec, inputs)

    async def delete() -> None:
        await to_thread.run_sync(delete_inputs, storage, spec)

    return await intake.accept(spec, response, request, on_refused=delete)


def job_spec(request: Img2ImgRequest, task: TaskKind, inputs: PreparedInputs) -> JobSpec:
    """The job: the request's common fields at the prepared size, and where its inputs are stored."""
    common = request.model_dump(include=set(GenerationParams.model_fields))
    params = GenerationParams.model_validate({**common, "width": inputs.width, "height": inputs.height})
    spec = jobstore.new_job_spec(params, task)
    return spec.model_copy(update={
        "strength": request.strength,
        "init_image_key": f"{spec.id}/input.png",
        "mask_key": f"{spec.id}/mask.png" if inputs.mask is not None else None,
        "mask_overlay": isinstance(request, InpaintRequest) and request.mask_overlay,
    })


def store_inputs(storage: Storage, spec: JobSpec, inputs: PreparedInputs) -> None:
    assert spec.init_image_key is not None
    storage.put(spec.init_image_key, _png(inputs.image), "image/png")
    if inputs.mask is not None and spec.mask_key is not None:
        storage.put(spec.mask_key, _png(inputs.mask), "image/png")


def delete_inputs(storage: Storage, spec: JobSpec) -> None:
    for key in (spec.init_image_key, spec.mask_key):
        if key is not None:
            storage.delete(key)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)  # read once by a worker: speed over size
    return buf.getvalue()
