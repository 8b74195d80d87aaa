"""The worker's RQ hooks (``RQWorker``); with ``worker.rq_records`` (per-job records) and the hooks it shares with
the webhook sender (``core.rq_worker``), the only worker code that uses RQ internals.

``RQWorker`` is ``rq.SimpleWorker`` (no fork per job) with RQ's timings tightened from minutes to seconds, a
shutdown that never drops a job, and a loop that rides out Redis outages; its subclass decides what one turn does
(``run_turn``).

- Each running job holds a lease in RQ's StartedJobRegistry of 3 heartbeats, renewed every heartbeat by a thread.
- Every worker runs RQ's registry cleanup every heartbeat (under RQ's maintenance lock, held for at most one lease
  instead of RQ's 15 minutes), which re-enqueues the jobs of a dead worker (RQ ``Retry``) once their lease expired.
  The batch worker's lease watch (``worker.sweeper.LeaseWatch``) also runs the started-registry part as soon as the
  earliest lease lapses, idle or busy, so a SIGKILLed worker's jobs are queued again, at the front, within 3
  heartbeats (15 s at the default 5 s). A job with no retry left fails there, with ``meta.error`` saying how often
  its worker died while running it, and with its ``failed`` event and completed webhook in the same transaction
  (``_clean_started``, our version of RQ's cleanup).
- SIGTERM (RQ's warm shutdown) finishes the running batch, claims no new job, and returns from ``work()``.

Redis outages (down, unreachable, paused, or full under ``maxmemory`` + ``noeviction``) never end the loop. RQ's
``work()`` quits on any error its steps raise, so every step that talks to Redis is one of these hooks: the idle
wait retries with capped backoff (``worker.outages``); registration waits until Redis answers; the hooks shared
with the webhook sender (``core.rq_worker.PatientWorker``) wait for the command subscription and skip, until next
time, bookkeeping that can be skipped (worker state, a heartbeat, a cleanup), and a registration that expired
while Redis was away is written again at the next heartbeat (``rejoin``). The registry cleanup waits for a lease
plus a heartbeat of steady contact after any outage or stall, and after the worker's start: an outage stops every
worker's heartbeats, so right after it every lease looks expired, and the workers that are alive need a heartbeat
to renew theirs before anyone takes their jobs for abandoned.
"""

from __future__ import annotations

import functools
import logging
import math
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

import redis.exceptions
from redis import Redis
from redis.client import Pipeline
from redis.exceptions import WatchError
from rq import worker_registration
from rq.command import handle_command, parse_payload
from rq.exceptions import AbandonedJobError, DequeueTimeout, NoSuchJobError
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.utils import current_timestamp, now
from rq.worker import WorkerStatus

from core.attempts import died_message, read_counts
from core.jobs import JobError
from core.queues import JOB_FUNC
from core.rq_worker import PatientWorker
from worker.events import Failed
from worker.outages import Backoff, GaveUp
from worker.outbox import Outbox

log = logging.getLogger(__name__)

T = TypeVar("T")


class RQWorker(PatientWorker):
    """An in-process RQ worker whose turn (``run_turn``) runs a batch of sdqueue jobs."""

    def __init__(self, queues: Sequence[str], *, connection: Redis, heartbeat_s: int, name: str | None = None) -> None:
        self.lease_s = 3 * heartbeat_s  # before RQ's __init__, which reads registration_ttl's worker_ttl
        super().__init__(
            queues,
            connection=connection,
            heartbeat_s=heartbeat_s,
            name=name,
            worker_ttl=self.lease_s,
            job_monitoring_interval=heartbeat_s,
        )
        self.batch_ids: set[str] = set()  # jobs of the running batch
        self.stop_ids: set[str] = set()  # RQ stop-job commands received for jobs of the running batch
        # What leaves with the failure of an abandoned job: set by the Bookkeeper that records this worker's jobs.
        self.outbox: Outbox | None = None

    @property
    def registration_ttl(self) -> int:
        # RQ keeps a worker's key for worker_ttl + 60 s; one lease is enough for /readyz to forget a dead worker.
        return self.lease_s

    @property
    def stop_requested(self) -> bool:
        """Whether a warm shutdown (SIGTERM/SIGINT) was asked for."""
        return self._stop_requested

    def run_turn(self, job: Job, queue: Queue) -> None:
        """One batch, headed by ``job`` (RQ dequeued it from ``queue``)."""
        raise NotImplementedError

    def on_idle(self) -> None:
        """Called when the worker starts waiting for a job."""

    def on_maintenance(self) -> None:
        """Called after RQ's registry cleanup, with the same steady contact with Redis behind it."""

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
            self._tolerate(self.set_current_job_id, "clearing the worker's current job")
            self.set_state(WorkerStatus.IDLE)

    # RQ hooks: registration --------------------------------------------------------------------------------
    def register_birth(self) -> None:
        rq_register = super().register_birth  # refuses a name that a live worker holds
        attempts = 0

        def register() -> None:
            nonlocal attempts
            attempts += 1
            if attempts == 1:
                rq_register()
            else:
                self._register()  # the key may be ours already, from an attempt whose answer was lost
            self.on_birth()

        try:
            self.wait_for_redis(register, "registering the worker", give_up=lambda: self._stop_requested)
        except GaveUp:
            log.info("shutdown requested while waiting for Redis: the worker never registered")

    # RQ hooks: maintenance ---------------------------------------------------------------------------------
    def clean_registries(self) -> None:
        """RQ's registry maintenance, under a lock that expires after one lease (RQ's lasts 15 minutes, so a worker
        killed while cleaning would stop abandoned-job recovery for that long), and only after steady contact."""
        for queue in self.queues:
            if self.redis_link.steady_for() < self.lease_s + self.heartbeat_s:
                return  # last_cleaned_at stays: the next idle turn tries again
            if self.connection.set(queue.registry_cleaning_key, self.name, nx=True, ex=self.lease_s):
                # The started registry first, right after the check (what rq.registry.clean_registries cleans).
                self._clean_started(queue)
                queue.finished_job_registry.cleanup()
                queue.failed_job_registry.cleanup()
                queue.deferred_job_registry.cleanup()
                worker_registration.clean_worker_registry(queue)
                queue.intermediate_queue.cleanup(self, queue)
                queue.release_maintenance_lock()
        self.on_maintenance()
        self.last_cleaned_at = now()  # type: ignore[assignment]  # RQ's __init__ types it as None

    def _clean_started(self, queue: Queue) -> None:
        """RQ's StartedJobRegistry cleanup, one expired entry (a run whose worker died) per transaction: the entry
        goes, and its job goes back to its queue through RQ's ``Retry``, or, with no retry left, fails with the
        reason in ``meta.error`` and its outbox (``failed`` event, completed webhook) in the same transaction. The
        transaction WATCHes the registry, which a lease renewal and every worker's final record write, so a job
        whose lease was renewed meanwhile stays, and a job ends once."""
        registry = queue.started_job_registry
        for member in self.connection.zrangebyscore(registry.key, 0, current_timestamp()):
            self._abandon(queue, member)

    def _abandon(self, queue: Queue, member: bytes) -> None:
        registry = queue.started_job_registry
        job_id = registry.parse_job_id(member)
        reported = False
        with self.connection.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(registry.key)
                    score = cast(float | None, pipe.zscore(registry.key, member))
                    if score is None or score > current_timestamp():
                        return  # finalized, or renewed, meanwhile
                    try:
                        job: Job | None = self.job_class.fetch(job_id, connection=self.connection,
                                                               serializer=self.serializer)
                    except NoSuchJobError:
                        job = None
                    if job is not None and job.get_status(refresh=False) != JobStatus.STARTED:
                        job = None  # a stale entry: only a started job can have been abandoned
                    if job is not None and not reported:
                        reported = True
                        self._report_abandoned(job)
                    error = self._died(job) if job is not None and not job.retries_left else None
                    pipe.multi()
                    pipe.zrem(registry.key, member)
                    if job is not None and error is None:
                        job.retry(queue, pipe)
                    elif job is not None and error is not None:
                        self._fail_abandoned(pipe, job, error)
                    pipe.execute()
                    if job is not None and error is not None:
                        log.warning("job %s failed: %s", job_id, error.message)
                        queue.enqueue_dependents(job, refresh_job_status=False)  # as RQ's cleanup does
                    return
                except WatchError:
                    continue  # the registry changed: look at the lease again

    def _report_abandoned(self, job: Job) -> None:
        """What RQ's cleanup runs for an abandoned job: its failure callback, then the worker's exception handlers
        (one that returns a false value other than None stops the others)."""
        exc, stack = AbandonedJobError(), traceback.extract_stack()
        job.execute_failure_callback(self.death_penalty_class, AbandonedJobError, exc, stack)
        for handler in self._exc_handlers:
            fallthrough = handler(job, AbandonedJobError, exc, stack)
            if fallthrough is not None and not fallthrough:
                break

    def _died(self, job: Job) -> JobError:
        attempts, given_back = read_counts(self.connection, job.key)
        return JobError(type="WorkerError", message=died_message(max(1, attempts - given_back)))

    def _fail_abandoned(self, pipe: Pipeline, job: Job, error: JobError) -> None:
        """RQ's failure of an abandoned job, into ``pipe``, with an end time, the reason and the job's outbox."""
        job.meta["error"] = error.model_dump()
        job.ended_at = now()
        job.set_status(JobStatus.FAILED, pipeline=pipe)
        pipe.hset(job.key, "meta", job.serializer.dumps(job.meta))
        job._handle_failure(f"Moved to FailedJobRegistry, due to AbandonedJobError, at {job.ended_at}", pipe,
                            worker_name="")
        if self.outbox is not None and job.func_name == JOB_FUNC:
            self.outbox.write(pipe, job, Failed(job.id, error=error))

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
        backoff = Backoff(self.heartbeat_s)
        while not self._stop_requested:
            try:
                self._timed(self.beat, 0, "sending the worker's heartbeat")
                if self.should_run_maintenance_tasks:
                    self.run_maintenance_tasks()
                wait = timeout
                if wait is not None and idle_until < math.inf:
                    wait = max(1, min(wait, math.ceil(idle_until - time.monotonic())))
                dequeue = functools.partial(
                    self.queue_class.dequeue_any,
                    self._ordered_queues,
                    wait,
                    connection=self.connection,
                    job_class=self.job_class,
                    serializer=self.serializer,
                    death_penalty_class=self.death_penalty_class,
                )
                result = self._timed(dequeue, wait or 0, "waiting for jobs")
            except DequeueTimeout:
                if time.monotonic() >= idle_until:
                    return None
                continue
            except redis.exceptions.RedisError as exc:
                self.redis_link.failed(exc, "waiting for jobs")
                backoff.wait()
                continue
            backoff = Backoff(self.heartbeat_s)
            if result is None:  # burst mode: the queues are empty
                return None
            job, queue = result
            if self._stop_requested:
                # The shutdown signal arrived while this job was being popped: give it back, first in line.
                self.wait_for_redis(functools.partial(self._push_back, job, queue), f"giving job {job.id} back")
                return None
            return job, queue
        return None

    def _timed(self, call: Callable[[], T], expected_s: float, doing: str) -> T:
        """``call()``; a call that took a heartbeat longer than ``expected_s`` answered, but Redis stalled."""
        started = time.monotonic()
        try:
            value = call()
        except DequeueTimeout:  # an answer: nothing to dequeue
            self._answered(time.monotonic() - started, expected_s, doing)
            raise
        self._answered(time.monotonic() - started, expected_s, doing)
        return value

    def _answered(self, took: float, expected_s: float, doing: str) -> None:
        if took > expected_s + self.heartbeat_s:
            self.redis_link.stalled(took, doing)
        else:
            self.redis_link.answered()
