"""Jobs in Redis as the API sees them: enqueue a `JobSpec` on RQ, read a `JobPublic` back, cancel, queue position.

Everything here works on the RQ job hash, its meta (written by the worker) and its result; nothing imports torch.
"""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from enum import Enum
from typing import Any

from redis import Redis
from redis.exceptions import ConnectionError, TimeoutError, WatchError
from rq import Queue, Retry, worker_registration
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.queue import EnqueueData
from rq.registry import CanceledJobRegistry, DeferredJobRegistry, ScheduledJobRegistry
from rq.results import Result
from rq.utils import current_timestamp, utcformat
from rq.utils import now as rq_now

from core import commit, eventlog
from core.attempts import died_message, read_counts
from core.jobs import (
    MAX_SEED,
    GenerationParams,
    ImageRecord,
    JobError,
    JobPublic,
    JobSpec,
    Priority,
    Progress,
    Status,
    TaskKind,
    Timings,
)
from core.queue_stats import eta_seconds
from core.queues import JOB_FUNC, PRIORITY_ORDER, Keys
from core.settings import Settings
from core.storage.base import Storage

log = logging.getLogger(__name__)

_PUBLIC_STATUS = {
    JobStatus.CREATED: Status.queued,
    JobStatus.QUEUED: Status.queued,
    JobStatus.DEFERRED: Status.queued,
    JobStatus.SCHEDULED: Status.queued,
    JobStatus.STARTED: Status.running,
    JobStatus.FINISHED: Status.succeeded,
    JobStatus.FAILED: Status.failed,
    JobStatus.CANCELED: Status.canceled,
    JobStatus.STOPPED: Status.canceled,
}


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

    Three round trips however many jobs (depths, WATCH, MULTI/EXEC): the API funnels concurrent submissions through
    here, which is what lets one process accept thousands per second. Retry covers a worker that dies mid-job.
    `records` (by job id): Idempotency-Key records made final in the transaction. A lost reply is resolved by a
    look-up (`core.commit`): jobs there, this returns; surely not, the error is raised; else `commit.CommitUnknown`.
    With `wait_on_disk_ms`, it returns once the jobs are fsynced (else `commit.NotOnDisk`).
    """
    keys = Keys(settings.queue_prefix)
    depths = queue_depths(redis, keys)
    waiting = sum(depths.values())
    retry = Retry(max=settings.job_retries) if settings.job_retries else None
    positions: list[int | None] = []
    accepted: list[JobSpec] = []
    by_priority: dict[Priority, list[EnqueueData]] = {}
    for spec in specs:
        if limit is not None and waiting >= limit:
            positions.append(None)
            continue
        priority = spec.params.priority
        positions.append(jobs_ahead(depths, priority))
        depths[priority] += 1
        waiting += 1
        accepted.append(spec)
        by_priority.setdefault(priority, []).append(Queue.prepare_data(
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
            for priority, datas in by_priority.items():
                Queue(keys.queue(priority), connection=redis).enqueue_many(datas, pipeline=pipe)
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


def queue_depths(redis: Redis, keys: Keys) -> dict[Priority, int]:
    """Jobs waiting in each priority's queue (one round trip)."""
    pipe = redis.pipeline(transaction=False)
    for priority in PRIORITY_ORDER:
        pipe.llen(Queue(keys.queue(priority), connection=redis).key)
    return dict(zip(PRIORITY_ORDER, (int(n) for n in pipe.execute()), strict=True))


def live_worker_count(redis: Redis, keys: Keys) -> int:
    """Workers registered on sdqueue's queues whose registration has not expired (a killed worker's key lapses
    after its TTL)."""
    names: set[str] = set()
    for name in keys.queues():
        names |= worker_registration.get_keys(Queue(name, connection=redis))
    if not names:
        return 0
    pipe = redis.pipeline(transaction=False)
    for name in names:
        pipe.exists(name)
    return sum(int(n) for n in pipe.execute())


def jobs_ahead(depths: dict[Priority, int], priority: Priority) -> int:
    """Jobs that run before a job entering `priority`'s queue now: its own queue plus all higher priorities."""
    upto = PRIORITY_ORDER.index(priority)
    return sum(depths[p] for p in PRIORITY_ORDER[: upto + 1])


def queued_view(spec: JobSpec, queue_position: int | None) -> JobPublic:
    """The public view of a job just enqueued (no Redis read needed)."""
    return JobPublic(
        id=spec.id,
        status=Status.queued,
        task=spec.task,
        created_at=spec.created_at,
        queue_position=queue_position,
        params=spec.params,
        strength=spec.strength,
        seeds=spec.seeds(),
    )


def fetch_job(redis: Redis, keys: Keys, job_id: str) -> Job | None:
    """The RQ job `job_id` if it exists and is an sdqueue job."""
    try:
        job = Job.fetch(job_id, connection=redis)
    except (NoSuchJobError, ValueError):  # ValueError: not a valid RQ job id
        return None
    if job.func_name != JOB_FUNC or job.origin not in keys.queues():
        return None
    return job


def job_owner(job: Job) -> str | None:
    """The API key name that submitted `job` (None: submitted with auth off)."""
    owner = job.kwargs["spec"].get("owner")
    return str(owner) if owner is not None else None


def public_status(job: Job) -> Status:
    """The job's status as clients see it, from the RQ status already loaded."""
    return _PUBLIC_STATUS[job.get_status(refresh=False)]


def get_job(redis: Redis, keys: Keys, storage: Storage, job_id: str) -> JobPublic | None:
    """The job as clients see it, or None when there is no such job (or it has expired)."""
    job = fetch_job(redis, keys, job_id)
    if job is None:
        return None
    return job_view(redis, keys, storage, job)


def job_view(redis: Redis, keys: Keys, storage: Storage, job: Job) -> JobPublic:
    """`JobPublic` from the RQ job hash, the meta the worker wrote and, once finished, its latest result."""
    spec = JobSpec.model_validate(job.kwargs["spec"])
    status = _PUBLIC_STATUS[job.get_status(refresh=False)]
    meta = job.meta
    view = queued_view(spec, queue_position=None)
    view.status = status
    view.warnings = list(meta.get("warnings", []))
    if "progress" in meta:
        view.progress = Progress.model_validate(meta["progress"])
    view.started_at = _utc(meta["started_at"]) if "started_at" in meta else _utc(job.started_at)
    attempts, given_back = read_counts(redis, job.key)
    view.attempts = attempts or (1 if view.started_at else 0)  # a stock RQ worker keeps no count
    if status is Status.queued:
        view.queue_position = queue_position(redis, keys, job)
        if view.queue_position is not None:
            workers = live_worker_count(redis, keys)
            view.progress.eta_seconds = eta_seconds(redis, keys, view.queue_position, spec.params.n, workers)
    elif status in (Status.succeeded, Status.failed):
        _add_outcome(view, job, storage, deaths=attempts - given_back)
    elif status is Status.canceled:
        view.finished_at = _utc(job.ended_at) or _canceled_at(redis, job, view.started_at or view.created_at)
    view.timings = _timings(view, view.timings.run_seconds)
    return view


def _canceled_at(redis: Redis, job: Job, not_before: datetime) -> datetime | None:
    """When RQ canceled a job that has no `ended_at` (one a worker dropped while running): the whole second RQ's
    CanceledJobRegistry scored it with, but not before the job started, which it may have within that second."""
    score = redis.zscore(CanceledJobRegistry(job.origin, connection=redis).key, job.id)
    return max(datetime.fromtimestamp(score, timezone.utc), not_before) if score is not None else None


def _add_outcome(view: JobPublic, job: Job, storage: Storage, deaths: int) -> None:
    """Result (images, warnings, run time) or error of a finished job."""
    result = job.latest_result()
    view.finished_at = _utc(job.ended_at) or (_utc(result.created_at) if result else None)
    if view.status is Status.succeeded:
        value: dict[str, Any] = result.return_value if result and isinstance(result.return_value, dict) else {}
        view.images = [
            ImageRecord.model_validate({**img, "url": storage.url(img["key"])}) for img in value.get("images", [])
        ]
        view.warnings = list(value.get("warnings", view.warnings))
        view.timings.run_seconds = value.get("timings", {}).get("run_seconds")
        view.progress = Progress(step=view.params.steps, total=view.params.steps, percent=100.0)
        return
    if "error" in job.meta:
        view.error = JobError.model_validate(job.meta["error"])
    else:
        # No reason recorded by a worker: the job timed out or its last worker died. RQ's text says which.
        exc = (result.exc_string if result and result.type == Result.Type.FAILED else None) or job.exc_info or ""
        last_line = exc.strip().splitlines()[-1] if exc.strip() else "the job failed without a recorded reason"
        if "AbandonedJobError" in last_line and deaths > 0:  # RQ's cleanup gave up on it: its last worker died
            last_line = died_message(deaths)
        view.error = JobError(type="WorkerError", message=last_line)


def _timings(view: JobPublic, run_seconds: float | None) -> Timings:
    def seconds(a: datetime | None, b: datetime | None) -> float | None:
        return round((b - a).total_seconds(), 4) if a and b else None

    if run_seconds is None:
        run_seconds = seconds(view.started_at, view.finished_at)
    return Timings(
        queue_seconds=seconds(view.created_at, view.started_at),
        run_seconds=run_seconds,
        total_seconds=seconds(view.created_at, view.finished_at),
    )


def queue_position(redis: Redis, keys: Keys, job: Job) -> int | None:
    """Jobs ahead of a queued job: those before it in its queue plus every job in higher-priority queues.

    0 when it has left the queue list but not yet started (a worker is taking it); None when it waits elsewhere
    (a retry scheduled for later).
    """
    priority = Priority(job.origin.removeprefix(keys.prefix + "-"))
    higher = PRIORITY_ORDER[: PRIORITY_ORDER.index(priority)]
    pipe = redis.pipeline(transaction=False)
    pipe.lpos(Queue(job.origin, connection=redis).key, job.id)
    for p in higher:
        pipe.llen(Queue(keys.queue(p), connection=redis).key)
    own, *lengths = pipe.execute()
    if job.get_status(refresh=False) in (JobStatus.DEFERRED, JobStatus.SCHEDULED):
        return None
    return (int(own) if own is not None else 0) + sum(int(n) for n in lengths)


# The cancel of a waiting job in one step, so that nothing is left half done (a job `queued` on no list would never
# run nor end): RQ's `Job.cancel` of a job that is not running (status; off its queue and deferred / scheduled
# registry; into the canceled registry, scored with RQ's timestamp), plus the end time and the `canceled` event no
# worker writes for a job it never saw. A queued job is waiting while LREM finds it, else a worker has it ("taken").
# KEYS: job hash, queue list, deferred registry, scheduled registry, canceled registry, event log.
# ARGV: job id, RQ timestamp, ended_at, event message, event log maxlen, event log TTL.
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
return 'canceled'
"""


def cancel_job(redis: Redis, keys: Keys, job_id: str) -> CancelOutcome | None:
    """Cancel `job_id`; None when there is no such job.

    A waiting job is canceled in one atomic script (`_CANCEL_WAITING`), so no worker can take it halfway and no
    crash can leave it half canceled. A job a worker has taken, or that runs, is asked to stop: the worker drops it
    after the current denoising step.
    """
    job = fetch_job(redis, keys, job_id)
    if job is None:
        return None
    if _PUBLIC_STATUS[job.get_status(refresh=False)].is_terminal():
        return CancelOutcome.finished
    origin = job.origin
    outcome: str = redis.eval(  # bytes: RQ's clients do not decode replies
        _CANCEL_WAITING, 6,
        job.key, Queue(origin, connection=redis).key, DeferredJobRegistry(origin, connection=redis).key,
        ScheduledJobRegistry(origin, connection=redis).key, CanceledJobRegistry(origin, connection=redis).key,
        keys.event_log(job.id),
        job.id, current_timestamp(), utcformat(rq_now()), eventlog.message("canceled", job.id, {"reason": "canceled"}),
        eventlog.EVENT_LOG_MAXLEN, eventlog.EVENT_LOG_TTL_S,
    ).decode()
    if outcome == "canceled":
        return CancelOutcome.canceled
    if outcome == "missing":
        return None
    if outcome not in ("taken", JobStatus.STARTED.value):
        return CancelOutcome.finished  # it ended between the read above and the script
    redis.sadd(keys.cancel_requests(), job.id)  # the worker reads the set after every denoising step
    return CancelOutcome.requested


def _utc(value: datetime | str | None) -> datetime | None:
    """Timestamps as aware UTC datetimes (the worker writes ISO strings; naive ones are taken as UTC)."""
    if value is None:
        return None
    dt = datetime.fromisoformat(value) if isinstance(value, str) else value
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)
