"""The enqueue side of the api<->worker contract: what a worker finds on the queue."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from redis import Redis
from redis.client import Pipeline
from redis.exceptions import ConnectionError, WatchError
from rq import Queue
from rq.job import Job, JobStatus
from rq.registry import CanceledJobRegistry, ScheduledJobRegistry

from core import commit, eventlog, jobstore
from core.jobs import JobSpec, Priority, Txt2ImgRequest
from core.queues import JOB_FUNC, Keys
from core.settings import load_settings
from core.storage.local import LocalStorage
from core.webhook_queue import WebhookNotifier


def test_enqueue_records_the_spec_retry_timeout_and_ttls(redis_url: str, tmp_path: Path) -> None:
    settings = load_settings(redis_url=redis_url, data_dir=tmp_path, job_retries=2, job_timeout_s=60,
                             result_ttl_s=3600)
    redis = Redis.from_url(redis_url)
    spec = jobstore.new_job_spec(Txt2ImgRequest(prompt="a cat", width=64, height=64, seed=None, priority=Priority.low))

    jobstore.enqueue(redis, settings, spec)

    assert Queue("sdq-low", connection=redis).job_ids == [spec.id]
    job = Job.fetch(spec.id, connection=redis)
    assert job.func_name == JOB_FUNC
    assert JobSpec.model_validate(job.kwargs["spec"]).model_dump() == spec.model_dump()
    assert (job.retries_left, job.timeout, job.result_ttl, job.failure_ttl) == (2, 60, 3600, 3600)
    assert job.meta["batch_key"] == spec.batch_key() == "txt2img:64x64:euler_a:0:30"
    assert 0 <= spec.seed < 2**32 and spec.seeds() == [spec.seed]


def test_image_seeds_are_seed_plus_i_unwrapped_as_the_pipeline_seeds_its_generators(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The seeds a job reports are the ones its images' generators were seeded with, also past 2^32 - 1."""
    import model.pipeline
    from model.batch import Batch
    from model.requests import GenerationRequest
    from model.weights import save_random_checkpoint, tiny_configs

    spec = jobstore.new_job_spec(Txt2ImgRequest(prompt="a", seed=2**32 - 1, n=3))
    assert spec.seed == 2**32 - 1
    assert spec.seeds() == [2**32 - 1, 2**32, 2**32 + 1]

    generator_seeds: list[list[int]] = []

    class RecordingBatch(Batch):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            generator_seeds.append([g.initial_seed() for g in self.generators])

    monkeypatch.setattr(model.pipeline, "Batch", RecordingBatch)
    checkpoint = tmp_path / "tiny.safetensors"
    save_random_checkpoint(checkpoint, *tiny_configs())
    pipe = model.pipeline.Pipeline.load(checkpoint, device="cpu", dtype="float32")
    request = GenerationRequest(prompt="a", width=64, height=64, steps=1, seed=spec.seed, n=spec.params.n)
    [result] = pipe.generate([request])

    assert generator_seeds == [spec.seeds()]
    assert result is not None and result.seeds == spec.seeds()


def test_queue_depths_and_jobs_ahead(redis_url: str, tmp_path: Path) -> None:
    settings = load_settings(redis_url=redis_url, data_dir=tmp_path)
    redis = Redis.from_url(redis_url)
    for priority in (Priority.high, Priority.normal, Priority.normal, Priority.low):
        jobstore.enqueue(redis, settings, jobstore.new_job_spec(Txt2ImgRequest(prompt="a", priority=priority)))

    depths = jobstore.queue_depths(redis, Keys())

    assert depths == {Priority.high: 1, Priority.normal: 2, Priority.low: 1}
    assert [jobstore.jobs_ahead(depths, p) for p in Priority] == [1, 3, 4]


class Killed(BaseException):
    """The process died here: nothing after it runs, and nothing catches it as an error."""


@contextmanager
def dies_after(round_trips: int) -> Iterator[None]:
    """Every Redis client in this process dies right after its `round_trips`-th round trip reached Redis."""
    done = 0
    immediate, pipelined = Redis.execute_command, Pipeline.execute

    def count(result: Any) -> Any:
        nonlocal done
        done += 1
        if done >= round_trips:
            raise Killed
        return result

    def execute_command(self: Redis, *args: Any, **options: Any) -> Any:
        return count(immediate(self, *args, **options))

    def execute(self: Pipeline, raise_on_error: bool = True) -> Any:
        return count(pipelined(self, raise_on_error))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Redis, "execute_command", execute_command)
        patch.setattr(Pipeline, "execute", execute)
        yield


def cancel_effects(redis: Redis, keys: Keys, job: Job) -> dict[str, Any]:
    """Everything a cancel of a waiting job changes, as one comparable record."""
    events = [json.loads(fields[b"message"])["event"] for _, fields in redis.xrange(keys.event_log(job.id))]
    return {
        "status": redis.hget(job.key, "status"),
        "ended_at": bool(redis.hget(job.key, "ended_at")),
        "on_queue": job.id.encode() in redis.lrange(Queue(job.origin, connection=redis).key, 0, -1),
        "in_canceled_registry": redis.zscore(CanceledJobRegistry(job.origin, connection=redis).key, job.id) is not None,
        "in_scheduled_registry": redis.zscore(ScheduledJobRegistry(job.origin, connection=redis).key, job.id)
                                 is not None,
        "events": events,
    }


def test_a_cancel_cut_short_anywhere_leaves_the_job_waiting_on_its_queue_or_wholly_canceled(
    redis_url: str, tmp_path: Path
) -> None:
    """A queued cancel is one step: killed after any of its round trips, the job is either still queued on its
    list (a retry of the cancel will find it) or canceled with all that goes with it, never queued on no list."""
    settings = load_settings(redis_url=redis_url, data_dir=tmp_path)
    redis, keys = Redis.from_url(redis_url), Keys()
    waiting = {"status": b"queued", "ended_at": False, "on_queue": True, "in_canceled_registry": False,
               "in_scheduled_registry": False, "events": []}
    canceled = {"status": b"canceled", "ended_at": True, "on_queue": False, "in_canceled_registry": True,
                "in_scheduled_registry": False, "events": ["canceled"]}
    for kill_at in range(1, 20):
        spec = jobstore.new_job_spec(Txt2ImgRequest(prompt="a cat"))
        jobstore.enqueue(redis, settings, spec)
        job = Job.fetch(spec.id, connection=redis)
        try:
            with dies_after(kill_at):
                outcome = jobstore.cancel_job(redis, keys, spec.id)
        except Killed:
            assert cancel_effects(redis, keys, job) in (waiting, canceled), f"killed after round trip {kill_at}"
            continue
        assert outcome is jobstore.CancelOutcome.canceled
        assert cancel_effects(redis, keys, job) == canceled
        break
    else:
        pytest.fail("the cancel never completed")
    assert kill_at > 1


def test_a_cancel_cut_short_anywhere_has_queued_its_completed_webhook_exactly_when_it_canceled(
    redis_url: str, tmp_path: Path
) -> None:
    """The completed webhook of a job canceled while queued is written by the cancel script itself: killed after any
    round trip, the job is canceled with one delivery queued (its body what GET answers), or waiting with none."""
    settings = load_settings(redis_url=redis_url, data_dir=tmp_path)
    redis, keys = Redis.from_url(redis_url), Keys()
    storage = LocalStorage(tmp_path, "http://api.example")
    webhooks = WebhookNotifier(redis, settings, storage)
    deliveries = Queue(keys.webhooks(), connection=redis)
    for kill_at in range(1, 30):
        spec = jobstore.new_job_spec(Txt2ImgRequest(prompt="a cat", webhook="https://93.184.216.34/h"))
        jobstore.enqueue(redis, settings, spec)
        killed = False
        try:
            with dies_after(kill_at):
                jobstore.cancel_job(redis, keys, spec.id, webhooks=webhooks)
        except Killed:
            killed = True
        ours = [Job.fetch(i, connection=redis).kwargs for i in deliveries.job_ids]
        ours = [k for k in ours if k["job_id"] == spec.id]
        if Job.fetch(spec.id, connection=redis).get_status() == JobStatus.CANCELED:
            [delivery] = ours
            view = jobstore.get_job(redis, keys, storage, spec.id)
            assert view is not None and delivery["event"] == "completed"
            assert delivery["payload"] == view.model_dump(mode="json"), f"killed after round trip {kill_at}"
        else:
            assert ours == [], f"killed after round trip {kill_at}"
        if not killed:
            break
    else:
        pytest.fail("the cancel never completed")
    assert kill_at > 1


@pytest.mark.parametrize("status", ["queued", "scheduled"])
def test_a_queued_cancel_has_the_effects_of_rqs_own_cancel_plus_end_time_and_event(
    redis_url: str, tmp_path: Path, status: str
) -> None:
    settings = load_settings(redis_url=redis_url, data_dir=tmp_path)
    redis, keys = Redis.from_url(redis_url), Keys()
    ours, theirs = (jobstore.new_job_spec(Txt2ImgRequest(prompt="a cat")) for _ in range(2))
    for spec in (ours, theirs):
        jobstore.enqueue(redis, settings, spec)
        if status == "scheduled":  # as RQ leaves a job whose retry waits for its interval
            job = Job.fetch(spec.id, connection=redis)
            job.set_status(JobStatus.SCHEDULED)
            redis.zadd(ScheduledJobRegistry(job.origin, connection=redis).key, {spec.id: time.time() + 60})

    assert jobstore.cancel_job(redis, keys, ours.id) is jobstore.CancelOutcome.canceled
    rq_job = Job.fetch(theirs.id, connection=redis)
    before = time.time()
    rq_job.cancel()  # RQ's cancel, then what the API adds: the end time and the event
    redis.hset(rq_job.key, "ended_at", "x")
    eventlog.record(redis, keys, theirs.id, eventlog.message("canceled", theirs.id, {"reason": "canceled"}))

    our_job = Job.fetch(ours.id, connection=redis)
    assert cancel_effects(redis, keys, our_job) == cancel_effects(redis, keys, rq_job)
    registry = CanceledJobRegistry(our_job.origin, connection=redis)
    assert abs(registry.connection.zscore(registry.key, ours.id) - before) <= 2  # type: ignore[operator]
    assert our_job.get_status() == JobStatus.CANCELED and our_job.ended_at is not None
    view = jobstore.get_job(redis, keys, LocalStorage(tmp_path, "http://api.example"), ours.id)
    assert view is not None and view.status.value == "canceled" and view.finished_at is not None


class LostReply(ConnectionError):
    pass


@contextmanager
def enqueue_reply_lost(*, committed: bool, lookups_fail: bool = False) -> Iterator[None]:
    """The enqueue transaction's reply never comes back (ConnectionError); the transaction did or did not run.
    With `lookups_fail`, the look-ups afterwards fail as well."""
    original = Pipeline.execute

    def execute(self: Pipeline, raise_on_error: bool = True) -> Any:
        commands = [args for args, _ in self.command_stack]
        enqueue = any(args[0] == "RPUSH" and str(args[1]).startswith("rq:queue:sdq-") for args in commands)
        if self.transaction and enqueue:
            if committed:
                original(self, raise_on_error)
            else:
                self.reset()
            raise LostReply("Connection closed by server.")
        if lookups_fail and any(args[0] == "EXISTS" for args in commands):
            self.reset()
            raise LostReply("Connection refused.")
        return original(self, raise_on_error)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Pipeline, "execute", execute)
        patch.setattr(commit, "LOOKUP_DELAYS_S", (0.0, 0.01))
        yield


def test_an_enqueue_whose_reply_was_lost_is_looked_up_before_it_counts_as_failed(
    redis_url: str, tmp_path: Path
) -> None:
    settings = load_settings(redis_url=redis_url, data_dir=tmp_path)
    redis = Redis.from_url(redis_url)
    queue = Queue("sdq-normal", connection=redis)
    first, second, third = (jobstore.new_job_spec(Txt2ImgRequest(prompt="a cat")) for _ in range(3))

    with enqueue_reply_lost(committed=True):
        assert jobstore.enqueue_many(redis, settings, [first]) == [0]
    assert queue.job_ids == [first.id]

    with enqueue_reply_lost(committed=False), pytest.raises(LostReply):
        jobstore.enqueue_many(redis, settings, [second])
    with enqueue_reply_lost(committed=True, lookups_fail=True), pytest.raises(commit.CommitUnknown) as unknown:
        jobstore.enqueue_many(redis, settings, [third])
    assert unknown.value.job_ids == {third.id}
    assert queue.job_ids == [first.id, third.id]


def test_an_enqueue_looked_up_as_not_committed_can_never_commit_later(redis_url: str, tmp_path: Path) -> None:
    """A slow Redis may still run a transaction whose client timed out. The look-up fences it: the transaction,
    sent before the look-up but run after it, aborts, so "not queued" stays true and the inputs may go."""
    settings = load_settings(redis_url=redis_url, data_dir=tmp_path)
    redis = Redis.from_url(redis_url)
    spec = jobstore.new_job_spec(Txt2ImgRequest(prompt="a cat"))
    late: list[Any] = []
    original = Pipeline.execute

    def execute(self: Pipeline, raise_on_error: bool = True) -> Any:
        if self.transaction and any(args[0] == "RPUSH" for args, _ in self.command_stack):
            # The client gives up; Redis has not run the transaction yet: keep its connection (and WATCH) alive.
            late.append((self, self.connection or self.connection_pool.get_connection(), list(self.command_stack)))
            self.connection, self.watching = None, False
            raise LostReply("Timeout reading from socket")
        return original(self, raise_on_error)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Pipeline, "execute", execute)
        with pytest.raises(LostReply):
            jobstore.enqueue_many(redis, settings, [spec])
    [(pipe, connection, commands)] = late
    with pytest.raises(WatchError):  # Redis gets to it now
        pipe._execute_transaction(connection, commands, True)
    connection.disconnect()
    assert not redis.exists(Job.key_for(spec.id)) and Queue("sdq-normal", connection=redis).job_ids == []
