"""Result retention (``sdqueue cleanup``): delete stored images older than ``SDQ_RESULT_RETENTION_S``, except those
a job still needs.

Every object lives under ``{job_id}/``. An object older than the cutoff (file modification time, S3 LastModified) is
deleted unless its job's RQ record (``rq:job:{id}``) says the job still needs it:

- the job is waiting or running (``created``, ``queued``, ``deferred``, ``scheduled``, ``started``): its inputs
  (``input.png``, ``mask.png``) are read when it runs, and a rerun after a worker died writes its results again;
- the job ended less than ``SDQ_RESULT_TTL_S`` ago, or its record has no end time: a client reading the job gets URLs
  to its images.

A job whose record has expired is gone for clients too, so its old objects go. All the records are read before the
first delete: when Redis cannot be reached, nothing is deleted. Local storage also removes the job folders it
emptied. On S3 a bucket lifecycle rule can expire objects without a cron job, but by age alone (docs/deploy.md).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from redis import Redis
from rq.job import Job
from rq.utils import str_to_date

from core.storage.base import Storage
from core.storage.local import LocalStorage

if TYPE_CHECKING:
    from core.storage.s3 import S3Storage

log = logging.getLogger(__name__)

# RQ statuses of a job that has not ended: its files are needed whatever their age.
WAITING_OR_RUNNING = frozenset({"created", "queued", "deferred", "scheduled", "started"})
# Job records read per Redis round trip.
LOOKUP_BATCH = 500


@dataclass(frozen=True)
class CleanupReport:
    deleted: int  # objects (files) removed, or that would be with dry_run
    kept: int  # objects kept: younger than the cutoff, or needed by their job
    kept_for_jobs: int  # of those, objects older than the cutoff kept because their job still needs them
    dry_run: bool


def cleanup(
    storage: Storage,
    retention_s: int,
    *,
    redis: Redis,
    result_ttl_s: int,
    now: float | None = None,
    dry_run: bool = False,
) -> CleanupReport:
    """Delete the objects older than ``retention_s`` seconds whose job no longer needs them (see the module doc).

    Raises ``redis.RedisError`` (having deleted nothing) when the job records cannot be read.
    """
    if retention_s <= 0:
        raise ValueError(f"retention must be a positive number of seconds, got {retention_s}")
    now = time.time() if now is None else now
    cutoff = now - retention_s
    young = 0
    old: list[str] = []
    for key, modified in _list(storage):
        if modified >= cutoff:
            young += 1
        else:
            old.append(key)
    needed = jobs_still_needing_files(redis, {_job_id(key) for key in old}, result_ttl_s=result_ttl_s, now=now)
    doomed = [key for key in old if _job_id(key) not in needed]
    kept_for_jobs = len(old) - len(doomed)
    deleted = len(doomed) if dry_run else _delete(storage, doomed)
    log.info(
        "retention: %s %d objects older than %d s in %s storage, kept %d (%d of them for jobs still queued, running "
        "or within the result TTL)",
        "would delete" if dry_run else "deleted", deleted, retention_s, storage.name, young + kept_for_jobs,
        kept_for_jobs,
    )
    return CleanupReport(deleted, young + kept_for_jobs, kept_for_jobs, dry_run)


def jobs_still_needing_files(redis: Redis, job_ids: Collection[str], *, result_ttl_s: int, now: float) -> set[str]:
    """The ids among ``job_ids`` whose RQ record shows the job waiting, running, or ended less than
    ``result_ttl_s`` seconds before ``now`` (or at an unknown time)."""
    ids = sorted(job_ids)
    needed: set[str] = set()
    for start in range(0, len(ids), LOOKUP_BATCH):
        chunk = ids[start : start + LOOKUP_BATCH]
        pipe = redis.pipeline(transaction=False)
        for job_id in chunk:
            pipe.hmget(Job.key_for(job_id), ["status", "ended_at"])
        for job_id, (status, ended_at) in zip(chunk, pipe.execute(), strict=True):
            if _needs_files(status, ended_at, ended_after=now - result_ttl_s):
                needed.add(job_id)
    return needed


def _needs_files(status: bytes | None, ended_at: bytes | None, *, ended_after: float) -> bool:
    if status is None:
        return False  # no record: the job expired, and clients cannot reach its images any more
    if status.decode() in WAITING_OR_RUNNING or not ended_at:
        return True
    return str_to_date(ended_at).timestamp() > ended_after


def _job_id(key: str) -> str:
    return key.split("/", 1)[0]


def _list(storage: Storage) -> Iterator[tuple[str, float]]:
    """Every stored ``(key, modification time)``."""
    if isinstance(storage, LocalStorage):
        return _list_local(storage.root)
    return ((key, modified.timestamp()) for key, modified in _s3(storage).list_objects())


def _list_local(root: Path) -> Iterator[tuple[str, float]]:
    if not root.is_dir():
        return
    for job_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink()):
        for path in sorted(job_dir.iterdir()):
            # Temp files a crashed write left behind are listed too: they age like any other file.
            if path.is_file() and not path.is_symlink():
                yield f"{job_dir.name}/{path.name}", path.stat().st_mtime


def _delete(storage: Storage, keys: list[str]) -> int:
    if not isinstance(storage, LocalStorage):
        return _s3(storage).delete_many(keys)
    for key in keys:
        storage.delete(key)
    for job_id in sorted({_job_id(key) for key in keys}):
        with contextlib.suppress(OSError):  # rmdir only succeeds once the folder is empty
            (storage.root / job_id).rmdir()
    return len(keys)


def _s3(storage: Storage) -> S3Storage:
    # Imported here: the s3 backend needs boto3, which a local-only install may lack.
    from core.storage.s3 import S3Storage

    if not isinstance(storage, S3Storage):
        raise TypeError(f"no retention rule for storage backend {storage.name!r}")
    return storage
