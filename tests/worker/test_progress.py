"""The per-step callback when Redis cannot be reached: the step goes on, stop requests still act, progress is kept."""

from __future__ import annotations

import torch
from redis import Redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from rq.job import Job

from core.jobs import GenerationParams
from core.jobstore import new_job_spec
from core.queues import JOB_FUNC, Keys
from model.requests import StepEvent
from tests.redis_server import free_port
from worker.progress import ReportedJob, StepReporter


def test_a_step_with_redis_unreachable_neither_raises_nor_forgets_stop_requests() -> None:
    # Nothing listens there; no retries, as the batch worker's client for the step callback (outages.quick_client).
    nowhere = Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    specs = [new_job_spec(GenerationParams(prompt="a photo of a cat", width=64, height=64, steps=3))
             for _ in range(2)]
    jobs = [Job.create(JOB_FUNC, kwargs={"spec": s.model_dump(mode="json")}, id=s.id, connection=nowhere)
            for s in specs]
    reporter = StepReporter(nowhere, Keys(), [ReportedJob(j, s) for j, s in zip(jobs, specs, strict=True)],
                            stop_requests=lambda: {jobs[1].id})

    drop = reporter(StepEvent(step=3, total=3, active=[0, 1], latents=torch.zeros(2, 4, 8, 8)))

    assert drop == [1]  # the stop request (in memory) acts without Redis
    assert reporter.dropped == {1: "stopped"}
    assert jobs[0].meta["progress"]["step"] == 3  # kept for the job's final record
