"""Synchronous answers over the queue: enqueue through the native intake, then wait for the job to end.

The compatibility layers (`/sdapi/v1`, `/v1/images`) answer when the images are made, as the APIs they speak do.
The wait has no limit of its own (the job's own timeout, SDQ_JOB_TIMEOUT_S, bounds it): it ends when the job does,
or when the client goes away. It follows the job's event log (`core.eventlog`, as `Prefer: wait` does), and reads
the job itself between blocking reads, so a job that ends without an event (RQ gave up on it) ends the wait too.

A client that goes away while its job is still queued gets the job canceled, since nobody is left to take its
images; a job already running finishes, and its images stay in `GET /v1/jobs`. A request that carried an
`Idempotency-Key` keeps its queued job: clients resend a request whose answer timed out (OpenAI's do), and the
resend, with the same key, is answered with the job the first request made.

Noticing the client leave needs the connection's own ASGI `receive`: the route classes here keep it for the
handler (the request a multipart route hands on is a copy that carries only the form).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from anyio import to_thread
from fastapi import Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.types import Receive

from api.auth import AuthenticatedRoute
from api.errors import ApiError
from api.intake import Intake, Services, wait_for_end
from api.multipart import MultipartAsJsonRoute
from core import eventlog, jobstore
from core.jobs import JobPublic, JobSpec, Status

log = logging.getLogger(__name__)

_RECEIVE = "sdq_client_receive"
# The answer for a client that has gone: nobody reads it (499: nginx's "client closed request", for the metrics).
CLIENT_GONE = 499


class _KeepsReceive(APIRoute):
    """Keeps the connection's ASGI `receive` in the request's state before the handler runs."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            request.scope.setdefault("state", {})[_RECEIVE] = request.receive
            return await handler(request)

        return route


class SyncRoute(_KeepsReceive, AuthenticatedRoute):
    """An authenticated JSON route whose handler may `submit_and_wait`."""


class SyncMultipartRoute(_KeepsReceive, MultipartAsJsonRoute):
    """An authenticated route that also takes multipart/form-data (`api.multipart`) and may `submit_and_wait`."""


async def submit_and_wait(
    request: Request, intake: Intake, response: Response, spec: JobSpec, native: BaseModel,
    on_refused: Callable[[], Awaitable[None]] | None = None,
) -> JobPublic | None:
    """Queue `spec` (made from the validated native request `native`) as the native API does, and return the job
    once it has ended; None if the client went away first. The route must be a `SyncRoute` or
    `SyncMultipartRoute`."""
    receive = request.scope.get("state", {}).get(_RECEIVE)
    if receive is None:
        raise TypeError(f"{request.url.path}: submit_and_wait needs a SyncRoute or SyncMultipartRoute")
    queued = await intake.accept(spec, response, native, on_refused=on_refused)
    services = intake.s
    ended = asyncio.ensure_future(_ended(services, queued.id))
    gone = asyncio.ensure_future(_client_gone(receive))
    try:
        await asyncio.wait((ended, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (ended, gone):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if ended.done() and not ended.cancelled():
        return ended.result()
    if intake.idempotency_key is not None:
        log.info("client of job %s went away; the job stays for a resend with its Idempotency-Key", queued.id)
    else:
        canceled = await to_thread.run_sync(_cancel_if_queued, services, queued.id)
        log.info("client of job %s went away%s", queued.id, "; the queued job is canceled" if canceled else "")
    return None


async def _ended(services: Services, job_id: str) -> JobPublic:
    while True:
        job = await to_thread.run_sync(jobstore.get_job, services.redis, services.keys, services.storage, job_id)
        if job is None:
            raise ApiError(404, "not_found", f"job {job_id} expired before it ended")
        if job.status.is_terminal():
            return job
        await wait_for_end(services.aredis, services.keys, job_id, eventlog.READ_BLOCK_S)


def _cancel_if_queued(s: Services, job_id: str) -> bool:
    job = jobstore.get_job(s.redis, s.keys, s.storage, job_id)
    if job is None or job.status is not Status.queued:
        return False
    return jobstore.cancel_job(s.redis, s.keys, job_id) is jobstore.CancelOutcome.canceled


async def _client_gone(receive: Receive) -> None:
    """Return when the client disconnects (its body has been read, so the next message is the disconnect)."""
    while (await receive())["type"] != "http.disconnect":
        pass
