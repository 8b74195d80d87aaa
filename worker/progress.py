"""The pipeline's per-step callback for one pipeline call: progress, previews and cancellation, per job.

After every denoising step it
- reads the cancel-request set once (one SMEMBERS for the whole batch) and returns the request indices of the jobs
  to drop: canceled through the API, or stopped through RQ's stop-job command;
- writes each remaining job's progress (step, total, percent, ETA) to its meta and its event log, at most every
  ``throttle_s`` per job and always at the last step;
- for jobs that asked (``preview_every`` = k), logs a small JPEG of the running latents every k steps.

Redis failing never fails the step, so never the batch: that step's progress is not written (the job's meta in
memory keeps it, and the job's final record carries it), and the cancel check waits ``QUIET_S`` before it reads
again, so the GPU does not wait on an unreachable Redis at every step. RQ stop-job commands, kept in memory, act at
once either way. The batch worker gives the reporter a client whose calls give up after about a second
(``outages.quick_client``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import redis.exceptions
from redis import Redis
from rq.job import Job

from core.jobs import JobSpec, Progress
from core.queues import Keys
from core.webhook_queue import WebhookNotifier
from model.requests import StepEvent
from worker.events import PreviewImage, ProgressUpdate, publish
from worker.images import preview_jpeg_base64
from worker.outages import Link

if TYPE_CHECKING:
    import torch
    from PIL import Image

log = logging.getLogger(__name__)

THROTTLE_S = 0.25  # at most ~4 progress writes per second per job
QUIET_S = 1.0  # after a Redis error, steps go without Redis for this long
DropReason = Literal["canceled", "stopped"]


@dataclass
class ReportedJob:
    job: Job
    spec: JobSpec


class StepReporter:
    def __init__(
        self,
        connection: Redis,
        keys: Keys,
        jobs: Sequence[ReportedJob],
        *,
        preview: Callable[[torch.Tensor], list[Image.Image]] | None = None,
        stop_requests: Callable[[], set[str]] = set,
        throttle_s: float = THROTTLE_S,
        webhooks: WebhookNotifier | None = None,
        redis: Link | None = None,
    ) -> None:
        self.connection = connection
        self.keys = keys
        self.jobs = jobs
        self.preview = preview
        self.stop_requests = stop_requests
        self.throttle_s = throttle_s
        self.webhooks = webhooks
        self.redis = redis or Link("Redis")
        self._quiet_until = -math.inf  # no Redis calls before this (monotonic clock), after a failure
        self.started = time.monotonic()
        self.first_step_at: float | None = None
        self.last_step_at: float | None = None
        self.steps = 0
        self.dropped: dict[int, DropReason] = {}  # request index -> why it was dropped
        self._last_sent = [-math.inf] * len(jobs)

    def __call__(self, event: StepEvent) -> list[int]:
        clock = time.monotonic()
        self.first_step_at = self.first_step_at or clock
        self.last_step_at = clock
        self.steps = event.step
        canceled = self._cancel_requests() if clock >= self._quiet_until else None
        drop = self._to_drop(event.active, canceled or set())
        elapsed = clock - self.started
        eta = elapsed / event.step * (event.total - event.step)
        progress = Progress(
            step=event.step,
            total=event.total,
            percent=round(100.0 * event.step / event.total, 1),
            eta_seconds=round(eta, 2),
        )
        with self.connection.pipeline(transaction=False) as pipe:
            row = 0
            for index in event.active:
                reported = self.jobs[index]
                rows = reported.spec.params.n
                if index not in drop:
                    if event.step == event.total or clock - self._last_sent[index] >= self.throttle_s:
                        reported.job.meta["progress"] = progress.model_dump()
                        if canceled is not None:  # Redis answered this step
                            self._last_sent[index] = clock
                            pipe.hset(reported.job.key, "meta", reported.job.serializer.dumps(reported.job.meta))
                            publish(pipe, self.keys, ProgressUpdate(reported.job.id, progress=progress))
                            if self.webhooks is not None:
                                self.webhooks.progress(reported.job, pipe)
                    every = reported.spec.params.preview_every
                    if canceled is not None and self.preview is not None and every and event.step % every == 0:
                        self._add_preview(pipe, reported.job.id, event.step, event.latents[row : row + 1])
                row += rows
            try:
                if pipe.execute():
                    self.redis.answered()  # a write: a read alone also succeeds on a Redis too full to write
            except redis.exceptions.RedisError as exc:
                self._unreachable(exc, "writing progress")
        return drop

    def _add_preview(self, pipe: Any, job_id: str, step: int, latents: torch.Tensor) -> None:
        assert self.preview is not None
        try:
            image = preview_jpeg_base64(self.preview(latents)[0])
        except Exception:
            # A preview is a nicety: failing to draw one must not fail the jobs of the batch.
            log.exception("preview of job %s failed", job_id)
            return
        publish(pipe, self.keys, PreviewImage(job_id, step=step, image=image))

    def steps_per_second(self) -> float:
        """Denoising steps per second, from the first step's end to the last's (text encoding excluded)."""
        if self.first_step_at is None or self.last_step_at is None or self.steps < 2:
            return 0.0
        span = self.last_step_at - self.first_step_at
        return (self.steps - 1) / span if span > 0 else 0.0

    def _cancel_requests(self) -> set[str] | None:
        """The ids in the cancel-request set; None when Redis did not answer."""
        try:
            members = self.connection.smembers(self.keys.cancel_requests())
        except redis.exceptions.RedisError as exc:
            self._unreachable(exc, "reading cancel requests")
            return None
        return {m.decode() for m in members}

    def _unreachable(self, exc: redis.exceptions.RedisError, doing: str) -> None:
        self.redis.failed(exc, doing)
        self._quiet_until = time.monotonic() + QUIET_S

    def _to_drop(self, active: list[int], canceled: set[str]) -> list[int]:
        stopped = self.stop_requests()
        drop = []
        for index in active:
            job_id = self.jobs[index].job.id
            if job_id in stopped:
                self.dropped[index] = "stopped"
            elif job_id in canceled:
                self.dropped[index] = "canceled"
            else:
                continue
            drop.append(index)
            log.info("job %s %s while running: dropped from its batch", job_id, self.dropped[index])
        return drop
