"""Everything `Client` and `AsyncClient` share, free of network I/O: what each call sends, how answers are read, when to
retry, how Server-Sent Events are decoded and how an event stream falls back to polling. The two clients only send
the `Call`s built here, the one with httpx's sync API, the other with its async API."""

from __future__ import annotations

import base64
import email.utils
import io
import json
import os
import random
import time
import urllib.parse
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, TypedDict

import httpx
from PIL import Image
from pydantic import BaseModel, Field
from pydantic_core import to_jsonable_python

from core.jobs import JobPublic, Outpaint, Priority, Status, TaskKind
from core.rules import Sampler
from core.settings import API_KEY_VARIABLE, SERVER_VARIABLE
from core.version import __version__
from sdqueue.client.errors import APIError, JobFailedError, SdqueueError, WaitTimeout, error_from_response

DEFAULT_SERVER = "http://127.0.0.1:8000"
TIMEOUT = httpx.Timeout(60.0, connect=10.0)
# An event stream is quiet between events: the server sends a keepalive comment every 15 s.
STREAM_TIMEOUT = httpx.Timeout(60.0, connect=10.0, read=45.0)
RETRY_STATUSES = frozenset({429, 503})
MAX_RETRY_WAIT_S = 60.0
POLL_S = 1.0
# Broken event streams in a row after which a job is followed by polling instead (a proxy that cuts streams).
MAX_STREAM_FAILURES = 3
TERMINAL_EVENTS = frozenset(s.value for s in Status if s.is_terminal())

ImageInput = Image.Image | str | os.PathLike[str] | bytes


class GenerateOptions(TypedDict, total=False):
    """Optional fields of every task, as `core.jobs.GenerationParams` defines them (tests keep the two equal)."""

    negative_prompt: str
    model: str | None  # a name from GET /v1/models; left out: the deployment's default
    width: int
    height: int
    steps: int
    guidance_scale: float
    sampler: Sampler | str
    karras: bool
    eta: float
    seed: int | None
    n: int
    priority: Priority | str
    preview_every: int
    output_format: Literal["png", "jpeg", "webp"]
    output_quality: int
    webhook: str | None
    webhook_events_filter: list[Literal["start", "progress", "completed"]]
    loras: list[dict[str, Any]]  # [{"name": a name from GET /v1/loras, "scale": 0.8}]
    vae: Literal["full", "tiny"]
    original_size: tuple[int, int] | list[int] | None  # SDXL's size conditioning, [height, width]
    crops_coords_top_left: tuple[int, int] | list[int]
    target_size: tuple[int, int] | list[int] | None
    refiner: dict[str, Any] | None  # SDXL: {"model": a refiner from GET /v1/models, "switch_at": 0.8}


class Img2ImgOptions(GenerateOptions, total=False):
    """`core.jobs.Img2ImgRequest`'s fields beyond the prompt and the image."""

    resize_mode: Literal["resize", "crop"]
    strength: float


class InpaintOptions(Img2ImgOptions, total=False):
    """`core.jobs.InpaintRequest`'s fields beyond the prompt, the image and the mask."""

    invert_mask: bool
    mask_blur: int
    mask_overlay: bool
    outpaint: Outpaint | dict[str, int]


class JobPage(BaseModel):
    """A page of `GET /v1/jobs`, newest first."""

    jobs: list[JobPublic]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; None when there is no more.")


@dataclass(frozen=True)
class Event:
    """One Server-Sent Event of a job: `event` is queued, running, progress, preview, succeeded, failed or
    canceled; `data` its JSON object (for queued and the terminal events, the whole job)."""

    event: str
    data: dict[str, Any]
    id: str | None = None

    @property
    def terminal(self) -> bool:
        return self.event in TERMINAL_EVENTS

    def job(self) -> JobPublic:
        """The job that a queued or terminal event carries."""
        return JobPublic.model_validate(self.data)


@dataclass(frozen=True)
class Call:
    """One HTTP request, as both clients send it."""

    method: str
    path: str
    json: Any = None
    params: Mapping[str, Any] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    stream: bool = False
    auth: bool = True  # send the API key (not to presigned S3 URLs)


def base_url(server: str | None) -> str:
    return (server or os.environ.get(SERVER_VARIABLE) or DEFAULT_SERVER).rstrip("/")


def client_headers(api_key: str | None) -> dict[str, str]:
    key = api_key if api_key is not None else os.environ.get(API_KEY_VARIABLE)
    headers = {"User-Agent": f"sdqueue-client/{__version__}", "Accept": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return headers


def submit_call(task: TaskKind, body: dict[str, Any], idempotency_key: str | None) -> Call:
    """A submission, with an Idempotency-Key that every retry of it repeats: a retry never makes a second job."""
    return Call("POST", f"/v1/{task}", json=to_jsonable_python(body),
                headers={"Idempotency-Key": idempotency_key or uuid.uuid4().hex})


def txt2img_body(prompt: str, options: GenerateOptions) -> dict[str, Any]:
    return {"prompt": prompt, **options}


def img2img_body(prompt: str, image: ImageInput, options: Img2ImgOptions) -> dict[str, Any]:
    return {"prompt": prompt, "image": encode_image(image), **options}


def inpaint_body(prompt: str, image: ImageInput, mask: ImageInput | None, options: InpaintOptions) -> dict[str, Any]:
    body = {"prompt": prompt, "image": encode_image(image), **options}
    if mask is not None:
        body["mask"] = encode_image(mask)
    return body


def job_call(job_id: str) -> Call:
    return Call("GET", f"/v1/jobs/{_id(job_id)}")


def cancel_call(job_id: str) -> Call:
    return Call("POST", f"/v1/jobs/{_id(job_id)}/cancel")


def list_call(status: Status | str | None, limit: int, cursor: str | None) -> Call:
    params = {"limit": limit, "status": Status(status).value if status else None, "cursor": cursor}
    return Call("GET", "/v1/jobs", params={k: v for k, v in params.items() if v is not None})


def events_call(job_id: str, last_event_id: str | None) -> Call:
    headers = {"Accept": "text/event-stream"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    return Call("GET", f"/v1/jobs/{_id(job_id)}/events", headers=headers, stream=True)


def image_calls(job: JobPublic, server: str) -> list[Call]:
    """The downloads of a succeeded job's images; raises JobFailedError for a job that ended without them."""
    if job.status is not Status.succeeded:
        if job.status.is_terminal():
            raise JobFailedError(job)
        raise SdqueueError(f"job {job.id} is still {job.status.value}: wait for it first")
    return [_image_call(record.url, server) for record in job.images]


def _image_call(url: str, server: str) -> Call:
    """An image of the API's own route (local storage) is fetched from the server this client talks to, with the
    key, whatever origin SDQ_PUBLIC_URL gave its URL; any other URL (a presigned S3 URL) as it is, and without the
    key unless it is the server's origin: S3 refuses a request with two kinds of authentication."""
    parsed = httpx.URL(url)
    if parsed.path.startswith("/v1/images/") and not parsed.query:
        return Call("GET", parsed.raw_path.decode("ascii"))
    return Call("GET", url, auth=parsed.join("/") == httpx.URL(server).join("/"))


def job_id_of(job: JobPublic | str) -> str:
    return job.id if isinstance(job, JobPublic) else job


def parse_job(response: httpx.Response) -> JobPublic:
    return JobPublic.model_validate(response.json())


def parse_page(response: httpx.Response) -> JobPage:
    return JobPage.model_validate(response.json())


def encode_image(image: ImageInput) -> str:
    """base64 of the file: a PIL image is sent as PNG, a path as the file it names, bytes as they are."""
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data = buf.getvalue()
    elif isinstance(image, bytes):
        data = image
    else:
        data = Path(image).read_bytes()
    return base64.b64encode(data).decode("ascii")


def decode_image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


class Retry:
    """When to send a call again: after a 429 or 503 (waiting `Retry-After`), a 409 of a submission whose first
    request is still being handled (it has `Retry-After` too), or no answer at all. Every call the clients make
    may be repeated: reads, cancel (a second cancel is a no-op) and submissions (their Idempotency-Key)."""

    def __init__(self, max_retries: int, max_wait_s: float = MAX_RETRY_WAIT_S) -> None:
        self.max_retries = max_retries
        self.max_wait_s = max_wait_s

    def after_response(self, attempt: int, response: httpx.Response) -> float | None:
        """Seconds to wait before attempt `attempt + 1`, or None to give this answer back."""
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        retryable = response.status_code in RETRY_STATUSES or (response.status_code == 409 and retry_after is not None)
        if not retryable or attempt >= self.max_retries:
            return None
        return min(retry_after, self.max_wait_s) if retry_after is not None else self._backoff(attempt)

    def after_error(self, attempt: int) -> float | None:
        return None if attempt >= self.max_retries else self._backoff(attempt)

    def _backoff(self, attempt: int) -> float:
        return min(0.5 * 2**attempt, 8.0) * random.uniform(0.75, 1.0)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a `Retry-After` header: a number, or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def raise_for_error(response: httpx.Response) -> None:
    """The answer's body must have been read (streams included)."""
    if response.is_error:
        raise error_from_response(response, parse_retry_after(response.headers.get("Retry-After")))


class SSEDecoder:
    """Server-Sent Events from the lines of a `text/event-stream` (the WHATWG parsing rules, minus `retry`, which
    the followers below do not need: they reconnect at once, then poll)."""

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []
        self.last_id: str | None = None

    def feed(self, line: str) -> Event | None:
        """The event that `line` completes, if any."""
        if not line:
            event, data = self._event or "message", self._data
            self._event, self._data = "", []
            if not data:
                return None
            return Event(event, json.loads("\n".join(data)), self.last_id)
        if line.startswith(":"):
            return None  # a comment: the keepalive
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self.last_id = value
        return None


class StreamUnusable(Exception):
    """The events route answered something that is no event stream (a proxy in the way): poll instead."""


class Follower:
    """Follows one job: on its event stream while that works (reconnecting with Last-Event-ID after a cut), else by
    polling `GET /v1/jobs/{id}`, turning each change into the event the stream would have sent. It ends at the
    job's terminal event, or at `timeout` (WaitTimeout)."""

    def __init__(self, job_id: str, timeout: float | None) -> None:
        self.job_id = job_id
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.decoder = SSEDecoder()
        self.failures = 0
        self.polling = False
        self.done = False
        self._last_poll: tuple[Status, int, int] | None = None

    def stream_call(self) -> Call:
        return events_call(self.job_id, self.decoder.last_id)

    def check_stream(self, response: httpx.Response) -> None:
        """StreamUnusable unless the answer is an event stream (error answers have raised already)."""
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            raise StreamUnusable(f"GET /v1/jobs/{self.job_id}/events answered {response.headers.get('content-type')}")

    def on_line(self, line: str) -> Event | None:
        event = self.decoder.feed(line)
        if event is not None:
            self.failures = 0
            self.done = event.terminal
            if not self.done:
                self.check_deadline()
        return event

    def on_stream_end(self, error: Exception | None) -> None:
        """After a stream ended before the terminal event: cut or refused (`error`), or closed by the server. An
        error answer below 500 (404, 401) is the API's and raises; anything else ends in polling if it repeats."""
        if isinstance(error, APIError) and error.status_code < 500:
            raise error
        self.failures += 1
        if self.failures >= MAX_STREAM_FAILURES or isinstance(error, StreamUnusable):
            self.polling = True
        self.check_deadline()

    def on_poll(self, job: JobPublic) -> Event | None:
        """The event a poll shows, if the job changed since the last one."""
        state = (job.status, job.progress.step, job.queue_position or 0)
        if state == self._last_poll:
            return None
        self._last_poll = state
        if job.status.is_terminal():
            self.done = True
            return Event(job.status.value, job.model_dump(mode="json"))
        if job.status is Status.queued:
            return Event("queued", job.model_dump(mode="json"))
        return Event("progress", job.progress.model_dump(mode="json"))

    def poll_delay(self) -> float:
        self.check_deadline()
        return POLL_S if self.deadline is None else max(0.0, min(POLL_S, self.deadline - time.monotonic()))

    def stream_timeout(self) -> httpx.Timeout:
        if self.deadline is None:
            return STREAM_TIMEOUT
        left = max(0.1, self.deadline - time.monotonic())
        return httpx.Timeout(60.0, connect=min(10.0, left), read=min(45.0, left))

    def check_deadline(self) -> None:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise WaitTimeout(f"job {self.job_id} did not end in time; it goes on (wait again, or cancel it)")


def _id(job_id: str) -> str:
    return urllib.parse.quote(job_id, safe="")  # a stray "/" or "?" in an id must not reach another route

