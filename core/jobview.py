"""Jobs as clients see them (`JobPublic`), read from the RQ job hash, the meta the worker wrote and its latest result.

`job_view` reads a job back from Redis; `final_view` builds, from memory, the view of a job whose final record is
being written, equal to what `job_view` will read once that write landed (the ``completed`` webhook queued in the
same transaction carries it). Both go through one builder, so they cannot drift apart. Nothing here imports torch.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from redis import Redis
from rq import Queue, worker_registration
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import CanceledJobRegistry
from rq.results import Result

from core.attempts import died_message, read_counts
from core.jobs import ImageRecord, JobError, JobPublic, JobSpec, Progress, Status, Timings, TokenCounts
from core.queue_stats import eta_seconds
from core.queues import JOB_FUNC, PRIORITY_ORDER, Keys
from core.storage.base import Storage

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


def public_status(job: Job) -> Status:
    """The job's status as clients see it, from the RQ status already loaded."""
    return _PUBLIC_STATUS[job.get_status(refresh=False)]


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
    if job.func_name != JOB_FUNC or keys.parse(job.origin) is None:
        return None
    return job


def job_owner(job: Job) -> str | None:
    """The API key name that submitted `job` (None: submitted with auth off)."""
    owner = job.kwargs["spec"].get("owner")
    return str(owner) if owner is not None else None


def get_job(redis: Redis, keys: Keys, storage: Storage, job_id: str) -> JobPublic | None:
    """The job as clients see it, or None when there is no such job (or it has expired)."""
    job = fetch_job(redis, keys, job_id)
    if job is None:
        return None
    return job_view(redis, keys, storage, job)


def job_view(redis: Redis, keys: Keys, storage: Storage, job: Job) -> JobPublic:
    """`JobPublic` from the RQ job hash, the meta the worker wrote and, once finished, its latest result."""
    status = public_status(job)
    attempts, given_back = read_counts(redis, job.key)
    result = job.latest_result() if status in (Status.succeeded, Status.failed) else None
    value = result.return_value if result and isinstance(result.return_value, dict) else {}
    exc = ""
    if status is Status.failed and "error" not in job.meta:  # RQ's text, for a failure no worker explained
        exc = (result.exc_string if result and result.type == Result.Type.FAILED else None) or job.exc_info or ""
    view = _build(job, storage, attempts, given_back, value, exc)
    if status is Status.queued:
        view.queue_position = queue_position(redis, keys, job)
        if view.queue_position is not None:
            model = view.params.model
            workers = live_worker_count(redis, keys, model)
            view.progress.eta_seconds = eta_seconds(redis, keys, view.queue_position, view.params.n, workers, model)
    elif view.finished_at is None and status is Status.canceled:
        view.finished_at = _canceled_at(redis, job, view.started_at or view.created_at)
    elif view.finished_at is None and result is not None:
        view.finished_at = _utc(result.created_at)
    view.timings = _timings(view, view.timings.run_seconds)
    return view


def final_view(job: Job, storage: Storage, attempts: int, given_back: int,
               return_value: dict[str, Any] | None = None) -> JobPublic:
    """The view of a job whose final record is being written, from memory: its status, ``ended_at`` and meta as they
    are being stored, the attempt counts, and a success's return value. Once the write landed, `job_view` reads
    back exactly this. Every final record of a worker or of a cancel sets ``ended_at`` and a failure's
    ``meta.error``, so nothing here needs the result RQ stores."""
    assert job.ended_at is not None, f"job {job.id}: final_view needs the end time of its record"
    view = _build(job, storage, attempts, given_back, return_value or {}, exc="")
    view.timings = _timings(view, view.timings.run_seconds)
    return view


def _build(job: Job, storage: Storage, attempts: int, given_back: int, value: dict[str, Any], exc: str) -> JobPublic:
    """The view from what is known of the job: its hash and meta as loaded, its counts, a success's return value
    and a failure's RQ text. Redis reads (queue position, fallbacks for a missing end time) are the caller's."""
    spec = JobSpec.model_validate(job.kwargs["spec"])
    meta = job.meta
    view = queued_view(spec, queue_position=None)
    view.status = public_status(job)
    view.warnings = list(meta.get("warnings", []))
    if "progress" in meta:
        view.progress = Progress.model_validate(meta["progress"])
    view.started_at = _utc(meta["started_at"]) if "started_at" in meta else _utc(job.started_at)
    view.attempts = attempts or (1 if view.started_at else 0)  # a stock RQ worker keeps no count
    view.worker = job.worker_name if view.started_at else None  # retried: the last one, until the next starts
    if view.status.is_terminal():
        view.finished_at = _utc(job.ended_at)
    if view.status is Status.succeeded:
        view.images = [
            ImageRecord.model_validate({**img, "url": storage.url(img["key"])}) for img in value.get("images", [])
        ]
        view.warnings = list(value.get("warnings", view.warnings))
        if "tokens" in value:
            view.tokens = TokenCounts.model_validate(value["tokens"])
        view.timings.run_seconds = value.get("timings", {}).get("run_seconds")
        view.progress = Progress(step=view.params.steps, total=view.params.steps, percent=100.0)
    elif view.status is Status.failed:
        view.error = _error(job, exc, deaths=attempts - given_back)
    return view


def _error(job: Job, exc: str, deaths: int) -> JobError:
    """A failed job's error: the reason a worker recorded, else the last line of RQ's text."""
    if "error" in job.meta:
        return JobError.model_validate(job.meta["error"])
    # No reason recorded by a worker: the job timed out or its last worker died. RQ's text says which.
    last_line = exc.strip().splitlines()[-1] if exc.strip() else "the job failed without a recorded reason"
    if "AbandonedJobError" in last_line and deaths > 0:  # RQ's cleanup gave up on it: its last worker died
        last_line = died_message(deaths)
    return JobError(type="WorkerError", message=last_line)


def _canceled_at(redis: Redis, job: Job, not_before: datetime) -> datetime | None:
    """When RQ canceled a job that has no `ended_at` (one a worker dropped while running): the whole second RQ's
    CanceledJobRegistry scored it with, but not before the job started, which it may have within that second."""
    score = redis.zscore(CanceledJobRegistry(job.origin, connection=redis).key, job.id)
    return max(datetime.fromtimestamp(score, timezone.utc), not_before) if score is not None else None


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
    parsed = keys.parse(job.origin)
    assert parsed is not None, job.origin  # find_job took only jobs of sdqueue's queues
    model, priority = parsed
    higher = PRIORITY_ORDER[: PRIORITY_ORDER.index(priority)]
    pipe = redis.pipeline(transaction=False)
    pipe.lpos(Queue(job.origin, connection=redis).key, job.id)
    for p in higher:  # what the workers that can run it take first: their model's queues and the unnamed ones
        for name in {keys.queue(p), keys.queue(p, model)}:
            pipe.llen(Queue(name, connection=redis).key)
    own, *lengths = pipe.execute()
    if job.get_status(refresh=False) in (JobStatus.DEFERRED, JobStatus.SCHEDULED):
        return None
    return (int(own) if own is not None else 0) + sum(int(n) for n in lengths)


def live_worker_count(redis: Redis, keys: Keys, model: str | None = None) -> int:
    """Workers registered on sdqueue's queues (given ``model``: on that model's) whose registration has not expired
    (a killed worker's key lapses after its TTL)."""
    names: set[str] = set()
    for name in keys.queues(model):  # every worker listens on the queues of jobs that name no model
        names |= worker_registration.get_keys(Queue(name, connection=redis))
    if not names:
        return 0
    pipe = redis.pipeline(transaction=False)
    for name in names:
        pipe.exists(name)
    return sum(int(n) for n in pipe.execute())


def _utc(value: datetime | str | None) -> datetime | None:
    """Timestamps as aware UTC datetimes (the worker writes ISO strings; naive ones are taken as UTC)."""
    if value is None:
        return None
    dt = datetime.fromisoformat(value) if isinstance(value, str) else value
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)
