"""Every answer carries an `X-Request-ID`: the client's own, when it sent a sane one, else a new one. The id is
bound for the request's log lines (`core.logs`), together with the job id of a `/v1/jobs/{id}` path, so that a user
who quotes the header leads an operator to the request's log lines.

A pure ASGI middleware, the outermost one: the answers of the other middlewares (413, CORS preflights) get the
header too, and streamed answers (events) pass through untouched.
"""

from __future__ import annotations

import re
import uuid

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core import logs

HEADER = "X-Request-ID"
# A client's id is taken as it is when it is short and plain: no spaces or quotes to break log lines or headers.
_SANE = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
_JOB_PATH = re.compile(r"^/v1/jobs/([0-9A-Za-z_-]{1,64})(/|$)")


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), "")
        request_id = sent if _SANE.fullmatch(sent) else uuid.uuid4().hex
        # Not reset afterwards: the server's access log line for this request is written after the app returns,
        # in the same task; each request runs in a task of its own, so nothing leaks into the next one.
        logs.request_id.set(request_id)
        job = _JOB_PATH.match(scope["path"])
        logs.job_id.set(job.group(1) if job else None)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[HEADER] = request_id
            await send(message)

        await self.app(scope, receive, send_with_id)
