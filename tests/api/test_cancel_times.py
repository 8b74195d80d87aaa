"""A canceled job has ended: `GET /v1/jobs/{id}` shows when (`finished_at`) and the timings that follow from it."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from fastapi.testclient import TestClient
from redis import Redis
from rq import Queue
from rq.job import Job, JobStatus

TINY = {"prompt": "a cat", "width": 64, "height": 64, "steps": 2}


def submit(client: TestClient) -> dict[str, Any]:
    r = client.post("/v1/txt2img", json=TINY)
    assert r.status_code == 202, r.text
    return dict(r.json())


def parse(value: str) -> datetime:
    return datetime.fromisoformat(value)


def test_job_canceled_while_queued_has_finished_at(client: TestClient) -> None:
    before = datetime.now(timezone.utc)
    job = submit(client)

    canceled = client.post(f"/v1/jobs/{job['id']}/cancel").json()
    shown = client.get(f"/v1/jobs/{job['id']}").json()

    after = datetime.now(timezone.utc)
    assert canceled["status"] == shown["status"] == "canceled"
    assert canceled["finished_at"] == shown["finished_at"]
    assert before <= parse(shown["created_at"]) <= parse(shown["finished_at"]) <= after
    assert shown["started_at"] is None
    assert 0 <= shown["timings"]["total_seconds"] <= (after - before).total_seconds()
    assert shown["timings"]["queue_seconds"] is None and shown["timings"]["run_seconds"] is None


def test_job_canceled_while_running_has_finished_at_not_before_it_started(client: TestClient, redis: Redis) -> None:
    job_id = submit(client)["id"]
    rq_job = Job.fetch(job_id, connection=redis)
    # What a worker does when it takes the job into a batch ...
    Queue(rq_job.origin, connection=redis).remove(job_id)
    started = datetime.now(timezone.utc)
    rq_job.set_status(JobStatus.STARTED)
    rq_job.meta["started_at"] = started.isoformat()
    rq_job.save_meta()
    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 202  # running: the worker is asked
    # ... and when it drops the job after a denoising step: RQ's cancel, which records no end time.
    rq_job.cancel()

    shown = client.get(f"/v1/jobs/{job_id}").json()

    assert shown["status"] == "canceled"
    finished = parse(shown["finished_at"])
    # RQ keeps the cancel time in whole seconds; the job cannot have ended before it started.
    assert started <= finished <= datetime.now(timezone.utc) + timedelta(seconds=1)
    assert shown["timings"]["run_seconds"] >= 0
    assert shown["timings"]["total_seconds"] >= shown["timings"]["queue_seconds"] >= 0
