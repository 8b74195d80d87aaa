"""``PatientWorker``: RQ's in-process worker (``rq.SimpleWorker``) whose Redis-facing hooks ride out outages; the one
base of the batch worker (``worker.rq_adapter.RQWorker``) and the webhook sender (``sdqueue.webhooks``).

RQ's ``work()`` ends on any Redis error its steps raise (it waits out only a refused connection). Here every step
that talks to Redis is a hook that either waits until Redis answers (naming the connection, subscribing to worker
commands, giving a popped job back) or, for bookkeeping that can be skipped (the worker's state, a heartbeat, RQ's
registry cleanup, the suspension check), notes the failure and does it next time (``core.outages``). A
registration that expired while Redis was away is written again at the next heartbeat (``rejoin``). The idle loop
(``dequeue_job_and_maintain_ttl``) and the registration at start stay each subclass's own: they differ in what
they wait for and what they give up.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import redis.exceptions
from redis import Redis
from rq import worker_registration
from rq.job import Job
from rq.queue import Queue
from rq.utils import now
from rq.worker import SimpleWorker

from core.outages import GaveUp, Link, tolerate, until_answered

log = logging.getLogger(__name__)

T = TypeVar("T")


class PatientWorker(SimpleWorker):
    """An in-process RQ worker that never leaves its loop for a Redis outage; ``role`` names it in the logs."""

    role = "worker"

    def __init__(self, queues: Sequence[str], *, connection: Redis, heartbeat_s: int, **kwargs: Any) -> None:
        # Set before RQ's __init__, which sizes the connection's socket timeout from dequeue_timeout and talks to
        # Redis already (_set_ip_address).
        self.heartbeat_s = heartbeat_s
        self.redis_link = Link("Redis")
        super().__init__(list(queues), connection=connection, maintenance_interval=heartbeat_s,
                         log_job_description=False,  # a job's description holds its prompt or its URL
                         **kwargs)

    @property
    def registration_ttl(self) -> int:
        """How long the worker's key outlives its last heartbeat (RQ's: ``worker_ttl`` + 60 s)."""
        return self.worker_ttl + 60

    @property
    def dequeue_timeout(self) -> int:
        # The idle wait is cut into heartbeat-long slices, so maintenance runs that often.
        return self.heartbeat_s

    def on_birth(self) -> None:
        """Called right after the worker registered, and after each re-registration."""

    def wait_for_redis(self, call: Callable[[], T], doing: str, give_up: Callable[[], bool] | None = None) -> T:
        return until_answered(call, doing, self.redis_link, cap_s=self.heartbeat_s, give_up=give_up)

    def _tolerate(self, call: Callable[[], object], doing: str) -> None:
        """Bookkeeping that may be skipped while Redis is away: done next time."""
        tolerate(call, doing, self.redis_link)

    # registration and heartbeat ------------------------------------------------------------------------------
    def _set_ip_address(self, connection: Redis) -> None:
        set_ip_address = super()._set_ip_address
        self.wait_for_redis(lambda: set_ip_address(connection), f"naming the {self.role}'s connection")

    def _register(self) -> None:
        """RQ's register_birth without its check for a live namesake: the name is this process's own, and a try
        whose answer was lost may have registered it already."""
        self.birth_date = self.birth_date or now()
        self.last_heartbeat = now()
        with self.connection.pipeline() as pipe:
            pipe.hset(self.key, mapping=self.serialize())
            pipe.hset(self.key, "state", self._state)
            worker_registration.register(self, pipe)
            pipe.expire(self.key, self.registration_ttl)
            pipe.execute()

    def rejoin(self) -> None:
        """Register again: the worker's key expired while Redis could not be reached (or lost it in a restart)."""
        log.warning("%s %s: its registration lapsed while Redis was away: registering again", self.role, self.name)
        self._register()
        self.on_birth()

    def register_death(self) -> None:
        # Once: a worker that exits while Redis is away leaves a registration that expires on its own.
        self._tolerate(super().register_death, f"recording the {self.role}'s exit")

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        if pipeline is not None:
            super().heartbeat(timeout or self.registration_ttl, pipeline=pipeline)
            return
        self._tolerate(self.beat, f"sending the {self.role}'s heartbeat")

    def beat(self) -> None:
        """Extend the worker's registration, and register again if it lapsed; raises Redis errors."""
        with self.connection.pipeline() as pipe:
            super().heartbeat(self.registration_ttl, pipeline=pipe)
            created = pipe.execute()[0]  # HSET last_heartbeat: 1 = a new field, so the key had expired
        if created:
            self.rejoin()

    def set_state(self, state: str, pipeline: Any = None) -> None:
        if pipeline is not None:
            super().set_state(state, pipeline)
            return
        set_state = super().set_state
        self._tolerate(lambda: set_state(state), f"recording the {self.role}'s state")

    # worker commands -----------------------------------------------------------------------------------------
    def subscribe(self) -> None:
        with contextlib.suppress(GaveUp):  # a shutdown while Redis is away: nothing to listen for
            self.wait_for_redis(super().subscribe, "subscribing to worker commands",
                                give_up=lambda: self._stop_requested)

    def unsubscribe(self) -> None:
        self._tolerate(super().unsubscribe, "unsubscribing from worker commands")

    def _pubsub_exception_handler(self, exc: Exception, pubsub: Any, pubsub_thread: Any) -> None:
        # RQ's handler ends the command thread on any error but a ConnectionError; keep it through any outage.
        if not isinstance(exc, redis.exceptions.RedisError):
            super()._pubsub_exception_handler(exc, pubsub, pubsub_thread)
            return
        self.redis_link.failed(exc, "listening for worker commands")
        time.sleep(self.heartbeat_s)

    # maintenance and the idle loop's pieces ------------------------------------------------------------------
    def check_for_suspension(self, burst: bool) -> None:
        check = super().check_for_suspension
        self._tolerate(lambda: check(burst), "checking whether workers are suspended")

    def run_maintenance_tasks(self) -> None:
        self._tolerate(super().run_maintenance_tasks, "cleaning RQ's registries")

    def _push_back(self, job: Job, queue: Queue) -> None:
        """Give a popped job back, first in line (a shutdown arrived while it was being popped)."""
        with self.connection.pipeline() as pipe:
            queue.push_job_id(job.id, pipeline=pipe, at_front=True)
            pipe.lrem(queue.intermediate_queue_key, 1, job.id)  # where RQ's single-queue dequeue puts it
            pipe.execute()
