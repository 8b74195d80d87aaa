"""Waiting out Redis outages, for every process that talks to Redis (the workers, the webhook sender): capped
backoff, the state of a process's link to a service, and calls that wait until Redis answers.

- Every ``redis.exceptions.RedisError`` is the infrastructure's: Redis down, unreachable, paused, loading its data,
  or full (``OOM command not allowed`` under ``maxmemory`` + ``noeviction``). A process never exits for one. A write
  that must happen waits for Redis (``until_answered``); a write that may be skipped (a progress update) is skipped.
- Waits back off exponentially from 0.1 s to a cap (a worker's heartbeat), so a process is back to work within about
  a cap of the service returning.
- ``Link`` records when contact with a service was lost and regained, logs each change once (and a reminder every
  30 s while an outage lasts), and tells how long contact has been steady. Registry cleanups wait for steady contact:
  right after an outage every lease looks expired, and the processes that are alive need a moment to renew theirs
  or to record what they did meanwhile.

No torch, no worker imports: ``sdqueue webhooks`` runs this from the API image.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import redis.exceptions
from redis import ConnectionPool, Redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

T = TypeVar("T")

FIRST_WAIT_S = 0.1
REMIND_EVERY_S = 30.0
# What redis-py's ConnectionPool adds to its connections' settings for itself; a new pool makes its own.
POOL_OWN_KWARGS = frozenset({
    "himport_registry", "maint_notifications_config", "maint_notifications_pool_handler", "orig_socket_connect_timeout",
    "orig_socket_timeout",
})


def describe(exc: BaseException) -> str:
    """One short line for the log: without the command redis-py quotes for a pipeline (job payloads, pickles)."""
    text = str(exc).split(" of pipeline caused error: ", 1)[-1]
    return f"{type(exc).__name__}: {text[:200]}"


class GaveUp(Exception):
    """Waiting for a service was abandoned, because the caller asked to stop."""


class Backoff:
    """Waits that double from ``first_s`` up to ``cap_s``, each shortened by up to a quarter at random, so that the
    processes of a deployment do not all call back at the same instant."""

    def __init__(self, cap_s: float, first_s: float = FIRST_WAIT_S) -> None:
        self.cap_s = cap_s
        self._next = min(first_s, cap_s)

    def wait(self) -> None:
        time.sleep(self._next * random.uniform(0.75, 1.0))
        self._next = min(self._next * 2, self.cap_s)


class Link:
    """This process's contact with one service (``name``: "Redis", "storage"), shared by its threads."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._reminded_at = 0.0
        # A process that just started has not seen a lease of steady contact either.
        self._unsettled_at = time.monotonic()

    def failed(self, exc: BaseException, doing: str) -> None:
        """A call failed for the infrastructure's reasons."""
        clock = time.monotonic()
        with self._lock:
            self._unsettled_at = clock
            if self._down_since is None:
                self._down_since = self._reminded_at = clock
                log.warning("%s unavailable while %s (%s): waiting for it", self.name, doing, describe(exc))
            elif clock - self._reminded_at >= REMIND_EVERY_S:
                self._reminded_at = clock
                log.warning("%s still unavailable after %.0f s (%s: %s)", self.name, clock - self._down_since,
                            doing, describe(exc))

    def answered(self) -> None:
        """A call succeeded."""
        clock = time.monotonic()
        with self._lock:
            if self._down_since is None:
                return
            log.info("%s answers again after %.1f s", self.name, clock - self._down_since)
            self._down_since = None
            self._unsettled_at = clock

    def stalled(self, seconds: float, doing: str) -> None:
        """A call succeeded, but only after ``seconds``: a paused or swamped server, unsettled like an outage."""
        with self._lock:
            self._unsettled_at = time.monotonic()
            self._down_since = None
        log.warning("%s took %.1f s to answer while %s", self.name, seconds, doing)

    def down_since(self) -> float | None:
        """When contact was lost (monotonic clock); None while the service answers."""
        with self._lock:
            return self._down_since

    def steady_for(self) -> float:
        """Seconds of steady contact: since the last failure, stall or recovery (or the process's start)."""
        with self._lock:
            return 0.0 if self._down_since is not None else time.monotonic() - self._unsettled_at


def until_answered(call: Callable[[], T], doing: str, link: Link, *, cap_s: float,
                   give_up: Callable[[], bool] | None = None) -> T:
    """``call()``, again and again while it raises a Redis error, with capped backoff; raises ``GaveUp`` when
    ``give_up()`` turns true while it waits."""
    backoff = Backoff(cap_s)
    while True:
        try:
            value = call()
        except redis.exceptions.RedisError as exc:
            link.failed(exc, doing)
            if give_up is not None and give_up():
                raise GaveUp(doing) from exc
            backoff.wait()
            continue
        link.answered()
        return value


def tolerate(call: Callable[[], object], doing: str, link: Link) -> None:
    """Bookkeeping that may be skipped while Redis is away (done next time): ``call()``, a Redis error only noted."""
    try:
        call()
    except redis.exceptions.RedisError as exc:
        link.failed(exc, doing)
        return
    link.answered()


def quick_client(connection: Redis, timeout_s: float) -> Redis:
    """A client of ``connection``'s server whose calls fail after ``timeout_s`` and are never retried, for work that
    must not wait on Redis (the per-step callback: a skipped progress write is better than a stalled GPU)."""
    pool = connection.connection_pool
    kwargs = {
        **{k: v for k, v in pool.connection_kwargs.items() if k not in POOL_OWN_KWARGS},
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "retry": Retry(NoBackoff(), 0),
    }
    return Redis(connection_pool=ConnectionPool(connection_class=pool.connection_class, **kwargs))
