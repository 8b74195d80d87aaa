"""A job's end is one transaction: its final record, its terminal event and its completed webhook land together or
not at all, whether the worker finalizes it (success, failure, cancel, stop) or RQ's registry cleanup fails it after
its last worker died; and a worker whose lease lapsed records nothing.

Real Redis and RQ, no model: jobs as the API enqueues them, started by the Bookkeeper and finalized by the Finalizer,
as a batch worker does. Crashes are injected into redis-py: a process killed right after an EXEC reached Redis, and a
connection that dies before the EXEC's reply comes back.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from redis import Redis
from redis.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.registry import StartedJobRegistry

from core.imagefile import ModelInfo
from core.jobs import JobSpec
from core.jobview import get_job
from core.queues import Keys
from core.settings import Settings
from core.storage import LocalStorage
from core.webhook_queue import WebhookNotifier
from model.requests import GenerationResult
from tests.worker.conftest import logged_events, make_settings, submit
from worker.batcher import Batcher, Claim
from worker.finalizer import Finalizer
from worker.heartbeat import Heartbeat
from worker.metrics import WorkerMetrics
from worker.rq_adapter import RQWorker
from worker.rq_records import Bookkeeper, RunningJob
from worker.runner import Done, Dropped, Error, Outcome

HEARTBEAT_S = 1
HOOK = "https://93.184.216.34/hook"  # a public address: accepted at submit; nothing is sent in these tests
RQ_TERMINAL = {JobStatus.FINISHED, JobStatus.FAILED, JobStatus.CANCELED, JobStatus.STOPPED}
# outcome -> (its RQ status, its terminal event, the job's public status)
ENDS = {
    "succeeded": (JobStatus.FINISHED, "succeeded", "succeeded"),
    "failed": (JobStatus.FAILED, "failed", "failed"),
    "canceled": (JobStatus.CANCELED, "canceled", "canceled"),
    "stopped": (JobStatus.STOPPED, "canceled", "canceled"),
}


class Killed(BaseException):
    """The worker process dies here (SIGKILL): nothing after this point runs."""


@pytest.fixture
def settings(redis_url: str, tmp_path: Path) -> Settings:
    return make_settings(redis_url, tmp_path, job_retries=0)


@pytest.fixture
def storage(settings: Settings) -> LocalStorage:
    return LocalStorage(settings.data_dir / "images", settings.public_url)


@pytest.fixture
def worker(redis: Redis, keys: Keys) -> Iterator[RQWorker]:
    w = RQWorker(keys.queues(), connection=redis, heartbeat_s=HEARTBEAT_S)
    w.register_birth()
    yield w
    w.register_death()


@pytest.fixture
def books(worker: RQWorker, keys: Keys, redis: Redis, settings: Settings, storage: LocalStorage) -> Bookkeeper:
    return Bookkeeper(worker, keys, lease_s=3 * HEARTBEAT_S, webhooks=WebhookNotifier(redis, settings, storage))


@pytest.fixture
def finalizer(books: Bookkeeper, storage: LocalStorage) -> Finalizer:
    return Finalizer(books, storage, ModelInfo("tiny"), WorkerMetrics(), wait_cap_s=0.05)


def start_one(redis: Redis, keys: Keys, settings: Settings, books: Bookkeeper) -> tuple[JobSpec, RunningJob]:
    """A job that asked for every webhook event, taken off its queue and started, as a batch worker does."""
    spec = submit(redis, settings, webhook=HOOK, webhook_events_filter=["start", "progress", "completed"])
    queue = Queue(keys.queue("normal"), connection=redis)
    result = Queue.dequeue_any([queue], None, connection=redis)
    assert result is not None
    job, _ = result
    assert Batcher(redis, [queue], max_images=8, window_s=0).take_head(job, queue)
    [run] = books.start([Claim(job, queue)], batch_images=1)
    return spec, run


def outcome_of(name: str) -> Outcome:
    if name == "succeeded":
        return Done(GenerationResult(images=[Image.new("RGB", (64, 64), (90, 120, 150))], seeds=[1]), 0.1)
    if name == "failed":
        try:
            raise ValueError("the mask is empty")
        except ValueError as exc:
            return Error((ValueError, exc, exc.__traceback__))
    return Dropped("canceled" if name == "canceled" else "stopped")


def finalize(finalizer: Finalizer, books: Bookkeeper, run: RunningJob, spec: JobSpec, name: str) -> None:
    with Heartbeat(books, HEARTBEAT_S) as heartbeat:
        heartbeat.track([run])
        finalizer.finalize(heartbeat, run, spec, outcome_of(name))


def terminal_events(redis: Redis, keys: Keys, job_id: str) -> list[str]:
    return [e["event"] for e in logged_events(redis, job_id, keys) if e["event"] in ("succeeded", "failed", "canceled")]


def completed_deliveries(redis: Redis, keys: Keys, job_id: str) -> list[dict[str, Any]]:
    """The kwargs of the completed webhook deliveries queued for ``job_id``."""
    kwargs = [Job.fetch(i, connection=redis).kwargs for i in Queue(keys.webhooks(), connection=redis).job_ids]
    return [k for k in kwargs if k["job_id"] == job_id and k["event"] == "completed"]


def rq_status(redis: Redis, job_id: str) -> JobStatus:
    return Job.fetch(job_id, connection=redis).get_status()


def assert_ended_once_with_outbox(redis: Redis, keys: Keys, storage: LocalStorage, job_id: str, name: str) -> None:
    """The job ended as ``name`` with one result at most, one terminal event, and one completed webhook whose body
    is what GET /v1/jobs/{id} answers now."""
    status, event, public = ENDS[name]
    assert rq_status(redis, job_id) == status
    assert len(Job.fetch(job_id, connection=redis).results()) == (0 if name == "canceled" else 1)
    assert terminal_events(redis, keys, job_id) == [event]
    [delivery] = completed_deliveries(redis, keys, job_id)
    view = get_job(redis, keys, storage, job_id)
    assert view is not None and view.status.value == public
    assert delivery["payload"] == view.model_dump(mode="json")
    assert not redis.sismember(keys.cancel_requests(), job_id)


def after_exec(monkeypatch: pytest.MonkeyPatch, redis: Redis, job_id: str,
               then: Callable[[Pipeline, bool], None]) -> None:
    """Run ``then`` once, right after the first transaction (of this thread: not the heartbeat's) that gave
    ``job_id`` a final status reached Redis; ``then`` gets the pipeline and whether it was WATCHing."""
    execute_transaction = Pipeline._execute_transaction  # type: ignore[attr-defined]
    thread = threading.get_ident()
    fired = False

    def execute_then(pipe: Pipeline, *args: Any, **kwargs: Any) -> Any:
        nonlocal fired
        watching = pipe.watching
        response = execute_transaction(pipe, *args, **kwargs)
        if not fired and threading.get_ident() == thread and rq_status(redis, job_id) in RQ_TERMINAL:
            fired = True
            then(pipe, watching)
        return response

    monkeypatch.setattr(Pipeline, "_execute_transaction", execute_then)


@pytest.mark.parametrize("name", list(ENDS))
def test_a_worker_killed_right_after_its_record_leaves_the_event_and_webhook_with_it(
        redis: Redis, keys: Keys, settings: Settings, storage: LocalStorage, books: Bookkeeper,
        finalizer: Finalizer, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    spec, run = start_one(redis, keys, settings, books)
    if name == "canceled":
        redis.sadd(keys.cancel_requests(), run.id)

    def die(pipe: Pipeline, watching: bool) -> None:
        raise Killed

    after_exec(monkeypatch, redis, run.id, die)
    with pytest.raises(Killed):
        finalize(finalizer, books, run, spec, name)

    assert_ended_once_with_outbox(redis, keys, storage, run.id, name)


@pytest.mark.parametrize("name", list(ENDS))
def test_a_record_whose_reply_was_lost_is_written_once_with_one_event_and_one_webhook(
        redis: Redis, keys: Keys, settings: Settings, storage: LocalStorage, books: Bookkeeper,
        finalizer: Finalizer, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    spec, run = start_one(redis, keys, settings, books)

    def connection_dies(pipe: Pipeline, watching: bool) -> None:
        # The EXEC ran on the server and its reply is lost: to redis-py the transaction is still the WATCHed one
        # it sent (it stops watching only once it has read the reply).
        pipe.watching = watching
        raise RedisConnectionError("Connection closed by server.")

    after_exec(monkeypatch, redis, run.id, connection_dies)
    finalize(finalizer, books, run, spec, name)

    assert_ended_once_with_outbox(redis, keys, storage, run.id, name)
    label = "succeeded" if name == "succeeded" else name
    assert finalizer.metrics.jobs.labels(label)._value.get() == 1
    assert finalizer.metrics.jobs.labels("lost")._value.get() == 0


@pytest.mark.parametrize("name", ["failed", "canceled", "stopped"])
def test_a_worker_whose_lease_lapses_while_it_records_a_failure_cancel_or_stop_records_nothing(
        redis: Redis, redis_url: str, keys: Keys, settings: Settings, books: Bookkeeper, finalizer: Finalizer,
        monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    settings = make_settings(redis_url, settings.data_dir, job_retries=1)
    spec = submit(redis, settings, webhook=HOOK)
    queue = Queue(keys.queue("normal"), connection=redis)
    result = Queue.dequeue_any([queue], None, connection=redis)
    assert result is not None and Batcher(redis, [queue], max_images=8, window_s=0).take_head(result[0], queue)
    [run] = books.start([Claim(result[0], queue)], batch_images=1)
    other = Redis.from_url(redis_url)

    def stall_then_hand_over(method: str) -> None:
        original = getattr(Job, method)

        def hand_over_then_record(job: Job, *args: Any, **kwargs: Any) -> Any:
            # The worker stalls for longer than its lease after its check, before its record lands: meanwhile
            # another worker's registry cleanup hands the job to a new run (RQ's Retry).
            monkeypatch.setattr(Job, method, original)
            other.zadd(run.queue.started_job_registry.key, {run.execution.composite_key: 1}, xx=True)
            StartedJobRegistry(keys.queue("normal"), connection=other).cleanup()
            return original(job, *args, **kwargs)

        monkeypatch.setattr(Job, method, hand_over_then_record)

    stall_then_hand_over("cancel" if name == "canceled" else "_handle_failure")
    finalize(finalizer, books, run, spec, name)
    other.close()

    job = Job.fetch(run.id, connection=redis)
    assert job.get_status() == JobStatus.QUEUED, f"a {name} record landed after the job was handed to another run"
    assert job.results() == []
    assert queue.job_ids == [run.id]
    assert terminal_events(redis, keys, run.id) == []
    assert completed_deliveries(redis, keys, run.id) == []
    assert finalizer.metrics.jobs.labels("lost")._value.get() == 1


def test_a_job_failed_by_the_registry_cleanup_gets_its_failed_event_and_webhook_once(
        redis: Redis, keys: Keys, settings: Settings, storage: LocalStorage, books: Bookkeeper,
        worker: RQWorker, monkeypatch: pytest.MonkeyPatch) -> None:
    _, run = start_one(redis, keys, settings, books)  # no retry left (SDQ_JOB_RETRIES=0): its worker dies now
    redis.zadd(run.queue.started_job_registry.key, {run.execution.composite_key: 1}, xx=True)  # the lease expired
    monkeypatch.setattr(worker.redis_link, "steady_for", lambda: float("inf"))  # no outage just ended

    worker.clean_registries()
    worker.clean_registries()  # the next cleanup finds nothing left to do

    assert_ended_once_with_outbox(redis, keys, storage, run.id, "failed")
    view = get_job(redis, keys, storage, run.id)
    assert view is not None and view.error is not None
    assert (view.error.type, view.error.message) == ("WorkerError", "the worker died once while running this job")
    assert run.id not in StartedJobRegistry(keys.queue("normal"), connection=redis).get_job_ids(cleanup=False)


def test_the_registry_cleanup_keeps_a_job_whose_lease_was_renewed_and_retries_one_with_retries_left(
        redis: Redis, redis_url: str, keys: Keys, settings: Settings, books: Bookkeeper, worker: RQWorker,
        monkeypatch: pytest.MonkeyPatch) -> None:
    settings = make_settings(redis_url, settings.data_dir, job_retries=1)
    kept = submit(redis, settings)
    retried = submit(redis, settings)
    queue = Queue(keys.queue("normal"), connection=redis)
    claims = []
    for _ in range(2):
        result = Queue.dequeue_any([queue], None, connection=redis)
        assert result is not None and Batcher(redis, [queue], max_images=8, window_s=0).take_head(result[0], queue)
        claims.append(Claim(result[0], queue))
    runs = {run.id: run for run in books.start(claims, batch_images=2)}
    registry = StartedJobRegistry(keys.queue("normal"), connection=redis)
    for run in runs.values():
        redis.zadd(registry.key, {run.execution.composite_key: 1}, xx=True)
    zscore = Pipeline.zscore
    renewals = 0

    def renewed_meanwhile(pipe: Pipeline, key: str, member: Any) -> Any:
        # The worker running `kept` renews its lease right after the cleanup read it expired, before its EXEC.
        nonlocal renewals
        score = zscore(pipe, key, member)
        if runs[kept.id].execution.composite_key.encode() == member and not renewals:
            renewals += 1
            assert books.renew_lease(runs[kept.id])
        return score

    monkeypatch.setattr(Pipeline, "zscore", renewed_meanwhile)
    monkeypatch.setattr(worker.redis_link, "steady_for", lambda: float("inf"))
    worker.clean_registries()

    assert renewals == 1
    assert rq_status(redis, kept.id) == JobStatus.STARTED
    assert kept.id in registry.get_job_ids(cleanup=False)
    assert rq_status(redis, retried.id) == JobStatus.QUEUED
    assert queue.job_ids == [retried.id]
    assert Job.fetch(retried.id, connection=redis).retries_left == 0
    assert terminal_events(redis, keys, retried.id) == []
