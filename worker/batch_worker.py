"""The sdqueue worker: an in-process RQ worker (``rq.SimpleWorker``, no fork per job) that runs batches of jobs.

RQ's own ``work()`` loop drives it; this class changes what one turn of that loop does. States (``Phase``):

    starting -> idle -> collecting -> running -> idle -> ...        (SIGTERM: finish the batch, then stopping)

- idle: ``dequeue_job_and_maintain_ttl`` waits on the priority queues with RQ's normal dequeue (highest priority
  first), heartbeating the worker and running registry maintenance every ``SDQ_HEARTBEAT_S``.
- collecting: the dequeued job is the head of the batch; the batcher adds compatible waiting jobs (``batcher.py``).
- running: every job is marked started and heartbeated (``bookkeeping.py``), run through the pipeline
  (``runner.py``) and finalized on its own as soon as its outcome is known.

Crash safety comes from RQ, with its timings tightened from minutes to seconds:
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
from collections.abc import Sequence
from enum import Enum
from typing import Any

import redis.exceptions
from redis import Redis
from rq import worker_registration
from rq.command import handle_command, parse_payload
from rq.exceptions import DequeueTimeout
from rq.job import Job
from rq.queue import Queue
from rq.registry import clean_registries
from rq.utils import now
from rq.worker import SimpleWorker, WorkerStatus

from core.catalog import publish_model
from core.jobs import JobSpec
from core.queue_stats import record_pipeline_call
from core.queues import JOB_FUNC
from core.settings import Settings
from core.webhook_queue import WebhookNotifier
from worker.batcher import Batcher, Claim, job_spec
from worker.bookkeeping import Bookkeeper, ExcInfo, Heartbeat, RunningJob
from worker.metrics import WorkerMetrics
from worker.model_info import describe_model
from worker.runner import BatchItem, BatchRunner, CallStats, Done, Error, Outcome, current_exc_info, to_request
from worker.tasks import Resident, build_result

log = logging.getLogger(__name__)


class Phase(str, Enum):
    starting = "starting"
    idle = "idle"
    collecting = "collecting"
    running = "running"
    stopping = "stopping"


class BatchWorker(SimpleWorker):
    def __init__(
        self,
        queues: Sequence[str],
        *,
        connection: Redis,
        settings: Settings,
        resident: Resident,
        metrics: WorkerMetrics,
        name: str | None = None,
    ) -> None:
        # Set before RQ's __init__, which sizes the connection's socket timeout from dequeue_timeout.
        self.heartbeat_s = settings.heartbeat_s
        self.lease_s = 3 * settings.heartbeat_s
        super().__init__(
            list(queues),
            name=name,
            connection=connection,
            worker_ttl=self.lease_s,
            maintenance_interval=settings.heartbeat_s,
            job_monitoring_interval=settings.heartbeat_s,
            log_job_description=False,  # the description holds the prompt: keep it out of the logs
        )
        self.phase = Phase.starting
        self.resident = resident
        self.model = describe_model(resident.pipe, settings.checkpoint)
        self.metrics = metrics
        self.keys = resident.keys
        self.webhooks = WebhookNotifier(connection, settings, resident.storage)  # queues deliveries, never sends
        self.books = Bookkeeper(self, self.keys, self.lease_s, webhooks=self.webhooks)
        self.batcher = Batcher(
            connection, self.queues, max_images=settings.max_batch_images, window_s=settings.batch_window_ms / 1000
        )
        self.runner = BatchRunner(
            resident.pipe,
            connection,
            self.keys,
            death_penalty_class=self.death_penalty_class,
            stop_requests=lambda: set(self._stop_ids),
            observe=self._observe,
            webhooks=self.webhooks,
        )
        self._batch_ids: set[str] = set()
        self._stop_ids: set[str] = set()  # RQ stop-job commands received for jobs of the running batch

    @property
    def stop_requested(self) -> bool:
        """Whether a warm shutdown (SIGTERM/SIGINT) was asked for."""
        return self._stop_requested

    # RQ hooks: registration --------------------------------------------------------------------------------
    def register_birth(self) -> None:
        super().register_birth()
        # GET /v1/models reads the model from the worker's own hash, so the entry lives and dies with the worker.
        publish_model(self.connection, self.key, self.model)

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
        if payload.get("command") == "stop-job" and job_id in self._batch_ids:
            self._stop_ids.add(job_id)
            log.info("stop requested for job %s: it leaves its batch at the next step", job_id)
            return
        handle_command(self, payload)

    # idle ----------------------------------------------------------------------------------------------------
    def dequeue_job_and_maintain_ttl(
        self, timeout: int | None, max_idle_time: int | None = None
    ) -> tuple[Job, Queue] | None:
        """RQ's dequeue loop, returning None (leave ``work()``) once a warm shutdown was requested."""
        self._enter(Phase.idle)
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

    # one batch -----------------------------------------------------------------------------------------------
    def execute_job(self, job: Job, queue: Queue) -> None:
        if job.func_name != JOB_FUNC:
            super().execute_job(job, queue)  # a plain RQ job on our queues runs the plain RQ way
            return
        self._enter(Phase.collecting)
        self.set_state(WorkerStatus.BUSY)
        try:
            if not self.batcher.take_head(job, queue):
                log.info("job %s is no longer queued (canceled or started elsewhere): skipped", job.id)
                return
            claims = self.batcher.collect(Claim(job, queue), should_stop=lambda: self._stop_requested)
            self._run_batch(claims)
        finally:
            self._batch_ids, self._stop_ids = set(), set()
            self._enter(Phase.stopping if self._stop_requested else Phase.idle)
            self.set_state(WorkerStatus.IDLE)

    def _run_batch(self, claims: list[Claim]) -> None:
        specs: list[JobSpec | ExcInfo] = []
        for claim in claims:
            try:
                specs.append(job_spec(claim.job))
            except Exception:
                specs.append(current_exc_info())
        batch_images = sum(s.params.n for s in specs if isinstance(s, JobSpec))
        runs = self.books.start(claims, batch_images)
        self._batch_ids = {run.id for run in runs}
        self._enter(Phase.running)
        log.info("batch of %d jobs, %d images", len(runs), batch_images)
        with Heartbeat(self.books, self.heartbeat_s) as heartbeat:
            heartbeat.track(runs)
            items = []
            for run, spec in zip(runs, specs, strict=True):
                if not isinstance(spec, JobSpec):  # no readable spec: it fails alone with the parse error
                    self._finish(heartbeat, run, None, Error(spec))
                    continue
                try:
                    request = to_request(spec, self.resident.storage)  # reads img2img / inpaint inputs
                    self.resident.pipe.check(request)  # a job the model cannot run fails alone, before the batch
                except Exception:
                    self._finish(heartbeat, run, None, Error(current_exc_info()))
                    continue
                items.append(BatchItem(run, spec, request))

            def finish(item: BatchItem, outcome: Outcome) -> None:
                self._finish(heartbeat, item.run, item.spec, outcome)

            self.runner.run(items, finish)
        self.books.end_batch()

    def _finish(self, heartbeat: Heartbeat, run: RunningJob, spec: JobSpec | None, outcome: Outcome) -> None:
        """Finalize one job, unless it stopped being ours (recovered elsewhere after a missed lease, or canceled)."""
        if not self.books.renew_lease(run):
            heartbeat.untrack(run)
            log.warning("job %s is no longer registered to this worker: its outcome here is dropped", run.id)
            self.metrics.jobs.labels("lost").inc()
            return
        result: dict[str, Any] = {}
        if isinstance(outcome, Done):
            assert spec is not None
            try:
                result = build_result(
                    self.resident.storage, spec, outcome.result, self.resident.model,
                    time.monotonic() - run.started, outcome.pipeline_seconds,
                )
            except Exception:
                outcome = Error(current_exc_info())  # e.g. storage unreachable: the job fails with that error
        heartbeat.untrack(run)
        if not self.books.renew_lease(run):  # the image writes took longer than the lease
            log.warning("job %s was recovered by another worker while its images were written", run.id)
            self.metrics.jobs.labels("lost").inc()
            return
        if isinstance(outcome, Done):
            self.books.succeed(run, result)
            label = "succeeded"
        elif isinstance(outcome, Error):
            self.books.fail(run, outcome.exc_info)
            label = "failed"
        elif outcome.reason == "stopped":
            self.books.stop(run)
            label = "stopped"
        else:
            self.books.cancel(run)
            label = "canceled"
        self.metrics.jobs.labels(label).inc()
        self.metrics.job_run_seconds.observe(time.monotonic() - run.started)

    def _observe(self, call: CallStats) -> None:
        self.metrics.pipeline_call(call.images, call.steps, call.steps_per_second, call.seconds)
        try:
            record_pipeline_call(self.connection, self.keys, call.seconds, call.images, call.jobs)
        except redis.exceptions.RedisError:
            log.warning("could not record queue statistics", exc_info=True)

    def _enter(self, phase: Phase) -> None:
        if phase != self.phase:
            log.debug("worker %s: %s -> %s", self.name, self.phase.value, phase.value)
            self.phase = phase
        self.metrics.busy.set(1 if phase in (Phase.collecting, Phase.running) else 0)
