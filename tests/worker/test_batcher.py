"""The batcher against real Redis and RQ: which waiting jobs join the head job's batch, and which stay queued."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from redis import Redis
from rq.job import Job, JobStatus
from rq.queue import Queue

from core.jobs import JobSpec
from core.jobstore import cancel_job
from core.queues import Keys
from core.settings import Settings
from tests.worker.conftest import make_settings, submit
from worker.batcher import Batcher, Claim


@pytest.fixture
def settings(redis_url: str, tmp_path: Path) -> Settings:
    return make_settings(redis_url, tmp_path)


def queues(redis: Redis, keys: Keys) -> list[Queue]:
    return [Queue(name, connection=redis) for name in keys.queues()]


def next_batch(redis: Redis, keys: Keys, max_images: int = 8, window_s: float = 0.0) -> list[str]:
    """Dequeue the head job as the worker does (RQ, priority order) and collect its batch; returns job ids."""
    qs = queues(redis, keys)
    result = Queue.dequeue_any(qs, None, connection=redis)
    assert result is not None
    job, queue = result
    batcher = Batcher(redis, qs, max_images=max_images, window_s=window_s)
    assert batcher.take_head(job, queue)
    return [c.job.id for c in batcher.collect(Claim(job, queue), should_stop=lambda: False)]


def waiting(redis: Redis, keys: Keys, priority: str = "normal") -> list[str]:
    return Queue(keys.queue(priority), connection=redis).job_ids


def test_compatible_jobs_join_up_to_max_images_and_the_rest_keep_their_order(
    redis: Redis, keys: Keys, settings: Settings
) -> None:
    head = submit(redis, settings, n=2)
    other_size = submit(redis, settings, width=72)
    four = submit(redis, settings, n=4)
    too_big = submit(redis, settings, n=4)  # 2 + 4 + 4 > 8: waits for the next batch
    other_steps = submit(redis, settings, steps=4)
    one = submit(redis, settings, n=1)

    assert next_batch(redis, keys) == [head.id, four.id, one.id]
    assert waiting(redis, keys) == [other_size.id, too_big.id, other_steps.id]
    # Claimed but not yet started: on RQ's intermediate list, where RQ's cleanup finds them if the worker dies.
    intermediate = Queue(keys.queue("normal"), connection=redis).intermediate_queue_key
    assert [i.decode() for i in redis.lrange(intermediate, 0, -1)] == [head.id, four.id, one.id]
    for spec in (head, four, one):
        assert Job.fetch(spec.id, connection=redis).get_status() == JobStatus.STARTED  # claimed, not yet run


def test_head_comes_from_the_highest_priority_and_lower_priorities_fill_the_batch(
    redis: Redis, keys: Keys, settings: Settings
) -> None:
    low = submit(redis, settings, priority="low")
    normal_other = submit(redis, settings, sampler="ddim")
    high = submit(redis, settings, priority="high")

    assert next_batch(redis, keys) == [high.id, low.id]
    assert waiting(redis, keys) == [normal_other.id]
    assert waiting(redis, keys, "low") == []


def test_canceled_and_stale_entries_are_never_claimed(redis: Redis, keys: Keys, settings: Settings) -> None:
    head = submit(redis, settings)
    canceled = submit(redis, settings)
    running_elsewhere = submit(redis, settings)
    fine = submit(redis, settings)
    assert cancel_job(redis, keys, canceled.id) is not None
    normal = Queue(keys.queue("normal"), connection=redis)
    # A duplicate id of a job that some worker already runs (what two racing registry cleanups could leave).
    Job.fetch(running_elsewhere.id, connection=redis).set_status(JobStatus.STARTED)

    assert next_batch(redis, keys) == [head.id, fine.id]
    assert normal.job_ids == []  # the stale entry was dropped, not run
    assert Job.fetch(canceled.id, connection=redis).get_status() == JobStatus.CANCELED


def test_a_popped_head_that_was_canceled_meanwhile_is_not_taken(redis: Redis, keys: Keys, settings: Settings) -> None:
    spec = submit(redis, settings)
    qs = queues(redis, keys)
    result = Queue.dequeue_any(qs, None, connection=redis)
    assert result is not None
    Job.fetch(spec.id, connection=redis).cancel()
    assert not Batcher(redis, qs, max_images=8, window_s=0).take_head(*result)


def test_two_batchers_never_claim_the_same_job(redis: Redis, keys: Keys, settings: Settings) -> None:
    specs = [submit(redis, settings) for _ in range(40)]
    taken: list[list[str]] = [[], []]

    def drain(out: list[str]) -> None:
        qs = queues(redis, keys)
        batcher = Batcher(redis, qs, max_images=4, window_s=0)
        while (result := Queue.dequeue_any(qs, None, connection=redis)) is not None:
            job, queue = result
            if batcher.take_head(job, queue):
                out += [c.job.id for c in batcher.collect(Claim(job, queue), should_stop=lambda: False)]

    threads = [threading.Thread(target=drain, args=(out,)) for out in taken]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not set(taken[0]) & set(taken[1])
    assert sorted(taken[0] + taken[1]) == sorted(s.id for s in specs)


def test_the_window_waits_for_jobs_that_arrive_late(redis: Redis, keys: Keys, settings: Settings) -> None:
    head = submit(redis, settings)
    late: list[JobSpec] = []
    timer = threading.Timer(0.1, lambda: late.append(submit(redis, settings)))
    timer.start()
    started = time.monotonic()
    batch = next_batch(redis, keys, window_s=1.0, max_images=2)
    timer.join()
    assert batch == [head.id, late[0].id]
    assert time.monotonic() - started < 0.9  # a full batch does not wait out the window

    alone = submit(redis, settings)
    timer = threading.Timer(0.2, lambda: late.append(submit(redis, settings)))
    timer.start()
    assert next_batch(redis, keys, window_s=0.0) == [alone.id]  # no window: what is there now, nothing more
    timer.join()
    assert waiting(redis, keys) == [late[1].id]
