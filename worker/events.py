"""What the worker tells clients about a job: typed events, appended as JSON to the job's event log stream.

Wire format (the API relays it as Server-Sent Events): ``{"event": <name>, "job_id": ..., "data": {...}}``. The
stream keeps the latest events (``core.eventlog``), so SSE clients that reconnect miss nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from redis import Redis
from redis.client import Pipeline

from core import eventlog
from core.jobs import JobError, Progress
from core.queues import Keys


@dataclass(frozen=True)
class JobEvent:
    name: ClassVar[str]
    job_id: str

    def data(self) -> dict[str, Any]:
        return {}

    def to_json(self) -> str:
        return eventlog.message(self.name, self.job_id, self.data())


@dataclass(frozen=True)
class Running(JobEvent):
    name: ClassVar[str] = "running"
    started_at: str
    batch_images: int  # images in the batch this job runs in (its own included)

    def data(self) -> dict[str, Any]:
        return {"started_at": self.started_at, "batch_images": self.batch_images}


@dataclass(frozen=True)
class ProgressUpdate(JobEvent):
    name: ClassVar[str] = "progress"
    progress: Progress

    def data(self) -> dict[str, Any]:
        return self.progress.model_dump()


@dataclass(frozen=True)
class PreviewImage(JobEvent):
    name: ClassVar[str] = "preview"
    step: int
    image: str  # base64 JPEG

    def data(self) -> dict[str, Any]:
        return {"step": self.step, "image": self.image}


@dataclass(frozen=True)
class Succeeded(JobEvent):
    name: ClassVar[str] = "succeeded"
    result: dict[str, Any] = field(default_factory=dict)

    def data(self) -> dict[str, Any]:
        return self.result


@dataclass(frozen=True)
class Failed(JobEvent):
    name: ClassVar[str] = "failed"
    error: JobError

    def data(self) -> dict[str, Any]:
        return {"error": self.error.model_dump()}


@dataclass(frozen=True)
class Canceled(JobEvent):
    name: ClassVar[str] = "canceled"
    reason: str  # "canceled" (cancel request) or "stopped" (RQ stop-job command)

    def data(self) -> dict[str, Any]:
        return {"reason": self.reason}


def publish(conn: Redis | Pipeline, keys: Keys, event: JobEvent) -> None:
    """Append ``event`` to the job's event log (`core.eventlog`), in the caller's pipeline."""
    eventlog.record(conn, keys, event.job_id, event.to_json())
