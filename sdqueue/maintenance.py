"""`sdqueue cleanup`: delete result images older than the retention period that no job needs any more (cron it, or
run it as a k8s CronJob). It reads the job records in Redis, so it needs SDQ_REDIS_URL like the API."""

from __future__ import annotations

import argparse
import sys

from redis import RedisError

from core.queues import connect
from core.settings import Settings
from core.storage import make_storage
from sdqueue.retention import cleanup


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--older-than",
        type=int,
        default=None,
        metavar="SECONDS",
        help="delete images older than this (default: SDQ_RESULT_RETENTION_S); images of jobs still queued or "
        "running, or that ended less than SDQ_RESULT_TTL_S ago, are kept",
    )
    p.add_argument("--dry-run", action="store_true", help="count what would be deleted, delete nothing")


def run(args: argparse.Namespace, settings: Settings) -> int:
    retention = settings.result_retention_s if args.older_than is None else args.older_than
    if retention <= 0:
        print("sdqueue cleanup: retention is 0: keeping every image")
        return 0
    redis = connect(settings.redis_url)
    try:
        report = cleanup(
            make_storage(settings), retention, redis=redis, result_ttl_s=settings.result_ttl_s, dry_run=args.dry_run
        )
    except RedisError as exc:
        print(
            f"sdqueue cleanup: cannot read the job records in Redis ({exc}); deleted nothing. Images of queued and "
            "recent jobs are only known from Redis: check SDQ_REDIS_URL and that Redis is up, then run it again",
            file=sys.stderr,
        )
        return 1
    finally:
        redis.close()
    verb = "would delete" if report.dry_run else "deleted"
    print(
        f"{verb} {report.deleted} images older than {retention} s ({settings.storage} storage), kept {report.kept} "
        f"({report.kept_for_jobs} older ones for jobs still queued, running or within SDQ_RESULT_TTL_S)"
    )
    return 0
