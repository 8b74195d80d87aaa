"""A job's events as Server-Sent Events, read from its event log stream (`core.eventlog`).

Every event carries the stream entry's id, so a client that reconnects with `Last-Event-ID` reads on from exactly
after it: nothing lost, nothing repeated. The stream ends after the terminal event (succeeded, failed, canceled),
whose data is the whole job as `GET /v1/jobs/{id}` shows it. Between events the job itself is checked every few
seconds, so a job that ends without an event (its record expired, RQ gave up on it) still ends the stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

from anyio import to_thread
from fastapi import APIRouter, Header
from fastapi.responses import StreamingResponse
from redis.exceptions import RedisError

from api import errors
from api.deps import CallerDep, MetricsDep, ServicesDep
from api.instrumentation import ApiMetrics
from api.intake import Services
from api.routes.jobs import owned_job
from core import eventlog, jobstore
from core.jobs import JobPublic, Status

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["jobs"])

POLL_S = 5.0  # how long one XREAD blocks before the job itself is looked at
KEEPALIVE_S = 15.0  # a comment line this often keeps proxies from closing an idle stream
RETRY_MS = 2000  # the reconnection delay EventSource clients should use
_STREAM_ID = r"^\d{1,19}-\d{1,19}$"

_EXAMPLE = (
    "retry: 2000\n\n"
    'id: 1718000000000-0\nevent: running\ndata: {"started_at": "2025-06-10T06:13:20+00:00", "batch_images": 2}\n\n'
    'id: 1718000000250-0\nevent: progress\ndata: {"step": 5, "total": 20, "percent": 25.0, "eta_seconds": 3.1}\n\n'
    'id: 1718000004100-0\nevent: succeeded\ndata: {"id": "077ad63e...", "status": "succeeded", "images": [...]}\n\n'
)

# One event (Open API 3.1 describes each event of a text/event-stream with `schema`).
_EVENT_SCHEMA = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {"type": "string", "enum": ["queued", "running", "progress", "preview",
                                             *sorted(eventlog.TERMINAL_EVENTS)]},
        "id": {"type": "string", "pattern": _STREAM_ID, "description": "Send back as Last-Event-ID to resume."},
        "data": {"type": "string", "contentMediaType": "application/json", "description": "A JSON object."},
        "retry": {"type": "integer"},
    },
}


class EventStreamResponse(StreamingResponse):
    media_type = "text/event-stream"


@router.get(
    "/jobs/{job_id}/events",
    response_class=EventStreamResponse,
    responses={
        200: {
            "description": "`text/event-stream`. Events: `queued` (data: the job; sent first when it waits), "
            "`running` ({started_at, batch_images}), `progress` ({step, total, percent, eta_seconds}), `preview` "
            "({step, image: base64 JPEG}, with `preview_every`), then one of `succeeded`, `failed`, `canceled` "
            "(data: the job) and the stream ends. `: keepalive` comments every 15 s.",
            "content": {"text/event-stream": {"schema": _EVENT_SCHEMA, "example": _EXAMPLE}},
        },
        **errors.responses(404, 422, described={422: "Last-Event-ID is not an id this stream sent."}),
    },
)
async def stream_job_events(
    job_id: str,
    caller: CallerDep,
    services: ServicesDep,
    metrics: MetricsDep,
    last_event_id: Annotated[str | None, Header(
        pattern=_STREAM_ID, description="Resume after this event (browsers' EventSource sends it on reconnect)."
    )] = None,
) -> EventStreamResponse:
    """Follow a job as Server-Sent Events until it ends. Reconnecting with `Last-Event-ID` resumes after that
    event; a job that has already ended gets its final event at once."""
    await to_thread.run_sync(owned_job, services.redis, services.keys, caller, job_id)
    return EventStreamResponse(
        _events(services, metrics, job_id, last_event_id),
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},  # no buffering in nginx-like proxies
    )


async def _events(s: Services, metrics: ApiMetrics, job_id: str, last_event_id: str | None) -> AsyncIterator[str]:
    metrics.event_streams.inc()
    try:
        async for frame in _frames(s, job_id, last_event_id):
            yield frame
    except RedisError as exc:
        # The answer has started, so no error status can be sent: end the stream; the client reconnects with
        # Last-Event-ID and gets the 503 (or resumes, once Redis is back).
        log.warning("event stream of job %s ended: Redis unreachable: %s", job_id, exc)
    finally:
        metrics.event_streams.dec()


async def _frames(s: Services, job_id: str, last_event_id: str | None) -> AsyncIterator[str]:
    log_key = s.keys.event_log(job_id)
    loop = asyncio.get_running_loop()
    yield f"retry: {RETRY_MS}\n\n"
    # The log's newest entry before the job is read: whatever the worker writes meanwhile comes after it.
    newest = await s.aredis.xrevrange(log_key, count=1)
    view = await _view(s, job_id)
    if (ending := await _ending(s, view, job_id)) is not None:
        for frame in ending:
            yield frame
        return
    assert view is not None
    cursor = last_event_id or "0-0"
    if last_event_id is None and view.status is Status.queued:
        # Start after whatever the log holds (an earlier attempt's events, if the job was retried).
        cursor = newest[0][0].decode() if newest else "0-0"
        yield _frame("queued", cursor, view.model_dump(mode="json"))
    last_write = loop.time()
    while True:
        reply = await s.aredis.xread({log_key: cursor}, count=100, block=int(POLL_S * 1000))
        for _, entries in reply or []:
            for entry_id, fields in entries:
                cursor = entry_id.decode()
                message = json.loads(fields[b"message"])
                if message["event"] in eventlog.TERMINAL_EVENTS:
                    view = await _view(s, job_id)
                    data = view.model_dump(mode="json") if view is not None else message["data"]
                    yield _frame(message["event"], cursor, data)
                    return
                yield _frame(message["event"], cursor, message["data"])
                last_write = loop.time()
        if reply:
            continue
        if (ending := await _ending(s, await _view(s, job_id), job_id)) is not None:
            for frame in ending:
                yield frame
            return
        if loop.time() - last_write >= KEEPALIVE_S:
            yield ": keepalive\n\n"
            last_write = loop.time()


async def _ending(s: Services, view: JobPublic | None, job_id: str) -> list[str] | None:
    """None while the job is queued or running; else the frames that end its stream (none if the job is gone)."""
    if view is None:
        return []
    if view.status.is_terminal():
        return [await _final(s, view, job_id)]
    return None


async def _final(s: Services, view: JobPublic, job_id: str) -> str:
    """The terminal event of an ended job, with the id of the log's terminal entry when it is still there."""
    newest = await s.aredis.xrevrange(s.keys.event_log(job_id), count=1)
    if newest and json.loads(newest[0][1][b"message"])["event"] in eventlog.TERMINAL_EVENTS:
        event_id = newest[0][0].decode()
    else:  # no terminal entry (expired log, or the job ended without one): an id from its end time
        ended = view.finished_at or view.created_at
        event_id = f"{int(ended.timestamp() * 1000)}-0"
    return _frame(view.status.value, event_id, view.model_dump(mode="json"))


async def _view(s: Services, job_id: str) -> JobPublic | None:
    return await to_thread.run_sync(jobstore.get_job, s.redis, s.keys, s.storage, job_id)


def _frame(event: str, event_id: str, data: Any) -> str:
    return f"id: {event_id}\nevent: {event}\ndata: {json.dumps(data)}\n\n"
