"""One owner's jobs, newest first, a page at a time (`GET /v1/jobs`), from the index `jobstore.enqueue_many` keeps.

The cursor is the position of the last job a page looked at (its creation score and id, base64), so pages stay
stable while new jobs arrive at the front. With a status filter a page looks at most `SCAN_LIMIT` jobs, so it can
come back short, even empty, with a cursor to go on from: clients page until `next_cursor` is null.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from redis import Redis
from rq.job import Job

from core import jobstore
from core.jobs import JobPublic, Status
from core.queues import JOB_FUNC, Keys
from core.storage.base import Storage

SCAN_LIMIT = 1000  # index entries one page may look at
_CHUNK = 100


@dataclass
class Page:
    jobs: list[JobPublic]
    next_cursor: str | None


def encode_cursor(score: float, job_id: str) -> str:
    return base64.urlsafe_b64encode(f"{int(score)}:{job_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    """ValueError unless `cursor` is one `encode_cursor` made."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        score, job_id = text.split(":", 1)
        if not job_id:
            raise ValueError
        return float(int(score)), job_id
    except (ValueError, UnicodeDecodeError, binascii.Error):
        raise ValueError("cursor must be a next_cursor value from an earlier page") from None


def list_jobs(
    redis: Redis, keys: Keys, storage: Storage, owner: str | None, *, status: Status | None, limit: int,
    cursor: str | None,
) -> Page:
    index = keys.owner_jobs(owner)
    after = decode_cursor(cursor) if cursor else None
    top: float | str = after[0] if after else "+inf"
    views: list[JobPublic] = []
    expired: list[str] = []
    last: tuple[float, str] | None = None
    offset = scanned = 0
    try:
        while scanned < SCAN_LIMIT:
            rows = redis.zrevrangebyscore(index, top, "-inf", start=offset, num=_CHUNK, withscores=True)
            if not rows:
                return Page(views, None)
            offset += len(rows)
            # Equal scores come in descending id order: skip up to and including the cursor's own job.
            entries = [(m.decode(), s) for m, s in rows]
            if after:
                entries = [(m, s) for m, s in entries if not (s == after[0] and m >= after[1])]
            jobs = Job.fetch_many([m for m, _ in entries], connection=redis)
            for (job_id, score), job in zip(entries, jobs, strict=True):
                scanned += 1
                last = (score, job_id)
                if job is None or job.func_name != JOB_FUNC:
                    expired.append(job_id)
                    continue
                if status is None or jobstore.public_status(job) is status:
                    views.append(jobstore.job_view(redis, keys, storage, job))
                    if len(views) == limit:
                        return Page(views, encode_cursor(*last))
        return Page(views, encode_cursor(*last) if last else None)
    finally:
        if expired:
            redis.zrem(index, *expired)
