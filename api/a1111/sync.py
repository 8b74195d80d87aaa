"""Synchronous answers over the queue: submit through the native intake, then wait for the job's end.

A1111 answers txt2img and img2img when the images are made, so this layer waits on the job's event log
(`core.eventlog`, as `Prefer: wait` does) with no timeout of its own: the job's own timeout (SDQ_JOB_TIMEOUT_S)
bounds it. Between blocking reads the job itself is looked at, so a job that ends without an event still ends
the wait. A client that hangs up while its job is still queued gets the job canceled, since nobody is left to
take its images; a job already running finishes, and its images stay in `GET /v1/jobs`.
"""

from __future__ import annotations

import asyncio
import logging

from anyio import to_thread
from fastapi import Request

from api.intake import Services, wait_for_end
from core import eventlog, jobstore
from core.jobs import JobPublic, Status

log = logging.getLogger(__name__)


async def wait_for_job(services: Services, request: Request, job_id: str) -> JobPublic | None:
    """The job once it has ended; None when the client went away first."""
    ended = asyncio.create_task(_ended(services, job_id))
    gone = asyncio.create_task(_disconnected(request))
    try:
        done, _ = await asyncio.wait({ended, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (ended, gone):
            task.cancel()
        await asyncio.gather(ended, gone, return_exceptions=True)
    if ended in done:
        return ended.result()
    canceled = await to_thread.run_sync(_cancel_if_queued, services, job_id)
    log.info("client of job %s went away%s", job_id, "; the queued job is canceled" if canceled else "")
    return None


async def _ended(s: Services, job_id: str) -> JobPublic:
    while True:
        await wait_for_end(s.aredis, s.keys, job_id, eventlog.READ_BLOCK_S)
        view = await to_thread.run_sync(jobstore.get_job, s.redis, s.keys, s.storage, job_id)
        if view is None:
            raise RuntimeError(f"job {job_id} disappeared while its client waited")
        if view.status.is_terminal():
            return view


async def _disconnected(request: Request) -> None:
    """Return when the client closes the connection (the body is read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _cancel_if_queued(s: Services, job_id: str) -> bool:
    view = jobstore.get_job(s.redis, s.keys, s.storage, job_id)
    if view is None or view.status is not Status.queued:
        return False
    return jobstore.cancel_job(s.redis, s.keys, job_id) is jobstore.CancelOutcome.canceled
