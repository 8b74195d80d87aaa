"""POST /sdapi/v1/txt2img and /sdapi/v1/img2img: A1111's synchronous generation, over the native queue.

Each request is translated onto the native request model (`api.a1111.translate`), submitted through the native
intake (auth, priority, Idempotency-Key, per-key limits, the group commit, metrics), input images prepared and
stored as for `/v1/img2img`, and answered once the job has ended (`api.sync_jobs`: no limit of its own; a client
that hangs up cancels its queued job, unless it sent an Idempotency-Key). So a job made here is an
ordinary job: it batches with native jobs, shows in `GET /v1/jobs`, and the same seed gives the same pixels.
"""

from __future__ import annotations

from typing import Annotated, Any

from anyio import to_thread
from fastapi import APIRouter, Depends, Header, Request, Response

from api import errors
from api.a1111 import info, translate
from api.a1111.catalog import selected_model
from api.a1111.models import GenerationFields, GenerationResponse, Img2ImgFields, Txt2ImgFields
from api.deps import CallerDep, ServicesDep
from api.errors import ApiError
from api.imageinput import ImageInputError, ImageLimits, prepare_img2img, prepare_inpaint
from api.intake import Intake, Services
from api.routes.img2img import delete_inputs, job_spec, store_inputs
from api.sync_jobs import CLIENT_GONE, SyncRoute, submit_and_wait
from core import jobstore
from core.catalog import ModelInfo, loaded_models
from core.jobs import InpaintRequest, JobPublic, Status, TaskKind
from core.storage import Storage

router = APIRouter(prefix="/sdapi/v1", tags=["a1111"], route_class=SyncRoute)

_RESPONSES: dict[int | str, dict[str, Any]] = errors.responses(409, 413, 422, 429, 500, described={
    409: "The Idempotency-Key was used with a different body, or its first request is still being handled.",
    413: "The body, an image or the mask is too large.",
    422: "A field breaks a rule or asks for a feature sdqueue lacks; the message names the A1111 field. Nothing "
         "was queued.",
    500: "The job failed in the worker (the message says why).",
})


async def _intake(
    services: ServicesDep, caller: CallerDep,
    idempotency_key: Annotated[str | None, Header(
        min_length=1, max_length=255, pattern=r"^[\x21-\x7e]+$",
        description="As on the native API: a repeat with the same key and body within 24 h answers with the "
        "first request's job instead of queuing another. A client that hangs up cancels its queued job unless it "
        "sent this key: the job then stays for the resend.",
    )] = None,
) -> Intake:
    return Intake(services, caller, None, idempotency_key)  # never `Prefer: wait`: this layer always waits


IntakeDep = Annotated[Intake, Depends(_intake)]


@router.post("/txt2img", response_model=GenerationResponse, responses=_RESPONSES)
async def a1111_txt2img(
    fields: Txt2ImgFields, request: Request, response: Response, intake: IntakeDep
) -> GenerationResponse | Response:
    """AUTOMATIC1111's txt2img: queue the job, answer when it has ended with its images as raw base64 PNG."""
    native = translate.txt2img_request(fields, intake.caller.default_priority(), await _models(intake.s, fields),
                                       await to_thread.run_sync(selected_model, intake.s.redis, intake.s.keys))
    job = await submit_and_wait(request, intake, response, jobstore.new_job_spec(native, "txt2img"), native)
    return await _answer(intake.s, fields, job, fields.model_dump())


@router.post("/img2img", response_model=GenerationResponse, responses=_RESPONSES)
async def a1111_img2img(
    fields: Img2ImgFields, request: Request, response: Response, intake: IntakeDep
) -> GenerationResponse | Response:
    """AUTOMATIC1111's img2img; with `mask`, an inpaint (white repainted, the rest pasted back)."""
    s = intake.s
    native = translate.img2img_request(fields, intake.caller.default_priority(), await _models(s, fields),
                                       await to_thread.run_sync(selected_model, s.redis, s.keys))
    limits = ImageLimits.from_settings(s.settings)
    task: TaskKind
    try:
        if isinstance(native, InpaintRequest):
            task, inputs = "inpaint", await to_thread.run_sync(prepare_inpaint, native, limits)
        else:
            task, inputs = "img2img", await to_thread.run_sync(prepare_img2img, native, limits)
    except ImageInputError as exc:
        raise translate.image_error(exc.field, exc.message, exc.too_large) from None
    spec = job_spec(native, task, inputs)
    await to_thread.run_sync(store_inputs, s.storage, spec, inputs)

    async def delete() -> None:
        await to_thread.run_sync(delete_inputs, s.storage, spec)

    job = await submit_and_wait(request, intake, response, spec, native, on_refused=delete)
    parameters = fields.model_dump()
    if not fields.include_init_images:  # as A1111: the inputs are echoed only when asked for
        parameters.update(init_images=None, mask=None)
    return await _answer(s, fields, job, parameters)


async def _models(s: Services, fields: GenerationFields) -> list[ModelInfo] | None:
    """The live workers' models, read only when the request names one (override_settings)."""
    if not any(key in fields.override_settings for key in translate.MODEL_OPTIONS):
        return None
    return (await to_thread.run_sync(loaded_models, s.redis, s.keys)).models


async def _answer(
    s: Services, fields: GenerationFields, ended: JobPublic | None, parameters: dict[str, Any]
) -> GenerationResponse | Response:
    if ended is None:
        return Response(status_code=CLIENT_GONE)
    if ended.status is Status.failed:
        error = ended.error
        reason = f"{error.type}: {error.message}" if error else "no reason recorded"
        raise ApiError(500, "internal_error", f"job {ended.id} failed: {reason}")
    # A canceled job (POST /sdapi/v1/interrupt) answers as A1111 does, with what it made: here, no image.
    files = await to_thread.run_sync(_read_images, s.storage, ended) if ended.status is Status.succeeded else []
    return info.generation_response(fields, ended, files, parameters)


def _read_images(storage: Storage, view: JobPublic) -> list[bytes]:
    return [storage.get(image.key) for image in view.images]
