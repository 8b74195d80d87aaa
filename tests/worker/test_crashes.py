"""Workers that die at the worst moments, with real worker processes: a job that kills its worker on every run,
jobs claimed by a worker killed before it started them, and a job left on no list by a worker killed while it
took it."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.registry import StartedJobRegistry

from core.catalog import served_models
from core.jobview import get_job
from core.queues import Keys
from core.storage import LocalStorage
from tests.redis_server import RedisServer
from tests.worker.conftest import (
    Pool,
    WorkerProcess,
    logged_events,
    make_settings,
    status,
    submit,
    wait_for,
    wait_terminal,
)

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
    if job_id not in registry.get_job_ids(cleanup=False):  # a look, not RQ's own cleanup (a worker's job)
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
    # failed by the registry cleanup, with its event in its log as a worker would write it
    assert [e["event"] for e in logged_events(pool.redis, poison.id)][-1:] == ["failed"]
    for spec in mates:  # the first run died with the poison job; the second ran alone
        view = get_job(pool.redis, Keys(), storage, spec.id)
        assert view is not None and view.attempts == 2, view


def idle_but_frozen(pool: Pool) -> WorkerProcess:
    """The module's one worker, stopped (SIGSTOP) once its blocking dequeue has timed out on the server, so that
    jobs submitted now stay where the test puts them."""
    [worker] = pool.exactly(1)
    worker.signal(signal.SIGSTOP)
    time.sleep(2 * pool.settings.heartbeat_s + 0.5)  # its BLPOP (one heartbeat long) has returned on the server
    return worker


def test_jobs_claimed_by_a_worker_killed_in_its_collection_window_run_elsewhere_within_seconds(pool: Pool) -> None:
    survivor = idle_but_frozen(pool)
    # A victim whose window outlasts the lease: it claims the jobs, then waits for more.
    victim_settings = pool.settings.model_copy(update={"batch_window_ms": 10_000})
    victim = WorkerProcess(victim_settings, pool.checkpoint, pool.logdir, len(pool.workers))
    pool.workers.append(victim)
    try:
        victim.wait_registered(pool.redis)
        specs = [submit(pool.redis, pool.settings, seed=80 + i) for i in range(3)]
        intermediate = Queue(Keys().queue("normal"), connection=pool.redis).intermediate_queue_key
        wait_for(lambda: {i.decode() for i in pool.redis.lrange(intermediate, 0, -1)} == {s.id for s in specs}, 30,
                 "the victim's claims")  # on RQ's intermediate list: claimed, not yet started
        time.sleep(2 * pool.settings.heartbeat_s)  # it keeps its registration through a long window

        victim.signal(signal.SIGKILL)
        killed_at = time.monotonic()
        victim.proc.wait(10)
    finally:
        survivor.signal(signal.SIGCONT)
    wait_for(lambda: all(Job.fetch(s.id, connection=pool.redis).worker_name == survivor.name for s in specs), 30,
             "the survivor to start the claimed jobs")
    back_after = time.monotonic() - killed_at
    wait_terminal(pool.redis, [s.id for s in specs], timeout=60)

    for spec in specs:
        job = Job.fetch(spec.id, connection=pool.redis)
        assert job.get_status() == JobStatus.FINISHED, pool.logs()
        assert job.retries_left == RETRIES  # never ran: no retry spent
    # The victim's registration lapses one lease after its last heartbeat; the survivor, frozen meanwhile, first
    # waits a lease and a heartbeat of steady contact before it sweeps (RQ's own cleanup waits a minute).
    heartbeat = pool.settings.heartbeat_s
    assert back_after < 3 * heartbeat + 4 * heartbeat + 3, back_after
    print(f"claimed jobs of a killed worker started elsewhere {back_after:.1f} s after the kill")


@pytest.mark.parametrize("named", [False, True], ids=["shared-queue", "model-queue"])
def test_a_queued_job_on_no_list_goes_back_to_its_queue(pool: Pool, named: bool) -> None:
    worker = idle_but_frozen(pool)
    try:
        model = served_models(pool.redis, Keys())[0] if named else None  # named: on its model's own queue
        spec = submit(pool.redis, pool.settings, seed=90, model=model)
        queue_key = Queue(Keys().queue("normal", model), connection=pool.redis).key
        # What a worker killed between RQ's BLPOP and its claim script leaves: the id off its queue, status queued.
        assert pool.redis.lpop(queue_key) == spec.id.encode()
    finally:
        worker.signal(signal.SIGCONT)
    took = wait_terminal(pool.redis, [spec.id], timeout=30)

    job = Job.fetch(spec.id, connection=pool.redis)
    assert job.get_status() == JobStatus.FINISHED, pool.logs()
    assert job.retries_left == RETRIES and job.origin == Keys().queue("normal", model)
    print(f"a stranded job ran {took:.1f} s after its worker resumed")

