"""Submitting text-to-image jobs, and listing, reading and canceling one's jobs."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Response
from pydantic import BaseModel, Field
from redis import Redis
from rq.job import Job

from api import errors, joblist
from api.auth import AuthenticatedRoute, Caller
from api.deps import CallerDep, IntakeDep, KeysDep, RedisDep, SettingsDep, StorageDep
from api.errors import ApiError
from api.intake import SUBMIT_RESPONSES
from api.webhook_check import check_webhook
from core import jobstore
from core.jobs import JobPublic, Status, Txt2ImgRequest
from core.jobstore import CancelOutcome
from core.queues import Keys
from core.webhook_queue import WebhookNotifier

router = APIRouter(prefix="/v1", tags=["jobs"], route_class=AuthenticatedRoute)

_TXT2IMG_EXAMPLES: dict[str, Any] = {
    "small": {
        "summary": "A quick 256x256 image",
        "value": {"prompt": "a photo of a cat", "width": 256, "height": 256, "steps": 20, "seed": 42},
    },
    "full": {
        "summary": "Every common field",
        "value": {
            "prompt": "a watercolor painting of a lighthouse at dawn", "negative_prompt": "blurry, low quality",
            "width": 512, "height": 512, "steps": 30, "guidance_scale": 7.5, "sampler": "dpmpp_2m", "karras": True,
            "seed": -1, "n": 2, "priority": "normal", "preview_every": 5, "output_format": "png",
        },
    },
}


class JobList(BaseModel):
    jobs: list[JobPublic] = Field(description="Newest first.")
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null when there is no more.")


@router.post("/txt2img", status_code=202, responses=SUBMIT_RESPONSES)
async def submit_txt2img(
    request: Annotated[Txt2ImgRequest, Body(openapi_examples=_TXT2IMG_EXAMPLES)],
    response: Response,
    settings: SettingsDep,
    intake: IntakeDep,
) -> JobPublic:
    """Queue a text-to-image job. Follow it at the `Location` header (poll, or `/events`), or send
    `Prefer: wait=N` to get the finished job in this answer when it ends within N seconds."""
    await check_webhook(request, settings)  # 422 on `webhook` for a URL this server may not call
    return await intake.accept(jobstore.new_job_spec(request, "txt2img"), response, request)


# Plain `def` routes: RQ and redis-py are synchronous, so FastAPI runs these in its thread pool, where each call
# borrows a connection from the client's pool; the event loop stays free for other requests.
@router.get("/jobs", responses=errors.responses(422, described={422: "A query parameter breaks its rule."}))
def list_jobs(
    caller: CallerDep,
    redis: RedisDep,
    keys: KeysDep,
    storage: StorageDep,
    status: Annotated[Status | None, Query(description="Only jobs with this status.")] = None,
    limit: Annotated[int, Query(ge=1, le=100, description="Jobs per page.")] = 20,
    cursor: Annotated[str | None, Query(max_length=200, description="`next_cursor` of the previous page.")] = None,
) -> JobList:
    """The caller's own jobs (with auth off: those submitted without a key), newest first, a page at a time.
    With `status`, a page may hold fewer than `limit` jobs; go on while `next_cursor` is not null."""
    try:
        page = joblist.list_jobs(redis, keys, storage, caller.name, status=status, limit=limit, cursor=cursor)
    except ValueError as exc:
        raise ApiError(422, "invalid_request", f"cursor: {exc}", field="cursor") from None
    return JobList(jobs=page.jobs, next_cursor=page.next_cursor)


@router.get("/jobs/{job_id}", responses=errors.responses(404))
def get_job(job_id: str, caller: CallerDep, redis: RedisDep, keys: KeysDep, storage: StorageDep) -> JobPublic:
    """Status, queue position and ETA, progress, timings, seeds, image URLs or error of a job."""
    return jobstore.job_view(redis, keys, storage, owned_job(redis, keys, caller, job_id))


@router.post(
    "/jobs/{job_id}/cancel",
    responses={
        202: {"model": JobPublic, "description": "The job is running; the worker stops it after the current step."},
        **errors.responses(404, 409, described={409: "The job already succeeded or failed: nothing to cancel."}),
    },
)
def cancel_job(
    job_id: str, response: Response, caller: CallerDep, redis: RedisDep, keys: KeysDep, storage: StorageDep,
    settings: SettingsDep,
) -> JobPublic:
    """Cancel a job. A queued job never runs (200, status `canceled`); a running job stops after its current
    denoising step (202, status still `running`; its events end with `canceled`). Canceling a canceled job again
    is 200; a job that already succeeded or failed is 409."""
    owned_job(redis, keys, caller, job_id)
    # A job canceled while queued never reaches a worker: its "completed" webhook is queued with the cancel.
    outcome = jobstore.cancel_job(redis, keys, job_id, webhooks=WebhookNotifier(redis, settings, storage))
    job = jobstore.get_job(redis, keys, storage, job_id)
    if outcome is None or job is None:
        raise _not_found(job_id)
    if outcome is CancelOutcome.requested:
        response.status_code = 202
    elif outcome is CancelOutcome.finished and job.status is not Status.canceled:
        raise ApiError(409, "conflict", f"job {job_id} already {job.status.value}; nothing to cancel")
    return job


def owned_job(redis: Redis, keys: Keys, caller: Caller, job_id: str) -> Job:
    """The RQ job if it exists and the caller may see it; otherwise 404 (the same answer, so ids do not leak)."""
    job = jobstore.fetch_job(redis, keys, job_id)
    if job is None or not caller.can_see(jobstore.job_owner(job)):
        raise _not_found(job_id)
    return job


def _not_found(job_id: str) -> ApiError:
    shown = job_id if len(job_id) <= 64 else job_id[:61] + "..."
    return ApiError(404, "not_found", f"no job {shown!r}")
