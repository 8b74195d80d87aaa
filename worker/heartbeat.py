"""A thread that heartbeats the jobs of the running batch (torch releases the GIL while the batch runs).

It survives anything: a beat that fails (Redis down, paused or full) is reported to the worker's Redis link and
the next beat tries again. The lease is three beats, so one missed beat costs nothing; an outage longer than a
lease is covered by the registry cleanup's wait for steady contact (``rq_adapter.RQWorker.clean_registries``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable

import redis.exceptions

from worker.rq_records import Bookkeeper, RunningJob

log = logging.getLogger(__name__)


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
        link = self.books.redis
        while not self._stop.wait(self.interval_s):
            with self._lock:
                started = time.monotonic()
                try:
                    self.books.heartbeat(list(self._runs.values()))
                except redis.exceptions.RedisError as exc:
                    link.failed(exc, "renewing the leases of the running batch")
                    continue
                except Exception:
                    log.exception("heartbeat failed")  # not Redis: a bug, but the next beat may still get through
                    continue
            took = time.monotonic() - started
            if took > self.interval_s:
                link.stalled(took, "renewing the leases of the running batch")
            else:
                link.answered()
