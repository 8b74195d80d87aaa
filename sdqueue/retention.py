"""Result retention: delete result images older than ``SDQ_RESULT_RETENTION_S`` (``sdqueue cleanup``).

Local storage: files under ``{job_id}/`` whose modification time is older than the cutoff, then the job folders left
empty (and temp files a crashed write left behind, which age like any other file). S3: objects whose LastModified is
older than the cutoff; on S3 a bucket lifecycle rule does the same without a cron job (see docs/deploy.md).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from core.storage.base import Storage
from core.storage.local import LocalStorage

if TYPE_CHECKING:
    from core.storage.s3 import S3Storage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CleanupReport:
    deleted: int  # objects (files) removed, or that would be with dry_run
    kept: int  # objects younger than the cutoff
    dry_run: bool


def cleanup(storage: Storage, retention_s: int, *, now: float | None = None, dry_run: bool = False) -> CleanupReport:
    """Delete every stored object older than ``retention_s`` seconds (by its modification time)."""
    if retention_s <= 0:
        raise ValueError(f"retention must be a positive number of seconds, got {retention_s}")
    cutoff = (time.time() if now is None else now) - retention_s
    if isinstance(storage, LocalStorage):
        return _cleanup_local(storage.root, cutoff, dry_run)
    # Imported here: the s3 backend needs boto3, which a local-only install may lack.
    from core.storage.s3 import S3Storage

    if isinstance(storage, S3Storage):
        return _cleanup_s3(storage, cutoff, dry_run)
    raise TypeError(f"no retention rule for storage backend {storage.name!r}")


def _cleanup_local(root: Path, cutoff: float, dry_run: bool) -> CleanupReport:
    deleted = kept = 0
    if not root.is_dir():
        return CleanupReport(0, 0, dry_run)
    for job_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink()):
        for path in job_dir.iterdir():
            if not path.is_file() or path.is_symlink():
                continue
            if path.stat().st_mtime >= cutoff:
                kept += 1
                continue
            deleted += 1
            if not dry_run:
                path.unlink(missing_ok=True)
        if not dry_run:
            with contextlib.suppress(OSError):  # rmdir only succeeds once the folder is empty
                job_dir.rmdir()
    log.info("retention: %s %d local files older than the cutoff, kept %d", _verb(dry_run), deleted, kept)
    return CleanupReport(deleted, kept, dry_run)


def _cleanup_s3(storage: S3Storage, cutoff: float, dry_run: bool) -> CleanupReport:
    cutoff_dt = datetime.fromtimestamp(cutoff, tz=timezone.utc)
    old: list[str] = []
    kept = 0
    for key, modified in storage.list_objects():
        if modified < cutoff_dt:
            old.append(key)
        else:
            kept += 1
    deleted = len(old) if dry_run else storage.delete_many(old)
    log.info("retention: %s %d objects in s3://%s/%s, kept %d", _verb(dry_run), deleted, storage.bucket,
             storage.prefix, kept)
    return CleanupReport(deleted, kept, dry_run)


def _verb(dry_run: bool) -> str:
    return "would delete" if dry_run else "deleted"
