"""The per-job RQ records of a batch (``Bookkeeper``); with ``worker.rq_adapter`` the only code that uses RQ internals.

RQ runs one job per worker (rq#928): ``prepare_execution`` / ``prepare_job_execution`` mark it started,
``maintain_heartbeats`` keeps it alive and ``handle_job_success`` / ``handle_job_failure`` finish it. A batch holds
several jobs at once, so ``Bookkeeper`` does the same steps per job, with one RQ ``Execution`` per job:

- start: the execution (StartedJobRegistry entry scored now + lease), ``Job.prepare_for_execution`` (status
  started, started_at, worker name), the job's attempt count (``core.attempts``), removal from RQ's intermediate
  list, ``meta.started_at``, a ``running`` event; all in one transaction, retried until Redis answers, with the same
  execution ids and attempt count every time;
- heartbeat: every ``SDQ_HEARTBEAT_S`` (``worker.heartbeat``) every running job's registry score goes to now + lease
  (the lease is 3 heartbeats), so a batch of any length keeps its jobs, and a dead worker's expire within one lease.
  A worker registration that expired meanwhile (Redis unreachable for longer than a lease) is written again;
- finalize: success through RQ's ``handle_job_success`` (result, FinishedJobRegistry), failure with the job's own
  exception (FailedJobRegistry, exc info), cancel (``Job.cancel``: CanceledJobRegistry), stop (status stopped, as
  RQ's stop-job command leaves it), or give-back (``Job.retry``: back in its queue, one retry spent) for a job the
  infrastructure kept from finishing. Each is one transaction, with the job's outbox (``worker.outbox``: terminal
  event, end of its cancel request, completed webhook) in it, and one attempt that raises Redis errors;
  ``worker.finalizer`` retries.

Failures are final: RQ's ``Retry`` budget is kept for jobs whose worker died (StartedJobRegistry cleanup
re-enqueues those) or that storage kept from finishing, since re-running a job that raised on its own input gives
the same error again.

Exactly once: every final record is one ``WATCH``ed transaction that checks, after the WATCH, that the run's
registry entry is still there and the job still started by this worker (``_final``). If it is not, the registry
cleanup already gave the job to another worker (this worker was presumed dead) or it was canceled, and this worker
drops its outcome; a handover between the check and the EXEC aborts the transaction. When a connection broke while
an outcome was being written, ``landed`` tells whether that write took effect before the entry is taken for lost,
so that neither the record nor its event and webhook are written twice.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, cast
from uuid import uuid4

from redis.client import Pipeline
from redis.exceptions import ConnectionError, TimeoutError, WatchError
from rq.executions import Execution, ExecutionRegistry
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.results import Result
from rq.utils import now, utcformat
from rq.worker import BaseWorker

from core.attempts import ATTEMPTS_FIELD, CLAIMED_BY_FIELD, GIVEN_BACK_FIELD
from core.jobs import JobError
from core.queues import Keys
from core.webhook_queue import WebhookNotifier
from worker.batcher import Claim
from worker.events import Canceled, Failed, JobEvent, Running, Succeeded, publish
from worker.outages import Link, until_answered
from worker.outbox import Outbox
from worker.rq_adapter import RQWorker

log = logging.getLogger(__name__)

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


@dataclass
class RunningJob:
    """A started job of the current batch."""

    job: Job
    queue: Queue
    execution: Execution
    attempts: int = 1  # this run included (``core.attempts``)
    given_back: int = 0
    started: float = field(default_factory=time.monotonic)
    reported: bool = False  # its callbacks and exception handlers ran: once, however often Redis is retried

    @property
    def id(self) -> str:
        return self.job.id


def job_error(exc: BaseException) -> JobError:
    message = str(exc).strip() or type(exc).__name__
    return JobError(type=type(exc).__name__, message=message)


class Bookkeeper:
    def __init__(self, worker: BaseWorker, keys: Keys, lease_s: int, webhooks: WebhookNotifier | None = None,
                 redis: Link | None = None) -> None:
        self.worker = worker
        self.connection = worker.connection
        self.keys = keys
        self.lease_s = lease_s
        self.webhooks = webhooks
        self.redis = redis or Link("Redis")
        self.wait_cap_s = max(1.0, lease_s / 3)  # one heartbeat
        self.outbox = Outbox(keys, webhooks)
        if isinstance(worker, RQWorker):
            worker.outbox = self.outbox  # the failure of an abandoned job carries the same outbox (RQ's cleanup)

    # start -------------------------------------------------------------------------------------------------
    def start(self, claims: Sequence[Claim], batch_images: int) -> list[RunningJob]:
        """Mark every claimed job started (one transaction, waiting for Redis), and announce it."""
        w = self.worker
        runs = [RunningJob(c.job, c.queue, Execution(uuid4().hex, c.job.id, self.connection, worker_name=w.name),
                           attempts=c.attempts + 1, given_back=c.given_back)
                for c in claims]
        started_at = now().isoformat()

        def write() -> None:
            with self.connection.pipeline() as pipe:
                w.set_current_job_id(runs[0].id, pipeline=pipe)
                for run in runs:
                    job = run.job
                    self._add_execution(pipe, run)
                    job.prepare_for_execution(w.name, pipeline=pipe)
                    pipe.hset(job.key, ATTEMPTS_FIELD, run.attempts)  # a value, not HINCRBY: a retried write is safe
                    pipe.hdel(job.key, CLAIMED_BY_FIELD)  # started: no longer the sweeper's business
                    pipe.lrem(run.queue.intermediate_queue_key, 1, job.id)
                    job.meta["started_at"] = started_at
                    self._save_meta(pipe, job)
                    publish(pipe, self.keys, Running(job.id, started_at=started_at, batch_images=batch_images))
                    if self.webhooks is not None:
                        self.webhooks.started(job, pipe)
                pipe.execute()

        until_answered(write, "starting a batch", self.redis, cap_s=self.wait_cap_s)
        return runs

    def _add_execution(self, pipe: Pipeline, run: RunningJob) -> None:
        # What Execution.create writes, for an execution made beforehand: a retried start reuses its id.
        execution = run.execution
        execution.save(ttl=self.lease_s, pipeline=pipe)
        ExecutionRegistry(job_id=run.id, connection=pipe).add(execution=execution, ttl=self.lease_s, pipeline=pipe)
        run.job.started_job_registry.add_execution(execution, pipeline=pipe, ttl=self.lease_s, xx=False)

    # heartbeat ---------------------------------------------------------------------------------------------
    def heartbeat(self, runs: Iterable[RunningJob]) -> None:
        """Extend the worker key and every running job's registry entry and execution by one lease."""
        with self.connection.pipeline() as pipe:
            self.worker.heartbeat(pipeline=pipe)  # first command: HSET last_heartbeat, 1 = the key had expired
            for run in runs:
                run.execution.heartbeat(run.queue.started_job_registry, self.lease_s, pipe)
                pipe.hset(run.execution.key, mapping=run.execution.serialize())  # in case it expired meanwhile
                run.job.heartbeat(now(), self.lease_s, pipeline=pipe)
            lapsed = pipe.execute()[0] == 1
        if lapsed and isinstance(self.worker, RQWorker):
            self.worker.rejoin()

    def renew_lease(self, run: RunningJob) -> bool:
        """Extend ``run``'s registry entry if it still exists; False = the job is no longer this worker's."""
        key = run.queue.started_job_registry.key
        score = time.time() + self.lease_s  # a float, so the score always changes and CH counts the update
        return bool(self.connection.zadd(key, {run.execution.composite_key: score}, xx=True, ch=True))

    def landed(self, run: RunningJob) -> bool:
        """Whether this worker's outcome of ``run`` is recorded already: its result carries this execution's id, or
        the job is canceled (for a write whose answer was lost with the connection)."""
        if self.connection.hget(run.job.key, "status") == JobStatus.CANCELED.value.encode():
            return True
        latest = Result.fetch_latest(run.job, serializer=run.job.serializer)
        return latest is not None and latest.execution_id == run.execution.id

    # finalize: one attempt each, Redis errors raised ------------------------------------------------------
    def succeed(self, run: RunningJob, result: dict[str, Any]) -> bool:
        """Store ``result`` as the job's return value, as RQ's ``handle_job_success`` does (result, finished
        registry, counters), with its ``succeeded`` event and completed webhook (``_final``). False: not ours."""
        w, job = self.worker, run.job
        job.meta["warnings"] = result.get("warnings", [])
        job.ended_at = now()
        job._result = result
        job._status = JobStatus.FINISHED
        if not run.reported:
            run.reported = True
            job.execute_success_callback(w.death_penalty_class, result)

        def write(pipe: Pipeline) -> None:
            assert job.ended_at is not None
            self._save_meta(pipe, job)
            w.increment_successful_job_count(pipeline=pipe)
            if job.started_at:
                w.increment_total_working_time(job.ended_at - job.started_at, pipe)
            result_ttl = job.get_result_ttl(w.default_result_ttl)
            if result_ttl != 0:
                job._handle_success(result_ttl, pipeline=pipe, worker_name=w.name, execution_id=run.execution.id,
                                    execution_started_at=run.execution.created_at, execution_ended_at=job.ended_at)
            job.cleanup(result_ttl, pipeline=pipe, remove_from_queue=False)
            run.execution.delete(job=job, pipeline=pipe)

        return self._final(run, write, Succeeded(run.id, result=result), return_value=result)

    def fail(self, run: RunningJob, exc_info: ExcInfo) -> bool:
        """Fail the job with its own exception: status failed, FailedJobRegistry, exc info in its RQ result; its
        ``failed`` event and completed webhook. False: not ours."""
        w, job = self.worker, run.job
        error = job_error(exc_info[1])
        job.meta["error"] = error.model_dump()
        job.ended_at = now()
        job._status = JobStatus.FAILED
        if not run.reported:
            run.reported = True
            try:
                job.execute_failure_callback(w.death_penalty_class, *exc_info)
            except Exception:
                log.exception("failure callback of job %s raised", job.id)
            w.handle_exception(job, *exc_info)
        exc_string = "".join(traceback.format_exception(*exc_info))
        return self._final(run, lambda pipe: self._finish_failed(pipe, run, JobStatus.FAILED, exc_string),
                           Failed(run.id, error=error))

    def cancel(self, run: RunningJob) -> bool:
        """Canceled while running: status canceled, CanceledJobRegistry, no result; its ``canceled`` event and
        completed webhook. False: not ours."""
        job = run.job
        job.ended_at = now()

        def write(pipe: Pipeline) -> None:
            assert job.ended_at is not None
            job.cancel(pipeline=pipe)
            job._status = JobStatus.CANCELED  # RQ's cancel reads the stored status back into memory
            pipe.hset(job.key, "ended_at", utcformat(job.ended_at))  # RQ's cancel records no end
            run.execution.delete(job=job, pipeline=pipe)

        return self._final(run, write, Canceled(run.id, reason="canceled"))

    def stop(self, run: RunningJob) -> bool:
        """Stopped by RQ's stop-job command: status stopped, in the FailedJobRegistry, as RQ leaves such jobs; a
        ``canceled`` event (reason ``stopped``) and its completed webhook. False: not ours."""
        run.job.ended_at = now()
        return self._final(run, lambda pipe: self._finish_failed(pipe, run, JobStatus.STOPPED, "Job stopped by user."),
                           Canceled(run.id, reason="stopped"))

    def give_back(self, run: RunningJob) -> bool:
        """Back in its queue through RQ's ``Retry`` (one retry spent, status queued): the job could not be finished
        here for the infrastructure's reasons. Needs a retry left (``job.retries_left``). False: not ours."""
        job = run.job
        retries_left = job.retries_left

        def write(pipe: Pipeline) -> None:
            job.retries_left = retries_left  # an aborted attempt spent nothing: this one spends the same retry
            run.execution.delete(job=job, pipeline=pipe)
            job.retry(run.queue, pipe)
            pipe.hset(job.key, GIVEN_BACK_FIELD, run.given_back + 1)  # this run ended; its worker did not die

        try:
            return self._final(run, write, None)
        except BaseException:
            job.retries_left = retries_left  # nothing may have been written: the next attempt spends the same retry
            raise

    def _final(self, run: RunningJob, write: Callable[[Pipeline], None], event: JobEvent | None,
               return_value: dict[str, Any] | None = None) -> bool:
        """``write`` the job's final record and, with ``event``, its outbox (the event, the end of its cancel
        request, its completed webhook; ``worker.outbox``), in one transaction that holds only while the job is this
        run's: the job hash is WATCHed (the registry cleanup that hands the job to another worker writes it, as
        does every final record), then the run's registry entry, the job's status and its worker are checked. So a
        worker presumed dead records no outcome, and no stall between the check and the EXEC can make one land
        twice. False (nothing written): not ours. A connection lost during the EXEC raises ``ConnectionError``: the
        transaction may have landed (``landed`` tells)."""
        w, job = self.worker, run.job
        registry = run.queue.started_job_registry
        with self.connection.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(job.key)
                    # After the WATCH, so a handover from here to the EXEC aborts the transaction.
                    score = cast(float | None, pipe.zscore(registry.key, run.execution.composite_key))
                    status, worker_name = cast(list[bytes | None], pipe.hmget(job.key, ["status", "worker_name"]))
                    if score is None or status != b"started" or worker_name != w.name.encode():
                        pipe.unwatch()
                        return False
                    if score < time.time():
                        # Lapsed (Redis was away): a registry cleanup may be handing the job over right now. Renew
                        # it, and look again once such a cleanup has had a heartbeat to finish.
                        pipe.unwatch()
                        self.renew_lease(run)
                        time.sleep(self.wait_cap_s)
                        continue
                    pipe.multi()
                    write(pipe)
                    if event is not None:
                        self.outbox.write(pipe, job, event, return_value)
                    _execute(pipe)
                    return True
                except WatchError:
                    continue  # the job hash changed: look at the lease again

    # helpers -----------------------------------------------------------------------------------------------
    def _finish_failed(self, pipe: Pipeline, run: RunningJob, status: JobStatus, exc_string: str) -> None:
        w, job = self.worker, run.job
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

    @staticmethod
    def _save_meta(pipe: Any, job: Job) -> None:
        # What Job.save_meta does, inside our pipeline.
        pipe.hset(job.key, "meta", job.serializer.dumps(job.meta))


def _execute(pipe: Pipeline) -> None:
    """``pipe.execute()`` of a WATCHed transaction. redis-py reports a connection lost on the way as a WatchError,
    as if the transaction had been aborted; but the EXEC may have run, so it is raised as a connection error."""
    try:
        pipe.execute()
    except WatchError as exc:
        if isinstance(exc.__context__, ConnectionError | TimeoutError):
            raise ConnectionError(f"connection lost during a final record: {exc.__context__}") from exc.__context__
        raise
