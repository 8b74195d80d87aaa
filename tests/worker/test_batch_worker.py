"""The batch worker in this process (RQ burst mode) on the tiny checkpoint: out-of-memory splitting, stop-job, and
infrastructure faults that must not fail a job (storage blips, storage down for longer than a job may wait, a Redis
error out of the pipeline call)."""

from __future__ import annotations

import base64
import errno
import io
import itertools
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from botocore.exceptions import ClientError, EndpointConnectionError
from PIL import Image
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from rq.command import send_stop_job_command
from rq.job import Job, JobStatus
from rq.results import Result
from rq.worker import SimpleWorker

from core.imagefile import ModelInfo, read_parameters
from core.queues import Keys
from core.settings import Settings
from core.storage import LocalStorage, Storage
from model.requests import GenerationRequest, GenerationResult
from tests.worker.conftest import (
    logged_events,
    make_settings,
    max_pixel_diff,
    solo_images,
    stored_images,
    submit,
    wait_for,
)
from worker import tasks
from worker.batch_worker import BatchWorker
from worker.metrics import WorkerMetrics
from worker.tasks import Resident


@pytest.fixture(autouse=True)
def restore_signal_handlers() -> Iterator[None]:
    """RQ's work() installs SIGINT/SIGTERM handlers; give pytest its own back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.fixture
def settings(redis_url: str, tmp_path: Path, tiny_checkpoint: Path) -> Settings:
    return make_settings(redis_url, tmp_path, tiny_checkpoint)


def resident(settings: Settings, pipe: Any, storage: Storage | None = None) -> Resident:
    storage = storage or LocalStorage(settings.data_dir / "images", settings.public_url)
    return Resident(pipe, storage, Keys(settings.queue_prefix), 0.0, ModelInfo(pipe.name))


def burst(redis: Redis, settings: Settings, pipe: Any, storage: Storage | None = None) -> WorkerMetrics:
    """Run a worker until the queues are empty; returns its metrics."""
    keys = Keys(settings.queue_prefix)
    metrics = WorkerMetrics()
    worker = BatchWorker(keys.queues(), connection=redis, settings=settings,
                         resident=resident(settings, pipe, storage), metrics=metrics)
    worker.work(burst=True)
    return metrics


class FlakyStorage(LocalStorage):
    """Local storage whose writes raise ``error`` while ``failing()`` is true."""

    def __init__(self, settings: Settings, error: Exception, failing: Callable[[], bool]) -> None:
        super().__init__(settings.data_dir / "images", settings.public_url)
        self.error = error
        self.failing = failing
        self.failures = 0

    def put(self, key: str, data: bytes, content_type: str) -> None:
        if self.failing():
            self.failures += 1
            raise self.error
        super().put(key, data, content_type)


def down_for(seconds: float) -> Callable[[], bool]:
    """True from the first call until ``seconds`` after it: an outage that begins when the worker first writes,
    however long the worker took to get there."""
    started: list[float] = []

    def failing() -> bool:
        now = time.monotonic()
        if not started:
            started.append(now)
        return now < started[0] + seconds

    return failing


def first(k: int) -> Callable[[], bool]:
    """True for the first ``k`` calls, then False."""
    calls = itertools.count()
    return lambda: next(calls) < k


class Faulty:
    """The real pipeline, except that a call raises what ``fault`` returns for its requests (None: it runs)."""

    def __init__(self, pipe: Any, fault: Callable[[Sequence[GenerationRequest]], Exception | None]) -> None:
        self.pipe = pipe
        self.fault = fault
        self.calls: list[Sequence[GenerationRequest]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipe, name)

    def generate(self, requests: Sequence[GenerationRequest], callback: Callable[..., Any] | None = None
                 ) -> list[GenerationResult | None]:
        self.calls.append(requests)
        if (error := self.fault(requests)) is not None:
            raise error
        return self.pipe.generate(requests, callback)


def out_of_memory_above(limit: int) -> Callable[[Sequence[GenerationRequest]], Exception | None]:
    """CUDA's out-of-memory error for a call of more than ``limit`` images."""
    def fault(requests: Sequence[GenerationRequest]) -> Exception | None:
        images = sum(r.n for r in requests)
        return torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB for {images} images") \
            if images > limit else None
    return fault


def test_out_of_memory_splits_the_batch_until_it_fits(redis: Redis, settings: Settings, tiny_pipe: Any) -> None:
    specs = [submit(redis, settings, seed=10 + i) for i in range(6)] + [submit(redis, settings, n=2, seed=99)]
    pipe = Faulty(tiny_pipe, out_of_memory_above(3))

    metrics = burst(redis, settings, pipe)
    calls = [sum(r.n for r in requests) for requests in pipe.calls]

    for spec in specs:
        job = Job.fetch(spec.id, connection=redis)
        assert job.get_status() == JobStatus.FINISHED, job.meta.get("error")
        assert max_pixel_diff(stored_images(settings.data_dir, spec.id), solo_images(tiny_pipe, spec)) <= 1
    assert calls[0] == 8  # the whole batch first
    ran = [n for n in calls if n <= 3]
    assert sum(ran) == 8  # then halves of halves until each part fit, every image exactly once
    assert metrics.batch_size._sum.get() == 8


def test_a_job_that_breaks_its_batch_fails_alone(redis: Redis, settings: Settings, tiny_pipe: Any) -> None:
    good = [submit(redis, settings, seed=30 + i) for i in range(2)]
    poisoned = submit(redis, settings, prompt="poison", seed=40)
    later = submit(redis, settings, seed=50)
    # a job-specific fault: any call holding the prompt "poison" raises
    pipe = Faulty(tiny_pipe, lambda requests: RuntimeError("the UNet produced NaNs")
                  if any(r.prompt == "poison" for r in requests) else None)

    burst(redis, settings, pipe)

    for spec in [*good, later]:
        job = Job.fetch(spec.id, connection=redis)
        assert job.get_status() == JobStatus.FINISHED, job.meta.get("error")
        assert max_pixel_diff(stored_images(settings.data_dir, spec.id), solo_images(tiny_pipe, spec)) <= 1
    job = Job.fetch(poisoned.id, connection=redis)
    assert job.get_status() == JobStatus.FAILED
    assert job.meta["error"] == {"type": "RuntimeError", "message": "the UNet produced NaNs"}
    assert [len(requests) for requests in pipe.calls] == [4, 1, 1, 1, 1]  # the batch, then each of its jobs alone


def test_a_job_for_another_model_fails_without_running(redis: Redis, settings: Settings, tiny_pipe: Any) -> None:
    own = submit(redis, settings, seed=60, model=tiny_pipe.name)
    other = submit(redis, settings, seed=61, model="other")
    keys = Keys(settings.queue_prefix)
    # a worker listening where it should not (a misconfigured queue list): the batch key keeps the two apart, and
    # the job of the model it does not hold fails with the reason
    queues = [*keys.worker_queues(tiny_pipe.name), *keys.queues("other")]
    BatchWorker(queues, connection=redis, settings=settings, resident=resident(settings, tiny_pipe),
                metrics=WorkerMetrics()).work(burst=True)

    assert Job.fetch(own.id, connection=redis).get_status() == JobStatus.FINISHED
    job = Job.fetch(other.id, connection=redis)
    assert job.get_status() == JobStatus.FAILED
    assert job.meta["error"]["message"] == f"this job is for model 'other', and this worker holds {tiny_pipe.name!r}"
    assert not stored_images(settings.data_dir, other.id)
    # the worker recorded the model it holds, so the API keeps taking its jobs a while after the worker left
    assert redis.zscore(keys.models_seen(), tiny_pipe.name) is not None
    assert redis.zscore(keys.models_seen(), "other") is None


def test_rq_stop_job_command_stops_one_job_of_the_batch(redis: Redis, settings: Settings, tiny_pipe: Any) -> None:
    keep = submit(redis, settings, steps=30, seed=5)
    stop = submit(redis, settings, steps=30, seed=6)

    def stop_when_running() -> None:
        wait_for(lambda: "progress" in Job.fetch(stop.id, connection=redis).meta, 60, "the batch to run")
        send_stop_job_command(redis, stop.id)

    thread = threading.Thread(target=stop_when_running)
    thread.start()
    burst(redis, settings, tiny_pipe)
    thread.join()

    stopped = Job.fetch(stop.id, connection=redis)
    assert stopped.get_status() == JobStatus.STOPPED
    assert stored_images(settings.data_dir, stop.id) == []
    assert Job.fetch(keep.id, connection=redis).get_status() == JobStatus.FINISHED
    assert max_pixel_diff(stored_images(settings.data_dir, keep.id), solo_images(tiny_pipe, keep)) <= 1


def test_progress_and_previews_reach_the_event_log(redis: Redis, settings: Settings, tiny_pipe: Any) -> None:
    spec = submit(redis, settings, steps=4, preview_every=2)
    burst(redis, settings, tiny_pipe)

    events = logged_events(redis, spec.id)
    names = [e["event"] for e in events]
    assert names[0] == "running" and names[-1] == "succeeded"
    assert [e["data"]["step"] for e in events if e["event"] == "preview"] == [2, 4]
    preview = next(e for e in events if e["event"] == "preview")["data"]["image"]
    assert Image.open(io.BytesIO(base64.b64decode(preview))).format == "JPEG"
    progress = [e["data"] for e in events if e["event"] == "progress"]
    assert progress[-1] == {"step": 4, "total": 4, "percent": 100.0, "eta_seconds": 0.0}
    assert Job.fetch(spec.id, connection=redis).meta["progress"]["step"] == 4
    assert events[-1]["data"]["images"][0]["key"] == f"{spec.id}/0.png"


def test_a_plain_rq_worker_can_run_a_job_with_run_job(redis: Redis, settings: Settings, tiny_pipe: Any,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tasks, "_resident", resident(settings, tiny_pipe))  # what load_resident keeps per process
    spec = submit(redis, settings, n=2)

    SimpleWorker(Keys().queues(), connection=redis).work(burst=True)

    job = Job.fetch(spec.id, connection=redis)
    assert job.get_status() == JobStatus.FINISHED
    result = job.return_value()
    assert [image["seed"] for image in result["images"]] == [1, 2]
    assert job.meta["progress"]["step"] == 3
    assert max_pixel_diff(stored_images(settings.data_dir, spec.id), solo_images(tiny_pipe, spec)) <= 1


def test_results_use_the_output_format_and_carry_a1111_metadata(redis: Redis, settings: Settings,
                                                                 tiny_pipe: Any) -> None:
    png = submit(redis, settings, seed=3, negative_prompt="blurry", guidance_scale=5.0)
    webp = submit(redis, settings, seed=4, output_format="webp", output_quality=80)

    burst(redis, settings, tiny_pipe)

    png_result = Job.fetch(png.id, connection=redis).return_value()
    webp_result = Job.fetch(webp.id, connection=redis).return_value()
    assert [i["key"] for i in png_result["images"]] == [f"{png.id}/0.png"]
    assert webp_result["images"][0]["key"] == f"{webp.id}/0.webp"
    assert webp_result["images"][0]["content_type"] == "image/webp"
    data = (settings.data_dir / "images" / png.id / "0.png").read_bytes()
    meta = read_parameters(data)
    assert meta["prompt"] == "a photo of a cat" and meta["negative_prompt"] == "blurry"
    assert meta["settings"]["Seed"] == "3" and meta["settings"]["CFG scale"] == "5"
    assert meta["settings"]["Model"] == tiny_pipe.name


@pytest.mark.parametrize("error", [
    OSError(errno.ECONNRESET, "Connection reset by peer"),
    EndpointConnectionError(endpoint_url="http://s3.example:9000/results/x/0.png"),
    ClientError({"Error": {"Code": "SlowDown", "Message": "Please reduce your request rate."},
                 "ResponseMetadata": {"HTTPStatusCode": 503}}, "PutObject"),
], ids=["oserror", "s3-unreachable", "s3-503"])
def test_a_storage_blip_does_not_fail_the_job(redis: Redis, settings: Settings, tiny_pipe: Any,
                                              error: Exception) -> None:
    spec = submit(redis, settings, n=2)
    storage = FlakyStorage(settings, error, first(3))

    burst(redis, settings, tiny_pipe, storage)

    job = Job.fetch(spec.id, connection=redis)
    assert job.get_status() == JobStatus.FINISHED, job.meta.get("error")
    assert storage.failures == 3
    assert job.retries_left == settings.job_retries
    assert len(stored_images(settings.data_dir, spec.id)) == 2


def test_storage_down_for_longer_than_the_job_may_wait_gives_the_job_back(redis: Redis, settings: Settings,
                                                                         tiny_pipe: Any) -> None:
    spec = submit(redis, settings)
    redis.hset(Job.key_for(spec.id), "timeout", 3)  # a job that may take 3 s: it waits for storage that long
    storage = FlakyStorage(settings, OSError(errno.EIO, "Input/output error"), down_for(5))

    burst(redis, settings, tiny_pipe, storage)

    job = Job.fetch(spec.id, connection=redis)
    assert job.get_status() == JobStatus.FINISHED, job.meta.get("error")
    assert job.retries_left == settings.job_retries - 1  # given back once, through RQ's Retry: no failure
    assert [r.type for r in job.results()] == [Result.Type.SUCCESSFUL]
    states = [e["event"] for e in logged_events(redis, spec.id) if e["event"] != "progress"]
    assert states == ["running", "running", "succeeded"]
    assert len(stored_images(settings.data_dir, spec.id)) == 1


def test_a_redis_error_out_of_the_pipeline_call_is_not_the_jobs(redis: Redis, settings: Settings,
                                                                tiny_pipe: Any) -> None:
    spec = submit(redis, settings)
    faults = iter([RedisConnectionError("Error while reading from 127.0.0.1:6379: connection reset")])
    pipe = Faulty(tiny_pipe, lambda requests: next(faults, None))

    burst(redis, settings, pipe)

    job = Job.fetch(spec.id, connection=redis)
    assert job.get_status() == JobStatus.FINISHED, job.meta.get("error")
    assert job.retries_left == settings.job_retries
    assert len(pipe.calls) == 2  # the same call again
