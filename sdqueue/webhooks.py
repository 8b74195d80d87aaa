"""``sdqueue webhooks``: the webhook sender. An RQ worker on the ``{prefix}-webhooks`` queue, with RQ's scheduler for
the retries, and its own /metrics listener (``SDQ_METRICS_HOST``, ``SDQ_WEBHOOK_METRICS_PORT``). No torch, no GPU:
run it from the API image, as many as the load needs.

Each process sends one message at a time; a receiver that hangs holds its sender for at most the request timeout
(``sdqueue.webhook_delivery.REQUEST_TIMEOUT_S``), so run more senders when receivers are slow.

Redis outages (down, unreachable, paused, or full under ``maxmemory`` + ``noeviction``) never end the sender. RQ's
``work()`` quits on any Redis error its steps raise, so each step that talks to Redis is a hook here
(``core.outages``): the idle wait retries with a backoff capped at ``SDQ_HEARTBEAT_S``, registration and the start
of a delivery wait until Redis answers, and bookkeeping that can be skipped (worker state, heartbeats, a cleanup) is
done next time. A message is sent at most once per attempt: the request goes out only after its start is recorded,
and its outcome (delivered, retry scheduled, failed) waits in memory until Redis takes it, so a message that was
in flight during an outage is recorded once Redis is back, not sent again. RQ's registry cleanup, which retries
the messages of a sender that died, waits for ``SETTLE_HEARTBEATS`` heartbeats of steady contact after an outage,
so that live senders record what they sent meanwhile before anyone takes their messages for abandoned. The
scheduler process rides out outages the same way.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, TypeVar
from uuid import uuid4

import redis.exceptions
from rq import worker_registration
from rq.exceptions import DequeueTimeout
from rq.executions import Execution, ExecutionRegistry
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.scheduler import RQScheduler
from rq.timeouts import JobTimeoutException
from rq.utils import now
from rq.worker import WorkerStatus

from core.metrics_http import MetricsPortError, serve_metrics
from core.outages import Backoff, GaveUp, Link, tolerate, until_answered
from core.queues import Keys, connect
from core.rq_worker import PatientWorker
from core.settings import Settings
from sdqueue.webhook_delivery import METRICS, DeliveryError

log = logging.getLogger(__name__)

T = TypeVar("T")

SCHEDULER_STOP_S = 5  # the scheduler's turn is 1 s: SIGTERM ends it within that
SETTLE_HEARTBEATS = 3  # steady contact before RQ's cleanup may take a message for abandoned


class WebhookWorker(PatientWorker):
    """RQ's in-process worker, sending one message at a time, through Redis outages of any length."""

    role = "webhook sender"

    # one message -------------------------------------------------------------------------------------------
    def execute_job(self, job: Job, queue: Queue) -> None:
        self._start(job)
        self.perform_job(job, queue)
        self.set_state(WorkerStatus.IDLE)

    def _start(self, job: Job) -> None:
        """RQ's ``prepare_execution``, with one execution id for every try: a try whose answer was lost may have
        registered it, and a second id would later look abandoned and send the message again."""
        execution = Execution(id=uuid4().hex, job_id=job.id, connection=self.connection, worker_name=self.name)

        def start() -> None:
            ttl = self.get_heartbeat_ttl(job)
            with self.connection.pipeline() as pipe:
                execution.save(ttl=ttl, pipeline=pipe)
                ExecutionRegistry(job_id=job.id, connection=self.connection).add(
                    execution=execution, ttl=ttl, pipeline=pipe)
                job.started_job_registry.add_execution(execution, pipeline=pipe, ttl=ttl, xx=False)
                self.set_state(WorkerStatus.BUSY, pipeline=pipe)
                pipe.execute()

        self.wait_for_redis(start, f"starting the delivery of {job.id}")
        self.execution = execution

    def perform_job(self, job: Job, queue: Queue) -> bool:
        """One attempt at one message: recorded as started, sent, then recorded, each record waiting for Redis.
        Unlike RQ's, a Redis error after the request never turns a delivered message into a failed one."""
        self.wait_for_redis(lambda: self.prepare_job_execution(job, remove_from_intermediate_queue=True),
                            f"starting the delivery of {job.id}")
        job.started_at = now()
        backoff = Backoff(self.heartbeat_s)
        while True:
            try:
                with self.death_penalty_class(job.timeout or Queue.DEFAULT_TIMEOUT, JobTimeoutException,
                                              job_id=job.id):
                    value = job.perform()
            except redis.exceptions.RedisError as exc:
                # Job.perform's PERSIST of the message, before the request (the delivery itself uses no Redis):
                # nothing was sent, so the attempt waits for Redis and starts again.
                self.redis_link.failed(exc, f"starting the delivery of {job.id}")
                backoff.wait()
                continue
            except Exception:
                exc_info = sys.exc_info()
                break
            job.ended_at = now()
            job._result = value
            job._status = JobStatus.FINISHED
            self._record(job, f"recording the delivery of {job.id}",
                         lambda: self.handle_job_success(job, queue, queue.started_job_registry))
            return True
        job.ended_at = now()
        job._status = JobStatus.FAILED
        self.handle_exception(job, *exc_info)
        exc_string = "".join(traceback.format_exception(*exc_info))
        self._record(job, f"recording the failed attempt of {job.id}",
                     lambda: self._record_failure(job, queue, exc_string))
        return False

    def _record(self, job: Job, doing: str, record: Callable[[], None]) -> None:
        """``record()`` until Redis takes it; each try starts from the same execution and retry count (a failed try
        may have cleared the one, RQ's Job.retry counts the other down in memory)."""
        execution, retries_left = self.execution, job.retries_left

        def attempt() -> None:
            self.execution, job.retries_left = execution, retries_left
            record()

        self.wait_for_redis(attempt, doing)

    def _record_failure(self, job: Job, queue: Queue, exc_string: str) -> None:
        """RQ's ``handle_job_failure`` in one transaction that raises its Redis errors (RQ's logs and drops them, and
        a message whose failure was dropped would come back through the cleanup and be sent again)."""
        execution = self.execution
        with self.connection.pipeline() as pipe:
            if job.should_retry:  # the backoff interval, or the receiver's Retry-After (webhook_delivery)
                job.retry(queue, pipe)
            else:
                job.set_status(JobStatus.FAILED, pipeline=pipe)
                job._handle_failure(exc_string, pipeline=pipe, worker_name=self.name,
                                    execution_id=execution.id if execution else None,
                                    execution_started_at=execution.created_at if execution else None,
                                    execution_ended_at=job.ended_at)
            self.cleanup_execution(job, pipeline=pipe)
            self.increment_failed_job_count(pipe)
            pipe.execute()

    def handle_exception(self, job: Job, *exc_info: Any) -> None:
        # A failed attempt was logged in one line where it happened; RQ would add a traceback for each attempt.
        if isinstance(exc_info[1], DeliveryError):
            return
        super().handle_exception(job, *exc_info)

    # RQ hooks: registration, heartbeat, commands ---------------------------------------------------------------
    def bootstrap(self, *args: Any, **kwargs: Any) -> None:
        # RQ installs its signal handlers only after registering and starting the scheduler, which may wait for
        # Redis: a SIGTERM meanwhile would kill the sender without its teardown.
        self._install_signal_handlers()
        super().bootstrap(*args, **kwargs)

    def register_birth(self) -> None:
        try:
            self.wait_for_redis(self._register, "registering the webhook sender",
                                give_up=lambda: self._stop_requested)
        except GaveUp:
            log.info("shutdown requested while waiting for Redis: the webhook sender never registered")

    def _shutdown(self) -> None:
        # Called from the SIGTERM/SIGINT handler. RQ raises StopRequested here when idle, which can land between a
        # dequeue and the delivery's start, and writes to Redis when busy, which can raise into a delivery; a flag
        # is safe anywhere, and the idle wait is a heartbeat long.
        self._stop_requested = True
        if self.scheduler:
            self.stop_scheduler()

    def clean_registries(self) -> None:
        """RQ's registry maintenance, only after steady contact, under a lock that expires after a few heartbeats
        (RQ's lasts 15 minutes: a sender killed while cleaning would stop the recovery of messages that long)."""
        if self.redis_link.steady_for() < SETTLE_HEARTBEATS * self.heartbeat_s:
            return  # last_cleaned_at stays: the next idle turn tries again
        for queue in self.queues:
            if self.connection.set(queue.registry_cleaning_key, self.name, nx=True,
                                   ex=SETTLE_HEARTBEATS * self.heartbeat_s):
                queue.started_job_registry.cleanup(exception_handlers=self._exc_handlers)
                queue.finished_job_registry.cleanup()
                queue.failed_job_registry.cleanup()
                queue.deferred_job_registry.cleanup()
                worker_registration.clean_worker_registry(queue)
                queue.intermediate_queue.cleanup(self, queue)
                queue.release_maintenance_lock()
        self.last_cleaned_at = now()  # type: ignore[assignment]  # RQ's __init__ types it as None

    def _start_scheduler(self, burst: bool = False, logging_level: str | None = "INFO", *args: Any,
                         **kwargs: Any) -> None:
        scheduler = PatientScheduler(self.queues, connection=self.connection,
                                     logging_level=logging_level or "INFO", serializer=self.serializer)
        self.scheduler = scheduler
        try:
            self.wait_for_redis(scheduler.acquire_locks, "taking the scheduler lock",
                                give_up=lambda: self._stop_requested)
        except GaveUp:
            return
        if scheduler.acquired_locks and not self._stop_requested:
            scheduler.start()  # otherwise another sender's scheduler runs; maintenance takes over if it stops

    def stop_scheduler(self) -> None:
        """RQ's stop (SIGTERM, then wait), with an end to the wait: a SIGTERM that reaches the forked scheduler
        before it has installed its own handlers lands in the sender's, copied by the fork, and the scheduler would
        never stop (nor would the sender, joining it). After a few of its turns it is killed; its locks expire."""
        process = self.scheduler._process if self.scheduler else None
        if process is None or process.pid is None:
            return
        with contextlib.suppress(OSError):
            os.kill(process.pid, signal.SIGTERM)
        process.join(SCHEDULER_STOP_S)
        if process.is_alive():
            log.warning("the webhook scheduler (pid %d) did not stop within %d s of SIGTERM: killing it",
                        process.pid, SCHEDULER_STOP_S)
            process.kill()
            process.join()

    # idle ----------------------------------------------------------------------------------------------------
    def dequeue_job_and_maintain_ttl(
        self, timeout: int | None, max_idle_time: int | None = None
    ) -> tuple[Job, Queue] | None:
        """RQ's dequeue loop, waiting out Redis errors of every kind (RQ's waits out only a refused connection);
        None once a shutdown was requested, once idle for ``max_idle_time``, or (burst mode) when the queue is
        empty."""
        self.set_state(WorkerStatus.IDLE)
        self.procline("Listening on " + ",".join(self.queue_names()))
        idle_until = None if max_idle_time is None else time.monotonic() + max_idle_time
        backoff = Backoff(self.heartbeat_s)
        while not self._stop_requested:
            self.heartbeat()
            if self.should_run_maintenance_tasks:
                self.run_maintenance_tasks()
            try:
                result = self.queue_class.dequeue_any(
                    self._ordered_queues, timeout, connection=self.connection, job_class=self.job_class,
                    serializer=self.serializer, death_penalty_class=self.death_penalty_class,
                )
            except DequeueTimeout:
                self.redis_link.answered()
                if idle_until is not None and time.monotonic() >= idle_until:
                    return None
            except redis.exceptions.RedisError as exc:
                self.redis_link.failed(exc, "waiting for webhooks to send")
                backoff.wait()
            else:
                self.redis_link.answered()
                if result is not None and self._stop_requested:
                    # The shutdown signal arrived while this message was being popped: give it back, first in line.
                    self.wait_for_redis(functools.partial(self._push_back, *result), f"giving {result[0].id} back")
                    return None
                return result
        return None


class PatientScheduler(RQScheduler):
    """RQ's scheduler process (it moves due retries to the queue), whose loop rides out Redis outages; RQ's ends
    at the first Redis error, and only a maintenance turn of its sender would start it again."""

    def work(self) -> None:
        self._install_signal_handlers()
        link = Link("Redis")
        try:
            until_answered(self.register_birth, "registering the scheduler", link, cap_s=self.interval,
                           give_up=lambda: self._stop_requested)
        except GaveUp:
            return
        while not self._stop_requested:
            try:
                if self.should_reacquire_locks:
                    self.acquire_locks()
                self.heartbeat()
                self.enqueue_scheduled_jobs()
            except redis.exceptions.RedisError as exc:
                link.failed(exc, "moving due webhook retries to their queue")
            else:
                link.answered()
            time.sleep(self.interval)
        tolerate(self.stop, "stopping the scheduler", link)


def run(settings: Settings) -> int:
    """Send webhooks until SIGTERM/SIGINT (which lets the message being sent finish); returns the exit code (2: the
    metrics port cannot be used)."""
    if settings.webhook_secret is None:
        log.warning("SDQ_WEBHOOK_SECRET is not set: the API refuses jobs with a webhook, so none will be sent")
    try:
        serve_metrics(METRICS.registry, what="webhook sender", host=settings.metrics_host,
                      port=settings.webhook_metrics_port, setting="SDQ_WEBHOOK_METRICS_PORT",
                      chosen="webhook_metrics_port" in settings.model_fields_set)
    except MetricsPortError as exc:
        log.error("%s", exc)
        return 2
    queue = Keys(settings.queue_prefix).webhooks()
    worker = WebhookWorker([queue], connection=connect(settings.redis_url), heartbeat_s=settings.heartbeat_s)
    log.info("webhook sender %s on queue %s", worker.name, queue)
    worker.work(with_scheduler=True, logging_level=settings.log_level)
    if not worker._stop_requested:
        # RQ's loop also ends on an error nobody expected (Redis errors are waited out); a non-zero exit lets the
        # supervisor restart the sender. The message it was sending comes back through RQ's registry cleanup.
        log.error("webhook sender %s stopped without a shutdown request (see the errors above)", worker.name)
        return 1
    return 0
