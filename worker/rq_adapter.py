"""Everything that touches RQ's internals lives here: the worker's RQ hooks and the per-job records of a batch.

RQ runs one job per worker (rq#928): ``prepare_execution`` / ``prepare_job_execution`` mark it started,
``maintain_heartbeats`` keeps it alive and ``handle_job_success`` / ``handle_job_failure`` finish it. A batch holds
several jobs at once, so ``Bookkeeper`` does the same steps per job, with one RQ ``Execution`` per job:

- start: ``Execution.create`` (StartedJobRegistry entry scored now + lease), ``Job.prepare_for_execution`` (status
  started, started_at, worker name), removal from RQ's intermediate list, ``meta.started_at``, a ``running`` event;
- heartbeat: every ``SDQ_HEARTBEAT_S`` (``worker.heartbeat``) every running job's registry score goes to now + lease
  (the lease is 3 heartbeats), so a batch of any length keeps its jobs, and a dead worker's expire within one lease;
- finalize: success through RQ's ``handle_job_success`` (result, FinishedJobRegistry), failure with the job's own
  exception (FailedJobRegistry, exc info), cancel (``Job.cancel``: CanceledJobRegistry) or stop (status stopped, as
  RQ's stop-job command leaves it).

Failures here are final: RQ's ``Retry`` budget is kept for jobs whose worker died (StartedJobRegistry cleanup
re-enqueues those), since re-running a job that raised on its own input gives the same error again.

Exactly once: before a job is finalized its lease is renewed with ``ZADD XX CH``, which succeeds only if the
registry entry is still there. If it is gone, the registry cleanup already gave the job to another worker (this
worker was presumed dead) or it was canceled, and this worker drops its result.

``RQWorker`` is ``rq.SimpleWorker`` (no fork per job) with RQ's timings tightened from minutes to seconds and a
shutdown that never drops a job; its subclass decides what one turn does (``run_turn``).
- each running job holds a lease in RQ's StartedJobRegistry of 3 heartbeats, renewed every heartbeat by a thread;
- every worker runs RQ's registry cleanup every heartbeat (under RQ's maintenance lock, held for at most one lease
  instead of RQ's 15 minutes), which re-enqueues the jobs of a dead worker (RQ ``Retry``) once their lease expired.
So a SIGKILLed worker's jobs are queued again within about 4 heartbeats (20 s at the default 5 s).
SIGTERM (RQ's warm shutdown) finishes the running batch, claims no new job, and returns from ``work()``.
"""

from __future__ import annotations

import logging
import math
import time
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import redis.exceptions
from redis import Redis
from rq import worker_registration
from rq.command import handle_command, parse_payload
from rq.exceptions import DequeueTimeout
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.registry import clean_registries
from rq.utils import now, utcformat
from rq.worker import BaseWorker, SimpleWorker, WorkerStatus

from core.jobs import JobError
from core.queues import JOB_FUNC, Keys
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
            pipe.hset(job.key, "ended_at", utcformat(now()))  # RQ's cancel records no end; finished_at reads it
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


class RQWorker(SimpleWorker):
    """An in-process RQ worker whose turn (``run_turn``) runs a batch of sdqueue jobs."""

    def __init__(self, queues: Sequence[str], *, connection: Redis, heartbeat_s: int, name: str | None = None) -> None:
        # Set before RQ's __init__, which sizes the connection's socket timeout from dequeue_timeout.
        self.heartbeat_s = heartbeat_s
        self.lease_s = 3 * heartbeat_s
        super().__init__(
            list(queues),
            name=name,
            connection=connection,
            worker_ttl=self.lease_s,
            maintenance_interval=heartbeat_s,
            job_monitoring_interval=heartbeat_s,
            log_job_description=False,  # the description holds the prompt: keep it out of the logs
        )
        self.batch_ids: set[str] = set()  # jobs of the running batch
        self.stop_ids: set[str] = set()  # RQ stop-job commands received for jobs of the running batch

    @property
    def stop_requested(self) -> bool:
        """Whether a warm shutdown (SIGTERM/SIGINT) was asked for."""
        return self._stop_requested

    def run_turn(self, job: Job, queue: Queue) -> None:
        """One batch, headed by ``job`` (RQ dequeued it from ``queue``)."""
        raise NotImplementedError

    def on_birth(self) -> None:
        """Called right after RQ registered the worker."""

    def on_idle(self) -> None:
        """Called when the worker starts waiting for a job."""

    # turn ----------------------------------------------------------------------------------------------------
    def execute_job(self, job: Job, queue: Queue) -> None:
        if job.func_name != JOB_FUNC:
            super().execute_job(job, queue)  # a plain RQ job on our queues runs the plain RQ way
            return
        self.set_state(WorkerStatus.BUSY)
        try:
            self.run_turn(job, queue)
        finally:
            self.batch_ids, self.stop_ids = set(), set()
            self.set_current_job_id(None)
            self.set_state(WorkerStatus.IDLE)

    # RQ hooks: registration --------------------------------------------------------------------------------
    def register_birth(self) -> None:
        super().register_birth()
        self.on_birth()

    # RQ hooks: timings -------------------------------------------------------------------------------------
    @property
    def dequeue_timeout(self) -> int:
        # The idle wait is cut into heartbeat-long slices, so maintenance (abandoned-job recovery) runs that often.
        return self.heartbeat_s

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        # RQ keeps a worker's key for worker_ttl + 60 s; one lease is enough for /readyz to forget a dead worker.
        super().heartbeat(timeout or self.lease_s, pipeline=pipeline)

    def clean_registries(self) -> None:
        """RQ's registry maintenance, under a lock that expires after one lease (RQ's lasts 15 minutes, so a worker
        killed while cleaning would stop abandoned-job recovery for that long)."""
        for queue in self.queues:
            if self.connection.set(queue.registry_cleaning_key, self.name, nx=True, ex=self.lease_s):
                clean_registries(queue, self._exc_handlers)
                worker_registration.clean_worker_registry(queue)
                queue.intermediate_queue.cleanup(self, queue)
                queue.release_maintenance_lock()
        self.last_cleaned_at = now()  # type: ignore[assignment]  # RQ's __init__ types it as None

    # RQ hooks: shutdown and commands -----------------------------------------------------------------------
    def _shutdown(self) -> None:
        # Called from the SIGTERM/SIGINT handler. RQ raises StopRequested here when idle, which can land between
        # a dequeue and the job's start and lose the job; a flag is safe anywhere, and the idle wait is short.
        self._stop_requested = True
        log.info("warm shutdown requested: finishing the current batch, then exiting")

    def handle_payload(self, message: dict[Any, Any]) -> None:
        """RQ's worker commands; ``stop-job`` also reaches jobs of the batch other than the first."""
        payload = parse_payload(message)
        job_id = payload.get("job_id")
        if payload.get("command") == "stop-job" and job_id in self.batch_ids:
            self.stop_ids.add(job_id)
            log.info("stop requested for job %s: it leaves its batch at the next step", job_id)
            return
        handle_command(self, payload)

    # idle ----------------------------------------------------------------------------------------------------
    def dequeue_job_and_maintain_ttl(
        self, timeout: int | None, max_idle_time: int | None = None
    ) -> tuple[Job, Queue] | None:
        """RQ's dequeue loop, returning None (leave ``work()``) once a warm shutdown was requested."""
        self.on_idle()
        self.set_state(WorkerStatus.IDLE)
        self.procline("Listening on " + ",".join(self.queue_names()))
        idle_until = math.inf if max_idle_time is None else time.monotonic() + max_idle_time
        backoff = 1.0
        while not self._stop_requested:
            try:
                self.heartbeat()
                if self.should_run_maintenance_tasks:
                    self.run_maintenance_tasks()
                wait = timeout
                if wait is not None and idle_until < math.inf:
                    wait = max(1, min(wait, math.ceil(idle_until - time.monotonic())))
                result = self.queue_class.dequeue_any(
                    self._ordered_queues,
                    wait,
                    connection=self.connection,
                    job_class=self.job_class,
                    serializer=self.serializer,
                    death_penalty_class=self.death_penalty_class,
                )
            except DequeueTimeout:
                if time.monotonic() >= idle_until:
                    return None
                continue
            except redis.exceptions.ConnectionError as exc:
                log.error("Redis unreachable (%s): retrying in %.0f s", exc, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, self.max_connection_wait_time)
                continue
            if result is None:  # burst mode: the queues are empty
                return None
            job, queue = result
            if self._stop_requested:
                # The shutdown signal arrived while this job was being popped: give it back, first in line.
                with self.connection.pipeline() as pipe:
                    queue.push_job_id(job.id, pipeline=pipe, at_front=True)
                    pipe.lrem(queue.intermediate_queue_key, 1, job.id)  # where RQ's single-queue dequeue puts it
                    pipe.execute()
                return None
            return job, queue
        return None
