"""Finalize one job of a batch: write its images, record its outcome in RQ, announce it, whatever Redis and storage do.

Stages, each done once:

1. Its images (``tasks.build_result``), through ``PatientStorage`` while the heartbeat keeps the job's lease: a
   storage outage is waited out for up to the job's timeout, then the job is given back to its queue (RQ ``Retry``,
   see ``worker.patient_storage``). Only the job's own errors (its images cannot be encoded, a 4xx from S3) fail it.
2. Its record: success, failure, cancel, stop, or give-back (``rq_records.Bookkeeper``), each one transaction
   that holds only while the job is still this run's (its lease checked after a WATCH), and that carries the job's
   terminal event and completed webhook (``worker.outbox``): they land together or not at all. A job that is no
   longer ours was recovered by another worker, or canceled: it is dropped here, as before.

Redis errors in 2 are waited out with capped backoff (``outages.Backoff``, up to a heartbeat), for as long as
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
from worker.heartbeat import Heartbeat
from worker.metrics import WorkerMetrics
from worker.outages import Backoff, Link
from worker.patient_storage import PatientStorage, StorageUnavailable, patience_s
from worker.rq_records import Bookkeeper, RunningJob
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
        """Write the outcome with its event and webhook (one transaction), once, waiting for Redis; returns the
        metrics label."""
        label, write = self._plan(run, outcome, result)
        backoff = Backoff(self.wait_cap_s)
        in_doubt = False  # a write broke off: it may have landed
        while True:
            try:
                # a write in doubt may have landed (a give-back's then sits in its queue: nothing to check)
                if not write() and not (in_doubt and (label == "given_back" or self.books.landed(run))):
                    self._lost(run, "it was recovered by another worker meanwhile")
                    return "lost"
                self.books.redis.answered()
                return label
            except redis.exceptions.RedisError as exc:
                broken = isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError)
                in_doubt = in_doubt or broken
                self.books.redis.failed(exc, f"finalizing job {run.id} ({label})")
                backoff.wait()

    def _plan(self, run: RunningJob, outcome: Outcome, result: dict[str, Any]) -> tuple[str, Callable[[], bool]]:
        """The metrics label and the record's write (False: the job is no longer ours, nothing written) of
        ``outcome``."""
        books = self.books
        if isinstance(outcome, Done):
            return "succeeded", lambda: books.succeed(run, result)
        if isinstance(outcome, GiveBack):
            if run.job.retries_left:
                log.warning("job %s goes back to its queue (%s); %d retries left after this one", run.id,
                            outcome.exc_info[1], run.job.retries_left - 1)
                return "given_back", lambda: books.give_back(run)
            outcome = Error(outcome.exc_info)  # no retry left: it fails with the infrastructure's error
        if isinstance(outcome, Error):
            exc_info = outcome.exc_info
            return "failed", lambda: books.fail(run, exc_info)
        if outcome.reason == "stopped":
            return "stopped", lambda: books.stop(run)
        return "canceled", lambda: books.cancel(run)

    @staticmethod
    def _lost(run: RunningJob, why: str) -> None:
        log.warning("job %s is no longer registered to this worker: %s", run.id, why)
