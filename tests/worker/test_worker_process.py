"""Real worker processes (``python -m sdqueue worker``) on the tiny checkpoint: batching, isolation of a bad job,
cancel, SIGKILL recovery and SIGTERM. The workers live for the whole module (starting one costs seconds), so the
tests share one Redis database and each uses its own jobs.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from redis import Redis
from rq import Queue, Retry
from rq.job import Job, JobStatus
from rq.results import Result
from rq.worker import Worker

from core.jobs import GenerationParams, JobSpec
from core.jobstore import CancelOutcome, cancel_job, enqueue
from core.queues import JOB_FUNC, Keys
from core.rules import MAX_SEED
from tests.redis_server import RedisServer
from tests.worker.conftest import (
    Pool,
    image_count,
    logged_events,
    make_settings,
    max_pixel_diff,
    solo_images,
    status,
    stored_images,
    submit,
    wait_any_running,
    wait_running,
    wait_terminal,
)

# SIGKILL mid-batch -> every job succeeded, measured from the kill. Detection takes at most one lease (3 heartbeats
# of 1 s) plus one maintenance interval (1 s); the rest is running the batch again on the other worker.
RECOVERY_BOUND_S = 45


@pytest.fixture(scope="module")
def pool(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Iterator[Pool]:
    redis = Redis.from_url(redis_server.url)
    redis.flushall()
    workdir = tmp_path_factory.mktemp("workers")
    # A 200 ms window: jobs submitted one after another by a test all reach the first batch.
    settings = make_settings(redis_server.url, workdir / "data", tiny_checkpoint, batch_window_ms=200)
    pool = Pool(redis, settings, tiny_checkpoint, workdir)
    yield pool
    for worker in pool.workers:
        worker.stop()
    redis.flushall()
    redis.close()


def histogram(metrics: str, name: str) -> dict[str, float]:
    """Bucket counts (by ``le``) plus ``count`` of a Prometheus histogram in text format."""
    out = {}
    for line in metrics.splitlines():
        if line.startswith(f"{name}_bucket"):
            le = line.split('le="')[1].split('"')[0]
            out[le] = float(line.rsplit(" ", 1)[1])
        elif line.startswith(f"{name}_count"):
            out["count"] = float(line.rsplit(" ", 1)[1])
    return out


def test_jobs_of_four_kinds_run_in_batches_and_match_their_solo_images(pool: Pool, tiny_pipe: Any) -> None:
    [worker] = pool.exactly(1)
    kinds = [{"steps": 3}, {"steps": 4}, {"steps": 3, "sampler": "ddim"}, {"steps": 3, "width": 72}]
    specs = [submit(pool.redis, pool.settings, seed=100 + i, n=1 + i % 2, **kind)
             for kind in kinds for i in range(4)]

    wait_terminal(pool.redis, [s.id for s in specs], timeout=120)

    for spec in specs:
        job = Job.fetch(spec.id, connection=pool.redis)
        assert job.get_status() == JobStatus.FINISHED, pool.logs()
        result = job.return_value()
        assert [image["key"] for image in result["images"]] == [f"{spec.id}/{i}.png" for i in range(spec.params.n)]
        assert max_pixel_diff(stored_images(pool.settings.data_dir, spec.id), solo_images(tiny_pipe, spec)) <= 1
    sizes = histogram(worker.metrics(), "sdq_batch_size")
    assert sizes["count"] > sizes["1.0"], f"no pipeline call ran more than one image: {sizes}"
    assert sizes["count"] < len(specs)  # fewer pipeline calls than jobs


def test_jobs_the_model_cannot_run_fail_alone_and_their_batch_mates_succeed(pool: Pool) -> None:
    pool.exactly(1)
    good = [submit(pool.redis, pool.settings, seed=7 + i) for i in range(3)]
    # A seed the API would refuse, enqueued by hand: the pipeline's own check (core.rules) refuses it again.
    poisoned = JobSpec(id=uuid.uuid4().hex, params=GenerationParams(prompt="poison", width=64, height=64, steps=3),
                       seed=2**64, created_at=datetime.now(timezone.utc))
    enqueue(pool.redis, pool.settings, poisoned)
    unreadable = Queue(Keys().queue("normal"), connection=pool.redis).enqueue(
        JOB_FUNC, kwargs={"spec": {"id": "x", "params": {}}}, retry=Retry(max=3)
    )
    more = [submit(pool.redis, pool.settings, seed=20)]

    wait_terminal(pool.redis, [s.id for s in good + more] + [poisoned.id, unreadable.id], timeout=60)

    for spec in good + more:
        assert status(pool.redis, spec.id) == JobStatus.FINISHED, pool.logs()
        assert image_count(pool, spec) == 1
    job = Job.fetch(poisoned.id, connection=pool.redis)
    assert job.get_status() == JobStatus.FAILED
    assert job.meta["error"] == {"type": "ValueError", "message": f"seed must be between 0 and {MAX_SEED}, got {2**64}"}
    job = Job.fetch(unreadable.id, connection=pool.redis)
    assert job.get_status() == JobStatus.FAILED
    assert job.meta["error"]["type"] == "ValidationError"
    assert job.retries_left == 3  # a job's own error is not retried
    assert not any("running them one by one" in w.log() for w in pool.workers)  # refused before the batch ran


def test_cancel_a_queued_job_and_a_running_one_inside_a_batch(pool: Pool, tiny_pipe: Any) -> None:
    pool.exactly(1)
    a, b, c = (submit(pool.redis, pool.settings, steps=40, seed=30 + i) for i in range(3))
    queued = submit(pool.redis, pool.settings, steps=41)  # incompatible: waits behind the batch
    keys = Keys()

    assert len(wait_running(pool, [a, b, c])) == 1  # one batch
    assert cancel_job(pool.redis, keys, queued.id) == CancelOutcome.canceled
    assert cancel_job(pool.redis, keys, b.id) == CancelOutcome.requested
    wait_terminal(pool.redis, [a.id, b.id, c.id, queued.id], timeout=60)

    for spec in (a, c):
        assert status(pool.redis, spec.id) == JobStatus.FINISHED
        assert max_pixel_diff(stored_images(pool.settings.data_dir, spec.id), solo_images(tiny_pipe, spec)) <= 1
    canceled = Job.fetch(b.id, connection=pool.redis)
    assert canceled.get_status() == JobStatus.CANCELED
    assert canceled.results() == [] and image_count(pool, b) == 0
    never_ran = Job.fetch(queued.id, connection=pool.redis)
    assert never_ran.get_status() == JobStatus.CANCELED
    assert never_ran.started_at is None and never_ran.results() == []
    assert not pool.redis.sismember(keys.cancel_requests(), b.id)

    events = logged_events(pool.redis, a.id) + logged_events(pool.redis, b.id)
    names = {job_id: [e["event"] for e in events if e["job_id"] == job_id] for job_id in (a.id, b.id)}
    assert names[a.id][0] == "running" and names[a.id][-1] == "succeeded" and "progress" in names[a.id]
    last_progress = [e["data"] for e in events if e["job_id"] == a.id and e["event"] == "progress"][-1]
    assert last_progress["step"] == last_progress["total"] == 40 and last_progress["percent"] == 100.0
    assert names[b.id][-1] == "canceled"
    progress_times = [e["at"] for e in events if e["job_id"] == a.id and e["event"] == "progress"]
    # Throttled to one per 0.25 s (plus the last step), however fast the steps are.
    assert len(progress_times) <= (progress_times[-1] - progress_times[0]) / 0.25 + 2


def test_sigkill_mid_batch_every_job_succeeds_exactly_once_on_the_other_worker(pool: Pool) -> None:
    pool.exactly(2)
    specs = [submit(pool.redis, pool.settings, steps=30, seed=50 + i) for i in range(4)]
    # Both idle workers may take jobs first (and one may end a lone job early); the victim is one running now.
    running = wait_any_running(pool, specs)
    victim = pool.by_name(sorted(set(running.values()))[0])

    victim.signal(signal.SIGKILL)
    killed_at = time.monotonic()
    victim.proc.wait(10)
    ended_before = {s.id for s in specs if Job.fetch(s.id, connection=pool.redis).get_status() == JobStatus.FINISHED}
    elapsed = wait_terminal(pool.redis, [s.id for s in specs], timeout=RECOVERY_BOUND_S)

    survivor = pool.alive()[0]
    killed_jobs = [job_id for job_id, worker in running.items() if worker == victim.name]
    assert killed_jobs and not set(killed_jobs) & ended_before
    for spec in specs:
        job = Job.fetch(spec.id, connection=pool.redis)
        assert job.get_status() == JobStatus.FINISHED, pool.logs()
        if spec.id not in ended_before:  # every job still open at the kill ends on the survivor, the killed ones too
            assert job.worker_name == survivor.name
        assert [r.type for r in job.results()] == [Result.Type.SUCCESSFUL]  # one result: it ended once
        assert image_count(pool, spec) == 1
    assert elapsed < RECOVERY_BOUND_S
    # The dead worker's registration lapsed too, so /readyz counts only live workers.
    assert victim.name not in {w.name for w in Worker.all(connection=pool.redis)}
    print(f"recovered {len(specs)} jobs {time.monotonic() - killed_at:.1f} s after SIGKILL")


def test_sigterm_finishes_the_running_batch_then_exits_0(pool: Pool) -> None:
    [worker] = pool.exactly(1)
    specs = [submit(pool.redis, pool.settings, steps=40, seed=60 + i) for i in range(3)]
    wait_running(pool, specs)
    later = submit(pool.redis, pool.settings, steps=41)  # incompatible: it must still be queued afterwards

    worker.signal(signal.SIGTERM)
    assert worker.proc.wait(60) == 0, worker.log()

    for spec in specs:
        assert status(pool.redis, spec.id) == JobStatus.FINISHED, worker.log()
        assert image_count(pool, spec) == 1
    assert status(pool.redis, later.id) == JobStatus.QUEUED
    assert later.id in Queue(Keys().queue("normal"), connection=pool.redis).job_ids
