"""Retention of stored images on local storage, against a real Redis holding the jobs' RQ records (the S3 case runs
against a server in test_storage_s3.py)."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import pytest
from redis import Redis, RedisError
from rq.job import Job

from core import jobstore
from core.jobs import JobSpec, Txt2ImgRequest
from core.queues import Keys
from core.settings import Settings, load_settings
from core.storage import make_storage
from core.storage.local import LocalStorage
from sdqueue import maintenance
from sdqueue.retention import cleanup
from tests.redis_server import free_port
from tests.rq_worker_side import take

DAY = 24 * 3600
TTL = 3600


@pytest.fixture
def settings(redis_url: str, tmp_path: Path) -> Settings:
    return load_settings(redis_url=redis_url, data_dir=tmp_path, storage="local", result_retention_s=DAY,
                         result_ttl_s=TTL)


@pytest.fixture
def redis(redis_url: str) -> Redis:
    return Redis.from_url(redis_url)


@pytest.fixture
def storage(settings: Settings) -> LocalStorage:
    storage = make_storage(settings)
    assert isinstance(storage, LocalStorage)
    return storage


def store_old(storage: LocalStorage, *keys: str, age_s: float = 2 * DAY) -> None:
    then = time.time() - age_s
    for key in keys:
        storage.put(key, key.encode(), "image/png")
        os.utime(storage.path(key), (then, then))


def enqueue_img2img(redis: Redis, settings: Settings) -> JobSpec:
    """A queued img2img job, its input stored under its id as the API does before it enqueues."""
    spec = jobstore.new_job_spec(Txt2ImgRequest(prompt="a cat", width=64, height=64), task="img2img")
    spec = spec.model_copy(update={"strength": 0.5, "init_image_key": f"{spec.id}/input.png"})
    jobstore.enqueue(redis, settings, spec)
    return spec


def finish(redis: Redis, settings: Settings, spec: JobSpec) -> None:
    """Run ``spec`` to success through RQ's own worker path (status finished, ended_at, the record's TTL)."""
    taken = take(redis, Keys(settings.queue_prefix), spec.id)
    taken.succeed({"images": [{"key": f"{spec.id}/0.png"}], "warnings": [], "timings": {}})


def run_cleanup(
    redis: Redis, storage: LocalStorage, *, now: float | None = None, dry_run: bool = False
) -> tuple[int, int, int]:
    """(deleted, kept, kept_for_jobs) of one cleanup with a one-day retention and a one-hour result TTL."""
    report = cleanup(storage, retention_s=DAY, redis=redis, result_ttl_s=TTL, now=now, dry_run=dry_run)
    return report.deleted, report.kept, report.kept_for_jobs


def test_old_files_of_jobs_without_a_record_go_with_their_folders(redis: Redis, storage: LocalStorage) -> None:
    store_old(storage, "old/0.png", "mixed/0.png")
    storage.put("mixed/1.png", b"c", "image/png")

    assert run_cleanup(redis, storage) == (2, 1, 0)
    assert not (storage.root / "old").exists()
    assert not storage.exists("mixed/0.png")
    assert storage.get("mixed/1.png") == b"c"
    with pytest.raises(ValueError, match="retention must be a positive"):
        cleanup(storage, retention_s=0, redis=redis, result_ttl_s=TTL)


def test_old_inputs_of_queued_and_running_jobs_are_kept(
    redis: Redis, settings: Settings, storage: LocalStorage
) -> None:
    running = enqueue_img2img(redis, settings)
    queued = enqueue_img2img(redis, settings)
    take(redis, Keys(settings.queue_prefix), running.id)
    store_old(storage, f"{queued.id}/input.png", f"{queued.id}/mask.png", f"{running.id}/input.png",
              age_s=30 * DAY)
    store_old(storage, "expiredjob/input.png")

    assert run_cleanup(redis, storage) == (1, 3, 3)
    assert storage.exists(f"{queued.id}/input.png") and storage.exists(f"{queued.id}/mask.png")
    assert storage.exists(f"{running.id}/input.png")
    assert not storage.exists("expiredjob/input.png")


def test_old_images_of_a_finished_job_are_kept_for_its_result_ttl(
    redis: Redis, settings: Settings, storage: LocalStorage
) -> None:
    spec = enqueue_img2img(redis, settings)
    finish(redis, settings, spec)
    keys = (f"{spec.id}/input.png", f"{spec.id}/0.png")
    store_old(storage, *keys)

    # It ended just now: a client reading the job still gets URLs to its images.
    assert run_cleanup(redis, storage, dry_run=True) == (0, 2, 2)
    assert run_cleanup(redis, storage) == (0, 2, 2)
    assert all(storage.exists(key) for key in keys)

    # Seen from more than SDQ_RESULT_TTL_S after it ended, its images go, even while its record lingers.
    assert run_cleanup(redis, storage, now=time.time() + TTL + 60) == (2, 0, 0)
    assert not (storage.root / spec.id).exists()


def test_old_images_of_a_job_whose_record_expired_are_deleted(
    redis: Redis, settings: Settings, storage: LocalStorage
) -> None:
    spec = enqueue_img2img(redis, settings)
    finish(redis, settings, spec)
    redis.delete(Job.key_for(spec.id))  # what the record's TTL (SDQ_RESULT_TTL_S) does
    store_old(storage, f"{spec.id}/input.png", f"{spec.id}/0.png")
    storage.put(f"{spec.id}/1.png", b"young", "image/png")

    assert run_cleanup(redis, storage) == (2, 1, 0)
    assert [p.name for p in (storage.root / spec.id).iterdir()] == ["1.png"]


def test_redis_down_deletes_nothing_and_says_so(
    settings: Settings, storage: LocalStorage, capsys: pytest.CaptureFixture[str]
) -> None:
    store_old(storage, "expiredjob/0.png")
    down = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    parser = argparse.ArgumentParser()
    maintenance.configure_parser(parser)

    assert maintenance.run(parser.parse_args([]), down) == 1

    err = capsys.readouterr().err
    assert "cannot read the job records in Redis" in err and "deleted nothing" in err and "SDQ_REDIS_URL" in err
    assert storage.exists("expiredjob/0.png")
    with pytest.raises(RedisError):
        cleanup(storage, retention_s=DAY, redis=Redis.from_url(down.redis_url), result_ttl_s=TTL)
    assert storage.exists("expiredjob/0.png")


def test_cleanup_command_uses_the_configured_retention(
    redis: Redis, settings: Settings, storage: LocalStorage, capsys: pytest.CaptureFixture[str]
) -> None:
    queued = enqueue_img2img(redis, settings)
    store_old(storage, "old/0.png", f"{queued.id}/input.png", age_s=2 * DAY)
    storage.put("new/0.png", b"b", "image/png")
    parser = argparse.ArgumentParser()
    maintenance.configure_parser(parser)

    assert maintenance.run(parser.parse_args(["--dry-run"]), settings) == 0
    assert ("would delete 1 images older than 86400 s (local storage), kept 2 (1 older ones for jobs still queued, "
            "running or within SDQ_RESULT_TTL_S)") in capsys.readouterr().out
    assert storage.exists("old/0.png")

    assert maintenance.run(parser.parse_args([]), settings) == 0
    assert not storage.exists("old/0.png") and storage.exists("new/0.png")
    assert storage.exists(f"{queued.id}/input.png")

    assert maintenance.run(parser.parse_args(["--older-than", "0"]), settings) == 0
    assert "keeping every image" in capsys.readouterr().out.splitlines()[-1]
