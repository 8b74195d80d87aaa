"""`POST /v1/images/generations`, `/edits` and `/variations`: OpenAI's Images API, answered synchronously.

Each route translates its request onto a native one (`translation`), queues it through the native intake (auth,
priority, Idempotency-Key, limits, group commit), waits for the job (`api.sync_jobs`) and answers with its images.
Input images are prepared and stored as the native img2img / inpaint routes do (`api.routes.img2img`).
"""

from __future__ import annotations

import base64
from typing import Annotated, Any

from anyio import to_thread
from fastapi import APIRouter, Body, Request, Response

from api.deps import IntakeDep, SettingsDep, StorageDep
from api.errors import ApiError
from api.imageinput import ImageInputError, ImageLimits, prepare_img2img, prepare_inpaint
from api.intake import Intake
from api.multipart import multipart_openapi
from api.openai_images import errors, translation
from api.openai_images.mask import native_mask
from api.openai_images.translation import (
    ImageEditRequest,
    ImageGenerationRequest,
    ImagesResponse,
    ImageVariationRequest,
)
from api.routes.img2img import delete_inputs, job_spec, store_inputs
from api.sync_jobs import CLIENT_GONE, SyncMultipartRoute, submit_and_wait
from core import jobstore
from core.jobs import Img2ImgRequest, InpaintRequest, JobPublic, Status
from core.storage import Storage

router = APIRouter(prefix="/v1/images", tags=["OpenAI Images"], route_class=SyncMultipartRoute)
PATHS = ("/v1/images/generations", "/v1/images/edits", "/v1/images/variations")

_RESPONSES = errors.responses({
    400: "A field breaks a rule (or the body cannot be read); nothing was queued.",
    401: "No API key, or an unknown one: send `Authorization: Bearer <key>`.",
    409: "The Idempotency-Key was used with another body, or its first request is still being handled "
         "(`Retry-After`); or the job was canceled.",
    413: "An image is larger than SDQ_MAX_IMAGE_BYTES, or the body than SDQ_MAX_BODY_BYTES.",
    429: "Too many requests or waiting jobs for this API key; retry after `Retry-After`.",
    500: "The job failed (the message says why).",
    503: "The queue is full or Redis is unreachable; retry after `Retry-After`, with the same Idempotency-Key.",
})
_SYNC = (
    " The answer comes when the images are made. A client that disconnects while its job is queued cancels it, "
    "unless it sent an `Idempotency-Key`: a resend with that key is answered with the same job's images."
)
_GENERATION_EXAMPLES: dict[str, Any] = {
    "small": {"summary": "One 512x512 image", "value": {"prompt": "a photo of a cat", "size": "512x512"}},
}


@router.post(
    "/generations", response_model=ImagesResponse, responses=_RESPONSES, response_model_exclude_none=True,
    description="Create images from a prompt (OpenAI's `images.generate`)." + _SYNC,
)
async def create_image(
    body: Annotated[ImageGenerationRequest, Body(openapi_examples=_GENERATION_EXAMPLES)], request: Request,
    response: Response, intake: IntakeDep, storage: StorageDep,
) -> ImagesResponse | Response:
    native = translation.txt2img(body, intake.caller.default_priority())
    job = await submit_and_wait(request, intake, response, jobstore.new_job_spec(native, "txt2img"), native)
    return await _answer(job, body.response_format, storage)


@router.post(
    "/edits", response_model=ImagesResponse, responses=_RESPONSES, response_model_exclude_none=True,
    description="Redraw an image after a prompt (OpenAI's `images.edit`): with a mask, only the mask's transparent "
    "area (inpaint); without one, the whole image (image-to-image)." + _SYNC,
    openapi_extra=multipart_openapi(ImageEditRequest, files=("image", "image[]", "mask")),
)
async def create_image_edit(
    body: ImageEditRequest, request: Request, response: Response, intake: IntakeDep, settings: SettingsDep,
    storage: StorageDep,
) -> ImagesResponse | Response:
    image = translation.edit_image(body)
    limits = ImageLimits.from_settings(settings)
    native: Img2ImgRequest
    if body.mask is not None:
        mask = await _inputs(native_mask, body.mask, limits)
        native = translation.inpaint(body, image, mask, intake.caller.default_priority())
    else:
        native = translation.img2img(body, image, intake.caller.default_priority())
    job = await _with_inputs(native, limits, request, intake, response, storage)
    return await _answer(job, body.response_format, storage)


@router.post(
    "/variations", response_model=ImagesResponse, responses=_RESPONSES, response_model_exclude_none=True,
    description="Variations of an image (OpenAI's `images.create_variation`): image-to-image without a prompt."
    + _SYNC,
    openapi_extra=multipart_openapi(ImageVariationRequest, files=("image",)),
)
async def create_image_variation(
    body: ImageVariationRequest, request: Request, response: Response, intake: IntakeDep, settings: SettingsDep,
    storage: StorageDep,
) -> ImagesResponse | Response:
    native = translation.variation(body, intake.caller.default_priority())
    job = await _with_inputs(native, ImageLimits.from_settings(settings), request, intake, response, storage)
    return await _answer(job, body.response_format, storage)


async def _with_inputs(
    native: Img2ImgRequest, limits: ImageLimits, request: Request, intake: Intake, response: Response,
    storage: Storage,
) -> JobPublic | None:
    """Prepare and store the input image (and mask) as the native routes do, then queue and wait."""
    if isinstance(native, InpaintRequest):
        inputs = await _inputs(prepare_inpaint, native, limits)
        spec = job_spec(native, "inpaint", inputs)
    else:
        inputs = await _inputs(prepare_img2img, native, limits)
        spec = job_spec(native, "img2img", inputs)
    await to_thread.run_sync(store_inputs, storage, spec, inputs)

    async def delete() -> None:
        await to_thread.run_sync(delete_inputs, storage, spec)

    return await submit_and_wait(request, intake, response, spec, native, on_refused=delete)


async def _inputs(prepare: Any, *args: Any) -> Any:
    """`prepare(*args)` off the event loop (decoding and resizing are CPU work); image errors as 413 / 422."""
    try:
        return await to_thread.run_sync(prepare, *args)
    except ImageInputError as exc:
        raise ApiError(413 if exc.too_large else 422, "payload_too_large" if exc.too_large else "invalid_request",
                       exc.message, exc.field) from None


async def _answer(job: JobPublic | None, response_format: str | None, storage: Storage) -> ImagesResponse | Response:
    if job is None:
        return Response(status_code=CLIENT_GONE)
    job = _succeeded(job)
    if response_format == "url":
        return translation.images_response(job, None)
    files = [await to_thread.run_sync(storage.get, record.key) for record in job.images]
    return translation.images_response(job, [base64.b64encode(data).decode("ascii") for data in files])


def _succeeded(job: JobPublic) -> JobPublic:
    """`job` if it succeeded; else the error its client gets (no resend helps: `x-should-retry: false`)."""
    if job.status is Status.succeeded:
        return job
    no_retry = {"x-should-retry": "false"}
    if job.status is Status.canceled:
        raise ApiError(409, "conflict", f"job {job.id} was canceled before it finished", headers=no_retry)
    reason = f"{job.error.type}: {job.error.message}" if job.error else "no reason recorded"
    raise ApiError(500, "internal_error", f"job {job.id} failed ({reason})", headers=no_retry)
