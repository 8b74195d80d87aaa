"""A thread that heartbeats the jobs of the running batch (torch releases the GIL while the batch runs)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

from worker.rq_adapter import Bookkeeper, RunningJob

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
        while not self._stop.wait(self.interval_s):
            with self._lock:
                try:
                    self.books.heartbeat(list(self._runs.values()))
                except Exception:
                    # A missed beat is survivable (the lease is three beats); the next one retries.
                    log.exception("heartbeat failed")
