"""Workers that die at the worst moments, with real worker processes: a job that kills its worker on every run,
and jobs left between lists by a worker killed while it took them."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry

from core.jobstore import get_job
from core.queues import Keys
from core.storage import LocalStorage
from tests.redis_server import RedisServer
from tests.worker.conftest import Pool, make_settings, status, submit, wait_for, wait_terminal

RETRIES = 2  # a poison job runs 3 times


@pytest.fixture(scope="module")
def pool(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Iterator[Pool]:
    redis = Redis.from_url(redis_server.url)
    redis.flushall()
    workdir = tmp_path_factory.mktemp("crashes")
    settings = make_settings(redis_server.url, workdir / "data", tiny_checkpoint, batch_window_ms=200,
                             job_retries=RETRIES)
    pool = Pool(redis, settings, tiny_checkpoint, workdir)
    yield pool
    for worker in pool.workers:
        worker.stop()
    redis.flushall()
    redis.close()


def running_on(pool: Pool, job_id: str) -> str | None:
    """The worker that holds ``job_id`` in the started registry, if one does."""
    registry = StartedJobRegistry(Keys().queue("normal"), connection=pool.redis)
    if job_id not in registry.get_job_ids():
        return None
    return Job.fetch(job_id, connection=pool.redis).worker_name or None


def test_a_job_that_kills_its_worker_fails_alone_and_its_batch_mates_succeed(pool: Pool) -> None:
    pool.exactly(1)
    specs = [submit(pool.redis, pool.settings, steps=40, seed=70 + i) for i in range(4)]
    poison = specs[1]
    mates = [s for s in specs if s is not poison]

    kills = 0
    holder: str | None = None

    def running_or_failed() -> bool:
        nonlocal holder
        holder = running_on(pool, poison.id)
        if holder is not None and pool.by_name(holder).proc.poll() is not None:
            holder = None  # the entry of a worker killed before: not yet cleaned up
        return holder is not None or status(pool.redis, poison.id) == JobStatus.FAILED

    # Every run of the poison job kills its worker (SIGKILL while it runs); a fresh worker replaces it.
    while status(pool.redis, poison.id) != JobStatus.FAILED:
        wait_for(running_or_failed, 90, "the poison job to run")
        if holder is None:
            break
        worker = pool.by_name(holder)
        worker.signal(signal.SIGKILL)
        worker.proc.wait(10)
        kills += 1
        assert kills <= RETRIES + 1, pool.logs()
        pool.ensure(1)

    assert kills == RETRIES + 1
    wait_terminal(pool.redis, [s.id for s in mates], timeout=90)
    for spec in mates:
        assert status(pool.redis, spec.id) == JobStatus.FINISHED, pool.logs()
    storage = LocalStorage(pool.settings.data_dir / "images", "http://test")
    failed = get_job(pool.redis, Keys(), storage, poison.id)
    assert failed is not None and failed.error is not None
    assert failed.error.type == "WorkerError"
    assert failed.error.message == f"the worker died {RETRIES + 1} times while running this job"
    assert failed.attempts == RETRIES + 1
    for spec in mates:  # the first run died with the poison job; the second ran alone
        view = get_job(pool.redis, Keys(), storage, spec.id)
        assert view is not None and view.attempts == 2, view
