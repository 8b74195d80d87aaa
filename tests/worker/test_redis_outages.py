"""Real worker processes through Redis outages: Redis killed and restarted (with its data), paused, or full, while a
batch runs or while a worker starts. Nothing may be lost or stuck: the workers live on, every job succeeds exactly
once without spending a retry, and the workers are registered (with their model) once Redis is back.

The module has its own redis-server (``RedisServer``), since the tests take it away; two workers share it, so that
one idle worker's registry cleanup meets the other's expired leases right after each outage.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from redis import Redis
from rq.job import Job, JobStatus
from rq.results import Result
from rq.worker import Worker

from core.catalog import MODEL_FIELD
from core.jobs import JobSpec
from tests.redis_server import RedisServer
from tests.worker.conftest import (
    Pool,
    WorkerProcess,
    image_count,
    make_settings,
    submit,
    wait_for,
    wait_running,
    wait_terminal,
)

# Longer than a lease (3 heartbeats of 1 s): every lease and registration expires meanwhile.
OUTAGE_S = 5
STEPS = 60  # a batch of a few seconds on the tiny checkpoint, so the outage begins mid-batch


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("outage-redis"), appendfsync="always", maxmemory_mb=32)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pool(server: RedisServer, tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Iterator[Pool]:
    redis = server.client()
    workdir = tmp_path_factory.mktemp("outage-workers")
    settings = make_settings(server.url, workdir / "data", tiny_checkpoint, batch_window_ms=200)
    pool = Pool(redis, settings, tiny_checkpoint, workdir)
    yield pool
    for worker in pool.workers:
        worker.stop()
    redis.close()


def run_batch_through(pool: Pool, outage: Callable[[], None]) -> None:
    """Two workers run a batch; ``outage`` happens once it denoises; then every job must have succeeded once."""
    workers = pool.ensure(2)
    specs = [submit(pool.redis, pool.settings, steps=STEPS, n=1 + i % 2, seed=70 + i) for i in range(4)]
    wait_running(pool, specs)

    outage()
    wait_terminal(pool.redis, [s.id for s in specs], timeout=90)

    for worker in workers:
        assert worker.proc.poll() is None, f"a worker exited during the outage:\n{pool.logs()}"
    for spec in specs:
        assert_succeeded_once(pool, spec)
    assert_registered(pool.redis, workers)


def assert_succeeded_once(pool: Pool, spec: JobSpec) -> None:
    job = Job.fetch(spec.id, connection=pool.redis)
    assert job.get_status() == JobStatus.FINISHED, (job.meta.get("error"), pool.logs())
    assert [r.type for r in job.results()] == [Result.Type.SUCCESSFUL], pool.logs()  # it ended once
    assert job.retries_left == pool.settings.job_retries, pool.logs()  # no retry spent on the outage
    assert image_count(pool, spec) == spec.params.n
    assert len(job.return_value()["images"]) == spec.params.n


def assert_registered(redis: Redis, workers: list[WorkerProcess]) -> None:
    """Each worker is listed with its model again (registrations expire during an outage longer than a lease)."""
    def listed() -> bool:
        live = {w.name: w for w in Worker.all(connection=redis)}
        return all(w.name in live and redis.hexists(live[w.name].key, MODEL_FIELD) for w in workers)

    wait_for(listed, 10, "the workers to be registered with their model")


def test_redis_killed_mid_batch_and_restarted_with_its_data(server: RedisServer, pool: Pool) -> None:
    def outage() -> None:
        server.kill()
        time.sleep(OUTAGE_S)
        server.start()

    run_batch_through(pool, outage)


def test_redis_paused_mid_batch(server: RedisServer, pool: Pool) -> None:
    def outage() -> None:
        server.pause()
        time.sleep(OUTAGE_S)
        server.resume()

    run_batch_through(pool, outage)


def test_redis_full_mid_batch(server: RedisServer, pool: Pool) -> None:
    def outage() -> None:
        server.fill()
        time.sleep(OUTAGE_S)
        server.free()

    run_batch_through(pool, outage)


@pytest.mark.parametrize("kind", ["down", "full"])
def test_a_worker_started_during_an_outage_waits_for_redis_then_registers(server: RedisServer, pool: Pool,
                                                                           kind: str) -> None:
    pool.ensure(2)
    if kind == "down":
        server.kill()
    else:
        server.fill()
    try:
        worker = WorkerProcess(pool.settings, pool.checkpoint, pool.logdir, len(pool.workers))
        pool.workers.append(worker)
        wait_for(lambda: "Redis unavailable" in worker.log() or worker.proc.poll() is not None, 60,
                 "the new worker to reach Redis")
        time.sleep(2)  # a few more attempts
        assert worker.proc.poll() is None, f"the worker exited while Redis was {kind}:\n{worker.log()}"
    finally:
        if kind == "down":
            server.start()
        else:
            server.free()

    worker.wait_registered(pool.redis, timeout=30)
    spec = submit(pool.redis, pool.settings, seed=90)
    wait_terminal(pool.redis, [spec.id], timeout=60)
    assert_succeeded_once(pool, spec)
    assert_registered(pool.redis, pool.alive())
    worker.stop()
