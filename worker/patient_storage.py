"""Storage calls that wait out a storage outage for as long as the job may wait, and then give the job back.

A job's image writes (its results) and reads (its img2img / inpaint inputs) that fail for the infrastructure's
reasons (``outages.is_storage_outage``: a disk or network error, an S3 5xx or throttling answer) are retried with
capped backoff, while the heartbeat thread keeps renewing the job's lease. They are retried for at most the job's
own time budget, its RQ timeout (``SDQ_JOB_TIMEOUT_S`` when it was submitted), counted from the start of the
outage or of the job's batch, whichever is later; then ``StorageUnavailable`` is raised, and the worker puts the
job back in its queue through RQ's ``Retry`` (``rq_records.Bookkeeper.give_back``), as it would be after a dead
worker: one retry spent, no failure. Why this bound:

- Waiting costs only this worker's time, and while storage is down no other job could be finished either. So a
  short outage (an S3 blip, a remounted volume) costs neither a rerun nor a retry.
- The timeout is the operator's own statement of how long a job may take. An outage longer than that is no blip,
  and the job is better off back in its queue, where any worker runs it again once storage is back, than held in
  this worker's memory for an unbounded time.
- The outage's clock is shared by the worker's jobs, so the other jobs of a batch caught in the same outage go back
  at once instead of each waiting out a timeout of its own. Counting from the batch's start, too, makes a job that
  comes back while storage is still down wait a whole timeout again instead of spending its next retry at once: a
  job fails for an outage only after it outlasted every retry's timeout.

A job with no retry left fails with ``StorageUnavailable``. Errors that are not the infrastructure's (a missing
input, a wrong bucket or key) pass through at once and fail the job, as before.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from rq.job import Job
from rq.queue import Queue

from core.storage import Storage
from worker.outages import Backoff, Link, is_storage_outage

T = TypeVar("T")


class StorageUnavailable(Exception):
    """Storage failed for the infrastructure's reasons for longer than the job may wait."""


def patience_s(job: Job) -> float | None:
    """How long ``job`` may wait for storage: its RQ timeout; None (no limit) for a job without one."""
    timeout = job.timeout if job.timeout is not None else Queue.DEFAULT_TIMEOUT
    return None if timeout < 0 else float(timeout)


class PatientStorage(Storage):
    """``storage`` for one job: its ``put`` and ``get`` wait out outages for up to ``patience_s``, counted from the
    outage's start or ``since`` (the job's start, monotonic clock), whichever is later."""

    def __init__(self, storage: Storage, link: Link, *, patience_s: float | None, since: float, cap_s: float) -> None:
        self.storage = storage
        self.name = storage.name
        self.link = link
        self.patience_s = patience_s
        self.since = since
        self.cap_s = cap_s

    def put(self, key: str, data: bytes, content_type: str) -> None:
        self._patiently(lambda: self.storage.put(key, data, content_type), f"writing {key}")

    def get(self, key: str) -> bytes:
        return self._patiently(lambda: self.storage.get(key), f"reading {key}")

    def exists(self, key: str) -> bool:
        return self.storage.exists(key)

    def delete(self, key: str) -> None:
        self.storage.delete(key)

    def url(self, key: str) -> str:
        return self.storage.url(key)

    def _patiently(self, call: Callable[[], T], doing: str) -> T:
        backoff = Backoff(self.cap_s)
        while True:
            try:
                value = call()
            except Exception as exc:
                if not is_storage_outage(exc):
                    raise
                self.link.failed(exc, doing)
                down_since = self.link.down_since()
                waited = 0.0 if down_since is None else time.monotonic() - max(down_since, self.since)
                if self.patience_s is not None and waited >= self.patience_s:
                    raise StorageUnavailable(
                        f"storage unavailable for {waited:.0f} s while {doing} ({type(exc).__name__}: {exc})"
                    ) from exc
                backoff.wait()
                continue
            self.link.answered()
            return value
