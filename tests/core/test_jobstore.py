"""The enqueue side of the api<->worker contract: what a worker finds on the queue."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from redis import Redis
from rq import Queue
from rq.job import Job

from core import jobstore
from core.jobs import JobSpec, Priority, Txt2ImgRequest
from core.queues import JOB_FUNC, Keys
from core.settings import load_settings


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
