"""Crash recovery at the default heartbeat (``SDQ_HEARTBEAT_S`` = 5 s): the jobs of a worker SIGKILLed mid-batch run
again on the survivor within 3 heartbeats (their lease) plus one batch (the survivor's, running when the leases
lapse), while a backlog keeps the survivor busy.

Jobs that come back from a crashed batch run alone (a poison job must not take its mates down), so each of them
may also wait for the solo runs of its former mates that restarted before it; the bound adds those, as measured.
A feeder keeps the queue a few batches deep until every job of the dead worker has restarted: a job queued again
at the back would wait behind that backlog, and a survivor that handed jobs back only between its batches would
hand them back a batch late.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.results import Result
from rq.worker import Worker

from core.jobs import JobSpec
from core.queues import Keys
from core.settings import Settings
from tests.redis_server import RedisServer
from tests.worker.conftest import (
    Pool,
    image_count,
    logged_events,
    make_settings,
    submit,
    wait_for,
    wait_terminal,
)

log = logging.getLogger(__name__)

HEARTBEAT_S = Settings.model_fields["heartbeat_s"].default
BATCH_IMAGES = 4
STEPS = 120  # a batch of 4 takes a few seconds on the tiny checkpoint
BACKLOG = 5 * BATCH_IMAGES  # queued jobs the feeder keeps behind the dead worker's
SLACK_S = 3.0  # claims, the start transaction and a loaded machine; less than a heartbeat


@pytest.fixture(scope="module")
def pool(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Iterator[Pool]:
    redis = Redis.from_url(redis_server.url)
    redis.flushall()
    workdir = tmp_path_factory.mktemp("recovery")
    settings = make_settings(redis_server.url, workdir / "data", tiny_checkpoint, heartbeat_s=HEARTBEAT_S,
                             max_batch_images=BATCH_IMAGES, batch_window_ms=200)
    pool = Pool(redis, settings, tiny_checkpoint, workdir)
    yield pool
    for worker in pool.workers:
        worker.stop()
    redis.flushall()
    redis.close()


def redis_now(redis: Redis) -> float:
    seconds, micros = redis.time()
    return seconds + micros / 1e6


def runs(redis: Redis, job_id: str) -> list[tuple[float, float | None]]:
    """(start, end) of each run of the job, from its event log (Redis time)."""
    spans: list[tuple[float, float | None]] = []
    for event in logged_events(redis, job_id):
        if event["event"] == "running":
            spans.append((event["at"], None))
        elif event["event"] in ("succeeded", "failed") and spans:
            spans[-1] = (spans[-1][0], event["at"])
    return spans


def test_a_killed_workers_jobs_run_again_within_three_heartbeats_and_a_batch(pool: Pool) -> None:
    assert pool.settings.heartbeat_s == 5
    workers = pool.exactly(2)
    # Every worker waits for a lease and a heartbeat of steady contact with Redis after its start before it takes
    # leases for lapsed (RQWorker.clean_registries): the drill starts after that.
    lease_s = 3 * HEARTBEAT_S
    births = [w.birth_date for w in Worker.all(connection=pool.redis)]
    settled_at = max(b.timestamp() for b in births if b is not None) + lease_s + HEARTBEAT_S + 1
    time.sleep(max(0.0, settled_at - redis_now(pool.redis)))

    specs = [submit(pool.redis, pool.settings, steps=STEPS, seed=100 + i) for i in range(2 * BATCH_IMAGES + BACKLOG)]

    def holders() -> dict[str, tuple[str, int]]:
        """Running job id -> the worker running it and the step it is at."""
        jobs = [Job.fetch(s.id, connection=pool.redis) for s in specs]
        return {j.id: (j.worker_name or "", j.meta["progress"]["step"]) for j in jobs
                if j.get_status() == JobStatus.STARTED and "progress" in j.meta}

    wait_for(lambda: len({name for name, _ in holders().values()}) == 2, 60, "both workers to run a batch")
    held = holders()
    victim_name = min(held.values(), key=lambda holder: holder[1])[0]  # the batch with the most steps to go
    victim = pool.by_name(victim_name)
    doomed = [s for s in specs if held.get(s.id, ("", 0))[0] == victim_name]

    killed_at = redis_now(pool.redis)
    victim.signal(signal.SIGKILL)
    victim.proc.wait(10)
    assert all(Job.fetch(s.id, connection=pool.redis).get_status() == JobStatus.STARTED for s in doomed), (
        "the batch ended before the kill: make it longer (STEPS)")

    # The survivor stays busy: the queue holds a backlog until every job of the dead worker has restarted.
    fed: list[JobSpec] = []
    done = threading.Event()

    def feed() -> None:
        queue = Queue(Keys().queue("normal"), connection=pool.redis)
        while not done.wait(0.2):
            if queue.count < BACKLOG:
                fed.append(submit(pool.redis, pool.settings, steps=STEPS, seed=1000 + len(fed)))

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    bound_s = lease_s + 10 * 60  # a cap for the wait only; the assertion below is the bound
    try:
        wait_for(lambda: all(len(runs(pool.redis, s.id)) >= 2 for s in doomed), bound_s,
                 "the dead worker's jobs to start again")
    finally:
        done.set()
        feeder.join()

    all_ids = [s.id for s in specs + fed]
    wait_terminal(pool.redis, all_ids, timeout=300)

    # Each restarted within 3 heartbeats + one of the survivor's batches + the solo runs of its mates before it.
    batch_s = max(end - start for s in specs if s not in doomed
                  for start, end in runs(pool.redis, s.id) if end is not None)
    restarts = sorted((runs(pool.redis, s.id)[1], s.id) for s in doomed)
    ahead_s = 0.0
    late = []
    for (start, end), job_id in restarts:
        allowed = lease_s + batch_s + ahead_s + SLACK_S
        log.info("job %s started again %.1f s after the kill (allowed %.1f s)", job_id, start - killed_at, allowed)
        if start - killed_at > allowed:
            late.append(f"job {job_id} started again {start - killed_at:.1f} s after the kill (allowed "
                        f"{allowed:.1f} s: lease {lease_s} s, batch {batch_s:.1f} s, solo runs ahead {ahead_s:.1f} s)")
        assert end is not None
        ahead_s += end - start
    assert not late, "\n".join(late) + "\n" + pool.logs()

    [survivor] = [w for w in workers if w is not victim]
    assert survivor.proc.poll() is None, pool.logs()
    for spec in specs + fed:
        job = Job.fetch(spec.id, connection=pool.redis)
        assert job.get_status() == JobStatus.FINISHED, (spec.id, job.meta.get("error"), pool.logs())
        assert [r.type for r in job.results()] == [Result.Type.SUCCESSFUL], pool.logs()
        assert image_count(pool, spec) == spec.params.n
