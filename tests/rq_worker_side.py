"""The worker's side of the job contract, played on RQ's own APIs, for API tests that need no model.

A real ``rq.Worker`` (registered, never started) dequeues the job, and RQ itself writes what the API reads back:
``prepare_execution`` / ``prepare_job_execution`` (Execution, StartedJobRegistry entry, status ``started``,
``started_at``), ``handle_job_success`` (the ``Result``, FinishedJobRegistry), ``handle_job_failure`` (failed
``Result`` with the traceback, FailedJobRegistry) and the StartedJobRegistry cleanup that handles a dead worker's
job. Only what sdqueue adds on top of RQ is written here, in the shapes docs/architecture.md gives: ``meta``
(``started_at``, ``progress``, ``warnings``, ``error``) and the job's event log (``core.eventlog``).
"""

from __future__ import annotations

import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any

from redis import Redis
from rq import Queue, Worker
from rq.job import Job, JobStatus
from rq.utils import now

from core import eventlog
from core.queues import Keys


@dataclass
class TakenJob:
    """A job a worker has taken off its queue and is running."""

    redis: Redis
    keys: Keys
    worker: Worker
    job: Job
    queue: Queue
    running_event_id: str = ""  # the stream id of its `running` event

    @property
    def id(self) -> str:
        return self.job.id

    def event(self, name: str, **data: Any) -> str:
        """Append an event to the job's log; returns its stream id (the SSE event id)."""
        eventlog.record(self.redis, self.keys, self.id, eventlog.message(name, self.id, data))
        return str(self.redis.xrevrange(self.keys.event_log(self.id), count=1)[0][0].decode())

    def progress(self, step: int, total: int, eta_seconds: float = 0.1) -> str:
        """What the worker's step callback writes: ``meta.progress``, then a ``progress`` event."""
        progress = {"step": step, "total": total, "percent": round(100.0 * step / total, 1),
                    "eta_seconds": eta_seconds}
        self.job.meta["progress"] = progress
        self.job.save_meta()
        return self.event("progress", **progress)

    def succeed(self, result: dict[str, Any], *, announce: bool = True) -> None:
        """Finish through RQ's success path with ``result`` ({images, warnings, timings}) as the return value."""
        self.job.meta["warnings"] = result.get("warnings", [])
        self.job.save_meta()
        self.worker.handle_execution_ended(self.job, self.queue, self.job.success_callback_timeout)
        self.job._result = result
        self.job._status = JobStatus.FINISHED  # what Worker.perform_job sets before this call
        self.worker.handle_job_success(self.job, self.queue, self.queue.started_job_registry)
        if announce:
            self.event("succeeded", **result)

    def fail(self, exc: Exception) -> None:
        """Fail with the job's own exception through RQ's failure path, its reason in ``meta.error``."""
        try:
            raise exc
        except Exception:
            exc_info = sys.exc_info()
        error = {"type": type(exc).__name__, "message": str(exc)}
        self.job.meta["error"] = error
        self.job.save_meta()
        self.worker.handle_execution_ended(self.job, self.queue, self.job.failure_callback_timeout)
        # sdqueue keeps RQ's Retry budget for jobs whose worker died: a job's own error is final.
        self.job.retries_left = 0
        self.worker.handle_job_failure(self.job, self.queue, self.queue.started_job_registry,
                                       exc_string="".join(traceback.format_exception(*exc_info)))
        self.event("failed", error=error)

    def die(self) -> None:
        """The worker is gone: its lease runs out and RQ's registry cleanup (on any worker) handles the job, that
        is, enqueues it again while it has retries left, else fails it as abandoned."""
        self.worker.register_death()
        self.queue.started_job_registry.cleanup(timestamp=time.time() + 24 * 3600)


def take(redis: Redis, keys: Keys, job_id: str, *, batch_images: int = 1) -> TakenJob:
    """Dequeue ``job_id`` (it must be the next job of the queues) and start it as a worker does."""
    queues = [Queue(name, connection=redis) for name in keys.queues()]
    worker = Worker(queues, connection=redis)
    worker.register_birth()
    dequeued = Queue.dequeue_any(queues, None, connection=redis)
    assert dequeued is not None, "no job on the queues"
    job, queue = dequeued
    assert job.id == job_id, f"the next job on the queues is {job.id}, not {job_id}"
    worker.prepare_execution(job)
    worker.prepare_job_execution(job)
    started_at = now().isoformat()
    job.meta["started_at"] = started_at
    job.save_meta()
    taken = TakenJob(redis, keys, worker, job, queue)
    taken.running_event_id = taken.event("running", started_at=started_at, batch_images=batch_images)
    return taken
