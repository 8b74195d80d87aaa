"""Collect one batch: the head job RQ dequeued, then compatible waiting jobs, claimed one by one from the queues.

Queue layout: one RQ queue per model and priority (``sdq-model-<model>-high`` ...), beside one per priority for jobs
that name no model (``sdq-high``, ``sdq-normal``, ``sdq-low``; ``core.queues.Keys.worker_queues``), not one per
compatibility key. A worker listens on its model's queues and the shared ones only. The worker groups jobs itself:

1. RQ's normal dequeue (``Queue.dequeue_any``, highest priority first) gives the *head* job. It always runs in the
   next batch, so the oldest job of the highest non-empty priority is never passed over: an incompatible job waits at
   most one batch before it is the head itself.
2. For up to ``SDQ_BATCH_WINDOW_MS`` the batcher scans the first ``scan_depth`` ids of each queue (LRANGE, priority
   order) for jobs with the head's ``JobSpec.batch_key()`` and claims them until the batch holds
   ``SDQ_MAX_BATCH_IMAGES`` images. Incompatible jobs keep their places.

Why not one queue per key: keys are open-ended (every size x sampler x steps), so workers would have to discover and
poll a changing set of queues, FIFO order across keys would be lost, and queue position (``core.queue_position``)
would need a scan of all of them. With grouping in the worker, position is one LPOS plus the lengths of the
higher-priority queues, and a stock RQ worker can still drain the queues one job at a time.

Claims are atomic (Lua): a job is removed from its queue only if it is still there (LREM returns 1, so two workers
never both take it) and its status is still ``queued`` (canceled jobs and stale duplicate ids are never run). The
head job, already popped by RQ, gets the same status check. A claimed id stays on RQ's intermediate list for its
queue until the job is registered as started (after the collection window), with the claiming worker's name in the
job hash, so a worker that dies in between is recovered by ``worker.sweeper`` one lease after its last heartbeat.

A job that came back from a run whose worker died (``core.attempts``: more runs started than given back) is never
claimed into another job's batch, and when it is the head nothing joins it: a job that kills its worker then dies
alone, and its former batch mates, each run alone once, succeed.

Redis failing while the batch is collected ends the collection, not the batch: the jobs claimed so far run (their
records are read once Redis answers), the others wait for a later batch.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis.exceptions
from redis import Redis
from rq.job import Job
from rq.queue import Queue

from core.attempts import ATTEMPTS_FIELD, CLAIMED_BY_FIELD, GIVEN_BACK_FIELD
from core.jobs import JobSpec
from core.queues import JOB_FUNC
from worker.outages import Link, until_answered

log = logging.getLogger(__name__)

# KEYS: queue list, its intermediate list, job hash. ARGV: job id, the attempts and given-back fields, the claimed-by
# field and the claiming worker's name (``worker.sweeper``).
# Returns {outcome, attempts, given back}; outcome 1 = claimed, 0 = no longer in the queue (another worker took it),
# -1 = removed but not runnable, -2 = left in place: it came back from a run whose worker died, so it runs alone.
CLAIM_WAITING = """
local counts = redis.call('HMGET', KEYS[3], ARGV[2], ARGV[3])
local attempts, given_back = tonumber(counts[1]) or 0, tonumber(counts[2]) or 0
if attempts > given_back then return {-2, attempts, given_back} end
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return {0, attempts, given_back} end
if redis.call('HGET', KEYS[3], 'status') ~= 'queued' then return {-1, attempts, given_back} end
redis.call('HSET', KEYS[3], 'status', 'started', ARGV[4], ARGV[5])
redis.call('RPUSH', KEYS[2], ARGV[1])
return {1, attempts, given_back}
"""

# The head job was already popped by RQ's dequeue; take it only if nobody canceled or started it meanwhile.
# KEYS: job hash, the intermediate list of its queue. ARGV: as CLAIM_WAITING's. (With a single queue RQ's dequeue
# already moved the id to the intermediate list: keep one entry.)
# Returns {outcome, attempts, given back}; outcome 1 = claimed, 0 = not runnable.
CLAIM_POPPED = """
local counts = redis.call('HMGET', KEYS[1], ARGV[2], ARGV[3])
local attempts, given_back = tonumber(counts[1]) or 0, tonumber(counts[2]) or 0
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then return {0, attempts, given_back} end
redis.call('HSET', KEYS[1], 'status', 'started', ARGV[4], ARGV[5])
redis.call('LREM', KEYS[2], 0, ARGV[1])
redis.call('RPUSH', KEYS[2], ARGV[1])
return {1, attempts, given_back}
"""

POLL_S = 0.005  # how often the queues are re-scanned while the collection window is open
CACHE_LIMIT = 4096


@dataclass
class Claim:
    """A job this worker has taken from a queue; it must now be started and finalized."""

    job: Job
    queue: Queue
    attempts: int = 0  # runs started before this one (``core.attempts``)
    given_back: int = 0  # of which ended with the job given back to its queue, not with its worker gone

    @property
    def alone(self) -> bool:
        """Whether the job came back from a run whose worker died: it runs in a batch of its own."""
        return self.attempts > self.given_back


def job_spec(job: Job) -> JobSpec:
    """The JobSpec stored in the job's kwargs; raises (ValueError, pydantic ValidationError) when it has none."""
    if job.func_name != JOB_FUNC:
        raise ValueError(f"job {job.id} runs {job.func_name!r}, not {JOB_FUNC!r}")
    spec = job.kwargs.get("spec")
    if not isinstance(spec, dict):
        raise ValueError(f"job {job.id} has no 'spec' keyword argument (got {type(spec).__name__})")
    return JobSpec.model_validate(spec)


class Batcher:
    def __init__(
        self,
        connection: Redis,
        queues: list[Queue],
        *,
        max_images: int,
        window_s: float,
        scan_depth: int | None = None,
        redis: Link | None = None,
        wait_cap_s: float = 1.0,
        claimer: str = "",
    ) -> None:
        self.connection = connection
        self.queues = queues
        self.max_images = max_images
        self.window_s = window_s
        self.scan_depth = scan_depth or max(32, 4 * max_images)
        self.redis = redis or Link("Redis")
        self.wait_cap_s = wait_cap_s
        self.claimer = claimer  # the worker's name, recorded with each claim for the sweeper
        self._claim_waiting = connection.register_script(CLAIM_WAITING)
        self._claim_popped = connection.register_script(CLAIM_POPPED)
        # job id -> (batch key, images); key None = cannot batch (not ours or no valid spec). Ids are never reused.
        self._seen: dict[str, tuple[str | None, int]] = {}

    def take_head(self, job: Job, queue: Queue) -> Claim | None:
        """Claim the job RQ's dequeue popped (waiting for Redis); None when it was canceled or is already started
        elsewhere."""
        outcome, attempts, given_back = until_answered(
            lambda: self._claim_popped(keys=[job.key, queue.intermediate_queue_key],
                                       args=[job.id, *self._claim_args()]),
            f"claiming job {job.id}", self.redis, cap_s=self.wait_cap_s)
        return Claim(job, queue, attempts, given_back) if outcome == 1 else None

    def _claim_args(self) -> list[str]:
        return [ATTEMPTS_FIELD, GIVEN_BACK_FIELD, CLAIMED_BY_FIELD, self.claimer]

    def collect(self, head: Claim, should_stop: Callable[[], bool],
                keep_alive: Callable[[], None] = lambda: None) -> list[Claim]:
        """The head (already claimed) plus compatible waiting jobs, claimed within the collection window;
        ``keep_alive`` is called between scans (the worker's heartbeat: a window may outlast a lease)."""
        if head.alone:
            log.info("job %s runs alone: its worker died during %d of its %d runs so far", head.job.id,
                     head.attempts - head.given_back, head.attempts)
            return [head]
        try:
            spec = job_spec(head.job)
        except Exception:
            return [head]  # it fails alone, with its own error, when the worker parses it
        batch = [head]
        images, key = spec.params.n, spec.batch_key()
        deadline = time.monotonic() + self.window_s
        while images < self.max_images and not should_stop():
            claims, complete = self._scan(key, self.max_images - images)
            for claim, n in claims:
                batch.append(claim)
                images += n
            remaining = deadline - time.monotonic()
            if images >= self.max_images or remaining <= 0 or not complete:
                break
            keep_alive()
            time.sleep(min(POLL_S, remaining))
        if len(batch) > 1:
            log.debug("batch of %d jobs, %d images, key %s", len(batch), images, key)
        return batch

    def _scan(self, key: str, room: int) -> tuple[list[tuple[Claim, int]], bool]:
        """One pass over the queues' first ``scan_depth`` ids; claims compatible jobs that fit in ``room`` images.
        Also returns False when Redis failed during the pass (the collection ends with what was claimed)."""
        claimed: list[tuple[Queue, str, int, int]] = []
        try:
            with self.connection.pipeline(transaction=False) as pipe:
                for queue in self.queues:
                    pipe.lrange(queue.key, 0, self.scan_depth - 1)
                windows = [[i.decode() for i in ids] for ids in pipe.execute()]
            self._learn([job_id for ids in windows for job_id in ids if job_id not in self._seen])
            self._claim(key, room, windows, claimed)
            complete = True
        except redis.exceptions.RedisError as exc:
            self.redis.failed(exc, "collecting a batch")
            complete = False
        if not claimed:
            return [], complete
        ids = [job_id for _, job_id, _, _ in claimed]
        jobs = until_answered(lambda: Job.fetch_many(ids, connection=self.connection), "reading claimed jobs",
                              self.redis, cap_s=self.wait_cap_s)
        out = []
        for (queue, job_id, n, attempts), job in zip(claimed, jobs, strict=True):
            if job is None:  # deleted between claim and fetch: nothing left to run or report
                with contextlib.suppress(redis.exceptions.RedisError):  # else RQ's intermediate cleanup drops it
                    self.connection.lrem(queue.intermediate_queue_key, 1, job_id)
                continue
            out.append((Claim(job, queue, attempts, attempts), n))
        return out, complete

    def _claim(self, key: str, room: int, windows: list[list[str]],
               claimed: list[tuple[Queue, str, int, int]]) -> None:
        """Claim the compatible jobs of ``windows`` that fit in ``room`` images, appending each (with its attempts)
        to ``claimed`` as soon as it is claimed (so that none is lost when Redis fails half way)."""
        for queue, ids in zip(self.queues, windows, strict=True):
            for job_id in ids:
                job_key, n = self._seen.get(job_id, (None, 0))
                if job_key != key or n > room:
                    continue
                outcome, attempts, _ = self._claim_waiting(
                    keys=[queue.key, queue.intermediate_queue_key, Job.key_for(job_id)],
                    args=[job_id, *self._claim_args()])
                if outcome == 1:
                    claimed.append((queue, job_id, n, attempts))
                    room -= n
                elif outcome == -1:
                    log.info("dropped stale queue entry %s: job is no longer queued", job_id)
                elif outcome == -2:
                    self._seen[job_id] = (None, 0)  # it runs alone, as a head
                if room <= 0:
                    return

    def _learn(self, job_ids: list[str]) -> None:
        """Remember the batch key and image count of jobs not seen yet (one pipelined fetch)."""
        if not job_ids:
            return
        if len(self._seen) > CACHE_LIMIT:
            self._seen.clear()
        for job_id, job in zip(job_ids, Job.fetch_many(job_ids, connection=self.connection), strict=True):
            if job is None:
                continue  # not cached: a job hash written just after its id was pushed shows up next scan
            try:
                spec = job_spec(job)
            except Exception:
                self._seen[job_id] = (None, 0)
                continue
            self._seen[job_id] = (spec.batch_key(), spec.params.n)
