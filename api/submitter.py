"""Group commit for submissions: requests that arrive while one Redis transaction is in flight share the next.

Under light load every job gets its own transaction right away (no timer, no added latency); under heavy load the
batches grow by themselves, so Redis round trips per job fall as concurrency rises. A batch whose outcome is not
known (`core.commit.CommitUnknown`, `core.commit.NotOnDisk`) fails only its own jobs with it; the jobs the queue
limit refused in the same batch get `QueueFullError` as usual.
"""

from __future__ import annotations

import asyncio
import logging

from anyio import to_thread
from redis import Redis

from api.durability import Durability
from core import commit, jobstore
from core.commit import KeyRecord
from core.jobs import JobSpec
from core.queues import Keys
from core.settings import Settings

log = logging.getLogger(__name__)


class QueueFullError(Exception):
    """The queues already hold SDQ_MAX_QUEUED_JOBS jobs."""


class Submitter:
    def __init__(self, redis: Redis, settings: Settings, durability: Durability) -> None:
        self.redis = redis
        self.settings = settings
        self.durability = durability
        self._pending: list[tuple[JobSpec, KeyRecord | None, asyncio.Future[int | None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def submit(self, spec: JobSpec, record: KeyRecord | None = None) -> int:
        """Enqueue `spec` (and make its Idempotency-Key `record` final with it); returns its queue position.
        Raises QueueFullError, `commit.CommitUnknown`, `commit.NotOnDisk`, or what Redis raised."""
        future: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self._pending.append((spec, record, future))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())
        position = await future
        if position is None:
            raise QueueFullError
        return position

    async def confirm_on_disk(self, job_id: str) -> None:
        """With SDQ_DURABLE_SUBMIT: return once what Redis holds now (`job_id` included) is on disk."""
        if self.durability.enabled:
            await to_thread.run_sync(self._confirm_on_disk, job_id)

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                specs = [spec for spec, _, _ in batch]
                records = {spec.id: record for spec, record, _ in batch if record is not None}
                try:
                    # redis-py and RQ are synchronous: the transaction runs in a thread while the event loop keeps
                    # accepting requests, which form the next batch.
                    positions = await to_thread.run_sync(self._enqueue, specs, records)
                except (commit.CommitUnknown, commit.NotOnDisk) as exc:
                    log.error("enqueueing %d jobs: %s", len(exc.job_ids), exc)
                    for spec, _, future in batch:
                        if not future.done():
                            if spec.id in exc.job_ids:
                                future.set_exception(exc)
                            else:
                                future.set_result(None)  # refused by the queue limit, never sent
                    continue
                except Exception as exc:
                    log.warning("enqueueing %d jobs failed: %s", len(batch), exc)
                    for _, _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, _, future), position in zip(batch, positions, strict=True):
                    if not future.done():  # the client may have gone; its job is queued all the same
                        future.set_result(position)
        finally:
            self._flusher = None

    def _enqueue(self, specs: list[JobSpec], records: dict[str, KeyRecord]) -> list[int | None]:
        self.durability.ensure(self.redis)
        return jobstore.enqueue_many(
            self.redis, self.settings, specs, limit=self.settings.max_queued_jobs, records=records,
            wait_on_disk_ms=self.durability.wait_ms,
        )

    def _confirm_on_disk(self, job_id: str) -> None:
        self.durability.ensure(self.redis)
        if self.durability.wait_ms is not None:
            commit.confirm_on_disk(self.redis, Keys(self.settings.queue_prefix), [job_id], self.durability.wait_ms)
