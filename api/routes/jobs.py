"""Submitting, reading and canceling jobs."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Response, status

from api.deps import KeysDep, MetricsDep, RedisDep, SettingsDep, StorageDep, SubmitterDep
from api.submitter import QueueFullError
from core import jobstore
from core.jobs import JobPublic, Status, Txt2ImgRequest
from core.jobstore import CancelOutcome

router = APIRouter(prefix="/v1", tags=["jobs"])

_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"description": "No such job (or it expired, see SDQ_RESULT_TTL_S)."}
}


@router.post(
    "/txt2img",
    status_code=status.HTTP_202_ACCEPTED,
    responses={503: {"description": "The queue is full (SDQ_MAX_QUEUED_JOBS); retry after Retry-After seconds."}},
)
async def submit_txt2img(
    request: Txt2ImgRequest, response: Response, settings: SettingsDep, submitter: SubmitterDep, metrics: MetricsDep
) -> JobPublic:
    """Queue a text-to-image job. Poll the job at the `Location` header until its status is terminal."""
    spec = jobstore.new_job_spec(request, "txt2img")
    try:
        position = await submitter.submit(spec)
    except QueueFullError:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            detail=f"queue full: {settings.max_queued_jobs} jobs waiting (SDQ_MAX_QUEUED_JOBS); retry later",
            headers={"Retry-After": "5"},
        ) from None
    metrics.jobs_submitted.labels(spec.task, spec.params.priority.value).inc()
    response.headers["Location"] = f"/v1/jobs/{spec.id}"
    return jobstore.queued_view(spec, position)


# Plain `def` routes: RQ and redis-py are synchronous, so FastAPI runs these in its thread pool, where each call
# borrows a connection from the client's pool; the event loop stays free for other requests.
@router.get("/jobs/{job_id}", responses=_NOT_FOUND)
def get_job(job_id: str, redis: RedisDep, keys: KeysDep, storage: StorageDep) -> JobPublic:
    """Status, queue position, progress, timings, seeds, image URLs or error of a job."""
    job = jobstore.get_job(redis, keys, storage, job_id)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no job {job_id!r}")
    return job


@router.post(
    "/jobs/{job_id}/cancel",
    responses={
        **_NOT_FOUND,
        202: {"description": "The job is running; the worker stops it after the current step."},
        409: {"description": "The job already succeeded or failed."},
    },
)
def cancel_job(job_id: str, response: Response, redis: RedisDep, keys: KeysDep, storage: StorageDep) -> JobPublic:
    """Cancel a job: a queued job never runs; a running job stops after its current denoising step."""
    outcome = jobstore.cancel_job(redis, keys, job_id)
    job = jobstore.get_job(redis, keys, storage, job_id)
    if outcome is None or job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no job {job_id!r}")
    if outcome is CancelOutcome.requested:
        response.status_code = status.HTTP_202_ACCEPTED
    elif outcome is CancelOutcome.finished and job.status is not Status.canceled:
        detail = f"job {job_id} already {job.status.value}; nothing to cancel"
        raise HTTPException(status.HTTP_409_CONFLICT, detail=detail)
    return job
