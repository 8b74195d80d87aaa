"""Regression tests of the per-job RQ bookkeeping against real Redis and RQ (it relies on RQ internals).

No model here: the jobs are ordinary sdqueue jobs as the API enqueues them, taken off the queue by the batcher and
driven through start / heartbeat / finalize by hand, with a stock ``rq.SimpleWorker`` as the worker record.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.registry import CanceledJobRegistry, FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry
from rq.results import Result
from rq.worker import SimpleWorker

from core.jobstore import get_job
from core.queues import Keys
from core.settings import Settings
from core.storage import LocalStorage
from tests.worker.conftest import logged_events, make_settings, submit
from worker.batcher import Batcher, Claim
from worker.heartbeat import Heartbeat
from worker.rq_records import Bookkeeper, RunningJob

LEASE_S = 3


@pytest.fixture
def settings(redis_url: str, tmp_path: Path) -> Settings:
    return make_settings(redis_url, tmp_path)


@pytest.fixture
def rq_worker(redis: Redis, keys: Keys) -> Iterator[SimpleWorker]:
    worker = SimpleWorker(keys.queues(), connection=redis)
    worker.register_birth()
    yield worker
    worker.register_death()


@pytest.fixture
def books(rq_worker: SimpleWorker, keys: Keys) -> Bookkeeper:
    return Bookkeeper(rq_worker, keys, lease_s=LEASE_S)


def claim_all(redis: Redis, keys: Keys) -> list[Claim]:
    """Take every waiting job off the normal queue, as the batcher does for one batch."""
    queue = Queue(keys.queue("normal"), connection=redis)
    batcher = Batcher(redis, [queue], max_images=64, window_s=0)
    result = Queue.dequeue_any([queue], None, connection=redis)
    assert result is not None
    job, _ = result
    assert batcher.take_head(job, queue)
    return batcher.collect(Claim(job, queue), should_stop=lambda: False)


def registry_score(redis: Redis, run: RunningJob) -> float:
    score = redis.zscore(run.queue.started_job_registry.key, run.execution.composite_key)
    assert score is not None, f"job {run.id} is not in the StartedJobRegistry"
    return float(score)


def test_start_registers_every_job_of_the_batch(redis: Redis, keys: Keys, settings: Settings,
                                                books: Bookkeeper, rq_worker: SimpleWorker) -> None:
    specs = [submit(redis, settings) for _ in range(3)]
    claims = claim_all(redis, keys)
    assert [c.job.id for c in claims] == [s.id for s in specs]

    runs = books.start(claims, batch_images=3)

    registry = StartedJobRegistry(keys.queue("normal"), connection=redis)
    assert sorted(registry.get_job_ids(cleanup=False)) == sorted(s.id for s in specs)
    for run in runs:
        job = Job.fetch(run.id, connection=redis)
        assert job.get_status() == JobStatus.STARTED
        assert job.worker_name == rq_worker.name
        assert job.started_at is not None
        assert "started_at" in job.meta
        assert time.time() + LEASE_S - 2 < registry_score(redis, run) <= time.time() + LEASE_S + 1
    assert redis.llen(Queue(keys.queue("normal"), connection=redis).key) == 0
    assert redis.llen(Queue(keys.queue("normal"), connection=redis).intermediate_queue_key) == 0
    events = [event for s in specs for event in logged_events(redis, s.id, keys)]
    assert sorted(e["job_id"] for e in events) == sorted(s.id for s in specs)
    assert {e["event"] for e in events} == {"running"}
    assert all(e["data"]["batch_images"] == 3 for e in events)


def test_heartbeat_keeps_a_long_batch_while_an_unbeaten_job_is_recovered(
    redis: Redis, keys: Keys, settings: Settings, books: Bookkeeper
) -> None:
    submit(redis, settings)
    submit(redis, settings)
    alive, forgotten = books.start(claim_all(redis, keys), batch_images=2)
    first_score = registry_score(redis, alive)

    with Heartbeat(books, interval_s=1) as heartbeat:
        heartbeat.track([alive])  # `forgotten` gets no heartbeat, as if its worker had died
        time.sleep(LEASE_S + 1.5)  # longer than one lease
        StartedJobRegistry(keys.queue("normal"), connection=redis).cleanup()  # RQ's abandoned-job recovery

        assert registry_score(redis, alive) > first_score + 2
        assert Job.fetch(alive.id, connection=redis).get_status() == JobStatus.STARTED
        lost = Job.fetch(forgotten.id, connection=redis)
        assert lost.get_status() == JobStatus.QUEUED  # re-enqueued by RQ's Retry
        assert lost.retries_left == settings.job_retries - 1
        assert Queue(keys.queue("normal"), connection=redis).job_ids == [forgotten.id]
        assert books.renew_lease(alive)
        assert not books.renew_lease(forgotten)  # its outcome here would be dropped: it runs again elsewhere


def test_each_job_is_finalized_on_its_own(redis: Redis, keys: Keys, settings: Settings, books: Bookkeeper,
                                         rq_worker: SimpleWorker) -> None:
    specs = [submit(redis, settings) for _ in range(4)]
    ok, bad, canceled, stopped = books.start(claim_all(redis, keys), batch_images=4)
    result = {"images": [{"key": f"{ok.id}/0.png", "seed": 1, "width": 64, "height": 64,
                          "content_type": "image/png"}], "warnings": ["prompt truncated to 77 CLIP tokens"],
              "timings": {"run_seconds": 0.5}}
    try:
        raise ValueError("width must be a multiple of 8, got 513")
    except ValueError as exc:
        exc_info = (ValueError, exc, exc.__traceback__)

    books.succeed(ok, result)
    books.fail(bad, exc_info)
    books.cancel(canceled)
    books.stop(stopped)

    name = keys.queue("normal")
    job = Job.fetch(ok.id, connection=redis)
    assert job.get_status() == JobStatus.FINISHED
    assert job.return_value() == result
    assert [r.type for r in job.results()] == [Result.Type.SUCCESSFUL]
    assert job.meta["warnings"] == result["warnings"]
    assert ok.id in FinishedJobRegistry(name, connection=redis)

    job = Job.fetch(bad.id, connection=redis)
    assert job.get_status() == JobStatus.FAILED
    assert job.meta["error"] == {"type": "ValueError", "message": "width must be a multiple of 8, got 513"}
    latest = job.latest_result()
    assert latest is not None and latest.type == Result.Type.FAILED
    assert "width must be a multiple of 8" in (latest.exc_string or "")
    assert bad.id in FailedJobRegistry(name, connection=redis)
    assert job.retries_left == settings.job_retries  # a job's own error is final: Retry is for dead workers
    assert bad.id not in Queue(name, connection=redis).job_ids

    job = Job.fetch(canceled.id, connection=redis)
    assert job.get_status() == JobStatus.CANCELED
    assert job.results() == []
    assert job.started_at is not None and job.ended_at is not None and job.ended_at >= job.started_at
    assert canceled.id in CanceledJobRegistry(name, connection=redis)

    job = Job.fetch(stopped.id, connection=redis)
    assert job.get_status() == JobStatus.STOPPED
    assert stopped.id in FailedJobRegistry(name, connection=redis)

    assert StartedJobRegistry(name, connection=redis).get_job_ids(cleanup=False) == []
    for run in (ok, bad, canceled, stopped):
        assert not redis.exists(run.execution.key)
    rq_worker.refresh()
    assert (rq_worker.successful_job_count, rq_worker.failed_job_count) == (1, 2)
    assert {s.id for s in specs} == {ok.id, bad.id, canceled.id, stopped.id}


def test_cancel_request_is_forgotten_when_the_job_ends(redis: Redis, keys: Keys, settings: Settings,
                                                       books: Bookkeeper) -> None:
    submit(redis, settings)
    [run] = books.start(claim_all(redis, keys), batch_images=1)
    redis.sadd(keys.cancel_requests(), run.id)
    assert books.cancel(run)
    assert not redis.sismember(keys.cancel_requests(), run.id)
    assert logged_events(redis, run.id, keys)[-1]["event"] == "canceled"


def test_a_worker_whose_lease_lapses_while_it_records_a_success_records_nothing(
        redis: Redis, redis_url: str, keys: Keys, settings: Settings, books: Bookkeeper,
        monkeypatch: pytest.MonkeyPatch) -> None:
    submit(redis, settings)
    [run] = books.start(claim_all(redis, keys), batch_images=1)
    result = {"images": [], "warnings": [], "timings": {"run_seconds": 0.5}}
    handle_success = Job._handle_success
    other = Redis.from_url(redis_url)

    def stall_then_record(job: Job, *args: object, **kwargs: object) -> None:
        # The worker stalls for longer than its lease after its check, before its record lands: meanwhile another
        # worker's registry cleanup hands the job to a new run (RQ's Retry).
        other.zadd(run.queue.started_job_registry.key, {run.execution.composite_key: 1}, xx=True)
        StartedJobRegistry(keys.queue("normal"), connection=other).cleanup()
        monkeypatch.setattr(Job, "_handle_success", handle_success)
        handle_success(job, *args, **kwargs)

    monkeypatch.setattr(Job, "_handle_success", stall_then_record)
    assert books.renew_lease(run)  # the check: still ours
    recorded = books.succeed(run, result)
    other.close()

    job = Job.fetch(run.id, connection=redis)
    assert job.get_status() == JobStatus.QUEUED, "a success landed after the job was handed to another run"
    assert job.results() == []
    assert Queue(keys.queue("normal"), connection=redis).job_ids == [run.id]
    assert recorded is False


def test_a_job_shows_how_many_times_a_worker_started_it(redis: Redis, keys: Keys, settings: Settings,
                                                        books: Bookkeeper, tmp_path: Path) -> None:
    spec = submit(redis, settings)
    storage = LocalStorage(tmp_path / "images", "http://test")

    def attempts() -> int:
        view = get_job(redis, keys, storage, spec.id)
        assert view is not None
        return view.attempts

    assert attempts() == 0
    [run] = books.start(claim_all(redis, keys), batch_images=1)
    assert attempts() == 1
    assert books.succeed(run, {"images": [], "warnings": [], "timings": {"run_seconds": 0.1}})
    assert attempts() == 1
