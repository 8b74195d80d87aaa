"""GET /sdapi/v1/progress, POST /sdapi/v1/interrupt and /skip: A1111's one "current job", per API key.

A1111 runs one job at a time and reports that one. Here many run at once, so these routes look at the caller's
own jobs (with auth off, every job submitted without a key): the newest `RECENT_JOBS` of them, of any layer. The
current job is the caller's running job, or else its oldest queued one; `state.job_count` counts the caller's
jobs that are queued or running, so `progress == 0 and job_count == 0` means that nothing of the caller's is left.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Query
from redis import Redis
from rq.job import Job

from api.a1111.models import ProgressResponse, ProgressState
from api.auth import AuthenticatedRoute
from api.deps import CallerDep, ServicesDep
from api.intake import Services
from core import jobstore
from core.jobs import Status
from core.queues import JOB_FUNC, Keys

router = APIRouter(prefix="/sdapi/v1", tags=["a1111"], route_class=AuthenticatedRoute)

RECENT_JOBS = 32  # how far back in the caller's jobs the current one is looked for
_PREVIEW_SCAN = 25  # event log entries read back for the latest preview


@router.get("/progress")
def a1111_progress(
    caller: CallerDep, services: ServicesDep,
    skip_current_image: Annotated[bool, Query(description="Leave the preview out.")] = False,
) -> ProgressResponse:
    """The caller's current job: progress 0..1, ETA, steps, and the latest preview while it runs."""
    s = services
    active = active_jobs(s.redis, s.keys, caller.name)
    if not active:
        return ProgressResponse(progress=0.0, eta_relative=0.0, state=ProgressState())
    current = current_job(active)
    view = jobstore.job_view(s.redis, s.keys, s.storage, current)
    running = view.status is Status.running
    started = view.started_at or view.created_at
    state = ProgressState(
        job=view.task if running else "", job_count=len(active), job_timestamp=started.strftime("%Y%m%d%H%M%S"),
        sampling_step=view.progress.step, sampling_steps=view.progress.total or view.params.steps,
    )
    preview = _latest_preview(s, view.id) if running and not skip_current_image else None
    return ProgressResponse(
        # As A1111: above 0 while a job is there, so that "progress 0 and no job" means idle.
        progress=max(view.progress.percent / 100, 0.01), eta_relative=view.progress.eta_seconds or 0.0,
        state=state, current_image=preview, textinfo=f"job {view.id}: {view.status.value}",
    )


@router.post("/interrupt")
def a1111_interrupt(caller: CallerDep, services: ServicesDep) -> dict[str, Any]:
    """Cancel the caller's current job (its running jobs, else its oldest queued one); its txt2img / img2img
    request then answers with no image."""
    _cancel_current(services, caller.name)
    return {}


@router.post("/skip")
def a1111_skip(caller: CallerDep, services: ServicesDep) -> dict[str, Any]:
    """As interrupt: a job's images are made together, so there is no single image to skip."""
    _cancel_current(services, caller.name)
    return {}


def active_jobs(redis: Redis, keys: Keys, owner: str | None) -> list[Job]:
    """The owner's recent sdqueue jobs that are queued or running, newest first."""
    ids = [i.decode() for i in redis.zrevrange(keys.owner_jobs(owner), 0, RECENT_JOBS - 1)]
    jobs = [j for j in Job.fetch_many(ids, connection=redis) if j is not None and j.func_name == JOB_FUNC]
    return [j for j in jobs if not jobstore.public_status(j).is_terminal()]


def current_job(active: list[Job]) -> Job:
    """The job A1111 would call current: the first running one, else the oldest waiting one."""
    running = [j for j in active if jobstore.public_status(j) is Status.running]
    return running[-1] if running else active[-1]


def _cancel_current(s: Services, owner: str | None) -> None:
    active = active_jobs(s.redis, s.keys, owner)
    running = [j for j in active if jobstore.public_status(j) is Status.running]
    for job in running or active[-1:]:
        jobstore.cancel_job(s.redis, s.keys, job.id)


def _latest_preview(s: Services, job_id: str) -> str | None:
    for _, fields in s.redis.xrevrange(s.keys.event_log(job_id), count=_PREVIEW_SCAN):
        message = json.loads(fields[b"message"])
        if message["event"] == "preview":
            return str(message["data"]["image"])
    return None
