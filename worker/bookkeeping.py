"""Per-job RQ bookkeeping for a batch: start, heartbeat, and finalize each job on its own, on RQ's own APIs.

RQ runs one job per worker (rq#928): ``prepare_execution`` / ``prepare_job_execution`` mark it started,
``maintain_heartbeats`` keeps it alive and ``handle_job_success`` / ``handle_job_failure`` finish it. A batch holds
several jobs at once, so this module does the same steps per job, with one RQ ``Execution`` per job:

- start: ``Execution.create`` (StartedJobRegistry entry scored now + lease), ``Job.prepare_for_execution`` (status
  started, started_at, worker name), removal from RQ's intermediate list, ``meta.started_at``, a ``running`` event;
- heartbeat: every ``SDQ_HEARTBEAT_S`` a thread pushes every running job's registry score to now + lease (the lease is
  3 heartbeats), so a batch of any length keeps its jobs, and a dead worker's jobs expire within one lease;
- finalize: success through RQ's ``handle_job_success`` (result, FinishedJobRegistry), failure with the job's own
  exception (FailedJobRegistry, exc info), cancel (``Job.cancel``: CanceledJobRegistry) or stop (status stopped, as
  RQ's stop-job command leaves it).

Failures here are final: RQ's ``Retry`` budget is kept for jobs whose worker died (StartedJobRegistry cleanup
re-enqueues those), since re-running a job that raised on its own input gives the same error again.

Exactly once: before a job is finalized its lease is renewed with ``ZADD XX CH``, which succeeds only if the
registry entry is still there. If it is gone, the registry cleanup already gave the job to another worker (this
worker was presumed dead) or it was canceled, and this worker drops its result.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.utils import now
from rq.worker import BaseWorker

from core.jobs import JobError
from core.queues import Keys
from core.webhook_queue import WebhookNotifier
from worker.batcher import Claim
from worker.events import Canceled, Failed, JobEvent, Running, Succeeded, publish

log = logging.getLogger(__name__)

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


@dataclass
class RunningJob:
    """A started job of the current batch."""

    job: Job
    queue: Queue
    execution: Execution
    started: float = field(default_factory=time.monotonic)

    @property
    def id(self) -> str:
        return self.job.id


def job_error(exc: BaseException) -> JobError:
    message = str(exc).strip() or type(exc).__name__
    return JobError(type=type(exc).__name__, message=message)


class Bookkeeper:
    def __init__(self, worker: BaseWorker, keys: Keys, lease_s: int, webhooks: WebhookNotifier | None = None) -> None:
        self.worker = worker
        self.connection = worker.connection
        self.keys = keys
        self.lease_s = lease_s
        self.webhooks = webhooks

    # start -------------------------------------------------------------------------------------------------
    def start(self, claims: Sequence[Claim], batch_images: int) -> list[RunningJob]:
        """Mark every claimed job started (one pipeline), and announce it."""
        w = self.worker
        runs = []
        started_at = now().isoformat()
        with self.connection.pipeline() as pipe:
            w.set_current_job_id(claims[0].job.id, pipeline=pipe)
            for claim in claims:
                job = claim.job
                execution = Execution.create(job, self.lease_s, pipeline=pipe, worker_name=w.name)
                job.prepare_for_execution(w.name, pipeline=pipe)
                pipe.lrem(claim.queue.intermediate_queue_key, 1, job.id)
                job.meta["started_at"] = started_at
                self._save_meta(pipe, job)
                publish(pipe, self.keys, Running(job.id, started_at=started_at, batch_images=batch_images))
                if self.webhooks is not None:
                    self.webhooks.started(job, pipe)
                runs.append(RunningJob(job, claim.queue, execution))
            pipe.execute()
        return runs

    def end_batch(self) -> None:
        self.worker.set_current_job_id(None)

    # heartbeat ---------------------------------------------------------------------------------------------
    def heartbeat(self, runs: Iterable[RunningJob]) -> None:
        """Extend the worker key and every running job's registry entry and execution by one lease."""
        with self.connection.pipeline() as pipe:
            self.worker.heartbeat(pipeline=pipe)
            for run in runs:
                run.execution.heartbeat(run.queue.started_job_registry, self.lease_s, pipe)
                run.job.heartbeat(now(), self.lease_s, pipeline=pipe)
            pipe.execute()

    def renew_lease(self, run: RunningJob) -> bool:
        """Extend ``run``'s registry entry if it still exists; False = the job is no longer this worker's."""
        key = run.queue.started_job_registry.key
        score = time.time() + self.lease_s  # a float, so the score always changes and CH counts the update
        return bool(self.connection.zadd(key, {run.execution.composite_key: score}, xx=True, ch=True))

    # finalize ----------------------------------------------------------------------------------------------
    def succeed(self, run: RunningJob, result: dict[str, Any]) -> None:
        """Store ``result`` as the job's return value through RQ's own success path."""
        w, job = self.worker, run.job
        job.meta["warnings"] = result.get("warnings", [])
        with self.connection.pipeline() as pipe:
            self._save_meta(pipe, job)
            pipe.execute()
        job.ended_at = now()
        job._result = result
        job._status = JobStatus.FINISHED
        job.execute_success_callback(w.death_penalty_class, result)
        # handle_job_success takes the execution from the worker (one job per worker in RQ): lend it this one.
        w.execution = run.execution
        try:
            w.handle_job_success(job=job, queue=run.queue, started_job_registry=run.queue.started_job_registry)
        finally:
            w.execution = None
        self._announce(job, Succeeded(job.id, result=result))

    def fail(self, run: RunningJob, exc_info: ExcInfo) -> None:
        """Fail the job with its own exception: status failed, FailedJobRegistry, exc info in its RQ result."""
        w, job = self.worker, run.job
        error = job_error(exc_info[1])
        exc_string = "".join(traceback.format_exception(*exc_info))
        job.meta["error"] = error.model_dump()
        job.ended_at = now()
        job._status = JobStatus.FAILED
        try:
            job.execute_failure_callback(w.death_penalty_class, *exc_info)
        except Exception:
            log.exception("failure callback of job %s raised", job.id)
        w.handle_exception(job, *exc_info)
        self._finish_failed(run, JobStatus.FAILED, exc_string)
        self._announce(job, Failed(job.id, error=error))

    def cancel(self, run: RunningJob) -> None:
        """Canceled while running: status canceled, CanceledJobRegistry, no result."""
        job = run.job
        with self.connection.pipeline() as pipe:
            if job.get_status() != JobStatus.CANCELED:  # the API may have canceled it through RQ already
                job.cancel(pipeline=pipe)
            run.execution.delete(job=job, pipeline=pipe)
            pipe.execute()
        self._announce(job, Canceled(job.id, reason="canceled"))

    def stop(self, run: RunningJob) -> None:
        """Stopped by RQ's stop-job command: status stopped, in the FailedJobRegistry, as RQ leaves such jobs."""
        run.job.ended_at = now()
        self._finish_failed(run, JobStatus.STOPPED, "Job stopped by user.")
        self._announce(run.job, Canceled(run.id, reason="stopped"))

    # helpers -----------------------------------------------------------------------------------------------
    def _finish_failed(self, run: RunningJob, status: JobStatus, exc_string: str) -> None:
        w, job = self.worker, run.job
        with self.connection.pipeline() as pipe:
            job.set_status(status, pipeline=pipe)
            self._save_meta(pipe, job)
            run.execution.delete(job=job, pipeline=pipe)
            job._handle_failure(
                exc_string,
                pipeline=pipe,
                worker_name=w.name,
                execution_id=run.execution.id,
                execution_started_at=run.execution.created_at,
                execution_ended_at=job.ended_at,
            )
            w.increment_failed_job_count(pipe)
            if job.started_at and job.ended_at:
                w.increment_total_working_time(job.ended_at - job.started_at, pipe)
            pipe.execute()

    def _announce(self, job: Job, event: JobEvent) -> None:
        """Publish the terminal event, forget any cancel request for the job, and queue its completed webhook."""
        with self.connection.pipeline() as pipe:
            pipe.srem(self.keys.cancel_requests(), job.id)
            publish(pipe, self.keys, event)
            pipe.execute()
        if self.webhooks is not None:
            self.webhooks.completed(job)

    @staticmethod
    def _save_meta(pipe: Any, job: Job) -> None:
        # What Job.save_meta does, inside our pipeline.
        pipe.hset(job.key, "meta", job.serializer.dumps(job.meta))


class Heartbeat:
    """A thread that heartbeats the jobs of the running batch every ``interval_s`` (torch releases the GIL)."""

    def __init__(self, books: Bookkeeper, interval_s: float) -> None:
        self.books = books
        self.interval_s = interval_s
        self._runs: dict[str, RunningJob] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sdq-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def track(self, runs: Iterable[RunningJob]) -> None:
        with self._lock:
            self._runs.update((run.id, run) for run in runs)

    def untrack(self, run: RunningJob) -> None:
        """Stop heartbeating ``run`` (before it is finalized; waits for a heartbeat in flight)."""
        with self._lock:
            self._runs.pop(run.id, None)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                try:
                    self.books.heartbeat(list(self._runs.values()))
                except Exception:
                    # A missed beat is survivable (the lease is three beats); the next one retries.
                    log.exception("heartbeat failed")
