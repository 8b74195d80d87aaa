"""`sdqueue cleanup`: delete result images older than the retention period (cron it, or run it as a k8s CronJob)."""

from __future__ import annotations

import argparse

from core.settings import Settings
from core.storage import make_storage
from sdqueue.retention import cleanup


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--older-than",
        type=int,
        default=None,
        metavar="SECONDS",
        help="delete images older than this (default: SDQ_RESULT_RETENTION_S)",
    )
    p.add_argument("--dry-run", action="store_true", help="count what would be deleted, delete nothing")


def run(args: argparse.Namespace, settings: Settings) -> int:
    retention = settings.result_retention_s if args.older_than is None else args.older_than
    if retention <= 0:
        print("sdqueue cleanup: retention is 0: keeping every image")
        return 0
    report = cleanup(make_storage(settings), retention, dry_run=args.dry_run)
    verb = "would delete" if report.dry_run else "deleted"
    print(f"{verb} {report.deleted} images older than {retention} s ({settings.storage} storage), kept {report.kept}")
    return 0
