"""Finalize one job of a batch: write its images, record its outcome in RQ, announce it, whatever Redis and storage do.

Stages, each done once:

1. Its images (``tasks.build_result``), through ``PatientStorage`` while the heartbeat keeps the job's lease: a
   storage outage is waited out for up to the job's timeout, then the job is given back to its queue (RQ ``Retry``,
   see ``worker.patient_storage``). Only the job's own errors (its images cannot be encoded, a 4xx from S3) fail it.
2. Its record: success, failure, cancel, stop, or give-back (``rq_records.Bookkeeper``), right after a lease
   renewal (``ZADD XX``); a success in one transaction with its lease check. A job whose lease is gone was
   recovered by another worker, or canceled: it is dropped here, as before.
3. Its terminal event; 4. its completed webhook.

Redis errors in 2 to 4 are waited out with capped backoff (``outages.Backoff``, up to a heartbeat), for as long as
Redis is away, with the outcome and the image records kept in memory: a finished job loses nothing to an outage of
any length, and spends no retry. When the connection broke while the record was written, the next attempt first
checks whether it landed (``Bookkeeper.landed``), so that it is neither written twice nor taken for lost.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import redis.exceptions

from core.imagefile import ModelInfo
from core.jobs import JobSpec
from core.storage import Storage
from worker.events import Canceled, Failed, JobEvent, Succeeded
from worker.heartbeat import Heartbeat
from worker.metrics import WorkerMetrics
from worker.outages import Backoff, Link
from worker.patient_storage import PatientStorage, StorageUnavailable, patience_s
from worker.rq_records import Bookkeeper, RunningJob, job_error
from worker.runner import Done, Error, GiveBack, Outcome, current_exc_info
from worker.tasks import build_result

log = logging.getLogger(__name__)


class Finalizer:
    def __init__(self, books: Bookkeeper, storage: Storage, model: ModelInfo, metrics: WorkerMetrics,
                 *, wait_cap_s: float) -> None:
        self.books = books
        self.storage = storage
        self.storage_link = Link("storage")
        self.model = model
        self.metrics = metrics
        self.wait_cap_s = wait_cap_s

    def storage_for(self, run: RunningJob) -> Storage:
        """The storage as ``run`` uses it: outages waited out for as long as the job may wait."""
        return PatientStorage(self.storage, self.storage_link, patience_s=patience_s(run.job), since=run.started,
                              cap_s=self.wait_cap_s)

    def finalize(self, heartbeat: Heartbeat, run: RunningJob, spec: JobSpec | None, outcome: Outcome) -> None:
        """Finalize one job, unless it stopped being ours (recovered elsewhere after a missed lease, or canceled)."""
        if self._known_lost(run):
            heartbeat.untrack(run)
            self._lost(run, "its outcome here is dropped")
            self.metrics.jobs.labels("lost").inc()
            return
        result: dict[str, Any] = {}
        if isinstance(outcome, Done):
            assert spec is not None
            try:
                result = build_result(self.storage_for(run), spec, outcome.result, self.model,
                                      time.monotonic() - run.started, outcome.pipeline_seconds)
            except StorageUnavailable:
                outcome = GiveBack(current_exc_info())
            except Exception:
                outcome = Error(current_exc_info())  # the job's own: e.g. its images cannot be encoded
        heartbeat.untrack(run)
        label = self._record(run, outcome, result)
        self.metrics.jobs.labels(label).inc()
        if label not in ("lost", "given_back"):
            self.metrics.job_run_seconds.observe(time.monotonic() - run.started)

    def _known_lost(self, run: RunningJob) -> bool:
        """Whether Redis says the job is no longer ours; while Redis is away, the images are written all the same
        (same keys on any rerun) and the lease is checked again before the record."""
        try:
            return not self.books.renew_lease(run)
        except redis.exceptions.RedisError as exc:
            self.books.redis.failed(exc, f"renewing the lease of job {run.id}")
            return False

    def _record(self, run: RunningJob, outcome: Outcome, result: dict[str, Any]) -> str:
        """Write the outcome, its event and its webhook, each once, waiting for Redis; returns the metrics label."""
        label, write, event = self._plan(run, outcome, result)
        backoff = Backoff(self.wait_cap_s)
        recorded = announced = False
        in_doubt = False  # a write of the record broke off: it may have landed
        while True:
            try:
                if not recorded:
                    # a write in doubt may have landed (a give-back's then sits in its queue: nothing to check)
                    if not write() and not (in_doubt and (event is None or self.books.landed(run))):
                        self._lost(run, "it was recovered by another worker meanwhile")
                        return "lost"
                    recorded = True
                if event is not None and not announced:
                    self.books.announce(run, event)
                    announced = True
                if event is not None:
                    self.books.completed_webhook(run)
                self.books.redis.answered()
                return label
            except redis.exceptions.RedisError as exc:
                broken = isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError)
                in_doubt = in_doubt or (broken and not recorded)
                self.books.redis.failed(exc, f"finalizing job {run.id} ({label})")
                backoff.wait()

    def _plan(self, run: RunningJob, outcome: Outcome,
              result: dict[str, Any]) -> tuple[str, Callable[[], bool], JobEvent | None]:
        """The metrics label, the record's write (False: the job is no longer ours, nothing written) and the
        terminal event (none for a job given back) of ``outcome``."""
        books = self.books

        def renewed(write: Callable[[], None]) -> Callable[[], bool]:
            def go() -> bool:
                if not books.renew_lease(run):
                    return False
                write()
                return True
            return go

        if isinstance(outcome, Done):
            return "succeeded", lambda: books.succeed(run, result), Succeeded(run.id, result=result)
        if isinstance(outcome, GiveBack):
            if run.job.retries_left:
                log.warning("job %s goes back to its queue (%s); %d retries left after this one", run.id,
                            outcome.exc_info[1], run.job.retries_left - 1)
                return "given_back", renewed(lambda: books.give_back(run)), None
            outcome = Error(outcome.exc_info)  # no retry left: it fails with the infrastructure's error
        if isinstance(outcome, Error):
            exc_info = outcome.exc_info
            return "failed", renewed(lambda: books.fail(run, exc_info)), Failed(run.id, error=job_error(exc_info[1]))
        if outcome.reason == "stopped":
            return "stopped", renewed(lambda: books.stop(run)), Canceled(run.id, reason="stopped")
        return "canceled", renewed(lambda: books.cancel(run)), Canceled(run.id, reason="canceled")

    @staticmethod
    def _lost(run: RunningJob, why: str) -> None:
        log.warning("job %s is no longer registered to this worker: %s", run.id, why)
