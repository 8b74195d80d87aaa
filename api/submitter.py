"""Group commit for submissions: requests that arrive while one Redis transaction is in flight share the next.

Under light load every job gets its own transaction right away (no timer, no added latency); under heavy load the
batches grow by themselves, so Redis round trips per job fall as concurrency rises.
"""

from __future__ import annotations

import asyncio
import logging

from anyio import to_thread
from redis import Redis

from core import jobstore
from core.jobs import JobSpec
from core.settings import Settings

log = logging.getLogger(__name__)


class QueueFullError(Exception):
    """The queues already hold SDQ_MAX_QUEUED_JOBS jobs."""


class Submitter:
    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self._pending: list[tuple[JobSpec, asyncio.Future[int | None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def submit(self, spec: JobSpec) -> int:
        """Enqueue `spec`; returns its queue position. Raises QueueFullError, or what Redis raised."""
        future: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self._pending.append((spec, future))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())
        position = await future
        if position is None:
            raise QueueFullError
        return position

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                specs = [spec for spec, _ in batch]
                try:
                    # redis-py and RQ are synchronous: the transaction runs in a thread while the event loop keeps
                    # accepting requests, which form the next batch.
                    positions = await to_thread.run_sync(self._enqueue, specs)
                except Exception as exc:
                    log.warning("enqueueing %d jobs failed: %s", len(batch), exc)
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), position in zip(batch, positions, strict=True):
                    if not future.done():  # the client may have gone; its job is queued all the same
                        future.set_result(position)
        finally:
            self._flusher = None

    def _enqueue(self, specs: list[JobSpec]) -> list[int | None]:
        return jobstore.enqueue_many(self.redis, self.settings, specs, limit=self.settings.max_queued_jobs)
