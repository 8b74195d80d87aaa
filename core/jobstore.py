"""Jobs in Redis as the API writes them: enqueue a `JobSpec` on RQ, cancel, queue depths.

The read side (`JobPublic` views, queue positions) lives in `core.jobview`; its functions are importable from here
too. Everything here works on the RQ job hash and RQ's lists and registries; nothing imports torch.
"""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from enum import Enum
from typing import Any

from redis import Redis
from redis.client import Pipeline
from redis.exceptions import ConnectionError, TimeoutError, WatchError
from rq import Queue, Retry
from rq.job import Job, JobStatus
from rq.queue import EnqueueData
from rq.registry import CanceledJobRegistry, DeferredJobRegistry, ScheduledJobRegistry
from rq.utils import current_timestamp, utcformat
from rq.utils import now as rq_now

from core import commit, eventlog
from core.jobs import MAX_SEED, GenerationParams, JobSpec, Priority, TaskKind
from core.jobview import (  # the read side, re-exported for the callers that read and write jobs
    fetch_job,
    get_job,
    job_owner,
    job_view,
    live_worker_count,
    public_status,
    queue_position,
    queued_view,
)
from core.queues import JOB_FUNC, PRIORITY_ORDER, Keys
from core.settings import Settings
from core.webhook_queue import WebhookNotifier

__all__ = [
    "CancelOutcome", "cancel_job", "created_score", "enqueue", "enqueue_many", "fetch_job", "get_job", "job_owner",
    "job_view", "jobs_ahead", "live_worker_count", "new_job_spec", "public_status", "queue_depths", "queue_position",
    "queued_view",
]

log = logging.getLogger(__name__)

# How long an owner's index outlives the newest job in it, beyond the result TTL and the job timeout: a day for time
# spent queued.
OWNER_INDEX_SLACK_S = 24 * 3600


class CancelOutcome(str, Enum):
    canceled = "canceled"  # it was queued: removed from its queue, it never runs
    requested = "requested"  # it is running: the worker drops it after the current denoising step
    finished = "finished"  # already terminal: nothing to do


def new_job_spec(params: GenerationParams, task: TaskKind = "txt2img") -> JobSpec:
    """A job for `params` with its id and seed resolved (null or -1 = a random seed, returned to the client)."""
    # Seeds are not secrets, so the cheap PRNG does (os.urandom costs a system call per job); ids stay uuid4.
    seed = params.seed if params.seed is not None and params.seed >= 0 else random.randint(0, MAX_SEED)
    return JobSpec(
        id=uuid.uuid4().hex,
        task=task,
        params=params,
        seed=seed,
        created_at=datetime.now(timezone.utc),
    )


def enqueue(redis: Redis, settings: Settings, spec: JobSpec) -> int:
    """Put one job on its priority's queue; returns its queue position. (The API batches with `enqueue_many`.)"""
    [position] = enqueue_many(redis, settings, [spec])
    assert position is not None
    return position


def enqueue_many(
    redis: Redis, settings: Settings, specs: Sequence[JobSpec], *, limit: int | None = None,
    records: Mapping[str, commit.KeyRecord] | None = None, wait_on_disk_ms: int | None = None,
) -> list[int | None]:
    """Enqueue `specs` on their priorities' RQ queues in one transaction; returns each job's queue position, or
    None for a job refused because the queues already hold `limit` jobs.

    A few round trips however many jobs (the queue count, depths per model, WATCH, MULTI/EXEC): the API funnels
    concurrent submissions through here, which is what lets one process accept thousands per second. Retry covers a
    worker that dies mid-job.
    `records` (by job id): Idempotency-Key records made final in the transaction. A lost reply is resolved by a
    look-up (`core.commit`): jobs there, this returns; surely not, the error is raised; else `commit.CommitUnknown`.
    With `wait_on_disk_ms`, it returns once the jobs are fsynced (else `commit.NotOnDisk`).
    """
    keys = Keys(settings.queue_prefix)
    # per model: what waits before its jobs (its own queues and those of jobs that name no model), one round trip
    # each; the limit counts every queue, all models together
    depths_of: dict[str | None, dict[Priority, int]] = {}
    waiting = total_waiting(redis, keys) if limit is not None else 0
    retry = Retry(max=settings.job_retries) if settings.job_retries else None
    positions: list[int | None] = []
    accepted: list[JobSpec] = []
    by_queue: dict[str, list[EnqueueData]] = {}
    for spec in specs:
        model = spec.params.model
        if model not in depths_of:
            depths_of[model] = queue_depths(redis, keys, model)
        depths = depths_of[model]
        if limit is not None and waiting >= limit:
            positions.append(None)
            continue
        priority = spec.params.priority
        positions.append(jobs_ahead(depths, priority))
        depths[priority] += 1
        waiting += 1
        accepted.append(spec)
        by_queue.setdefault(keys.queue(priority, model), []).append(Queue.prepare_data(
            JOB_FUNC,
            kwargs={"spec": spec.model_dump(mode="json")},
            job_id=spec.id,
            retry=retry,
            timeout=settings.job_timeout_s,
            result_ttl=settings.result_ttl_s,
            failure_ttl=settings.result_ttl_s,
            meta={"batch_key": spec.batch_key()},
        ))
    if not accepted:
        return positions
    job_ids = [spec.id for spec in accepted]
    fence = commit.new_fence(keys)
    try:
        with redis.pipeline() as pipe:
            pipe.watch(fence)
            pipe.multi()
            for name, datas in by_queue.items():
                Queue(name, connection=redis).enqueue_many(datas, pipeline=pipe)
            _index_by_owner(pipe, keys, settings, accepted)
            commit.finalize_records(pipe, [records[i] for i in job_ids if records and i in records])
            pipe.execute()
    except (ConnectionError, TimeoutError, WatchError) as exc:
        # redis-py reports a connection lost while WATCHing as WatchError; a real abort needs the fence, which only
        # the look-up sets.
        found = commit.committed(redis, fence, job_ids)
        if found is None:
            raise commit.CommitUnknown(job_ids) from exc
        if not found:
            raise
        log.warning("the reply to enqueueing %d jobs was lost (%s); they are queued", len(job_ids), exc)
    if wait_on_disk_ms is not None:
        commit.confirm_on_disk(redis, keys, job_ids, wait_on_disk_ms)
    return positions


def _index_by_owner(pipe: Any, keys: Keys, settings: Settings, specs: Sequence[JobSpec]) -> None:
    """Add each job to its owner's index (`GET /v1/jobs`), scored by creation time in microseconds.

    Entries older than any job can still be are trimmed here, so an index never grows without bound; entries of
    jobs that expired sooner are dropped when a listing meets them (`api.joblist`).
    """
    by_owner: dict[str | None, dict[str, float]] = {}
    for spec in specs:
        by_owner.setdefault(spec.owner, {})[spec.id] = created_score(spec.created_at)
    lifetime_s = settings.result_ttl_s + settings.job_timeout_s + OWNER_INDEX_SLACK_S
    cutoff = created_score(datetime.now(timezone.utc)) - lifetime_s * 1e6
    for owner, members in by_owner.items():
        index = keys.owner_jobs(owner)
        pipe.zadd(index, members)
        pipe.zremrangebyscore(index, "-inf", cutoff)
        pipe.expire(index, lifetime_s)


def created_score(created_at: datetime) -> float:
    """A job's score in its owner's index: microseconds since the epoch (exact in a float until the year 2255)."""
    return float(round(created_at.timestamp() * 1_000_000))


def queue_depths(redis: Redis, keys: Keys, model: str | None = None) -> dict[Priority, int]:
    """Jobs waiting at each priority for a worker of ``model``: its model's queue plus the queue of jobs that name
    no model (for ``None``: that queue alone). One round trip."""
    names = [[keys.queue(p)] + ([keys.queue(p, model)] if model is not None else []) for p in PRIORITY_ORDER]
    pipe = redis.pipeline(transaction=False)
    for group in names:
        for name in group:
            pipe.llen(Queue(name, connection=redis).key)
    lengths = iter(int(n) for n in pipe.execute())
    return {p: sum(next(lengths) for _ in group) for p, group in zip(PRIORITY_ORDER, names, strict=True)}


def total_waiting(redis: Redis, keys: Keys) -> int:
    """Jobs waiting on every job queue, all models together (what SDQ_MAX_QUEUED_JOBS limits)."""
    pipe = redis.pipeline(transaction=False)
    for name in keys.all_queues(redis):
        pipe.llen(Queue(name, connection=redis).key)
    return sum(int(n) for n in pipe.execute())


def jobs_ahead(depths: dict[Priority, int], priority: Priority) -> int:
    """Jobs that run before a job entering `priority`'s queue now: its own queue plus all higher priorities."""
    upto = PRIORITY_ORDER.index(priority)
    return sum(depths[p] for p in PRIORITY_ORDER[: upto + 1])


# The cancel of a waiting job in one step, so that nothing is left half done (a job `queued` on no list would never
# run nor end, a canceled one might miss its event or webhook): RQ's `Job.cancel` of a job that is not running
# (status; off its queue and deferred / scheduled registry; into the canceled registry, scored with RQ's timestamp),
# plus the end time, the `canceled` event no worker writes for a job it never saw, and the writes that queue its
# completed webhook (`_recorded`), run only when the cancel lands. A queued job is waiting while LREM finds it, else a
# worker has it ("taken").
# KEYS: job hash, queue list, deferred registry, scheduled registry, canceled registry, event log.
# ARGV: job id, RQ timestamp, ended_at, event message, event log maxlen, event log TTL, then the webhook's writes,
# each as its word count followed by its words. Their keys (a delivery's RQ job and queue) are not among KEYS: a
# standalone Redis, as sdqueue uses, runs a script's writes to any key.
_CANCEL_WAITING = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  return 'missing'
end
if status == 'deferred' or status == 'scheduled' then
  redis.call('ZREM', status == 'deferred' and KEYS[3] or KEYS[4], ARGV[1])
  redis.call('LREM', KEYS[2], 1, ARGV[1])
elseif status == 'queued' or status == 'created' then
  if redis.call('LREM', KEYS[2], 0, ARGV[1]) == 0 then
    return 'taken'
  end
else
  return status
end
redis.call('HSET', KEYS[1], 'status', 'canceled', 'ended_at', ARGV[3])
redis.call('ZADD', KEYS[5], ARGV[2], ARGV[1])
redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[5], '*', 'message', ARGV[4])
redis.call('EXPIRE', KEYS[6], ARGV[6])
local i = 7
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  redis.call(unpack(ARGV, i + 1, i + n))
  i = i + n + 1
end
return 'canceled'
"""


def cancel_job(
    redis: Redis, keys: Keys, job_id: str, *, webhooks: WebhookNotifier | None = None
) -> CancelOutcome | None:
    """Cancel `job_id`; None when there is no such job.

    A waiting job is canceled in one atomic script (`_CANCEL_WAITING`), so no worker can take it halfway and no
    crash can leave it half canceled; with `webhooks` (the API's), its completed webhook is queued in that same
    script. A job a worker has taken, or that runs, is asked to stop: the worker drops it after the current
    denoising step, and writes its end, event and webhook itself.
    """
    job = fetch_job(redis, keys, job_id)
    if job is None:
        return None
    if public_status(job).is_terminal():
        return CancelOutcome.finished
    origin = job.origin
    ended = rq_now()
    writes = _recorded(redis, lambda pipe: _canceled_webhook(webhooks, job, ended, pipe)) if webhooks else []
    outcome: str = redis.eval(  # bytes: RQ's clients do not decode replies
        _CANCEL_WAITING, 6,
        job.key, Queue(origin, connection=redis).key, DeferredJobRegistry(origin, connection=redis).key,
        ScheduledJobRegistry(origin, connection=redis).key, CanceledJobRegistry(origin, connection=redis).key,
        keys.event_log(job.id),
        job.id, current_timestamp(), utcformat(ended), eventlog.message("canceled", job.id, {"reason": "canceled"}),
        eventlog.EVENT_LOG_MAXLEN, eventlog.EVENT_LOG_TTL_S,
        *(word for command in writes for word in (len(command), *command)),
    ).decode()
    if outcome == "canceled":
        return CancelOutcome.canceled
    if outcome == "missing":
        return None
    if outcome not in ("taken", JobStatus.STARTED.value):
        return CancelOutcome.finished  # it ended between the read above and the script
    redis.sadd(keys.cancel_requests(), job.id)  # the worker reads the set after every denoising step
    return CancelOutcome.requested


def _canceled_webhook(webhooks: WebhookNotifier, job: Job, ended: datetime, pipe: Pipeline) -> None:
    """The completed webhook of `job` canceled while waiting, with the view GET answers once the script ran."""
    job._status = JobStatus.CANCELED  # in memory, for the view: the script writes the status and the end time
    job.ended_at = ended
    webhooks.completed(job, pipe)


def _recorded(redis: Redis, write: Callable[[Pipeline], None]) -> list[tuple[Any, ...]]:
    """The commands `write` puts in a pipeline, recorded instead of sent: a script runs them where they must land
    together with its own writes."""
    pipe = redis.pipeline(transaction=False)
    try:
        write(pipe)
        return [args for args, _options in pipe.command_stack]
    finally:
        pipe.reset()
